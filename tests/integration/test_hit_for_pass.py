"""Hit-for-pass: a URL whose answer could not be stored or shared goes straight upstream for a
while — no L2 read, no lease, no waiting behind another request — until an answer can be stored.

In-process pipeline against the real counting origin, and two services on real Valkey nodes
(one proxy's marker is every proxy's).
"""

from __future__ import annotations

import asyncio
import dataclasses
from urllib.parse import quote

import pytest

from mitmcache.ring import parse_valkey_urls
from mitmcache.service import CacheService
from mitmcache.valkey_nodes import ValkeyNode
from mitmcache.valkey_tier import ValkeyTier
from tests.driver import Driver, running_service
from tests.origin import Origin

LONG = quote("max-age=60")


def hfp(service: CacheService, event: str) -> float | None:
    return service.metrics.registry.get_sample_value("mitmcache_hit_for_pass_total", {"event": event})


@pytest.mark.parametrize(
    "query, reason",
    [
        pytest.param("cc=no-store", "no-store", id="no-store §5.2.2.5"),
        pytest.param(f"cc={quote('private, max-age=60')}", "private", id="private §5.2.2.7"),
        pytest.param(f"cc={LONG}&cookie=1", "set-cookie", id="Set-Cookie"),
        pytest.param(f"cc={LONG}&vary=*", "vary-star", id="Vary: * RFC 9110 §12.5.5"),
        pytest.param("nodate=0", "no-freshness", id="no freshness, no validator"),
    ],
)
async def test_unshareable_answer_sends_the_next_request_straight_upstream(
    driver: Driver, service: CacheService, origin: Origin, query: str, reason: str
) -> None:
    path = f"/hfp-{reason}?{query}"
    first = await driver.send("GET", path)
    assert (first.status, first.label) == (200, "MISS")
    assert reason in first.cache_status and "hit-for-pass" not in first.cache_status
    second = await driver.send("GET", path)
    assert (second.status, second.label) == (200, "MISS")
    assert second.body is not None and second.body.startswith(f"/hfp-{reason} #2".encode())
    assert "fwd=uri-miss" in second.cache_status and "detail=hit-for-pass" in second.cache_status
    assert second.outcome.why and reason in second.outcome.why
    assert origin.count(path) == 2
    assert (hfp(service, "marked"), hfp(service, "passed")) == (1, 1)


async def test_a_storable_answer_ends_the_marker_at_once(driver: Driver, service: CacheService, origin: Origin) -> None:
    path = f"/hfp-end?cc=no-store&then_cc={LONG}"
    await driver.send("GET", path)
    passed = await driver.send("GET", path)
    assert "hit-for-pass" in passed.cache_status and "stored" in passed.cache_status
    hit = await driver.send("GET", path)
    assert (hit.label, hit.body) == ("HIT", b"/hfp-end #2")
    assert origin.count(path) == 2
    assert hfp(service, "ended") == 1


async def test_cacheable_url_is_never_passed(driver: Driver, service: CacheService, origin: Origin) -> None:
    path = f"/hfp-never?cc={LONG}"
    assert (await driver.send("GET", path)).label == "MISS"
    assert (await driver.send("GET", path)).label == "HIT"
    assert (hfp(service, "marked"), hfp(service, "passed")) == (0, 0)


async def test_a_failing_origin_is_not_passed(driver: Driver, service: CacheService, origin: Origin) -> None:
    # A 5xx says nothing about the URL: the next answer may be storable, and coalescing
    # must keep protecting the origin meanwhile.
    path = f"/hfp-5xx?status=503&then_status=200&then_cc={LONG}"
    assert (await driver.send("GET", path)).status == 503
    again = await driver.send("GET", path)
    assert again.status == 200 and "hit-for-pass" not in again.cache_status
    assert hfp(service, "marked") == 0


async def test_request_dependent_reasons_do_not_mark_the_url(driver: Driver, service: CacheService) -> None:
    path = f"/hfp-auth?cc={LONG}"
    await driver.send("GET", path, [("Authorization", "Bearer a")])  # §3.5: not stored for this request
    await driver.send("GET", path, [("Cache-Control", "no-store")])  # §5.2.1.5: this request only
    assert (await driver.send("GET", path)).label == "MISS"
    assert (await driver.send("GET", path)).label == "HIT"
    assert hfp(service, "marked") == 0


async def test_a_private_variant_never_hides_the_stored_ones(driver: Driver, service: CacheService) -> None:
    path = f"/hfp-vary?cc={LONG}&vary=Accept&then_cc=private"
    assert "stored" in (await driver.send("GET", path, [("Accept", "a")])).cache_status
    private = await driver.send("GET", path, [("Accept", "b")])
    assert "private" in private.cache_status
    assert (await driver.send("GET", path, [("Accept", "a")])).label == "HIT"
    assert hfp(service, "marked") == 0


async def test_only_if_cached_on_a_passed_url_is_504(driver: Driver, origin: Origin) -> None:
    path = "/hfp-oic?cc=no-store"
    await driver.send("GET", path)
    answer = await driver.send("GET", path, [("Cache-Control", "only-if-cached")])
    assert answer.status == 504 and origin.count(path) == 1


async def test_zero_turns_it_off(driver: Driver, service: CacheService, origin: Origin) -> None:
    service.settings = dataclasses.replace(service.settings, hit_for_pass=0)
    path = "/hfp-off?cc=no-store"
    await driver.send("GET", path)
    assert "hit-for-pass" not in (await driver.send("GET", path)).cache_status
    assert hfp(service, "marked") == 0


async def test_concurrent_requests_to_a_passed_url_do_not_wait_for_each_other(
    driver: Driver, service: CacheService, origin: Origin
) -> None:
    # The origin holds each request until all 16 are in: if any waited for another's fetch
    # (coalescing), the barrier would break and answer 504.
    path = "/hfp-barrier?cc=no-store&barrier=16"
    await driver.send("GET", path)
    answers = await asyncio.gather(*(driver.send("GET", path) for _ in range(16)))
    assert [a.status for a in answers] == [200] * 16
    assert all("hit-for-pass" in a.cache_status for a in answers)
    assert origin.count(path) == 17
    assert service.metrics.registry.get_sample_value("mitmcache_coalesced_total") == 0


async def test_the_marker_is_shared_through_l2(ring_nodes: list[ValkeyNode], origin: Origin) -> None:
    urls = ",".join(n.url for n in ring_nodes)
    async with running_service() as a, running_service() as b:
        for s in (a, b):
            s.store.attach_l2(ValkeyTier(parse_valkey_urls(urls), "hfp", 250, s.metrics, s.store.forget_node))
        da, db = Driver(a, origin), Driver(b, origin)
        path = "/hfp-l2?cc=no-store&then_cc=" + LONG
        await da.send("GET", path)
        on_b = await db.send("GET", path)
        assert "detail=hit-for-pass" in on_b.cache_status and on_b.outcome.tier == "l2"
        assert "stored" in on_b.cache_status  # B's answer was storable: the marker ends for all
        # A still holds its own L1 marker (harmless: a pass is a miss), and ends it the same way.
        on_a = await da.send("GET", path)
        assert "hit-for-pass" in on_a.cache_status and "stored" in on_a.cache_status
        assert (await da.send("GET", path)).label == "HIT"
        assert (await db.send("GET", path)).label == "HIT"
        assert origin.count(path) == 3
        assert hfp(b, "passed") == 1 and hfp(a, "marked") == 1
        await da.aclose()
        await db.aclose()
