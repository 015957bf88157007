"""One record per request of what the cache did, and its consumers (observers).

The pipeline fills an ``Outcome`` as it goes; when the request is answered it is rendered once:
into ``X-Cache-Status`` / ``Cache-Status`` (RFC 9211) and the flow's comment and metadata by
the ``HttpCache`` addon, into Prometheus counters by ``MetricsObserver``, into spans by the
tracing observer. Modelled on hishel's ``ResponseMetadata`` set by its spec states.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from .metrics import REQUEST_RESULTS, Metrics
from .semantics import CacheStatus, StoredResponse

# X-Cache-Status labels and the requests_total result each one counts as.
HIT, MISS, STALE = "HIT", "MISS", "STALE"

# Why a stored response was not used, or an answer not stored: the rule, for cache.explain.
WHY = {
    "uri-miss": "nothing stored for this URL (RFC 9111 §4)",
    "vary-miss": "stored responses for this URL were selected by other request header values (RFC 9111 §4.1)",
    "stale": "the stored response is stale and may not be served stale (RFC 9111 §4.2.4)",
    "request": "the request's Cache-Control (no-cache, max-age or min-fresh) asks for a validated response (RFC 9111 §5.2.1)",
    "no-cache": "the stored response says no-cache: it is validated on every use (RFC 9111 §5.2.2.4)",
    "only-if-cached": "only-if-cached and nothing usable stored: 504 (RFC 9111 §5.2.1.7)",
    "origin-timeout": "the fetch this request waited for took longer than cache_origin_timeout_ms: 504 (RFC 9110 §15.6.5)",
    "range": "a Range request without a usable stored response goes to the origin as it is (RFC 9111 §3.3)",
    "method": "only responses to GET are stored (RFC 9111 §3)",
    "status": "final status codes only; 206 and 304 are not stored (RFC 9111 §3, §3.3)",
    "request-no-store": "the request said no-store (RFC 9111 §5.2.1.5)",
    "no-store": "the response said no-store (RFC 9111 §5.2.2.5)",
    "private": "the response said private: a shared cache must not store it (RFC 9111 §5.2.2.7)",
    "authorization": "a request with Authorization, and no public, s-maxage or must-revalidate (RFC 9111 §3.5)",
    "set-cookie": "the response sets a cookie: never shared (RFC 6265 §8.2)",
    "vary-star": "Vary: * can never match a later request (RFC 9110 §12.5.5)",
    "too-large": "the body exceeds cache_max_object_bytes",
    "too-large-for-l1": "the entry alone exceeds cache_l1_max_bytes and L2 did not take it",
    "l2-down": (
        "Valkey could not take it, and L1 keeps no copy of a key whose node's invalidation listener "
        "is lost (cache_l1_fallback_ttl=0)"
    ),
    "no-freshness": (
        "no freshness: no max-age, s-maxage or Expires, and no heuristic (that needs a heuristically "
        "cacheable status and a Last-Modified older than Date), or no lifetime left (RFC 9111 §3, §4.2.2)"
    ),
    "incomplete": "the body was not read whole (streamed)",
    "policy": "an operator rule (cache_policy) says not to store it: no_store, bypass, or a zero ttl/error_ttl",
    "bypass": "an operator rule (cache_policy) says bypass: the cache does not handle this request",
    "hit-for-pass": (
        "hit-for-pass: this URL's last answer could not be stored or shared, so it goes straight to "
        "the origin (no lookup, no waiting for another request) until the marker expires or an "
        "answer can be stored"
    ),
}


@dataclass(frozen=True, slots=True)
class Timing:
    """A timed step of one request (a child span): ``cache.l2_lookup``, ``cache.lease_wait``,
    ``cache.origin_fetch``. Epoch seconds."""

    name: str
    start: float
    end: float


@dataclass(slots=True)
class Outcome:
    """What happened to one request. ``label`` is None until the cache answers or the origin's
    answer passes through (and stays None for requests the cache does not handle)."""

    key: str
    method: str
    started: float = field(default_factory=time.time)
    label: str | None = None  # HIT | MISS | STALE
    result: str | None = None  # requests_total{result}: hit, miss, stale, revalidated
    status: CacheStatus = field(default_factory=CacheStatus)
    tier: str | None = None  # l1 | l2: where the lookup found the URL
    entry: StoredResponse | None = None  # the stored response served, renewed or stored
    not_modified: bool = False  # answered the client's own conditional with 304
    age: float | None = None  # seconds, of the served entry when served
    not_stored: str | None = None  # why the origin's answer was not stored (Cache-Status detail)
    why: str | None = None  # for a MISS: why no stored response was used, with the RFC rule
    stale_if_error: bool = False
    timings: list[Timing] = field(default_factory=list)
    # Observers keep their own per-request state here (e.g. the tracing span).
    context: dict[str, object] = field(default_factory=dict)

    def time(self, name: str, start: float) -> None:
        self.timings.append(Timing(name, start, time.time()))

    @property
    def ttl_remaining(self) -> float | None:
        """Seconds of freshness left of the served or stored entry at answer time."""
        return float(self.status.ttl) if self.status.ttl is not None else None

    def comment(self, rendered: str | None = None) -> str:
        """The one-line summary shown in mitmweb's flow list, e.g. ``cache HIT (l1, age=3s)``
        (``rendered``: the Cache-Status value, if already rendered)."""
        if self.result == "revalidated":
            return f"cache {self.label} revalidated ({rendered or self.status.render()})"
        if self.age is not None:
            not_modified = " 304" if self.not_modified else ""
            return f"cache {self.label}{not_modified} ({'/'.join(self.status.detail)}, age={int(self.age)}s)"
        return f"cache {self.label} ({rendered or self.status.render()})"

    def summary(self, rendered: str | None = None) -> dict[str, object]:
        """Plain values for ``flow.metadata`` (written to flow files) and ``cache.explain``."""
        out: dict[str, object] = {
            "x-cache-status": self.label,
            "cache-status": rendered or self.status.render(),
            "key": self.key,
            "tier": self.tier,
        }
        entry = self.entry
        if entry is not None:
            out.update(
                age=None if self.age is None else int(self.age),
                freshness_lifetime=entry.freshness,
                ttl=self.status.ttl,
                heuristic=entry.heuristic,
                stale_while_revalidate=entry.stale_while_revalidate,
                stale_if_error=entry.stale_if_error,
                never_serve_stale=entry.never_serve_stale,
                variant=dict((k, v) for k, v in entry.vary),
                etag=entry.etag,
                last_modified=entry.last_modified,
            )
        if self.why:
            out["why"] = self.why
        if self.not_stored:
            out["not_stored"] = self.not_stored
            out["not_stored_why"] = WHY.get(self.not_stored, self.not_stored)
        return out


@dataclass(slots=True)
class Revalidation:
    """One revalidation of a stored response, foreground or background (RFC 9111 §4.3)."""

    key: str
    url: str
    background: bool
    started: float
    ended: float = 0.0
    outcome: str = ""  # 304, 200, error, kept, skipped
    cause: Outcome | None = None  # the request that queued it (tracing links to it)


class Observer(Protocol):
    """A consumer of outcomes. Calls happen on the event loop and must not block."""

    def started(self, outcome: Outcome) -> None: ...

    def finished(self, outcome: Outcome) -> None: ...

    def revalidated(self, record: Revalidation) -> None: ...


class MetricsObserver:
    """Renders outcomes into the Prometheus counters that describe requests."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._requests = {result: metrics.requests.labels(result) for result in REQUEST_RESULTS}
        self._not_stored: dict[str, object] = {}  # labelled children, looked up once per reason

    def started(self, outcome: Outcome) -> None:
        pass

    def finished(self, outcome: Outcome) -> None:
        if outcome.result is not None:
            self._requests[outcome.result].inc()
        if outcome.not_stored is not None and outcome.method == "GET":
            child = self._not_stored.get(outcome.not_stored)
            if child is None:
                child = self._not_stored[outcome.not_stored] = self.metrics.not_stored.labels(outcome.not_stored)
            child.inc()  # type: ignore[attr-defined]
        if outcome.stale_if_error:
            self.metrics.stale_if_error.inc()

    def revalidated(self, record: Revalidation) -> None:
        pass
