"""End to end: coalescing (one proxy and across proxies), stale-while-revalidate with background
revalidation, stale-if-error — real mitmdump processes, real Valkey, a real counting origin."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from mitmcache.valkey_nodes import ValkeyNode
from tests.conftest import Proxy, running_nodes, start_proxy
from tests.origin import Origin, start_origin


def q(cc: str) -> str:
    return quote(cc, safe="")


async def burst(urls: list[str], timeout: float = 20) -> list[httpx.Response]:
    """Fire every request at once, each on its own connection.

    The clients are made first: creating one costs tens of milliseconds of this loop's time,
    which would otherwise spread the "concurrent" requests over a second.
    """
    clients = [httpx.AsyncClient(timeout=timeout) for _ in urls]
    try:
        return list(await asyncio.gather(*(c.get(u) for c, u in zip(clients, urls))))
    finally:
        for c in clients:
            await c.aclose()


def wait_until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ring() -> Iterator[list[ValkeyNode]]:
    with running_nodes(3) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def pair(origin: Origin, ring: list[ValkeyNode], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, Proxy]]:
    urls = ",".join(n.url for n in ring)
    a = start_proxy(tmp_path_factory.mktemp("a"), f"reverse:{origin.url}", f"cache_valkey_urls={urls}")
    b = start_proxy(tmp_path_factory.mktemp("b"), f"reverse:{origin.url}", f"cache_valkey_urls={urls}")
    yield a, b
    a.stop()
    b.stop()


# --------------------------------------------------------------------------- coalescing


def test_50_concurrent_cold_misses_one_origin_request(proxy: Proxy, origin: Origin) -> None:
    path = f"/herd?cc={q('max-age=60')}&delay=400"
    responses = asyncio.run(burst([proxy.url + path] * 50))
    assert [r.status_code for r in responses] == [200] * 50
    assert {r.text for r in responses} == {"/herd #1"}
    assert origin.count(path) == 1
    statuses = [r.headers["cache-status"] for r in responses]
    assert sum("collapsed" in s for s in statuses) >= 40  # most waited for the one fetch
    assert all(r.headers["x-cache-status"] in ("MISS", "HIT") for r in responses)
    assert proxy.metrics()["mitmcache_coalesced_total"] >= 40


def test_50_concurrent_cold_misses_over_two_proxies_one_origin_request(
    pair: tuple[Proxy, Proxy], origin: Origin
) -> None:
    a, b = pair
    path = f"/herd2?cc={q('max-age=60')}&delay=400"
    responses = asyncio.run(burst([a.url + path] * 25 + [b.url + path] * 25))
    assert [r.status_code for r in responses] == [200] * 50
    assert {r.text for r in responses} == {"/herd2 #1"}
    assert origin.count(path) == 1
    waited = a.metrics()["mitmcache_lease_waits_total"] + b.metrics()["mitmcache_lease_waits_total"]
    assert waited == 1  # the losing proxy's leader waited on the lease; its followers on it
    assert any("lease-wait" in r.headers["cache-status"] for r in responses)


def test_waiters_for_another_variant_share_one_fetch_of_theirs(proxy: Proxy, origin: Origin) -> None:
    path = f"/herd-vary?cc={q('max-age=60')}&vary=Accept-Language&delay=300"

    async def scenario() -> list[httpx.Response]:
        en = [httpx.AsyncClient(timeout=20, headers={"Accept-Language": "en"}) for _ in range(10)]
        de = [httpx.AsyncClient(timeout=20, headers={"Accept-Language": "de"}) for _ in range(10)]
        try:
            return list(await asyncio.gather(*(c.get(proxy.url + path) for c in en + de)))
        finally:
            for c in en + de:
                await c.aclose()

    responses = asyncio.run(scenario())
    assert {r.text.split(" ", 2)[2] for r in responses[:10]} == {"Accept-Language=en"}
    assert {r.text.split(" ", 2)[2] for r in responses[10:]} == {"Accept-Language=de"}
    assert origin.count(path) == 2  # one fetch per variant, not one per "de" waiter


def test_not_shareable_response_is_not_given_to_waiters(proxy: Proxy, origin: Origin) -> None:
    path = f"/herd-private?cc={q('private, max-age=60')}&delay=300&cookie=1"
    responses = asyncio.run(burst([proxy.url + path] * 10))
    cookies = {r.headers["set-cookie"] for r in responses}
    assert len(cookies) == 10  # every client got its own response
    assert origin.count(path) == 10


def test_waiter_that_disconnects_does_not_break_the_others(proxy: Proxy, origin: Origin) -> None:
    path = f"/herd-leave?cc={q('max-age=60')}&delay=800"

    async def scenario() -> tuple[list[httpx.Response], list[object]]:
        # Clients are made up front: creating one costs tens of ms of this loop's time.
        leader = httpx.AsyncClient(timeout=20)
        quitters = [httpx.AsyncClient(timeout=0.2) for _ in range(5)]
        patient = [httpx.AsyncClient(timeout=20) for _ in range(10)]
        first = asyncio.ensure_future(leader.get(proxy.url + path))
        await asyncio.sleep(0.1)  # the leader is at the origin now
        gone = [asyncio.ensure_future(c.get(proxy.url + path)) for c in quitters]
        others = [asyncio.ensure_future(c.get(proxy.url + path)) for c in patient]
        outcomes = await asyncio.gather(*gone, return_exceptions=True)
        responses = [await first] + list(await asyncio.gather(*others))
        for c in [leader, *quitters, *patient]:
            await c.aclose()
        return responses, list(outcomes)

    responses, outcomes = asyncio.run(scenario())
    assert all(isinstance(o, httpx.TimeoutException) for o in outcomes), outcomes
    assert [r.status_code for r in responses] == [200] * 11
    assert {r.text for r in responses} == {"/herd-leave #1"}
    assert origin.count(path) == 1


def test_leader_that_disconnects_hands_over(proxy: Proxy, origin: Origin) -> None:
    path = f"/herd-leader-leaves?cc={q('max-age=60')}&delay=600"

    async def scenario() -> list[httpx.Response]:
        async def leader() -> None:
            async with httpx.AsyncClient(timeout=0.2) as c:
                await c.get(proxy.url + path)

        lead = asyncio.ensure_future(leader())
        await asyncio.sleep(0.05)
        rest = await burst([proxy.url + path] * 8)
        await asyncio.gather(lead, return_exceptions=True)
        return rest

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 8
    assert len({r.text for r in responses}) == 1
    assert origin.count(path) <= 2  # the abandoned fetch, and at most one more for everyone else


# --------------------------------------------------------------------------- stale-while-revalidate


def test_swr_serves_stale_at_once_and_revalidates_once_in_background(proxy: Proxy, origin: Origin) -> None:
    # max-age=2: Date has whole seconds, so a renewed entry may start up to 1 s old (§4.2.3).
    path = f"/swr?cc={q('max-age=2, stale-while-revalidate=60')}&etag=v1&delay=700"
    c = proxy.client()
    assert c.get(path).text == "/swr #1"
    time.sleep(2.1)
    t0 = time.perf_counter()
    r = c.get(path)
    elapsed = time.perf_counter() - t0
    assert r.headers["x-cache-status"] == "STALE"
    assert r.text == "/swr #1"
    assert "fwd=stale" in r.headers["cache-status"] and "stale-while-revalidate" in r.headers["cache-status"]
    assert elapsed < 0.5  # did not wait for the 700 ms origin
    wait_until(lambda: proxy.metrics().get('mitmcache_revalidations_total{outcome="304"}', 0) >= 1)
    seen = origin.requests_for(path)
    assert len(seen) == 2
    assert seen[1].headers.get("if-none-match") == '"v1"'
    assert "x-cache" not in " ".join(seen[1].headers)  # no internal marker header
    r = c.get(path)
    assert r.headers["x-cache-status"] == "HIT"  # renewed by the 304
    assert r.text == "/swr #1"
    assert origin.count(path) == 2


def test_hot_stale_key_causes_one_revalidation(proxy: Proxy, origin: Origin) -> None:
    path = f"/swr-hot?cc={q('max-age=2, stale-while-revalidate=60')}&etag=h&delay=500"
    proxy.client().get(path)
    time.sleep(2.1)
    responses = asyncio.run(burst([proxy.url + path] * 30))
    assert [r.headers["x-cache-status"] for r in responses] == ["STALE"] * 30
    wait_until(lambda: origin.count(path) >= 2)
    time.sleep(0.8)
    assert origin.count(path) == 2  # the fill and exactly one revalidation


def test_hot_stale_key_over_two_proxies_one_revalidation(pair: tuple[Proxy, Proxy], origin: Origin) -> None:
    a, b = pair
    path = f"/swr-hot2?cc={q('max-age=2, stale-while-revalidate=60')}&etag=h&delay=500"
    a.client().get(path)
    b.client().get(path)  # both have it (B from L2)
    time.sleep(2.1)
    responses = asyncio.run(burst([a.url + path] * 10 + [b.url + path] * 10))
    assert all(r.headers["x-cache-status"] == "STALE" for r in responses)
    wait_until(lambda: origin.count(path) >= 2)
    time.sleep(0.8)
    assert origin.count(path) == 2


def test_stale_near_cache_copy_defers_to_a_fresher_l2_entry(pair: tuple[Proxy, Proxy], origin: Origin) -> None:
    """B's L1 copy went stale, but A already revalidated it into L2: B serves that (W10)."""
    a, b = pair
    path = f"/swr-coherent?cc={q('max-age=2, stale-while-revalidate=60')}&etag=c"
    a.client().get(path)
    assert b.client().get(path).headers["x-cache-status"] == "HIT"  # B's L1 holds a copy now
    time.sleep(2.1)
    assert a.client().get(path).headers["x-cache-status"] == "STALE"
    wait_until(lambda: a.metrics().get('mitmcache_revalidations_total{outcome="304"}', 0) >= 1)
    r = b.client().get(path)
    assert r.headers["x-cache-status"] == "HIT"
    assert "detail=l2" in r.headers["cache-status"]
    assert origin.count(path) == 2


def test_full_queue_counts_drops_and_still_serves(tmp_path: Path, origin: Origin) -> None:
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}", "cache_revalidate_workers=1", "cache_revalidate_queue=1")
    try:
        paths = [f"/swr-q{i}?cc={q('max-age=1, stale-while-revalidate=60')}&delay=800" for i in range(6)]
        asyncio.run(burst([proxy.url + p for p in paths]))
        time.sleep(1.2)
        responses = asyncio.run(burst([proxy.url + p for p in paths]))
        assert [r.headers["x-cache-status"] for r in responses] == ["STALE"] * 6
        m = proxy.metrics()
        assert m["mitmcache_reval_dropped_total"] >= 3  # 1 running, 1 queued, the rest dropped
        assert sum("reval-dropped" in r.headers["cache-status"] for r in responses) == m["mitmcache_reval_dropped_total"]
    finally:
        proxy.stop()


def test_revalidation_error_keeps_the_entry(proxy: Proxy, origin: Origin) -> None:
    path = f"/swr-503?cc={q('max-age=1, stale-while-revalidate=60')}"
    c = proxy.client()
    c.get(path)
    time.sleep(1.2)
    with origin.failing_with("/swr-503", 503):
        assert c.get(path).headers["x-cache-status"] == "STALE"
        wait_until(lambda: origin.count(path) == 2)
        time.sleep(0.3)
        r = c.get(path)
        assert r.status_code == 200 and r.text == "/swr-503 #1"  # the 503 did not replace it (W7)


# --------------------------------------------------------------------------- stale-if-error


def test_stale_if_error_on_503(proxy: Proxy, origin: Origin) -> None:
    path = f"/sie?cc={q('max-age=1, stale-if-error=60')}"
    c = proxy.client()
    c.get(path)
    time.sleep(1.2)
    with origin.failing_with("/sie", 503):
        r = c.get(path)
        assert r.status_code == 200
        assert r.text == "/sie #1"
        assert r.headers["x-cache-status"] == "STALE"
        assert "fwd=stale; fwd-status=503" in r.headers["cache-status"]
        assert "stale-if-error" in r.headers["cache-status"]
        assert proxy.metrics()["mitmcache_stale_if_error_total"] >= 1
    r = c.get(path)  # origin healthy again: fresh copy
    assert r.headers["x-cache-status"] == "MISS" and r.text.endswith("#3")


def test_stale_if_error_with_origin_stopped(tmp_path: Path) -> None:
    origin = start_origin()
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}")
    try:
        c = proxy.client()
        path = f"/sie-down?cc={q('max-age=1, stale-if-error=60')}"
        mr = f"/sie-down-mr?cc={q('max-age=1, must-revalidate, stale-if-error=60')}"
        c.get(path)
        c.get(mr)
        time.sleep(1.2)
        origin.stop()
        c2 = proxy.client()
        r = c2.get(path)
        assert r.status_code == 200 and r.text == "/sie-down #1"
        assert r.headers["x-cache-status"] == "STALE"
        assert "stale-if-error" in r.headers["cache-status"]
        # must-revalidate: never served stale, even with the origin gone (§4.2.4)
        r = c2.get(mr)
        assert r.status_code == 502
    finally:
        proxy.stop()


def test_must_revalidate_not_served_stale_on_503(proxy: Proxy, origin: Origin) -> None:
    path = f"/sie-mr?cc={q('max-age=1, must-revalidate, stale-if-error=60')}"
    c = proxy.client()
    c.get(path)
    time.sleep(1.2)
    with origin.failing_with("/sie-mr", 503):
        r = c.get(path)
        assert r.status_code == 503
        assert r.headers["x-cache-status"] == "MISS"


def test_max_stale_narrows_stale_if_error(proxy: Proxy, origin: Origin) -> None:
    path = f"/sie-ms?cc={q('max-age=1, stale-if-error=60')}"
    c = proxy.client()
    c.get(path)
    time.sleep(2.2)
    with origin.failing_with("/sie-ms", 503):
        assert c.get(path, headers={"Cache-Control": "max-stale=1"}).status_code == 503
        assert c.get(path).status_code == 200


def test_background_revalidation_in_regular_mode_over_https_follows_tls_settings(tmp_path: Path) -> None:
    """The cache's own client goes to the absolute URL and trusts what mitmproxy trusts."""
    tls_origin = start_origin(tls=True)
    assert tls_origin.cert_file is not None
    proxy = start_proxy(tmp_path, "regular", f"ssl_verify_upstream_trusted_ca={tls_origin.cert_file}")
    try:
        ca = ssl.create_default_context(cafile=str(proxy.confdir / "mitmproxy-ca-cert.pem"))
        path = f"/swr-tls?cc={q('max-age=2, stale-while-revalidate=60')}&etag=t"
        with httpx.Client(proxy=proxy.url, verify=ca, timeout=10) as c:
            url = f"https://127.0.0.1:{tls_origin.port}{path}"
            assert c.get(url).headers["x-cache-status"] == "MISS"
            time.sleep(2.1)
            assert c.get(url).headers["x-cache-status"] == "STALE"
            wait_until(lambda: proxy.metrics().get('mitmcache_revalidations_total{outcome="304"}', 0) == 1)
            assert tls_origin.requests_for(path)[-1].headers.get("if-none-match") == '"t"'
            assert c.get(url).headers["x-cache-status"] == "HIT"
    finally:
        proxy.stop()
        tls_origin.stop()
