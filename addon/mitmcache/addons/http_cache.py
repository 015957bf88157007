"""HttpCache: the one addon with the ``request`` / ``response`` / ``error`` hooks.

It turns a flow into plain values once, runs the pipeline, copies what the pipeline decided
onto the flow, and renders the request's ``Outcome`` once: ``X-Cache-Status``,
``Cache-Status`` (RFC 9211), ``flow.comment``, ``flow.metadata`` and the flow-list marker.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Awaitable, Callable

from mitmproxy import ctx, http

from ..messages import Request, Response
from ..semantics import format_http_date
from ..outcome import HIT, STALE, Outcome
from ..pipeline import Exchange
from ..policy import PolicySet
from ..service import CacheService
from .config import reject_unparsable, report_option_errors
from .policies import match_flow

log = logging.getLogger("mitmcache")

METADATA_KEY = "mitmcache"
MARKERS = {HIT: ":green_circle:", STALE: ":orange_circle:"}


def request_from_flow(flow: http.HTTPFlow, policies: PolicySet) -> Request:
    r = flow.request
    return Request(
        # The method as sent: mitmproxy's Request.method upper-cases it, but methods are
        # case-sensitive (RFC 9110 §9.1): a "get" is not a GET.
        r.data.method.decode("utf-8", "surrogateescape"), r.scheme, r.host, r.port, r.path,
        tuple(r.headers.items(multi=True)), r.host_header, r.timestamp_start or time.time(),
        match_flow(policies, flow) if policies else None,
        r.authority,
    )


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


def to_mitmproxy(resp: Response) -> http.Response:
    """A response built by the cache, with its headers and body exactly as given (no
    Content-Length added: ``responses`` frames HEAD/304/206 itself)."""
    headers = http.Headers([(_wire(k), _wire(v)) for k, v in resp.headers])
    return http.Response(
        b"HTTP/1.1", resp.status, _wire(resp.reason), headers, resp.body or b"", None,
        resp.request_time, resp.response_time,
    )


class HttpCache:
    name = "mitmcache.httpcache"

    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.mark_flows = True
        # Live per-flow state beside the flow, not in flow.metadata (which flow files keep).
        self._exchanges: weakref.WeakKeyDictionary[http.HTTPFlow, Exchange] = weakref.WeakKeyDictionary()
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
        # mitmproxy-notes §0.4: with the default eager strategy a HIT cannot be served while
        # the origin is down (the client connection is closed first). A cache needs lazy.
        if "connection_strategy" in updated and getattr(ctx.options, "connection_strategy", "lazy") != "lazy":
            log.warning("mitmcache: setting connection_strategy=lazy so hits are served without the origin")
            ctx.options.update(connection_strategy="lazy")

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return  # already answered by someone else
        if flow.request.data.method == b"PURGE" and self.purge is not None:
            return await self.purge(flow)  # answered here, never forwarded
        ex = await self.service.pipeline.request(request_from_flow(flow, self.service.policies))
        if ex.reply is not None:
            flow.response = to_mitmproxy(ex.reply)
            self._render(flow, ex.outcome)
            return
        self._exchanges[flow] = ex
        if ex.validators or ex.strip_conditionals:
            headers = flow.request.headers
            for name in ("if-none-match", "if-modified-since"):
                headers.pop(name, None)
            for name, value in ex.validators:
                headers[name] = value

    async def response(self, flow: http.HTTPFlow) -> None:
        ex = self._exchanges.pop(flow, None)
        if ex is None or flow.response is None:
            return
        if "date" not in flow.response.headers:
            # RFC 9110 §6.6.1: a recipient with a clock adds the time of receipt to a response
            # it caches or forwards without one.
            flow.response.headers["Date"] = format_http_date(flow.response.timestamp_end or time.time())
        replacement = await self.service.pipeline.response(ex, response_from_flow(flow))
        if replacement is not None:
            flow.response = to_mitmproxy(replacement)
        if ex.outcome.label is not None:
            self._render(flow, ex.outcome)

    async def error(self, flow: http.HTTPFlow) -> None:
        ex = self._exchanges.pop(flow, None)
        if ex is not None:
            await self.service.pipeline.error(ex)

    def _render(self, flow: http.HTTPFlow, outcome: Outcome) -> None:
        resp = flow.response
        assert resp is not None and outcome.label is not None
        rendered = outcome.status.render()
        settings = self.service.settings
        if not settings.tag_passthrough:
            for name in settings.tag_headers:  # purge tags are stored, not sent on (cache_tag_headers)
                resp.headers.pop(name, None)
        resp.headers["X-Cache-Status"] = outcome.label
        resp.headers["Cache-Status"] = rendered
        flow.comment = outcome.comment(rendered)
        flow.metadata[METADATA_KEY] = outcome.summary(rendered)
        if self.mark_flows and outcome.label in MARKERS:
            flow.marked = MARKERS[outcome.label]
