"""What happens next, as values: the pipeline's decisions, each with its RFC section.

Modelled on hishel's spec states (``hishel/_core/_spec.py``): pure functions of what the
lookup found and what the request or the origin said, no I/O, no clock. The driver
(``pipeline.Pipeline``) matches on them exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import semantics as sem
from .semantics import StoredResponse, Use

# ----------------------------------------------------------------------------- request side


@dataclass(frozen=True, slots=True)
class ServeFresh:
    """RFC 9111 §4.2: a fresh stored response answers the request (HIT)."""

    entry: StoredResponse


@dataclass(frozen=True, slots=True)
class ServeStale:
    """RFC 9111 §4.2.4 + §5.2.1.2: the client accepts it stale (``max-stale``)."""

    entry: StoredResponse


@dataclass(frozen=True, slots=True)
class ServeWhileRevalidating:
    """RFC 5861 §3: inside stale-while-revalidate, serve now and revalidate in the background."""

    entry: StoredResponse


@dataclass(frozen=True, slots=True)
class Revalidate:
    """RFC 9111 §4.3.1: forward a conditional request for this stale (or unusable) entry.

    ``fwd`` is the RFC 9211 reason: ``stale``, or ``request`` when the client's directives
    (no-cache, max-age, min-fresh) ruled out a stored response.
    """

    entry: StoredResponse
    fwd: str
    reason: str  # sem.Decision.reason: stale, request, no-cache


@dataclass(frozen=True, slots=True)
class Forward:
    """RFC 9111 §4: nothing stored matches; ``fwd`` is ``uri-miss`` or ``vary-miss`` (§4.1)."""

    fwd: str


@dataclass(frozen=True, slots=True)
class Pass:
    """Hit-for-pass (Varnish): the URL's last answer could not be stored or shared, so the
    request goes upstream at once — no lease, no waiting for another request's fetch, whose
    answer could not be shared with it anyway (RFC 9111 §4: a miss; §3: nothing to store)."""

    fwd: str = "uri-miss"


@dataclass(frozen=True, slots=True)
class GatewayTimeout:
    """RFC 9111 §5.2.1.7: only-if-cached and nothing usable: 504, the origin untouched."""

    fwd: str  # what would have gone to the origin (RFC 9211 fwd)


@dataclass(frozen=True, slots=True)
class Bypass:
    """Not GET/HEAD: neither looked up nor stored; its response may invalidate (§4.4)."""


RequestState = ServeFresh | ServeStale | ServeWhileRevalidating | Revalidate | Forward | Pass | GatewayTimeout | Bypass

LOOKUP_METHODS = frozenset({"GET", "HEAD"})  # case-sensitive (RFC 9110 §9.1)


def on_lookup(
    method: str,
    found: bool,
    entry: StoredResponse | None,
    directives: sem.RequestDirectives,
    now: float,
    passing: bool = False,
) -> RequestState:
    """The request's next step given what the lookup found (``found``: any variant of the URL;
    ``entry``: the one selected for this request, RFC 9111 §4.1; ``passing``: a hit-for-pass
    marker instead of an entry)."""
    if method not in LOOKUP_METHODS:
        return Bypass()
    if passing:
        state: Forward | Revalidate | Pass = Pass()
    elif entry is None:
        state = Forward("vary-miss" if found else "uri-miss")
    else:
        decision = sem.decide(entry, directives, now, allow_background_revalidation=True)
        if decision.use is Use.FRESH:
            return ServeFresh(entry)
        if decision.use is Use.STALE_OK:
            return ServeStale(entry)
        if decision.use is Use.STALE_WHILE_REVALIDATE:
            return ServeWhileRevalidating(entry)
        state = Revalidate(entry, "request" if decision.reason == "request" else "stale", decision.reason)
    if directives.only_if_cached:
        return GatewayTimeout(state.fwd)
    return state


# ---------------------------------------------------------------------------- response side


@dataclass(frozen=True, slots=True)
class Invalidate:
    """RFC 9111 §4.4: a 2xx/3xx to an unsafe method invalidates these URLs."""

    urls: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Renew:
    """RFC 9111 §4.3.4: a 304 that selects the entry we asked about freshens it (§3.2)."""

    entry: StoredResponse


@dataclass(frozen=True, slots=True)
class Refetch:
    """RFC 9111 §4.3.4: a 304 whose validators select no stored response: ask again
    unconditionally (the client asked for none of this)."""


@dataclass(frozen=True, slots=True)
class Admit:
    """RFC 9111 §3: an origin answer that may be stored (``admit`` decides)."""


@dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing to store or invalidate (a safe method other than GET/HEAD, or an error)."""


ResponseState = Invalidate | Renew | Refetch | Admit | Ignore


def on_response(method: str, url: str, revalidating: StoredResponse | None, status: int, headers: sem.HeaderList) -> ResponseState:
    """The next step for an origin's answer to a forwarded request."""
    if method not in LOOKUP_METHODS:
        urls = sem.invalidation_targets(method, status, url, headers)
        return Invalidate(tuple(urls)) if urls else Ignore()
    if revalidating is not None and method == "GET" and status == 304 and sem.validators_for(revalidating):
        if sem.validator_304_matches(revalidating, headers):
            return Renew(revalidating)
        return Refetch()
    return Admit()
