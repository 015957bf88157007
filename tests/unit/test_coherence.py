"""NearCache bookkeeping (no I/O): own writes, races, flushes."""

from __future__ import annotations

import time

from mitmcache.coherence import NearCache
from mitmcache.metrics import Metrics


class L1:
    """Stands in for the store's L1: remembers what NearCache asked it to drop."""

    def __init__(self, near_holder: list[NearCache]) -> None:
        self.held: set[str] = set()
        self._near = near_holder

    def drop(self, keys: list[str]) -> int:
        n = 0
        for k in keys:
            if k in self.held:
                self.held.discard(k)
                self._near[0].removed(k)
                n += 1
        return n


def make() -> tuple[NearCache, L1, Metrics]:
    holder: list[NearCache] = []
    l1 = L1(holder)
    metrics = Metrics()
    near = NearCache(metrics, l1.drop)
    holder.append(near)
    near.reset(True, 2)
    near.restored("n1")
    near.restored("n2")
    return near, l1, metrics


def hold(near: NearCache, l1: L1, key: str, node: str) -> str:
    vkey = f"p:r1:{key}"
    l1.held.add(key)
    near.placed(key, node, vkey)
    return vkey


def test_foreign_invalidation_drops_the_copy() -> None:
    near, l1, metrics = make()
    vkey = hold(near, l1, "k", "n1")
    assert near.invalidated("n1", [vkey.encode()], time.monotonic()) == 1
    assert l1.held == set()
    assert metrics.invalidation_drops.labels("key")._value.get() == 1


def test_own_write_echo_is_swallowed_once() -> None:
    near, l1, metrics = make()
    vkey = hold(near, l1, "k", "n1")
    near.expect_own(vkey)
    assert near.invalidated("n1", [vkey.encode()], time.monotonic()) == 0
    assert l1.held == {"k"}
    assert near.invalidated("n1", [vkey.encode()], time.monotonic()) == 1  # the next one is someone else's
    count = next(x for x in metrics.invalidation_delay.collect()[0].samples if x.name.endswith("_count"))
    assert count.value == 1  # one echo timed


def test_cancelled_own_write_swallows_nothing() -> None:
    near, l1, _ = make()
    vkey = hold(near, l1, "k", "n1")
    near.expect_own(vkey)
    near.cancel_own(vkey)
    assert near.invalidated("n1", [vkey.encode()], time.monotonic()) == 1


def test_round_trip_crossing_an_invalidation_may_not_keep_a_copy() -> None:
    near, _, _ = make()
    flight = near.begin("p:r1:k", "n1")
    near.invalidated("n1", [b"p:r1:k"], time.monotonic())
    assert near.end(flight) is False
    assert near.end(near.begin("p:r1:k", "n1")) is True  # a clean round trip may


def test_own_echo_during_a_write_does_not_void_it() -> None:
    near, _, _ = make()
    flight = near.begin("p:r1:k", "n1")
    near.expect_own("p:r1:k")
    near.invalidated("n1", [b"p:r1:k"], time.monotonic())
    assert near.end(flight) is True


def test_lost_listener_drops_that_nodes_copies_and_refuses_new_ones_until_restored() -> None:
    near, l1, metrics = make()
    hold(near, l1, "a", "n1")
    hold(near, l1, "b", "n2")
    flight = near.begin("p:r1:a", "n1")
    assert near.lost("n1", "test") == 1
    assert l1.held == {"b"}
    assert not near.coherent("n1") and near.coherent("n2")
    assert near.end(flight) is False
    assert metrics.listeners.labels("down")._value.get() == 1
    near.restored("n1")
    assert near.coherent("n1")
    assert metrics.listeners.labels("up")._value.get() == 2


def test_flushall_notice_drops_the_whole_node() -> None:
    near, l1, _ = make()
    hold(near, l1, "a", "n1")
    hold(near, l1, "b", "n1")
    assert near.invalidated("n1", None, time.monotonic()) == 2


def test_disabled_near_cache_is_always_coherent() -> None:
    near = NearCache(Metrics(), lambda keys: 0)
    assert near.coherent("anything")
    assert near.end(near.begin("v", "anything"))
