"""The HttpCache addon (``addons/http_cache.py``) through mitmproxy's test helpers: what the
origin sent is what a HIT sends, byte for byte."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import flow, http
from mitmproxy.test import taddons, tflow, tutils

from mitmcache.addons import MitmCache
from tests.unit.test_properties import FIELD_VALUES


def field_bytes(flow: http.HTTPFlow, name: bytes) -> list[bytes]:
    assert flow.response is not None
    return [v for k, v in flow.response.headers.fields if k.lower() == name.lower()]


@settings(max_examples=60, deadline=None)
@given(raws=st.lists(FIELD_VALUES, min_size=1, max_size=3))
async def test_hit_sends_the_header_bytes_the_origin_sent_rfc_9110_5_5(raws: list[bytes]) -> None:
    """Any field-value (VCHAR, obs-text 0x80-0xFF, SP/HTAB inside) survives storing: the HIT's
    X-Bytes lines are the MISS's, in order, byte for byte."""
    with taddons.context(MitmCache()) as tctx:
        cache = tctx.master.addons.get("mitmcache.httpcache")

        miss = tflow.tflow(req=tutils.treq(path=b"/bytes"))
        await cache.request(miss)
        assert miss.response is None
        miss.response = tutils.tresp(content=b"hello")
        miss.response.headers = http.Headers(
            [(b"Cache-Control", b"max-age=60"), (b"Content-Length", b"5"), *((b"X-Bytes", raw) for raw in raws)]
        )
        miss.request.timestamp_start = miss.response.timestamp_end = time.time()
        await cache.response(miss)
        assert miss.response.headers["X-Cache-Status"] == "MISS"

        hit = tflow.tflow(req=tutils.treq(path=b"/bytes"))
        await cache.request(hit)
        assert hit.response is not None and hit.response.headers["X-Cache-Status"] == "HIT"
        assert field_bytes(hit, b"X-Bytes") == field_bytes(miss, b"X-Bytes") == raws


def test_a_cache_answer_drops_only_the_named_fields_and_adds_its_own() -> None:
    from mitmcache.addons.http_cache import to_mitmproxy
    from mitmcache.messages import Response

    stored = Response(200, "OK", (("Surrogate-Key", "a"), ("ETag", '"x"'), ("cache-tag", "b")), b"body", 0.0, 0.0)
    sent = to_mitmproxy(stored, frozenset({"surrogate-key", "cache-tag"}), (("X-Cache-Status", "HIT"),))
    assert sent.headers.fields == ((b"ETag", b'"x"'), (b"X-Cache-Status", b"HIT"))
    assert sent.content == b"body"


# ---------------------------------------------------------------- hit-for-pass fast path

from unittest import mock  # noqa: E402

import pytest  # noqa: E402

from mitmcache.addons.http_cache import body_length, may_exceed  # noqa: E402
from tests.unit.test_properties import STORABILITY_HEADERS  # noqa: E402

NOW = 1_800_000_000.0


def answer(f: http.HTTPFlow, status: int, fields: list[tuple[bytes, bytes]], body: bytes) -> None:
    now = time.time()  # NOW where the test freezes the clock
    f.response = http.Response(b"HTTP/1.1", status, b"OK", http.Headers(fields), body, None, now, now)
    f.request.timestamp_start = now


async def exchange(
    cache, path: str, status: int = 200, fields: list[tuple[bytes, bytes]] | None = None,  # type: ignore[no-untyped-def]
    body: bytes = b"body", method: bytes = b"GET", request_fields: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
) -> http.HTTPFlow:
    """One request through the hooks as the proxy runs them; the origin answers unless the cache did."""
    f = tflow.tflow(req=tutils.treq(method=method, path=path.encode(), headers=http.Headers([(b"Host", b"example.com"), *request_fields])))
    await cache.request(f)
    if f.response is None:
        answer(f, status, [(b"Cache-Control", b"no-store")] if fields is None else fields, body)
        cache.responseheaders(f)
        await cache.response(f)
    return f


def counters(cache) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in cache.service.metrics.registry.collect() for s in metric.samples if s.name.endswith("_total")
    }


def passes_taken(cache) -> float:  # type: ignore[no-untyped-def]
    return cache.service.metrics.registry.get_sample_value("mitmcache_hit_for_pass_total", {"event": "passed"})


async def what_users_see(fast: bool, method: bytes, status: int, fields: list[tuple[bytes, bytes]], request_fields) -> tuple:  # type: ignore[no-untyped-def]
    """A URL marked by a no-store answer, then one answer with ``fields``, then one more
    request: the second answer's fields, comment, metadata, the counters, and the third
    answer's status fields. ``fast=False``: the marker is only found by the full lookup."""
    with taddons.context(MitmCache()) as tctx, mock.patch("time.time", return_value=NOW):
        cache = tctx.master.addons.get("mitmcache.httpcache")
        if not fast:
            cache.service.store.pass_marker = lambda key, now: None
        await exchange(cache, "/p")
        second = await exchange(cache, "/p", status, fields, b"0123456789", method, request_fields)
        third = await exchange(cache, "/p", method=b"GET")
        assert second.response is not None and third.response is not None
        return (
            second.response.headers.fields, second.comment, second.metadata["mitmcache"], counters(cache),
            third.response.headers.get("x-cache-status"), third.response.headers.get("cache-status"),
        )


def as_bytes(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in headers]


@settings(max_examples=80, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"HEAD"]), status=st.sampled_from([200, 203, 204, 206, 302, 304, 404, 500, 503]),
    fields=STORABILITY_HEADERS, request_fields=STORABILITY_HEADERS,
)
async def test_a_passed_request_gets_what_the_full_pipeline_gives(method, status, fields, request_fields) -> None:  # type: ignore[no-untyped-def]
    """The pass fast path (no Request/Exchange, one pass over the answer's fields) and the
    full pipeline give a passed request the same answer fields, comment, metadata, counters
    (requests, not stored, bad input, hit-for-pass) and the same next answer (the marker
    ended by a storable answer, renewed or kept)."""
    request_fields = [(k, v) for k, v in request_fields if k.lower() not in ("cache-control", "pragma")]  # no only-if-cached
    args = (method, status, as_bytes(fields), as_bytes(request_fields))
    assert await what_users_see(True, *args) == await what_users_see(False, *args)


async def test_the_fast_path_is_taken_and_a_storable_answer_ends_the_marker() -> None:
    with taddons.context(MitmCache()) as tctx:
        cache = tctx.master.addons.get("mitmcache.httpcache")
        await exchange(cache, "/end")
        passed = await exchange(cache, "/end", fields=[(b"Cache-Control", b"no-store")])
        assert not cache._exchanges and not cache._passing  # nothing left behind
        assert passed.response is not None and passed.response.headers["X-Cache-Status"] == "MISS"
        assert passed.response.headers["Cache-Status"] == "mitmcache; fwd=uri-miss; fwd-status=200; detail=hit-for-pass+no-store"
        assert "date" in passed.response.headers  # RFC 9110 §6.6.1: added on receipt
        assert passes_taken(cache) == 1
        stored = await exchange(cache, "/end", fields=[(b"Cache-Control", b"max-age=60")], body=b"now storable")
        assert stored.response is not None and "stored" in stored.response.headers["Cache-Status"]
        hit = await exchange(cache, "/end")
        assert hit.response is not None and (hit.response.headers["X-Cache-Status"], hit.response.content) == ("HIT", b"now storable")
        assert cache.service.metrics.registry.get_sample_value("mitmcache_hit_for_pass_total", {"event": "ended"}) == 1


async def test_only_if_cached_on_a_passed_url_is_504_without_the_origin() -> None:
    with taddons.context(MitmCache()) as tctx:
        cache = tctx.master.addons.get("mitmcache.httpcache")
        await exchange(cache, "/oic")
        f = tflow.tflow(req=tutils.treq(path=b"/oic", headers=http.Headers([(b"Host", b"example.com"), (b"Cache-Control", b"only-if-cached")])))
        await cache.request(f)
        assert f.response is not None and f.response.status_code == 504
        assert passes_taken(cache) == 0


async def test_a_passed_request_that_fails_leaves_nothing_behind() -> None:
    with taddons.context(MitmCache()) as tctx:
        cache = tctx.master.addons.get("mitmcache.httpcache")
        await exchange(cache, "/err")
        f = tflow.tflow(req=tutils.treq(path=b"/err", headers=http.Headers([(b"Host", b"example.com")])))
        await cache.request(f)
        assert f in cache._passing
        f.error = flow.Error("connection refused")
        await cache.error(f)
        assert f not in cache._passing
        again = await exchange(cache, "/err")
        assert again.response is not None and "hit-for-pass" in again.response.headers["Cache-Status"]


async def test_a_passed_answer_too_large_to_hold_streams_with_its_status_fields() -> None:
    with taddons.context(MitmCache()) as tctx:
        tctx.options.update(cache_max_object_bytes="1k")
        cache = tctx.master.addons.get("mitmcache.httpcache")
        await exchange(cache, "/big")
        f = tflow.tflow(req=tutils.treq(path=b"/big", headers=http.Headers([(b"Host", b"example.com")])))
        await cache.request(f)
        answer(f, 200, [(b"Cache-Control", b"max-age=60"), (b"Content-Length", b"5000")], b"")
        assert f.response is not None
        f.response.data.content = None  # the body has not arrived yet: streamed
        cache.responseheaders(f)
        assert f.response.stream is True
        assert f.response.headers["Cache-Status"] == "mitmcache; fwd=uri-miss; fwd-status=200; detail=hit-for-pass+streamed+too-large"
        await cache.response(f)
        assert f.metadata["mitmcache"]["not_stored"] == "too-large"


async def test_malformed_fields_of_a_passed_answer_are_counted() -> None:
    with taddons.context(MitmCache()) as tctx:
        cache = tctx.master.addons.get("mitmcache.httpcache")
        await exchange(cache, "/bad")
        for _ in range(2):
            await exchange(cache, "/bad", fields=[(b"Cache-Control", b"no-store, max-age=soon"), (b"Expires", b"later")])
        bad = cache.service.metrics.registry.get_sample_value
        assert passes_taken(cache) == 2
        assert bad("mitmcache_bad_input_total", {"kind": "cache-control"}) == 2
        assert bad("mitmcache_bad_input_total", {"kind": "expires"}) == 2


@pytest.mark.parametrize(
    "fields, method, status",
    [
        pytest.param([(b"Content-Length", b"10")], b"GET", 200, id="within"),
        pytest.param([(b"Content-Length", b"5000")], b"GET", 200, id="over"),
        pytest.param([(b"Content-Length", b"5000")], b"HEAD", 200, id="HEAD: no body"),
        pytest.param([(b"Content-Length", b"5000")], b"GET", 304, id="304: no body"),
        pytest.param([(b"Content-Length", b" 10 ")], b"GET", 200, id="spaces"),
        pytest.param([(b"Content-Length", b"10"), (b"Content-Length", b"5000")], b"GET", 200, id="two lengths"),
        pytest.param([(b"Content-Length", b"x")], b"GET", 200, id="not a number"),
        pytest.param([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5000")], b"GET", 200, id="chunked wins"),
        pytest.param([(b"Content-Length", b"9" * 40)], b"GET", 200, id="huge"),
        pytest.param([], b"GET", 200, id="until close"),
    ],
)
def test_may_exceed_is_false_only_when_the_body_is_within_the_limit_or_unknown(fields, method, status) -> None:  # type: ignore[no-untyped-def]
    f = tflow.tflow(req=tutils.treq(method=method))
    answer(f, status, fields, b"")
    length = body_length(f)
    if not may_exceed(f.response.headers.fields, 1000):  # type: ignore[union-attr]
        assert length is None or length <= 1000
