"""The tiered store: what the addon reads and writes, whatever tiers sit behind it.

A *resource* is everything cached for one primary key (one URL): its Vary variants, kept
together so that invalidation and purge reach all of them at once (spec §3, reference W14).
Values are immutable; a new variant produces a new Resource (copy on write).
"""

from __future__ import annotations

from dataclasses import dataclass

from .l1 import ByteLRU
from .metrics import Metrics
from .semantics import StoredResponse

# Keep at most this many variants per URL (most recent win): bounds Vary fragmentation.
MAX_VARIANTS = 16


@dataclass(frozen=True, slots=True)
class Resource:
    variants: tuple[StoredResponse, ...]

    def with_variant(self, entry: StoredResponse) -> Resource:
        """Replace the variant stored under the same Vary names/values (RFC 9111 §4.1)."""
        kept = [v for v in self.variants if v.vary != entry.vary]
        kept.append(entry)
        kept.sort(key=lambda v: v.response_time)
        return Resource(tuple(kept[-MAX_VARIANTS:]))

    def retain_until(self) -> float:
        return max(v.retain_until() for v in self.variants)

    def cost(self) -> int:
        return sum(v.cost() for v in self.variants)


@dataclass(frozen=True, slots=True)
class Lookup:
    resource: Resource
    tier: str  # "l1" (later "l2")


class TieredStore:
    """L1 only for now; L2 (Valkey) slots in behind the same async API."""

    def __init__(self, metrics: Metrics, l1_max_bytes: int) -> None:
        self.metrics = metrics
        self.l1: ByteLRU[Resource] = ByteLRU(
            l1_max_bytes,
            on_evict=lambda n: metrics.lru_evictions.inc(n),
            on_oversized=metrics.lru_oversized.inc,
        )

    def resize(self, l1_max_bytes: int) -> None:
        self.l1.max_bytes = l1_max_bytes
        self._update_gauges()

    async def get(self, key: str, now: float) -> Lookup | None:
        resource = self.l1.get(key, now)
        if resource is not None:
            self.metrics.l1_hits.inc()
            return Lookup(resource, "l1")
        return None

    async def put(self, key: str, entry: StoredResponse, now: float) -> bool:
        """Store one variant, keeping the URL's other variants. False if not kept anywhere."""
        current = self.l1.peek(key, now)
        resource = current.with_variant(entry) if current else Resource((entry,))
        stored = self.l1.set(key, resource, resource.cost(), resource.retain_until(), now)
        if stored:
            self.metrics.stores.labels("l1").inc()
        self._update_gauges()
        return stored

    async def replace(self, key: str, old: StoredResponse, new: StoredResponse, now: float) -> bool:
        """Swap one variant for its revalidated version (304 merge)."""
        return await self.put(key, new, now)

    async def delete(self, keys: list[str]) -> int:
        removed = sum(1 for key in keys if self.l1.delete(key))
        self._update_gauges()
        return removed

    async def clear(self) -> int:
        n = self.l1.clear()
        self._update_gauges()
        return n

    def purge_expired(self, now: float) -> int:
        n = self.l1.purge_expired(now)
        self._update_gauges()
        return n

    def _update_gauges(self) -> None:
        self.metrics.lru_bytes.set(self.l1.bytes)
        self.metrics.lru_entries.set(len(self.l1))
