"""The tiered store: L1 (in-process) in front of an optional L2 (Valkey ring).

A *resource* is everything cached for one primary key (one URL): its Vary variants, kept
together so that invalidation and purge reach all of them at once (spec §3, reference W14),
and so that they live on the same Valkey node. Values are immutable; a new variant produces a
new Resource (copy on write).

Tier rules (spec §4):
- read: L1, then L2; an L2 hit is copied into L1 for at most ``l1_ttl`` seconds. The entry's
  own freshness fields are never touched, so an L1 copy is never "staler" than L2 (W10).
- write: L2 and L1 (bounded by ``l1_ttl``); when L2 fails, L1 keeps it for its full retention.
- a Valkey error on read falls back to L1 (already consulted) and the request goes on as a miss;
  it never becomes a client error.
- when a node comes back, L1 copies of its keys are dropped: they may be fallback writes that
  would otherwise shadow newer L2 state (W28).
- coherence (``coherence.py``): with listeners on, every L1 copy knows its node and Valkey key;
  an invalidation from Valkey drops it, and a node whose listener is lost keeps no L1 copies.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from . import codec
from .coherence import NearCache
from .l1 import ByteLRU
from .metrics import Metrics
from .semantics import StoredResponse
from .valkey_tier import L2Error

log = logging.getLogger("mitmcache")

# Keep at most this many variants per URL (most recent win): bounds Vary fragmentation.
MAX_VARIANTS = 16
# Keys remembered in L1 per URL for invalidation (L2's index is the complete one).
MAX_INDEXED = 10000
# Hit-for-pass markers L1 remembers (oldest dropped first; L2 keeps its own until they expire).
MAX_PASSES = 65536
# Bytes the coherence bookkeeping of one L1 entry costs (its placement in NearCache; measured
# with tracemalloc: ~220), counted in L1's budget.
PLACEMENT_COST = 220


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
    tier: str  # "l1" or "l2"


@dataclass(frozen=True, slots=True)
class HitForPass:
    """Varnish's hit-for-pass: the key's last answer could not be stored or shared, so its
    requests go straight upstream until ``until`` (epoch seconds) — no L2 read, no lease, no
    waiting behind another request. ``reason``: the not-stored detail that set it. Stored under
    the key itself in both tiers, so the first storable answer (``put``) replaces it."""

    until: float
    reason: str
    tier: str = "l1"


class Lease(Enum):
    ACQUIRED = "acquired"  # we fetch, others wait for us
    HELD = "held"  # another proxy is fetching: wait for its fill
    UNAVAILABLE = "unavailable"  # no L2 (or it failed): coalesce in this proxy only


# How often a proxy waiting on another proxy's fill looks for it (jittered).
FILL_POLL_INTERVAL = 0.02


class SharedTier(Protocol):
    """A tier shared by every proxy (``ValkeyTier``): bytes under cache keys, fill leases.

    Every method raises ``L2Error`` when the tier cannot answer (callers fall back to L1).
    """

    def node_for(self, cache_key: str) -> Any: ...  # has .name: the node's URL (no credentials)

    async def get(self, cache_key: str) -> bytes | None: ...

    async def set(self, cache_key: str, value: bytes, ttl_ms: int, if_absent: bool = False) -> bool: ...

    async def delete(self, cache_keys: list[str]) -> None: ...

    async def index_add(self, base: str, cache_key: str, ttl_ms: int) -> None: ...

    async def index_pop(self, base: str) -> list[str]: ...

    def placement(self, cache_key: str) -> tuple[str, str]: ...  # (node name, Valkey key)

    async def group_add(self, group: str, cache_key: str, ttl_ms: int) -> bool: ...

    def group_scan(self, group: str) -> AsyncIterator[list[str]]: ...

    async def group_remove(self, group: str, cache_keys: list[str]) -> None: ...

    async def purge(self, cache_keys: list[str]) -> tuple[int, int]: ...

    def start_listeners(self, near: NearCache) -> None: ...

    async def acquire_lease(self, cache_key: str, token: str, ttl_ms: int, variant: str = "") -> bool: ...

    async def release_lease(self, cache_key: str, token: str, variant: str = "") -> None: ...

    async def poll_fill(self, cache_key: str, variant: str = "") -> tuple[bytes | None, bool]: ...

    async def clear(self) -> int: ...

    async def check(self) -> dict[str, str | None]: ...

    async def close(self) -> None: ...

    def members(self) -> dict[str, bool]: ...


class TieredStore:
    """L1 in front of an optional shared tier. Callers use these methods only; the tiers
    themselves are private."""

    def __init__(self, metrics: Metrics, l1_max_bytes: int, l1_ttl: float = 60.0) -> None:
        self.metrics = metrics
        self.l1_ttl = l1_ttl
        self._l2: SharedTier | None = None
        # URL key → keys that also hold request values (key_headers): what invalidation reaches.
        self._indexes: dict[str, set[str]] = {}
        self._passes: dict[str, HitForPass] = {}
        self._decoded = codec.DecodeMemo()
        # Coherence of L1 with L2 (listeners run when L2 is attached and coherence is on).
        self.coherence = True
        # Seconds L1 may keep this proxy's own write of a key whose node is unreachable (no
        # listener can tell it about changes): protects the origin while bounding staleness.
        self.l1_fallback_ttl = 5.0
        self.near = NearCache(metrics, self.delete_l1)
        self._l1: ByteLRU[Resource] = ByteLRU(
            l1_max_bytes,
            on_evict=lambda n: metrics.lru_evictions.inc(n),
            on_oversized=metrics.lru_oversized.inc,
            on_remove=self.near.removed,
        )

    # ------------------------------------------------------------------ configuration

    def resize(self, l1_max_bytes: int) -> None:
        self._l1.resize(l1_max_bytes)
        self._update_gauges()

    def set_l1_ttl(self, seconds: float) -> None:
        """Near-cache bound: how long an L1 copy of an L2 entry may live (0: L1 only as fallback)."""
        self.l1_ttl = seconds

    def attach_l2(self, tier: SharedTier | None) -> SharedTier | None:
        """Use ``tier`` as L2 (None: L1 only); returns the previous tier for the caller to close.
        L1 starts over: its copies belonged to the old ring."""
        old, self._l2 = self._l2, tier
        if old is not None or tier is not None:
            self._l1.clear()
            self._update_gauges()
        self.near.reset(tier is not None and self.coherence, len(tier.members()) if tier is not None else 0)
        return old

    def set_coherence(self, on: bool) -> None:
        """Invalidation listeners on or off (``cache_l1_invalidation``); takes effect with the
        next ``attach_l2`` (the Storage addon re-attaches)."""
        self.coherence = on

    def start_coherence(self) -> None:
        """Start the invalidation listeners (needs the running loop; idempotent)."""
        if self._l2 is not None and self.near.enabled:
            self._l2.start_listeners(self.near)

    @property
    def l2(self) -> SharedTier | None:
        return self._l2

    @property
    def has_l2(self) -> bool:
        return self._l2 is not None

    def l1_stats(self) -> dict[str, int]:
        return {"l1_entries": len(self._l1), "l1_bytes": self._l1.bytes, "l1_max_bytes": self._l1.max_bytes}

    def members(self) -> dict[str, bool]:
        """Ring nodes and whether each is up (empty without L2)."""
        return self._l2.members() if self._l2 else {}

    def peek(self, key: str, now: float) -> Resource | None:
        """What L1 holds for ``key``, without touching recency (inspection)."""
        return self._l1.peek(key, now)

    # ------------------------------------------------------------------ read

    async def get(
        self, key: str, now: float, skip_l1: bool = False, l1_ttl: float | None = None
    ) -> Lookup | HitForPass | None:
        """L1, then L2. ``skip_l1`` asks L2 directly: an L1 copy may be older than L2's
        (another proxy revalidated it), which matters before revalidating ourselves.
        ``l1_ttl``: the near-cache bound for an L2 hit (an operator rule), else the store's.
        A hit-for-pass marker (from either tier) is returned as it is."""
        if not skip_l1:
            marker = self._passes.get(key)
            if marker is not None:
                if marker.until > now:
                    return marker
                del self._passes[key]
            resource = self._l1.get(key, now)
            if resource is not None:
                self.metrics.l1_hits.inc()
                return Lookup(resource, "l1")
        if self._l2 is None:
            return None
        node, vkey = self._l2.placement(key)
        flight = self.near.begin(vkey, node)
        try:
            data = await self._l2.get(key)
        except L2Error as e:
            self.near.end(flight)
            self.metrics.valkey_get_fallback.inc()
            log.debug(f"mitmcache: L2 get fell back to L1: {e}")
            return None
        keep = self.near.end(flight)  # False: invalidated while the GET was on its way
        if data is None:
            self.metrics.valkey_miss.inc()
            return None
        decoded = self._decode(key, data)
        if decoded is None:
            return None
        if isinstance(decoded, HitForPass):
            if decoded.until <= now:
                return None
            self._remember_pass(key, decoded)
            return decoded
        resource = decoded
        self.metrics.l2_hits.inc()
        if keep:
            self._near_cache(key, resource, now, l1_ttl)
        return Lookup(resource, "l2")

    # ------------------------------------------------------------------ write

    async def put(
        self,
        key: str,
        entry: StoredResponse,
        now: float,
        base: Resource | None = None,
        l1_ttl: float | None = None,
        index: str | None = None,
        groups: tuple[str, ...] = (),
    ) -> Resource | None:
        """Store one variant next to the URL's other variants (``base``: what the request saw).

        ``l1_ttl``: this entry's near-cache bound in seconds (an operator rule), else the
        store's. ``index``: the URL's key when ``key`` also holds request values (an operator
        rule's key_headers), so that invalidating the URL reaches it. ``groups``: the purge
        groups listing the key (``tag:…``, ``host:…``). Returns the stored resource, or None if
        no tier kept it.
        """
        current = base or self._l1.peek(key, now)
        resource = current.with_variant(entry) if current else Resource((entry,))
        return await self.write(key, resource, now, l1_ttl, index, groups)

    async def write(
        self,
        key: str,
        resource: Resource,
        now: float,
        l1_ttl: float | None = None,
        index: str | None = None,
        groups: tuple[str, ...] = (),
    ) -> Resource | None:
        """Write a whole resource to both tiers (``put``; soft purge rewrites through here).
        ``groups``: the purge groups (tags, host) that list the key in L2."""
        self._passes.pop(key, None)  # a storable answer ends hit-for-pass (L2: overwritten below)
        retain = resource.retain_until()
        if index is not None:
            await self._index(index, key, retain, now)
        if self._l2 is not None:
            node, vkey = self._l2.placement(key)
            flight = self.near.begin(vkey, node)
            self.near.expect_own(vkey)  # our own SET must not evict the copy we keep
            write = self._l2.set(key, codec.encode(resource.variants, key), math.ceil((retain - now) * 1000))
            try:
                if groups:  # the purge indexes are written alongside (other nodes, same time)
                    await asyncio.gather(write, self._group_add(groups, key, retain, now))
                else:
                    await write
            except L2Error as e:
                self.near.cancel_own(vkey)
                self.near.end(flight)
                self.metrics.valkey_set_fallback.inc()
                log.debug(f"mitmcache: L2 set fell back to L1: {e}")
            else:
                self.metrics.stores.labels("l2").inc()
                near = self.l1_ttl if l1_ttl is None else l1_ttl
                if near <= 0 or not self.near.end(flight):
                    self._l1.delete(key)  # L1 only as fallback, or invalidated meanwhile: never shadow L2
                    self._update_gauges()
                else:
                    self._near_cache(key, resource, now, near)
                return resource
        return resource if self._l1_set(key, resource, retain, now, fallback=True) else None

    async def _group_add(self, groups: tuple[str, ...], key: str, retain: float, now: float) -> None:
        assert self._l2 is not None
        ttl_ms = math.ceil((retain - now) * 1000)
        results = await asyncio.gather(
            *(self._l2.group_add(g, key, ttl_ms) for g in groups), return_exceptions=True
        )
        for group, result in zip(groups, results):
            if isinstance(result, L2Error):
                log.debug(f"mitmcache: L2 group index add failed ({group}): {result}")
            elif result is False:
                kind = group.partition(":")[0]
                self.metrics.index_full.labels(kind if kind in ("tag", "host") else "tag").inc()
                log.warning(f"mitmcache: purge index {group!r} is full; {key!r} is purgeable by URL only")
            elif isinstance(result, BaseException):
                raise result

    def _near_cache(self, key: str, resource: Resource, now: float, l1_ttl: float | None = None) -> None:
        """Keep a copy of what L2 holds in L1 for at most ``l1_ttl`` seconds (never past the
        entry's own retention; its freshness fields are untouched: W10)."""
        near = self.l1_ttl if l1_ttl is None else l1_ttl
        if near > 0:
            self._l1_set(key, resource, min(now + near, resource.retain_until()), now)

    def _l1_set(self, key: str, resource: Resource, expires_at: float, now: float, fallback: bool = False) -> bool:
        """Keep ``resource`` in L1 until ``expires_at``. While the key's node has no
        invalidation listener, a copy of L2 state is refused, and a ``fallback`` write (L2
        refused it) is kept at most ``l1_fallback_ttl`` seconds; the listener's return drops it."""
        placed = self._l2.placement(key) if self._l2 is not None and self.near.enabled else None
        if placed is not None and not self.near.coherent(placed[0]):
            if not fallback or self.l1_fallback_ttl <= 0:
                self._l1.delete(key)
                self._update_gauges()
                return False
            expires_at = min(expires_at, now + self.l1_fallback_ttl)
        cost = resource.cost() + (PLACEMENT_COST if placed is not None else 0)
        stored = self._l1.set(key, resource, cost, expires_at, now)
        if stored:
            self.metrics.stores.labels("l1").inc()
            if placed is not None:
                self.near.placed(key, *placed)
        self._update_gauges()
        return stored

    async def mark_pass(self, key: str, marker: HitForPass, now: float) -> None:
        """Send ``key``'s requests straight upstream until ``marker.until``, in this proxy (L1)
        and, through L2, in every other one that looks the key up.

        A URL with something stored is never marked: a passed request's unshareable answer can
        arrive after another passed request's storable one was stored (the caller saw nothing
        stored when it looked). So no marker beside an L1 entry, and in L2 only where the key
        holds nothing (``SET NX``: never over another proxy's entry; a live L2 marker is left
        to expire rather than renewed)."""
        if self._l1.peek(key, now) is not None:
            return
        self._remember_pass(key, marker)
        self.metrics.hit_for_pass.labels("marked").inc()
        if self._l2 is not None:
            try:
                written = await self._l2.set(
                    key, codec.encode_pass(key, marker.until, marker.reason), math.ceil((marker.until - now) * 1000),
                    if_absent=True,
                )
                if not written:  # a marker there (renewal: it runs out on its own), or an entry
                    data = await self._l2.get(key)
                    if data is not None and not codec.is_pass_marker(data):
                        self._passes.pop(key, None)  # an entry stored meanwhile: looked up, not passed
            except L2Error as e:
                log.debug(f"mitmcache: L2 hit-for-pass marker not written: {e}")

    def pass_marker(self, key: str, now: float) -> HitForPass | None:
        """This proxy's live hit-for-pass marker for ``key`` (L1 only: no I/O), else None."""
        marker = self._passes.get(key)
        if marker is None or marker.until > now:
            return marker
        del self._passes[key]
        return None

    def pass_left(self, key: str, now: float) -> float:
        """Seconds left of this proxy's hit-for-pass marker for ``key`` (0: none)."""
        marker = self._passes.get(key)
        return max(0.0, marker.until - now) if marker is not None else 0.0

    def _remember_pass(self, key: str, marker: HitForPass) -> None:
        if key not in self._passes and len(self._passes) >= MAX_PASSES:
            del self._passes[next(iter(self._passes))]  # the oldest
        self._passes[key] = HitForPass(marker.until, marker.reason, "l1")

    def l1_coherent(self, key: str) -> bool:
        """May L1 hold ``key`` now? (False while its node's invalidation listener is lost.)"""
        if self._l2 is None or not self.near.enabled:
            return True
        return self.near.coherent(self._l2.placement(key)[0])

    def _decode(self, key: str, data: bytes) -> Resource | HitForPass | None:
        try:
            if codec.is_pass_marker(data):
                until, reason = codec.decode_pass(data, key)
                return HitForPass(until, reason, "l2")
            return Resource(self._decoded.decode(data, key))
        except codec.DecodeError as e:
            self.metrics.valkey_decode_errors.inc()
            self.metrics.bad_input.labels("valkey-value").inc()
            log.warning(f"mitmcache: undecodable Valkey value for {key} ({e}); treated as a miss")
            return None

    # ------------------------------------------------------------------ fill leases (spec §5)

    async def acquire_lease(self, key: str, token: str, ttl_ms: int, variant: str = "") -> Lease:
        """The fill lease of ``key`` (one per Vary ``variant``) across proxies."""
        if self._l2 is None:
            return Lease.UNAVAILABLE
        try:
            return Lease.ACQUIRED if await self._l2.acquire_lease(key, token, ttl_ms, variant) else Lease.HELD
        except L2Error as e:
            log.debug(f"mitmcache: lease unavailable, coalescing locally: {e}")
            return Lease.UNAVAILABLE

    async def release_lease(self, key: str, token: str, variant: str = "") -> None:
        if self._l2 is None:
            return
        try:
            await self._l2.release_lease(key, token, variant)
        except L2Error as e:
            log.debug(f"mitmcache: lease release failed (it will expire): {e}")

    async def wait_for_fill(
        self, key: str, timeout: float, known: Resource | None = None, variant: str = ""
    ) -> tuple[Resource | None, str]:
        """Wait for another proxy's fill of ``key``: (resource, "filled"), or (None, why not).

        A value no newer than ``known`` (the stale copy being revalidated) does not count.
        Ends early when the lease disappears without a new value (that fetch was not shareable
        or failed): then the caller fetches itself instead of waiting out the lease.
        """
        newest_known = max((v.response_time for v in known.variants), default=0.0) if known else 0.0
        if self._l2 is None:
            return None, "unavailable"
        deadline = time.monotonic() + timeout
        node, vkey = self._l2.placement(key)
        while True:
            flight = self.near.begin(vkey, node)
            try:
                data, held = await self._l2.poll_fill(key, variant)
            except L2Error:
                self.near.end(flight)
                return None, "unavailable"
            keep = self.near.end(flight)
            if data is not None:
                resource = self._decode(key, data)
                if isinstance(resource, HitForPass):
                    return None, "released"  # that fetch was not shareable: fetch ourselves now
                if resource is not None and max(v.response_time for v in resource.variants) > newest_known:
                    if keep:
                        self._near_cache(key, resource, time.time())
                    return resource, "filled"
            if not held:
                return None, "released"
            if time.monotonic() >= deadline:
                return None, "timeout"
            await asyncio.sleep(FILL_POLL_INTERVAL * (0.5 + random.random()))

    async def _index(self, index: str, key: str, retain: float, now: float) -> None:
        members = self._indexes.setdefault(index, set())
        if len(members) < MAX_INDEXED:
            members.add(key)
        if self._l2 is not None:
            try:
                await self._l2.index_add(index, key, math.ceil((retain - now) * 1000))
            except L2Error as e:
                log.debug(f"mitmcache: L2 index add failed: {e}")

    def expand_l1(self, keys: list[str]) -> list[str]:
        """``keys`` plus the keys L1's index records under them (nothing dropped)."""
        out = list(keys)
        for key in keys:
            out += [m for m in self._indexes.get(key, ()) if m not in out]
        return out

    async def expand(self, keys: list[str]) -> list[str]:
        """``keys`` plus every key recorded under them (``put(index=…)``), indexes dropped."""
        out = self.expand_l1(keys)
        for key in keys:
            self._indexes.pop(key, None)
            if self._l2 is not None:
                try:
                    members = await self._l2.index_pop(key)
                except L2Error as e:
                    log.warning(f"mitmcache: L2 index read failed; entries keyed by request values may linger: {e}")
                    continue
                out += [m for m in members if m not in out]
        return out

    # ------------------------------------------------------------------ invalidate

    async def delete(self, keys: list[str]) -> int:
        """Invalidate in both tiers, with every key recorded under them; returns how many keys
        L1 held."""
        keys = await self.expand(keys)
        removed = self.delete_l1(keys)
        await self.delete_l2(keys)
        return removed

    # ------------------------------------------------------------------ purge (purge.py drives these)

    async def purge(self, keys: list[str]) -> tuple[int, int]:
        """Delete ``keys`` (and the keys their URL index records) in both tiers: (keys that
        were cached, in L2 or else in L1; keys aimed at down nodes, deleted when they return).
        Other proxies' L1 copies go through their invalidation listeners."""
        keys = await self.expand(keys)
        in_l1 = self.delete_l1(keys)
        if self._l2 is None:
            return in_l1, 0
        deleted, pending = await self._l2.purge(keys)
        return max(deleted, in_l1), pending

    async def soft_purge(self, keys: list[str], now: float, expire: Callable[[Any, float], Any]) -> tuple[int, int]:
        """Mark every variant of ``keys`` (and their indexed keys) stale with ``expire(entry,
        now)`` and write them back, so stale-while-revalidate / stale-if-error still apply;
        an entry with nothing left to be stale for is deleted. A key whose node is down is
        deleted when it returns (a soft purge degrades to a hard one). Returns as ``purge``."""
        keys = await self.expand(keys)
        done = pending = 0
        for key in keys:
            resource: Resource | None = None
            if self._l2 is not None:
                try:
                    data = await self._l2.get(key)
                except L2Error:
                    self._l1.delete(key)
                    d, p = await self._l2.purge([key])
                    done, pending = done + d, pending + p
                    continue
                decoded = self._decode(key, data) if data is not None else None
                resource = decoded if isinstance(decoded, Resource) else None  # a marker: nothing stored
            else:
                resource = self._l1.peek(key, now)
            if resource is None:
                self._l1.delete(key)
                continue
            stale = Resource(tuple(expire(v, now) for v in resource.variants))
            done += 1
            if stale.retain_until() <= now:
                self._l1.delete(key)
                if self._l2 is not None:
                    pending += (await self._l2.purge([key]))[1]
            else:
                await self.write(key, stale, now)
        self._update_gauges()
        return done, pending

    async def group_members(self, group: str) -> AsyncIterator[list[str]]:
        """The keys L2 lists under a purge group, in batches (nothing without L2).
        Raises L2Error when the group's node cannot answer."""
        if self._l2 is None:
            return
        async for batch in self._l2.group_scan(group):
            yield batch

    async def group_forget(self, group: str, keys: list[str]) -> None:
        if self._l2 is not None and keys:
            try:
                await self._l2.group_remove(group, keys)
            except L2Error as e:
                log.debug(f"mitmcache: group index cleanup failed ({group}): {e}")

    async def l1_keys(self, now: float, match: Callable[[str, Resource], bool]) -> list[str]:
        """L1's keys whose entries ``match`` (purge by tag or prefix also reaches entries that
        only L1 holds: L1-only mode, fallback writes), in slices (no stall)."""
        out = []
        for i, key in enumerate(self._l1.keys()):
            resource = self._l1.peek(key, now)
            if resource is not None and match(key, resource):
                out.append(key)
            if i % 500 == 499:
                await asyncio.sleep(0)
        return out

    def delete_l1(self, keys: list[str]) -> int:
        for key in keys:
            self._passes.pop(key, None)
        removed = sum(1 for key in keys if self._l1.delete(key))
        self._update_gauges()
        return removed

    async def delete_l2(self, keys: list[str]) -> None:
        if self._l2 is not None:
            try:
                await self._l2.delete(keys)
            except L2Error as e:
                log.warning(f"mitmcache: L2 delete failed, will retry when the node returns: {e}")

    async def clear_l2(self) -> int:
        """Delete every key under the prefix in L2 (SCAN + DEL per node); returns the count."""
        return await self._l2.clear() if self._l2 is not None else 0

    async def peek_l2(self, key: str) -> Resource | None:
        """What L2 holds for ``key`` (inspection: no near-cache copy, errors are None)."""
        if self._l2 is None:
            return None
        try:
            data = await self._l2.get(key)
        except L2Error:
            return None
        resource = self._decode(key, data) if data is not None else None
        return resource if isinstance(resource, Resource) else None

    async def check_l2(self) -> dict[str, str | None]:
        """PING each L2 node once: name → None if up, else the error (start-up report)."""
        return await self._l2.check() if self._l2 is not None else {}

    async def close(self) -> None:
        old = self.attach_l2(None)
        if old is not None:
            await old.close()

    def clear_l1(self) -> int:
        self._indexes.clear()
        self._passes.clear()
        n = self._l1.clear()
        self._update_gauges()
        return n

    async def forget_node(self, node_name: str) -> None:
        """Drop L1 copies of keys owned by a node that just came back (in slices: no stall)."""
        if self._l2 is None:
            return
        dropped = 0
        for i, key in enumerate(self._l1.keys()):
            if self._l2.node_for(key).name == node_name and self._l1.delete(key):
                dropped += 1
            if i % 1000 == 999:
                await asyncio.sleep(0)
        self._update_gauges()
        log.info(f"mitmcache: dropped {dropped} L1 entries owned by {node_name} after it returned")

    async def purge_expired(self, now: float) -> int:
        """Drop expired L1 entries, in slices so a large L1 never stalls the event loop."""
        for key in [k for k, m in self._passes.items() if m.until <= now]:
            del self._passes[key]
        n = 0
        keys = self._l1.keys()
        for start in range(0, len(keys), 1000):
            n += self._l1.purge_expired(now, keys[start : start + 1000])
            await asyncio.sleep(0)
        self._update_gauges()
        return n

    def _update_gauges(self) -> None:
        self.metrics.lru_bytes.set(self._l1.bytes)
        self.metrics.lru_entries.set(len(self._l1))
