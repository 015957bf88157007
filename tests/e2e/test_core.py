"""End to end: real mitmdump + the addon in front of a real local origin that counts requests."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from mitmproxy import io

from tests.conftest import Proxy, start_proxy
from tests.origin import Origin, start_origin


def q(cc: str) -> str:
    return quote(cc, safe="")


def test_miss_then_hit(client: httpx.Client, origin: Origin, proxy: Proxy) -> None:
    path = f"/basic?cc={q('max-age=60')}"
    r1 = client.get(path)
    assert r1.status_code == 200
    assert r1.text == "/basic #1"
    assert r1.headers["x-cache-status"] == "MISS"
    assert r1.headers["cache-status"].startswith("mitmcache; fwd=uri-miss; fwd-status=200; stored")
    assert "age" not in r1.headers

    r2 = client.get(path)
    assert r2.status_code == 200
    assert r2.text == "/basic #1"
    assert r2.headers["x-cache-status"] == "HIT"
    assert r2.headers["cache-status"].startswith("mitmcache; hit; ttl=")
    assert "detail=l1" in r2.headers["cache-status"]
    assert r2.headers["content-length"] == str(len("/basic #1"))
    assert origin.count(path) == 1
    m = proxy.metrics()
    assert m['mitmcache_requests_total{result="hit"}'] >= 1
    assert m['mitmcache_requests_total{result="miss"}'] >= 1
    assert m["mitmcache_lru_bytes"] > len("/basic #1")


def test_age_includes_upstream_age_and_residence(client: httpx.Client, origin: Origin) -> None:
    path = f"/age?cc={q('max-age=600')}&age=30"
    assert client.get(path).headers["x-cache-status"] == "MISS"
    time.sleep(1.1)
    r = client.get(path)
    assert r.headers["x-cache-status"] == "HIT"
    assert int(r.headers["age"]) >= 31  # upstream Age (30) + time in cache (≥1 s), §4.2.3
    assert int(r.headers["age"]) < 40


def test_age_from_old_date_counts_against_freshness(client: httpx.Client, origin: Origin) -> None:
    # Date 100 s in the past, max-age=50: apparent age 100 > 50 → stale on arrival (§4.2.3).
    path = f"/olddate?cc={q('max-age=50')}&date=100"
    client.get(path)
    r = client.get(path)
    assert r.headers["x-cache-status"] == "MISS"
    assert origin.count(path) == 2


@pytest.mark.parametrize(
    "name,query",
    [
        # 2 s lifetimes: Date has whole seconds, so a response may arrive up to 1 s old.
        ("max-age", f"cc={q('max-age=2')}"),
        ("s-maxage beats max-age", f"cc={q('max-age=600, s-maxage=2')}"),
        ("expires", "expires=2"),
    ],
)
def test_freshness_lifetime_expires(client: httpx.Client, origin: Origin, name: str, query: str) -> None:
    path = f"/fresh-{name.replace(' ', '-')}?{query}"
    assert client.get(path).headers["x-cache-status"] == "MISS"
    assert client.get(path).headers["x-cache-status"] == "HIT"
    assert origin.count(path) == 1
    time.sleep(2.1)
    r = client.get(path)
    assert r.headers["x-cache-status"] == "MISS"
    assert r.text.endswith("#2")
    assert origin.count(path) == 2


@pytest.mark.parametrize(
    "name,query,request_headers",
    [
        ("no-store", f"cc={q('no-store, max-age=60')}", {}),
        ("private", f"cc={q('private, max-age=60')}", {}),
        ("set-cookie", f"cc={q('max-age=60')}&cookie=1", {}),
        ("authorization", f"cc={q('max-age=60')}", {"Authorization": "Bearer alice"}),
        ("request-no-store", f"cc={q('max-age=60')}", {"Cache-Control": "no-store"}),
    ],
)
def test_not_stored(client: httpx.Client, origin: Origin, name: str, query: str, request_headers: dict[str, str]) -> None:
    path = f"/nostore-{name}?{query}"
    r1 = client.get(path, headers=request_headers)
    assert r1.headers["x-cache-status"] == "MISS"
    assert "stored" not in r1.headers["cache-status"].split("; ")
    assert f"detail={name}" in r1.headers["cache-status"]
    r2 = client.get(path, headers=request_headers)
    assert r2.headers["x-cache-status"] == "MISS"
    assert r2.text.endswith("#2")
    assert origin.count(path) == 2


def test_set_cookie_never_reaches_another_user(client: httpx.Client, origin: Origin) -> None:
    path = f"/cookie?cc={q('public, max-age=60')}&cookie=1"
    assert client.get(path).headers["set-cookie"] == "session=user1; Path=/"
    assert client.get(path).headers["set-cookie"] == "session=user2; Path=/"


@pytest.mark.parametrize("directive", ["public", "s-maxage=60", "must-revalidate"])
def test_authorization_stored_when_response_allows(client: httpx.Client, origin: Origin, directive: str) -> None:
    path = f"/auth-ok?cc={q('max-age=60, ' + directive)}"
    client.get(path, headers={"Authorization": "Bearer alice"})
    r = client.get(path, headers={"Authorization": "Bearer bob"})
    assert r.headers["x-cache-status"] == "HIT"
    assert origin.count(path) == 1


def test_vary_two_variants(client: httpx.Client, origin: Origin) -> None:
    path = f"/vary?cc={q('max-age=60')}&vary=Accept-Language"
    en = client.get(path, headers={"Accept-Language": "en"})
    de = client.get(path, headers={"Accept-Language": "de"})
    assert (en.text, de.text) == ("/vary #1 Accept-Language=en", "/vary #2 Accept-Language=de")
    assert de.headers["cache-status"].startswith("mitmcache; fwd=vary-miss")
    en2 = client.get(path, headers={"Accept-Language": "en"})
    de2 = client.get(path, headers={"Accept-Language": "de"})
    # Normalised: the case of Accept-Language does not split the variant.
    en3 = client.get(path, headers={"Accept-Language": "EN"})
    assert [r.headers["x-cache-status"] for r in (en2, de2, en3)] == ["HIT", "HIT", "HIT"]
    assert (en2.text, de2.text, en3.text) == (en.text, de.text, en.text)
    assert origin.count(path) == 2
    # A request without the header is a third variant, not one of the two.
    assert client.get(path).headers["x-cache-status"] == "MISS"


def test_vary_star_not_stored(client: httpx.Client, origin: Origin) -> None:
    path = f"/varystar?cc={q('max-age=60')}&vary={q('Accept, *')}"
    client.get(path)
    assert client.get(path).headers["x-cache-status"] == "MISS"
    assert origin.count(path) == 2


def test_client_validator_gets_304_from_cache(client: httpx.Client, origin: Origin) -> None:
    path = f"/inm?cc={q('max-age=60')}&etag=v1&lm=3600"
    r1 = client.get(path)
    assert r1.headers["etag"] == '"v1"'
    r2 = client.get(path, headers={"If-None-Match": 'W/"v1"'})
    assert r2.status_code == 304
    assert r2.content == b""
    assert r2.headers["x-cache-status"] == "HIT"
    assert r2.headers["etag"] == '"v1"'
    assert "content-length" not in r2.headers
    r3 = client.get(path, headers={"If-Modified-Since": r1.headers["last-modified"]})
    assert r3.status_code == 304
    r4 = client.get(path, headers={"If-None-Match": '"other"'})
    assert r4.status_code == 200 and r4.text == r1.text
    assert origin.count(path) == 1


def test_cold_conditional_request_fills_the_cache_and_is_answered_from_it(client: httpx.Client, origin: Origin) -> None:
    """A conditional GET with nothing stored is fetched unconditionally, stored, and its own
    validator answered from the stored response (never a stored 304: reference W5)."""
    path = f"/inm-miss?cc={q('max-age=60')}&etag=v1"
    r1 = client.get(path, headers={"If-None-Match": '"v1"'})
    assert r1.status_code == 304 and r1.headers["x-cache-status"] == "MISS"
    assert "stored" in r1.headers["cache-status"]
    assert origin.requests_for(path)[0].headers.get("if-none-match") is None  # asked unconditionally
    r2 = client.get(path, headers={"If-None-Match": '"other"'})
    assert r2.status_code == 200 and r2.text == "/inm-miss #1" and r2.headers["x-cache-status"] == "HIT"
    r3 = client.get(path, headers={"If-None-Match": '"v1"'})
    assert r3.status_code == 304 and r3.headers["x-cache-status"] == "HIT"
    assert origin.count(path) == 1


def test_revalidation_with_304_from_origin(client: httpx.Client, origin: Origin) -> None:
    path = f"/reval?cc={q('max-age=2')}&etag=v1"
    assert client.get(path).text == "/reval #1"
    time.sleep(2.1)
    r = client.get(path)
    assert r.status_code == 200
    assert r.text == "/reval #1"  # body from the cache, origin only said 304
    assert r.headers["x-cache-status"] == "HIT"
    assert "fwd=stale; fwd-status=304" in r.headers["cache-status"]
    seen = origin.requests_for(path)
    assert len(seen) == 2
    assert seen[1].headers.get("if-none-match") == '"v1"'
    r3 = client.get(path)  # freshened by the 304
    assert r3.headers["x-cache-status"] == "HIT"
    assert r3.headers["cache-status"].startswith("mitmcache; hit")
    assert origin.count(path) == 2


def test_revalidation_with_last_modified(client: httpx.Client, origin: Origin) -> None:
    path = f"/reval-lm?cc={q('no-cache')}&lm=100"
    r1 = client.get(path)
    assert r1.headers["x-cache-status"] == "MISS"
    r2 = client.get(path)  # no-cache: stored, but validated on every use (§5.2.2.4)
    assert r2.text == r1.text
    seen = origin.requests_for(path)
    assert seen[1].headers.get("if-modified-since") == r1.headers["last-modified"]
    assert "fwd=stale; fwd-status=304" in r2.headers["cache-status"]


def test_request_no_cache_revalidates(client: httpx.Client, origin: Origin) -> None:
    path = f"/reqnocache?cc={q('max-age=60')}&etag=e"
    client.get(path)
    r = client.get(path, headers={"Cache-Control": "no-cache"})
    assert "fwd=request; fwd-status=304" in r.headers["cache-status"]
    r = client.get(path, headers={"Pragma": "no-cache"})
    assert "fwd=request" in r.headers["cache-status"]
    assert origin.count(path) == 3


def test_post_invalidates_cached_get(client: httpx.Client, origin: Origin) -> None:
    path = f"/item?cc={q('max-age=60')}"
    client.get(path)
    assert client.get(path).headers["x-cache-status"] == "HIT"
    p = client.post(path, content=b"x")
    assert p.status_code == 200
    assert "x-cache-status" not in p.headers
    r = client.get(path)
    assert r.headers["x-cache-status"] == "MISS"
    assert r.text == "/item #3"  # GET, POST, GET


def test_failed_post_does_not_invalidate(client: httpx.Client, origin: Origin) -> None:
    path = f"/item-403?cc={q('max-age=60')}"
    client.get(path)
    client.post(f"/item-403?cc={q('max-age=60')}&status=403")  # another URI: no effect
    client.delete(path.replace("cc=", "status=403&cc="))
    assert client.get(path).headers["x-cache-status"] == "HIT"


def test_post_invalidates_same_origin_location(client: httpx.Client, origin: Origin, proxy: Proxy) -> None:
    target = f"/loc-target?cc={q('max-age=60')}"
    client.get(target)
    assert client.get(target).headers["x-cache-status"] == "HIT"
    # An absolute Location naming the origin invalidates too (reference W15 fixed).
    client.post(f"/loc-post?status=201&location={q(origin.url + target)}")
    assert client.get(target).headers["x-cache-status"] == "MISS"
    # A relative Content-Location as well.
    client.get(target)
    client.post(f"/loc-post2?cloc={q(target)}")
    assert client.get(target).headers["x-cache-status"] == "MISS"
    # A cross-origin one does not.
    client.get(target)
    client.post(f"/loc-post3?location={q('http://elsewhere.example' + target)}")
    assert client.get(target).headers["x-cache-status"] == "HIT"


def _raw_exchange(sock: socket.socket, request: bytes) -> tuple[bytes, bytes]:
    """Send one request, read one response (headers + Content-Length body unless HEAD)."""
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if request.startswith(b"HEAD") or b" 304 " in head.split(b"\r\n")[0]:
        return head, rest
    length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest


def test_head_after_get_and_keepalive_survives(proxy: Proxy, origin: Origin) -> None:
    path = f"/head?cc={q('max-age=60')}&size=1000"
    with socket.create_connection(("127.0.0.1", proxy.port), 5) as s:
        host = f"Host: 127.0.0.1:{proxy.port}\r\n".encode()
        head, body = _raw_exchange(s, b"GET " + path.encode() + b" HTTP/1.1\r\n" + host + b"\r\n")
        assert len(body) == 1000
        head, rest = _raw_exchange(s, b"HEAD " + path.encode() + b" HTTP/1.1\r\n" + host + b"\r\n")
        assert b"x-cache-status: hit" in head.lower()
        assert b"content-length: 1000" in head.lower()
        assert rest == b""  # no body bytes after a HEAD
        # The same keep-alive connection still works.
        head, body = _raw_exchange(s, b"GET " + path.encode() + b" HTTP/1.1\r\n" + host + b"\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert len(body) == 1000
    assert origin.count(path, "GET") == 1
    assert origin.count(path, "HEAD") == 0


def test_forwarded_head_freshens_the_stored_get(client: httpx.Client, origin: Origin) -> None:
    path = f"/head-fresh?cc={q('max-age=2')}&etag=v1"
    client.get(path)
    time.sleep(2.1)
    h = client.head(path)  # stale: forwarded; its 200 updates the stored GET response (§4.3.5)
    assert h.headers["x-cache-status"] == "MISS" and "head-freshened" in h.headers["cache-status"]
    r = client.get(path)
    assert r.headers["x-cache-status"] == "HIT" and r.text == "/head-fresh #1"
    assert origin.count(path, "GET") == 1


def test_forwarded_head_with_other_etag_marks_the_entry_stale(client: httpx.Client, origin: Origin) -> None:
    path = f"/head-changed?cc={q('max-age=2')}&etag=v1"
    client.get(path)
    time.sleep(2.1)
    origin.extra["/head-changed"] = [("ETag", '"v2"')]
    try:
        h = client.head(path)
        assert "head-marked-stale" in h.headers["cache-status"]
        # Not served from the outdated entry. (This origin even answers the conditional GET with a
        # 304 naming the new ETag: such a 304 updates nothing (§4.3.4); the cache asks again.)
        r = client.get(path)
        assert r.headers["x-cache-status"] == "MISS" and r.text == "/head-changed #4"
        assert origin.requests_for(path)[-1].headers.get("if-none-match") is None
    finally:
        del origin.extra["/head-changed"]


def test_head_miss_is_forwarded_not_stored(client: httpx.Client, origin: Origin) -> None:
    path = f"/headmiss?cc={q('max-age=60')}"
    r = client.head(path)
    assert r.headers["x-cache-status"] == "MISS"
    assert client.get(path).headers["x-cache-status"] == "MISS"  # HEAD never creates the GET entry
    assert origin.count(path) == 2


def test_only_if_cached_miss_is_504_without_origin(client: httpx.Client, origin: Origin) -> None:
    path = f"/oic?cc={q('max-age=60')}"
    r = client.get(path, headers={"Cache-Control": "only-if-cached"})
    assert r.status_code == 504
    assert r.headers["x-cache-status"] == "MISS"
    assert origin.count(path) == 0
    client.get(path)
    r = client.get(path, headers={"Cache-Control": "only-if-cached"})
    assert r.status_code == 200 and r.headers["x-cache-status"] == "HIT"
    # A stored entry that would need revalidation is not usable either: still 504.
    r = client.get(path, headers={"Cache-Control": "only-if-cached, max-age=0"})
    assert r.status_code == 504
    assert origin.count(path) == 1


def test_max_stale_serves_stale(client: httpx.Client, origin: Origin) -> None:
    # stale-if-error keeps the entry past its freshness; the client's max-stale allows it.
    path = f"/maxstale?cc={q('max-age=1, stale-if-error=60')}"
    client.get(path)
    time.sleep(1.2)
    r = client.get(path, headers={"Cache-Control": "max-stale=30"})
    assert r.headers["x-cache-status"] == "STALE"
    assert r.text == "/maxstale #1"
    path2 = f"/maxstale-mr?cc={q('max-age=1, must-revalidate, stale-if-error=60')}"
    client.get(path2)
    time.sleep(1.2)
    r = client.get(path2, headers={"Cache-Control": "max-stale=30"})
    assert r.headers["x-cache-status"] == "MISS"  # must-revalidate: never stale (§4.2.4)


def test_ranges_served_from_a_cached_full_response(client: httpx.Client, origin: Origin) -> None:
    path = f"/range?cc={q('max-age=60')}&etag=r"
    full = client.get(path).content  # b"/range #1"
    r = client.get(path, headers={"Range": "bytes=1-5"})
    assert r.status_code == 206 and r.content == full[1:6]
    assert r.headers["content-range"] == f"bytes 1-5/{len(full)}"
    assert r.headers["x-cache-status"] == "HIT"
    assert client.get(path, headers={"Range": "bytes=-2"}).content == full[-2:]
    assert client.get(path, headers={"Range": "bytes=0-1", "If-Range": '"other"'}).status_code == 200
    r = client.get(path, headers={"Range": "bytes=999-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(full)}"
    assert origin.count(path) == 1


def test_range_miss_goes_to_the_origin_and_no_206_is_stored(client: httpx.Client, origin: Origin) -> None:
    path = f"/range-miss?cc={q('max-age=60')}&status=206"
    r = client.get(path, headers={"Range": "bytes=0-1"})
    assert r.status_code == 206 and r.headers["x-cache-status"] == "MISS"
    assert "detail=range" in r.headers["cache-status"]
    assert client.get(path).headers["x-cache-status"] == "MISS"  # the 206 was not stored
    assert origin.count(path) == 2


def test_oversized_response_passes_through(client: httpx.Client, origin: Origin, proxy: Proxy) -> None:
    path = f"/big?cc={q('max-age=60')}&size={11 * 1024 * 1024}"
    r = client.get(path)
    assert len(r.content) == 11 * 1024 * 1024
    # Known to be too large from its Content-Length: streamed through, never held whole.
    assert "detail=streamed+too-large" in r.headers["cache-status"]
    again = client.get(path)
    assert again.headers["x-cache-status"] == "MISS" and "hit-for-pass" in again.headers["cache-status"]
    assert proxy.metrics()['mitmcache_not_stored_total{reason="too-large"}'] >= 2


def test_hit_served_with_origin_stopped(tmp_path, fresh_origin: Origin) -> None:
    proxy = start_proxy(tmp_path, f"reverse:{fresh_origin.url}")
    try:
        c = proxy.client()
        path = f"/down?cc={q('max-age=60')}"
        assert c.get(path).headers["x-cache-status"] == "MISS"
        fresh_origin.stop()
        c2 = proxy.client()  # a new client connection, with the origin gone
        r = c2.get(path)
        assert r.status_code == 200
        assert r.text == "/down #1"
        assert r.headers["x-cache-status"] == "HIT"
        assert c2.get("/not-cached").status_code == 502  # a miss does need the origin
    finally:
        proxy.stop()


def test_https_regular_mode(tmp_path) -> None:
    tls_origin = start_origin(tls=True)
    proxy = start_proxy(tmp_path, "regular", "ssl_insecure=true")
    try:
        ca = proxy.confdir / "mitmproxy-ca-cert.pem"
        with httpx.Client(proxy=proxy.url, verify=ssl.create_default_context(cafile=str(ca)), timeout=10) as c:
            url = f"https://127.0.0.1:{tls_origin.port}/tls?cc={q('max-age=60')}"
            r1 = c.get(url)
            r2 = c.get(url)
            assert (r1.headers["x-cache-status"], r2.headers["x-cache-status"]) == ("MISS", "HIT")
            assert r2.text == "/tls #1"
            # Same host, port and path over plain http is another cache entry.
            r3 = c.get(url.replace("https://", "http://"))
            assert r3.status_code == 502 or r3.headers.get("x-cache-status") == "MISS"
        assert tls_origin.count(f"/tls?cc={q('max-age=60')}") == 1
    finally:
        proxy.stop()
        tls_origin.stop()


def test_invalid_option_rejected_at_startup(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="cache_l1_max_bytes: must be at least 1 bytes"):
        start_proxy(tmp_path, "regular", "cache_l1_max_bytes=0")
    with pytest.raises(RuntimeError, match="cache_metrics_port: must be 0..65535"):
        start_proxy(tmp_path, "regular", "cache_metrics_port=70000")
    with pytest.raises(RuntimeError, match="cache_max_object_bytes: must be at least 0 bytes"):
        start_proxy(tmp_path, "regular", "cache_max_object_bytes=-1")


@pytest.mark.parametrize(
    "name,hdr,kind",
    [
        ("cc", "Cache-Control: max-age=soon", "cache-control"),
        ("date", "Date: yesterday-ish|Cache-Control: max-age=60", "date"),
        ("lm", "Last-Modified: \x01garbage", "last-modified"),
        ("age", "Age: -5|Cache-Control: max-age=60", "age"),
        ("expires", "Expires: next tuesday", "expires"),
    ],
)
def test_malformed_headers_are_counted_and_passed_through(
    client: httpx.Client, origin: Origin, proxy: Proxy, name: str, hdr: str, kind: str
) -> None:
    path = f"/bad-{name}?hdr={q(hdr)}"
    before = proxy.metrics().get(f'mitmcache_bad_input_total{{kind="{kind}"}}', 0)
    r = client.get(path)
    assert r.status_code == 200 and r.text == f"/bad-{name} #1"
    assert r.headers["x-cache-status"] == "MISS"
    assert proxy.metrics()[f'mitmcache_bad_input_total{{kind="{kind}"}}'] == before + 1
    # An invalid max-age or Expires means stale (§4.2.1, §5.3): not served from the cache.
    if kind in ("cache-control", "expires"):
        assert client.get(path).headers["x-cache-status"] == "MISS"


def test_flows_with_the_cache_can_be_saved_and_read_back(tmp_path: Path, origin: Origin) -> None:
    """`-w`/save_stream_file must work: CI records traffic through the cache (flow files)."""
    flows_file = tmp_path / "flows.mitm"
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}", f"save_stream_file={flows_file}")
    try:
        c = proxy.client()
        path = f"/saved?cc={q('max-age=60')}"
        c.get(path)
        c.get(path)
    finally:
        proxy.stop()  # fails the test on any addon error (e.g. unserializable metadata)
    with open(flows_file, "rb") as f:
        flows = list(io.FlowReader(f).stream())
    assert [fl.response.headers["x-cache-status"] for fl in flows] == ["MISS", "HIT"]  # type: ignore[union-attr]
    assert flows[1].metadata["mitmcache"]["x-cache-status"] == "HIT"
    assert flows[1].response.content == b"/saved #1"  # type: ignore[union-attr]
