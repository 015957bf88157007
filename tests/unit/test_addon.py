"""The addon's glue through mitmproxy's own test helpers: options, commands, keys."""

from __future__ import annotations

import json
import time

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from mitmcache.addon import MitmCache


def cacheable_flow(path: str = "/a", host_header: str | None = None):  # type: ignore[no-untyped-def]
    f = tflow.tflow(req=tutils.treq(path=path.encode()))
    if host_header is not None:
        f.request.headers["Host"] = host_header
    return f


def respond(f, body: bytes = b"hello", cc: str = "max-age=60") -> None:  # type: ignore[no-untyped-def]
    f.response = tutils.tresp(content=body)
    f.response.headers["Cache-Control"] = cc
    f.request.timestamp_start = f.response.timestamp_end = time.time()  # tutils uses year-2000 times


async def test_store_then_hit_and_commands() -> None:
    a = MitmCache()
    with taddons.context(a) as tctx:
        f = cacheable_flow()
        await a.request(f)
        respond(f)
        await a.response(f)
        assert f.response.headers["X-Cache-Status"] == "MISS"

        f2 = cacheable_flow()
        await a.request(f2)
        assert f2.response is not None
        assert f2.response.headers["X-Cache-Status"] == "HIT"
        assert f2.response.content == b"hello"
        assert "cache HIT" in f2.comment

        stats = json.loads(tctx.master.commands.call("cache.stats"))
        assert stats["l1_entries"] == 1
        assert stats["requests"]["hit"] == 1
        assert tctx.master.commands.call("cache.purge", f.request.url) == 1
        assert tctx.master.commands.call("cache.purge", f.request.url) == 0
        with pytest.raises(exceptions.CommandError):
            tctx.master.commands.call("cache.purge", "not a url")

        f3 = cacheable_flow()
        await a.request(f3)
        assert f3.response is None  # purged
        respond(f3)
        await a.response(f3)
        assert tctx.master.commands.call("cache.clear") == 1
        assert json.loads(tctx.master.commands.call("cache.stats"))["l1_entries"] == 0


async def test_mismatched_host_header_gets_its_own_entry() -> None:
    """A client-chosen Host header never poisons the entry other clients get."""
    a = MitmCache()
    with taddons.context(a):
        evil = cacheable_flow(host_header="evil.example")
        await a.request(evil)
        respond(evil, b"evil")
        await a.response(evil)

        normal = cacheable_flow()
        await a.request(normal)
        assert normal.response is None  # not served the evil vhost's body


def test_options_validated() -> None:
    a = MitmCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, cache_l1_max_bytes=1000)
        with pytest.raises(exceptions.OptionsError, match="cache_l1_max_bytes"):
            tctx.configure(a, cache_l1_max_bytes=0)
        assert tctx.options.cache_l1_max_bytes == 1000
        with pytest.raises(exceptions.OptionsError, match="cache_metrics_port"):
            tctx.configure(a, cache_metrics_port=-1)
        with pytest.raises(exceptions.OptionsError, match="cache_heuristic_max"):
            tctx.configure(a, cache_heuristic_max=-5)
