"""Replay addon: record and replay for CI (``cache_replay_*`` options, ``cache.replay.report``).

It owns the cassette file: read with mitmproxy's readers (flow files and HAR), written with
``mitmproxy.io.FlowWriter`` or mitmproxy's HAR export, always atomically (a temporary file in
the same directory, then ``os.replace``): at most a second after a recording, and at exit
(also on SIGTERM, which mitmdump turns into a normal shutdown). It has no hooks of its own:
``HttpCache.request`` asks ``request`` first, ``HttpCache.response`` hands the origin's answer
to ``record`` before the cache adds anything. Matching, redaction and dates are in ``replay.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mitmproxy import command, ctx, exceptions, http, io
from mitmproxy.addons.savehar import SaveHar

from .. import replay as rp
from ..messages import Response
from ..outcome import HIT, MISS, Outcome
from ..semantics import CacheStatus
from ..service import CacheService
from .config import reject_unparsable, report_option_errors, spawn

log = logging.getLogger("mitmcache")

OPTIONS = (
    "cache_replay_file", "cache_replay_mode", "cache_replay_ignore_params", "cache_replay_match_headers",
    "cache_replay_redact", "cache_replay_redact_params", "cache_replay_refresh", "cache_replay_report_file",
)
FLUSH_DELAY = 1.0  # seconds between a recording and the file's rewrite (crash safety)
NO_BODY_STATUS = (204, 304)


def is_har(path: str) -> bool:
    return path.lower().endswith(".har")


def request_of(flow: http.HTTPFlow) -> rp.RecordedRequest:
    r = flow.request
    try:
        body = r.get_content(strict=False) or b""
    except ValueError:
        body = r.raw_content or b""
    return rp.RecordedRequest(
        r.data.method.decode("utf-8", "surrogateescape"), r.scheme, r.host, r.port, r.path,
        tuple(r.headers.items(multi=True)), body,
    )


def response_of(flow: http.HTTPFlow) -> Response:
    resp = flow.response
    assert resp is not None
    start = resp.timestamp_start or flow.request.timestamp_start or time.time()
    return Response(
        resp.status_code, resp.reason, tuple(resp.headers.items(multi=True)), resp.raw_content or b"",
        flow.request.timestamp_start or start, start,
    )


def redacted_copy(flow: http.HTTPFlow, spec: rp.Spec) -> http.HTTPFlow:
    """The flow as it goes into the file: secrets replaced by REDACTED, nothing of the cache's
    (comment, marker, metadata)."""
    f = flow.copy()
    f.comment, f.marked, f.metadata = "", "", {}
    req = f.request
    for name in {k.lower() for k in req.headers}:
        if name in spec.redact_headers:
            req.headers.set_all(name, [rp.REDACTED] * len(req.headers.get_all(name)))
    req.path = rp.redact_query(req.path, spec)
    if req.raw_content:
        headers = tuple(req.headers.items(multi=True))
        form = rp.redact_form(headers, req.raw_content, spec)
        if form != req.raw_content:
            req.content = form
    if f.response is not None:
        for name in {k.lower() for k in f.response.headers}:
            if name in spec.redact_headers:
                f.response.headers.set_all(name, [rp.REDACTED] * len(f.response.headers.get_all(name)))
    return f


def read_cassette(path: str) -> list[http.HTTPFlow]:
    """The HTTP flows of a flow file or HAR with a response, in file order. Raises
    FlowReadException / ValueError."""
    flows = [f for f in io.read_flows_from_paths([path]) if isinstance(f, http.HTTPFlow)]
    if is_har(path):
        _har_fixups(path, flows)
    return [f for f in flows if f.response is not None]


def _har_fixups(path: str, flows: list[http.HTTPFlow]) -> None:
    """What mitmproxy's HAR reader loses (mitmproxy-notes A4): a binary request body (written
    base64 with ``postData._encoding``) and the recorded Content-Length of a bodiless answer
    (HEAD, 204, 304), which the reader recomputes from the empty body."""
    entries = json.loads(Path(path).read_bytes())["log"]["entries"]
    for f, entry in zip(flows, entries):
        post = entry.get("request", {}).get("postData") or {}
        if post.get("_encoding") == "base64" and isinstance(post.get("text"), str):
            f.request.raw_content = base64.b64decode(post["text"])
        if f.response is not None and (f.request.method == "HEAD" or f.response.status_code in NO_BODY_STATUS):
            lengths = [h.get("value") for h in entry["response"].get("headers", [])
                       if isinstance(h, dict) and str(h.get("name", "")).lower() == "content-length"]
            f.response.headers.pop("content-length", None)
            if lengths and f.response.status_code not in NO_BODY_STATUS:
                f.response.headers["Content-Length"] = str(lengths[0])


def har_bytes(flows: Sequence[http.HTTPFlow]) -> bytes:
    """HAR 1.2 by mitmproxy's own export; binary request bodies base64 in ``postData``."""
    har = SaveHar().make_har(flows)
    har["log"]["creator"]["comment"] = "mitmcache cache_replay recording"
    for f, entry in zip(flows, har["log"]["entries"]):
        body = f.request.raw_content or b""
        if not body:
            continue
        # mitmproxy exports postData for POST/PUT/PATCH only; a body is part of matching for any method.
        post = entry["request"].setdefault(
            "postData", {"mimeType": f.request.headers.get("Content-Type", ""), "text": f.request.get_text(strict=False), "params": []},
        )
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            post.update(text=base64.b64encode(body).decode(), _encoding="base64", params=[])
    for entry in har["log"]["entries"]:
        for part in ("request", "response"):
            for cookie in entry.get(part, {}).get("cookies", []):
                if not isinstance(cookie.get("value"), str):
                    cookie["value"] = ""  # HAR 1.2: a string (a redacted Set-Cookie has none)
    har, replaced = _utf8_only(har)
    if replaced:
        log.warning(
            f"mitmcache: replay: {replaced} HAR value(s) held bytes that are not UTF-8 (e.g. a header byte 0xFF); "
            "HAR is text, so they are written as U+FFFD: use a flow file cassette for byte-exact replay"
        )
    return json.dumps(har, indent=2).encode()


def _utf8_only(value: Any) -> tuple[Any, int]:
    """``value`` with every string made valid UTF-8 (mitmproxy keeps undecodable header bytes as
    lone surrogates, which a HAR reader refuses): (cleaned, how many strings changed)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), 1
        return value, 0
    if isinstance(value, dict):
        out, n = {}, 0
        for k, v in value.items():
            out[k], m = _utf8_only(v)
            n += m
        return out, n
    if isinstance(value, list):
        items = [_utf8_only(v) for v in value]
        return [v for v, _ in items], sum(m for _, m in items)
    return value, 0


def flow_bytes(flows: Sequence[http.HTTPFlow]) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    writer = io.FlowWriter(buf)
    for f in flows:
        writer.add(f)
    return buf.getvalue()


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader (or a crash) never sees a partial file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fo:
            fo.write(data)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replayed_response(rec: rp.Recorded, head: bool, spec: rp.Spec, now: float) -> http.Response:
    """The recorded answer with its recorded framing (Content-Length / Transfer-Encoding as
    recorded, mitmproxy-notes A4), dates shifted unless ``cache_replay_refresh`` is off."""
    resp = rec.response
    headers = rp.refresh_dates(resp.headers, now - resp.response_time) if spec.refresh else resp.headers
    body = b"" if head or resp.status in NO_BODY_STATUS else resp.body or b""
    names = {k.lower() for k, _ in headers}
    if body and "content-length" not in names and "transfer-encoding" not in names:
        headers = (*headers, ("Content-Length", str(len(body))))
    wire = http.Headers([(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape")) for k, v in headers])
    return http.Response(b"HTTP/1.1", resp.status, resp.reason.encode("utf-8", "surrogateescape"), wire, body, None, now, now)


class Replay:
    name = "mitmcache.replay"

    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.active = False  # read by HttpCache on every request: one attribute when off
        self.mode = "off"
        self.effective = "off"
        self.path = ""
        self.spec = rp.Spec()
        self.cassette: rp.Cassette | None = None
        self._to_write: list[http.HTTPFlow] = []  # the file's flows (kept ones + new ones)
        self._recorded = 0
        self._recording: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._generation = 0  # bumped per recording; a write of an older snapshot is skipped
        self._written = 0
        self._write_lock = threading.Lock()
        self._flush_pending = False

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "cache_replay_file", str, "",
            "The recording: a path ending in .har is HAR 1.2, anything else a mitmproxy flow file.",
        )
        loader.add_option(
            "cache_replay_mode", str, "off",
            "off | none (replay only, unmatched -> 504) | once (all when the file is missing or empty, "
            "else none) | new_episodes (replay matches, record the rest) | all (record everything).",
            choices=list(rp.MODES),
        )
        loader.add_option(
            "cache_replay_ignore_params", str, "",
            "Comma list of query/form parameter names (* globs) left out of matching, e.g. ts,utm_*.",
        )
        loader.add_option(
            "cache_replay_match_headers", str, "",
            "Comma list of request headers whose values are part of matching.",
        )
        loader.add_option(
            "cache_replay_redact", str, rp.DEFAULT_REDACT,
            "Comma list of headers written as REDACTED to the recording and left out of matching.",
        )
        loader.add_option(
            "cache_replay_redact_params", str, "",
            "Comma list of query/form parameter names (* globs) written as REDACTED and left out of matching.",
        )
        loader.add_option(
            "cache_replay_refresh", bool, True,
            "Shift Date, Expires and Last-Modified of replayed responses by the time since recording.",
        )
        loader.add_option(
            "cache_replay_report_file", str, "",
            "Write the cache.replay.report JSON to this file at exit (used by scripts/replay).",
        )
        reject_unparsable(loader, ("cache_replay_refresh",))

    @report_option_errors
    def configure(self, updated: set[str]) -> None:
        if not updated.intersection(OPTIONS):
            return
        o = ctx.options
        mode = o.cache_replay_mode
        if mode not in rp.MODES:
            raise exceptions.OptionsError(f"cache_replay_mode: must be one of {', '.join(rp.MODES)}, not {mode!r}")
        path = o.cache_replay_file
        if mode != "off" and not path:
            raise exceptions.OptionsError(f"cache_replay_file: needed with cache_replay_mode={mode}")
        spec = rp.Spec.parse(
            o.cache_replay_ignore_params, o.cache_replay_redact_params, o.cache_replay_match_headers,
            o.cache_replay_redact, o.cache_replay_refresh,
        )
        exists = bool(path) and os.path.exists(path) and os.path.getsize(path) > 0
        effective = {"once": "none" if exists else "all"}.get(mode, mode)
        if effective == "none" and not exists:
            raise exceptions.OptionsError(
                f"cache_replay_file: {path!r} does not exist or is empty (cache_replay_mode=none only "
                "replays; record with once, new_episodes or all)"
            )
        flows: list[http.HTTPFlow] = []
        if exists and effective in ("none", "new_episodes"):
            try:
                flows = read_cassette(path)
            except (exceptions.FlowReadException, ValueError, KeyError, TypeError) as e:
                raise exceptions.OptionsError(f"cache_replay_file: cannot read {path!r}: {e}") from None
        if self.active:  # a live change: what was recorded so far goes to the old file first
            try:
                self.flush()
            except OSError as e:
                log.warning(f"mitmcache: replay: cannot write {self.path}: {e}")
        self.mode, self.effective, self.path, self.spec = mode, effective, path, spec
        self.cassette = None if mode == "off" else rp.Cassette.of(spec, ((request_of(f), response_of(f)) for f in flows))
        # new_episodes rewrites the file: what it keeps is redacted with today's options too.
        self._to_write = [redacted_copy(f, spec) for f in flows] if effective == "new_episodes" else []
        self._recorded = 0
        self.active = mode != "off"
        if self.active:
            log.info(
                f"mitmcache: replay mode {mode}" + (f" (as {effective})" if effective != mode else "")
                + f", {len(flows)} recorded exchanges from {path}"
            )

    # -- called by HttpCache ---------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> Outcome | None:
        """Answer ``flow`` from the recording (sets ``flow.response``; the Outcome to render),
        or mark it to be recorded (an Outcome without a label: forward, bypassing the RFC
        cache), or None when replay is off. ``none`` never lets a request through."""
        assert self.cassette is not None
        req = request_of(flow)
        if self.effective != "all":
            rec = self.cassette.lookup(req)
            if rec is not None:
                flow.response = replayed_response(rec, req.method == "HEAD", self.spec, time.time())
                flow.is_replay = "response"
                return Outcome(req.url, req.method, label=HIT, status=CacheStatus(hit=True, detail=["replay"]))
            if self.effective == "none":
                body = self.cassette.miss_message(req, self.mode).encode()
                flow.response = http.Response.make(
                    504, b"" if req.method == "HEAD" else body,
                    {"Content-Type": "text/plain; charset=utf-8"},
                )
                return Outcome(req.url, req.method, label=MISS, status=CacheStatus(fwd="uri-miss", detail=["replay-miss"]))
        self._recording.add(flow)
        return Outcome(req.url, req.method)

    def record(self, flow: http.HTTPFlow) -> bool:
        """Keep the origin's answer of a flow marked by ``request`` (as the origin sent it);
        True when the flow was one to record."""
        if flow not in self._recording:
            return False
        self._recording.discard(flow)
        resp = flow.response
        if resp is None or resp.raw_content is None:
            log.warning(f"mitmcache: replay: not recorded (body streamed, not kept): {flow.request.method} {flow.request.pretty_url}")
            return True
        self._to_write.append(redacted_copy(flow, self.spec))
        self._recorded += 1
        self._generation += 1
        if not self._flush_pending:
            self._flush_pending = bool(spawn(self._flush_later(), "replay flush"))
        return True

    # -- writing ---------------------------------------------------------------------------

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(FLUSH_DELAY)
        finally:
            self._flush_pending = False
        generation, flows = self._generation, list(self._to_write)
        try:
            await asyncio.to_thread(self._write, generation, flows)
        except OSError as e:
            log.warning(f"mitmcache: replay: cannot write {self.path}: {e}")

    def _write(self, generation: int, flows: list[http.HTTPFlow]) -> None:
        data = har_bytes(flows) if is_har(self.path) else flow_bytes(flows)
        with self._write_lock:
            if generation < self._written:
                return  # a newer snapshot is already on disk
            write_atomically(self.path, data)
            self._written = generation

    def flush(self) -> None:
        """Write the recording now (synchronously; at exit). ``all`` always rewrites the file;
        ``new_episodes`` only when something new was recorded."""
        if self.effective == "all" or (self.effective == "new_episodes" and self._recorded):
            self._write(self._generation, list(self._to_write))

    def done(self) -> None:
        if not self.active:
            return
        try:
            self.flush()
        except OSError as e:
            log.error(f"mitmcache: replay: cannot write {self.path}: {e}")
        rep = self.report_dict()
        if ctx.options.cache_replay_report_file:
            try:
                write_atomically(ctx.options.cache_replay_report_file, json.dumps(rep, indent=2).encode())
            except OSError as e:
                log.warning(f"mitmcache: replay: cannot write the report: {e}")
        line = rp.summary_line(rep)
        (log.warning if rep["unmatched"] else log.info)(line)

    def report_dict(self) -> dict[str, object]:
        return rp.report(self.cassette, self.mode, self.effective, self.path, self._recorded)

    @command.command("cache.replay.report")
    def report(self) -> str:
        """The replay summary as JSON: matched, unmatched (method + URL), recorded but unused."""
        return json.dumps(self.report_dict(), indent=2)
