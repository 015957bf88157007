"""OpenTelemetry spans from outcomes (optional extra ``mitmcache[tracing]``).

Each request gets a span ``mitmcache.request`` carrying ``cache.status``, ``cache.key``
(hashed: URLs may hold secrets), ``cache.tier`` and ``cache.ttl_remaining_ms``, with a child
span per timed step (``cache.l2_lookup``, ``cache.coalesce_wait``, ``cache.lease_wait``,
``cache.origin_fetch``). A revalidation gets a span ``mitmcache.revalidate``: a child of its
request when it runs in the foreground, and linked to the request that queued it when it runs
in the background (it outlives that request). The reference design tagged its spans with cache
status, key and remaining TTL.
"""

from __future__ import annotations

import xxhash
from opentelemetry import trace

from .outcome import Outcome, Revalidation

SPAN_KEY = "otel.span"


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def hashed_key(key: str) -> str:
    """The cache key as it appears on spans: a 64-bit hash, hex (keys may hold tokens)."""
    return xxhash.xxh3_64_hexdigest(key.encode("utf-8", "surrogateescape"))


class TracingObserver:
    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self.tracer = tracer or trace.get_tracer("mitmcache")

    def started(self, outcome: Outcome) -> None:
        span = self.tracer.start_span(
            "mitmcache.request",
            start_time=_ns(outcome.started),
            attributes={"http.request.method": outcome.method, "cache.key": hashed_key(outcome.key)},
        )
        outcome.context[SPAN_KEY] = span

    def finished(self, outcome: Outcome) -> None:
        span = outcome.context.get(SPAN_KEY)
        if not isinstance(span, trace.Span):
            return
        span.set_attribute("cache.status", outcome.label or "BYPASS")
        span.set_attribute("cache.detail", outcome.status.render())
        if outcome.tier is not None:
            span.set_attribute("cache.tier", outcome.tier)
        if outcome.ttl_remaining is not None:
            span.set_attribute("cache.ttl_remaining_ms", int(outcome.ttl_remaining * 1000))
        parent = trace.set_span_in_context(span)
        for step in outcome.timings:
            child = self.tracer.start_span(step.name, context=parent, start_time=_ns(step.start))
            child.end(end_time=_ns(step.end))
        span.end()

    def revalidated(self, record: Revalidation) -> None:
        cause = record.cause.context.get(SPAN_KEY) if record.cause is not None else None
        context, links = None, []
        if isinstance(cause, trace.Span):
            if record.background:
                links = [trace.Link(cause.get_span_context())]
            else:
                context = trace.set_span_in_context(cause)
        span = self.tracer.start_span(
            "mitmcache.revalidate",
            context=context,
            links=links,
            start_time=_ns(record.started),
            attributes={
                "cache.key": hashed_key(record.key),
                "cache.revalidation.outcome": record.outcome,
                "cache.revalidation.background": record.background,
            },
        )
        span.end(end_time=_ns(record.ended))
