"""The Replay addon through mitmproxy's test helpers: options, modes, record then replay, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from mitmcache.addons import MitmCache
from tests.unit.test_addon import cycle


def flow(path: str = "/a", secret: str = "s3cr3t"):  # type: ignore[no-untyped-def]
    f = tflow.tflow(req=tutils.treq(path=path.encode()))
    f.request.headers["Authorization"] = f"Bearer {secret}"
    return f


def replay(tctx):  # type: ignore[no-untyped-def]
    return next(a for a in tctx.master.addons.get("mitmcache").all if a.name == "mitmcache.replay")


@pytest.mark.parametrize("options, message", [
    pytest.param({"cache_replay_mode": "sometimes", "cache_replay_file": "x.har"}, "cache_replay_mode: must be one of", id="mode"),
    pytest.param({"cache_replay_mode": "none"}, "cache_replay_file: needed", id="no file"),
    pytest.param({"cache_replay_mode": "none", "cache_replay_file": "/nonexistent/x.har"}, "does not exist", id="none needs a file"),
])
def test_bad_options_are_rejected(options: dict[str, str], message: str) -> None:
    a = MitmCache()
    with taddons.context(a) as tctx:
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(a, **options)


@pytest.mark.parametrize("suffix", ["mitm", "har"])
async def test_record_then_replay_without_the_cache_and_secrets(tmp_path: Path, suffix: str) -> None:
    path = str(tmp_path / f"rec.{suffix}")
    a = MitmCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, cache_replay_file=path, cache_replay_mode="once")
        assert replay(tctx).effective == "all"
        for body in (b"first", b"second"):  # cacheable, yet both reach the origin while recording
            f = flow()
            await cycle(tctx, f, body=body)
            assert "X-Cache-Status" not in f.response.headers
            assert f.response.content == body
        a.done()
    data = Path(path).read_bytes()
    assert b"s3cr3t" not in data and b"X-Cache-Status" not in data and b"REDACTED" in data

    a = MitmCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, cache_replay_file=path, cache_replay_mode="once")
        assert replay(tctx).effective == "none"
        answers = []
        for _ in range(3):
            f = flow(secret="other")
            await cycle(tctx, f, body=b"origin!")
            answers.append((f.response.content, f.response.headers["X-Cache-Status"], f.response.headers["Cache-Status"]))
        assert answers == [
            (b"first", "HIT", "mitmcache; hit; detail=replay"),
            (b"second", "HIT", "mitmcache; hit; detail=replay"),
            (b"second", "HIT", "mitmcache; hit; detail=replay"),
        ]
        miss = flow("/b?token=x")
        await cycle(tctx, miss)
        assert miss.response.status_code == 504
        assert miss.response.headers["Cache-Status"] == "mitmcache; fwd=uri-miss; detail=replay-miss"
        report = json.loads(tctx.master.commands.call("cache.replay.report"))
        assert report["matched"] == 3 and report["replay_only"] is True
        assert report["unmatched"] == [{"request": "GET http://address:22/b?token=x", "count": 1}]
        stats = json.loads(tctx.master.commands.call("cache.stats"))
        assert stats["l1_entries"] == 0  # replayed answers never fill the RFC cache


async def test_binary_request_body_survives_a_har_recording(tmp_path: Path) -> None:
    path = str(tmp_path / "bin.har")
    body = bytes(range(256))
    a = MitmCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, cache_replay_file=path, cache_replay_mode="all")
        f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/upload", content=body))
        await cycle(tctx, f, body=b"stored")
        a.done()
    post = json.loads(Path(path).read_text())["log"]["entries"][0]["request"]["postData"]
    assert post["_encoding"] == "base64"
    a = MitmCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, cache_replay_file=path, cache_replay_mode="none")
        same = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/upload", content=body))
        other = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/upload", content=body[::-1]))
        await cycle(tctx, same)
        await cycle(tctx, other)
        assert (same.response.status_code, same.response.content) == (200, b"stored")
        assert other.response.status_code == 504


def test_har_with_non_utf8_header_bytes_stays_readable(tmp_path: Path) -> None:
    from mitmproxy import http

    from mitmcache.addons.replay import har_bytes, read_cassette

    flow = tflow.tflow(resp=True)
    flow.request.headers = http.Headers([(b"X-Raw", b"\xff\xfe"), (b"Host", b"example.com")])
    flow.response.headers = http.Headers([(b"X-Weird", b"caf\xe9"), (b"Content-Type", b"text/plain")])
    path = tmp_path / "raw.har"
    path.write_bytes(har_bytes([flow]))
    (back,) = read_cassette(str(path))
    assert back.request.headers["X-Raw"] == "\ufffd\ufffd"  # HAR is text: U+FFFD, and it reads back
    assert back.response.headers["X-Weird"] == "caf\ufffd"
    assert back.response.content == flow.response.content
