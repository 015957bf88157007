"""Answering a forwarded request whose origin has not begun to answer in time.

mitmproxy forwards a request once its hooks return and then waits for the origin without a
limit (only ``tcp_timeout``, of inactivity); a hook cannot answer a flow that is in flight, and
setting ``flow.response`` in ``error`` is ignored (mitmproxy-notes §0.5). A cache that coalesces
requests must still bound what a hung origin costs the request that leads the fetch (issue 9,
item 7): its waiters already give up after ``cache_origin_timeout_ms``.

This module answers such a flow the way mitmproxy's own ``inject.websocket``/``inject.tcp``
commands reach a live connection (``Proxyserver.inject_event``): it hands the flow's connection
handler events addressed to the flow's HTTP stream, as if the origin had answered — response
headers, body, end of message — and the stream runs its ``responseheaders``/``response`` hooks and
sends the answer as it would any other. The server connection, which still has the request
outstanding, is first marked half-closed (so no later request reuses it: its late answer would
be taken for that request's) and closed once the stream is done.

Where events cannot take that route it does less, and says so in its result:

- The flow runs inside a CONNECT tunnel (HTTPS interception in regular or upstream mode): the
  tunnel turns injected body events into raw bytes for the server, so the stream is told the
  origin failed with a 504 instead (mitmproxy's error page; the client connection closes).
- The origin speaks HTTP/2 or HTTP/3, the stream is not waiting for response headers (the
  connection is still being opened, or the answer has begun), or the connection is gone:
  nothing is done (``None``) and mitmproxy's own limits apply.

It relies on mitmproxy's proxy-core internals (``ConnectionHandler.server_event``, the layer
stack, ``HttpStream`` states); mitmproxy is pinned below 13 and ``tests/e2e/test_hostile.py``
drives every route through a real ``mitmdump``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Literal

from mitmproxy import ctx, http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import events
from mitmproxy.proxy.layers.http import (
    HttpLayer,
    HttpStream,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)

log = logging.getLogger("mitmcache")

Route = Literal["direct", "tunneled"]
HTTP1_ALPN = (None, b"", b"http/1.1", b"http/1.0")
# Bounds: layer-stack depth searched, and how long the server connection is kept (seconds)
# while the stream finishes sending the answer.
MAX_DEPTH = 32
CLOSE_AFTER_S = 5.0


class _Headers(ResponseHeaders, events.MessageInjected):
    def __init__(self, flow: http.HTTPFlow, stream_id: int, response: http.Response) -> None:
        self.flow, self.message, self.stream_id, self.response, self.end_stream = flow, None, stream_id, response, False


class _Data(ResponseData, events.MessageInjected):
    def __init__(self, flow: http.HTTPFlow, stream_id: int, data: bytes) -> None:
        self.flow, self.message, self.stream_id, self.data = flow, None, stream_id, data


class _End(ResponseEndOfMessage, events.MessageInjected):
    def __init__(self, flow: http.HTTPFlow, stream_id: int) -> None:
        self.flow, self.message, self.stream_id = flow, None, stream_id


class _GatewayTimeoutCode:
    """Stands for an ``ErrorCode``: the client layers ask it which status to answer with."""

    def http_status_code(self) -> int:
        return 504


class _Failed(ResponseProtocolError, events.MessageInjected):
    def __init__(self, flow: http.HTTPFlow, stream_id: int, message: str) -> None:
        self.flow, self.message, self.stream_id = flow, message, stream_id
        self.code = _GatewayTimeoutCode()  # type: ignore[assignment]


def _children(layer: Any) -> list[Any]:
    """The layers below ``layer``: a mode layer delegates through its bound ``_handle_event``,
    ``NextLayer`` holds ``layer``, tunnels and CONNECT streams ``child_layer``."""
    if isinstance(layer, HttpLayer):
        return list(layer.streams.values())
    below = getattr(layer, "child_layer", None) or getattr(layer, "layer", None)
    if below is None:
        delegate = getattr(getattr(layer, "_handle_event", None), "__self__", None)
        below = delegate if delegate is not layer else None
    return [below] if below is not None else []


def find_stream(top: Any, flow: http.HTTPFlow) -> tuple[HttpStream, Route] | None:
    """The HTTP stream carrying ``flow`` under the connection's top layer, and whether it runs
    inside a CONNECT tunnel (below another stream)."""
    todo: list[tuple[Any, bool, int]] = [(top, False, 0)]
    while todo:
        layer, tunneled, depth = todo.pop()
        if depth > MAX_DEPTH:
            continue
        if isinstance(layer, HttpStream):
            if layer.flow is flow:
                return layer, "tunneled" if tunneled else "direct"
            if layer.child_layer is not None:
                todo.append((layer.child_layer, True, depth + 1))
            continue
        todo.extend((child, tunneled, depth + 1) for child in _children(layer))
    return None


async def answer(flow: http.HTTPFlow, build: Callable[[], http.Response], why: str) -> Route | None:
    """Answer ``flow``, forwarded and still waiting for the origin's response headers, with the
    response ``build()`` makes (direct route) or a 504 error page naming ``why`` (tunneled route;
    ``build`` is still called, so the caller records its outcome). ``build`` is called only once
    the flow is known to be answerable, and nothing else runs between it and the answer. Returns
    the route taken, or None when the flow could not be answered (see the module docstring)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    server = flow.server_conn
    if handler is None or flow.response is not None or not server.connected or server.alpn not in HTTP1_ALPN:
        return None
    lock: asyncio.Lock = handler._server_event_lock
    for _ in range(100):  # the handler's events run synchronously under it: wait until it is free
        if not lock.locked():
            break
        await asyncio.sleep(0)
    else:
        return None
    found = find_stream(handler.layer, flow)
    # Only a stream waiting for response headers can take them: a stream still opening its
    # connection, or already receiving the origin's answer, is left alone.
    if found is None or found[0].server_state.__name__ != "state_wait_for_response_headers":
        return None
    stream, route = found
    response = build()
    # From here to the last injected event nothing awaits a contended lock, so the origin's
    # answer cannot slip in between: the stream sees ours whole, or (had it come first) ours not at all.
    server.state = ConnectionState.CAN_READ  # never reused: its late answer belongs to no one
    if route == "direct":
        for event in (
            _Headers(flow, stream.stream_id, response),
            _Data(flow, stream.stream_id, response.raw_content or b""),
            _End(flow, stream.stream_id),
        ):
            await handler.server_event(event)
    else:
        await handler.server_event(_Failed(flow, stream.stream_id, why))
    asyncio.get_running_loop().call_later(0, _close_when_done, handler, flow, CLOSE_AFTER_S)
    return route


def _close_when_done(handler: Any, flow: http.HTTPFlow, budget: float) -> None:
    """Close the server connection once the stream finished with the flow (closing it earlier
    would make the stream report the origin's disconnect to the client)."""
    server = flow.server_conn
    if server not in handler.transports or server.state is ConnectionState.CLOSED:
        return
    if flow.live and budget > 0:
        asyncio.get_running_loop().call_later(0.01, _close_when_done, handler, flow, budget - 0.01)
        return
    handler.close_connection(server)
