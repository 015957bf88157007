"""The pipeline in-process against the real local origin: what a client sees, request by request.

``tests/driver.py`` plays mitmproxy's part (forwarding, handing answers back); the origin counts
what reaches it. Stale entries are made by waiting: ``Date`` has whole seconds, so entries use
``max-age=2`` and the tests wait a little over three seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import zlib
from urllib.parse import quote

import pytest

from mitmcache.service import CacheService
from tests.driver import Driver, running_service, wait_until
from tests.origin import Origin, _Handler

SHORT = quote("max-age=2")
LONG = quote("max-age=60")
PAST_SHORT = 3.2  # seconds: a max-age=2 entry is stale after this, whatever the Date rounding


def requests_total(service: CacheService, result: str) -> float | None:
    return service.metrics.registry.get_sample_value("mitmcache_requests_total", {"result": result})


def sample(service: CacheService, name: str, labels: dict[str, str] | None = None) -> float | None:
    return service.metrics.registry.get_sample_value(name, labels or {})


async def stale_by_waiting() -> None:
    await asyncio.sleep(PAST_SHORT)


# ----------------------------------------------------------------------------- store and serve


async def test_miss_is_stored_and_served_as_hit(driver: Driver, service: CacheService, origin: Origin) -> None:
    path = f"/hit?cc={LONG}"
    miss = await driver.send("GET", path)
    assert (miss.status, miss.label, miss.body) == (200, "MISS", b"/hit #1")
    assert "fwd=uri-miss" in miss.cache_status and "stored" in miss.cache_status

    hit = await driver.send("GET", path)
    assert (hit.status, hit.label) == (200, "HIT")
    assert hit.body == miss.body
    assert hit.header("Age") is not None and int(hit.header("Age") or "") >= 0
    assert hit.cache_status.startswith("mitmcache; hit") and "detail=l1" in hit.cache_status
    assert origin.count(path) == 1
    assert requests_total(service, "miss") == 1
    assert requests_total(service, "hit") == 1


async def test_vary_keeps_one_variant_per_request_header_value(driver: Driver, origin: Origin) -> None:
    path = f"/vary?cc={LONG}&vary=Accept"
    text = await driver.send("GET", path, [("Accept", "text/plain")])
    json = await driver.send("GET", path, [("Accept", "application/json")])
    assert (text.label, text.body) == ("MISS", b"/vary #1 Accept=text/plain")
    assert (json.label, json.body) == ("MISS", b"/vary #2 Accept=application/json")
    assert "fwd=vary-miss" in json.cache_status

    for accept, body in [("text/plain", text.body), ("application/json", json.body)]:
        again = await driver.send("GET", path, [("Accept", accept)])
        assert (again.label, again.body) == ("HIT", body), accept
    assert origin.count(path) == 2


async def test_head_is_answered_from_stored_get_without_body(driver: Driver, origin: Origin) -> None:
    path = f"/head?cc={LONG}&size=1234"
    get = await driver.send("GET", path)
    assert get.body == b"x" * 1234

    head = await driver.send("HEAD", path)
    assert (head.status, head.label, head.body) == (200, "HIT", b"")
    assert head.header("Content-Length") == "1234"
    assert origin.count(path) == 1


async def test_only_if_cached_with_nothing_stored_is_504_and_origin_untouched(
    driver: Driver, service: CacheService, origin: Origin
) -> None:
    path = f"/oic?cc={LONG}"
    answer = await driver.send("GET", path, [("Cache-Control", "only-if-cached")])
    assert (answer.status, answer.label, answer.body) == (504, "MISS", b"")
    assert "fwd=uri-miss" in answer.cache_status and "only-if-cached" in answer.cache_status
    assert origin.count(path) == 0
    assert requests_total(service, "miss") == 1


# ----------------------------------------------------------------------------- not looked up


async def test_post_response_is_never_stored(driver: Driver, service: CacheService, origin: Origin) -> None:
    path = f"/post?cc={LONG}"
    post = await driver.send("POST", path, [("Content-Type", "text/plain")], body=b"form")
    assert (post.status, post.label, post.body) == (200, None, b"/post #1")

    get = await driver.send("GET", path)
    assert (get.label, get.body) == ("MISS", b"/post #2")
    assert origin.count(path, "POST") == 1 and origin.count(path, "GET") == 1
    assert requests_total(service, "miss") == 1  # the POST is not counted as a cache request


async def test_lower_case_get_is_not_served_from_the_cache(
    driver: Driver, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # http.server answers unknown methods 501 without counting them: let the origin serve "get".
    monkeypatch.setattr(_Handler, "do_get", _Handler._handle, raising=False)
    path = f"/case?cc={LONG}"
    cached = await driver.send("GET", path)
    assert (await driver.send("GET", path)).label == "HIT"

    lower = await driver.send("get", path)  # methods are case-sensitive (RFC 9110 §9.1)
    assert lower.label is None  # not looked up: the origin answered it
    assert (lower.status, lower.body) == (200, b"/case #2")
    assert lower.body != cached.body
    assert origin.count(path, "get") == 1 and origin.count(path, "GET") == 1


# ----------------------------------------------------------------------------- invalidation (§4.4)


@pytest.mark.parametrize(
    "field, absolute, failing, dropped",
    [
        pytest.param(None, False, None, {"target"}, id="2xx drops the target URI"),
        pytest.param("location", False, None, {"target", "other"}, id="relative Location dropped too"),
        pytest.param("location", True, None, {"target", "other"}, id="absolute Location dropped too"),
        pytest.param("cloc", False, None, {"target", "other"}, id="Content-Location dropped too"),
        pytest.param("location", False, 500, set(), id="error answer invalidates nothing"),
    ],
)
async def test_unsafe_method_invalidates_target_and_named_urls(
    driver: Driver,
    service: CacheService,
    origin: Origin,
    request: pytest.FixtureRequest,
    field: str | None,
    absolute: bool,
    failing: int | None,
    dropped: set[str],
) -> None:
    name = f"/inv-{zlib.crc32(request.node.callspec.id.encode()):08x}"
    other = f"{name}-other?cc={LONG}"
    target = f"{name}?cc={LONG}"
    if field is not None:
        target += f"&{field}=" + quote((origin.url if absolute else "") + other, safe="")
    paths = {"target": target, "other": other}
    for path in paths.values():
        assert (await driver.send("GET", path)).label == "MISS"
        assert (await driver.send("GET", path)).label == "HIT"

    if failing is None:
        post = await driver.send("POST", target, body=b"change")
    else:
        with origin.failing_with(name, failing):
            post = await driver.send("POST", target, body=b"change")
    assert post.status == (failing or 200)

    for which, path in paths.items():
        after = await driver.send("GET", path)
        assert after.label == ("MISS" if which in dropped else "HIT"), which
        assert origin.count(path, "GET") == (2 if which in dropped else 1), which
    assert sample(service, "mitmcache_invalidations_total") == (len(dropped) if dropped else 0)


# ----------------------------------------------------------------------------- stale entries


async def test_stale_entry_is_revalidated_with_its_etag_and_renewed_by_304(
    driver: Driver, service: CacheService, origin: Origin
) -> None:
    path = f"/reval?cc={SHORT}&etag=v1"
    miss = await driver.send("GET", path)
    assert miss.label == "MISS"
    await stale_by_waiting()

    renewed = await driver.send("GET", path)
    seen = origin.requests_for(path)
    assert len(seen) == 2 and seen[1].headers.get("if-none-match") == '"v1"'
    assert (renewed.status, renewed.label, renewed.body) == (200, "HIT", miss.body)
    assert renewed.outcome.result == "revalidated"
    assert "fwd=stale" in renewed.cache_status and "fwd-status=304" in renewed.cache_status
    assert requests_total(service, "revalidated") == 1
    assert sample(service, "mitmcache_revalidations_total", {"outcome": "304"}) == 1

    fresh = await driver.send("GET", path)  # freshness renewed by the 304
    assert (fresh.label, fresh.outcome.result, fresh.body) == ("HIT", "hit", miss.body)
    assert origin.count(path) == 2


async def test_stale_while_revalidate_serves_stale_and_refreshes_in_background(
    driver: Driver, service: CacheService, origin: Origin
) -> None:
    path = f"/swr?cc={quote('max-age=2, stale-while-revalidate=30')}&etag=v1"
    miss = await driver.send("GET", path)
    await stale_by_waiting()

    stale = await driver.send("GET", path)
    assert (stale.status, stale.label, stale.body) == (200, "STALE", miss.body)
    assert "stale-while-revalidate" in stale.cache_status and "reval-queued" in stale.cache_status
    assert requests_total(service, "stale") == 1

    await wait_until(lambda: origin.count(path) == 2, what="the background revalidation to reach the origin")
    await wait_until(
        lambda: sample(service, "mitmcache_revalidations_total", {"outcome": "304"}) == 1
        and not service.revalidator.in_progress,
        what="the background revalidation to finish",
    )
    assert origin.requests_for(path)[1].headers.get("if-none-match") == '"v1"'

    fresh = await driver.send("GET", path)
    assert (fresh.label, fresh.outcome.result, fresh.body) == ("HIT", "hit", miss.body)
    assert origin.count(path) == 2


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param("503", id="origin answers 503"),
        pytest.param("stopped", id="origin unreachable"),
    ],
)
async def test_stale_if_error_serves_stale_when_origin_fails(fresh_origin: Origin, failure: str) -> None:
    path = f"/sie?cc={quote('max-age=2, stale-if-error=60')}&etag=v1"
    async with running_service() as service:
        driver = Driver(service, fresh_origin)
        try:
            miss = await driver.send("GET", path)
            assert miss.label == "MISS"
            await stale_by_waiting()
            if failure == "stopped":
                fresh_origin.stop()
                answer = await driver.send("GET", path)
            else:
                with fresh_origin.failing_with("/sie", 503):
                    answer = await driver.send("GET", path)
                assert fresh_origin.count(path) == 2  # the origin was asked
        finally:
            await driver.aclose()
        assert (answer.status, answer.label, answer.body) == (200, "STALE", miss.body)
        assert "stale-if-error" in answer.cache_status
        assert sample(service, "mitmcache_stale_if_error_total") == 1
        assert requests_total(service, "stale") == 1


async def test_origin_deadline_is_shared_by_the_leader_and_its_waiters(driver: Driver, service: CacheService) -> None:
    """Only requests the cache waits on get a deadline (the leader of a fetch, shared with its
    waiters); when it passes, the leader's answer is a 504 and its waiters get one at once,
    without a second request to the origin."""
    pipeline = service.pipeline
    service.settings = dataclasses.replace(service.settings, origin_timeout=30.0)
    leader = await pipeline.request(driver.request("GET", "/deadline?cc=max-age%3D60"))
    delay = pipeline.origin_deadline(leader)
    assert leader.flight is not None and delay is not None and 29.0 < delay <= 30.0
    waiter = asyncio.create_task(pipeline.request(driver.request("GET", "/deadline?cc=max-age%3D60")))
    await wait_until(lambda: leader.flight is not None and leader.flight.waiters == 1, what="a waiter")
    reply = pipeline.origin_timed_out(leader)
    await pipeline.abandon_fetch(leader)
    waited = await asyncio.wait_for(waiter, 5.0)
    assert reply.status == 504 and "origin-timeout" in leader.outcome.status.render()
    assert waited.reply is not None and waited.reply.status == 504
    assert "origin-timeout" in waited.outcome.status.render()
    assert service.metrics.origin_timeouts._value.get() == 1
    assert driver.origin.count("/deadline?cc=max-age%3D60") == 0  # neither went to the origin here
    # Requests the cache does not wait on keep mitmproxy's own limits.
    no_cache = await pipeline.request(driver.request("GET", "/deadline?cc=max-age%3D60", [("Cache-Control", "no-cache")]))
    assert no_cache.flight is None and pipeline.origin_deadline(no_cache) is None
    post = await pipeline.request(driver.request("POST", "/deadline"))
    assert pipeline.origin_deadline(post) is None
