"""Revalidation with the cache's own origin client: background (stale-while-revalidate) and
foreground (entries with a stale-if-error window, where a failed connection must still be
answered from the cache: mitmproxy-notes §0.5).

Background work is a bounded pool of workers fed by a bounded queue; overflow is dropped and
counted (``reval_dropped``). One revalidation per stored variant at a time in this proxy (an
in-progress set) and across proxies (the fill lease in the key's Valkey node). The answer goes
through ``CacheService.admit``: a 304 merges and renews; a storable 2xx/3xx replaces; an error,
a 4xx/5xx or a non-shareable answer never replaces a usable entry (reference W7).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import semantics as sem
from .messages import Headers, Response
from .origin_client import OriginClient, OriginError
from .outcome import Outcome, Revalidation
from .policy import Policy
from .semantics import StoredResponse
from .store import Lease, Lookup, Resource

if TYPE_CHECKING:
    from .service import CacheService

log = logging.getLogger("mitmcache")

_CONDITIONAL = frozenset({"if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range", "range"})


@dataclass(frozen=True, slots=True)
class Job:
    key: str
    url: str
    request_headers: Headers  # as the client sent them (its conditionals are dropped)
    entry: StoredResponse
    cause: Outcome | None = None  # the request that queued it
    target: bytes | None = None  # the request target as the client sent it, byte for byte
    policy: Policy | None = None  # the operator rule of the request (cache_policy)

    @property
    def ident(self) -> str:
        return f"{self.key}\n{self.entry.vary!r}"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: str  # "304", "200" (replaced), "error", "kept" (non-shareable answer), "skipped"
    entry: StoredResponse | None  # the entry to use now (renewed/replaced), None if unchanged
    fetched: Response | None = None
    error: str | None = None
    stored: bool = False  # ``entry`` went into the store (shareable with waiters)


class Revalidator:
    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.client: OriginClient | None = None
        self.queue: asyncio.Queue[Job] | None = None
        self.workers: list[asyncio.Task[None]] = []
        self.worker_count = 4
        self.queue_size = 256
        self.in_progress: set[str] = set()

    def configure(self, workers: int, queue_size: int, client: OriginClient | None) -> OriginClient | None:
        """New pool sizes and origin client; returns the previous client for the caller to close."""
        self.worker_count, self.queue_size = workers, queue_size
        old, self.client = self.client, client
        self.stop()
        return old if old is not client else None

    def stop(self) -> None:
        for task in self.workers:
            task.cancel()
        self.workers = []
        self.queue = None
        self.in_progress.clear()
        self.service.metrics.reval_queue_depth.set(0)

    # ------------------------------------------------------------------ background

    def enqueue(self, job: Job) -> str:
        """Schedule a background revalidation: "queued", "duplicate" or "dropped". Never blocks."""
        metrics = self.service.metrics
        if job.ident in self.in_progress:
            metrics.reval_duplicates.inc()
            return "duplicate"
        if self.queue is None:
            self.queue = asyncio.Queue(self.queue_size)
            loop = asyncio.get_running_loop()
            self.workers = [loop.create_task(self._worker()) for _ in range(self.worker_count)]
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            metrics.reval_dropped.inc()
            return "dropped"
        self.in_progress.add(job.ident)
        metrics.reval_queue_depth.set(self.queue.qsize())
        return "queued"

    async def _worker(self) -> None:
        queue = self.queue
        assert queue is not None
        while True:
            job = await queue.get()
            self.service.metrics.reval_queue_depth.set(queue.qsize())
            record = Revalidation(job.key, job.url, True, time.time(), cause=job.cause)
            try:
                record.outcome = (await self.background(job)).outcome
            except Exception:  # a bug here must not kill the worker
                record.outcome = "error"
                log.exception(f"mitmcache: background revalidation of {job.key} failed")
            finally:
                self.in_progress.discard(job.ident)
                self.service.revalidated(record)

    async def background(self, job: Job) -> Result:
        store, metrics = self.service.store, self.service.metrics
        # Someone may have refreshed it since it was queued (another request, another proxy).
        now = time.time()
        found = (await store.get(job.key, now, skip_l1=True)) or (await store.get(job.key, now))
        lookup = found if isinstance(found, Lookup) else None  # a hit-for-pass marker: nothing stored
        current = sem.select_variant(lookup.resource.variants, job.request_headers) if lookup else None
        if current is not None and current.is_fresh(now):
            metrics.revalidations.labels("skipped").inc()
            return Result("skipped", None)
        token = uuid.uuid4().hex
        # The same lease a foreground fill of this variant takes (one per Vary variant).
        variant = sem.variant_id(sem.stored_vary_names(lookup.resource.variants), job.request_headers) if lookup else ""
        lease = await store.acquire_lease(job.key, token, self.service.settings.lease_ms, variant)
        if lease is Lease.HELD:  # another proxy is refreshing it right now
            metrics.revalidations.labels("skipped").inc()
            return Result("skipped", None)
        try:
            job = job if current is None else dataclasses.replace(job, entry=current)
            return await self.refresh(job, base=lookup.resource if lookup else None)
        finally:
            if lease is Lease.ACQUIRED:
                await store.release_lease(job.key, token, variant)

    # ------------------------------------------------------------------ one revalidation

    async def refresh(self, job: Job, max_body: int | None = None, base: Resource | None = None) -> Result:
        """Send a conditional request for ``job.entry`` and admit the answer (RFC 9111 §4.3).

        ``max_body`` bounds what is read of a new body (default: cache_max_object_bytes); the
        foreground path passes a larger bound because it must hand the answer to the client.
        ``base``: the URL's other variants as read just now (kept beside the new one).
        """
        assert self.client is not None, "origin client not configured"
        service, metrics = self.service, self.service.metrics
        # The client's own conditionals are answered by us; the origin gets the entry's.
        headers = [(k, v) for k, v in job.request_headers if k.lower() not in _CONDITIONAL]
        headers += sem.validators_for(job.entry)
        limit = max_body if max_body is not None else service.settings.max_object_bytes
        try:
            fetched = await self._fetch(job, headers, limit)
            if fetched.status == 304 and not sem.validator_304_matches(job.entry, fetched.headers):
                # §4.3.4: this 304 selects no stored response: ask again, unconditionally.
                metrics.revalidations.labels("304").inc()
                service.bad_input("304-mismatch", f"304 for {job.key!r} selects no stored response (its validators differ, or it has none while the entry has some: RFC 9111 §4.3.4)")
                headers = [(k, v) for k, v in headers if k.lower() not in _CONDITIONAL]
                fetched = await self._fetch(job, headers, limit)
                if fetched.status == 304:  # still not a full response: nothing to use
                    return Result("error", None, fetched, "304 to an unconditional request")
        except OriginError as e:
            metrics.revalidations.labels("error").inc()
            log.info(f"mitmcache: revalidation of {job.key} failed: {e}")
            return Result("error", None, error=str(e))
        if fetched.status == 304:
            metrics.revalidations.labels("304").inc()
        elif fetched.status >= 500:
            # §4.3.3 lets the cache act as if the origin had not answered: the stored response
            # stays (W7). A 4xx is a full response like any other: stored if storable (a 404).
            metrics.revalidations.labels("error").inc()
            return Result("error", None, fetched, f"origin answered {fetched.status}")
        else:
            metrics.revalidations.labels("200").inc()
        if fetched.status != 304 and fetched.body is None:
            return Result("kept", None, fetched, "too-large")
        admission = await service.admit(
            job.key, "GET", job.request_headers, fetched, base, time.time(), job.entry, job.policy
        )
        if admission.resource is None and fetched.status != 304:
            return Result("kept", None, fetched, admission.reason)
        return Result(
            "304" if fetched.status == 304 else "200", admission.entry, fetched, admission.reason,
            stored=admission.resource is not None,
        )

    async def _fetch(self, job: Job, headers: list[tuple[str, str]], limit: int) -> Response:
        """One request for ``job``'s target; raises OriginError."""
        assert self.client is not None
        start = time.perf_counter()
        try:
            return await self.client.fetch("GET", job.url, headers, limit, job.target)
        finally:
            self.service.metrics.reval_seconds.observe(time.perf_counter() - start)
