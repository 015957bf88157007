"""Near-cache coherence and purge in-process: two tiered stores ("proxies") with invalidation
listeners on a ring of real valkey-server processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import valkey

from mitmcache import semantics as sem
from mitmcache.metrics import Metrics
from mitmcache.purge import expire, groups_for
from mitmcache.ring import parse_valkey_urls
from mitmcache.service import CacheService
from mitmcache.store import Resource, TieredStore
from mitmcache.valkey_nodes import ValkeyNode
from mitmcache.valkey_tier import ValkeyTier

DEADLINE = 5.0


def value(counter) -> float:  # type: ignore[no-untyped-def]
    return counter._value.get()


def entry(body: bytes = b"body", cc: str = "max-age=300", extra: tuple[tuple[str, str], ...] = ()) -> sem.StoredResponse:
    now = time.time()
    return sem.make_stored_response(200, "OK", [], [("Cache-Control", cc), *extra], body, now, now)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll with short sleeps up to a deadline (no long sleeps in tests)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def coherent_everywhere(store: TieredStore) -> bool:
    return all(store.near.coherent(n) for n in store.members())


async def make_service(urls: str) -> CacheService:
    service = CacheService(Metrics())
    store = service.store
    store.attach_l2(ValkeyTier(parse_valkey_urls(urls), "coh", 250, service.metrics, store.forget_node))
    store.start_coherence()
    await until(lambda: coherent_everywhere(store), "listeners never subscribed")
    return service


@pytest.fixture
async def pair(ring_nodes: list[ValkeyNode]) -> AsyncIterator[tuple[CacheService, CacheService]]:
    urls = ",".join(n.url for n in ring_nodes)
    a, b = await make_service(urls), await make_service(urls)
    yield a, b
    await a.store.close()
    await b.store.close()


def in_l1(store: TieredStore, key: str) -> bool:
    return store.peek(key, time.time()) is not None


async def test_write_on_a_drops_the_copy_in_b_and_a_keeps_its_own(pair: tuple[CacheService, CacheService]) -> None:
    a, b = pair
    key = "http://o/x"
    await a.store.put(key, entry(b"v1"), time.time())
    assert (await b.store.get(key, time.time())).tier == "l2"  # type: ignore[union-attr]
    assert in_l1(b.store, key)
    await a.store.put(key, entry(b"v2"), time.time())
    await until(lambda: not in_l1(b.store, key), "B kept its copy after A wrote")
    hit = await b.store.get(key, time.time())
    assert hit is not None and hit.resource.variants[0].body == b"v2"
    await asyncio.sleep(0.05)  # A's own echo has long arrived
    assert in_l1(a.store, key), "A's own write evicted what it just stored"
    assert value(b.metrics.invalidation_drops.labels("key")) >= 1
    assert b.metrics.invalidation_delay.collect()[0].samples  # histogram exported
    assert value(a.metrics.invalidations_received) >= 1


async def test_killed_listener_flushes_that_nodes_entries_until_it_is_back(
    pair: tuple[CacheService, CacheService], ring_nodes: list[ValkeyNode]
) -> None:
    _, b = pair
    store = b.store
    keys = [f"http://o/k{i}" for i in range(30)]
    for k in keys:
        await store.put(k, entry(), time.time())
    assert all(in_l1(store, k) for k in keys)
    victim = ring_nodes[0]
    name = parse_valkey_urls(victim.url)[0].name
    owned = [k for k in keys if store.l2.placement(k)[0] == name]  # type: ignore[union-attr]
    assert owned
    valkey.Valkey(port=victim.port).client_kill_filter(_type="pubsub")
    await until(lambda: not any(in_l1(store, k) for k in owned), "entries of the node survived its listener")
    assert all(in_l1(store, k) for k in keys if k not in owned)
    await until(lambda: coherent_everywhere(store), "listener never came back")
    assert value(b.metrics.listener_reconnects) >= 1
    await store.put(owned[0], entry(), time.time())
    assert in_l1(store, owned[0])  # copies are kept again


async def test_restarted_node_leaves_no_copy_of_its_keys(
    pair: tuple[CacheService, CacheService], ring_nodes: list[ValkeyNode]
) -> None:
    _, b = pair
    victim = ring_nodes[1]
    name = parse_valkey_urls(victim.url)[0].name
    key = next(k for k in (f"http://o/r{i}" for i in range(100)) if b.store.l2.placement(k)[0] == name)  # type: ignore[union-attr]
    await b.store.put(key, entry(), time.time())
    assert in_l1(b.store, key)
    victim.stop()
    await until(lambda: not in_l1(b.store, key), "copy of a dead node's key survived")
    b.store.l1_fallback_ttl = 0
    await b.store.put(key, entry(), time.time())  # L2 down and no listener: L1 keeps nothing
    assert not in_l1(b.store, key)
    b.store.l1_fallback_ttl = 5
    now = time.time()
    await b.store.put(key, entry(b"fallback"), now)  # ... or its own write, for a few seconds
    assert in_l1(b.store, key)
    assert b.store.peek(key, now + 4.9) is not None and b.store.peek(key, now + 5.1) is None
    victim.start()
    await until(lambda: coherent_everywhere(b.store), "listener never came back")
    assert not in_l1(b.store, key)  # the listener's return dropped the fallback copy


async def test_get_racing_with_an_invalidation_keeps_no_copy(pair: tuple[CacheService, CacheService]) -> None:
    a, b = pair
    key = "http://o/race"
    await a.store.put(key, entry(b"v1"), time.time())
    node, vkey = b.store.l2.placement(key)  # type: ignore[union-attr]
    flight = b.store.near.begin(vkey, node)
    b.store.near.invalidated(node, [vkey.encode()], time.time())  # a write lands mid-GET
    assert not b.store.near.end(flight)


async def test_purge_by_tag_reaches_every_tagged_key_and_the_other_l1(pair: tuple[CacheService, CacheService]) -> None:
    a, b = pair
    tagged = [f"http://o/t{i}" for i in range(5)]
    for k in tagged:
        e = entry(extra=(("Surrogate-Key", "red blue"),))
        await a.store.put(k, e, time.time(), groups=groups_for(k, ("red", "blue")))
        await b.store.get(k, time.time())
    other = "http://o/untagged"
    await a.store.put(other, entry(), time.time(), groups=groups_for(other, ()))
    result = await a.purger.tag("blue")
    assert result.purged == 5 and result.error is None
    await until(lambda: not any(in_l1(b.store, k) for k in tagged), "B kept tagged copies")
    assert [await b.store.get(k, time.time()) for k in tagged] == [None] * len(tagged)
    assert await b.store.get(other, time.time()) is not None
    assert (await a.purger.tag("blue")).purged == 0
    assert value(a.metrics.purges.labels("tag", "hard")) == 2


async def test_purge_by_prefix_stays_inside_the_prefix(pair: tuple[CacheService, CacheService]) -> None:
    a, b = pair
    inside = ["http://o/api/1", "http://o/api/2?x=1"]
    outside = ["http://o/apis", "http://o2/api/1"]
    for k in inside + outside:
        await a.store.put(k, entry(), time.time(), groups=groups_for(k, ()))
        await b.store.get(k, time.time())
    result = await a.purger.prefix("http://o/api/")
    assert result.purged == 2
    await until(lambda: not any(in_l1(b.store, k) for k in inside), "B kept copies inside the prefix")
    assert None not in [await b.store.get(k, time.time()) for k in outside]


async def test_soft_purge_leaves_a_stale_entry_everywhere(pair: tuple[CacheService, CacheService]) -> None:
    a, b = pair
    key = "http://o/soft"
    await a.store.put(key, entry(cc="max-age=300, stale-while-revalidate=60"), time.time())
    await b.store.get(key, time.time())
    result = await a.purger.urls([key], soft=True)
    assert result.purged == 1 and result.soft
    await until(lambda: not in_l1(b.store, key), "B kept its fresh copy")
    hit = await b.store.get(key, time.time())
    assert hit is not None and not hit.resource.variants[0].is_fresh(time.time())
    assert in_l1(a.store, key) and not a.store.peek(key, time.time()).variants[0].is_fresh(time.time())  # type: ignore[union-attr]


def test_expire_ends_freshness_now_and_keeps_the_stale_windows() -> None:
    e = entry(cc="max-age=300, stale-while-revalidate=60")
    now = time.time() + 10
    stale = expire(e, now)
    assert not stale.is_fresh(now)
    assert stale.retain_until() == pytest.approx(now + 60, abs=0.01)
    assert Resource((expire(entry(cc="max-age=300"), now),)).retain_until() <= now + 0.01  # nothing to be stale for
