"""One revalidation against a real local origin: what may and may not replace a stored entry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from mitmcache import semantics as sem
from mitmcache.origin_client import OriginClient
from mitmcache.revalidate import Job
from mitmcache.service import CacheService
from mitmcache.store import TieredStore
from tests.origin import Origin, start_origin


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = start_origin()
    yield o
    o.stop()


def stale_entry(etag: str = '"e"') -> sem.StoredResponse:
    then = time.time() - 20  # stale for 10 s, kept for revalidation (validators) until +50 s
    return sem.make_stored_response(
        200, "OK", [], [("Cache-Control", "max-age=10"), ("ETag", etag)], b"old body", then, then
    )


async def revalidate(origin: Origin, query: str) -> tuple[str, TieredStore, str, Origin]:
    service = CacheService()
    store, revalidator = service.store, service.revalidator
    revalidator.configure(1, 4, OriginClient(False, 5.0))
    path = f"/r?{query}"
    key = service.keys.build("http", "127.0.0.1", origin.port, path)
    entry = stale_entry()
    await store.put(key, entry, time.time())
    result = await revalidator.refresh(Job(key, origin.url + path, (("Accept", "text/plain"),), entry))
    assert revalidator.client is not None
    await revalidator.client.aclose()
    return result.outcome, store, key, origin


def stored_body(store: TieredStore, key: str) -> bytes:
    lookup = store.peek(key, time.time())
    assert lookup is not None
    return lookup.variants[-1].body


async def test_304_renews_and_keeps_the_body(origin: Origin) -> None:
    outcome, store, key, _ = await revalidate(origin, f"cc={quote('max-age=60')}&etag=e")
    assert outcome == "304"
    assert stored_body(store, key) == b"old body"
    lookup = store.peek(key, time.time())
    assert lookup is not None and lookup.variants[-1].is_fresh(time.time())
    seen = origin.requests_for(f"/r?cc={quote('max-age=60')}&etag=e")[0]
    assert seen.headers["if-none-match"] == '"e"'
    assert seen.headers["accept"] == "text/plain"  # the triggering request's headers go along
    assert "accept-encoding" not in seen.headers  # and nothing the client did not send


async def test_new_200_replaces(origin: Origin) -> None:
    outcome, store, key, _ = await revalidate(origin, f"cc={quote('max-age=60')}&etag=new")
    assert outcome == "200"
    assert stored_body(store, key) == b"/r #1"


async def test_fresh_cacheable_404_replaces_the_stale_200(origin: Origin) -> None:
    """RFC 9111 §4.3.3: a full response (here a 404 with max-age) is what the cache uses; only
    5xx answers and connection errors keep the stale entry."""
    outcome, store, key, _ = await revalidate(origin, f"cc={quote('max-age=60')}&status=404")
    assert outcome == "200"
    lookup = store.peek(key, time.time())
    assert lookup is not None and lookup.variants[-1].status == 404


@pytest.mark.parametrize(
    "query,outcome",
    [
        (f"cc={quote('max-age=60')}&status=503", "error"),
        (f"cc={quote('max-age=60')}&status=500", "error"),
        (f"cc={quote('private, max-age=60')}&etag=new", "kept"),
        (f"cc={quote('max-age=60')}&cookie=1&etag=new", "kept"),
    ],
)
async def test_errors_and_unshareable_answers_never_replace(origin: Origin, query: str, outcome: str) -> None:
    result, store, key, _ = await revalidate(origin, query)
    assert result == outcome
    assert stored_body(store, key) == b"old body"


async def test_unreachable_origin_is_an_error(origin: Origin) -> None:
    origin.stop()
    result, store, key, _ = await revalidate(origin, "etag=e")
    assert result == "error"
    assert stored_body(store, key) == b"old body"
