"""End to end: hostile and odd input through real mitmdump (and a real Valkey ring).

Each test sends what a careless or malicious client (or origin, or a stray writer to Valkey)
might send, and asserts what every client receives and what the origin saw. Raw sockets are
used wherever an HTTP client library would normalise the input away (absolute-form targets,
lower-case methods, raw bytes in targets and fields).

The origin is ``tests/origin.py``'s, with a handler subclass that also records, for every
request it parses (including methods it does not implement), the raw request line and the
times it arrived and was answered (``arrivals``), and can be told to hang on a path (``hang``)
after a first fast answer.
"""

from __future__ import annotations

import concurrent.futures
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import cast
from urllib.parse import quote, urlsplit

import httpx
import pytest
import valkey
import xxhash

from mitmcache.valkey_nodes import ValkeyNode
from tests.conftest import Proxy, running_nodes, start_proxy
from tests.origin import Origin, _Handler, start_origin


def q(value: str) -> str:
    return quote(value, safe="")


OLD = "date=2"  # every response of the target is 2 s old on arrival: max-age=1 is stale at once
SIE = q("max-age=1, stale-if-error=60")


# ----------------------------------------------------------------------------- the origin


@dataclass
class Arrival:
    line: bytes  # the raw request line
    path: str
    headers: dict[str, str]
    arrived: float  # time.monotonic()
    answered: float | None = None


class _HostileHandler(_Handler):
    """tests/origin.py's handler; every parsed request is recorded in ``server.arrivals``
    (also ``get`` and other methods the base answers with 501); ``server.hang[path]`` seconds
    of silence before answering; a lower-case ``get`` and ``FROB`` are answered like GET (an
    origin that treats methods leniently, as many do)."""

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            arrival = Arrival(
                self.raw_requestline.rstrip(b"\r\n"), self.path,  # type: ignore[attr-defined]
                {k.lower(): v for k, v in self.headers.items()}, time.monotonic(),
            )
            self._arrival = arrival
            with self.server.origin.lock:  # type: ignore[attr-defined]
                self.server.arrivals.append(arrival)  # type: ignore[attr-defined]
        return ok

    def _hostile(self) -> None:
        hang = self.server.hang.get(urlsplit(self.path).path)  # type: ignore[attr-defined]
        if hang:
            time.sleep(hang)
        try:
            self._handle()
        finally:
            self._arrival.answered = time.monotonic()

    do_GET = do_HEAD = do_POST = do_get = do_FROB = _hostile


def start_hostile_origin() -> Origin:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostileHandler)
    server.daemon_threads = True
    origin = Origin(server)
    server.origin = origin  # type: ignore[attr-defined]
    server.arrivals = []  # type: ignore[attr-defined]
    server.hang = {}  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True, name="hostile-origin").start()
    return origin


def arrivals(origin: Origin, target: str | None = None) -> list[Arrival]:
    """What reached the origin, in order (only requests whose target is ``target``)."""
    with origin.lock:
        every = list(origin.server.arrivals)  # type: ignore[attr-defined]
    return every if target is None else [a for a in every if a.path == target]


def lines(origin: Origin, fragment: str) -> list[bytes]:
    """Raw request lines that reached the origin whose target holds ``fragment``."""
    return [a.line for a in arrivals(origin) if fragment.encode() in a.line]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    o = start_hostile_origin()
    yield o
    o.stop()


def _stop_clean(p: Proxy) -> str:
    out = p.stop()  # asserts no "Addon error"
    assert "Traceback" not in out, out[-5000:]
    return out


@pytest.fixture(scope="module")
def l1(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(tmp_path_factory.mktemp("l1"), f"reverse:{origin.url}")
    yield p
    _stop_clean(p)


@pytest.fixture(scope="module")
def ring() -> Iterator[list[ValkeyNode]]:
    with running_nodes(3) as nodes:
        yield nodes


def l2_proxy(tmp: Path, origin: Origin, nodes: list[ValkeyNode], *sets: str) -> Proxy:
    urls = ",".join(n.url for n in nodes)
    return start_proxy(tmp, f"reverse:{origin.url}", f"cache_valkey_urls={urls}", "cache_l1_ttl=0", *sets)


@pytest.fixture(scope="module")
def l2(origin: Origin, ring: list[ValkeyNode], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """Every hit is a Valkey round trip (cache_l1_ttl=0)."""
    p = l2_proxy(tmp_path_factory.mktemp("l2"), origin, ring)
    yield p
    _stop_clean(p)


@dataclass
class Tier:
    name: str  # "l1" or "l2": also a path segment, so the two proxies never share a URL
    proxy: Proxy


@pytest.fixture(params=["l1", "l2"])
def tier(request: pytest.FixtureRequest) -> Tier:
    return Tier(request.param, request.getfixturevalue(request.param))


# ----------------------------------------------------------------------------- raw HTTP/1.1


@dataclass
class Raw:
    status: int
    fields: list[tuple[bytes, bytes]]
    body: bytes
    elapsed: float = 0.0

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.fields if k.lower() == name.encode()]
        return b", ".join(values).decode("utf-8", "surrogateescape") if values else None

    @property
    def cache(self) -> str | None:
        return self.get("x-cache-status")

    @property
    def status_line(self) -> str:
        return self.get("cache-status") or ""


def exchange(port: int, request: bytes, timeout: float = 10.0) -> Raw:
    """Send ``request`` byte for byte on a new connection; read the response until the proxy
    closes it (every request here says Connection: close)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.settimeout(timeout)
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert b"\r\n\r\n" in data, f"no complete response head: {data[:500]!r}"
    head, _, body = data.partition(b"\r\n\r\n")
    head_lines = head.split(b"\r\n")
    fields = [(k.strip(), v.strip()) for k, _, v in (line.partition(b":") for line in head_lines[1:])]
    return Raw(int(head_lines[0].split(b" ")[1]), fields, body, time.monotonic() - start)


def request_bytes(method: bytes, target: bytes, host: bytes, extra: bytes = b"") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n" + extra + b"\r\n"


def send(proxy: Proxy, method: str | bytes, target: str | bytes, extra: bytes = b"", host: bytes | None = None) -> Raw:
    m = method if isinstance(method, bytes) else method.encode()
    t = target if isinstance(target, bytes) else target.encode()
    return exchange(proxy.port, request_bytes(m, t, host or f"127.0.0.1:{proxy.port}".encode(), extra))


def concurrently(calls: list, stagger: float = 0.0) -> list:  # type: ignore[type-arg]
    """Run the zero-argument ``calls`` in threads (the first ``stagger`` seconds ahead of the
    others); their results (or exceptions) in order."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = []
        for i, call in enumerate(calls):
            futures.append(pool.submit(call))
            if i == 0 and stagger:
                time.sleep(stagger)
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except Exception as e:  # noqa: BLE001 - reported by the caller
                out.append(e)
        return out


def metric(proxy: Proxy, name: str) -> float:
    return proxy.metrics().get(name, 0.0)


def bad_inputs(proxy: Proxy) -> dict[str, float]:
    return {k: v for k, v in proxy.metrics().items() if k.startswith("mitmcache_bad_input_total")}


# ----------------------------------------------------------------------------- Valkey helpers


def cache_key(origin: Origin, target: str) -> str:
    return f"http://127.0.0.1:{origin.port}{target}"


def digest(key: str) -> str:
    return xxhash.xxh3_128_hexdigest(key.encode("utf-8", "surrogateescape"))


def vget(node: valkey.Valkey, key: str) -> bytes | None:
    return cast(bytes | None, node.get(key))


def pttl(node: valkey.Valkey, key: str) -> int:
    return cast(int, node.pttl(key))


def holder(nodes: list[ValkeyNode], vkey: str) -> valkey.Valkey:
    """The client of the one node that holds ``vkey`` (looked up on every node)."""
    found = [valkey.Valkey(port=n.port) for n in nodes if valkey.Valkey(port=n.port).exists(vkey)]
    assert len(found) == 1, f"{vkey} is on {len(found)} nodes"
    return found[0]


# ================================================================ 1. absolute-form, reverse mode


def test_absolute_form_target_in_reverse_mode_has_its_own_key(l1: Proxy, origin: Origin) -> None:
    """RFC 9112 §3.2.2: an absolute-form target names the authority the origin answers for.
    Sent to a reverse proxy, it goes upstream as it is, so its response must not be stored
    under the plain URL (cache poisoning); it is its own key and hits for itself."""
    target = f"/abs/d?cc={q('max-age=60')}&echo=Host"
    absolute = b"http://other.example" + target.encode()
    first = exchange(l1.port, request_bytes(b"GET", absolute, b"other.example"))
    assert (first.status, first.cache) == (200, "MISS")
    plain = send(l1, "GET", target)
    assert (plain.status, plain.cache) == (200, "MISS"), plain.status_line  # not the absolute-form answer
    assert lines(origin, "/abs/d?") == [b"GET " + absolute + b" HTTP/1.1", b"GET " + target.encode() + b" HTTP/1.1"]

    # Each key hits for itself; the origin sees nothing more.
    again = exchange(l1.port, request_bytes(b"GET", absolute, b"other.example"))
    assert (again.status, again.cache, again.body) == (200, "HIT", first.body)
    plain_again = send(l1, "GET", target)
    assert (plain_again.status, plain_again.cache, plain_again.body) == (200, "HIT", plain.body)

    # Only the absolute-form authority differs (Host names the origin itself): still apart.
    target2 = f"/abs/e?cc={q('max-age=60')}"
    host = f"127.0.0.1:{origin.port}".encode()
    r1 = exchange(l1.port, request_bytes(b"GET", b"http://other.example" + target2.encode(), host))
    r2 = exchange(l1.port, request_bytes(b"GET", target2.encode(), host))
    assert (r1.cache, r2.cache) == ("MISS", "MISS"), (r1.status_line, r2.status_line)
    assert len(lines(origin, "/abs/e?")) == 2

    # The cache's own client (stale-if-error refresh) sends the absolute-form target too.
    target3 = f"/abs/sie?cc={SIE}&{OLD}"
    absolute3 = b"http://other.example" + target3.encode()
    assert exchange(l1.port, request_bytes(b"GET", absolute3, b"other.example")).cache == "MISS"
    refreshed = exchange(l1.port, request_bytes(b"GET", absolute3, b"other.example"))
    assert (refreshed.status, refreshed.body) == (200, b"/abs/sie #2"), refreshed.status_line
    assert lines(origin, "/abs/sie?") == [b"GET " + absolute3 + b" HTTP/1.1"] * 2


# ================================================================ 2. methods are case-sensitive


def test_methods_are_case_sensitive(l1: Proxy, origin: Origin) -> None:
    """RFC 9110 §9.1: the method token is case-sensitive; ``get`` is not GET but a method of
    unknown safety. Its answer is never stored as a GET response, a GET entry is never served
    to it, and its 2xx invalidates the URL (RFC 9111 §4.4) — as does any unknown method's."""
    target = f"/methods/d5?cc={q('max-age=60')}"
    lower = send(l1, "get", target)  # this origin answers a lower-case get like GET (200, fresh)
    assert lower.status == 200
    assert lower.body == b"/methods/d5 #1"
    assert lines(origin, "/methods/d5?") == [b"get " + target.encode() + b" HTTP/1.1"]

    got = send(l1, "GET", target)
    assert (got.status, got.cache, got.body) == (200, "MISS", b"/methods/d5 #2"), got.status_line
    hit = send(l1, "GET", target)
    assert (hit.cache, hit.body) == ("HIT", b"/methods/d5 #2")

    lower2 = send(l1, "get", target)  # never answered from the GET entry
    assert lower2.cache != "HIT", lower2.status_line
    assert lower2.body == b"/methods/d5 #3"
    assert lines(origin, "/methods/d5?")[-1] == b"get " + target.encode() + b" HTTP/1.1"
    # ... and its 2xx (an unknown method's) invalidated the GET entry.
    after = send(l1, "GET", target)
    assert (after.cache, after.body) == ("MISS", b"/methods/d5 #4"), after.status_line

    # An unknown upper-case method's 2xx invalidates too.
    assert send(l1, "GET", target).cache == "HIT"
    frob = send(l1, "FROB", target)
    assert frob.status == 200 and frob.cache is None
    final = send(l1, "GET", target)
    assert (final.cache, final.body) == ("MISS", b"/methods/d5 #6"), final.status_line


# ================================================================ 3. numbers and bytes


@pytest.mark.parametrize("tier_name", ["l1", "l2"])
def test_huge_numbers_odd_ranges_and_raw_bytes_cause_no_error(
    tier_name: str, origin: Origin, ring: list[ValkeyNode], tmp_path: Path
) -> None:
    """RFC 9111 §1.2.2: a delta-seconds too large to represent is 2^31 (valid, not bad input);
    RFC 9110 §14.1.1: a range with non-ASCII digits is invalid (ignored: the whole 200); a
    range past the end is unsatisfiable (416, or the 200: both allowed); a range ending past
    the end is the whole body. A raw 0xE9 in the target is one key, stored and found again in
    L2. None of it becomes an addon error."""
    proxy = (
        start_proxy(tmp_path, f"reverse:{origin.url}") if tier_name == "l1" else l2_proxy(tmp_path, origin, ring)
    )
    digits = "9" * 5000
    base = f"/numbers/{tier_name}"
    try:
        before = bad_inputs(proxy)

        # Request directives with 5,000 digits, against a fresh entry.
        target = f"{base}/req?cc={q('max-age=60')}"
        assert send(proxy, "GET", target).cache == "MISS"
        for directive, expected in (("max-age", "HIT"), ("max-stale", "HIT"), ("min-fresh", "MISS")):
            r = send(proxy, "GET", target, f"Cache-Control: {directive}={digits}\r\n".encode())
            assert r.status == 200 and r.body.startswith(f"{base}/req #".encode()), (directive, r.status)
            assert r.cache == expected, (directive, r.status_line)

        # A response max-age of 5,000 digits: 2^31 s of freshness, stored and hit.
        target = f"{base}/resp?cc={q('max-age=' + digits)}"
        first, second = send(proxy, "GET", target), send(proxy, "GET", target)
        assert (first.status, first.cache) == (200, "MISS"), first.status_line
        assert (second.status, second.cache, second.body) == (200, "HIT", first.body), second.status_line
        assert "stored" in first.status_line

        # An Age of 5,000 digits: 2^31 s old, stale on arrival: passed on, not served from the cache.
        target = f"{base}/age?cc={q('max-age=60')}&age={digits}"
        for n in (1, 2):
            r = send(proxy, "GET", target)
            assert (r.status, r.cache, r.body) == (200, "MISS", f"{base}/age #{n}".encode()), r.status_line

        # Invalid numbers (non-ASCII digits): handled as the RFC says, counted.
        target = f"{base}/bad?cc={q('max-age=²')}&age={q('²')}"
        for n in (1, 2):
            r = send(proxy, "GET", target)  # an invalid max-age means stale: not stored for reuse
            assert (r.status, r.cache, r.body) == (200, "MISS", f"{base}/bad #{n}".encode()), r.status_line
        after = bad_inputs(proxy)
        grew = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        assert set(grew) == {'mitmcache_bad_input_total{kind="cache-control"}', 'mitmcache_bad_input_total{kind="age"}'}, grew

        # Ranges on a cached entry.
        target = f"{base}/range?cc={q('max-age=60')}"
        full = send(proxy, "GET", target).body
        n = len(full)
        r = send(proxy, "GET", target, "Range: bytes=²-\r\n".encode())  # UTF-8 bytes of '²'
        assert (r.status, r.cache, r.body, r.get("content-range")) == (200, "HIT", full, None), r.status_line
        r = send(proxy, "GET", target, f"Range: bytes=0-{digits}\r\n".encode())
        assert r.status in (200, 206) and r.body == full and r.cache == "HIT", (r.status, r.status_line)
        if r.status == 206:
            assert r.get("content-range") == f"bytes 0-{n - 1}/{n}"
        r = send(proxy, "GET", target, f"Range: bytes=-{digits}\r\n".encode())
        assert r.status in (200, 206) and r.body == full and r.cache == "HIT", (r.status, r.status_line)
        r = send(proxy, "GET", target, f"Range: bytes={digits}-\r\n".encode())
        assert r.status in (200, 416) and r.cache == "HIT", (r.status, r.status_line)
        if r.status == 416:
            assert (r.body, r.get("content-range")) == (b"", f"bytes */{n}")
        else:
            assert r.body == full
        r = send(proxy, "GET", target, f"Range: bytes={digits}-{digits}9\r\n".encode())
        assert r.status in (200, 416) and r.cache == "HIT", (r.status, r.status_line)
        assert len(lines(origin, f"{base}/range?")) == 1

        # A raw 0xE9 in the target.
        raw_target = f"{base}/caf".encode() + b"\xe9" + f"?cc={q('max-age=60')}".encode()
        first, second = send(proxy, "GET", raw_target), send(proxy, "GET", raw_target)
        assert (first.status, first.cache) == (200, "MISS"), first.status_line
        assert (second.status, second.cache, second.body) == (200, "HIT", first.body), second.status_line
        assert f"detail={tier_name}" in second.status_line
        assert [a.line for a in arrivals(origin) if raw_target in a.line] == [b"GET " + raw_target + b" HTTP/1.1"]
        if tier_name == "l2":
            assert metric(proxy, "mitmcache_valkey_decode_errors_total") == 0
    finally:
        _stop_clean(proxy)


# ================================================================ 4. non-ASCII fields, own client


def test_non_ascii_request_and_entry_fields_keep_stale_if_error_and_background_revalidation(
    tier: Tier, origin: Origin
) -> None:
    """RFC 9110 §5.5: field values may carry obs-text. The cache's own origin client (used for
    stale-if-error and background revalidation) must send such requests and validators as the
    bytes they are, and a 503 still gets the stale entry (RFC 5861 §4)."""
    name, proxy = tier.name, tier.proxy
    # A client field in raw UTF-8, revalidating a stale-if-error entry against a failing origin.
    target = f"/nonascii/{name}/note?cc={SIE}&{OLD}&then_status=503"
    assert send(proxy, "GET", target).cache == "MISS"
    r = send(proxy, "GET", target, "X-Note: café\r\n".encode())
    assert (r.status, r.cache, r.body) == (200, "STALE", f"/nonascii/{name}/note #1".encode()), r.status_line
    assert "stale-if-error" in r.status_line and "fwd-status=503" in r.status_line, r.status_line
    seen = arrivals(origin, target)
    assert len(seen) == 2
    assert seen[1].headers.get("x-note") == "café".encode().decode("latin-1")  # the same bytes

    # An entry whose ETag holds a raw 0xE9: stale-if-error still works, with those bytes.
    etag = '"v\xe9"'  # as Latin-1 text: the byte 0xE9
    xhdr = "xhdr=" + quote(b'ETag: "v\xe9"', safe="")
    target = f"/nonascii/{name}/etag?cc={SIE}&{OLD}&{xhdr}"
    first = send(proxy, "GET", target)
    assert first.cache == "MISS" and first.get("etag") == '"v\udce9"', first.fields
    with origin.failing_with(f"/nonascii/{name}/etag", 503):
        r = send(proxy, "GET", target)
    assert (r.status, r.cache, r.body) == (200, "STALE", first.body), r.status_line
    assert r.get("etag") == '"v\udce9"'
    seen = arrivals(origin, target)
    assert [a.headers.get("if-none-match") for a in seen] == [None, etag]

    # ... and background revalidation (stale-while-revalidate) too.
    target = f"/nonascii/{name}/swr?cc={q('max-age=1, stale-while-revalidate=60')}&{OLD}&{xhdr}"
    first = send(proxy, "GET", target)
    assert first.cache == "MISS"
    r = send(proxy, "GET", target, "X-Note: café\r\n".encode())
    assert (r.cache, r.body) == ("STALE", first.body) and "reval-queued" in r.status_line, r.status_line
    deadline = time.monotonic() + 5
    while len(arrivals(origin, target)) < 2:
        assert time.monotonic() < deadline, "no background revalidation reached the origin"
        time.sleep(0.02)
    time.sleep(0.3)
    seen = arrivals(origin, target)
    assert [a.headers.get("if-none-match") for a in seen] == [None, etag]
    assert seen[1].headers.get("x-note") == "café".encode().decode("latin-1")
    # This origin never answers 304 to an xhdr ETag: its 200 replaced the entry (stale again
    # on arrival: date=2), so the next request is served the new body.
    r = send(proxy, "GET", target)
    assert r.body == f"/nonascii/{name}/swr #2".encode(), (r.cache, r.status_line)


# ================================================================ 5. Vary variants in parallel


@pytest.mark.parametrize("tier_name", ["l1", "l2"])
def test_variants_of_one_url_do_not_wait_for_each_other(tier_name: str, origin: Origin, request: pytest.FixtureRequest) -> None:
    """Coalescing is per Vary variant (RFC 9111 §4.1): requests for another variant of a URL
    reach the origin at once instead of queueing behind one variant's fetch; requests for the
    same new variant still collapse into one origin request."""
    proxy: Proxy = request.getfixturevalue(tier_name)
    target = f"/vary/{tier_name}?cc={q('max-age=60')}&vary=Accept&delay=500"
    a = send(proxy, "GET", target, b"Accept: a\r\n")
    assert (a.cache, a.body) == ("MISS", f"/vary/{tier_name} #1 Accept=a".encode())

    got = concurrently([
        lambda: send(proxy, "GET", target, b"Accept: b\r\n"),
        lambda: send(proxy, "GET", target, b"Accept: c\r\n"),
        lambda: send(proxy, "GET", target, b"Accept: b\r\n"),
    ])
    assert not [g for g in got if isinstance(g, Exception)], got
    b1, c, b2 = got
    seen = {accept: [s for s in arrivals(origin, target) if s.headers.get("accept") == accept] for accept in "abc"}
    assert [len(seen[x]) for x in "abc"] == [1, 1, 1], {k: len(v) for k, v in seen.items()}  # the b's collapsed
    (sb,), (sc,) = seen["b"], seen["c"]
    assert sb.answered is not None and sc.answered is not None
    # Both variants were at the origin at the same time: neither waited for the other's answer.
    assert max(sb.arrived, sc.arrived) < min(sb.answered, sc.answered), (sb, sc)
    print(f"vary {tier_name}: Accept: c answered in {c.elapsed:.2f} s (origin delay 0.5 s)")
    assert c.body.endswith(b" Accept=c") and c.cache == "MISS"
    assert b1.body == b2.body and b1.body.endswith(b" Accept=b")
    assert sorted([b1.status_line.count("collapsed"), b2.status_line.count("collapsed")]) == [0, 1]


# ================================================================ 6. 5xx never replaces


@pytest.mark.parametrize("mode", ["forwarded", "stale-if-error"])
def test_revalidation_5xx_with_freshness_never_replaces_the_entry(
    tier: Tier, origin: Origin, mode: str
) -> None:
    """RFC 9111 §4.3.3: a 5xx to a validation request may be forwarded (or the stale entry
    served when allowed), but it never replaces the stored response, however fresh it says it
    is: once the origin recovers, clients get the revalidated 200, not a cached 503."""
    name, proxy = tier.name, tier.proxy
    cc = "max-age=1" if mode == "forwarded" else "max-age=1, stale-if-error=60"
    path = f"/fivexx/{name}/{mode}"
    target = f"{path}?cc={q(cc)}&{OLD}&etag=v1&then_cc={q('max-age=60')}"
    first = send(proxy, "GET", target)
    assert (first.status, first.cache, first.body) == (200, "MISS", f"{path} #1".encode())
    with origin.failing_with(path, 503):  # 503 with Cache-Control: max-age=60 (then_cc)
        failed = send(proxy, "GET", target)
    if mode == "forwarded":
        assert (failed.status, failed.cache) == (503, "MISS"), failed.status_line
        assert failed.get("cache-control") == "max-age=60"
        assert "stored" not in failed.status_line.split("; "), failed.status_line
    else:
        assert (failed.status, failed.cache, failed.body) == (200, "STALE", first.body), failed.status_line
    # Recovered: the stale 200 is revalidated (304) and served; never the 503.
    for _ in range(2):
        r = send(proxy, "GET", target)
        assert (r.status, r.cache, r.body) == (200, "HIT", first.body), (r.status, r.status_line)
    assert [a.headers.get("if-none-match") for a in arrivals(origin, target)] == [None, '"v1"', '"v1"']


@pytest.mark.parametrize("how", ["range", "no-cache"])
def test_other_forwarded_5xx_does_not_replace_a_stale_entry(l1: Proxy, origin: Origin, how: str) -> None:
    """The same rule for the other requests forwarded while a 200 with a validator is stored: a
    Range request (forwarded as it is, RFC 9111 §3.3) and a request with no-cache (§5.2.1.4).
    Their 503 with max-age=60 goes to their own client and must not become the URL's entry."""
    path = f"/fivexx/{how}"
    target = f"{path}?cc={q('max-age=1')}&{OLD}&etag=v1&then_cc={q('max-age=60')}"
    first = send(l1, "GET", target)
    assert (first.status, first.cache) == (200, "MISS")
    extra = b"Range: bytes=0-3\r\n" if how == "range" else b"Cache-Control: no-cache\r\n"
    with origin.failing_with(path, 503):
        forwarded = send(l1, "GET", target, extra)
    assert forwarded.status == 503
    r = send(l1, "GET", target)
    assert (r.status, r.body) == (200, first.body), (r.status, r.status_line)


# ================================================================ 7. hung origin


def _leader_and_waiters(proxy: Proxy, target: str) -> tuple[Raw | Exception, list[Raw | Exception]]:
    """8 clients: the first 0.2 s ahead (it leads the fetch), each given 3 s."""
    request = request_bytes(b"GET", target.encode(), f"127.0.0.1:{proxy.port}".encode())
    calls = [lambda: exchange(proxy.port, request, timeout=3.0)] * 8
    got = concurrently(calls, stagger=0.2)
    return got[0], got[1:]


def test_hung_origin_costs_one_request_and_waiters_get_504_or_stale(
    origin: Origin, tmp_path: Path
) -> None:
    """A hung origin: waiters share the leader's cache_origin_timeout_ms (not
    cache_coalesce_wait_ms): one origin request per key; each waiter a 504 (RFC 9110 §15.6.5),
    or the stale entry when stale-if-error allows it (RFC 5861 §4)."""
    proxy = start_proxy(
        tmp_path, f"reverse:{origin.url}", "cache_origin_timeout_ms=1500", "cache_coalesce_wait_ms=15000"
    )
    try:
        cold = f"/hung/cold?cc={q('max-age=60')}&delay=30000"
        leader, waiters = _leader_and_waiters(proxy, cold)
        print(f"hung origin, cold key: the leader got {leader!r}")
        assert len(arrivals(origin, cold)) == 1
        for w in waiters:
            assert isinstance(w, Raw), w
            assert (w.status, w.cache) == (504, "MISS"), (w.status, w.status_line)
            assert "origin-timeout" in w.status_line, w.status_line
            assert w.elapsed < 2.0, w.elapsed
        # The leader shares the deadline: answered by the cache although mitmproxy forwarded it.
        assert isinstance(leader, Raw), leader
        assert (leader.status, leader.cache) == (504, "MISS"), (leader.status, leader.status_line)
        assert "origin-timeout" in leader.status_line, leader.status_line
        assert metric(proxy, "mitmcache_origin_timeouts_total") == 1

        path = "/hung/stale"
        stale = f"{path}?cc={SIE}&{OLD}"
        first = send(proxy, "GET", stale)
        assert first.cache == "MISS"
        origin.server.hang[path] = 30  # type: ignore[attr-defined]
        try:
            leader, waiters = _leader_and_waiters(proxy, stale)
        finally:
            origin.server.hang.pop(path)  # type: ignore[attr-defined]
        assert len(arrivals(origin, stale)) == 2  # the fill, then one for all eight
        for r in [leader, *waiters]:
            assert isinstance(r, Raw), r
            assert (r.status, r.cache, r.body) == (200, "STALE", first.body), (r.status, r.status_line)
            assert "stale-if-error" in r.status_line, r.status_line
            assert r.elapsed < 2.5, r.elapsed
    finally:
        _stop_clean(proxy)


class KeepAlive:
    """One client connection, several requests in turn (responses framed by Content-Length)."""

    def __init__(self, port: int, timeout: float = 3.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.port, self.buf = port, b""

    def get(self, target: str, extra: bytes = b"") -> Raw:
        start = time.monotonic()
        self.sock.sendall(b"GET " + target.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % self.port + extra + b"\r\n")
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = [(k.strip(), v.strip()) for k, _, v in (line.partition(b":") for line in lines[1:])]
        length = int(next(v for k, v in fields if k.lower() == b"content-length"))
        while len(self.buf) < length:
            self.buf += self._recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        return Raw(int(lines[0].split(b" ")[1]), fields, body, time.monotonic() - start)

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        assert chunk, f"the proxy closed the connection (buffered: {self.buf[:300]!r})"
        return chunk

    def close(self) -> None:
        self.sock.close()


def test_hung_leader_is_answered_and_its_connection_is_never_reused(origin: Origin, tmp_path: Path) -> None:
    """A request leading a fetch to an origin that gives no headers gets the cache's 504 after
    cache_origin_timeout_ms, on a keep-alive connection that stays usable; the origin's late
    answer (here after 2.5 s) reaches no one — not the next request on that connection, not the
    cache — because the upstream connection it was due on is closed, not reused."""
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}", "cache_origin_timeout_ms=1000")
    try:
        hung = f"/hung/ka?cc={q('max-age=60')}&delay=2500"
        conn = KeepAlive(proxy.port)
        try:
            r = conn.get(hung)
            assert (r.status, r.cache) == (504, "MISS"), (r.status, r.status_line, r.body)
            assert "origin-timeout" in r.status_line and "fwd=uri-miss" in r.status_line, r.status_line
            nxt = conn.get(f"/hung/next?cc={q('max-age=60')}")
            assert (nxt.status, nxt.body) == (200, b"/hung/next #1"), (nxt.status, nxt.body)
            time.sleep(max(0.0, 2.8 - r.elapsed - nxt.elapsed))  # past the origin's late answer
            third = conn.get(f"/hung/third?cc={q('max-age=60')}")
            assert (third.status, third.body) == (200, b"/hung/third #1"), (third.status, third.body)
        finally:
            conn.close()
        # Nothing was stored from the late answer: the URL goes to the origin again.
        again = send(proxy, "GET", f"/hung/ka?cc={q('max-age=60')}&delay=2500", b"Cache-Control: only-if-cached\r\n")
        assert again.status == 504 and "only-if-cached" in again.status_line, again.status_line
        assert metric(proxy, "mitmcache_origin_timeouts_total") == 1
    finally:
        _stop_clean(proxy)


def test_hung_revalidation_gets_504_and_keeps_the_entry(origin: Origin, tmp_path: Path) -> None:
    """A revalidation of a stale entry forwarded by mitmproxy (no stale-if-error, so the cache's
    own client is not used) with the origin hung: 504 at the deadline (the entry may not be
    served stale, RFC 9111 §4.2.4); the entry stays, and once the origin answers again its 304
    renews it."""
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}", "cache_origin_timeout_ms=1000")
    try:
        path = "/hung/reval"
        target = f"{path}?cc={q('max-age=1')}&{OLD}&etag=v1"
        first = send(proxy, "GET", target)
        assert first.cache == "MISS"
        origin.server.hang[path] = 3  # type: ignore[attr-defined]
        try:
            timed_out = send(proxy, "GET", target)
        finally:
            origin.server.hang.pop(path)  # type: ignore[attr-defined]
        assert (timed_out.status, timed_out.cache) == (504, "MISS"), (timed_out.status, timed_out.status_line)
        assert "fwd=stale" in timed_out.status_line and "origin-timeout" in timed_out.status_line
        time.sleep(2.2)  # the hung request's late answer (3 s) would have come by now
        renewed = send(proxy, "GET", target)
        assert (renewed.status, renewed.body) == (200, first.body), (renewed.status, renewed.status_line)
        assert "fwd-status=304" in renewed.status_line, renewed.status_line
        assert metric(proxy, "mitmcache_origin_timeouts_total") == 1
    finally:
        _stop_clean(proxy)


def test_hung_origin_behind_https_interception_gets_504(tmp_path: Path) -> None:
    """Regular mode, HTTPS intercepted through CONNECT: the tunnel cannot carry an injected
    answer, so the leader gets mitmproxy's 504 error page at the deadline (no Cache-Status), and
    the next request through a new tunnel is served normally."""
    tls_origin = start_origin(tls=True)
    proxy = start_proxy(tmp_path, "regular", "ssl_insecure=true", "cache_origin_timeout_ms=1000")
    try:
        ca = ssl.create_default_context(cafile=str(proxy.confdir / "mitmproxy-ca-cert.pem"))
        base = f"https://127.0.0.1:{tls_origin.port}"
        with httpx.Client(proxy=proxy.url, verify=ca, timeout=3.0) as c:
            r = c.get(f"{base}/hung/tls?cc={q('max-age=60')}&delay=2500")
            assert r.status_code == 504, (r.status_code, r.text[:300])
            assert "cache_origin_timeout_ms" in r.text
        with httpx.Client(proxy=proxy.url, verify=ca, timeout=3.0) as c:
            ok = c.get(f"{base}/hung/after?cc={q('max-age=60')}")
            assert (ok.status_code, ok.text, ok.headers["x-cache-status"]) == (200, "/hung/after #1", "MISS")
        assert tls_origin.count(f"/hung/tls?cc={q('max-age=60')}&delay=2500") == 1
        assert metric(proxy, "mitmcache_origin_timeouts_total") == 1
    finally:
        _stop_clean(proxy)
        tls_origin.stop()


# ================================================================ 8. HEAD and Range, stale-if-error


@pytest.mark.parametrize("failure", ["503", "unreachable"])
def test_head_and_range_requests_get_stale_if_error(failure: str, tmp_path: Path) -> None:
    """RFC 5861 §4 for every request the entry can answer: with the origin failing (503) or
    gone, a GET gets the stale entry, a HEAD its fields (Content-Length of the stored body, no
    body) and a Range request a 206 cut from it."""
    origin = start_hostile_origin()
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}")
    try:
        path = "/sie/x"
        target = f"{path}?cc={SIE}&{OLD}&etag=v1"
        first = send(proxy, "GET", target)
        body = first.body
        assert (first.cache, body) == ("MISS", b"/sie/x #1")
        if failure == "503":
            origin.failing[path] = 503
        else:
            origin.stop()
        get = send(proxy, "GET", target)
        assert (get.status, get.cache, get.body) == (200, "STALE", body), get.status_line
        head = send(proxy, "HEAD", target)
        assert (head.status, head.cache, head.body) == (200, "STALE", b""), (head.status, head.status_line)
        assert head.get("content-length") == str(len(body))
        assert "stale-if-error" in head.status_line
        ranged = send(proxy, "GET", target, b"Range: bytes=0-3\r\n")
        assert (ranged.status, ranged.cache, ranged.body) == (206, "STALE", body[:4]), (ranged.status, ranged.status_line)
        assert ranged.get("content-range") == f"bytes 0-3/{len(body)}"
        assert "stale-if-error" in ranged.status_line
    finally:
        _stop_clean(proxy)
        if failure == "503":
            origin.stop()


# ================================================================ 9. a lease without a TTL


def test_lease_without_ttl_is_bounded(l2: Proxy, origin: Origin, ring: list[ValkeyNode]) -> None:
    """A fill lease left without a TTL (garbage, a crashed writer) must not stall every request
    for the URL forever: the first request bounds it to cache_lease_ms, later ones are quick."""
    target = f"/lease/nostore?cc={q('no-store')}"
    lease = f"mitmcache:lease:{digest(cache_key(origin, target))}"
    clients = [valkey.Valkey(port=n.port) for n in ring]
    for c in clients:
        assert c.set(lease, b"garbage")
        assert pttl(c, lease) == -1
    try:
        start = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        first = pool.submit(send, l2, "GET", target)
        time.sleep(0.5)
        pttls = [pttl(c, lease) for c in clients]
        bounded = [p for p in pttls if p != -1]
        assert len(bounded) == 1 and 0 < bounded[0] <= 5000, pttls  # its node's copy, bounded
        r1 = first.result(timeout=10)
        pool.shutdown()
        times = [r1.elapsed]
        for _ in range(2):
            r = send(l2, "GET", target)
            assert r.status == 200
            times.append(r.elapsed)
        total = time.monotonic() - start
        assert r1.status == 200
        assert times[1] < 1.0 and times[2] < 1.0, times
        assert total < 8.0, (total, times)
        assert len(arrivals(origin, target)) == 3
    finally:
        for c in clients:
            c.delete(lease)


# ================================================================ 10. values tied to their key


def test_valkey_values_are_tied_to_their_key_and_checked(l2: Proxy, origin: Origin, ring: list[ValkeyNode]) -> None:
    """A value copied under another URL's key, or changed in place without changing its
    length, is refused (a counted miss), never served as that URL's response."""
    a, b = f"/tied/a?cc={q('max-age=300')}", f"/tied/b?cc={q('max-age=300')}"
    assert send(l2, "GET", a).body == b"/tied/a #1"
    assert send(l2, "GET", b).body == b"/tied/b #1"
    key_a, key_b = (f"mitmcache:r1:{digest(cache_key(origin, t))}" for t in (a, b))
    found = {k.decode() for n in ring for k in valkey.Valkey(port=n.port).scan_iter("mitmcache:r1:*")}
    assert {key_a, key_b} <= found
    node_a, node_b = holder(ring, key_a), holder(ring, key_b)
    errors = metric(l2, "mitmcache_valkey_decode_errors_total")

    # B's value under A's key.
    value_b = vget(node_b, key_b)
    assert value_b is not None and b"/tied/b #1" in value_b
    assert node_a.set(key_a, value_b, keepttl=True)
    r = send(l2, "GET", a)
    assert (r.status, r.cache, r.body) == (200, "MISS", b"/tied/a #2"), r.status_line
    assert metric(l2, "mitmcache_valkey_decode_errors_total") == errors + 1
    hit = send(l2, "GET", a)  # rewritten by that miss
    assert (hit.cache, hit.body) == ("HIT", b"/tied/a #2")

    # One byte of A's body flipped inside its value, length kept.
    value_a = vget(node_a, key_a)
    assert value_a is not None
    at = value_a.rfind(b"/tied/a #2")
    assert at >= 0
    flipped = value_a[: at + 9] + b"9" + value_a[at + 10 :]
    assert len(flipped) == len(value_a)
    assert node_a.set(key_a, flipped, keepttl=True)
    r = send(l2, "GET", a)
    assert (r.status, r.cache, r.body) == (200, "MISS", b"/tied/a #3"), r.status_line
    assert metric(l2, "mitmcache_valkey_decode_errors_total") == errors + 2
