"""The responses the cache sends itself, as plain values with their exact framing.

mitmproxy writes whatever body a short-circuited Response has, also for HEAD, and adds
``content-length: 0`` to a 304 (mitmproxy-notes §0.7): so HEAD, 304, 206 and 416 responses
are framed here by hand, and the HttpCache addon copies them onto the flow field by field.
"""

from __future__ import annotations

from mitmproxy.net.http import status_codes

from . import semantics as sem
from .messages import Response


def _without_length(headers: sem.HeaderList) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() != "content-length"]


def from_entry(
    head: bool,
    entry: sem.StoredResponse,
    now: float,
    not_modified: bool,
    byte_range: tuple[int, int] | str | None = None,
) -> Response:
    """The stored response as sent now: whole, as a 304 (RFC 9110 §15.4.5), as one byte range
    (206) or 416 (RFC 9110 §14), without a body for HEAD; always with Age (RFC 9111 §5.1)."""
    if not_modified:
        fields = sem.not_modified_headers(entry)
        status, body, reason = 304, b"", "Not Modified"
    elif byte_range == sem.UNSATISFIABLE:
        fields = [("Content-Range", f"bytes */{len(entry.body)}")]
        status, body, reason = 416, b"", "Range Not Satisfiable"
    elif isinstance(byte_range, tuple):
        first, last = byte_range
        fields = _without_length(entry.headers)
        fields.append(("Content-Range", f"bytes {first}-{last}/{len(entry.body)}"))
        status, body, reason = 206, entry.body[first : last + 1], "Partial Content"
    else:
        fields = _without_length(entry.headers)
        status, body, reason = entry.status, entry.body, entry.reason or status_codes.RESPONSES.get(entry.status, "")
    if not_modified or status == 204 or 100 <= status < 200:
        body = b""  # no body and no Content-Length (RFC 9110 §8.6)
    else:
        fields.append(("content-length", str(len(body))))
        if head:
            body = b""  # HEAD: the length of the body a GET would get, none sent
    fields.append(("Age", sem.age_header_value(entry.age(now))))
    return Response(status, reason, tuple(fields), body, now, now)


def from_origin(fetched: Response | None, error: str | None, head: bool = False) -> Response:
    """The cache's own origin fetch as sent to the client, or a 502 if the origin gave none;
    for a HEAD, without the body (its Content-Length kept)."""
    if fetched is None or fetched.body is None:
        body = f"mitmcache: origin unreachable: {error}".encode()
        now = fetched.response_time if fetched else 0.0
        return Response(502, "Bad Gateway", (("Content-Type", "text/plain"), ("content-length", str(len(body)))), body, now, now)
    fields = [(k, v) for k, v in fetched.headers if k.lower() not in sem.HOP_BY_HOP and k.lower() != "content-length"]
    fields.append(("content-length", str(len(fetched.body))))
    if sem.header_get(fields, "date") is None:  # RFC 9110 §6.6.1: the time of receipt
        fields.append(("Date", sem.format_http_date(fetched.response_time)))
    body = b"" if head else fetched.body
    return Response(fetched.status, fetched.reason, tuple(fields), body, fetched.request_time, fetched.response_time)


def gateway_timeout(now: float) -> Response:
    """RFC 9111 §5.2.1.7: only-if-cached with nothing usable stored."""
    return Response(504, "Gateway Timeout", (("Content-Type", "text/plain"), ("content-length", "0")), b"", now, now)
