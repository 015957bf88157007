"""The request pipeline, independent of mitmproxy.

    key → lookup → select variant → decide (``states.on_lookup``)
        → serve | wait for another fetch (coalesce, lease) | forward (validators added)
    origin answer → decide (``states.on_response``) → renew (304) | refetch | admit | invalidate

Driven from plain values (``messages.Request`` / ``Response``): the ``HttpCache`` addon builds
them once per flow; replay and tests build them directly. One ``Exchange`` holds what the
request decided for its response; one ``Outcome`` records what happened.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, assert_never

from . import responses
from . import semantics as sem
from .coalesce import Flight, FlightResult
from .keys import split_host_port
from .messages import Request, Response
from .origin_client import OriginError
from .outcome import HIT, MISS, STALE, WHY, Outcome, Revalidation
from .revalidate import Job
from .semantics import StoredResponse
from .states import (
    Admit,
    Bypass,
    Forward,
    GatewayTimeout,
    Ignore,
    Invalidate,
    Pass,
    Refetch,
    Renew,
    Revalidate,
    ServeFresh,
    ServeStale,
    ServeWhileRevalidating,
    on_lookup,
    on_response,
)
from .store import HitForPass, Lease, Lookup, Resource

if TYPE_CHECKING:
    from .service import CacheService

log = logging.getLogger("mitmcache")

# What the cache's own client reads of an origin answer it hands to the client unstored.
FOREGROUND_MAX_BODY = 1 << 30
_PASS = Pass()  # the state the hit-for-pass fast path takes


@dataclass(slots=True)
class Exchange:
    """One request's passage through the pipeline: what its response will need."""

    request: Request
    key: str
    outcome: Outcome
    directives: sem.RequestDirectives
    resource: Resource | None = None  # what the lookup found (the URL's variants)
    stored: StoredResponse | None = None  # of those, the one selected for this request (§4.1)
    revalidating: StoredResponse | None = None  # the stale entry a forwarded request validates
    reply: Response | None = None  # set when the cache answers itself
    # Conditional fields the forwarded request carries instead of the client's (§4.3.1).
    validators: tuple[tuple[str, str], ...] = ()
    # The client's If-None-Match/If-Modified-Since stay here: the cache fetches a full response
    # to store and answers them itself (a cold conditional request fills the cache, like Varnish).
    strip_conditionals: bool = False
    forwarded_at: float | None = None  # RFC 9111 §4.2.3 request_time
    bypass: bool = False  # an operator rule: neither looked up nor stored
    flight: Flight | None = None  # set while this request leads the fetch of its key (variant)
    flight_key: str = ""  # the coalescing key: the cache key plus the Vary'd request values
    variant: str = ""  # the Vary'd request values when the URL's Vary names are known
    lease_token: str | None = None  # set while this request holds the key's fill lease
    passing: bool = False  # sent upstream by a hit-for-pass marker
    completed: bool = False


@dataclass(slots=True)
class Passed:
    """A request a hit-for-pass marker in L1 sent upstream on the fast path: no ``Request``
    value, no lookup, no lease (``Pipeline.pass_at_once``). ``request_fields``: its lines that
    storability reads (``sem.STORABILITY_REQUEST_FIELDS``); ``forwarded_at``: RFC 9111 §4.2.3
    request_time."""

    key: str
    method: str
    outcome: Outcome
    request_fields: sem.HeaderList
    forwarded_at: float


class Pipeline:
    def __init__(self, service: CacheService) -> None:
        self.service = service
        self._passed_count = service.metrics.hit_for_pass.labels("passed")

    # ------------------------------------------------------------------ request

    async def request(self, req: Request, key: str | None = None) -> Exchange:
        """Look the request up and decide. ``reply`` set: answer with it; else forward the
        request with ``validators`` in place of the client's If-None-Match/If-Modified-Since.
        ``key``: the request's key when the caller built it already (``keys.for_request``)."""
        key = key or self.service.keys.for_request(req)
        ex = Exchange(req, key, Outcome(key, req.method), sem.RequestDirectives.from_headers(req.headers))
        self.service.started(ex.outcome)
        if req.method not in ("GET", "HEAD"):
            return ex  # Bypass: the response may invalidate (§4.4)
        policy = req.policy
        if policy is not None:
            ex.outcome.status.detail.append(policy.label)
            if policy.bypass:
                ex.bypass = True
                ex.outcome.status.fwd = "bypass"
                ex.outcome.why = WHY["bypass"]
                return ex
        try:
            await self._lookup_and_decide(ex)
            # RFC 9111 §4.2.3 request_time: when the request goes upstream, after any coalescing
            # or lease wait (counting those waits would make stored responses look older).
            ex.forwarded_at = time.time()
        except BaseException:
            # Cancelled (e.g. the client left) or a bug: never leave waiters or a lease behind.
            await self._finish(ex, FlightResult.FAILED)
            raise
        if ex.reply is not None:
            self.complete(ex)
        return ex

    async def _lookup_and_decide(self, ex: Exchange) -> None:
        store, req, outcome = self.service.store, ex.request, ex.outcome
        now = time.time()
        l1_ttl = req.policy.l1_ttl if req.policy is not None else None
        found = await store.get(ex.key, now, l1_ttl=l1_ttl)
        if store.has_l2 and (found is None or found.tier == "l2"):
            outcome.time("cache.l2_lookup", now)
        lookup = found if isinstance(found, Lookup) else None
        entry = sem.select_variant(lookup.resource.variants, req.headers) if lookup else None
        if lookup is not None and lookup.tier == "l1" and store.has_l2 and entry is not None and not entry.is_fresh(now):
            # A stale near-cache copy: L2 may hold a newer one (another proxy refreshed it).
            start = time.time()
            newer = await store.get(ex.key, now, skip_l1=True, l1_ttl=l1_ttl)
            outcome.time("cache.l2_lookup", start)
            if isinstance(newer, Lookup):
                lookup = newer
                entry = sem.select_variant(lookup.resource.variants, req.headers)
        ex.stored = entry
        if lookup is not None:
            ex.resource = lookup.resource
            outcome.tier = lookup.tier
            outcome.status.detail.append(lookup.tier)
        passing = isinstance(found, HitForPass)
        state = on_lookup(req.method, lookup is not None, entry, ex.directives, now, passing)
        match state:
            case ServeFresh(entry=fresh):
                self._serve(ex, fresh, now, HIT, "hit")
            case ServeStale(entry=stale):
                outcome.status.detail.append("max-stale")
                self._serve(ex, stale, now, STALE, "stale")
            case ServeWhileRevalidating(entry=stale):
                outcome.status.fwd = "stale"
                outcome.status.detail.append("stale-while-revalidate")
                # A HEAD can trigger it too: the GET entry is what gets refreshed.
                queued = self.service.revalidator.enqueue(
                    Job(ex.key, req.url, req.headers, stale, outcome, _target(req), req.policy)
                )
                outcome.status.detail.append(f"reval-{queued}")
                self._serve(ex, stale, now, STALE, "stale")
            case GatewayTimeout(fwd=fwd):
                outcome.status.fwd = fwd
                outcome.status.detail.append("only-if-cached")
                outcome.why = WHY["only-if-cached"]
                ex.reply = responses.gateway_timeout(now)
                outcome.label, outcome.result = MISS, "miss"
            case Forward(fwd=fwd):
                outcome.status.fwd = fwd
                outcome.why = WHY[fwd]
                await self._go_upstream(ex, None)
            case Pass(fwd=fwd):
                assert isinstance(found, HitForPass)
                self._pass(outcome, fwd, found)
                ex.passing = True
            case Revalidate(entry=stale, fwd=fwd, reason=reason):
                outcome.status.fwd = fwd
                outcome.why = WHY.get(reason, WHY["stale"])
                await self._go_upstream(ex, stale)
            case Bypass():
                pass
            case _:
                assert_never(state)

    def _pass(self, outcome: Outcome, fwd: str, marker: HitForPass) -> None:
        """The outcome of a request a hit-for-pass marker sends upstream (both paths)."""
        outcome.status.fwd = fwd
        outcome.status.detail.append("hit-for-pass")
        outcome.tier = marker.tier
        outcome.why = f"{WHY['hit-for-pass']} ({marker.reason}: {WHY.get(marker.reason, marker.reason)})"
        self._passed_count.inc()

    # ------------------------------------------------------------------ hit-for-pass fast path

    def pass_at_once(self, key: str, method: str, marker: HitForPass, request_fields: sem.HeaderList, now: float) -> Passed:
        """A GET/HEAD without only-if-cached, under no operator rule, whose key has a live
        marker in L1 (``store.pass_marker``): it goes upstream at once, as ``request`` would
        send it (``states.Pass``) — but without building the ``Request``, the directives or
        the ``Exchange`` the rest of the pipeline needs. ``finish_pass`` takes the answer."""
        outcome = Outcome(key, method, now)
        self.service.started(outcome)
        self._pass(outcome, _PASS.fwd, marker)
        return Passed(key, method, outcome, request_fields, now)

    def finish_pass(
        self, passed: Passed, status: int, response_fields: sem.HeaderList, body_length: int, response_time: float, now: float
    ) -> bool:
        """The origin's whole answer to a ``Passed`` request, when it changes nothing: True
        (the outcome is complete: MISS, the not-stored reason) when ``response`` would only
        have refused to store it — an answer to HEAD, or one ``CacheService.refusal`` refuses
        without renewing the marker. False: the full path must run (``resume``), e.g. the
        answer is storable now, which stores it and ends the marker.
        ``response_fields``: at least the answer's lines named in ``sem.STORABILITY_RESPONSE_FIELDS``
        and the targeted fields; ``response_time``: when it arrived (RFC 9111 §4.2.3)."""
        reason = None
        if passed.method == "GET":
            reason = self.service.refusal(
                passed.key, status, passed.request_fields, response_fields, body_length, passed.forwarded_at, response_time, now
            )
            if reason is None:
                return False
        outcome = passed.outcome
        outcome.time("cache.origin_fetch", passed.forwarded_at)
        outcome.status.fwd_status = status
        if reason is not None:
            outcome.status.detail.append(reason.value)
            outcome.not_stored = reason.value
        outcome.label, outcome.result = MISS, "miss"
        self.service.finished(outcome)
        return True

    def resume(self, passed: Passed, req: Request) -> Exchange:
        """The ``Exchange`` a ``Passed`` request would have had (its outcome so far): the full
        path takes it from here (``response``, ``error``, streaming)."""
        return Exchange(
            req, passed.key, passed.outcome, sem.RequestDirectives.from_headers(req.headers),
            forwarded_at=passed.forwarded_at, passing=True,
        )

    def pass_failed(self, passed: Passed) -> None:
        """A ``Passed`` request got no answer (``error``): its outcome goes to the observers."""
        self.service.finished(passed.outcome)

    async def _go_upstream(self, ex: Exchange, stale: StoredResponse | None) -> None:
        """The origin is needed: wait for another request's fetch, lead one, or revalidate."""
        req = ex.request
        # RFC 5861 §4 needs an answer even when the origin is unreachable, which mitmproxy's
        # forwarding cannot give (mitmproxy-notes §0.5): such entries are revalidated with the
        # cache's own client — for GET, HEAD and Range requests alike (the full GET is fetched;
        # HEAD and the range are then answered from it).
        stale_if_error = (
            stale is not None and stale.stale_if_error > 0 and not stale.never_serve_stale
            and self.service.revalidator.client is not None
        )
        if req.wants_range and not stale_if_error:
            # Forwarded as it is: the origin answers the range; a 206 is never stored (§3.3),
            # a full 200 may be.
            ex.outcome.status.detail.append("range")
            return
        if not (ex.directives.no_cache or ex.directives.no_store):
            if await self._coalesce(ex):
                return
        if stale is not None and stale_if_error:
            return await self._refresh_in_foreground(ex, stale)
        if req.method != "GET":
            return
        ex.strip_conditionals = sem.has_client_conditionals(req.headers)
        if stale is None:
            return
        # §4.3.1: the entry's validators replace the client's; its own are answered by us.
        ex.revalidating = stale
        ex.validators = tuple(sem.validators_for(stale))

    def _serve(self, ex: Exchange, entry: StoredResponse, now: float, label: str, result: str, hit: bool = True) -> None:
        """Answer from ``entry`` (a 304 if the client's validators match it, RFC 9110 §13)."""
        req, outcome = ex.request, ex.outcome
        not_modified = sem.client_conditional_matches(req.headers, entry)
        byte_range = None
        if req.wants_range and not not_modified and req.method == "GET":
            byte_range = sem.select_range(req.headers, entry)
            if byte_range is not None:
                outcome.status.detail.append("range")
        ex.reply = responses.from_entry(req.method == "HEAD", entry, now, not_modified, byte_range)
        outcome.status.hit = hit
        outcome.status.ttl = int(entry.ttl(now))
        outcome.label, outcome.result = label, result
        outcome.entry, outcome.age, outcome.not_modified = entry, entry.age(now), not_modified

    # ------------------------------------------------------------------ coalescing

    async def _coalesce(self, ex: Exchange) -> bool:
        """Wait for another request's fetch of this key, or lead one. True if answered.

        Coalescing is per Vary variant once the URL's Vary names are known (from what is
        stored, or from the fetch just waited for): a request for one variant never waits
        behind another variant's fetch."""
        service = self.service
        names = sem.stored_vary_names(ex.resource.variants) if ex.resource else ()
        for _ in range(3):
            variant = sem.variant_id(names, ex.request.headers)
            flight_key = ex.key + variant
            flight = service.coalescer.current(flight_key)
            if flight is None:
                if ex.request.method != "GET":
                    return False  # a HEAD cannot fill the GET entry, so it never leads
                ex.flight, ex.flight_key, ex.variant = service.coalescer.lead(flight_key), flight_key, variant
                return await self._lease(ex)
            service.metrics.coalesced.inc()
            start, began = time.time(), time.monotonic()
            # Waiters share the leader's origin timeout: a hung origin costs one request per
            # key, and each waiter at most cache_origin_timeout_ms from the fetch's start.
            deadline = self._fetch_deadline(flight)
            bound = min(service.settings.coalesce_wait, max(0.0, deadline - began))
            waited = await service.coalescer.wait(flight, bound)
            if waited is None and flight.answering:
                # The origin began to answer by the deadline, which bounds its first byte (as
                # the leader's): its body may take the rest of cache_coalesce_wait_ms.
                rest = began + service.settings.coalesce_wait - time.monotonic()
                waited = await service.coalescer.wait(flight, max(0.0, rest))
            ex.outcome.time("cache.coalesce_wait", start)
            if waited is None:
                if time.monotonic() >= deadline and not flight.answering:
                    self._origin_timed_out(ex)
                    return True
                return False  # waited long enough: go alone
            result, resource = waited
            if result is FlightResult.TIMED_OUT:
                self._origin_timed_out(ex)  # the leader was answered so: its waiters share the deadline
                return True
            if result is FlightResult.FAILED:
                continue  # the leader failed or left: someone else leads now
            if resource is None or result is FlightResult.NOT_SHAREABLE:
                return False
            entry = sem.select_variant(resource.variants, ex.request.headers)
            if entry is None:
                names = sem.stored_vary_names(resource.variants)  # another variant was fetched: ours is keyed apart now
                continue
            return self._serve_collapsed(ex, entry, result, None)
        return False

    async def _lease(self, ex: Exchange) -> bool:
        """Across proxies: take the key's fill lease, or wait for the proxy that holds it."""
        store, settings, metrics = self.service.store, self.service.settings, self.service.metrics
        if not store.has_l2:
            return False
        token = uuid.uuid4().hex
        lease = await store.acquire_lease(ex.key, token, settings.lease_ms, ex.variant)
        if lease is Lease.ACQUIRED:
            ex.lease_token = token
            return False
        if lease is Lease.UNAVAILABLE:
            return False
        metrics.lease_waits.inc()
        start = time.time()
        # The other proxy's fetch gets no longer than this request's own deadline — the one
        # its local waiters share (a fetch started after it would begin with no time left).
        assert ex.flight is not None
        deadline = self._fetch_deadline(ex.flight)
        bound = min(settings.lease_ms / 1000, max(0.0, deadline - time.monotonic()))
        resource, why = await store.wait_for_fill(ex.key, bound, ex.resource, ex.variant)
        ex.outcome.time("cache.lease_wait", start)
        if why == "timeout":
            metrics.lease_timeouts.inc()
        entry = sem.select_variant(resource.variants, ex.request.headers) if resource is not None else None
        if entry is not None and self._serve_collapsed(ex, entry, FlightResult.STORED, "lease-wait"):
            await self._finish(ex, FlightResult.STORED, resource)
            return True
        if why == "timeout" and time.monotonic() >= deadline:
            ex.outcome.status.detail.append("lease-wait")
            self._origin_timed_out(ex)  # as its local waiters were answered
            await self._finish(ex, FlightResult.TIMED_OUT)
            return True
        return False  # fetch ourselves; our local waiters keep waiting for us

    def _origin_timed_out(self, ex: Exchange) -> None:
        """The fetch this request waited for outlived cache_origin_timeout_ms: the stale entry
        when stale-if-error allows it (RFC 5861 §4), else 504 (RFC 9110 §15.6.5)."""
        now, outcome, stale = time.time(), ex.outcome, ex.stored
        outcome.status.detail.append("origin-timeout")
        if stale is not None and sem.may_serve_stale_if_error(stale, ex.directives, now):
            outcome.status.fwd = "stale"
            self._serve_stale_if_error(ex, stale, now)
            return
        ex.reply = responses.gateway_timeout(now)
        outcome.why = WHY["origin-timeout"]
        outcome.label, outcome.result = MISS, "miss"

    def _fetch_deadline(self, flight: Flight) -> float:
        """When a fetch has outlived cache_origin_timeout_ms (time.monotonic()): the deadline its
        leader, its waiters and its lease waiters share."""
        return flight.started + self.service.settings.origin_timeout

    def origin_deadline(self, ex: Exchange) -> float | None:
        """Seconds from now until a forwarded request that leads its key's fetch (or revalidates
        a stored response) has outlived cache_origin_timeout_ms — the deadline its waiters share —
        or None for requests the cache does not wait on (passes, bypasses, ranges, no-cache)."""
        if ex.flight is not None:
            return self._fetch_deadline(ex.flight) - time.monotonic()
        if ex.revalidating is not None:
            return self.service.settings.origin_timeout
        return None

    def origin_sent(self, ex: Exchange) -> None:
        """The request ``ex`` leads reached the origin only after its deadline had passed
        (mitmproxy had no connection free for it): the origin's time, which its waiters share,
        starts now — else every request for the URL meanwhile would be an instant 504."""
        if ex.flight is not None:
            ex.flight.started = time.monotonic()

    def origin_answering(self, ex: Exchange) -> None:
        """The origin has sent the response headers of the fetch ``ex`` leads: its waiters wait
        for the rest (the deadline bounds the first byte only)."""
        if ex.flight is not None:
            ex.flight.answering = True

    def origin_timed_out(self, ex: Exchange) -> Response:
        """The origin gave no response headers by ``origin_deadline``: the answer for this
        request — the stale entry where stale-if-error allows it (RFC 5861 §4), else 504 (RFC
        9110 §15.6.5). The caller sends it, then calls ``abandon_fetch``."""
        self._origin_timed_out(ex)
        assert ex.reply is not None
        self.service.metrics.origin_timeouts.inc()
        return ex.reply

    async def abandon_fetch(self, ex: Exchange) -> None:
        """After ``origin_timed_out``: its waiters answer the same way at once, its lease is
        released; the origin's late answer is never stored (its connection is closed)."""
        await self._finish(ex, FlightResult.TIMED_OUT)
        self.complete(ex)

    def _serve_stale_if_error(self, ex: Exchange, stale: StoredResponse, now: float) -> None:
        """RFC 5861 §4: the origin failed (or took too long); answer with the stale entry."""
        ex.outcome.status.detail.append("stale-if-error")
        ex.outcome.stale_if_error = True
        self._serve(ex, stale, now, STALE, "stale", hit=False)

    def _serve_collapsed(self, ex: Exchange, entry: StoredResponse, result: FlightResult, detail: str | None) -> bool:
        """Answer from another request's fetch (``entry``: this request's variant of it)."""
        now, status = time.time(), ex.outcome.status
        if result is FlightResult.STALE_IF_ERROR:
            if not sem.may_serve_stale_if_error(entry, ex.directives, now):
                return False
            status.fwd = "stale"
            if detail:
                status.detail.append(detail)
            self._serve_stale_if_error(ex, entry, now)
            return True
        if sem.decide(entry, ex.directives, now).use is not sem.Use.FRESH:
            return False  # e.g. no-cache: every use needs its own validation
        status.collapsed = True
        if detail:
            status.detail.append(detail)
        self._serve(ex, entry, now, MISS, "miss", hit=False)
        return True

    async def _finish(self, ex: Exchange, result: FlightResult, resource: Resource | None = None) -> None:
        """Wake this request's waiters and release its lease (idempotent)."""
        if ex.flight is not None:
            self.service.coalescer.finish(ex.flight_key, ex.flight, result, resource)
            ex.flight = None
        if ex.lease_token is not None:
            token, ex.lease_token = ex.lease_token, None
            await self.service.store.release_lease(ex.key, token, ex.variant)

    # ------------------------------------------------------------------ stale-if-error path

    async def _refresh_in_foreground(self, ex: Exchange, stale: StoredResponse) -> None:
        req, outcome, service = ex.request, ex.outcome, self.service
        record = Revalidation(ex.key, req.url, False, time.time(), cause=outcome)
        result = await service.revalidator.refresh(
            Job(ex.key, req.url, req.headers, stale, outcome, _target(req), req.policy), max_body=FOREGROUND_MAX_BODY,
            base=ex.resource,
        )
        outcome.time("cache.origin_fetch", record.started)
        record.outcome = result.outcome
        service.revalidated(record)
        now = time.time()
        if result.fetched is not None:
            outcome.status.fwd_status = result.fetched.status
        if result.entry is not None:
            if result.outcome == "304":
                self._serve(ex, result.entry, now, HIT, "revalidated", hit=False)
                _add_cookies(ex, result.fetched)
            else:
                self._serve(ex, result.entry, now, MISS, "miss", hit=False)
            if result.stored:
                outcome.status.stored = True
                await self._finish(ex, FlightResult.STORED, (ex.resource or Resource(())).with_variant(result.entry))
            else:  # e.g. the 304 made it private: this client's answer alone
                if result.error:
                    outcome.status.detail.append(result.error)
                    outcome.not_stored = result.error
                await self._finish(ex, FlightResult.NOT_SHAREABLE)
            return
        if result.outcome == "error" and sem.may_serve_stale_if_error(stale, ex.directives, now):
            self._serve_stale_if_error(ex, stale, now)
            await self._finish(ex, FlightResult.STALE_IF_ERROR, ex.resource)
            return
        # Hand the origin's own answer to the client (not stored), or a 502 if there was none.
        ex.reply = responses.from_origin(result.fetched, result.error, head=req.method == "HEAD")
        outcome.label, outcome.result = MISS, "miss"
        if result.outcome == "kept":
            outcome.not_stored = result.error
        await self._finish(ex, FlightResult.NOT_SHAREABLE)

    # ------------------------------------------------------------------ response

    async def response(self, ex: Exchange, resp: Response) -> Response | None:
        """The origin's answer to a forwarded request: store, renew or invalidate.

        Returns the response to send instead of the origin's (a renewed entry after a 304, an
        unconditional refetch), or None to send the origin's as it is."""
        if ex.reply is not None:
            return None  # answered from the cache in the request hook
        try:
            return await self._on_response(ex, resp)
        finally:
            await self._finish(ex, FlightResult.NOT_SHAREABLE)  # no-op if already finished
            self.complete(ex)

    async def error(self, ex: Exchange) -> None:
        """The forwarded request failed (no response): waiters elect a new leader."""
        await self._finish(ex, FlightResult.FAILED)
        self.complete(ex)

    def complete(self, ex: Exchange) -> None:
        """Hand the finished outcome to the observers, once."""
        if not ex.completed:
            ex.completed = True
            self.service.finished(ex.outcome)

    async def _on_response(self, ex: Exchange, resp: Response) -> Response | None:
        service, req, outcome = self.service, ex.request, ex.outcome
        now = time.time()
        # RFC 9111 §4.2.3: request_time is when the request went upstream.
        resp = dataclasses.replace(resp, request_time=ex.forwarded_at or resp.request_time)
        if ex.forwarded_at is not None:
            outcome.time("cache.origin_fetch", ex.forwarded_at)
        state = on_response(req.method, req.url, ex.revalidating, resp.status, resp.headers)
        replacement: Response | None = None
        match state:
            case Ignore():
                return None
            case Invalidate(urls=urls):
                # Each URL keyed as a GET for it would be: under the rule that matches it.
                keys = [ex.key]
                for u in urls:
                    k = service.keys.for_url(u, service.policy_for_url(u, req.headers), req.headers)
                    if k is not None and k not in keys:
                        keys.append(k)
                removed = await service.invalidate(keys)
                log.debug(f"mitmcache: {req.method} {resp.status} invalidated {keys} ({removed} cached)")
                return None
            case Renew(entry=stale):
                service.metrics.revalidations.labels("304").inc()
                outcome.status.fwd_status = 304
                admission = await service.admit(
                    ex.key, "GET", req.headers, resp, ex.resource, now, revalidated=stale, policy=req.policy
                )
                assert admission.entry is not None  # a 304 merge always builds the entry
                outcome.status.stored = admission.resource is not None
                if admission.reason:
                    outcome.status.detail.append(admission.reason)
                    outcome.not_stored = admission.reason
                self._serve(ex, admission.entry, now, HIT, "revalidated", hit=False)
                _add_cookies(ex, resp)
                await self._finish(ex, FlightResult.STORED if admission.resource else FlightResult.NOT_SHAREABLE, admission.resource)
                return ex.reply
            case Refetch():
                service.bad_input("304-mismatch", f"304 for {ex.key!r} selects no stored response (its validators differ, or it has none while the entry has some: RFC 9111 §4.3.4)")
                fetched, error = await self._refetch_unconditionally(ex)
                replacement = responses.from_origin(fetched, error)
                resp = fetched if fetched is not None and fetched.body is not None else replacement
                now = time.time()
            case Admit():
                if ex.revalidating is not None and req.method == "GET":
                    service.metrics.revalidations.labels("200" if resp.status < 500 else "error").inc()
            case _:
                assert_never(state)

        if req.method == "HEAD" and resp.status == 200 and not ex.bypass:
            await self._freshen_from_head(ex, resp, now)
        outcome.status.fwd = outcome.status.fwd or "uri-miss"
        outcome.status.fwd_status = resp.status
        resource = None
        if req.method == "GET" and resp.status >= 500 and ex.stored is not None:
            # §4.3.3: the cache may act as if the origin had not answered: the stored response
            # stays (a 5xx never replaces it, whatever freshness it claims).
            outcome.status.detail.append("kept-stored")
            outcome.not_stored = "status"
        elif req.method == "GET" and not ex.bypass:
            admission = await service.admit(ex.key, "GET", req.headers, resp, ex.resource, now, policy=req.policy)
            resource = admission.resource
            if resource is not None and admission.entry is not None:
                outcome.status.stored = True
                outcome.status.ttl = int(admission.entry.ttl(now))
                outcome.entry = admission.entry
            elif admission.reason:
                if admission.reason not in outcome.status.detail:  # a streamed response said it already
                    outcome.status.detail.append(admission.reason)
                outcome.not_stored = admission.reason
            if resource is not None and ex.passing:
                service.metrics.hit_for_pass.labels("ended").inc()
        await self._finish(ex, FlightResult.STORED if resource else FlightResult.NOT_SHAREABLE, resource)
        outcome.label, outcome.result = MISS, "miss"
        if ex.strip_conditionals and outcome.entry is not None and resource is not None:
            # The client's own conditionals, answered from what was just stored (304 or 200).
            self._serve(ex, outcome.entry, now, MISS, "miss", hit=False)
            return ex.reply
        return replacement

    async def _refetch_unconditionally(self, ex: Exchange) -> tuple[Response | None, str | None]:
        """Ask the origin again without validators, with the cache's own client."""
        client = self.service.revalidator.client
        if client is None:
            return None, "no origin client"
        headers = [(k, v) for k, v in ex.request.headers if k.lower() not in ("if-none-match", "if-modified-since")]
        try:
            return await client.fetch("GET", ex.request.url, headers, FOREGROUND_MAX_BODY, _target(ex.request)), None
        except OriginError as e:
            return None, str(e)

    async def _freshen_from_head(self, ex: Exchange, resp: Response, now: float) -> None:
        """A forwarded HEAD's 200 updates (or marks stale) the stored GET response (§4.3.5),
        through the one store path."""
        if ex.stored is None:
            return
        admission = await self.service.admit(
            ex.key, "HEAD", ex.request.headers, resp, ex.resource, now, revalidated=ex.stored, policy=ex.request.policy
        )
        if admission.resource is not None and admission.entry is not None:
            ex.outcome.status.detail.append("head-freshened" if admission.entry.freshness else "head-marked-stale")

def _target(req: Request) -> bytes:
    """The request target as it went upstream (mitmproxy decoded it with surrogateescape):
    absolute-form when the client named another authority than the origin's, else origin-form."""
    target = req.path
    if req.authority and sem.normalize_authority(req.scheme, *split_host_port(req.authority)) != sem.normalize_authority(
        req.scheme, req.host, req.port
    ):
        target = f"{req.scheme}://{req.authority}{req.path}"
    return target.encode("utf-8", "surrogateescape")


def _add_cookies(ex: Exchange, origin: Response | None) -> None:
    """The client whose request got the 304 receives its Set-Cookie; the stored entry never
    holds one (RFC 9111 §3.2 merge, RFC 6265 §8.2)."""
    if ex.reply is None or origin is None:
        return
    cookies = tuple((k, v) for k, v in origin.headers if k.lower() in sem.NOT_SHARED)
    if cookies:
        ex.reply = dataclasses.replace(ex.reply, headers=ex.reply.headers + cookies)

