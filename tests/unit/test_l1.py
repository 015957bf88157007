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


def test_accounted_bytes_track_real_memory() -> None:
    """cache_l1_max_bytes bounds what entries really cost (tracemalloc), not just bodies."""
    import os
    import time
    import tracemalloc

    from mitmcache import semantics as sem
    from mitmcache.store import Resource

    headers = [("Date", "Sun, 29 Nov 2026 03:12:06 GMT"), ("Cache-Control", "public, max-age=300"),
               ("Content-Type", "text/html; charset=utf-8"), ("ETag", '"abcdef123456"'),
               ("Server", "nginx"), ("X-Request-Id", "0123456789abcdef"), ("Vary", "Accept-Encoding")]
    for body_size, count in ((0, 2000), (1024, 2000), (100_000, 100)):
        c: ByteLRU[Resource] = ByteLRU(10**12)
        now = time.time()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i in range(count):
            e = sem.make_stored_response(200, "OK", [("Accept-Encoding", "gzip")], headers, os.urandom(body_size), now, now)
            r = Resource((e,))
            c.set(f"https://example.com/some/path/{i}?q=1", r, r.cost(), now + 100, now)
        real = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
        tracemalloc.stop()
        assert 0.9 < c.bytes / real < 1.6, (body_size, c.bytes, real)
