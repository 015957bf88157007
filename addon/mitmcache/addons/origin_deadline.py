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
sends the answer as it would any other. Before that, the server connection, which still has the
request outstanding, is cut off from the stream (its late answer or disconnect reaches no one)
and closed (no later request reuses it: the late answer would be taken for that request's).

Where events cannot take that route it does less, and says so in its result:

- The flow runs inside a CONNECT tunnel (HTTPS interception in regular or upstream mode): the
  tunnel turns injected body events into raw bytes for the server, so the stream is told the
  origin failed with a 504 instead (mitmproxy's error page; an HTTP/1 client connection closes).
- The request has not reached the origin yet: mitmproxy is still opening the connection (a slow
  connect or TLS handshake), or waits for one (it opens at most 5 per client connection and
  origin, so an HTTP/2 client's sixth concurrent request waits for a free one), or the flow is
  intercepted. Nothing is done (``"pending"``); the caller watches for the request to go out
  (``sent``) and gives the origin its time from then.
- The origin speaks HTTP/2 or HTTP/3, the stream is not waiting for response headers (the
  answer has begun), or the connection is gone: nothing is done (``None``) and mitmproxy's own
  limits apply.

It relies on mitmproxy's proxy-core internals (``ConnectionHandler.server_event``, the layer
stack, ``HttpStream`` states); mitmproxy is pinned below 13 and ``tests/e2e/test_hostile.py``
drives every route through a real ``mitmdump``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from mitmproxy import ctx, http
from mitmproxy.connection import Client, ConnectionState, Server
from mitmproxy.proxy import events
from mitmproxy.proxy.layers.http import (
    HttpLayer,
    HttpStream,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._http1 import Http1Client

Route = Literal["direct", "tunneled"]
Pending = Literal["pending"]
HTTP1_ALPN = (None, b"", b"http/1.1", b"http/1.0")
MAX_DEPTH = 32  # layers searched below a connection's top layer


class _Route:
    """Stands for the flow in the injected events: the HTTP layers find the stream they go to
    under ``server_conn`` in their ``connections`` (see ``answer``); nothing else reads it."""

    def __init__(self, client_conn: Client, server_conn: Server) -> None:
        self.client_conn, self.server_conn = client_conn, server_conn


class _Headers(ResponseHeaders, events.MessageInjected):
    def __init__(self, route: _Route, stream_id: int, response: http.Response) -> None:
        self.flow, self.message, self.stream_id, self.response, self.end_stream = route, None, stream_id, response, False  # type: ignore[assignment]


class _Data(ResponseData, events.MessageInjected):
    def __init__(self, route: _Route, stream_id: int, data: bytes) -> None:
        self.flow, self.message, self.stream_id, self.data = route, None, stream_id, data  # type: ignore[assignment]


class _End(ResponseEndOfMessage, events.MessageInjected):
    def __init__(self, route: _Route, stream_id: int) -> None:
        self.flow, self.message, self.stream_id = route, None, stream_id  # type: ignore[assignment]


class _GatewayTimeoutCode:
    """Stands for an ``ErrorCode``: the client layers ask it which status to answer with."""

    def http_status_code(self) -> int:
        return 504


class _Failed(ResponseProtocolError, events.MessageInjected):
    def __init__(self, route: _Route, stream_id: int, message: str) -> None:
        self.flow, self.message, self.stream_id = route, message, stream_id  # type: ignore[assignment]
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


def find_stream(top: Any, flow: http.HTTPFlow) -> list[tuple[HttpLayer, HttpStream]] | None:
    """The way from the connection's top layer down to the HTTP stream carrying ``flow``: each
    HTTP layer on it with the stream it leads to — one pair, or two and more when the flow runs
    inside CONNECT tunnels (the outer layer's stream is the tunnel's)."""
    todo: list[tuple[Any, tuple[tuple[HttpLayer, HttpStream], ...], HttpLayer | None, int]] = [(top, (), None, 0)]
    while todo:
        layer, way, parent, depth = todo.pop()
        if depth > MAX_DEPTH:
            continue
        if isinstance(layer, HttpStream):
            if parent is None:
                continue
            if layer.flow is flow:
                return [*way, (parent, layer)]
            if layer.child_layer is not None:
                todo.append((layer.child_layer, (*way, (parent, layer)), None, depth + 1))
            continue
        if isinstance(layer, HttpLayer):
            parent = layer
        todo.extend((child, way, parent, depth + 1) for child in _children(layer))
    return None


def _http1_client(layer: Any) -> Http1Client | None:
    """The HTTP/1 client layer at the bottom of a server connection's stack (TLS, HttpClient)."""
    for _ in range(MAX_DEPTH):
        if layer is None or isinstance(layer, Http1Client):
            return layer
        layer = getattr(layer, "child_layer", None)
    return None


def _locate(flow: http.HTTPFlow) -> tuple[Any, list[tuple[HttpLayer, HttpStream]], Http1Client] | Pending | None:
    """Where ``flow`` waits for the origin's response headers: its connection handler, the way
    to its stream (see ``find_stream``) and the HTTP/1 client layer of its server connection;
    ``"pending"`` while its request has not reached the origin; None when it cannot be answered."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    if handler is None or flow.response is not None or flow.error is not None:
        return None
    way = find_stream(handler.layer, flow)
    # Only a stream waiting for response headers can take them: a stream already receiving the
    # origin's answer is left alone. (mitmproxy sets this state before the request hook, so a
    # stream whose request is still on its way to the origin is in it too: see below.)
    if way is None or way[-1][1].server_state.__name__ != "state_wait_for_response_headers":
        return None
    http_layer, stream = way[-1]
    server = flow.server_conn  # the stream's connection once it has one, the one it will open before
    if server.alpn not in HTTP1_ALPN:
        return None
    client = _http1_client(http_layer.connections.get(server)) if server.connected else None
    if client is None or client.stream_id != stream.stream_id:
        # Not sent yet: the connection is opening (TCP, TLS), mitmproxy waits for a free one, or
        # the request hook has not returned (an intercepted flow). A connection that failed is
        # reported by mitmproxy itself.
        return "pending" if server.state is not ConnectionState.CLOSED or server.error is None else None
    return handler, way, client


def sent(flow: http.HTTPFlow) -> bool | None:
    """Whether ``flow``'s request has reached the origin and waits for its response headers
    (True), is still on its way (False), or neither — answered, failed, not answerable (None)."""
    found = _locate(flow)
    return None if found is None else found != "pending"


async def answer(flow: http.HTTPFlow, build: Callable[[], http.Response], why: str) -> Route | Pending | None:
    """Answer ``flow``, forwarded and still waiting for the origin's response headers, with the
    response ``build()`` makes (direct route) or a 504 error page naming ``why`` (tunneled route;
    ``build`` is still called, so the caller records its outcome). ``build`` is called only once
    the flow is known to be answerable. Returns the route taken, ``"pending"`` when the request
    has not reached the origin yet (nothing done), or None when the flow cannot be answered
    (see the module docstring)."""
    found = _locate(flow)
    if found is None or found == "pending":
        return found
    handler, way, client = found
    server = flow.server_conn
    stream = way[-1][1]
    response = build()
    # First cut the origin off from the stream: the server connection's client layer now
    # addresses stream 0, which never exists (and, being falsy, is not told of the close), so
    # the origin's late answer or its disconnect reaches no one, whenever it comes. The injected
    # events find the stream on their own way instead: each HTTP layer on it maps a connection
    # no one else uses to the stream to pass them to (a closed Server never matches a request's
    # connection spec, so no request picks it up meanwhile).
    client.stream_id = 0
    server.state = ConnectionState.CAN_READ  # no request reuses it until it is closed below
    route = _Route(flow.client_conn, Server(address=None))
    for layer, on_way in way:
        layer.connections[route.server_conn] = on_way
    sid = stream.stream_id
    tunneled = len(way) > 1
    injected: tuple[events.Event, ...] = (
        (_Failed(route, sid, why),)
        if tunneled  # a tunnel turns body events into bytes for the server: an error page instead
        else (_Headers(route, sid, response), _Data(route, sid, response.raw_content or b""), _End(route, sid))
    )
    try:
        for event in injected:
            await handler.server_event(event)
    finally:
        for layer, _ in way:
            layer.connections.pop(route.server_conn, None)
        if server in handler.transports and server.state is not ConnectionState.CLOSED:
            handler.close_connection(server)
    return "tunneled" if tunneled else "direct"
