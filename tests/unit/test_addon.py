"""The addons through mitmproxy's own test helpers: options, commands, keys, rendering."""

from __future__ import annotations

import json
import time

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from mitmcache.addons import MitmCache


def cacheable_flow(path: str = "/a", host_header: str | None = None):  # type: ignore[no-untyped-def]
    f = tflow.tflow(req=tutils.treq(path=path.encode()))
    if host_header is not None:
        f.request.headers["Host"] = host_header
    return f


def respond(f, body: bytes = b"hello", cc: str = "max-age=60") -> None:  # type: ignore[no-untyped-def]
    f.response = tutils.tresp(content=body)
    f.response.headers["Cache-Control"] = cc
    f.request.timestamp_start = f.response.timestamp_end = time.time()  # tutils uses year-2000 times


async def cycle(tctx, f, body: bytes = b"hello", cc: str = "max-age=60") -> None:  # type: ignore[no-untyped-def]
    """request hook; if not answered, the origin's response; response hook (as the proxy does)."""
    cache = tctx.master.addons.get("mitmcache.httpcache")
    await cache.request(f)
    if f.response is None:
        respond(f, body, cc)
    await cache.response(f)


async def test_store_then_hit_and_commands() -> None:
    a = MitmCache()
    with taddons.context(a) as tctx:
        f = cacheable_flow()
        await cycle(tctx, f)
        assert f.response.headers["X-Cache-Status"] == "MISS"

        f2 = cacheable_flow()
        await cycle(tctx, f2, body=b"not from the origin")
        assert f2.response.headers["X-Cache-Status"] == "HIT"
        assert f2.response.content == b"hello"
        assert f2.comment.startswith("cache HIT")
        assert f2.marked == ":green_circle:"
        assert f2.metadata["mitmcache"]["x-cache-status"] == "HIT"

        stats = json.loads(tctx.master.commands.call("cache.stats"))
        assert stats["l1_entries"] == 1
        assert stats["requests"]["hit"] == 1
        assert tctx.master.commands.call("cache.purge", f.request.url) == 1
        assert tctx.master.commands.call("cache.purge", f.request.url) == 0
        with pytest.raises(exceptions.CommandError):
            tctx.master.commands.call("cache.purge", "not a url")

        f3 = cacheable_flow()
        await cycle(tctx, f3)
        assert f3.response.headers["X-Cache-Status"] == "MISS"  # purged
        assert tctx.master.commands.call("cache.clear") == 1
        assert json.loads(tctx.master.commands.call("cache.stats"))["l1_entries"] == 0


async def test_mark_flows_can_be_turned_off() -> None:
    a = MitmCache()
    with taddons.context(a) as tctx:
        tctx.options.update(cache_mark_flows=False)
        await cycle(tctx, cacheable_flow())
        hit = cacheable_flow()
        await cycle(tctx, hit)
        assert hit.response.headers["X-Cache-Status"] == "HIT"
        assert not hit.marked


async def test_purge_accepts_the_url_the_client_used_in_reverse_mode() -> None:
    a = MitmCache()
    with taddons.context(a) as tctx:
        tctx.options.update(mode=["reverse:http://origin.example:8000@8080"])
        f = tflow.tflow(req=tutils.treq(host="origin.example", port=8000, path=b"/p?x=1"))
        await cycle(tctx, f)
        hit = tflow.tflow(req=tutils.treq(host="origin.example", port=8000, path=b"/p?x=1"))
        await cycle(tctx, hit)
        assert hit.response.headers["X-Cache-Status"] == "HIT"
        assert tctx.master.commands.call("cache.purge", "http://127.0.0.1:8080/p?x=1") == 1
        again = tflow.tflow(req=tutils.treq(host="origin.example", port=8000, path=b"/p?x=1"))
        await cycle(tctx, again, body=b"new")
        assert again.response.headers["X-Cache-Status"] == "MISS"


async def test_mismatched_host_header_gets_its_own_entry() -> None:
    """A client-chosen Host header never poisons the entry other clients get."""
    a = MitmCache()
    with taddons.context(a) as tctx:
        evil = cacheable_flow(host_header="evil.example")
        await cycle(tctx, evil, body=b"evil")
        normal = cacheable_flow()
        await cycle(tctx, normal, body=b"normal")
        assert normal.response.headers["X-Cache-Status"] == "MISS"  # not served the evil vhost's body
        assert normal.response.content == b"normal"


def test_options_validated() -> None:
    a = MitmCache()
    with taddons.context(a) as tctx:
        tctx.options.update(cache_l1_max_bytes="1000")
        with pytest.raises(exceptions.OptionsError, match="cache_l1_max_bytes"):
            tctx.options.update(cache_l1_max_bytes="0")
        with pytest.raises(exceptions.OptionsError, match="cache_l1_max_bytes: not a size: 'abc'"):
            tctx.options.update(cache_l1_max_bytes="abc")
        assert tctx.options.cache_l1_max_bytes == "1000"
        tctx.options.update(cache_l1_max_bytes="256m")
        assert json.loads(tctx.master.commands.call("cache.stats"))["l1_max_bytes"] == 256 * 2**20
        with pytest.raises(exceptions.OptionsError, match="cache_metrics_port"):
            tctx.options.update(cache_metrics_port=-1)
        with pytest.raises(exceptions.OptionsError, match="cache_heuristic_max"):
            tctx.options.update(cache_heuristic_max=-5)
        with pytest.raises(exceptions.OptionsError, match="cache_lease_ms"):
            tctx.options.update(cache_lease_ms=0)
        with pytest.raises(exceptions.OptionsError, match="cache_hit_for_pass: at most 300"):
            tctx.options.update(cache_hit_for_pass=301)
        with pytest.raises(exceptions.OptionsError, match="cache_hit_for_pass"):
            tctx.options.update(cache_hit_for_pass=-1)
        tctx.options.update(cache_hit_for_pass=0)  # off
