"""End to end: the leader's deadline (cache_origin_timeout_ms) where the deadline passes before
the leader's request has reached the origin — real mitmdump, a real origin that hangs.

The deadline is armed when the request hook returns, but the request reaches the origin later
when mitmproxy has to wait for a connection (an HTTP/2 client multiplexing more requests to one
origin than mitmproxy opens connections for it, 5 per client connection), or when the request
hook itself waited out the deadline (another proxy's fill lease in Valkey). Such a leader must
still be answered at its deadline, not left to the origin's (here 30 s) silence.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import valkey

from mitmcache.valkey_nodes import ValkeyNode
from tests.conftest import running_mitmweb, running_nodes, start_proxy
from tests.e2e.test_hostile import (
    Raw, _stop_clean, arrivals, cache_key, concurrently, digest, exchange, metric, q, request_bytes, start_hostile_origin,
)
from tests.origin import Origin

HUNG = "delay=30000"  # the origin's answer comes long after every client here has given up


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    o = start_hostile_origin()
    yield o
    o.stop()


def _curl_http2() -> str:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    features = subprocess.run([curl, "--version"], capture_output=True, text=True).stdout
    if "HTTP2" not in features:
        pytest.skip("curl has no HTTP/2")
    return curl


def test_http2_client_multiplexing_more_hung_leaders_than_upstream_connections(origin: Origin, tmp_path: Path) -> None:
    """One HTTP/2 client connection, 8 requests for 8 cold URLs of a hung origin at once, then one
    for a URL the origin answers at once: mitmproxy opens at most 5 connections to the origin for
    it, so 4 requests wait for one while their deadline passes. Each hung leader still gets the
    cache's 504 (detail=origin-timeout) — the ones that reach the origin late after
    cache_origin_timeout_ms from then — and reaches the origin once; nothing waits for the
    origin's 30 s. The healthy URL, queued behind them, gets its answer: time spent waiting for
    a connection inside mitmproxy is not the origin's."""
    curl = _curl_http2()
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}", "cache_origin_timeout_ms=1000")
    try:
        base = f"https://127.0.0.1:{proxy.port}"
        hung = [f"/h2many/{i}?cc={q('max-age=60')}&{HUNG}" for i in range(8)]
        # --parallel without --parallel-immediate: the first transfer's connection is set up, the
        # others are multiplexed over it (one client connection, one HTTP layer).
        args = [curl, "-sk", "--http2", "--parallel", "--parallel-max", "20", "-m", "6",
                "-w", "%{http_version} %{http_code} %header{cache-status} %{url_effective}\\n", "-o", "/dev/null"]
        healthy = f"/h2many/healthy?cc={q('max-age=60')}"
        for target in [f"/h2many/first?cc={q('max-age=60')}", *hung, healthy]:
            args += [f"{base}{target}", "-o", "/dev/null"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=30)
        got = {line.rsplit(" ", 1)[1].removeprefix(base): line for line in done.stdout.splitlines() if line.strip()}
        print(done.stdout)
        assert got[f"/h2many/first?cc={q('max-age=60')}"].startswith("2 200 "), got
        for target in hung:
            line = got.get(target, "no answer")
            assert line.startswith("2 504 ") and "detail=origin-timeout" in line, (target, line)
            assert len(arrivals(origin, target)) == 1, target
        assert got[healthy].startswith("2 200 ") and "fwd-status=200" in got[healthy], got[healthy]
        assert metric(proxy, "mitmcache_origin_timeouts_total") == len(hung)
    finally:
        _stop_clean(proxy)


@pytest.fixture(scope="module")
def ring() -> Iterator[list[ValkeyNode]]:
    with running_nodes(1) as nodes:
        yield nodes


def test_lease_wait_shares_the_leaders_deadline(origin: Origin, ring: list[ValkeyNode], tmp_path: Path) -> None:
    """Another proxy holds the URL's fill lease (its fetch hangs, or it crashed holding it) for
    longer than cache_origin_timeout_ms: this proxy's request waits for that fill, but no longer
    than its own deadline — then it gets the 504 its local waiters get (detail=origin-timeout),
    instead of going to the hung origin after the lease with a deadline already passed."""
    urls = ",".join(n.url for n in ring)
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}", f"cache_valkey_urls={urls}",
                        "cache_origin_timeout_ms=1000", "cache_lease_ms=2500")
    node = valkey.Valkey(port=ring[0].port)
    try:
        target = f"/leasehung?cc={q('max-age=60')}&{HUNG}"
        lease = f"mitmcache:lease:{digest(cache_key(origin, target))}"
        assert node.set(lease, b"other-proxy", px=2500)
        r = exchange(proxy.port, request_bytes(b"GET", target.encode(), f"127.0.0.1:{proxy.port}".encode()), timeout=6.0)
        assert (r.status, r.cache) == (504, "MISS"), (r.status, r.status_line)
        assert "detail=lease-wait+origin-timeout" in r.status_line, r.status_line
        time.sleep(2.0)  # past the other proxy's lease: had the request gone upstream, it arrived
        assert arrivals(origin, target) == []
    finally:
        _stop_clean(proxy)


def test_client_leaving_before_its_queued_request_is_sent_does_not_poison_the_url(origin: Origin, tmp_path: Path) -> None:
    """An HTTP/2 client asks for 5 hung URLs and then 2 healthy ones on one connection, and gives
    up before its deadline: the healthy requests were still queued for an origin connection
    (mitmproxy opens 5), and mitmproxy tells no addon that they ended. They led their URLs'
    fetches; the next request for such a URL must reach the origin and get its answer — not the
    504 of a fetch that never started (which every later request would get, without the origin
    being asked, until the proxy restarts)."""
    curl = _curl_http2()
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}", "cache_origin_timeout_ms=1000")
    try:
        base = f"https://127.0.0.1:{proxy.port}"
        healthy = [f"/h2left/ok{i}?cc={q('max-age=60')}" for i in range(2)]
        targets = [f"/h2left/first?cc={q('max-age=60')}", *(f"/h2left/hung{i}?{HUNG}" for i in range(5)), *healthy]
        args = [curl, "-sk", "--http2", "--parallel", "-m", "0.5", "-o", "/dev/null"]
        for target in targets:
            args += [f"{base}{target}", "-o", "/dev/null"]
        subprocess.run(args, capture_output=True, text=True, timeout=30)
        time.sleep(1.5)  # past the deadline of every request above
        for target in healthy:
            r = exchange(proxy.port, request_bytes(b"GET", target.encode(), f"127.0.0.1:{proxy.port}".encode()), timeout=5.0)
            assert (r.status, r.body) == (200, target.split("?")[0].encode() + b" #1"), (target, r.status, r.status_line)
            assert "fwd-status=200" in r.status_line, r.status_line
    finally:
        _stop_clean(proxy)


def test_intercepted_leader_whose_client_leaves_after_its_deadline_does_not_poison_the_url(origin: Origin, tmp_path: Path) -> None:
    """mitmweb intercepts a request that leads its URL's fetch; its deadline passes while it is
    held, then its client gives up. mitmproxy sends no error hook for a flow held in a hook, so
    the cache must notice the client leaving itself: the next request for the URL (interception
    off) reaches the origin and gets its answer, not an instant 504 from the abandoned fetch."""
    with running_mitmweb(tmp_path, origin, "cache_origin_timeout_ms=1000", "intercept=~q & ~u /iw/") as web:
        target = f"/iw/held?cc={q('max-age=60')}"
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(web.proxy_url + target, timeout=1.8)  # held past its deadline, then gone
        time.sleep(0.5)
        assert [f["intercepted"] for f in web.flows("/iw/")] == [True]
        web.set_options(intercept="")
        r = web.client.get(target)
        assert (r.status_code, r.text) == (200, "/iw/held #1"), (r.status_code, r.headers.get("cache-status"))
        assert "fwd-status=200" in r.headers["cache-status"], r.headers["cache-status"]


class _SlowBodyOrigin:
    """An HTTP/1.1 origin that sends a response's headers after ``head`` seconds and its body
    ``body`` seconds later (one request per connection); ``count`` requests seen."""

    def __init__(self, head: float, body: float) -> None:
        self.head, self.body, self.count = head, body, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.count += 1
            body = b"slow body #%d" % self.count
            time.sleep(self.head)
            conn.sendall(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            time.sleep(self.body)
            conn.sendall(body)

    def stop(self) -> None:
        self.sock.close()


def test_waiters_keep_waiting_once_the_origin_has_begun_to_answer(tmp_path: Path) -> None:
    """The deadline bounds the time to the origin's first byte (README: once headers arrive,
    the body may take as long as it takes). The origin sends the headers before the deadline and
    the body after it: the leader gets the 200 — and so must the requests waiting for its fetch,
    not a 504 "origin-timeout" from an origin that did answer in time."""
    slow = _SlowBodyOrigin(head=0.5, body=1.0)
    proxy = start_proxy(tmp_path, f"reverse:{slow.url}", "cache_origin_timeout_ms=1000", "cache_coalesce_wait_ms=5000")
    try:
        request = request_bytes(b"GET", b"/slowbody", f"127.0.0.1:{proxy.port}".encode())
        got = concurrently([lambda: exchange(proxy.port, request, timeout=5.0)] * 4, stagger=0.2)
        for r in got:
            assert isinstance(r, Raw), r
            assert (r.status, r.body) == (200, b"slow body #1"), (r.status, r.status_line)
        assert slow.count == 1
    finally:
        _stop_clean(proxy)
        slow.stop()
