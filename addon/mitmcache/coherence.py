"""Near-cache coherence: every proxy's L1 learns within milliseconds that a key it holds was
written, deleted or expired in Valkey by anyone, and drops its copy.

Mechanism (Valkey's server-assisted client-side caching, broadcasting mode): one dedicated
connection per ring node runs ``CLIENT TRACKING on REDIRECT <its own id> BCAST PREFIX
<prefix>:r1:`` and ``SUBSCRIBE __redis__:invalidate`` (RESP2). From then on the node pushes the
name of every value key under the prefix that anybody modifies (SET, DEL, UNLINK, expiry,
eviction; ``null`` for FLUSHALL) down that connection. Only value keys are tracked, not leases
or indexes. Why this over plain pub/sub: no extra PUBLISH per write, and writes that bypass the
proxies (another fleet's ``cache.clear``, an operator's ``DEL``, eviction) are seen too; the
README gives the measurements.

Hygiene, after Valkey's client-side-caching guide:
- a listener that drops, fails to connect, or misses its PING deadline makes the node
  *incoherent*: every L1 entry that maps to it is dropped at once and no new L1 copy of its keys
  is kept until the listener is subscribed again (``NearCache.coherent``);
- ``cache_l1_ttl`` stays as a backstop bound on every L1 copy;
- a proxy's own writes must not evict what it just stored: before each SET the store says it
  expects one invalidation for that key (``expect_own``); the first matching one is swallowed.
  When another proxy's invalidation happens to be swallowed instead, ours arrives later and
  drops the copy — the error is always towards dropping;
- a read or write racing with an invalidation of its key (the GET answered before the
  invalidation arrived on the other connection) does not leave an L1 copy: ``begin``/``end``
  bracket each L2 round trip and ``end`` is False when the key (or its node) was invalidated
  meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import valkey.asyncio as valkey_async
from .metrics import Metrics

log = logging.getLogger("mitmcache")

CHANNEL = b"__redis__:invalidate"
PING_INTERVAL = 0.5  # seconds between two PINGs on an idle listener
PING_DEADLINE = 1.5  # seconds a PING may go unanswered before the listener counts as lost
RECONNECT_DELAY = 0.25  # seconds before reconnecting a lost listener (doubles up to 2 s)
OWN_WRITE_WINDOW = 5.0  # seconds an expected own invalidation is waited for


@dataclass(frozen=True, slots=True)
class Flight:
    """One L2 round trip of a key, for ``NearCache.end``."""

    vkey: str
    node: str
    epoch: int
    generation: int


class NearCache:
    """Which L1 keys map to which node and Valkey key, which nodes are coherent, and the
    bookkeeping that keeps own writes and racing reads right. No I/O.

    ``drop(keys)`` is the store's callback that removes L1 entries (returns how many it held).
    """

    def __init__(self, metrics: Metrics, drop: Callable[[list[str]], int]) -> None:
        self.metrics = metrics
        self._drop = drop
        self.enabled = False  # listeners run (L2 configured and cache_l1_invalidation on)
        self._nodes = 0
        self._coherent: set[str] = set()
        self._generation: dict[str, int] = {}
        self._by_vkey: dict[str, str] = {}  # Valkey key -> L1 key
        self._placed: dict[str, tuple[str, str]] = {}  # L1 key -> (node, Valkey key)
        self._own: dict[str, list[float]] = {}  # Valkey key -> sent-at of own writes not yet echoed
        self._flights: dict[str, list[int]] = {}  # Valkey key -> [round trips in flight, epoch]

    # ------------------------------------------------------------------ state

    def reset(self, enabled: bool, nodes: int = 0) -> None:
        """A new ring of ``nodes`` nodes (or coherence switched): nothing is coherent until its
        listener says so."""
        self.enabled = enabled
        self._nodes = nodes if enabled else 0
        self._coherent.clear()
        self._gauges()
        self._by_vkey.clear()
        self._placed.clear()
        self._own.clear()
        self._flights.clear()

    def coherent(self, node: str) -> bool:
        """May L1 keep copies of this node's keys? Always, when coherence is off."""
        return not self.enabled or node in self._coherent

    def placed(self, key: str, node: str, vkey: str) -> None:
        """An L1 entry for ``key`` now exists; remember where its key lives."""
        if not self.enabled:
            return
        self._placed[key] = (node, vkey)
        self._by_vkey[vkey] = key

    def removed(self, key: str) -> None:
        """L1 no longer holds ``key`` (deleted, evicted, expired)."""
        placed = self._placed.pop(key, None)
        if placed is not None and self._by_vkey.get(placed[1]) == key:
            del self._by_vkey[placed[1]]

    def cleared(self) -> None:
        self._placed.clear()
        self._by_vkey.clear()

    # ------------------------------------------------------------------ own writes, races

    def expect_own(self, vkey: str) -> None:
        """We are about to write ``vkey``: swallow the invalidation that write causes."""
        if self.enabled:
            self._own.setdefault(vkey, []).append(time.monotonic())

    def cancel_own(self, vkey: str) -> None:
        """The write failed: expect no invalidation from it (one that comes anyway drops the copy)."""
        pending = self._own.get(vkey)
        if pending:
            pending.pop()
            if not pending:
                del self._own[vkey]

    def begin(self, vkey: str, node: str) -> Flight:
        """An L2 round trip for ``vkey`` starts (GET, or SET of a new value)."""
        flight = self._flights.setdefault(vkey, [0, 0])
        flight[0] += 1
        return Flight(vkey, node, flight[1], self._generation.get(node, 0))

    def end(self, f: Flight) -> bool:
        """The round trip ended: True if L1 may keep what it read or wrote (no invalidation of
        the key, no loss of its node's listener meanwhile, and the node is coherent)."""
        flight = self._flights.get(f.vkey)
        epoch = flight[1] if flight else f.epoch
        if flight is not None:
            flight[0] -= 1
            if flight[0] <= 0:
                del self._flights[f.vkey]
        return epoch == f.epoch and self._generation.get(f.node, 0) == f.generation and self.coherent(f.node)

    # ------------------------------------------------------------------ events from listeners

    def invalidated(self, node: str, vkeys: list[bytes] | None, received: float) -> int:
        """Keys of ``node`` were modified in Valkey (None: the node was flushed). Returns the L1
        entries dropped."""
        if vkeys is None:
            return self.flush(node, "flushall")
        self.metrics.invalidations_received.inc(len(vkeys))
        now = time.monotonic()
        doomed = []
        for raw in vkeys:
            vkey = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)
            pending = self._own.get(vkey)
            if pending:
                sent = pending.pop(0)
                if not pending:
                    del self._own[vkey]
                if now - sent <= OWN_WRITE_WINDOW:
                    # Our own write coming back: its delay is the channel's delay.
                    self.metrics.invalidation_delay.observe(max(0.0, received - sent))
                    continue
            flight = self._flights.get(vkey)
            if flight is not None:
                flight[1] += 1
            key = self._by_vkey.get(vkey)
            if key is not None:
                doomed.append(key)
        dropped = self._drop(doomed) if doomed else 0
        if dropped:
            self.metrics.invalidation_drops.labels("key").inc(dropped)
        return dropped

    def lost(self, node: str, why: str) -> int:
        """The node's listener is gone: L1 keeps nothing of the node until it is back."""
        self._coherent.discard(node)
        self._gauges()
        return self.flush(node, why)

    def restored(self, node: str) -> int:
        """The node's listener is subscribed again: drop what might have been missed, then trust it."""
        dropped = self.flush(node, "restored")
        self._coherent.add(node)
        self._gauges()
        return dropped

    def _gauges(self) -> None:
        self.metrics.listeners.labels("up").set(len(self._coherent))
        self.metrics.listeners.labels("down").set(max(0, self._nodes - len(self._coherent)))

    def flush(self, node: str, why: str) -> int:
        """Drop every L1 entry that maps to ``node`` (and void its round trips in flight)."""
        self._generation[node] = self._generation.get(node, 0) + 1
        self._own = {}  # expectations may never be echoed now; unknown echoes only drop more
        doomed = [key for key, (n, _) in self._placed.items() if n == node]
        dropped = self._drop(doomed) if doomed else 0
        self.metrics.listener_flushes.inc()
        if dropped:
            self.metrics.invalidation_drops.labels("flush").inc(dropped)
            log.info(f"mitmcache: dropped {dropped} L1 entries of {node} ({why})")
        return dropped


class Listener:
    """The invalidation connection of one node: connect, track, subscribe, read, PING; on any
    failure tell ``NearCache`` (the node's L1 entries go) and reconnect with backoff."""

    def __init__(self, name: str, connect_kwargs: dict[str, Any], tls: bool, prefix: str, near: NearCache,
                 metrics: Metrics) -> None:
        self.name = name
        self._kwargs = connect_kwargs
        self._tls = tls
        self._prefix = f"{prefix}:r1:"
        self._near = near
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self.subscribed = False
        self._warned = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"mitmcache listener {self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self._disconnect()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except Exception:  # a broken connection must not stop shutdown
                pass

    async def _run(self) -> None:
        delay = RECONNECT_DELAY
        first = True
        while True:
            try:
                await self._subscribe()
                if not first:
                    self._metrics.listener_reconnects.inc()
                first = False
                delay = RECONNECT_DELAY
                self._near.restored(self.name)
                self.subscribed = True
                self._warned = False
                await self._read()
            except Exception as e:  # whatever it was, the node's copies can no longer be trusted
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if self.subscribed:
                    log.warning(f"mitmcache: invalidation listener of {self.name} lost ({why}); "
                                "its keys skip L1 until it is back")
                elif not self._warned:
                    log.warning(f"mitmcache: invalidation listener of {self.name} cannot subscribe ({why}); "
                                "its keys skip L1 until it can")
                self._warned = True
                self.subscribed = False
                self._near.lost(self.name, why)
                await self._disconnect()
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _subscribe(self) -> None:
        cls = valkey_async.SSLConnection if self._tls else valkey_async.Connection
        conn = self._conn = cls(**self._kwargs)
        await asyncio.wait_for(conn.connect(), PING_DEADLINE)
        cid = await self._call(conn, "CLIENT", "ID")
        await self._call(conn, "CLIENT", "SETNAME", "mitmcache-invalidation")
        await self._call(conn, "CLIENT", "TRACKING", "on", "REDIRECT", str(cid), "BCAST", "PREFIX", self._prefix)
        reply = await self._call(conn, "SUBSCRIBE", CHANNEL)
        if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
            raise ListenerLost(f"unexpected SUBSCRIBE reply {reply!r}")

    @staticmethod
    async def _call(conn: Any, *args: Any) -> Any:
        await conn.send_command(*args)
        reply = await asyncio.wait_for(conn.read_response(), PING_DEADLINE)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _read(self) -> None:
        conn = self._conn
        ping_sent: float | None = None
        last_ping = time.monotonic()
        while True:
            msg = await conn.read_response(timeout=PING_INTERVAL)
            now = time.monotonic()
            if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message" and msg[1] == CHANNEL:
                keys = msg[2]
                self._near.invalidated(self.name, keys if isinstance(keys, list) else None, now)
            elif isinstance(msg, list) and msg and msg[0] == b"pong":
                ping_sent = None
            if ping_sent is not None and now - ping_sent > PING_DEADLINE:
                raise ListenerLost(f"no PONG within {PING_DEADLINE}s")
            if ping_sent is None and now - last_ping >= PING_INTERVAL:
                await asyncio.wait_for(conn.send_command("PING"), PING_DEADLINE)
                ping_sent = last_ping = now


class ListenerLost(Exception):
    """The invalidation connection stopped answering."""
