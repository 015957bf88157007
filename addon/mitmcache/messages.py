"""Plain request and response values: what the pipeline reads, independent of mitmproxy.

A ``Request`` is built once per flow (``addons/http_cache.py``), or from a flow file; a
``Response`` is an origin's answer (mitmproxy's or the cache's own client's) or what the cache
sends. Headers are ``(name, value)`` string pairs in wire order, repeated names allowed.
Times are epoch seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import semantics as sem

if TYPE_CHECKING:
    from .policy import Policy

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Request:
    """One client request as it goes to the origin.

    ``url`` is the absolute URL the origin is asked for (in reverse mode, the origin's);
    ``host_header`` is the Host field the client sent, if any (it may name another authority).
    """

    method: str  # as sent: methods are case-sensitive (RFC 9110 §9.1)
    scheme: str
    host: str
    port: int
    path: str  # path and query, as in the request target
    headers: Headers
    host_header: str | None = None
    timestamp: float = 0.0
    policy: Policy | None = None  # the operator rule that matched (cache_policy), if any
    # The authority of an absolute-form (or HTTP/2) request target, as it goes upstream ("" for
    # origin-form): the origin answers for it (RFC 9112 §3.2.2), so it is part of the key.
    authority: str = ""

    @property
    def url(self) -> str:
        """``scheme://host[:port]path`` (default port left out, IPv6 in brackets), as mitmproxy
        spells a request's URL; built when needed, not on the hit path."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        default = 443 if self.scheme == "https" else 80
        return f"{self.scheme}://{host if self.port == default else f'{host}:{self.port}'}{self.path}"

    @property
    def wants_range(self) -> bool:
        return sem.header_get(self.headers, "range") is not None


@dataclass(frozen=True, slots=True)
class Response:
    """A response with its exchange times (RFC 9111 §4.2.3 request_time/response_time).

    ``body`` is None when it was not read whole (larger than the reader's bound); then
    ``too_large`` is the number of bytes (at least) that went past a bound of
    cache_max_object_bytes, when that is why (a streamed body nobody kept).
    """

    status: int
    reason: str
    headers: Headers
    body: bytes | None
    request_time: float
    response_time: float
    too_large: int | None = None
