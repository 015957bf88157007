"""The cache service: one object that owns the store, the coalescer, the revalidator, the key
builder and the observers, with no mitmproxy imports. Addons configure it; the pipeline and
the revalidator work through it.

``admit`` is the one path by which an origin's answer enters the store (the response hook, 304
merges, HEAD freshening, background revalidation, stale-if-error, and later replay warm-up all
call it).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import semantics as sem
from .coalesce import Coalescer
from .keys import KeyBuilder
from .messages import Headers, Response
from .metrics import Metrics
from .outcome import MetricsObserver, Observer, Outcome, Revalidation
from .pipeline import Pipeline
from .policy import Policy, PolicySet
from .purge import Purger, groups_for, tags_of
from .revalidate import Revalidator
from .semantics import StoredResponse
from .store import HitForPass, Resource, TieredStore

log = logging.getLogger("mitmcache")

BAD_INPUT_LOG_INTERVAL = 60.0  # seconds between two log lines of one kind of bad input

# Why an answer makes its URL hit-for-pass: what the origin says of the URL itself. Reasons
# that depend on the request (its no-store, its Authorization) or on the origin's health (a
# 5xx status) do not: the next request may well get a storable answer.
PASS_REASONS = frozenset({
    sem.NotStorable.NO_STORE, sem.NotStorable.PRIVATE, sem.NotStorable.SET_COOKIE, sem.NotStorable.VARY_STAR,
    sem.NotStorable.TOO_LARGE, sem.NotStorable.NOT_CACHEABLE, sem.NotStorable.POLICY,
})
MAX_PASS_SECONDS = 300.0  # the longest a marker lives, whatever max-age the answer names
# refusal(): verdicts remembered by the lines they were read from (an origin repeats its
# answers' fields; Date changes once a second), for answers whose lines are short.
MEMO_SIZE = 1024
MEMO_FIELD_CHARS = 2048


@dataclass(frozen=True, slots=True)
class Settings:
    """What the pipeline reads of the options (compiled by the addons' ``configure``)."""

    max_object_bytes: int = 10485760  # bytes; larger bodies pass through unstored
    heuristic_cap: float = sem.DEFAULT_HEURISTIC_CAP  # seconds (RFC 9111 §4.2.2)
    coalesce_wait: float = 15.0  # seconds a request waits for another's fetch
    origin_timeout: float = 10.0  # seconds an origin may take; waiters give up on a fetch after it
    lease_ms: int = 5000  # milliseconds a fill lease lives in Valkey
    hit_for_pass: float = 10.0  # seconds a URL whose answer could not be stored is passed (0: never)
    # RFC 9213 target list: targeted fields that replace Cache-Control/Expires, in precedence order.
    targets: tuple[str, ...] = ("mitmcache-cache-control", sem.CDN_CACHE_CONTROL)
    # Fields naming a response's purge tags (lower case; cache_tag_headers), and whether
    # clients get them (cache_tag_headers_passthrough).
    tag_headers: tuple[str, ...] = ("surrogate-key", "cache-tag")
    tag_passthrough: bool = False


@dataclass(frozen=True, slots=True)
class Admission:
    """What ``admit`` did. ``entry``: the response built for storing (also when no tier took
    it); ``resource``: the URL's variants as stored, None when not stored, with ``reason`` (a
    Cache-Status detail: ``no-store``, ``private``, … ``too-large-for-l1``)."""

    entry: StoredResponse | None
    resource: Resource | None
    reason: str | None = None


class CacheService:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.settings = Settings()
        self.keys = KeyBuilder()
        self.store = TieredStore(self.metrics, 268435456)
        self.coalescer = Coalescer()
        self.revalidator = Revalidator(self)
        self.observers: list[Observer] = [MetricsObserver(self.metrics)]
        self.policies = PolicySet()
        # Which rule applies to a URL outside a flow (§4.4 targets, purge): set by the Policies addon.
        self.policy_for_url: Callable[[str, Headers], Policy | None] = lambda url, headers: None
        self.pipeline = Pipeline(self)
        self.purger = Purger(self)
        self._bad_input_logged: dict[str, float] = {}
        # refusal()'s verdicts: (status, request lines, response lines, over the size bound)
        # → (reason, malformed field kinds), for one Settings object.
        self._refusals: tuple[Settings | None, dict[tuple[object, ...], tuple[sem.NotStorable | None, tuple[str, ...]]]] = (None, {})

    # ------------------------------------------------------------------ the store path

    async def admit(
        self,
        key: str,
        method: str,
        request_headers: Headers,
        response: Response,
        base: Resource | None,
        now: float,
        revalidated: StoredResponse | None = None,
        policy: Policy | None = None,
    ) -> Admission:
        """Store an origin's answer to ``method key`` if RFC 9111 (and the operator's rule)
        allows it.

        ``revalidated`` is the stored response a 304 answers (§4.3.4: merged per §3.2), or that
        a forwarded HEAD's 200 describes (§4.3.5: merged, or marked stale when it disagrees);
        a merged entry is re-checked (a merge never lets private, no-store or Vary: * in) and
        dropped when nothing may be kept. Otherwise the answer is checked for storability (§3)
        and stored next to the URL's other variants in ``base`` (what the request saw; None:
        what L1 holds).
        ``policy`` (``cache_policy``) is judged before the spec: its overrides hide upstream
        prohibitions from the storability check, and its freshness replaces the derived one;
        the stored headers stay the origin's (less Set-Cookie with ``override=set-cookie``).
        """
        settings = self.settings
        for kind in sem.malformed_fields(response.headers):
            self.bad_input(kind, f"{sem.header_get(response.headers, kind)!r} for {key!r}")
        merged = revalidated is not None and (response.status == 304 or method == "HEAD")
        if merged:
            assert revalidated is not None
            merge = sem.freshen_with_head if method == "HEAD" else sem.merge_304
            entry = merge(
                revalidated, response.headers, response.request_time, response.response_time,
                settings.heuristic_cap, settings.targets,
            )
            judged = dataclasses.replace(entry, headers=policy.view(entry.headers)) if policy else entry
            refused = sem.merged_storability(judged, settings.targets)
            if refused is None and policy is not None and (policy.no_store or policy.bypass):
                refused = sem.NotStorable.POLICY
            if refused is not None:
                await self.invalidate([key])  # what is stored no longer describes a shareable response
                return Admission(entry, None, refused.value)
        else:
            body = response.body
            viewed = policy.view(response.headers) if policy else response.headers
            reason = sem.storability(
                method, response.status, request_headers, viewed,
                len(body) if body is not None else response.too_large, settings.max_object_bytes, settings.targets,
            )
            if policy is not None:
                if reason is sem.NotStorable.AUTHORIZATION and "authorization" in policy.key_headers:
                    reason = None  # each credential gets its own entry (the key holds it)
                reason = policy.storability(response.status, reason)
            if reason is not None:
                if base is None:
                    await self._mark_pass(key, response, reason, now, request_headers, policy)
                return Admission(None, None, reason.value)
            assert body is not None
            stored = response.headers
            if policy is not None and "set-cookie" in policy.override:
                stored = tuple((k, v) for k, v in stored if k.lower() not in sem.NOT_SHARED)
            entry = sem.make_stored_response(
                response.status, response.reason, request_headers, stored, body,
                response.request_time, response.response_time, settings.heuristic_cap, settings.targets,
            )
        if policy is not None:
            entry = policy.apply(entry, settings.targets)
        if entry.retain_until() <= now:
            if merged:  # the stored response no longer describes the resource, and cannot stay
                await self.invalidate([key])
            elif base is None:
                await self._mark_pass(key, response, sem.NotStorable.NOT_CACHEABLE, now, request_headers, policy)
            return Admission(None, None, sem.NotStorable.NOT_CACHEABLE.value)
        url_key = self.keys.base(key)
        tags = tags_of(entry.headers, settings.tag_headers)
        resource = await self.store.put(
            key, entry, now, base=base, l1_ttl=policy.l1_ttl if policy else None,
            index=url_key if url_key != key else None, groups=groups_for(key, tags),
        )
        if resource is None:
            # L2 did not take it, and L1 either cannot hold it or may not (its node's
            # invalidation listener is lost: no copy it could not keep coherent).
            return Admission(entry, None, "too-large-for-l1" if self.store.l1_coherent(key) else "l2-down")
        return Admission(entry, resource)

    async def _mark_pass(
        self, key: str, response: Response, reason: sem.NotStorable, now: float,
        request_headers: Headers = (), policy: Policy | None = None,
    ) -> None:
        """Hit-for-pass (Varnish): a URL with nothing stored answered with something no one may
        share; its next requests skip the lookup, the lease and coalescing for the answer's own
        max-age, else ``hit_for_pass`` seconds (at most MAX_PASS_SECONDS). Callers pass only
        URLs with nothing stored, so a marker never hides another variant. Not for answers to
        requests with Authorization (``_personal``), for reasons
        that depend on the request or for a 5xx (a failing origin's next answer may be
        storable, and coalescing is what protects it then)."""
        if _personal(request_headers, policy) or not self._marks(key, reason, response.status, now):
            return
        max_age = sem.ResponseDirectives.from_headers(response.headers, self.settings.targets).max_age
        lifetime = min(float(max_age) if max_age else self.settings.hit_for_pass, MAX_PASS_SECONDS)
        await self.store.mark_pass(key, HitForPass(now + lifetime, reason.value), now)

    def _marks(self, key: str, reason: sem.NotStorable, status: int, now: float) -> bool:
        """Whether an answer refused for ``reason`` sets (or renews) the URL's marker: only
        reasons that describe the URL itself, never a 5xx, and a live marker only when half
        spent (a passed request's answer does not rewrite it every time)."""
        if reason not in PASS_REASONS or status >= 500 or self.settings.hit_for_pass <= 0:
            return False
        return self.store.pass_left(key, now) <= self.settings.hit_for_pass / 2

    def refusal(
        self, key: str, status: int, request_headers: sem.HeaderList, response_headers: sem.HeaderList,
        body_length: int, request_time: float, response_time: float, now: float,
    ) -> sem.NotStorable | None:
        """For a GET sent upstream by a hit-for-pass marker (nothing stored, no operator rule):
        why its whole answer is not stored, when ``admit`` would do nothing but say so — count
        malformed fields and refuse (RFC 9111 §3, or no lifetime left), the marker needing no
        renewal. None when ``admit`` must run: the answer is storable (storing it ends the
        marker), or it renews the marker. Header lists may hold just the lines ``storability``,
        ``malformed_fields`` and the stored lifetime read (``sem.STORABILITY_*_FIELDS`` and the
        targeted fields); times as ``admit`` gets them (request_time: when it went upstream)."""
        settings = self.settings
        memo_key = (status, tuple(request_headers), tuple(response_headers), body_length > settings.max_object_bytes)
        if self._refusals[0] is not settings:
            self._refusals = (settings, {})
        memo = self._refusals[1]
        found = memo.get(memo_key)
        if found is None:
            reason = sem.storability(
                "GET", status, request_headers, response_headers, body_length, settings.max_object_bytes, settings.targets
            )
            found = (reason, tuple(sem.malformed_fields(response_headers)))
            if sum(len(v) for _, v in (*request_headers, *response_headers)) <= MEMO_FIELD_CHARS:  # a small memo
                if len(memo) >= MEMO_SIZE:
                    del memo[next(iter(memo))]  # the oldest
                memo[memo_key] = found
        reason, malformed = found
        if reason is None:
            # Storable by §3, but admit keeps nothing without lifetime left (``no-freshness``:
            # e.g. a 200 without Cache-Control, Expires or Last-Modified): the same entry, no body.
            entry = sem.make_stored_response(
                status, "", request_headers, response_headers, b"", request_time, response_time,
                settings.heuristic_cap, settings.targets,
            )
            if entry.retain_until() > now:
                return None
            reason = sem.NotStorable.NOT_CACHEABLE
        if not _personal(request_headers, None) and self._marks(key, reason, status, now):
            return None
        for kind in malformed:
            self.bad_input(kind, f"{sem.header_get(response_headers, kind)!r} for {key!r}")
        return reason

    async def invalidate(self, keys: list[str]) -> int:
        """Drop every variant of ``keys`` from L1 and L2 (§4.4, purge), and every key that
        holds request values under them (key_headers); returns L1's count."""
        keys = list(dict.fromkeys(self.keys.base(k) for k in keys))
        removed = await self.store.delete(keys)
        self.metrics.invalidations.inc(len(keys))
        return removed

    # ------------------------------------------------------------------ observers

    def started(self, outcome: Outcome) -> None:
        for observer in self.observers:
            observer.started(outcome)

    def finished(self, outcome: Outcome) -> None:
        for observer in self.observers:
            observer.finished(outcome)

    def revalidated(self, record: Revalidation) -> None:
        record.ended = record.ended or time.time()
        for observer in self.observers:
            observer.revalidated(record)

    def bad_input(self, kind: str, message: str) -> None:
        """Count malformed input; log it, at most once a minute per kind (no log floods)."""
        self.metrics.bad_input.labels(kind).inc()
        now = time.monotonic()
        if now - self._bad_input_logged.get(kind, -BAD_INPUT_LOG_INTERVAL) >= BAD_INPUT_LOG_INTERVAL:
            self._bad_input_logged[kind] = now
            log.info(f"mitmcache: malformed {kind}: {message} (counted in mitmcache_bad_input_total)")


def _personal(request_headers: sem.HeaderList, policy: Policy | None) -> bool:
    """An answer to a request with credentials is personal whatever it says (RFC 9111 §3.5):
    its ``private`` or ``no-store`` tells nothing about the URL's other answers, so it sets no
    hit-for-pass marker — unless the operator's rule keys on the credential (then the key is
    the credential's own)."""
    return bool(sem.header_values(request_headers, "authorization")) and not (
        policy is not None and "authorization" in policy.key_headers
    )
