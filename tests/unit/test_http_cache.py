"""The HttpCache addon (``addons/http_cache.py``) through mitmproxy's test helpers: what the
origin sent is what a HIT sends, byte for byte."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http
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
