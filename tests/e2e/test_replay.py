"""Record and replay through real mitmdump in reverse mode and a real counting origin: record in
``all``, stop the origin, replay in ``none``; ``new_episodes``, ``once``, redaction, HAR 1.2."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from mitmproxy.io import read_flows_from_paths

from tests.conftest import Proxy, start_proxy
from tests.origin import Origin, start_origin

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SECRET = "SEKRIT-4711"
OPTIONS = ("cache_replay_ignore_params=ts,utm_*", "cache_replay_redact_params=token",
           "cache_replay_match_headers=accept-language")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
MIB = 1024 * 1024


def q(value: str) -> str:
    return quote(value, safe="")


def exchange(c: httpx.Client) -> list[httpx.Response]:
    """The requests recorded, and sent again (with equivalent variations) in replay."""
    return [
        c.get("/r/get?b=2&a=1&ts=111"),
        c.head("/r/head"),
        c.post("/r/json", json={"a": 1, "b": [1, 2]}),
        c.post("/r/form", content=b"a=1&b=2&utm_source=x", headers=FORM),
        c.get(f"/r/nostore?cc={q('no-store')}"),
        c.get("/r/missing?status=404"),
        c.get(f"/r/redirect?status=302&location={q('/r/get')}"),
        c.get(f"/r/big?size={MIB}"),
        c.get("/r/vary?vary=Accept-Language", headers={"Accept-Language": "de"}),
        c.get("/r/vary?vary=Accept-Language", headers={"Accept-Language": "en"}),
        *(c.get("/r/seq") for _ in range(3)),
        c.get(f"/r/cached?cc={q('max-age=600')}"),
        c.get(f"/r/cached?cc={q('max-age=600')}"),
        c.get(f"/r/secret?token={SECRET}&cookie=1",
              headers={"Authorization": f"Bearer {SECRET}", "Cookie": f"sid={SECRET}"}),
    ]


@dataclass
class Recording:
    path: Path
    origin: Origin
    recorded: list[httpx.Response]
    counts: dict[str, int]
    replay: Proxy


@pytest.fixture(scope="module", params=["flows.mitm", "recording.har"])
def recording(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """Record in ``all`` through a reverse proxy, stop the origin, replay in ``none``."""
    tmp = tmp_path_factory.mktemp("replay")
    path = tmp / request.param
    origin = start_origin()
    proxy = start_proxy(tmp, f"reverse:{origin.url}", f"cache_replay_file={path}", "cache_replay_mode=all", *OPTIONS)
    try:
        recorded = exchange(proxy.client())
    finally:
        proxy.stop()
    counts = dict(origin.counts)
    origin.stop()
    replay = start_proxy(tmp, f"reverse:{origin.url}", f"cache_replay_file={path}", "cache_replay_mode=none", *OPTIONS)
    yield Recording(path, origin, recorded, counts, replay)
    replay.stop()


def test_recording_reaches_the_origin_for_every_request_and_adds_nothing(recording: Recording) -> None:
    assert recording.counts["/r/seq"] == 3
    assert recording.counts[f"/r/cached?cc={q('max-age=600')}"] == 2  # the RFC cache was bypassed
    for r in recording.recorded:
        assert "x-cache-status" not in r.headers and "cache-status" not in r.headers
    data = recording.path.read_bytes()
    assert b"X-Cache-Status" not in data and b"Cache-Status" not in data


def test_replay_answers_every_recorded_request_with_the_origin_stopped(recording: Recording) -> None:
    c = recording.replay.client()
    replayed = [
        c.get("/r/get?a=1&ts=999&b=2"),  # other query order, another ignored ts
        c.head("/r/head"),
        c.post("/r/json", content=b'{"b": [1, 2],  "a": 1}', headers={"Content-Type": "application/json"}),
        c.post("/r/form", content=b"b=2&a=1&utm_source=y", headers=FORM),
        c.get(f"/r/nostore?cc={q('no-store')}"),
        c.get("/r/missing?status=404"),
        c.get(f"/r/redirect?status=302&location={q('/r/get')}"),
        c.get(f"/r/big?size={MIB}"),
        c.get("/r/vary?vary=Accept-Language", headers={"Accept-Language": "en"}),
        c.get("/r/vary?vary=Accept-Language", headers={"Accept-Language": "de"}),
    ]
    recorded = recording.recorded
    expected = [recorded[i] for i in range(8)] + [recorded[9], recorded[8]]
    for got, want in zip(replayed, expected):
        assert (got.status_code, got.content) == (want.status_code, want.content), got.request.url
        assert got.headers["x-cache-status"] == "HIT"
        assert got.headers["cache-status"] == "mitmcache; hit; detail=replay"
    head = replayed[1]
    assert head.content == b"" and head.headers["content-length"] == recorded[1].headers["content-length"] != "0"
    assert replayed[6].status_code == 302 and replayed[6].headers["location"] == "/r/get"
    assert len(replayed[7].content) == MIB
    assert [r.text for r in replayed[8:]] == ["/r/vary #2 Accept-Language=en", "/r/vary #1 Accept-Language=de"]


def test_repeated_requests_are_answered_in_recorded_order_then_the_last_repeats(recording: Recording) -> None:
    c = recording.replay.client()
    assert [c.get("/r/seq").text for _ in range(4)] == ["/r/seq #1", "/r/seq #2", "/r/seq #3", "/r/seq #3"]


def test_unmatched_request_gets_504_naming_it_and_the_closest_without_secrets(recording: Recording) -> None:
    r = recording.replay.client().get(f"/r/get?a=1&b=3&token={SECRET}")
    assert r.status_code == 504
    assert r.headers["x-cache-status"] == "MISS"
    assert r.headers["cache-status"] == "mitmcache; fwd=uri-miss; detail=replay-miss"
    origin = recording.origin.url
    assert f"Request:  GET {origin}/r/get?a=1&b=3&token=REDACTED" in r.text
    assert f"Closest recorded request: GET {origin}/r/get?b=2&a=1&ts=111" in r.text
    assert SECRET not in r.text


def test_redacted_values_are_nowhere_in_the_file_and_still_replay(recording: Recording) -> None:
    assert SECRET.encode() not in recording.path.read_bytes()
    assert b"REDACTED" in recording.path.read_bytes()
    r = recording.replay.client().get("/r/secret?token=another&cookie=1", headers={"Authorization": "Bearer x"})
    assert r.status_code == 200 and r.headers["x-cache-status"] == "HIT"
    assert r.headers["set-cookie"] == "REDACTED"


def test_report_lists_unmatched_and_unused(recording: Recording, tmp_path: Path) -> None:
    """A proxy of its own (the report counts every request of its run)."""
    replay = start_proxy(tmp_path, f"reverse:{recording.origin.url}", f"cache_replay_file={recording.path}",
                         "cache_replay_mode=none", f"cache_replay_report_file={tmp_path / 'report.json'}", *OPTIONS)
    try:
        c = replay.client()
        c.get("/r/seq")
        c.get("/r/nope")
        c.get("/r/nope")
    finally:
        replay.stop()
    report = json.loads((tmp_path / "report.json").read_text())
    origin = recording.origin.url
    assert report["matched"] == 1
    assert report["unmatched"] == [{"request": f"GET {origin}/r/nope", "count": 2}]
    assert f"GET {origin}/r/seq" in report["recorded_but_unused"]  # the 2nd and 3rd answers
    assert len(report["recorded_but_unused"]) == len(recording.recorded) - 1


def test_recording_is_valid_har_1_2_or_a_flow_file_mitmproxy_reads(recording: Recording) -> None:
    if recording.path.suffix == ".har":
        assert_har_1_2(json.loads(recording.path.read_text()))
    flows = read_flows_from_paths([recording.path])  # what mitmweb -r FILE reads
    assert len(flows) == len(recording.recorded)


def assert_har_1_2(har: dict) -> None:  # type: ignore[type-arg]
    """The required fields and types of HAR 1.2 (http://www.softwareishard.com/blog/har-12-spec/)."""
    log = har["log"]
    assert log["version"] == "1.2"
    assert isinstance(log["creator"]["name"], str) and isinstance(log["creator"]["version"], str)
    assert isinstance(log["entries"], list) and log["entries"]
    for e in log["entries"]:
        assert isinstance(e["startedDateTime"], str) and "T" in e["startedDateTime"]
        assert isinstance(e["time"], (int, float)) and e["time"] >= 0
        req, resp = e["request"], e["response"]
        for name, kind in [("method", str), ("url", str), ("httpVersion", str), ("cookies", list),
                           ("headers", list), ("queryString", list), ("headersSize", int), ("bodySize", int)]:
            assert isinstance(req[name], kind), name
        for name, kind in [("status", int), ("statusText", str), ("httpVersion", str), ("cookies", list),
                           ("headers", list), ("content", dict), ("redirectURL", str), ("headersSize", int),
                           ("bodySize", int)]:
            assert isinstance(resp[name], kind), name
        assert all(isinstance(h["name"], str) and isinstance(h["value"], str) for h in req["headers"] + resp["headers"])
        assert isinstance(resp["content"]["size"], int) and isinstance(resp["content"]["mimeType"], str)
        if "postData" in req:
            assert isinstance(req["postData"]["mimeType"], str)
        assert isinstance(e["cache"], dict)
        for name in ("send", "wait", "receive"):
            assert isinstance(e["timings"][name], (int, float)) and e["timings"][name] >= 0


def test_new_episodes_replays_matches_and_appends_the_rest(recording: Recording, tmp_path: Path) -> None:
    path = tmp_path / recording.path.name
    shutil.copy(recording.path, path)
    origin = start_origin(port=recording.origin.port)  # the recorded origin, back
    try:
        proxy = start_proxy(tmp_path, f"reverse:{origin.url}", f"cache_replay_file={path}",
                            "cache_replay_mode=new_episodes", *OPTIONS)
        try:
            c = proxy.client()
            old = c.get("/r/seq")
            new = c.get("/r/new")
        finally:
            proxy.stop()
        assert (old.text, old.headers["x-cache-status"]) == ("/r/seq #1", "HIT")
        assert new.text == "/r/new #1" and "x-cache-status" not in new.headers
        assert origin.counts == {"/r/new": 1}
    finally:
        origin.stop()
    replay = start_proxy(tmp_path, f"reverse:{origin.url}", f"cache_replay_file={path}", "cache_replay_mode=none", *OPTIONS)
    try:
        c = replay.client()
        assert c.get("/r/new").text == "/r/new #1"
        assert c.get("/r/get?a=1&b=2").headers["x-cache-status"] == "HIT"  # the old ones are kept
    finally:
        replay.stop()


def test_recording_is_on_disk_whole_before_exit_and_survives_a_kill(tmp_path: Path) -> None:
    """Written atomically about a second after each recording: a SIGKILL loses nothing older."""
    path = tmp_path / "killed.mitm"
    origin = start_origin()
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}", f"cache_replay_file={path}", "cache_replay_mode=all")
    try:
        c = proxy.client()
        for i in range(3):
            c.get(f"/k/{i}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (path.exists() and len(read_flows_from_paths([path])) == 3):
            time.sleep(0.1)
        proxy.proc.kill()
        proxy.proc.wait(10)
    finally:
        proxy.stop()
        origin.stop()
    assert [f.request.path for f in read_flows_from_paths([path])] == ["/k/0", "/k/1", "/k/2"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed")] == []  # no temporary file left


def test_once_records_when_the_file_is_missing_and_replays_when_it_exists(tmp_path: Path) -> None:
    path = tmp_path / "once.har"
    origin = start_origin()
    try:
        for run in (1, 2):
            proxy = start_proxy(tmp_path, f"reverse:{origin.url}", f"cache_replay_file={path}", "cache_replay_mode=once")
            try:
                c = proxy.client()
                r = c.get("/o/1")
                miss = c.get("/o/2") if run == 2 else None
            finally:
                proxy.stop()
            assert r.text == "/o/1 #1"
            assert r.headers.get("x-cache-status") == (None if run == 1 else "HIT")
        assert miss is not None and miss.status_code == 504
        assert origin.counts == {"/o/1": 1}  # the unmatched /o/2 never reached the network
    finally:
        origin.stop()


def test_browser_exported_har_replays(tmp_path: Path) -> None:
    """A hand-made HAR in the shape Chrome and Firefox export (pages, _initiator, gzip'd text
    content, base64 image, POST with postData) replays through a reverse proxy to its host."""
    fixture = FIXTURES / "browser.har"
    proxy = start_proxy(tmp_path, "reverse:http://app.example.test", f"cache_replay_file={fixture}",
                        "cache_replay_mode=none")
    try:
        c = proxy.client()
        items = c.get("/api/items?page=1&sort=name")
        logo = c.get("/static/logo.png")
        created = c.post("/api/items", json={"name": "widget", "qty": 2})
        miss = c.get("/api/other")
    finally:
        proxy.stop()
    assert items.status_code == 200 and items.json() == {"items": ["a", "b"], "page": 1}
    assert items.headers["cache-status"] == "mitmcache; hit; detail=replay"
    assert logo.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert created.status_code == 201 and created.json() == {"id": 7}
    assert miss.status_code == 504
    assert "Closest recorded request: GET http://app.example.test/api/items?page=1&sort=name" in miss.text


@pytest.mark.parametrize("sets, message", [
    pytest.param(("cache_replay_mode=sometimes", "cache_replay_file=x.har"), "cache_replay_mode: must be one of off, none, once", id="mode"),
    pytest.param(("cache_replay_mode=none", "cache_replay_file=missing.har"), "cache_replay_file: 'missing.har' does not exist", id="file"),
])
def test_bad_replay_options_stop_start_up_with_one_line(tmp_path: Path, sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        start_proxy(tmp_path, "regular", *sets)
