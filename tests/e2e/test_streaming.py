"""Large bodies stream through the proxy without being held whole; storable ones are stored
while they stream (a tee), and a client that leaves mid-body never leaves a truncated entry.

Real mitmdump, a real origin writing bodies 1 MiB at a time (``big=N``), real Valkey nodes.
Memory is the proxy's RSS read from /proc while the body streams (a resource bound, not a clock).
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import pytest

from mitmcache.valkey_nodes import ValkeyNode
from tests.conftest import Proxy, start_proxy
from tests.origin import Origin, big_body_chunks

MIB = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def expected_digest(size: int) -> str:
    h = hashlib.sha256()
    for chunk in big_body_chunks(size):
        h.update(chunk)
    return h.hexdigest()


def wait_for_store(proxy: Proxy, sample: str) -> None:
    deadline = time.monotonic() + 20
    while proxy.metrics()[sample] < 1:
        assert time.monotonic() < deadline, f"{sample} never counted"
        time.sleep(0.05)


def download(proxy: Proxy, path: str) -> tuple[dict[str, str], int, str]:
    """(headers, length, sha256) of the body, read in pieces (never held whole here either)."""
    h, n = hashlib.sha256(), 0
    with proxy.client(timeout=60).stream("GET", path) as r:
        for piece in r.iter_raw(MIB):
            h.update(piece)
            n += len(piece)
        return dict(r.headers), n, h.hexdigest()


def test_a_body_over_the_object_limit_streams_with_flat_memory(tmp_path: Path, origin: Origin) -> None:
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}")  # cache_max_object_bytes: 10m
    try:
        proxy.client().get("/warm?cc=max-age%3D60")
        idle = rss_bytes(proxy.proc.pid)
        peak = idle
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.02):
                peak = max(peak, rss_bytes(proxy.proc.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            size = 200 * MIB
            headers, n, digest = download(proxy, f"/huge?cc=max-age%3D60&big={size}")
        finally:
            done.set()
            sampler.join()
        assert (n, digest) == (size, expected_digest(size))
        assert headers["x-cache-status"] == "MISS" and "detail=streamed" in headers["cache-status"]
        assert peak - idle < 64 * MIB, f"RSS grew by {(peak - idle) / MIB:.0f} MiB while streaming"
        # Too large to store: the next request passes straight through (hit-for-pass).
        again = proxy.client().get("/small-too-large?cc=max-age%3D60&big=" + str(11 * MIB))
        assert len(again.content) == 11 * MIB
        passed = proxy.client().get("/small-too-large?cc=max-age%3D60&big=" + str(11 * MIB))
        assert "hit-for-pass" in passed.headers["cache-status"] and len(passed.content) == 11 * MIB
    finally:
        proxy.stop()


@pytest.mark.parametrize("chunked", [pytest.param(False, id="Content-Length"), pytest.param(True, id="chunked")])
def test_a_storable_streamed_body_is_stored_while_it_streams_and_served_from_l1_and_l2(
    tmp_path: Path, origin: Origin, ring_nodes: list[ValkeyNode], chunked: bool
) -> None:
    urls = ",".join(n.url for n in ring_nodes)
    sets = (f"cache_valkey_urls={urls}", "cache_max_object_bytes=64m", "stream_large_bodies=1m")
    a = start_proxy(tmp_path / "a", f"reverse:{origin.url}", *sets)
    b = start_proxy(tmp_path / "b", f"reverse:{origin.url}", *sets)
    try:
        size = 50 * MIB
        path = f"/fifty-{int(chunked)}?cc=max-age%3D300&big={size}" + ("&chunked=1" if chunked else "")
        want = expected_digest(size)
        first, n, digest = download(a, path)
        assert (n, digest) == (size, want)
        assert first["x-cache-status"] == "MISS" and "detail=streamed" in first["cache-status"]
        # The body has left before it is stored (the response hook runs after the last byte):
        # a request in between would be answered collapsed onto the fill, not as a HIT.
        wait_for_store(a, 'mitmcache_stores_total{tier="l2"}')
        from_l1, n, digest = download(a, path)
        assert (from_l1["x-cache-status"], n, digest) == ("HIT", size, want)
        assert "detail=l1" in from_l1["cache-status"]
        from_l2, n, digest = download(b, path)
        assert (from_l2["x-cache-status"], n, digest) == ("HIT", size, want)
        assert "detail=l2" in from_l2["cache-status"]
        assert origin.count(path) == 1
    finally:
        a.stop()
        b.stop()


def test_a_client_that_leaves_mid_stream_leaves_no_truncated_entry(tmp_path: Path, origin: Origin) -> None:
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}", "cache_max_object_bytes=64m", "stream_large_bodies=1m")
    try:
        size = 50 * MIB
        path = f"/left?cc=max-age%3D300&big={size}"
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            got = 0
            while got < 2 * MIB:
                piece = s.recv(65536)
                assert piece, "the proxy closed the connection early"
                got += len(piece)
        # The proxy could not finish: nothing may be stored from those bytes.
        headers, n, digest = download(proxy, path)
        assert headers["x-cache-status"] == "MISS"
        assert (n, digest) == (size, expected_digest(size))
        assert origin.count(path) == 2
        wait_for_store(proxy, 'mitmcache_stores_total{tier="l1"}')
        assert (download(proxy, path)[0]["x-cache-status"]) == "HIT"  # the whole second one was stored
    finally:
        proxy.stop()
