"""tracing.py: the spans the TracingObserver makes of real requests through the pipeline.

Requests go through ``tests/driver.py`` to the real local origin; spans are collected by the
SDK's in-memory exporter. Entries that must be stale at once are made with ``date=10`` (the
origin dates its answer ten seconds back) instead of waiting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mitmcache.ring import parse_valkey_urls
from mitmcache.service import CacheService
from mitmcache.tracing import TracingObserver, hashed_key
from mitmcache.valkey_tier import ValkeyTier
from tests.conftest import running_nodes
from tests.driver import Answer, Driver, running_service, wait_until
from tests.origin import Origin


@dataclass
class Traced:
    service: CacheService
    driver: Driver
    exporter: InMemorySpanExporter

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def request_span(self, answer: Answer) -> ReadableSpan:
        """The ``mitmcache.request`` span of one answered request."""
        span = answer.outcome.context["otel.span"]
        context = span.get_span_context()  # type: ignore[attr-defined]
        (found,) = [s for s in self.spans("mitmcache.request") if s.context.span_id == context.span_id]
        return found

    def children(self, parent: ReadableSpan) -> dict[str, ReadableSpan]:
        return {
            s.name: s
            for s in self.exporter.get_finished_spans()
            if s.parent is not None and s.parent.span_id == parent.context.span_id
        }


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    e = InMemorySpanExporter()
    yield e
    e.clear()


@pytest.fixture
async def traced(origin: Origin, exporter: InMemorySpanExporter) -> AsyncIterator[Traced]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with running_service() as service:
        service.observers.append(TracingObserver(provider.get_tracer("test")))
        driver = Driver(service, origin)
        yield Traced(service, driver, exporter)
        await driver.aclose()
    provider.shutdown()


async def test_miss_and_hit_spans_carry_status_hashed_key_tier_and_ttl(traced: Traced, origin: Origin) -> None:
    path = f"/traced?cc={quote('max-age=60')}"
    miss = await traced.driver.send("GET", path)
    hit = await traced.driver.send("GET", path)
    assert (miss.label, hit.label) == ("MISS", "HIT")

    miss_span, hit_span = traced.request_span(miss), traced.request_span(hit)
    assert len(traced.spans("mitmcache.request")) == 2
    assert miss_span.attributes is not None and hit_span.attributes is not None
    assert miss_span.attributes["cache.status"] == "MISS"
    assert hit_span.attributes["cache.status"] == "HIT"
    key = traced.service.keys.build("http", "127.0.0.1", origin.port, path)
    for span in (miss_span, hit_span):
        hashed = span.attributes["cache.key"]  # type: ignore[index]
        assert hashed == hashed_key(key)
        assert isinstance(hashed, str) and "/traced" not in hashed and "127.0.0.1" not in hashed
    assert hit_span.attributes["cache.tier"] == "l1"
    ttl = hit_span.attributes["cache.ttl_remaining_ms"]
    assert isinstance(ttl, int) and 0 < ttl <= 60_000

    fetch = traced.children(miss_span)["cache.origin_fetch"]
    assert fetch.parent is not None
    assert (fetch.parent.trace_id, fetch.parent.span_id) == (miss_span.context.trace_id, miss_span.context.span_id)
    assert fetch.context.trace_id == miss_span.context.trace_id
    assert traced.children(hit_span) == {}  # a HIT goes nowhere


async def test_background_revalidation_span_links_to_the_request_that_queued_it(traced: Traced, origin: Origin) -> None:
    path = f"/traced-swr?cc={quote('max-age=2, stale-while-revalidate=60')}&etag=v1&date=10"
    await traced.driver.send("GET", path)
    stale = await traced.driver.send("GET", path)
    assert stale.label == "STALE" and "reval-queued" in stale.cache_status

    await wait_until(lambda: bool(traced.spans("mitmcache.revalidate")), what="the revalidation span")
    (reval,) = traced.spans("mitmcache.revalidate")
    cause = traced.request_span(stale).context
    assert [(link.context.trace_id, link.context.span_id) for link in reval.links] == [(cause.trace_id, cause.span_id)]
    assert reval.parent is None  # it outlives the request: linked, not a child
    assert reval.attributes is not None
    assert reval.attributes["cache.revalidation.background"] is True
    assert reval.attributes["cache.revalidation.outcome"] == "304"
    assert reval.attributes["cache.key"] == hashed_key(stale.outcome.key)
    assert origin.requests_for(path)[1].headers.get("if-none-match") == '"v1"'


async def test_foreground_revalidation_span_is_a_child_of_its_request(traced: Traced, origin: Origin) -> None:
    path = f"/traced-sie?cc={quote('max-age=2, stale-if-error=60')}&etag=v1&date=10"
    await traced.driver.send("GET", path)
    with origin.failing_with("/traced-sie", 503):
        stale = await traced.driver.send("GET", path)
    assert stale.label == "STALE" and "stale-if-error" in stale.cache_status

    request_span = traced.request_span(stale)
    reval = traced.children(request_span)["mitmcache.revalidate"]
    assert reval.links == ()
    assert reval.attributes is not None
    assert reval.attributes["cache.revalidation.background"] is False
    assert reval.attributes["cache.revalidation.outcome"] == "error"


async def test_miss_with_l2_ring_has_an_l2_lookup_child(traced: Traced, origin: Origin) -> None:
    service = traced.service
    with running_nodes(1) as nodes:
        urls = ",".join(n.url for n in nodes)
        service.store.attach_l2(ValkeyTier(parse_valkey_urls(urls), "test", 250, service.metrics, service.store.forget_node))
        try:
            miss = await traced.driver.send("GET", f"/traced-l2?cc={quote('max-age=60')}")
        finally:
            await service.store.close()
    assert miss.label == "MISS"
    children = traced.children(traced.request_span(miss))
    assert {"cache.l2_lookup", "cache.origin_fetch"} <= children.keys()
    lookup = children["cache.l2_lookup"]
    assert lookup.start_time is not None and lookup.end_time is not None and lookup.start_time <= lookup.end_time
