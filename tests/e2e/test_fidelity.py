"""End to end: HTTP fidelity through real mitmdump, on L1 and on L2.

Every case runs twice (``tier``): on a plain proxy (L1) and on a proxy whose L1 is off
(``cache_l1_ttl=0``) so every stored response is a round trip through a real Valkey ring (L2).
Each asserts the RFC's value: status, fields, bodies, and what the counting origin received.

Waits: ``max-age=1`` entries are stale after ``STALE`` seconds (the Date has whole seconds, so a
response can arrive up to 1 s old; after 1.1 s of residence its age is over 1 s whatever Date
said), or at once with ``OLD``. Background revalidations are awaited by watching the origin's
request count.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import pytest

from mitmcache.valkey_nodes import ValkeyNode
from tests.conftest import Proxy, running_nodes, start_proxy
from tests.origin import Origin

STALE = 1.1  # seconds after which a max-age=1 response is stale
# Where the wait itself is not the subject: every response of the target carries a Date 2 s in
# the past, so a max-age=1 response is stale on arrival (apparent age, RFC 9111 §4.2.3) and is
# kept for revalidation by its ETag or stale window; a 304 saying max-age=60 still freshens it.
OLD = "date=2"
IMF_FIXDATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"[0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)


def q(value: str) -> str:
    return quote(value, safe="")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ring() -> Iterator[list[ValkeyNode]]:
    with running_nodes(3) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def l2_proxy(origin: Origin, ring: list[ValkeyNode], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """Every hit is a Valkey round trip: L1 holds nothing (cache_l1_ttl=0)."""
    urls = ",".join(n.url for n in ring)
    p = start_proxy(tmp_path_factory.mktemp("l2"), f"reverse:{origin.url}", f"cache_valkey_urls={urls}", "cache_l1_ttl=0")
    yield p
    p.stop()


@dataclass
class Tier:
    name: str  # "l1" or "l2": also the first path segment, so the two proxies never share a URL
    proxy: Proxy

    def path(self, name: str) -> str:
        return f"/{self.name}/{name}"

    def get(self, target: str, **kwargs: object) -> httpx.Response:
        """Each request from a new client (no cookie jar, no connection shared)."""
        with httpx.Client(base_url=self.proxy.url, timeout=10) as c:
            return c.get(target, **kwargs)  # type: ignore[arg-type]

    def head(self, target: str, **kwargs: object) -> httpx.Response:
        with httpx.Client(base_url=self.proxy.url, timeout=10) as c:
            return c.head(target, **kwargs)  # type: ignore[arg-type]

    def assert_hit(self, r: httpx.Response) -> None:
        assert r.headers["x-cache-status"] == "HIT", r.headers.get("cache-status")
        assert r.headers["cache-status"].startswith("mitmcache; hit"), r.headers["cache-status"]
        assert f"detail={self.name}" in r.headers["cache-status"], r.headers["cache-status"]


@pytest.fixture(params=["l1", "l2"])
def tier(request: pytest.FixtureRequest) -> Tier:
    return Tier(request.param, request.getfixturevalue("proxy" if request.param == "l1" else "l2_proxy"))


def wait_for_origin(origin: Origin, target: str, n: int, timeout: float = 5.0) -> None:
    """Until the origin has seen ``n`` requests for ``target``, then a moment for the cache to
    store what it got (the worker admits the answer after the origin has sent it)."""
    deadline = time.monotonic() + timeout
    while origin.count(target) < n:
        assert time.monotonic() < deadline, f"origin saw {origin.count(target)} requests for {target}, not {n}"
        time.sleep(0.02)
    time.sleep(0.3)


def conditionals(origin: Origin, target: str) -> list[str | None]:
    """The If-None-Match of every request the origin received for ``target``, in order."""
    return [s.headers.get("if-none-match") for s in origin.requests_for(target)]


@dataclass
class Raw:
    status: int
    fields: list[tuple[bytes, bytes]]
    body: bytes

    def get(self, name: str) -> bytes | None:
        values = [v for k, v in self.fields if k.lower() == name.encode()]
        return b", ".join(values) if values else None


def raw_request(proxy: Proxy, method: str, target: bytes, extra: bytes = b"") -> Raw:
    """One request with its target exactly as given (no client re-encoding), on its own connection."""
    request = (
        method.encode() + b" " + target + b" HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{proxy.port}\r\nConnection: close\r\n".encode() + extra + b"\r\n"
    )
    with socket.create_connection(("127.0.0.1", proxy.port), 10) as s:
        s.settimeout(10)
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"connection closed before the response head: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        fields = [(k.strip(), v.strip()) for k, _, v in (line.partition(b":") for line in lines[1:])]
        raw = Raw(status, fields, body)
        if method != "HEAD" and status not in (204, 304):
            length = int(raw.get("content-length") or 0)
            while len(body) < length:
                chunk = s.recv(65536)
                assert chunk, "connection closed mid-body"
                body += chunk
            raw.body = body
    return raw


# ------------------------------------------------------------ 1. Set-Cookie and 304 merges


CC_BY_MODE = {
    "foreground": "max-age=1",  # revalidated by mitmproxy's forwarded request
    "stale-if-error": "max-age=1, stale-if-error=30",  # revalidated by the cache's own client
    "background": "max-age=1, stale-while-revalidate=30",
}


@pytest.mark.parametrize("mode", ["foreground", "stale-if-error", "background", "head"])
def test_set_cookie_from_a_freshening_response_reaches_only_its_own_client(
    tier: Tier, origin: Origin, mode: str
) -> None:
    """RFC 6265 §8.2 / RFC 9111 §3.2, §4.3.4, §4.3.5: a 304 (or a HEAD's 200) that freshens the
    stored response may carry Set-Cookie: the client whose request got it receives it, the
    shared entry never holds it."""
    if mode == "head":
        fresher = q("Set-Cookie: session=head-c|Cache-Control: max-age=60")
        target = tier.path("cookie-head") + f"?cc={q('max-age=1')}&etag=v1&hhead={fresher}"
    else:
        fresher = q("Cache-Control: max-age=60|Set-Cookie: session=secret-a")
        target = tier.path(f"cookie-{mode}") + f"?cc={q(CC_BY_MODE[mode])}&etag=v1&h304={fresher}"
    body = tier.path(f"cookie-{mode}") + " #1"

    first = tier.get(target)
    assert (first.status_code, first.text, first.headers["x-cache-status"]) == (200, body, "MISS")
    assert "set-cookie" not in first.headers
    time.sleep(STALE)

    if mode in ("foreground", "stale-if-error"):
        a = tier.get(target)  # client A: stale → revalidated; the 304 carries A's cookie
        assert (a.status_code, a.text) == (200, body)
        assert a.headers["x-cache-status"] == "HIT" and "fwd=stale; fwd-status=304" in a.headers["cache-status"]
        assert a.headers.get_list("set-cookie") == ["session=secret-a"]
        assert a.headers["cache-control"] == "max-age=60"  # the 304's fields were merged
        assert conditionals(origin, target) == [None, '"v1"']
    elif mode == "background":
        a = tier.get(target)  # served stale at once; the 304 arrives later, in the background
        assert (a.status_code, a.text, a.headers["x-cache-status"]) == (200, body, "STALE")
        assert "reval-queued" in a.headers["cache-status"]
        assert "set-cookie" not in a.headers
        wait_for_origin(origin, target, 2)
        assert conditionals(origin, target) == [None, '"v1"']
    else:
        h = tier.head(target)  # stale: forwarded; its 200 freshens the stored GET response
        assert h.status_code == 200 and h.content == b""
        assert h.headers.get_list("set-cookie") == ["session=head-c"]  # the HEAD client's own
        assert "head-freshened" in h.headers["cache-status"]

    # Every later client: the freshened entry, no cookie (GET and HEAD alike).
    for r in (tier.get(target), tier.get(target), tier.head(target)):
        tier.assert_hit(r)
        assert r.status_code == 200
        assert "set-cookie" not in r.headers, r.headers
        assert r.headers["cache-control"] == "max-age=60"
    assert tier.get(target).text == body
    assert origin.count(target, "GET") == (1 if mode == "head" else 2)
    assert origin.count(target, "HEAD") == (1 if mode == "head" else 0)


async def _burst(proxy: Proxy, requests: list[tuple[str, dict[str, str]]]) -> list[httpx.Response]:
    """GETs (target, headers) sent at once, each from its own client (the clients are made
    first, so the requests really overlap)."""
    clients = [httpx.AsyncClient(base_url=proxy.url, timeout=20) for _ in requests]
    try:
        return list(await asyncio.gather(*(c.get(t, headers=h) for c, (t, h) in zip(clients, requests))))
    finally:
        for c in clients:
            await c.aclose()


def burst(proxy: Proxy, requests: list[tuple[str, dict[str, str]]]) -> list[httpx.Response]:
    return asyncio.run(_burst(proxy, requests))


@pytest.mark.parametrize("mode", ["foreground", "stale-if-error", "background"])
def test_304_that_makes_the_entry_unshareable_is_not_served_to_the_next_client(
    tier: Tier, origin: Origin, mode: str
) -> None:
    """RFC 9111 §3, §4.3.4: a 304 whose fields say private / no-store / Vary: * leaves a stored
    response that a shared cache must not store or reuse: its own client gets it, and every
    other client (also one that arrived while that revalidation was under way) needs its own
    origin request."""
    cc = CC_BY_MODE[mode]
    cases = {
        "private": ("Cache-Control: private, max-age=60", "cache-control", "private, max-age=60"),
        "no-store": ("Cache-Control: no-store", "cache-control", "no-store"),
        "vary-star": ("Vary: *", "vary", "*"),
    }
    # delay: the origin takes 300 ms, so two requests for the stale entry overlap.
    targets = {
        name: tier.path(f"unshareable-{mode}-{name}") + f"?cc={q(cc)}&{OLD}&etag=v1&delay=300&h304={q(spec)}"
        for name, (spec, _, _) in cases.items()
    }
    assert [r.headers["x-cache-status"] for r in burst(tier.proxy, [(t, {}) for t in targets.values()])] == ["MISS"] * 3
    clients = 1 if mode == "background" else 2
    names = [name for name in targets for _ in range(clients)]
    got = burst(tier.proxy, [(targets[name], {}) for name in names])
    if mode == "background":
        for name in targets:
            wait_for_origin(origin, targets[name], 2)
    # One validation per client that received the now-unshareable response.
    assert {name: conditionals(origin, t) for name, t in targets.items()} == {
        name: [None] + ['"v1"'] * clients for name in targets
    }
    for name, r in zip(names, got):
        assert (r.status_code, r.text) == (200, tier.path(f"unshareable-{mode}-{name}") + " #1")
        if mode == "background":
            assert r.headers["x-cache-status"] == "STALE"
        else:
            _, field, value = cases[name]
            assert r.headers[field] == value, (name, r.headers)  # the updated response
            assert "stored" not in r.headers["cache-status"].split("; "), (name, r.headers["cache-status"])
    after = burst(tier.proxy, [(t, {}) for t in targets.values()])
    for (name, target), r in zip(targets.items(), after):
        assert r.headers["x-cache-status"] == "MISS", (name, r.headers["cache-status"])
        assert r.text == tier.path(f"unshareable-{mode}-{name}") + f" #{clients + 2}"
        assert conditionals(origin, target) == [None] + ['"v1"'] * clients + [None]


# ----------------------------------------------------------------- 2. weak entry, strong 304


@pytest.mark.parametrize("mode", ["foreground", "stale-if-error", "background"])
def test_strong_304_does_not_update_a_weak_entry(tier: Tier, origin: Origin, mode: str) -> None:
    """RFC 9111 §4.3.4: a 304 with a strong ETag selects only stored responses with that same
    strong ETag; W/"abc" is not "abc". Nothing is updated; a foreground request is refetched
    unconditionally (a 304 is no error: stale-if-error does not allow serving stale, RFC 5861
    §4); If-Range: "abc" never gets a 206 cut from the weak entry (RFC 9110 §13.1.5)."""
    cc = CC_BY_MODE[mode]
    name = f"weak-{mode}"
    # then_cc: the unconditional refetch (3rd request) is fresh for a minute.
    target = (
        tier.path(name)
        + f"?cc={q(cc)}&{OLD}&wetag=abc&then_cc={q('max-age=60')}&h304={q('ETag: \"abc\"|Cache-Control: max-age=60')}"
    )
    first = tier.get(target)
    assert first.headers["etag"] == 'W/"abc"' and first.headers["x-cache-status"] == "MISS"

    r = tier.get(target)
    if mode != "background":
        assert conditionals(origin, target) == [None, 'W/"abc"', None]  # asked again, unconditionally
        assert (r.status_code, r.text, r.headers["x-cache-status"]) == (200, tier.path(name) + " #3", "MISS")
        assert r.headers["etag"] == 'W/"abc"'
        expected_body = r.text
    else:
        assert (r.status_code, r.text, r.headers["x-cache-status"]) == (200, tier.path(name) + " #1", "STALE")
        wait_for_origin(origin, target, 3)
        # Not freshened by the 304: the background revalidation asks again, unconditionally,
        # and stores that full answer.
        assert conditionals(origin, target) == [None, 'W/"abc"', None]
        again = tier.get(target)
        tier.assert_hit(again)
        assert again.text == tier.path(name) + " #3" and again.headers["etag"] == 'W/"abc"'
        expected_body = again.text

    ranged = tier.get(target, headers={"Range": "bytes=0-3", "If-Range": '"abc"'})
    assert ranged.status_code == 200, ranged.headers
    assert "content-range" not in ranged.headers
    assert ranged.text == expected_body
    assert ranged.headers["etag"] == 'W/"abc"'
    tier.assert_hit(ranged)  # the fresh weak entry, whole
    assert origin.count(target) == 3


# ------------------------------------------------------------------- 3. header bytes > 0x7F

RAW_FIELDS = [
    (b"x-latin1", b"caf\xe9"),
    (b"content-disposition", 'attachment; filename="résumé €.pdf"'.encode()),
    (b"p3p", b"CP='\xe9\xe8\xff NOI DSP'"),
]
RAW_SPEC = quote(b"|".join(k + b": " + v for k, v in RAW_FIELDS), safe="")


def _raw_fields(r: httpx.Response) -> list[tuple[bytes, bytes]]:
    names = {k for k, _ in RAW_FIELDS}
    return [(k.lower(), v) for k, v in r.headers.raw if k.lower() in names]


def test_header_bytes_above_0x7f_survive_the_cache(tier: Tier, origin: Origin) -> None:
    """RFC 9110 §5.5: obs-text is opaque: Latin-1, UTF-8 and non-UTF-8 field bytes come back
    exactly as the origin sent them, on a MISS, a HIT, and after a background refresh by the
    cache's own origin client."""
    direct = httpx.get(f"{origin.url}/raw-check?xhdr={RAW_SPEC}")
    assert _raw_fields(direct) == RAW_FIELDS  # the origin sends these bytes

    target = tier.path("raw-bytes") + f"?cc={q('max-age=60')}&xhdr={RAW_SPEC}"
    miss, hit = tier.get(target), tier.get(target)
    assert miss.headers["x-cache-status"] == "MISS"
    tier.assert_hit(hit)
    assert _raw_fields(miss) == RAW_FIELDS
    assert _raw_fields(hit) == RAW_FIELDS

    cc = q("max-age=1, stale-while-revalidate=30")
    target = tier.path("raw-bytes-bg") + f"?cc={cc}&then_cc={q('max-age=60')}&xhdr={RAW_SPEC}"
    assert _raw_fields(tier.get(target)) == RAW_FIELDS
    # A 304 (to the cache's own client) that updates one of the fields with another Latin-1 byte.
    merged = (
        tier.path("raw-bytes-304")
        + f"?cc={q('max-age=1, stale-if-error=30')}&etag=v1&xhdr={RAW_SPEC}"
        + f"&h304={q('Cache-Control: max-age=60|X-Latin1: caf' + chr(0xE8))}"
    )
    assert _raw_fields(tier.get(merged)) == RAW_FIELDS
    time.sleep(STALE)
    updated = [(b"x-latin1", b"caf\xe8")] + RAW_FIELDS[1:]
    for r in (tier.get(merged), tier.get(merged)):
        assert r.headers["x-cache-status"] == "HIT" and r.headers["cache-control"] == "max-age=60"
        assert sorted(_raw_fields(r)) == sorted(updated)
    stale = tier.get(target)
    assert stale.headers["x-cache-status"] == "STALE" and _raw_fields(stale) == RAW_FIELDS
    wait_for_origin(origin, target, 2)
    replaced = tier.get(target)  # the 200 the background revalidation stored
    tier.assert_hit(replaced)
    assert replaced.text == tier.path("raw-bytes-bg") + " #2"
    assert _raw_fields(replaced) == RAW_FIELDS


# --------------------------------------------------------------------------- 4. missing Date


def test_response_without_date_gets_one(tier: Tier, origin: Origin) -> None:
    """RFC 9110 §6.6.1: a cache receiving a response without Date adds the time it was
    received, on what it forwards and on what it stores (and so on every hit): also on what
    its own origin client fetched (an unconditional refetch after a 304 that selects nothing,
    a stale-if-error revalidation answered by a full response)."""
    target = tier.path("nodate") + f"?cc={q('max-age=60')}&nodate=1"
    assert "date" not in httpx.get(f"{origin.url}{target}").headers  # the origin sends none
    miss, hit = tier.get(target), tier.get(target)
    assert miss.headers["x-cache-status"] == "MISS"
    tier.assert_hit(hit)
    for r in (miss, hit):
        dates = r.headers.get_list("date")
        assert len(dates) == 1 and IMF_FIXDATE.fullmatch(dates[0]), dates
    assert hit.headers["date"] == miss.headers["date"]  # the stored message's Date

    strong_304 = q('ETag: "abc"|Cache-Control: max-age=60')
    own_client = {
        # weak entry, strong 304: refetched unconditionally by the cache's own client
        "refetch": tier.path("nodate-refetch") + f"?cc={q('max-age=1')}&wetag=abc&nodate=1&h304={strong_304}",
        # stale-if-error entry revalidated by the cache's own client; a new storable 200
        "sie-stored": tier.path("nodate-sie") + f"?cc={q('max-age=1, stale-if-error=30')}&nodate=1&etag=v1&no304=1",
        # … and a new 200 that is not storable (private), handed to the client as it came
        "sie-private": tier.path("nodate-sie-private")
        + f"?cc={q('max-age=1, stale-if-error=30')}&nodate=1&etag=v1&no304=1&then_cc=private",
    }
    for t in own_client.values():
        assert tier.get(t).headers["x-cache-status"] == "MISS"
    time.sleep(STALE)
    got = {name: tier.get(t) for name, t in own_client.items()}
    assert {name: (r.status_code, r.text[-2:]) for name, r in got.items()} == {
        "refetch": (200, "#3"), "sie-stored": (200, "#2"), "sie-private": (200, "#2")
    }
    dates = {name: r.headers.get_list("date") for name, r in got.items()}
    assert all(len(d) == 1 and IMF_FIXDATE.fullmatch(d[0]) for d in dates.values()), dates


# ------------------------------------------------------- 5. revalidation gets a 404 / a 503


@pytest.mark.parametrize("mode", ["foreground", "background"])
def test_revalidation_answered_by_a_fresh_404_stores_it_but_a_503_keeps_the_stale_200(
    tier: Tier, origin: Origin, mode: str
) -> None:
    """RFC 9111 §4.3.3: a full response (any status) to a validation request is used like any
    other: a cacheable 404 replaces the stored 200 and is served from the cache; a 5xx may be
    treated as no answer, so the stored 200 stays."""
    cc = "max-age=1" if mode == "foreground" else "max-age=1, stale-while-revalidate=30"
    # etag: the stored 200 has a validator, so it is kept past its freshness and revalidated.
    then = f"&etag=v1&then_cc={q('max-age=60')}&then_status="
    t404 = tier.path(f"gone-{mode}") + f"?cc={q(cc)}{then}404"
    t503 = tier.path(f"down-{mode}") + f"?cc={q(cc)}{then}503"
    for target in (t404, t503):
        first = tier.get(target)
        assert (first.status_code, first.headers["x-cache-status"]) == (200, "MISS")
    time.sleep(STALE)

    if mode == "foreground":
        r = tier.get(t404)
        assert (r.status_code, r.text, r.headers["x-cache-status"]) == (404, tier.path("gone-foreground") + " #2", "MISS")
        assert "stored" in r.headers["cache-status"].split("; ")
    else:
        r = tier.get(t404)
        assert (r.status_code, r.headers["x-cache-status"]) == (200, "STALE")
        wait_for_origin(origin, t404, 2)
    for _ in range(3):
        r = tier.get(t404)
        assert (r.status_code, r.text) == (404, tier.path(f"gone-{mode}") + " #2")
        tier.assert_hit(r)
    assert origin.count(t404) == 2  # five requests, two origin requests
    assert conditionals(origin, t404) == [None, '"v1"']  # the 404 answered a revalidation

    if mode == "foreground":
        r = tier.get(t503)  # no stale serving allowed: the client gets the origin's 503
        assert (r.status_code, r.text) == (503, tier.path("down-foreground") + " #2")
        assert "stored" not in r.headers["cache-status"].split("; ")
        assert "fwd=stale" in r.headers["cache-status"]
        # The 200 is still stored: a client that accepts stale responses gets it.
        kept = tier.get(t503, headers={"Cache-Control": "max-stale=600"})
        assert (kept.status_code, kept.text, kept.headers["x-cache-status"]) == (
            200, tier.path("down-foreground") + " #1", "STALE"
        )
        assert conditionals(origin, t503) == [None, '"v1"']
    else:
        r = tier.get(t503)
        assert (r.status_code, r.headers["x-cache-status"]) == (200, "STALE")
        wait_for_origin(origin, t503, 2)
        for _ in range(3):
            r = tier.get(t503)
            assert (r.status_code, r.text, r.headers["x-cache-status"]) == (200, tier.path("down-background") + " #1", "STALE")
        assert conditionals(origin, t503)[:2] == [None, '"v1"']


# ------------------------------------------------------- 6. cold conditional requests


def test_cold_conditional_requests_fill_the_cache_once(tier: Tier, origin: Origin) -> None:
    """RFC 9111 §4.3.2 / RFC 9110 §13.2: with nothing stored, the cache asks the origin once,
    unconditionally (it wants a response it can store), and answers each client's own
    If-None-Match from it: 304 when the tag matches (weak comparison), else the 200."""
    target = tier.path("cold-inm") + f"?cc={q('max-age=60')}&etag=x&delay=500"
    tags = ['"x"', '"y"', 'W/"x"', '"z"', '"x", "q"']
    responses = burst(tier.proxy, [(target, {"If-None-Match": t}) for t in tags])
    assert origin.count(target) == 1
    assert conditionals(origin, target) == [None]
    for tag, r in zip(tags, responses):
        if "x" in tag:
            assert (r.status_code, r.content) == (304, b""), (tag, r.headers)
            assert r.headers["etag"] == '"x"'
        else:
            assert (r.status_code, r.text) == (200, tier.path("cold-inm") + " #1"), (tag, r.headers)
    later = tier.get(target, headers={"If-None-Match": '"x"'})
    assert later.status_code == 304
    tier.assert_hit(later)
    assert origin.count(target) == 1


# ---------------------------------------------------------- 7. request target byte for byte


def test_cache_own_requests_send_the_target_byte_for_byte(tier: Tier, origin: Origin) -> None:
    """RFC 9112 §3.2: the request target is forwarded as received. The cache's own origin
    client (background revalidation, stale-if-error) must not re-encode ``"`` as ``%22``."""
    targets = {
        "background": tier.path("w") + f'?x="a"&cc={q("max-age=1, stale-while-revalidate=30")}&{OLD}&etag=v1',
        "stale-if-error": tier.path("w-sie") + f'?x="a"&cc={q("max-age=1, stale-if-error=30")}&{OLD}&etag=v1',
    }
    # The unconditional refetch after a 304 that selects nothing (weak entry, strong 304).
    strong_304 = q('ETag: "v1"')
    refetch = tier.path("w-refetch") + f'?x="a"&cc={q("max-age=1")}&{OLD}&wetag=v1&h304={strong_304}'
    for target in [*targets.values(), refetch]:
        r = raw_request(tier.proxy, "GET", target.encode())
        assert (r.status, r.get("x-cache-status")) == (200, b"MISS")

    bg = targets["background"]
    r = raw_request(tier.proxy, "GET", bg.encode())
    assert (r.status, r.get("x-cache-status")) == (200, b"STALE")
    wait_for_origin(origin, bg, 2)

    sie = targets["stale-if-error"]
    with origin.failing_with(tier.path("w-sie"), 503):
        r = raw_request(tier.proxy, "GET", sie.encode())
    assert (r.status, r.get("x-cache-status")) == (200, b"STALE")
    assert b"stale-if-error" in (r.get("cache-status") or b"")

    r = raw_request(tier.proxy, "GET", refetch.encode())
    assert r.status == 200 and r.body.endswith(b" #3")

    for target in targets.values():
        seen = origin.requests_for(target)
        assert len(seen) == 2, [s.line for s in origin.seen[-6:]]
        assert [s.line for s in seen] == [b"GET " + target.encode() + b" HTTP/1.1"] * 2
        assert seen[1].headers.get("if-none-match") == '"v1"'
    assert [s.line for s in origin.requests_for(refetch)] == [b"GET " + refetch.encode() + b" HTTP/1.1"] * 3
    assert conditionals(origin, refetch) == [None, 'W/"v1"', None]


# ----------------------------------------------------------------------- 8. CDN-Cache-Control


def test_cdn_cache_control_governs_this_cache_and_is_forwarded(tier: Tier, origin: Origin) -> None:
    """RFC 9213 §2.2: the first valid targeted field of the target list (Mitmcache-Cache-Control,
    then CDN-Cache-Control) replaces Cache-Control and Expires for this cache; both are passed
    on to the client unchanged."""
    for directive in ("private", "no-store", "no-cache"):
        name = f"cdn-{directive}"
        target = tier.path(name) + f"?cc={q('max-age=60')}&hdr={q('CDN-Cache-Control: ' + directive)}"
        for n in (1, 2):
            r = tier.get(target)
            assert r.headers["x-cache-status"] == "MISS", (directive, r.headers["cache-status"])
            assert r.text == f"{tier.path(name)} #{n}"
            assert r.headers["cdn-cache-control"] == directive and r.headers["cache-control"] == "max-age=60"
        assert origin.count(target) == 2

    short = tier.path("cdn-short") + f"?cc={q('max-age=600')}&hdr={q('CDN-Cache-Control: max-age=1')}"
    fields = q("CDN-Cache-Control: max-age=1|Mitmcache-Cache-Control: max-age=600")
    ours = tier.path("cdn-ours") + f"?cc={q('max-age=1')}&hdr={fields}"
    r = tier.get(short)
    assert r.headers["x-cache-status"] == "MISS" and "stored" in r.headers["cache-status"]
    assert int(re.search(r"ttl=(-?[0-9]+)", r.headers["cache-status"])[1]) <= 1  # type: ignore[index]
    r = tier.get(ours)
    assert r.headers["x-cache-status"] == "MISS"
    assert int(re.search(r"ttl=(-?[0-9]+)", r.headers["cache-status"])[1]) >= 590  # type: ignore[index]
    time.sleep(STALE)

    r = tier.get(short)  # CDN-Cache-Control: max-age=1 wins over Cache-Control: max-age=600
    assert r.headers["x-cache-status"] == "MISS" and r.text == tier.path("cdn-short") + " #2"
    assert (r.headers["cdn-cache-control"], r.headers["cache-control"]) == ("max-age=1", "max-age=600")
    assert origin.count(short) == 2

    r = tier.get(ours)  # Mitmcache-Cache-Control: max-age=600 wins over CDN-Cache-Control
    tier.assert_hit(r)
    assert r.text == tier.path("cdn-ours") + " #1"
    assert (r.headers["mitmcache-cache-control"], r.headers["cdn-cache-control"], r.headers["cache-control"]) == (
        "max-age=600", "max-age=1", "max-age=1"
    )
    assert origin.count(ours) == 1


# ------------------------------------------------------------------------- 9. percent-encoding


def test_percent_encoding_case_is_one_uri_but_targets_go_upstream_as_sent(tier: Tier, origin: Origin) -> None:
    """RFC 3986 §6.2.2.1: %C3%A9 and %c3%a9 are one URI (one cache entry, and an unsafe method
    on one invalidates the other, RFC 9111 §4.4); the origin still gets each target as sent."""
    query = "?cc=" + q("max-age=60")
    upper = (tier.path("caf%C3%A9") + query).encode()
    lower = (tier.path("caf%c3%a9") + query).encode()
    body1 = (tier.path("caf%C3%A9") + " #1").encode()

    r1, r2 = raw_request(tier.proxy, "GET", upper), raw_request(tier.proxy, "GET", lower)
    assert (r1.status, r1.get("x-cache-status"), r1.body) == (200, b"MISS", body1)
    assert (r2.status, r2.get("x-cache-status"), r2.body) == (200, b"HIT", body1)

    post = raw_request(tier.proxy, "POST", lower, b"Content-Length: 0\r\n")
    assert post.status == 200
    r3 = raw_request(tier.proxy, "GET", upper)  # the POST to the lower-case spelling invalidated it
    assert (r3.get("x-cache-status"), r3.body) == (b"MISS", (tier.path("caf%C3%A9") + " #2").encode())

    post = raw_request(tier.proxy, "POST", upper, b"Content-Length: 0\r\n")
    assert post.status == 200
    r4 = raw_request(tier.proxy, "GET", lower)  # and the other way round
    assert r4.get("x-cache-status") == b"MISS"
    assert r4.body == (tier.path("caf%c3%a9") + " #2").encode()  # the lower-case target's 2nd request (POST, GET)

    # §6.2.2.2: an encoded unreserved character is that character; an encoded "/" is not "/".
    tilde, encoded_tilde = tier.path("~me") + query, tier.path("%7Eme") + query
    assert raw_request(tier.proxy, "GET", encoded_tilde.encode()).get("x-cache-status") == b"MISS"
    assert raw_request(tier.proxy, "GET", tilde.encode()).get("x-cache-status") == b"HIT"
    slash, encoded_slash = tier.path("a/b") + query, tier.path("a%2Fb") + query
    assert raw_request(tier.proxy, "GET", encoded_slash.encode()).get("x-cache-status") == b"MISS"
    assert raw_request(tier.proxy, "GET", slash.encode()).get("x-cache-status") == b"MISS"
    assert [origin.count(t) for t in (tilde, encoded_tilde, slash, encoded_slash)] == [0, 1, 1, 1]

    lines = [s.line for s in origin.seen if s.path.encode() in (upper, lower)]
    assert lines == [
        b"GET " + upper + b" HTTP/1.1",
        b"POST " + lower + b" HTTP/1.1",
        b"GET " + upper + b" HTTP/1.1",
        b"POST " + upper + b" HTTP/1.1",
        b"GET " + lower + b" HTTP/1.1",
    ]


# ----------------------------------------------------------------------------- 10. Age lists


@pytest.mark.parametrize("form", ["one-line", "two-lines"])
def test_age_list_uses_its_first_member(tier: Tier, origin: Origin, form: str) -> None:
    """RFC 9111 §5.1: a cache encountering a list-based Age uses its first member: ``7200, 0``
    is 7200 s old, past max-age=3600, so it is never served as fresh."""
    age = f"age={q('7200, 0')}" if form == "one-line" else f"age=7200&hdr={q('Age: 0')}"
    target = tier.path(f"age-list-{form}") + f"?cc={q('max-age=3600')}&{age}"
    first = tier.get(target)
    assert first.headers.get_list("age") in (["7200, 0"], ["7200", "0"])  # passed on as received
    second = tier.get(target)
    assert second.headers["x-cache-status"] != "HIT", second.headers["cache-status"]
    assert second.text == tier.path(f"age-list-{form}") + " #2"
    assert origin.count(target) == 2
