"""End to end: attacks on the hit-for-pass fast path (``HttpCache._scan_request``/``_keys``/
``_passing``/``_finish_passed``, ``Pipeline.pass_at_once``/``finish_pass``/``resume``,
``CacheService.refusal``) and on L2 read batching (``valkey_tier.Node.read``: one MGET per
loop tick and node) — real mitmdump, a real counting origin, real valkey-server processes.

A passed request must be answered exactly as the full pipeline answers it: the same status,
the same X-Cache-Status/Cache-Status, the same origin counts, and never a body or cookie meant
for another client or another key.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import valkey

from mitmcache.valkey_nodes import ValkeyNode
from tests.conftest import Proxy, running_nodes, start_proxy
from tests.e2e.test_hostile import (
    _stop_clean, cache_key, concurrently, digest, exchange, metric, q, request_bytes, send,
)
from tests.origin import Origin

NO_STORE = q("no-store")
STORABLE = q("max-age=60")


@pytest.fixture(scope="module")
def l1(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(tmp_path_factory.mktemp("fp"), f"reverse:{origin.url}")
    yield p
    _stop_clean(p)


def passed(r) -> bool:  # type: ignore[no-untyped-def]
    return r.cache == "MISS" and "hit-for-pass" in r.status_line


# ============================================================ marker transitions


def test_first_storable_answer_after_no_store_is_stored_and_served(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    target = f"/fp/a?cc={NO_STORE}&then_cc={STORABLE}"
    r1 = send(l1, "GET", target)
    assert (r1.status, r1.cache) == (200, "MISS") and "hit-for-pass" not in r1.status_line
    r2 = send(l1, "GET", target)
    assert passed(r2) and "stored" in r2.status_line, r2.status_line
    r3 = send(l1, "GET", target)
    assert (r3.status, r3.cache, r3.body) == (200, "HIT", r2.body), r3.status_line
    assert origin.count(target) == 2


def test_set_cookie_answers_are_never_served_to_another_client(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    target = f"/fp/cookie?cc={STORABLE}&cookie=1"
    first = [send(l1, "GET", target) for _ in range(3)]
    bodies = {r.body for r in first}
    assert len(bodies) == 3 and all(r.cache == "MISS" and r.get("set-cookie") for r in first)
    assert all(passed(r) for r in first[1:]), [r.status_line for r in first]
    many = concurrently([lambda: send(l1, "GET", target) for _ in range(8)])
    assert len({r.body for r in many}) == 8 and all(r.cache == "MISS" for r in many)
    assert origin.count(target) == 11


def test_authorization_answer_on_a_passed_url_is_not_shared(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    """RFC 9111 §3.5: the answer to a request with Authorization (no public/s-maxage) is not
    stored, even when it would be storable for an anonymous request."""
    target = f"/fp/auth?cc={NO_STORE}&then_cc={STORABLE}&echo=Authorization"
    assert send(l1, "GET", target).cache == "MISS"
    alice = send(l1, "GET", target, b"Authorization: Bearer alice\r\n")
    assert passed(alice) and b"alice" in alice.body and "authorization" in alice.status_line, alice.status_line
    anon = send(l1, "GET", target)
    assert passed(anon) and b"alice" not in anon.body, anon.status_line
    hit = send(l1, "GET", target)
    assert (hit.cache, hit.body) == ("HIT", anon.body)


def test_head_on_a_passed_url_then_get_stores(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    target = f"/fp/head?cc={NO_STORE}&then_cc={STORABLE}"
    assert send(l1, "GET", target).cache == "MISS"
    head = send(l1, "HEAD", target)
    assert head.status == 200 and head.body == b"" and passed(head), head.status_line
    get = send(l1, "GET", target)
    assert passed(get), get.status_line
    hit = send(l1, "GET", target)
    assert (hit.cache, hit.body) == ("HIT", get.body)
    head_hit = send(l1, "HEAD", target)
    assert (head_hit.cache, head_hit.body) == ("HIT", b"")
    assert origin.count(target) == 3


def test_conditional_request_on_a_passed_url_gets_the_origin_304(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    target = f"/fp/cond?cc={NO_STORE}&then_cc={STORABLE}&etag=v1"
    assert send(l1, "GET", target).cache == "MISS"
    c = send(l1, "GET", target, b'If-None-Match: "v1"\r\n')
    assert c.status == 304 and passed(c) and c.body == b"", (c.status, c.status_line)
    full = send(l1, "GET", target)
    assert (full.status, full.cache) == (200, "MISS") and passed(full)
    hit = send(l1, "GET", target, b'If-None-Match: "v1"\r\n')
    assert (hit.status, hit.cache) == (304, "HIT"), hit.status_line
    assert send(l1, "GET", target).body == full.body
    assert origin.count(target) == 3


def test_5xx_on_a_passed_url_is_passed_on_and_sets_no_marker_renewal(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    target = f"/fp/5xx?cc={NO_STORE}&then_status=503&then_cc={STORABLE}"
    assert send(l1, "GET", target).cache == "MISS"
    r = send(l1, "GET", target)
    assert r.status == 503 and passed(r), r.status_line
    assert "fwd-status=503" in r.status_line, r.status_line


def test_only_if_cached_on_a_passed_url_is_504_however_spelled(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    target = f"/fp/oic?cc={NO_STORE}"
    assert send(l1, "GET", target).cache == "MISS"
    for extra in (
        b"Cache-Control: only-if-cached\r\n",
        b"cache-control: ONLY-IF-CACHED\r\n",
        b"Cache-Control: max-age=0\r\nCache-Control: only-if-cached\r\n",
        b"Cache-Control: max-age=0, only-if-cached\r\n",
    ):
        r = send(l1, "GET", target, extra)
        assert r.status == 504, (extra, r.status, r.status_line)
    assert origin.count(target) == 1


def test_unsafe_method_and_purge_on_a_passed_url(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    target = f"/fp/unsafe?cc={NO_STORE}&then_cc={STORABLE}"
    assert send(l1, "GET", target).cache == "MISS"
    post = send(l1, "POST", target, b"Content-Length: 0\r\n")
    assert post.status == 200
    purge = send(l1, "PURGE", target)
    assert purge.status in (200, 404), purge.body  # 404: nothing stored to purge
    get = send(l1, "GET", target)
    assert get.cache == "MISS"
    hit = send(l1, "GET", target)
    assert (hit.cache, hit.body) == ("HIT", get.body)


# ============================================================ key memo


def test_absolute_form_and_origin_form_never_share_a_marker_or_entry(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    """The memo keys by what keys.build reads: an absolute-form target naming another
    authority is its own key, passed or stored, whatever the memo holds for the plain one."""
    target = f"/fp/abs?cc={q('private')}&then_cc={STORABLE}&echo=Host"
    absolute = b"http://other.example" + target.encode()
    a1 = exchange(l1.port, request_bytes(b"GET", absolute, b"other.example"))
    assert a1.cache == "MISS"
    assert send(l1, "GET", target).cache == "MISS"  # the plain key's own first answer (private)
    p2 = send(l1, "GET", target)
    assert passed(p2) and "stored" in p2.status_line, p2.status_line
    p3 = send(l1, "GET", target)
    assert (p3.cache, p3.body) == ("HIT", p2.body)
    a2 = exchange(l1.port, request_bytes(b"GET", absolute, b"other.example"))
    assert passed(a2), a2.status_line  # its own marker, not the plain key's entry
    a3 = exchange(l1.port, request_bytes(b"GET", absolute, b"other.example"))
    assert (a3.cache, a3.body) == ("HIT", a2.body)
    # Host case and default port spell the same authority: one key.
    a4 = exchange(l1.port, request_bytes(b"GET", b"http://OTHER.example:80" + target.encode(), b"Other.Example"))
    assert (a4.cache, a4.body) == ("HIT", a2.body), a4.status_line
    assert (origin.count(target), origin.count(absolute.decode())) == (2, 2)


def test_percent_encoding_variants_share_the_marker_and_entry(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    a = f"/fp/caf%c3%a9?cc={NO_STORE}&then_cc={STORABLE}"
    b = f"/fp/caf%C3%A9?cc={NO_STORE}&then_cc={STORABLE}"
    assert send(l1, "GET", a).cache == "MISS"
    rb = send(l1, "GET", b)  # the origin's first answer for this spelling: no-store again
    assert passed(rb), rb.status_line
    ra = send(l1, "GET", a)
    assert passed(ra) and "stored" in ra.status_line, ra.status_line
    assert send(l1, "GET", b).cache == "HIT"


def test_long_targets_and_many_urls_beyond_the_memo(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    long = f"/fp/long?pad={'x' * 3000}&cc={NO_STORE}&then_cc={STORABLE}"
    assert send(l1, "GET", long).cache == "MISS"
    r2 = send(l1, "GET", long)
    assert passed(r2)
    r3 = send(l1, "GET", long)
    assert (r3.cache, r3.body) == ("HIT", r2.body)


def test_odd_bytes_in_passed_requests_and_answers_cause_no_error(l1, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    target = f"/fp/odd?cc={NO_STORE}&xhdr={q('X-Odd: %FF%FE caf%C3%A9')}"
    assert send(l1, "GET", target).cache == "MISS"
    for extra in (b"Cache-Control: \xff\xfe\r\n", b"Authorization: \xc3\xa9\xff\r\n", b"Pragma: no-cache\xff\r\n"):
        r = send(l1, "GET", target, extra)
        assert r.status == 200 and passed(r), (extra, r.status_line)
    target2 = f"/fp/odd2?cc={NO_STORE}&then_cc={q('max-age=60, \xff')}"
    assert send(l1, "GET", target2).cache == "MISS"
    r = send(l1, "GET", target2)
    assert r.status == 200


# ============================================================ markers through L2


def test_marker_shared_through_l2_then_storable(origin: Origin, tmp_path: Path) -> None:
    with running_nodes(1) as nodes:
        urls = ",".join(n.url for n in nodes)
        a = start_proxy(tmp_path / "a", f"reverse:{origin.url}", f"cache_valkey_urls={urls}")
        b = start_proxy(tmp_path / "b", f"reverse:{origin.url}", f"cache_valkey_urls={urls}")
        try:
            target = f"/fp/l2?cc={q('private')}&then_cc={q('private')}"
            assert send(a, "GET", target).cache == "MISS"
            rb = send(b, "GET", target)
            assert passed(rb), rb.status_line
            rb2 = send(b, "GET", target)  # b's L1 marker now: the fast path
            assert passed(rb2) and rb2.body != rb.body
            assert origin.count(target) == 3
        finally:
            _stop_clean(a)
            _stop_clean(b)


# ============================================================ L2 read batching


def _batch_proxy(tmp: Path, origin: Origin, nodes: list[ValkeyNode]):  # type: ignore[no-untyped-def]
    urls = ",".join(n.url for n in nodes)
    return start_proxy(tmp, f"reverse:{origin.url}", f"cache_valkey_urls={urls}", "cache_l1_ttl=0",
                       "cache_valkey_timeout_ms=300")


def test_batched_reads_with_a_frozen_node_are_bounded_and_never_wrong(origin: Origin, tmp_path: Path) -> None:
    with running_nodes(1) as nodes:
        p = _batch_proxy(tmp_path, origin, nodes)
        try:
            targets = [f"/fp/batch{i}?cc={STORABLE}" for i in range(12)]
            stored = {t: send(p, "GET", t).body for t in targets}
            assert all(send(p, "GET", t).cache == "HIT" for t in targets)
            hits = concurrently([lambda t=t: send(p, "GET", t) for t in targets * 2])
            assert all(r.cache == "HIT" and r.body == stored[t] for r, t in zip(hits, targets * 2))
            assert nodes[0].proc is not None
            os.kill(nodes[0].proc.pid, signal.SIGSTOP)
            try:
                frozen = concurrently([lambda t=t: send(p, "GET", t) for t in targets * 2])
            finally:
                os.kill(nodes[0].proc.pid, signal.SIGCONT)
            for r, t in zip(frozen, targets * 2):
                assert not isinstance(r, Exception), r
                assert r.status == 200 and r.body.startswith(t.split("?")[0].encode()), (t, r.body)
            time.sleep(3)  # the probe brings the node back
            again = concurrently([lambda t=t: send(p, "GET", t) for t in targets])
            for r, t in zip(again, targets):
                assert r.status == 200 and r.body.startswith(t.split("?")[0].encode()), (t, r.body)
                if r.cache == "HIT":
                    assert r.body.split(b" #")[0] == t.split("?")[0].encode()
            assert metric(p, 'mitmcache_valkey_errors_total{node="' + nodes[0].url.split("//")[1] + '",op="get"}') >= 0
        finally:
            _stop_clean(p)


def test_garbage_values_and_killed_node_under_batched_reads(origin: Origin, tmp_path: Path) -> None:
    with running_nodes(1) as nodes:
        p = _batch_proxy(tmp_path, origin, nodes)
        try:
            targets = [f"/fp/garb{i}?cc={STORABLE}" for i in range(6)]
            for t in targets:
                send(p, "GET", t)
            node = valkey.Valkey(port=nodes[0].port)
            keys = node.keys("*:r1:*")
            assert keys
            for k in keys[:3]:
                node.set(k, b"\x00garbage" * 10)
            node.delete(b"mitmcache:r1:" + digest(cache_key(origin, targets[-1])).encode())
            node.lpush(b"mitmcache:r1:" + digest(cache_key(origin, targets[-1])).encode(), b"x")
            rs = concurrently([lambda t=t: send(p, "GET", t) for t in targets * 3])
            for r, t in zip(rs, targets * 3):
                assert not isinstance(r, Exception), r
                assert r.status == 200 and r.body.split(b" #")[0] == t.split("?")[0].encode(), (t, r.body)
            assert nodes[0].proc is not None
            nodes[0].proc.kill()
            nodes[0].proc.wait()
            rs = concurrently([lambda t=t: send(p, "GET", t) for t in targets * 3])
            for r, t in zip(rs, targets * 3):
                assert not isinstance(r, Exception), r
                assert r.status == 200 and r.body.split(b" #")[0] == t.split("?")[0].encode(), (t, r.body)
        finally:
            _stop_clean(p)


# ============================================================ a node that answers garbage


class _GarbageNode:
    """A TCP server speaking just enough RESP to pass for a Valkey node (PING, HELLO, CLIENT …
    answered), whose reply to a read (GET/MGET) is ``reply``: bytes no real server sends."""

    def __init__(self, reply: bytes, everything: bool = False) -> None:
        import socketserver
        import threading

        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buf = b""
                sock = self.request
                while True:
                    try:
                        chunk = sock.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                    while True:
                        parsed = _parse_command(buf)
                        if parsed is None:
                            break
                        command, buf = parsed
                        name = command[0].upper() if command else b""
                        if name in (b"GET", b"MGET") or outer.everything:
                            outer.reads += 1
                            sock.sendall(outer.reply)
                        elif name == b"PING":
                            sock.sendall(b"+PONG\r\n")
                        else:
                            sock.sendall(b"+OK\r\n")

        self.reply = reply
        self.everything = everything
        self.reads = 0
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"valkey://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _parse_command(buf: bytes) -> tuple[list[bytes], bytes] | None:
    """One RESP array of bulk strings from ``buf`` (None: incomplete)."""
    if not buf.startswith(b"*") or b"\r\n" not in buf:
        return None
    head, rest = buf.split(b"\r\n", 1)
    items = []
    for _ in range(int(head[1:])):
        if b"\r\n" not in rest:
            return None
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line[1:])
        if len(rest) < size + 2:
            return None
        items.append(rest[:size])
        rest = rest[size + 2:]
    return items, rest


@pytest.mark.parametrize("reply", [b"*1\r\n$abc\r\n", b"$-5\r\n", b"*1\r\n$-7\r\n"], ids=["bad-length", "negative", "negative-in-array"])
def test_a_node_answering_garbage_to_reads_is_a_counted_l2_error(origin: Origin, tmp_path: Path, reply: bytes) -> None:
    """Bytes no Valkey server sends, in answer to the batched read: the read fails like any
    L2 error (counted, the request answered from the origin), never an addon error."""
    node = _GarbageNode(reply)
    p = start_proxy(tmp_path, f"reverse:{origin.url}", f"cache_valkey_urls={node.url}", "cache_valkey_timeout_ms=300")
    try:
        target = f"/fp/garbage-{reply.hex()}?cc={STORABLE}"
        rs = concurrently([lambda: send(p, "GET", target) for _ in range(3)])
        for r in rs:
            assert not isinstance(r, Exception), r
            assert r.status == 200 and r.body.startswith(b"/fp/garbage-"), (r.status, r.body)
        assert node.reads >= 1
        errors = sum(v for k, v in p.metrics().items() if k.startswith("mitmcache_valkey_errors_total") and 'op="get"' in k)
        assert errors >= 1
    finally:
        out = _stop_clean(p)
        node.stop()
    assert "Addon error" not in out and "Traceback" not in out, out[-3000:]


def test_clients_leaving_mid_read_and_a_restarted_node(origin: Origin, tmp_path: Path) -> None:
    """Clients that leave while their batched read waits on a frozen node; a node killed and
    started again on its port while reads are in flight: no addon error, every later answer
    the right one."""
    import socket

    with running_nodes(1) as nodes:
        p = _batch_proxy(tmp_path, origin, nodes)
        try:
            targets = [f"/fp/leave{i}?cc={STORABLE}" for i in range(8)]
            stored = {t: send(p, "GET", t).body for t in targets}
            assert nodes[0].proc is not None
            os.kill(nodes[0].proc.pid, signal.SIGSTOP)
            try:
                for t in targets:
                    s = socket.create_connection(("127.0.0.1", p.port))
                    s.sendall(request_bytes(b"GET", t.encode(), f"127.0.0.1:{p.port}".encode()))
                    s.close()
                time.sleep(0.5)
            finally:
                os.kill(nodes[0].proc.pid, signal.SIGCONT)
            time.sleep(2)
            rs = concurrently([lambda t=t: send(p, "GET", t) for t in targets])
            for r, t in zip(rs, targets):
                assert not isinstance(r, Exception), r
                assert r.status == 200 and r.body.split(b" #")[0] == t.split("?")[0].encode(), (t, r.body)
                if r.cache == "HIT":
                    assert r.body == stored[t]
            # Killed while reads are on their way, then back on the same port (empty).
            calls = [lambda t=t: send(p, "GET", t) for t in targets * 3]
            nodes[0].proc.kill()
            rs = concurrently(calls)
            nodes[0].proc.wait()
            nodes[0].start()
            time.sleep(2)
            rs += concurrently([lambda t=t: send(p, "GET", t) for t in targets])
            for r in rs:
                assert not isinstance(r, Exception), r
                assert r.status == 200
            after = [send(p, "GET", t) for t in targets]
            for r, t in zip(after, targets):
                assert r.body.split(b" #")[0] == t.split("?")[0].encode()
        finally:
            _stop_clean(p)


@pytest.mark.parametrize("framing", ["", "&chunked=1"], ids=["length", "chunked"])
def test_streamed_answers_on_a_passed_url(origin: Origin, tmp_path: Path, framing: str) -> None:
    """stream_large_bodies: a passed request whose answer streams leaves the fast path
    (``_resume``): a too-large answer keeps the marker, the first storable one is stored
    while it streams and served after."""
    p = start_proxy(tmp_path, f"reverse:{origin.url}", "stream_large_bodies=10k", "cache_max_object_bytes=100k")
    try:
        big = f"/fp/stream{framing or '-cl'}?big=200000{framing}&cc={STORABLE}"
        first = send(p, "GET", big)
        assert (first.status, len(first.body) if not framing else first.status) == (200, 200000 if not framing else 200)
        second = send(p, "GET", big)
        # A chunked body's headers leave before its size is known: "streamed" only.
        assert passed(second) and ("too-large" in second.status_line or framing), second.status_line
        target = f"/fp/stream{framing or '-cl'}2?big=20000{framing}&cc={NO_STORE}&then_cc={STORABLE}"
        assert send(p, "GET", target).cache == "MISS"
        r2 = send(p, "GET", target)
        assert passed(r2), r2.status_line
        r3 = send(p, "GET", target)
        assert r3.cache == "HIT", r3.status_line
        assert origin.count(target) == 2
    finally:
        _stop_clean(p)


def test_a_node_answering_garbage_to_everything_starts_marked_down(origin: Origin, tmp_path: Path) -> None:
    """The start-up PING and the probe get the garbage too: the node is reported and marked
    down, requests go to the origin, nothing raises."""
    node = _GarbageNode(b"$abc\r\n", everything=True)
    p = start_proxy(tmp_path, f"reverse:{origin.url}", f"cache_valkey_urls={node.url}", "cache_valkey_timeout_ms=300")
    try:
        target = f"/fp/garbage-all?cc={STORABLE}"
        first, second = send(p, "GET", target), send(p, "GET", target)
        assert (first.status, second.status) == (200, 200)
        assert second.cache == "HIT"  # L1 still serves
        time.sleep(1.2)  # the probe runs against it at least once
        assert metric(p, 'mitmcache_ring_members{state="down"}') == 1
    finally:
        out = _stop_clean(p)
        node.stop()
    assert "Addon error" not in out and "Traceback" not in out, out[-3000:]


# ============================================================ a late unshareable answer


class _ByHeaderOrigin:
    """An origin whose answer the request chooses: ``X-Answer: private`` gets
    ``Cache-Control: private``, anything else ``max-age=60``; ``X-Delay: S`` waits S seconds
    first. Counts requests per path."""

    def __init__(self) -> None:
        import threading
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with outer.lock:
                    outer.counts[self.path] += 1
                    n = outer.counts[self.path]
                time.sleep(float(self.headers.get("X-Delay") or 0))
                answer = self.headers.get("X-Answer") or "public"
                body = f"{self.path} #{n} {answer}".encode()
                self.send_response(200)
                self.send_header("Cache-Control", "private" if answer == "private" else "max-age=60")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("with_l2", [False, True], ids=["l1", "l2"])
def test_a_late_private_answer_does_not_mark_a_url_stored_meanwhile(tmp_path: Path, with_l2: bool) -> None:
    """Two requests pass on one marker; the anonymous one's storable answer is stored (ending
    the marker), then the other's private answer arrives. "A URL with a stored variant is never
    marked" (README, Hit-for-pass): the entry stays and is served — no new marker in front of
    it (in L1, nor over the entry in Valkey)."""
    origin = _ByHeaderOrigin()
    nodes_cm = running_nodes(1) if with_l2 else None
    nodes = nodes_cm.__enter__() if nodes_cm else []
    sets = [f"cache_valkey_urls={nodes[0].url}"] if nodes else []
    p = start_proxy(tmp_path, f"reverse:{origin.url}", *sets)
    try:
        target = "/fp/late"
        assert send(p, "GET", target, b"X-Answer: private\r\n").cache == "MISS"  # marks the URL
        late, anon = concurrently([
            lambda: send(p, "GET", target, b"X-Answer: private\r\nX-Delay: 0.6\r\n"),
            lambda: send(p, "GET", target),
        ], stagger=0.2)
        assert passed(late) and passed(anon), (late.status_line, anon.status_line)
        assert "stored" in anon.status_line and b"private" in late.body
        hit = send(p, "GET", target)
        assert (hit.cache, hit.body) == ("HIT", anon.body), hit.status_line
        assert origin.counts[target] == 3
        if nodes:
            # Another proxy on the ring finds the entry, not a marker written over it.
            other = start_proxy(tmp_path / "other", f"reverse:{origin.url}", *sets)
            try:
                there = send(other, "GET", target)
                assert (there.cache, there.body) == ("HIT", anon.body), there.status_line
            finally:
                _stop_clean(other)
    finally:
        _stop_clean(p)
        origin.stop()
        if nodes_cm:
            nodes_cm.__exit__(None, None, None)


def test_an_authorized_requests_private_answer_does_not_mark_the_url(tmp_path: Path) -> None:
    """README (Hit-for-pass): reasons that depend on the request — its Authorization — set no
    marker. An answer to a request with credentials is personal whatever it says (RFC 9111
    §3.5): its ``private``/``no-store`` tells nothing about the anonymous answers, so it must
    not send them all upstream (uncoalesced) for the marker's life."""
    origin = _ByHeaderOrigin()
    p = start_proxy(tmp_path, f"reverse:{origin.url}")
    try:
        target = "/fp/authmark"
        mine = send(p, "GET", target, b"Authorization: Bearer alice\r\nX-Answer: private\r\n")
        assert mine.cache == "MISS" and b"private" in mine.body
        anon = send(p, "GET", target)
        assert anon.cache == "MISS" and "hit-for-pass" not in anon.status_line, anon.status_line
        assert "stored" in anon.status_line
        assert send(p, "GET", target).cache == "HIT"
        nostore = "/fp/authmark2"
        send(p, "GET", nostore, b"Authorization: Bearer alice\r\nX-Answer: private\r\n")
        assert "hit-for-pass" not in send(p, "GET", nostore).status_line
    finally:
        _stop_clean(p)
        origin.stop()
