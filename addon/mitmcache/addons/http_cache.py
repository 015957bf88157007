"""HttpCache: the one addon with the ``request`` / ``response`` / ``error`` hooks.

It turns a flow into plain values once, runs the pipeline, copies what the pipeline decided
onto the flow, and renders the request's ``Outcome`` once: ``X-Cache-Status``,
``Cache-Status`` (RFC 9211), ``flow.comment``, ``flow.metadata`` and the flow-list marker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.net.http.http1 import expected_http_body_size
from mitmproxy.utils import human

from .. import semantics as sem
from ..messages import Request, Response
from ..semantics import format_http_date
from ..outcome import HIT, MISS, STALE, Outcome
from ..pipeline import Exchange, Passed
from ..policy import Policy, PolicySet
from ..service import CacheService
from . import origin_deadline
from .config import reject_unparsable, report_option_errors
from .policies import match_flow
from .replay import Replay

log = logging.getLogger("mitmcache")

METADATA_KEY = "mitmcache"
# A leader whose deadline passed before its request reached the origin (see origin_deadline):
# looked at again after RECHECK seconds, doubling up to RECHECK_MAX, until the request is out.
RECHECK, RECHECK_MAX = 0.02, 0.25
MARKERS = {HIT: ":green_circle:", STALE: ":orange_circle:"}


_MATCH = object()  # request_from_flow: match the operator rules


def request_from_flow(flow: http.HTTPFlow, policies: PolicySet, policy: Policy | None | object = _MATCH) -> Request:
    """The flow's request as a plain value, under ``policy`` (default: the rule of ``policies``
    that matches the flow, if any)."""
    r = flow.request
    if policy is _MATCH:
        policy = match_flow(policies, flow) if policies else None
    assert policy is None or isinstance(policy, Policy)
    return Request(
        # The method as sent: mitmproxy's Request.method upper-cases it, but methods are
        # case-sensitive (RFC 9110 §9.1): a "get" is not a GET.
        r.data.method.decode("utf-8", "surrogateescape"), r.scheme, r.host, r.port, r.path,
        tuple(r.headers.items(multi=True)), r.host_header, r.timestamp_start or time.time(),
        policy, r.authority,
    )


_REQUEST_FIELDS = frozenset(n.encode() for n in sem.STORABILITY_REQUEST_FIELDS)
_KEY_MEMO_SIZE = 4096  # request targets whose key is remembered (the hot URLs of a busy proxy)
_KEY_MEMO_PATH = 1024  # bytes: longer request targets are not remembered


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # as mitmproxy decodes header bytes


def may_exceed(fields: tuple[tuple[bytes, bytes], ...], limit: int) -> bool:
    """False when the response's framing says its body is within ``limit`` bytes or of
    unknown length (every Content-Length line plain digits within it, or none): then only
    ``stream_large_bodies`` could make it stream. True: ask ``body_length``."""
    for name, value in fields:
        if name.lower() == b"content-length":
            value = value.strip()
            if not value.isdigit() or len(value) > 18 or int(value) > limit:
                return True
    return False


def response_from_flow(flow: http.HTTPFlow) -> Response:
    resp = flow.response
    assert resp is not None
    now = time.time()
    return Response(
        resp.status_code, resp.reason, tuple(resp.headers.items(multi=True)), resp.raw_content,
        flow.request.timestamp_start or now, resp.timestamp_end or now,
    )


def _wire(value: str) -> bytes:
    # mitmproxy decodes header bytes as UTF-8 with surrogateescape: this gives the bytes back.
    return value.encode("utf-8", "surrogateescape")


class Tee:
    """A ``flow.response.stream`` callable: every chunk goes on to the client at once, and a
    copy is kept while the body stays within ``limit`` bytes, so a storable response is stored
    while it streams (not held whole first). ``body`` is the whole body only once the stream
    ended (mitmproxy calls with ``b""`` last); a body over the limit keeps nothing."""

    __slots__ = ("limit", "size", "parts", "ended")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] | None = []
        self.ended = False

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            self.ended = True
        elif self.parts is not None:
            self.size += len(chunk)
            if self.size > self.limit:
                self.parts = None  # too large to store: stop copying
            else:
                self.parts.append(chunk)
        return chunk

    def take(self) -> bytes | None:
        """The whole body (None if it did not end whole within the limit); the copy is
        released, so a large body is held once, by whoever stores it."""
        body = b"".join(self.parts) if self.ended and self.parts is not None else None
        if self.parts is not None:
            self.parts = [] if body is not None else None
        return body


def to_mitmproxy(
    resp: Response, drop: frozenset[str] = frozenset(), add: tuple[tuple[str, str], ...] = ()
) -> http.Response:
    """A response built by the cache, with its headers and body exactly as given (no
    Content-Length added: ``responses`` frames HEAD/304/206 itself), less the fields named in
    ``drop`` (lower-case), plus ``add`` — in one pass: mitmproxy's Headers edits cost more."""
    fields = [(_wire(k), _wire(v)) for k, v in resp.headers if not drop or k.lower() not in drop]
    fields += [(_wire(k), _wire(v)) for k, v in add]
    headers = http.Headers(fields)
    return http.Response(
        b"HTTP/1.1", resp.status, _wire(resp.reason), headers, resp.body or b"", None,
        resp.request_time, resp.response_time,
    )


def body_length(flow: http.HTTPFlow) -> int | None:
    """The response body's length as framed (mitmproxy's reader: Content-Length, 0 for
    HEAD/1xx/204/304), None when unknown (chunked, read until close, or malformed)."""
    assert flow.response is not None
    try:
        length = expected_http_body_size(flow.request, flow.response)
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


class HttpCache:
    name = "mitmcache.httpcache"

    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.mark_flows = True
        self.stream_threshold: int | None = None  # mitmproxy's stream_large_bodies, in bytes
        # Fields a cache answer never carries from the stored response: its own status fields,
        # and purge tags unless passed through; compiled once per Settings object.
        self._dropped: tuple[object, frozenset[str], frozenset[bytes]] = (None, frozenset(), frozenset())
        # Live per-flow state beside the flow, not in flow.metadata (which flow files keep).
        self._exchanges: weakref.WeakKeyDictionary[http.HTTPFlow, Exchange] = weakref.WeakKeyDictionary()
        # Forwarded requests the cache waits on, until their response headers arrive.
        self._deadlines: dict[http.HTTPFlow, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Requests sent upstream by a hit-for-pass marker on the fast path (no Exchange yet).
        self._passing: weakref.WeakKeyDictionary[http.HTTPFlow, Passed] = weakref.WeakKeyDictionary()
        # Request target → cache key, for requests no operator rule matches (keys.for_request
        # costs more than a passed request's whole hook should).
        self._keys: dict[tuple[object, ...], str] = {}
        # The response lines the pass fast path reads (storability, malformed fields), as
        # bytes, compiled once per Settings object (the targeted fields are settings).
        self._wanted: tuple[object, frozenset[bytes]] = (None, frozenset())
        self.replay: Replay | None = None  # record and replay (addons/replay.py), set by default_addons
        self.purge: Callable[[http.HTTPFlow], Awaitable[None]] | None = None  # answers PURGE (addons/purge.py)

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "cache_mark_flows", bool, True,
            "Mark flows answered from the cache in the flow list (HIT green, STALE orange).",
        )
        reject_unparsable(loader, ("cache_mark_flows",))

    @report_option_errors
    def configure(self, updated: set[str]) -> None:
        if "cache_mark_flows" in updated:
            self.mark_flows = ctx.options.cache_mark_flows
        if "stream_large_bodies" in updated:
            value = getattr(ctx.options, "stream_large_bodies", None)
            try:
                self.stream_threshold = human.parse_size(value) if value else None
            except ValueError:
                self.stream_threshold = None  # mitmproxy itself refuses the option
        # mitmproxy-notes §0.4: with the default eager strategy a HIT cannot be served while
        # the origin is down (the client connection is closed first). A cache needs lazy.
        if "connection_strategy" in updated and getattr(ctx.options, "connection_strategy", "lazy") != "lazy":
            if ctx.options.has_changed("connection_strategy"):  # the user asked for eager: say why not
                log.warning("mitmcache: setting connection_strategy=lazy so hits are served without the origin")
            ctx.options.update(connection_strategy="lazy")

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return  # already answered by someone else
        if flow.request.data.method == b"PURGE" and self.purge is not None:
            return await self.purge(flow)  # answered here, never forwarded
        if self.replay is not None and self.replay.active:
            # Record/replay: a replayed answer or its 504 never consults the RFC cache, and a
            # request to record bypasses it (the file holds exactly what the origin sent).
            replayed = self.replay.request(flow)
            if replayed is not None:
                if replayed.label is not None:
                    self._render(flow, replayed)
                return
        service = self.service
        policy = match_flow(service.policies, flow) if service.policies else None
        key = None
        if policy is None:
            # Hit-for-pass fast path: one pass over the request's fields, the key, one dict
            # lookup; a passed request builds nothing else (pipeline.pass_at_once).
            key, fields, only_if_cached = self._scan_request(flow)
            method = flow.request.data.method
            if (method == b"GET" or method == b"HEAD") and not only_if_cached:
                now = time.time()
                marker = service.store.pass_marker(key, now)
                if marker is not None:
                    self._passing[flow] = service.pipeline.pass_at_once(key, method.decode(), marker, fields, now)
                    return
        ex = await service.pipeline.request(request_from_flow(flow, service.policies, policy), key)
        if ex.reply is not None:
            self._answer(flow, ex.reply, ex.outcome)
            return
        self._exchanges[flow] = ex
        delay = self.service.pipeline.origin_deadline(ex)
        if delay is not None and delay <= 0:
            # The deadline passed while this hook waited (for another proxy's fill of the key):
            # answered as its waiters were, not sent to an origin that has no time left.
            self._exchanges.pop(flow, None)
            reply = self.service.pipeline.origin_timed_out(ex)
            self._answer(flow, reply, ex.outcome)
            log.info(f"mitmcache: {self._why()} for {flow.request.url}: answered {reply.status} before forwarding")
            await self.service.pipeline.abandon_fetch(ex)
            return
        if delay is not None:
            self._deadlines[flow] = asyncio.get_running_loop().call_later(delay, self._deadline_passed, flow)
        if ex.validators or ex.strip_conditionals:
            headers = flow.request.headers
            for name in ("if-none-match", "if-modified-since"):
                headers.pop(name, None)
            for name, value in ex.validators:
                headers[name] = value

    def _scan_request(self, flow: http.HTTPFlow) -> tuple[str, sem.HeaderList, bool]:
        """One pass over the request's fields: its cache key (memoised by what
        ``keys.for_request`` reads of a request no rule matches), the lines storability reads,
        and whether it says only-if-cached (RFC 9111 §5.2.1.7)."""
        data = flow.request.data
        hosts: list[bytes] = []
        fields: list[tuple[str, str]] = []
        for name, value in data.headers.fields:
            lower = name.lower()
            if lower == b"host":
                hosts.append(value)
            elif lower in _REQUEST_FIELDS:
                fields.append((_text(name), _text(value)))
        memo = (data.scheme, data.host, data.port, data.path, data.authority, data.http_version, *hosts)
        key = self._keys.get(memo)
        if key is None:
            r = flow.request
            key = self.service.keys.build(r.scheme, r.host, r.port, r.path, r.host_header, None, (), r.authority)
            if len(data.path) <= _KEY_MEMO_PATH:  # a bounded memo: long targets are keyed each time
                if len(self._keys) >= _KEY_MEMO_SIZE:
                    del self._keys[next(iter(self._keys))]  # the oldest
                self._keys[memo] = key
        only_if_cached = bool(fields) and sem.RequestDirectives.from_headers(fields).only_if_cached
        return key, fields, only_if_cached

    def _resume(self, flow: http.HTTPFlow) -> Exchange | None:
        """The Exchange of a request on the pass fast path, built now for the full path."""
        passed = self._passing.pop(flow, None)
        if passed is None:
            return None
        ex = self._exchanges[flow] = self.service.pipeline.resume(passed, request_from_flow(flow, self.service.policies, None))
        return ex

    def _finish_passed(self, flow: http.HTTPFlow, passed: Passed) -> bool:
        """The answer to a request on the pass fast path, in one pass over its fields: True
        when it is done (not storable, the marker stays: headers stamped, outcome rendered);
        False when the full path must take it (storable now, the marker due for renewal, a
        streamed body)."""
        resp = flow.response
        assert resp is not None
        body = resp.raw_content
        if resp.stream or body is None:
            return False
        wanted, drop = self._response_fields(), self._drop()[1]
        fields: list[tuple[str, str]] = []
        dated = dropping = False
        for name, value in resp.headers.fields:
            lower = name.lower()
            if lower in wanted:
                fields.append((_text(name), _text(value)))
                dated = dated or lower == b"date"
            if lower in drop:
                dropping = True
        now = time.time()
        received = resp.timestamp_end or now
        if not self.service.pipeline.finish_pass(passed, resp.status_code, fields, len(body), received, now):
            return False
        # RFC 9110 §6.6.1: a recipient with a clock adds the time of receipt (as _add_date).
        date = () if dated else ((b"Date", format_http_date(received).encode()),)
        self._render(flow, passed.outcome, date, dropping)
        return True

    def _response_fields(self) -> frozenset[bytes]:
        settings = self.service.settings
        if self._wanted[0] is not settings:
            names = sem.STORABILITY_RESPONSE_FIELDS | set(settings.targets)
            self._wanted = (settings, frozenset(n.lower().encode() for n in names))
        return self._wanted[1]

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Stream what should not be held whole: a body over cache_max_object_bytes (it cannot be
        stored anyway), and — once the user enables mitmproxy's ``stream_large_bodies`` — any
        body over that threshold or of unknown length. A streamed response the cache may store
        goes through a ``Tee`` (stored while it streams, when it ends whole within
        cache_max_object_bytes). Its headers leave now, so they say MISS now
        (``detail=streamed``); the flow's comment and metadata get the final outcome."""
        if self._deadlines and self._disarm(flow):
            ex = self._exchanges.get(flow)  # None for the cache's own answer at the deadline
            if ex is not None:
                self.service.pipeline.origin_answering(ex)
        resp = flow.response
        if resp is None or callable(resp.stream):
            return  # another addon streams it its own way
        limit = self.service.settings.max_object_bytes
        threshold = self.stream_threshold
        if not resp.stream and threshold is None and not may_exceed(resp.headers.fields, limit):
            return  # the common case, decided without reading the framing twice
        length = body_length(flow)
        if length == 0:
            return
        if not (
            resp.stream
            or (length is not None and length > limit)
            or (threshold is not None and (length is None or length > threshold))
        ):
            return
        ex = self._exchanges.get(flow) or self._resume(flow)
        storable = (
            ex is not None and ex.request.method == "GET" and not ex.bypass and (length is None or length <= limit)
        )
        resp.stream = Tee(limit) if storable else True
        if ex is None:
            return
        self._add_date(resp)
        outcome = ex.outcome
        outcome.status.fwd = outcome.status.fwd or "uri-miss"
        outcome.status.fwd_status = resp.status_code
        outcome.status.detail.append("streamed")
        if length is not None and length > limit:
            outcome.status.detail.append("too-large")
        resp.headers["X-Cache-Status"] = MISS
        resp.headers["Cache-Status"] = outcome.status.render()


    @staticmethod
    def _add_date(resp: http.Response) -> None:
        if "date" not in resp.headers:
            # RFC 9110 §6.6.1: a recipient with a clock adds the time of receipt to a response
            # it caches or forwards without one.
            resp.headers["Date"] = format_http_date(resp.timestamp_end or time.time())

    async def response(self, flow: http.HTTPFlow) -> None:
        if self.replay is not None and self.replay.active and self.replay.record(flow):
            return  # recorded as the origin sent it: the cache adds nothing
        ex = self._exchanges.pop(flow, None)
        if ex is None:
            passed = self._passing.pop(flow, None)
            if passed is None or flow.response is None or self._finish_passed(flow, passed):
                return
            ex = self.service.pipeline.resume(passed, request_from_flow(flow, self.service.policies, None))
        if flow.response is None:
            return
        self._add_date(flow.response)
        received = response_from_flow(flow)
        stream = flow.response.stream
        if isinstance(stream, Tee):
            body = stream.take()
            received = dataclasses.replace(received, body=body, too_large=stream.size if body is None and stream.parts is None else None)
        elif stream and received.body is None:
            # Streamed untouched: it was too large to keep, or mitmproxy switched to streaming midway.
            length = body_length(flow)
            if length is not None and length > self.service.settings.max_object_bytes:
                received = dataclasses.replace(received, too_large=length)
        replacement = await self.service.pipeline.response(ex, received)
        if replacement is not None and not flow.response.stream:  # a streamed body has left already
            flow.response = to_mitmproxy(replacement)
        if ex.outcome.label is not None:
            self._render(flow, ex.outcome)

    async def error(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow)
        ex = self._exchanges.pop(flow, None)
        if ex is not None:
            await self.service.pipeline.error(ex)
        elif (passed := self._passing.pop(flow, None)) is not None:
            self.service.pipeline.pass_failed(passed)

    def _disarm(self, flow: http.HTTPFlow) -> bool:
        """Cancel ``flow``'s deadline; whether it had one."""
        timer = self._deadlines.pop(flow, None)
        if timer is not None:
            timer.cancel()
        return timer is not None

    def _why(self) -> str:
        timeout_ms = round(self.service.settings.origin_timeout * 1000)
        return f"the origin did not answer within cache_origin_timeout_ms ({timeout_ms} ms)"

    def _deadline_passed(self, flow: http.HTTPFlow) -> None:
        self._deadlines.pop(flow, None)
        self._spawn(self._time_out(flow))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _client_gone(flow: http.HTTPFlow) -> bool:
        """The flow's client has disconnected (a replayed flow's copied client never had one)
        and mitmproxy has reported no error for the flow."""
        return flow.client_conn.timestamp_end is not None and flow.error is None and flow.is_replay is None

    async def _client_left(self, flow: http.HTTPFlow) -> None:
        """The client left while its request waited for an origin connection: mitmproxy ends
        such a flow without an ``error`` hook, so the fetch it leads is failed here — its
        waiters elect a new leader and its lease is released; else the flight would stay, and
        every later request for the URL would share its long-passed deadline (an instant 504)."""
        ex = self._exchanges.pop(flow, None)
        if ex is not None:
            log.info(f"mitmcache: the client left before {flow.request.url} reached the origin: its fetch is given up")
            await self.service.pipeline.error(ex)

    def _until_sent(self, flow: http.HTTPFlow, recheck: float) -> None:
        """The deadline passed before the request reached the origin (mitmproxy was opening a
        connection, or waiting for a free one): look again every ``recheck`` seconds (growing)
        until it is out, then give the origin cache_origin_timeout_ms from then — time spent
        queued inside mitmproxy is not the origin's."""
        self._deadlines.pop(flow, None)
        if flow not in self._exchanges or flow.response is not None or not flow.live:
            return
        if self._client_gone(flow):
            self._spawn(self._client_left(flow))
            return
        try:
            sent = origin_deadline.sent(flow)
        except Exception:  # mitmproxy internals: never an addon error, the flow goes on as it is
            log.exception(f"mitmcache: could not follow {flow.request.url} after its deadline")
            return
        loop = asyncio.get_running_loop()
        if sent is False:
            self._deadlines[flow] = loop.call_later(recheck, self._until_sent, flow, min(recheck * 2, RECHECK_MAX))
        elif sent:
            self.service.pipeline.origin_sent(self._exchanges[flow])
            self._deadlines[flow] = loop.call_later(self.service.settings.origin_timeout, self._deadline_passed, flow)
        elif flow.error is None:
            log.info(f"mitmcache: {self._why()} for {flow.request.url}; mitmproxy keeps waiting (see README, Protecting the origin)")

    async def _time_out(self, flow: http.HTTPFlow) -> None:
        """The origin gave no response headers within cache_origin_timeout_ms: answer the flow
        as its waiters are answered (origin_deadline.py delivers it), and give up the fetch."""
        ex = self._exchanges.get(flow)
        if ex is None or flow.response is not None or not flow.live:
            return
        if self._client_gone(flow):
            return await self._client_left(flow)
        why = self._why()

        def build() -> http.Response:
            self._exchanges.pop(flow, None)  # the response hook sees our answer, not the origin's
            return self._cache_answer(flow, self.service.pipeline.origin_timed_out(ex), ex.outcome)

        try:
            route = await origin_deadline.answer(flow, build, why)
        except Exception:  # mitmproxy internals: never an addon error, the flow goes on as it is
            log.exception(f"mitmcache: could not answer {flow.request.url} after its origin timed out")
            route = None
        if route == "pending":
            # Not sent yet (also an intercepted flow: the origin's time starts when it is resumed
            # and sent; followed meanwhile, as mitmproxy tells no addon if its client leaves).
            log.info(f"mitmcache: {why} for {flow.request.url}, which has not reached it yet (mitmproxy is "
                     "opening or waiting for a connection): it gets that long again once sent")
            self._deadlines[flow] = asyncio.get_running_loop().call_later(RECHECK, self._until_sent, flow, RECHECK * 2)
            return
        if route is None:
            if flow in self._exchanges:
                log.info(f"mitmcache: {why} for {flow.request.url}; mitmproxy keeps waiting (see README, Protecting the origin)")
            else:  # answered the pipeline's way but not delivered: the stream's own end (error hook) follows
                await self.service.pipeline.abandon_fetch(ex)
            return
        log.info(f"mitmcache: {why} for {flow.request.url}: answered {ex.reply.status if ex.reply else 504}" + (
            " (mitmproxy's error page inside a CONNECT tunnel)" if route == "tunneled" else ""))
        await self.service.pipeline.abandon_fetch(ex)

    def _answer(self, flow: http.HTTPFlow, reply: Response, outcome: Outcome) -> None:
        """Answer from the cache (the hit path)."""
        flow.response = self._cache_answer(flow, reply, outcome)

    def _cache_answer(self, flow: http.HTTPFlow, reply: Response, outcome: Outcome) -> http.Response:
        """The cache's answer: the reply with its status fields, built in one go; the flow is
        annotated for mitmweb."""
        assert outcome.label is not None
        rendered = outcome.status.render()
        self._annotate(flow, outcome, rendered)
        return to_mitmproxy(reply, self._drop()[0], (("X-Cache-Status", outcome.label), ("Cache-Status", rendered)))

    def _drop(self) -> tuple[frozenset[str], frozenset[bytes]]:
        """Fields a response the cache handled never carries on: its own status fields (set
        anew) and purge tags unless passed through — lower-case, as str and as bytes."""
        settings = self.service.settings
        if self._dropped[0] is not settings:
            tags = () if settings.tag_passthrough else settings.tag_headers
            names = frozenset({"x-cache-status", "cache-status", *(t.lower() for t in tags)})
            self._dropped = (settings, names, frozenset(n.encode() for n in names))
        return self._dropped[1], self._dropped[2]

    def _render(
        self, flow: http.HTTPFlow, outcome: Outcome, add: tuple[tuple[bytes, bytes], ...] = (), dropping: bool = True
    ) -> None:
        """Stamp the status fields on the response (after ``add``); ``dropping`` False: the
        caller saw none of the fields it drops."""
        resp = flow.response
        assert resp is not None and outcome.label is not None
        rendered = outcome.status.render()
        # One pass over the fields (mitmproxy's Headers edits cost more): purge tags are stored,
        # not sent on (cache_tag_headers); the status fields are ours.
        fields = resp.headers.fields
        if dropping:
            drop = self._drop()[1]
            fields = tuple(f for f in fields if f[0].lower() not in drop)
        resp.headers.fields = (
            *fields, *add, (b"X-Cache-Status", outcome.label.encode()), (b"Cache-Status", _wire(rendered)),
        )
        self._annotate(flow, outcome, rendered)

    def _annotate(self, flow: http.HTTPFlow, outcome: Outcome, rendered: str) -> None:
        """The outcome for mitmweb: comment, metadata, marker."""
        flow.comment = outcome.comment(rendered)
        flow.metadata[METADATA_KEY] = outcome.summary(rendered)
        if self.mark_flows and outcome.label in MARKERS:
            flow.marked = MARKERS[outcome.label]
