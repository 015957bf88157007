"""L2: Valkey nodes on a client-side rendezvous ring, each behind a circuit breaker.

A node that fails ``FAILURE_THRESHOLD`` times in a row is marked down: requests for its keys
skip it at once (no per-request timeout wait, reference W27) while a background task PINGs it
every ``PROBE_INTERVAL`` seconds and re-admits it on the first answer. Deletes aimed at a down
node are remembered and replayed when it returns, so invalidations are not lost (W11).
Every operation is bounded by the configured timeout; callers turn any L2Error into an L1
fallback, never into a client error.

Besides the values (``<prefix>:r1:<digest>``), leases and the per-URL key index, each node holds
the purge groups it owns (``<prefix>:grp:<digest>``: a set per tag and per origin, purge.py)
and one invalidation listener connection per proxy (coherence.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import valkey.asyncio as valkey_async
import xxhash
from valkey.exceptions import ResponseError, ValkeyError

from .coherence import Listener, NearCache
from .metrics import VALKEY_OPS, Metrics
from .ring import NodeAddress, Ring

log = logging.getLogger("mitmcache")

FAILURE_THRESHOLD = 3
# What a node's failure looks like to the client: valkey-py's own errors, the socket's, the
# deadline — and ValueError, which its RESP parser raises on a malformed reply (a garbage
# bulk length, a negative size) from a server that is not (or no longer) speaking RESP.
NODE_ERRORS = (TimeoutError, ValkeyError, OSError, ValueError)
PROBE_INTERVAL = 0.5
MAX_PENDING_DELETES = 10_000

T = TypeVar("T")

# Compare-and-delete (works on every Valkey version; DELIFEQ needs 9.0).
# Take the lease, or — when someone holds it — make sure it ends within our bound: a lease
# found without a TTL (or with a longer one: garbage, an old writer) must never stall waiters
# for longer than ``ttl`` (issue: a TTL-less lease stalled every request for 5 s forever).
_ACQUIRE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local left = redis.call('PTTL', KEYS[1])
if left == -1 or left > tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Add one member to a bounded group set (tags, a host's URLs); the set lives as long as its
# longest-lived member. Returns 1 added, 0 already there, -1 full.
_GROUP_ADD_LUA = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 and redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[3]) then
    return -1
end
local added = redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2], 'GT')
redis.call('PEXPIRE', KEYS[1], ARGV[2], 'NX')
return added
"""

# Members per group set: a tag or a host names at most this many URLs (more are counted in
# mitmcache_index_full_total and stay purgeable by URL only).
MAX_GROUP_MEMBERS = 100_000

_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class L2Error(Exception):
    """Valkey could not answer (node down, timeout, connection or protocol error)."""


class Node:
    def __init__(self, address: NodeAddress, timeout: float, tls_ca: str | None = None) -> None:
        self.address = address
        self.name = address.name
        tls: dict[str, Any] = {}
        if address.tls:
            # valkeys://: verify the server's certificate and name, against tls_ca if given.
            tls = {"ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": tls_ca}
        # What the invalidation listener's own connection needs (coherence.Listener).
        self.connect_kwargs: dict[str, Any] = dict(
            host=address.host, port=address.port, db=address.db, username=address.username,
            password=address.password, socket_connect_timeout=max(timeout, 0.5), **tls,
        )
        own: dict[str, Any] = {**self.connect_kwargs, "socket_connect_timeout": timeout}
        if address.tls:
            own["ssl"] = True
        self.client = valkey_async.Valkey(
            **own,
            # Each call is bounded by the configured timeout (asyncio.wait_for, or a read
            # batch's deadline; scaled for large values); the socket timeout is only a backstop.
            socket_timeout=max(1.0, timeout * 10),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self.up = True
        self.failures = 0
        self.probe_task: asyncio.Task[None] | None = None
        self.pending_deletes: set[str] = set()
        self.listener: Listener | None = None
        # Reads asked for in this loop tick, sent together as one MGET (auto-pipelining); the
        # loop they were asked in, and every batch on its way (strong references: the loop
        # keeps only weak ones).
        self._reads: list[tuple[str, asyncio.Future[bytes | None]]] = []
        self._reads_loop: asyncio.AbstractEventLoop | None = None
        self._batches: set[asyncio.Task[None]] = set()

    def read(self, key: str, timeout: float) -> asyncio.Future[bytes | None]:
        """The value of ``key`` (None: absent, or not a string), read with the other reads of
        this loop tick in one ``MGET``, as ioredis' auto-pipelining does: one command, one send
        and one reply to parse per tick and node instead of one each (under load, several hits
        arrive in a tick). The batch leaves on the next loop iteration.

        The future fails with TimeoutError when the answer is not in within ``timeout`` of the
        tick's first read (so within ``timeout`` of this one), else with the batch's ValkeyError
        or OSError; cancelling it (a caller gone) leaves the other reads alone."""
        loop = asyncio.get_running_loop()
        if self._reads_loop is not loop:  # reads left by a loop that stopped before sending them
            self._reads, self._reads_loop = [], loop
        future: asyncio.Future[bytes | None] = loop.create_future()
        if not self._reads:
            # call_soon, not create_task: mitmproxy's eager task factory would start a task
            # at once, before the tick's other reads are asked for.
            loop.call_soon(self._send_reads, loop.time() + timeout)
        self._reads.append((key, future))
        return future

    def _send_reads(self, deadline: float) -> None:
        batch, self._reads = self._reads, []
        task = asyncio.get_running_loop().create_task(self._mget(batch, deadline))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _mget(self, batch: list[tuple[str, asyncio.Future[bytes | None]]], deadline: float) -> None:
        try:
            # One deadline for the batch; valkey-py drops the connection when it cuts a read short.
            async with asyncio.timeout_at(deadline):
                values = await self.client.mget([key for key, _ in batch])
        except BaseException as e:
            error = e if isinstance(e, Exception) else ConnectionError("Valkey client closed")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(e, Exception):
                raise
            return
        # Anything but one string or nil per key (a garbage or foreign server) fails the read,
        # counted like any Valkey error, instead of leaving a caller without an answer.
        whole = isinstance(values, list) and len(values) == len(batch)
        for i, (_, future) in enumerate(batch):
            if future.done():
                continue
            value = values[i] if whole else values
            if whole and (value is None or isinstance(value, bytes)):
                future.set_result(value)
            else:
                future.set_exception(ResponseError(f"MGET answered {type(value).__name__}, not one value per key"))


class ValkeyTier:
    def __init__(
        self,
        addresses: list[NodeAddress],
        prefix: str,
        timeout_ms: int,
        metrics: Metrics,
        on_node_up: Callable[[str], Awaitable[None]] | None = None,
        tls_ca: str | None = None,
    ) -> None:
        self.prefix = prefix
        self.timeout = timeout_ms / 1000
        self.metrics = metrics
        self.nodes = {a.name: Node(a, self.timeout, tls_ca) for a in addresses}
        self.ring = Ring(self.nodes)
        # Labelled histogram children looked up once, not per operation (the L2 hit path).
        self._op_seconds = {op: metrics.valkey_op_seconds.labels(op) for op in VALKEY_OPS}
        self.on_node_up = on_node_up
        self._closed = False
        self._update_member_gauges()

    # ------------------------------------------------------------------ placement

    def _place(self, cache_key: str) -> tuple[Node, str, str]:
        """(owner node, value key, lease key) of a URL, hashing it once.

        One Valkey key holds all of a URL's variants, so they always share a node; the lease
        is placed by that key too, so it lives on the same node.
        """
        digest = xxhash.xxh3_128_hexdigest(cache_key.encode("utf-8", "surrogateescape"))
        value_key = f"{self.prefix}:r1:{digest}"
        return self.nodes[self.ring.owner(value_key.encode())], value_key, f"{self.prefix}:lease:{digest}"

    def valkey_key(self, cache_key: str) -> str:
        return self._place(cache_key)[1]

    def placement(self, cache_key: str) -> tuple[str, str]:
        """(owner node's name, Valkey value key) of a cache key: what an L1 copy maps to."""
        node, key, _ = self._place(cache_key)
        return node.name, key

    def node_for(self, cache_key: str) -> Node:
        return self._place(cache_key)[0]

    # ------------------------------------------------------------------ operations

    async def get(self, cache_key: str) -> bytes | None:
        node, key, _ = self._place(cache_key)
        # node.read bounds itself by self.timeout: no second timeout around it.
        return await self._run(node, "get", lambda: node.read(key, self.timeout), bounded=True)

    async def set(self, cache_key: str, value: bytes, ttl_ms: int, if_absent: bool = False) -> bool:
        """Atomic write with a millisecond TTL (``SET … PX``): sub-second TTLs work (W12).
        ``if_absent``: only where the key holds nothing (``NX``); False: it held something."""
        node, key, _ = self._place(cache_key)
        ttl_ms = max(1, ttl_ms)
        # A large value takes longer to send: allow 1 s per 20 MB on top (reference W27).
        timeout = self.timeout + len(value) / 20e6
        return bool(await self._run(node, "set", lambda: node.client.set(key, value, px=ttl_ms, nx=if_absent), timeout))

    def _index_key(self, base: str) -> tuple[Node, str]:
        """The index set of a URL: on the URL's node, named by the same digest."""
        node, value_key, _ = self._place(base)
        return node, f"{self.prefix}:idx:{value_key.rpartition(':')[2]}"

    async def index_add(self, base: str, cache_key: str, ttl_ms: int) -> None:
        """Remember that ``cache_key`` (a URL keyed with request values: key_headers) belongs
        to ``base`` (the URL), in a set on the base's node that lives as long as its longest member."""
        node, index = self._index_key(base)

        async def add() -> None:
            async with node.client.pipeline(transaction=False) as pipe:
                pipe.sadd(index, cache_key.encode("utf-8", "surrogateescape"))
                pipe.pexpire(index, max(1, ttl_ms), gt=True)
                pipe.pexpire(index, max(1, ttl_ms), nx=True)
                await pipe.execute()

        await self._run(node, "index", add)

    async def index_pop(self, base: str) -> list[str]:
        """The keys recorded under ``base``, and the index dropped (invalidation, purge)."""
        node, index = self._index_key(base)

        async def pop() -> list[bytes]:
            async with node.client.pipeline(transaction=True) as pipe:
                pipe.smembers(index)
                pipe.delete(index)
                members, _ = await pipe.execute()
            return list(members)

        members = await self._run(node, "index", pop)
        return [m.decode("utf-8", "surrogateescape") for m in members]

    # ------------------------------------------------------------------ groups (tags, hosts)

    def _group_key(self, group: str) -> tuple[Node, str]:
        """A group's set (``tag:<tag>``, ``host:<scheme://authority>``), on the node that owns it."""
        digest = xxhash.xxh3_128_hexdigest(group.encode("utf-8", "surrogateescape"))
        key = f"{self.prefix}:grp:{digest}"
        return self.nodes[self.ring.owner(key.encode())], key

    async def group_add(self, group: str, cache_key: str, ttl_ms: int, limit: int = MAX_GROUP_MEMBERS) -> bool:
        """Record ``cache_key`` under ``group``; False when the group is full."""
        node, key = self._group_key(group)
        member = cache_key.encode("utf-8", "surrogateescape")
        result = await self._run(
            node, "index",
            lambda: node.client.eval(_GROUP_ADD_LUA, 1, key, member, max(1, ttl_ms), limit),  # type: ignore[arg-type,return-value]
        )
        return result != -1

    async def group_scan(self, group: str, batch: int = 1000) -> AsyncIterator[list[str]]:
        """The group's members in batches (SSCAN: never one long command on the node)."""
        node, key = self._group_key(group)
        cursor: int = 0
        while True:
            cursor, members = await self._run(
                node, "index", lambda c=cursor: node.client.sscan(key, c, count=batch)  # type: ignore[misc]
            )
            if members:
                yield [m.decode("utf-8", "surrogateescape") for m in members]
            if int(cursor) == 0:
                return

    async def group_remove(self, group: str, cache_keys: list[str]) -> None:
        node, key = self._group_key(group)
        members = [k.encode("utf-8", "surrogateescape") for k in cache_keys]
        await self._run(node, "index", lambda: node.client.srem(key, *members))  # type: ignore[arg-type,return-value]

    async def purge(self, cache_keys: list[str]) -> tuple[int, int]:
        """Delete on each owner: (keys that existed, keys aimed at down nodes: replayed when
        they return). Errors on one node do not stop the others."""
        deleted, pending, _ = await self._delete_on_owners(cache_keys)
        return deleted, pending

    async def _delete_on_owners(self, cache_keys: list[str]) -> tuple[int, int, list[L2Error]]:
        """Delete each key on its owner; a node that fails remembers its keys and deletes them
        when it returns. (keys that existed, keys left pending, the nodes' errors)."""
        by_node: dict[str, list[str]] = {}
        for cache_key in cache_keys:
            owner, key, _ = self._place(cache_key)
            by_node.setdefault(owner.name, []).append(key)
        deleted = pending = 0
        errors: list[L2Error] = []
        for name, keys in by_node.items():
            node = self.nodes[name]
            try:
                deleted += await self._run(node, "delete", lambda n=node, k=keys: n.client.delete(*k))  # type: ignore[misc]
            except L2Error as e:
                if len(node.pending_deletes) < MAX_PENDING_DELETES:
                    node.pending_deletes.update(keys)
                pending += len(keys)
                errors.append(e)
        return deleted, pending, errors

    # ------------------------------------------------------------------ near-cache coherence

    def start_listeners(self, near: NearCache) -> None:
        """One invalidation listener per node (needs a running loop; idempotent)."""
        for node in self.nodes.values():
            if node.listener is None:
                node.listener = Listener(node.name, node.connect_kwargs, node.address.tls, self.prefix, near, self.metrics)
            node.listener.start()

    async def delete(self, cache_keys: list[str]) -> None:
        """Delete on each owner; for a down owner, remember the key and delete it on return.
        Raises the first node's L2Error (after trying every node)."""
        errors = (await self._delete_on_owners(cache_keys))[2]
        if errors:
            raise errors[0]

    def _lease_key(self, lease_key: str, variant: str) -> str:
        """One lease per Vary variant of a URL (on the URL's node): variants never wait for
        each other's fetches."""
        return f"{lease_key}:{xxhash.xxh3_64_hexdigest(variant.encode('utf-8', 'surrogateescape'))}" if variant else lease_key

    async def acquire_lease(self, cache_key: str, token: str, ttl_ms: int, variant: str = "") -> bool:
        """``SET lease token NX PX ttl``: True if we own the fill of this URL (variant) now; a
        lease held by someone else is bounded to ``ttl_ms`` from now."""
        node, _, lease_key = self._place(cache_key)
        lease_key = self._lease_key(lease_key, variant)
        result = await self._run(
            node, "lease", lambda: node.client.eval(_ACQUIRE_LUA, 1, lease_key, token, max(1, ttl_ms))  # type: ignore[arg-type,return-value]
        )
        return bool(result)

    async def release_lease(self, cache_key: str, token: str, variant: str = "") -> None:
        """Delete the lease only if we still own it (an expired lease may be someone else's)."""
        node, _, lease_key = self._place(cache_key)
        lease_key = self._lease_key(lease_key, variant)
        await self._run(
            node, "release", lambda: node.client.eval(_RELEASE_LUA, 1, lease_key, token)  # type: ignore[arg-type,return-value]
        )

    async def poll_fill(self, cache_key: str, variant: str = "") -> tuple[bytes | None, bool]:
        """(value, lease still held) in one round trip, for proxies waiting on another's fill."""
        node, key, lease_key = self._place(cache_key)
        lease_key = self._lease_key(lease_key, variant)

        async def both() -> list[Any]:
            async with node.client.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.exists(lease_key)
                return await pipe.execute()

        value, held = await self._run(node, "poll", both)
        return value, bool(held)

    async def clear(self) -> int:
        """Remove every key under our prefix on every reachable node (SCAN + UNLINK)."""
        removed = 0
        for node in self.nodes.values():
            if not node.up:
                continue
            try:
                batch: list[Any] = []
                async for key in node.client.scan_iter(match=f"{self.prefix}:*", count=1000):
                    batch.append(key)
                    if len(batch) >= 1000:
                        removed += await node.client.unlink(*batch)
                        batch = []
                if batch:
                    removed += await node.client.unlink(*batch)
            except NODE_ERRORS as e:
                log.warning(f"mitmcache: clearing {node.name} failed: {type(e).__name__}: {e}")
        return removed

    async def close(self) -> None:
        self._closed = True
        for node in self.nodes.values():
            if node.probe_task is not None:
                node.probe_task.cancel()
            if node.listener is not None:
                await node.listener.close()
            try:
                await node.client.aclose()
            except Exception:  # closing a broken connection must not stop shutdown
                pass

    async def check(self) -> dict[str, str | None]:
        """PING every node once (start-up report): node name → None if it answered, else why not.

        A node that does not answer is marked down at once (its keys skip L2 and the probe
        re-admits it), instead of after FAILURE_THRESHOLD failed requests."""

        async def ping(node: Node) -> str | None:
            try:
                await asyncio.wait_for(node.client.ping(), self.timeout)
            except NODE_ERRORS as e:
                return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            return None

        names = list(self.nodes)
        results = await asyncio.gather(*(ping(self.nodes[n]) for n in names))
        for name, error in zip(names, results):
            node = self.nodes[name]
            if error is not None:
                self.metrics.valkey_errors.labels(node.name, "ping").inc()
                if node.up and not self._closed:
                    self._mark_down(node)  # the caller names the node in its start-up report
        return dict(zip(names, results))

    # ------------------------------------------------------------------ breaker

    def members(self) -> dict[str, bool]:
        return {name: node.up for name, node in self.nodes.items()}

    async def _run(
        self, node: Node, op: str, call: Callable[[], Awaitable[T]], timeout: float | None = None,
        bounded: bool = False,
    ) -> T:
        """``call()`` within ``timeout`` (default: the configured one; ``bounded``: the call
        bounds itself), timed, and counted against the node's breaker when it fails."""
        if not node.up:
            raise L2Error(f"{node.name} is down")
        start = time.perf_counter()
        try:
            result = await (call() if bounded else asyncio.wait_for(call(), timeout or self.timeout))
        except NODE_ERRORS as e:
            self._failed(node, op, e)
            raise L2Error(f"{node.name} {op}: {type(e).__name__}: {e}") from e
        finally:
            timer = self._op_seconds.get(op)
            (timer or self.metrics.valkey_op_seconds.labels(op)).observe(time.perf_counter() - start)
        node.failures = 0
        return result

    def _failed(self, node: Node, op: str, error: BaseException) -> None:
        self.metrics.valkey_errors.labels(node.name, op).inc()
        node.failures += 1
        if node.up and node.failures >= FAILURE_THRESHOLD and not self._closed:
            log.warning(
                f"mitmcache: Valkey node {node.name} marked down after {node.failures} failures "
                f"({type(error).__name__}: {error}); serving its keys from L1 and the origin"
            )
            self._mark_down(node)

    def _mark_down(self, node: Node) -> None:
        """Skip the node at once; a probe PINGs it until it answers (then it rejoins)."""
        node.up = False
        self.metrics.ring_state_changes.inc()
        self._update_member_gauges()
        node.probe_task = asyncio.get_running_loop().create_task(self._probe(node))

    async def _probe(self, node: Node) -> None:
        while not self._closed:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await asyncio.wait_for(node.client.ping(), self.timeout)
                if node.pending_deletes:
                    keys = list(node.pending_deletes)
                    await asyncio.wait_for(node.client.delete(*keys), self.timeout * 4)
                    node.pending_deletes.clear()
            except NODE_ERRORS:
                continue
            node.failures = 0
            node.up = True
            self.metrics.ring_state_changes.inc()
            self._update_member_gauges()
            log.warning(f"mitmcache: Valkey node {node.name} is back up")
            if self.on_node_up is not None:
                await self.on_node_up(node.name)
            return

    def _update_member_gauges(self) -> None:
        up = sum(1 for n in self.nodes.values() if n.up)
        self.metrics.ring_members.labels("up").set(up)
        self.metrics.ring_members.labels("down").set(len(self.nodes) - up)
