"""Revalidation with the cache's own origin client: background (stale-while-revalidate) and
foreground (entries with a stale-if-error window, where a failed connection must still be
answered from the cache: mitmproxy-notes §0.5).

Background work is a bounded pool of workers fed by a bounded queue; overflow is dropped and
counted (``reval_dropped``). One revalidation per stored variant at a time in this proxy (an
in-progress set) and across proxies (the fill lease in the key's Valkey node). A 304 merges
and renews; a storable 2xx/3xx replaces; an error, a 4xx/5xx or a non-shareable answer never
replaces a usable entry (reference W7).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from . import semantics as sem
from .metrics import Metrics
from .origin_client import Fetched, OriginClient, OriginError
from .semantics import StoredResponse
from .store import Lease, TieredStore

log = logging.getLogger("mitmcache")

_CONDITIONAL = frozenset({"if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range", "range"})


@dataclass(frozen=True, slots=True)
class Job:
    key: str
    url: str
    request_headers: tuple[tuple[str, str], ...]  # as the client sent them, minus its validators
    entry: StoredResponse

    @property
    def ident(self) -> str:
        return f"{self.key}\n{self.entry.vary!r}"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: str  # "304", "200" (replaced), "error", "kept" (non-shareable answer), "skipped"
    entry: StoredResponse | None  # the entry to use now (renewed/replaced), None if unchanged
    fetched: Fetched | None = None
    error: str | None = None


class Revalidator:
    def __init__(
        self,
        store: TieredStore,
        metrics: Metrics,
        settings: Callable[[], tuple[int, int, float]],  # (max_object_bytes, lease_ms, heuristic_cap)
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self.client: OriginClient | None = None
        self.queue: asyncio.Queue[Job] | None = None
        self.workers: list[asyncio.Task[None]] = []
        self.worker_count = 4
        self.queue_size = 256
        self.in_progress: set[str] = set()

    def configure(self, workers: int, queue_size: int, client: OriginClient | None) -> None:
        self.worker_count, self.queue_size = workers, queue_size
        if client is not None:
            self.client = client
        self.stop()

    def stop(self) -> None:
        for task in self.workers:
            task.cancel()
        self.workers = []
        self.queue = None
        self.in_progress.clear()
        self.metrics.reval_queue_depth.set(0)

    # ------------------------------------------------------------------ background

    def enqueue(self, job: Job) -> str:
        """Schedule a background revalidation: "queued", "duplicate" or "dropped". Never blocks."""
        if job.ident in self.in_progress:
            self.metrics.reval_duplicates.inc()
            return "duplicate"
        if self.queue is None:
            self.queue = asyncio.Queue(self.queue_size)
            loop = asyncio.get_running_loop()
            self.workers = [loop.create_task(self._worker()) for _ in range(self.worker_count)]
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.reval_dropped.inc()
            return "dropped"
        self.in_progress.add(job.ident)
        self.metrics.reval_queue_depth.set(self.queue.qsize())
        return "queued"

    async def _worker(self) -> None:
        queue = self.queue
        assert queue is not None
        while True:
            job = await queue.get()
            self.metrics.reval_queue_depth.set(queue.qsize())
            try:
                await self.background(job)
            except Exception:  # a bug here must not kill the worker
                log.exception(f"mitmcache: background revalidation of {job.key} failed")
            finally:
                self.in_progress.discard(job.ident)

    async def background(self, job: Job) -> Result:
        # Someone may have refreshed it since it was queued (another request, another proxy).
        now = time.time()
        lookup = (await self.store.get(job.key, now, skip_l1=True)) or (await self.store.get(job.key, now))
        current = sem.select_variant(lookup.resource.variants, job.request_headers) if lookup else None
        if current is not None and current.is_fresh(now):
            self.metrics.revalidations.labels("skipped").inc()
            return Result("skipped", None)
        token = uuid.uuid4().hex
        _, lease_ms, _ = self.settings()
        lease = await self.store.acquire_lease(job.key, token, lease_ms)
        if lease is Lease.HELD:  # another proxy is refreshing it right now
            self.metrics.revalidations.labels("skipped").inc()
            return Result("skipped", None)
        try:
            return await self.refresh(job if current is None else Job(job.key, job.url, job.request_headers, current))
        finally:
            if lease is Lease.ACQUIRED:
                await self.store.release_lease(job.key, token)

    # ------------------------------------------------------------------ one revalidation

    async def refresh(self, job: Job, max_body: int | None = None) -> Result:
        """Send a conditional request for ``job.entry`` and apply the answer to the store.

        ``max_body`` bounds what is read of a new body (default: cache_max_object_bytes); the
        foreground path passes a larger bound because it must hand the answer to the client.
        """
        assert self.client is not None, "origin client not configured"
        max_object_bytes, _, heuristic_cap = self.settings()
        # The client's own conditionals are answered by us; the origin gets the entry's.
        headers = [(k, v) for k, v in job.request_headers if k.lower() not in _CONDITIONAL]
        headers += sem.validators_for(job.entry)
        start = time.perf_counter()
        try:
            fetched = await self.client.fetch("GET", job.url, headers, max_body if max_body is not None else max_object_bytes)
        except OriginError as e:
            self.metrics.revalidations.labels("error").inc()
            log.info(f"mitmcache: revalidation of {job.key} failed: {e}")
            return Result("error", None, error=str(e))
        finally:
            self.metrics.reval_seconds.observe(time.perf_counter() - start)
        if fetched.status == 304:
            self.metrics.revalidations.labels("304").inc()
            if not sem.validator_304_matches(job.entry, fetched.headers):
                self.metrics.bad_input.labels("304-mismatch").inc()
                return Result("error", None, fetched, "304 does not match the stored validators")
            renewed = sem.merge_304(job.entry, fetched.headers, fetched.request_time, fetched.response_time, heuristic_cap)
            await self._store(job.key, renewed)
            return Result("304", renewed, fetched)

        if fetched.status >= 400:
            # §4.3.3 allows using the error; we keep serving the stored response (W7).
            self.metrics.revalidations.labels("error").inc()
            return Result("error", None, fetched, f"origin answered {fetched.status}")

        self.metrics.revalidations.labels("200").inc()
        reason = sem.storability(
            "GET", fetched.status, job.request_headers, fetched.headers,
            len(fetched.body) if fetched.body is not None else None, max_object_bytes,
        )
        if reason is not None or fetched.body is None:
            return Result("kept", None, fetched, reason.value if reason else "too-large")
        replaced = sem.make_stored_response(
            fetched.status, fetched.reason, job.request_headers, fetched.headers, fetched.body,
            fetched.request_time, fetched.response_time, heuristic_cap,
        )
        await self._store(job.key, replaced)
        return Result("200", replaced, fetched)

    async def _store(self, key: str, entry: StoredResponse) -> None:
        """Store next to the URL's other variants as they are now (read only when storing)."""
        now = time.time()
        current = await self.store.get(key, now)
        await self.store.put(key, entry, now, base=current.resource if current else None)
