"""Building the responses the cache sends itself, with the framing mitmproxy leaves to us.

mitmproxy writes whatever body a short-circuited Response has, also for HEAD, and adds
``content-length: 0`` to a 304 (mitmproxy-notes §0.7): so HEAD, 304, 206 and 416 responses are
framed here by hand.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http import status_codes

from . import semantics as sem
from .origin_client import Fetched


def _headers(fields: list[tuple[str, str]]) -> http.Headers:
    return http.Headers([(k.encode("latin-1", "replace"), v.encode("latin-1", "replace")) for k, v in fields])


def from_entry(
    head: bool,
    entry: sem.StoredResponse,
    now: float,
    not_modified: bool,
    byte_range: tuple[int, int] | str | None = None,
) -> http.Response:
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
        fields = [(k, v) for k, v in entry.headers if k.lower() != "content-length"]
        fields.append(("Content-Range", f"bytes {first}-{last}/{len(entry.body)}"))
        status, body, reason = 206, entry.body[first : last + 1], "Partial Content"
    else:
        fields = [(k, v) for k, v in entry.headers if k.lower() != "content-length"]
        status, body, reason = entry.status, entry.body, entry.reason or status_codes.RESPONSES.get(entry.status, "")
    resp = http.Response(b"HTTP/1.1", status, reason.encode("latin-1", "replace"), _headers(fields), None, None, now, now)
    if not_modified or status == 204 or 100 <= status < 200:
        resp.raw_content = b""
        resp.headers.pop("content-length", None)
    elif head:
        resp.raw_content = b""
        resp.headers["content-length"] = str(len(body))
    else:
        resp.raw_content = body
        resp.headers["content-length"] = str(len(body))
    resp.headers["Age"] = sem.age_header_value(entry.age(now))
    return resp


def from_fetched(fetched: Fetched | None, error: str | None) -> http.Response:
    """A response from the cache's own origin fetch, or a 502 if the origin gave none."""
    if fetched is None or fetched.body is None:
        return http.Response.make(
            502, f"mitmcache: origin unreachable: {error}".encode(), {"Content-Type": "text/plain"}
        )
    fields = [(k, v) for k, v in fetched.headers if k.lower() not in sem.HOP_BY_HOP]
    resp = http.Response(
        b"HTTP/1.1", fetched.status, fetched.reason.encode("latin-1", "replace"), _headers(fields),
        None, None, fetched.request_time, fetched.response_time,
    )
    resp.raw_content = fetched.body
    resp.headers["content-length"] = str(len(fetched.body))
    return resp
