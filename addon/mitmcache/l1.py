"""L1: an in-process, byte-bounded LRU of immutable values.

Single-threaded by design: mitmproxy runs every hook on one asyncio loop, so no locks.
Every operation is O(1) except ``purge_expired``, which a background task calls rarely.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")

# What a slot costs beyond the value itself: key str, OrderedDict node, _Slot object.
SLOT_OVERHEAD = 200


@dataclass(frozen=True, slots=True)
class _Slot(Generic[V]):
    value: V
    cost: int
    expires_at: float


class ByteLRU(Generic[V]):
    """LRU bounded by the summed ``cost`` of its values, with per-value expiry."""

    def __init__(
        self,
        max_bytes: int,
        on_evict: Callable[[int], None] | None = None,
        on_oversized: Callable[[], None] | None = None,
        on_remove: Callable[[str], None] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self._slots: OrderedDict[str, _Slot[V]] = OrderedDict()
        self._bytes = 0
        self._on_evict = on_evict or (lambda n: None)
        self._on_oversized = on_oversized or (lambda: None)
        # Told every key that leaves (deleted, evicted, expired, replaced, cleared).
        self._on_remove = on_remove or (lambda key: None)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: str) -> bool:
        return key in self._slots

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str, now: float) -> V | None:
        """The value, or None if absent or expired (an expired value leaves on access)."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        if slot.expires_at <= now:
            self._remove(key)
            return None
        self._slots.move_to_end(key)
        return slot.value

    def peek(self, key: str, now: float) -> V | None:
        """Like get, without touching recency (for read-modify-write of a key)."""
        slot = self._slots.get(key)
        if slot is None or slot.expires_at <= now:
            return None
        return slot.value

    def set(self, key: str, value: V, cost: int, expires_at: float, now: float) -> bool:
        """Store ``value``; False if it can never fit (any older copy is dropped, fixing W21)."""
        total = cost + len(key) + SLOT_OVERHEAD
        if key in self._slots:
            self._remove(key)
        if total > self.max_bytes:
            self._on_oversized()
            return False
        if expires_at <= now:
            return False
        self._slots[key] = _Slot(value, total, expires_at)
        self._bytes += total
        evicted = 0
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._slots))
            self._remove(oldest)
            evicted += 1
        if evicted:
            self._on_evict(evicted)
        return True

    def delete(self, key: str) -> bool:
        if key in self._slots:
            self._remove(key)
            return True
        return False

    def clear(self) -> int:
        n = len(self._slots)
        for key in self._slots:
            self._on_remove(key)
        self._slots.clear()
        self._bytes = 0
        return n

    def purge_expired(self, now: float, keys: list[str] | None = None) -> int:
        """Remove expired values (among ``keys`` if given, so callers can work in slices)."""
        candidates = self._slots.keys() if keys is None else keys
        expired = [k for k in candidates if (s := self._slots.get(k)) is not None and s.expires_at <= now]
        for key in expired:
            self._remove(key)
        return len(expired)

    def resize(self, max_bytes: int) -> None:
        """Change the budget; a smaller one evicts least recently used values at once."""
        self.max_bytes = max_bytes
        evicted = 0
        while self._bytes > self.max_bytes and self._slots:
            self._remove(next(iter(self._slots)))
            evicted += 1
        if evicted:
            self._on_evict(evicted)

    def keys(self) -> list[str]:
        return list(self._slots)

    def _remove(self, key: str) -> None:
        slot = self._slots.pop(key)
        self._bytes -= slot.cost
        self._on_remove(key)
