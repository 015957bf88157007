"""The byte-bounded LRU (L1)."""

from __future__ import annotations

from mitmcache.l1 import SLOT_OVERHEAD, ByteLRU


def lru(max_bytes: int) -> tuple[ByteLRU[bytes], dict[str, int]]:
    counts = {"evicted": 0, "oversized": 0}

    def on_evict(n: int) -> None:
        counts["evicted"] += n

    def on_oversized() -> None:
        counts["oversized"] += 1

    return ByteLRU(max_bytes, on_evict, on_oversized), counts


def test_hit_and_miss() -> None:
    c, _ = lru(10_000)
    assert c.get("a", 0) is None
    assert c.set("a", b"x", 1, expires_at=100, now=0)
    assert c.get("a", 1) == b"x"


def test_cost_counts_overhead_not_just_value() -> None:
    c, _ = lru(10_000)
    c.set("key", b"x" * 10, 10, 100, 0)
    assert c.bytes == 10 + len("key") + SLOT_OVERHEAD


def test_evicts_least_recently_used_within_budget() -> None:
    per = 100 + 1 + SLOT_OVERHEAD
    c, counts = lru(per * 2)
    c.set("a", b"a", 100, 100, 0)
    c.set("b", b"b", 100, 100, 0)
    c.get("a", 1)  # a is now most recent
    c.set("c", b"c", 100, 100, 1)
    assert "b" not in c and "a" in c and "c" in c
    assert counts["evicted"] == 1
    assert c.bytes <= c.max_bytes


def test_oversized_refused_and_older_copy_dropped() -> None:
    c, counts = lru(1000)
    c.set("a", b"small", 10, 100, 0)
    assert not c.set("a", b"huge", 5000, 100, 0)
    assert c.get("a", 0) is None  # reference W21: the old copy must not keep being served
    assert counts["oversized"] == 1
    assert c.bytes == 0


def test_expired_entries_leave_on_access() -> None:
    c, _ = lru(10_000)
    c.set("a", b"x", 1, expires_at=10, now=0)
    assert c.get("a", 10) is None
    assert len(c) == 0 and c.bytes == 0


def test_purge_expired() -> None:
    c, _ = lru(10_000)
    c.set("a", b"x", 1, expires_at=10, now=0)
    c.set("b", b"x", 1, expires_at=20, now=0)
    assert c.purge_expired(15) == 1
    assert c.keys() == ["b"]


def test_replace_updates_bytes() -> None:
    c, _ = lru(10_000)
    c.set("a", b"x", 100, 100, 0)
    c.set("a", b"y", 50, 100, 0)
    assert c.bytes == 50 + 1 + SLOT_OVERHEAD
    assert c.get("a", 0) == b"y"


def test_already_expired_value_not_stored() -> None:
    c, _ = lru(10_000)
    assert not c.set("a", b"x", 1, expires_at=5, now=10)
    assert len(c) == 0


def test_shrinking_the_budget_evicts_at_once() -> None:
    per = 100 + 1 + SLOT_OVERHEAD
    c, counts = lru(per * 3)
    for k in "abc":
        c.set(k, k.encode(), 100, 100, 0)
    c.resize(per)
    assert c.keys() == ["c"] and c.bytes == per
    assert counts["evicted"] == 2
