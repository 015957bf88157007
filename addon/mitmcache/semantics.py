"""HTTP caching semantics for a *shared* cache: RFC 9111, RFC 5861, RFC 9110 conditionals.

Pure functions over plain data: no I/O, no clock, no mitmproxy imports. Every decision
names the RFC section it implements. Headers are passed as sequences of ``(name, value)``
string pairs (names in any case, repeated names allowed), so the module works the same on
mitmproxy flows, stored entries and test tables.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import functools
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urljoin, urlsplit

HeaderList = Sequence[tuple[str, str]]

# RFC 9111 §1.2.2: delta-seconds beyond what we can represent is 2^31.
DELTA_SECONDS_MAX = 2**31

# RFC 9110 §7.6.1: hop-by-hop fields, never stored (RFC 9111 §3.1) and never merged (§3.2).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Fields personal to the client that received them: never merged into a shared entry.
NOT_SHARED = frozenset({"set-cookie", "set-cookie2"})

# RFC 9111 §3.2: a 304/HEAD never updates framing of the stored body.
NOT_UPDATED_BY_304 = frozenset({"content-length", "content-encoding", "content-range"}) | HOP_BY_HOP

# Fields the cache itself writes on every served response; never stored from upstream copies.
CACHE_GENERATED = frozenset({"age", "x-cache-status", "cache-status"})

# RFC 9110 §15.1: status codes that are heuristically cacheable.
HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})

# RFC 9110 §9.2.1: safe methods; any other method may invalidate (RFC 9111 §4.4).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

# RFC 9111 §4.2.2: heuristic = 10 % of (Date - Last-Modified); we cap it (default 24 h).
HEURISTIC_FRACTION = 0.1
DEFAULT_HEURISTIC_CAP = 86400.0

# Vary normalisation: these request fields compare case-insensitively (RFC 9110 §12.5).
CASE_INSENSITIVE_VARY = frozenset({"accept", "accept-charset", "accept-encoding", "accept-language"})

_WS = re.compile(r"[ \t]+")
_SF_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*")


# --------------------------------------------------------------------------- header helpers


def header_values(headers: HeaderList, name: str) -> list[str]:
    """All field lines of ``name`` (case-insensitive), in order."""
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


def header_get(headers: HeaderList, name: str) -> str | None:
    """Field lines of ``name`` combined with ', ' (RFC 9110 §5.3), or None when absent."""
    values = header_values(headers, name)
    return ", ".join(values) if values else None


def first_member(headers: HeaderList, name: str) -> str | None:
    """The first member of a singleton field sent as a list (``Age: 7200, 0`` → ``7200``)."""
    members = split_list(header_values(headers, name))
    return members[0] if members else None


def split_list(values: Iterable[str]) -> list[str]:
    """RFC 9110 §5.6.1 list syntax: split on commas outside quoted strings, drop empties."""
    out: list[str] = []
    for value in values:
        if '"' not in value:
            # No quoted string, so every comma separates (a backslash escapes only inside
            # quotes): str.split gives the same members, without a loop per character.
            out.extend(item for item in (part.strip() for part in value.split(",")) if item)
            continue
        buf: list[str] = []
        quoted = escaped = False
        for ch in value:
            if escaped:
                escaped = False
            elif ch == "\\" and quoted:
                escaped = True
            elif ch == '"':
                quoted = not quoted
            elif ch == "," and not quoted:
                item = "".join(buf).strip()
                if item:
                    out.append(item)
                buf = []
                continue
            buf.append(ch)
        item = "".join(buf).strip()
        if item:
            out.append(item)
    return out


_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_DAY_L = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "(" + "|".join(_MONTHS) + ")"
_TIME = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
# RFC 9110 §5.6.7: the three forms, case-sensitive, ASCII digits, single spaces.
_IMF_FIXDATE = re.compile(rf"{_DAY}, ([0-9]{{2}}) {_MONTH} ([0-9]{{4}}) {_TIME} GMT")
_RFC850_DATE = re.compile(rf"{_DAY_L}, ([0-9]{{2}})-{_MONTH}-([0-9]{{2}}) {_TIME} GMT")
_ASCTIME_DATE = re.compile(rf"{_DAY} {_MONTH} ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})")


def parse_http_date(value: str | None, now: float | None = None) -> float | None:
    """RFC 9110 §5.6.7 HTTP-date to epoch seconds; None if it is not one.

    Only IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``) and the obsolete RFC 850
    (``Sunday, 06-Nov-94 08:49:37 GMT``) and asctime (``Sun Nov  6 08:49:37 1994``) forms are
    HTTP-dates: other zones, offsets, missing commas, doubled spaces or one-digit hours are not.
    An RFC 850 two-digit year more than 50 years in the future means the past century's.
    """
    if not value:
        return None
    text = value.strip(" \t")
    if len(text) > _LONGEST_DATE:
        return None
    matched, parsed = _parse_fixed_date(text)
    if matched:
        return parsed
    if m := _RFC850_DATE.fullmatch(text):
        day, month, yy, hour, minute, second = m.groups()
        now = time.time() if now is None else now
        this_year = datetime.datetime.fromtimestamp(now, datetime.UTC).year
        century = this_year - this_year % 100
        parsed = _date(str(century + int(yy)), month, day, hour, minute, second)
        if parsed is not None and parsed > now + 50 * 365.2425 * 86400:
            parsed = _date(str(century - 100 + int(yy)), month, day, hour, minute, second)
        return parsed
    return None


_LONGEST_DATE = len("Wednesday, 09-Nov-94 08:49:37 GMT")  # the longest of the three forms


@functools.lru_cache(maxsize=1024)
def _parse_fixed_date(text: str) -> tuple[bool, float | None]:
    """The two forms that need no clock (IMF-fixdate, asctime): (matched, epoch seconds).
    Memoised: a response's Date and Last-Modified repeat across answers (bounded: at most
    1024 strings of at most ``_LONGEST_DATE`` characters)."""
    if m := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hour, minute, second = m.groups()
    elif m := _ASCTIME_DATE.fullmatch(text):
        month, day, hour, minute, second, year = m.groups()
    else:
        return False, None
    return True, _date(year, month, day, hour, minute, second)


def _date(year: str, month: str, day: str, hour: str, minute: str, second: str) -> float | None:
    try:
        parsed = datetime.datetime(
            int(year), _MONTHS.index(month) + 1, int(day), int(hour), int(minute), min(int(second), 59),
            tzinfo=datetime.UTC,
        )
    except ValueError:  # day 31 of a 30-day month, hour 24, …
        return None
    return parsed.timestamp()


def format_http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def parse_delta_seconds(value: str | None) -> int | None:
    """RFC 9111 §1.2.2: a non-negative integer; too large → 2^31; anything else → None."""
    if value is None:
        return None
    value = value.strip().strip('"')
    if not value.isascii() or not value.isdigit():
        return None
    value = value.lstrip("0") or "0"
    if len(value) > 10:  # beyond 2^31 whatever it is: no int() of 4,300+ digits (ValueError)
        return DELTA_SECONDS_MAX
    return min(int(value), DELTA_SECONDS_MAX)


# --------------------------------------------------------------------------- Cache-Control

# RFC 9213 §2.1: targeted fields are Structured Field Dictionaries (RFC 8941 §3.2): members
# key[=item][;params], separated by commas; an empty member, a bad key or an integer of more
# than 15 digits makes the whole field invalid (then it is ignored).
_SF_KEY = r"[a-z*][a-z0-9_\-.*]*"
_SF_ITEM = r'(?:-?[0-9]{1,15}(?:\.[0-9]{1,3})?|"(?:[^"\\]|\\.)*"|[A-Za-z*][A-Za-z0-9*:/!#$%&\'+\-.^_`|~]*|\?[01])'
_SF_PARAMS = rf"(?:;[ ]*{_SF_KEY}(?:={_SF_ITEM})?)*"
_SF_MEMBER = re.compile(rf"({_SF_KEY})(?:=({_SF_ITEM}))?{_SF_PARAMS}")
CDN_CACHE_CONTROL = "cdn-cache-control"


def _sf_dictionary(values: list[str]) -> list[str] | None:
    """The members of a Structured Field Dictionary as ``key`` or ``key=value`` (parameters
    dropped: RFC 9213 §2.1 ignores them), or None if the field does not parse."""
    members: list[str] = []
    for raw in ",".join(values).split(","):  # no quoted commas in cache directives' values
        m = _SF_MEMBER.fullmatch(raw.strip(" \t"))
        if m is None:
            return None
        members.append(m.group(1) if m.group(2) is None else f"{m.group(1)}={m.group(2)}")
    return members


def cache_policy(headers: HeaderList, targets: Sequence[str] = ()) -> tuple[list[str], bool]:
    """The Cache-Control lines that govern this cache, and whether they came from a targeted field.

    RFC 9213 §2.2: the first field of the target list (``targets``, lower-case names, in order)
    with a valid, non-empty value is used, and Cache-Control and Expires are then ignored;
    otherwise Cache-Control.
    """
    for name in targets:
        values = header_values(headers, name)
        members = _sf_dictionary(values) if values else None
        if members:
            return members, True
    return header_values(headers, "cache-control"), False


def parse_cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """Cache-Control directives, names lower-cased (RFC 9111 §5.2).

    When a directive repeats, the first occurrence wins (RFC 9111 §4.2.1: "either the first
    occurrence should be used or the response should be considered stale").
    """
    directives: dict[str, str | None] = {}
    for item in split_list(values):
        name, sep, arg = item.partition("=")
        name = name.strip().lower()
        if not name or name in directives:
            continue
        directives[name] = arg.strip().strip('"') if sep else None
    return directives


@dataclass(frozen=True, slots=True)
class ResponseDirectives:
    """Response Cache-Control directives (RFC 9111 §5.2.2, RFC 5861)."""

    no_store: bool = False
    no_cache: bool = False
    private: bool = False
    public: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    max_age: int | None = None
    s_maxage: int | None = None
    stale_while_revalidate: int = 0
    stale_if_error: int = 0
    invalid_freshness: bool = False  # a max-age/s-maxage that did not parse

    @classmethod
    def from_headers(cls, headers: HeaderList, targets: Sequence[str] = ()) -> ResponseDirectives:
        """``targets``: the targeted fields (RFC 9213) that take precedence over Cache-Control."""
        lines = tuple(cache_policy(headers, targets)[0])
        if sum(map(len, lines)) <= _MEMO_DIRECTIVES_CHARS:
            return _response_directives(lines)  # an origin sends the same few values again and again
        return cls.from_lines(lines)

    @classmethod
    def from_lines(cls, lines: Sequence[str]) -> ResponseDirectives:
        """From the Cache-Control lines that govern (``cache_policy``)."""
        cc = parse_cache_control(lines)
        invalid = False

        def delta(name: str) -> int | None:
            nonlocal invalid
            if name not in cc:
                return None
            parsed = parse_delta_seconds(cc[name])
            if parsed is None:
                invalid = True  # §4.2.1: invalid freshness information → treat as stale
            return parsed

        max_age = delta("max-age")
        s_maxage = delta("s-maxage")
        return cls(
            no_store="no-store" in cc,
            # §5.2.2.4: the qualified form no-cache="field" is treated as unqualified
            # (allowed: "a cache MAY ... treat it as if it were unqualified").
            no_cache="no-cache" in cc,
            # §5.2.2.7: qualified private="field" is also treated as unqualified: safer.
            private="private" in cc,
            public="public" in cc,
            must_revalidate="must-revalidate" in cc,
            proxy_revalidate="proxy-revalidate" in cc,
            max_age=max_age,
            s_maxage=s_maxage,
            stale_while_revalidate=parse_delta_seconds(cc.get("stale-while-revalidate")) or 0,
            stale_if_error=parse_delta_seconds(cc.get("stale-if-error")) or 0,
            invalid_freshness=invalid,
        )

    @property
    def never_serve_stale(self) -> bool:
        """§4.2.4, §5.2.2.2, §5.2.2.8, §5.2.2.10: these forbid serving the response stale."""
        return self.must_revalidate or self.proxy_revalidate or self.s_maxage is not None or self.no_cache


_MEMO_DIRECTIVES_CHARS = 256  # directive lines longer in all are parsed each time (the memo stays small)


@functools.lru_cache(maxsize=512)
def _response_directives(lines: tuple[str, ...]) -> ResponseDirectives:
    return ResponseDirectives.from_lines(lines)


@dataclass(frozen=True, slots=True)
class RequestDirectives:
    """Request Cache-Control directives (RFC 9111 §5.2.1) plus Pragma (§5.4)."""

    no_cache: bool = False
    no_store: bool = False
    max_age: int | None = None
    max_stale: float | None = None  # seconds; math.inf for a bare max-stale
    min_fresh: int | None = None
    only_if_cached: bool = False

    @classmethod
    def from_headers(cls, headers: HeaderList) -> RequestDirectives:
        cc_values = header_values(headers, "cache-control")
        if not cc_values and not header_values(headers, "pragma"):
            return _NO_REQUEST_DIRECTIVES  # most requests say nothing about caching
        cc = parse_cache_control(cc_values)
        no_cache = "no-cache" in cc
        # §5.4: Pragma: no-cache counts only when the request has no Cache-Control.
        if not cc_values and any(
            p.lower() == "no-cache" for p in split_list(header_values(headers, "pragma"))
        ):
            no_cache = True
        max_stale: float | None = None
        if "max-stale" in cc:
            arg = cc["max-stale"]
            # §5.2.1.2: without a value the client accepts a stale response of any age.
            max_stale = float("inf") if arg is None else parse_delta_seconds(arg)
        return cls(
            no_cache=no_cache,
            no_store="no-store" in cc,
            max_age=parse_delta_seconds(cc.get("max-age")) if "max-age" in cc else None,
            max_stale=max_stale,
            min_fresh=parse_delta_seconds(cc.get("min-fresh")) if "min-fresh" in cc else None,
            only_if_cached="only-if-cached" in cc,
        )


_NO_REQUEST_DIRECTIVES = RequestDirectives()


# --------------------------------------------------------------------------- Vary


def vary_names(headers: HeaderList) -> tuple[str, ...] | None:
    """Field names of every Vary line, lower-cased, deduplicated, sorted (RFC 9110 §12.5.5).

    Returns None when any member is ``*`` (the response can never be selected).
    """
    names: set[str] = set()
    for item in split_list(header_values(headers, "vary")):
        if item == "*":
            return None
        names.add(item.lower())
    return tuple(sorted(names))


def normalize_vary_value(name: str, values: list[str]) -> str | None:
    """Request field value used to match a Vary'd response (RFC 9111 §4.1).

    Lines are combined, whitespace is collapsed around and inside list members, and fields
    whose values compare case-insensitively are lower-cased. A missing field is None, which
    never equals an empty field.
    """
    if not values:
        return None
    members = [_WS.sub(" ", m) for m in split_list(values)]
    members = [re.sub(r"\s*;\s*", ";", m) for m in members]
    joined = ",".join(members)
    if name in CASE_INSENSITIVE_VARY:
        joined = joined.lower()
    return joined


def request_vary_values(names: Sequence[str], request_headers: HeaderList) -> tuple[tuple[str, str | None], ...]:
    return tuple((n, normalize_vary_value(n, header_values(request_headers, n))) for n in names)


def stored_vary_names(entries: Iterable[StoredResponse]) -> tuple[str, ...]:
    """The request fields a URL's stored responses vary on (RFC 9111 §4.1), sorted."""
    return tuple(sorted({name for entry in entries for name, _ in entry.vary}))


def variant_id(names: Sequence[str], request_headers: HeaderList) -> str:
    """The request's values of ``names``, normalised as Vary compares them ("" without names):
    what one fetch (coalescing, fill lease) of one variant is keyed by."""
    return "\nvary:" + repr(request_vary_values(names, request_headers)) if names else ""


# --------------------------------------------------------------------------- cache key


def default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def normalize_authority(scheme: str, host: str, port: int | None) -> str:
    """Lower-cased host, default port dropped, IPv6 bracketed (RFC 3986 §6.2.2)."""
    host = host.lower().rstrip(".")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if port is None or port == default_port(scheme):
        return host
    return f"{host}:{port}"


def same_origin(a: str, b: str) -> bool:
    """Do two absolute URLs share scheme, host and port (RFC 6454 origin)?"""
    try:
        pa, pb = urlsplit(a), urlsplit(b)
        if not (pa.scheme and pa.hostname and pb.hostname):
            return False
        scheme = pa.scheme.lower()
        return scheme == pb.scheme.lower() and normalize_authority(scheme, pa.hostname, pa.port) == normalize_authority(
            scheme, pb.hostname, pb.port
        )
    except ValueError:
        return False


# --------------------------------------------------------------------------- storing (§3)


class NotStorable(Enum):
    """Why a response was not stored; the value is the Cache-Status ``detail``."""

    METHOD = "method"
    STATUS = "status"
    REQUEST_NO_STORE = "request-no-store"
    NO_STORE = "no-store"
    PRIVATE = "private"
    AUTHORIZATION = "authorization"
    SET_COOKIE = "set-cookie"
    VARY_STAR = "vary-star"
    TOO_LARGE = "too-large"
    NOT_CACHEABLE = "no-freshness"
    INCOMPLETE = "incomplete"
    POLICY = "policy"  # an operator rule: no_store, bypass, or a zero ttl/error_ttl


def storability(
    method: str,
    status: int,
    request_headers: HeaderList,
    response_headers: HeaderList,
    body_length: int | None,
    max_object_bytes: int,
    targets: Sequence[str] = (),
) -> NotStorable | None:
    """None if a shared cache may store the response (RFC 9111 §3), else the reason not.

    ``targets``: targeted Cache-Control fields (RFC 9213) that replace Cache-Control/Expires."""
    # §3: "the request method is understood by the cache"; we store GET only. HEAD is
    # answered from the GET entry and never replaces it.
    if method != "GET":
        return NotStorable.METHOD
    # §3: final status only; 206 needs range support (§3.3/3.4), 304 has no body to store.
    if status < 200 or status in (206, 304) or status >= 600:
        return NotStorable.STATUS
    req = RequestDirectives.from_headers(request_headers)
    if req.no_store:  # §5.2.1.5
        return NotStorable.REQUEST_NO_STORE
    resp = ResponseDirectives.from_headers(response_headers, targets)
    if resp.no_store:  # §5.2.2.5
        return NotStorable.NO_STORE
    if resp.private:  # §5.2.2.7: a shared cache MUST NOT store it
        return NotStorable.PRIVATE
    # §3.5: a shared cache stores a response to a request with Authorization only if the
    # response says so with public, s-maxage or must-revalidate.
    if header_values(request_headers, "authorization") and not (
        resp.public or resp.s_maxage is not None or resp.must_revalidate
    ):
        return NotStorable.AUTHORIZATION
    # Not an RFC rule: Set-Cookie is personal, so a shared cache keeps none by default
    # (RFC 6265 §8.2 recommends caches not share it).
    if header_values(response_headers, "set-cookie"):
        return NotStorable.SET_COOKIE
    # RFC 9110 §12.5.5: Vary "*" can never match a later request.
    if vary_names(response_headers) is None:
        return NotStorable.VARY_STAR
    if body_length is None:
        return NotStorable.INCOMPLETE
    if body_length > max_object_bytes:
        return NotStorable.TOO_LARGE
    # §3: the response must carry explicit freshness, public, or a heuristically
    # cacheable status code.
    has_explicit = (
        resp.public
        or resp.max_age is not None
        or resp.s_maxage is not None
        or (bool(header_values(response_headers, "expires")) and not cache_policy(response_headers, targets)[1])
        or resp.invalid_freshness
    )
    if not has_explicit and status not in HEURISTICALLY_CACHEABLE:
        return NotStorable.NOT_CACHEABLE
    return None


# --------------------------------------------------------------------------- freshness (§4.2)


def freshness_lifetime(
    status: int,
    headers: HeaderList,
    response_time: float,
    heuristic_cap: float = DEFAULT_HEURISTIC_CAP,
    targets: Sequence[str] = (),
) -> tuple[float, bool]:
    """(freshness_lifetime seconds, is_heuristic) per RFC 9111 §4.2.1 and §4.2.2; a targeted
    field in ``targets`` replaces Cache-Control and Expires (RFC 9213 §2.2)."""
    cc = ResponseDirectives.from_headers(headers, targets)
    if cc.invalid_freshness and cc.s_maxage is None and cc.max_age is None:
        return 0.0, False
    # §4.2.1: a shared cache uses s-maxage first, then max-age, then Expires - Date.
    if cc.s_maxage is not None:
        return float(cc.s_maxage), False
    if cc.max_age is not None:
        return float(cc.max_age), False
    expires_values = [] if cache_policy(headers, targets)[1] else header_values(headers, "expires")
    date = parse_http_date(header_get(headers, "date"))
    if expires_values:
        # §5.3: an invalid Expires (e.g. "0") means already expired. Multiple Expires lines
        # that disagree are invalid too (§4.2.1).
        if len(set(v.strip() for v in expires_values)) > 1:
            return 0.0, False
        expires = parse_http_date(expires_values[0])
        if expires is None:
            return 0.0, False
        # Without Date, the time of receipt stands in for it (§4.2.1, RFC 9110 §6.6.1).
        return max(0.0, expires - (date if date is not None else response_time)), False
    # §4.2.2: heuristic freshness only for heuristically cacheable codes (or public).
    if status in HEURISTICALLY_CACHEABLE or cc.public:
        last_modified = parse_http_date(header_get(headers, "last-modified"))
        base = date if date is not None else response_time
        if last_modified is not None and last_modified < base:
            return min(heuristic_cap, (base - last_modified) * HEURISTIC_FRACTION), True
    return 0.0, False


def corrected_initial_age(headers: HeaderList, request_time: float, response_time: float) -> float:
    """RFC 9111 §4.2.3: the age the response already had when it arrived."""
    date = parse_http_date(header_get(headers, "date"))
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    # §5.1: Age is a single delta-seconds; of a list, the first member; an invalid value is ignored.
    age_value = parse_delta_seconds(first_member(headers, "age"))
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = (age_value or 0) + response_delay
    return max(apparent_age, corrected_age_value)


def malformed_fields(headers: HeaderList) -> list[str]:
    """Names of caching-relevant fields whose values do not parse (for counters and logs).

    Each is still handled by the RFC's rule for invalid values (e.g. an invalid max-age or
    Expires means stale, §4.2.1/§5.3); this only tells the operator. ``Expires: 0`` and
    ``Expires: -1`` are a common idiom for "already expired" and are not reported.
    """
    found: dict[str, list[str]] = {}
    for name, value in headers:  # one pass over the fields (this runs for every answer)
        lower = name.lower()
        if lower in _CHECKED_FIELDS:
            found.setdefault(lower, []).append(value)
    if not found:
        return []
    bad: list[str] = []
    cc = parse_cache_control(found.get("cache-control", ()))
    for name in ("max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"):
        if name in cc and parse_delta_seconds(cc[name]) is None:
            bad.append("cache-control")
            break
    for name in ("date", "last-modified"):
        values = found.get(name)
        if values is not None and parse_http_date(", ".join(values)) is None:
            bad.append(name)
    expires = found.get("expires")
    if expires and parse_http_date(expires[0]) is None and expires[0].strip().lstrip("-") not in ("0", "1"):
        bad.append("expires")
    ages = split_list(found.get("age", ()))
    if ages and parse_delta_seconds(ages[0]) is None:
        bad.append("age")
    return bad


_CHECKED_FIELDS = frozenset({"cache-control", "date", "last-modified", "expires", "age"})

# Every field ``storability`` reads, besides the targeted fields (RFC 9213) it is given, every
# field ``malformed_fields`` checks, and every field the lifetime of a stored response depends
# on (``make_stored_response(...).retain_until()``: freshness, age, stale windows, validators,
# and Connection, which can make a field hop-by-hop): these give the same answer for a header
# list and for its lines with these names (in order). The hit-for-pass fast path picks just
# these lines in one pass over a response instead of converting all of them.
STORABILITY_REQUEST_FIELDS = frozenset({"cache-control", "pragma", "authorization"})
STORABILITY_RESPONSE_FIELDS = (
    frozenset({"cache-control", "set-cookie", "vary", "expires", "etag", "connection"}) | _CHECKED_FIELDS
)


# --------------------------------------------------------------------------- stored entries


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """One stored response (an immutable variant). Times are epoch seconds."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    request_time: float
    response_time: float
    # Derived at store time (and on a 304 merge), so the hit path does no parsing:
    initial_age: float
    freshness: float
    stale_while_revalidate: float
    stale_if_error: float
    never_serve_stale: bool
    requires_revalidation: bool  # response no-cache: §5.2.2.4
    heuristic: bool
    # Vary: names and the request's normalised values they were stored under (§4.1).
    vary: tuple[tuple[str, str | None], ...] = ()
    etag: str | None = None
    last_modified: str | None = None

    def age(self, now: float) -> float:
        """current_age, RFC 9111 §4.2.3."""
        return self.initial_age + max(0.0, now - self.response_time)

    def ttl(self, now: float) -> float:
        """Seconds of freshness left (negative when stale)."""
        return self.freshness - self.age(now)

    def is_fresh(self, now: float) -> bool:
        return self.freshness > self.age(now)

    def retain_until(self) -> float:
        """Epoch second after which the entry is useless: fresh + the longest stale window.

        Entries with validators are kept a little longer (they can still be revalidated),
        bounded so a no-cache entry does not live forever (the reference's W17).
        """
        window = max(self.stale_while_revalidate, self.stale_if_error)
        if self.etag or self.last_modified:
            window = max(window, min(max(self.freshness, 60.0), 3600.0))
        return self.response_time - self.initial_age + self.freshness + window

    def cost(self) -> int:
        """Bytes this entry really costs in memory (body, headers, and a fixed overhead)."""
        header_bytes = sum(len(k) + len(v) + 100 for k, v in self.headers)  # two str objects + tuple
        return len(self.body) + header_bytes + 64 * len(self.vary) + 400


def strip_for_storage(headers: HeaderList) -> tuple[tuple[str, str], ...]:
    """Drop hop-by-hop fields (RFC 9111 §3.1, incl. those named by Connection) and our own."""
    drop = set(HOP_BY_HOP) | CACHE_GENERATED
    for token in split_list(header_values(headers, "connection")):
        drop.add(token.lower())
    return tuple((k, v) for k, v in headers if k.lower() not in drop)


def make_stored_response(
    status: int,
    reason: str,
    request_headers: HeaderList,
    response_headers: HeaderList,
    body: bytes,
    request_time: float,
    response_time: float,
    heuristic_cap: float = DEFAULT_HEURISTIC_CAP,
    targets: Sequence[str] = (),
) -> StoredResponse:
    """Build the immutable entry for a storable response (call storability() first).

    RFC 9110 §6.6.1: a response received without Date gets one (the time of receipt)."""
    headers = strip_for_storage(response_headers)
    if header_get(headers, "date") is None:
        headers += (("Date", format_http_date(response_time)),)
    names = vary_names(headers) or ()
    return StoredResponse(
        status=status,
        reason=reason,
        headers=headers,
        body=body,
        vary=request_vary_values(names, request_headers),
        **_derived(status, headers, response_headers, request_time, response_time, heuristic_cap, targets),
    )


def _derived(
    status: int,
    headers: tuple[tuple[str, str], ...],
    received_headers: HeaderList,
    request_time: float,
    response_time: float,
    heuristic_cap: float,
    targets: Sequence[str] = (),
) -> dict[str, Any]:
    """The fields computed from a response's headers once, at store time and on a 304 merge.

    ``received_headers`` are the fields as received (with Age), ``headers`` what is stored.
    """
    cc = ResponseDirectives.from_headers(headers, targets)
    lifetime, heuristic = freshness_lifetime(status, headers, response_time, heuristic_cap, targets)
    return {
        "request_time": request_time,
        "response_time": response_time,
        "initial_age": corrected_initial_age(received_headers, request_time, response_time),
        "freshness": lifetime,
        "stale_while_revalidate": float(cc.stale_while_revalidate),
        "stale_if_error": float(cc.stale_if_error),
        "never_serve_stale": cc.never_serve_stale,
        "requires_revalidation": cc.no_cache,
        "heuristic": heuristic,
        "etag": header_get(headers, "etag"),
        "last_modified": header_get(headers, "last-modified"),
    }


def variant_matches(entry: StoredResponse, request_headers: HeaderList) -> bool:
    """RFC 9111 §4.1: every Vary'd field of the request matches the stored request's."""
    return all(
        normalize_vary_value(name, header_values(request_headers, name)) == value
        for name, value in entry.vary
    )


def select_variant(entries: Iterable[StoredResponse], request_headers: HeaderList) -> StoredResponse | None:
    """§4.1: of the matching stored responses, use the most recent one."""
    best: StoredResponse | None = None
    for entry in entries:
        if variant_matches(entry, request_headers) and (best is None or entry.response_time > best.response_time):
            best = entry
    return best


# --------------------------------------------------------------------------- using an entry (§4)


class Use(Enum):
    """What the cache may do with a selected stored response."""

    FRESH = "fresh"  # serve it (HIT)
    STALE_OK = "stale"  # serve it stale: the client allowed it with max-stale (§4.2.4)
    STALE_WHILE_REVALIDATE = "swr"  # RFC 5861 §3: serve stale and revalidate in the background
    REVALIDATE = "revalidate"  # forward a conditional request (§4.3.1)


@dataclass(frozen=True, slots=True)
class Decision:
    use: Use
    reason: str  # Cache-Status detail / fwd reason: "fresh", "stale", "request", "no-cache"…


def decide(
    entry: StoredResponse,
    request: RequestDirectives,
    now: float,
    allow_background_revalidation: bool = False,
) -> Decision:
    """May ``entry`` answer a request with these directives at ``now``? (RFC 9111 §4, §4.2.4)."""
    age = entry.age(now)
    fresh = entry.freshness > age
    # §5.2.1.4 (and Pragma §5.4): the client wants a validated response.
    if request.no_cache:
        return Decision(Use.REVALIDATE, "request")
    # §5.2.2.4: response no-cache → validate on every use.
    if entry.requires_revalidation:
        return Decision(Use.REVALIDATE, "no-cache")
    # §5.2.1.1: the client will not accept a response older than max-age.
    if request.max_age is not None and age > request.max_age:
        return Decision(Use.REVALIDATE, "request")
    if fresh:
        # §5.2.1.3: min-fresh needs at least that much freshness left.
        if request.min_fresh is not None and entry.freshness - age < request.min_fresh:
            return Decision(Use.REVALIDATE, "request")
        return Decision(Use.FRESH, "fresh")
    staleness = age - entry.freshness
    # §4.2.4: never serve stale when must-revalidate/proxy-revalidate/s-maxage/no-cache say so.
    if entry.never_serve_stale:
        return Decision(Use.REVALIDATE, "stale")
    # §5.2.1.2: the client accepts a stale response up to max-stale seconds stale.
    if request.max_stale is not None and staleness <= request.max_stale:
        return Decision(Use.STALE_OK, "max-stale")
    # RFC 5861 §3: inside the stale-while-revalidate window, serve and revalidate async.
    if allow_background_revalidation and staleness <= entry.stale_while_revalidate:
        return Decision(Use.STALE_WHILE_REVALIDATE, "stale-while-revalidate")
    return Decision(Use.REVALIDATE, "stale")


def may_serve_stale_if_error(entry: StoredResponse, request: RequestDirectives, now: float) -> bool:
    """RFC 5861 §4: on an origin error, a stale entry inside its stale-if-error window."""
    if entry.never_serve_stale or request.no_cache:
        return False
    staleness = entry.age(now) - entry.freshness
    if request.max_stale is not None and staleness > request.max_stale:
        return False
    return staleness <= entry.stale_if_error


# --------------------------------------------------------------------------- conditionals


def _etag_opaque(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def etags_strong_match(a: str, b: str) -> bool:
    """RFC 9110 §8.8.3.2 strong comparison: neither weak, opaque tags equal."""
    a, b = a.strip(), b.strip()
    return not a.startswith("W/") and not b.startswith("W/") and a == b


def etags_weak_match(a: str, b: str) -> bool:
    """RFC 9110 §8.8.3.2 weak comparison: opaque tags equal, W/ ignored."""
    return _etag_opaque(a) == _etag_opaque(b)


def has_client_conditionals(request_headers: HeaderList) -> bool:
    """Does the request carry If-None-Match or If-Modified-Since (RFC 9110 §13.1)?"""
    return any(k.lower() in ("if-none-match", "if-modified-since") for k, _ in request_headers)


def client_conditional_matches(request_headers: HeaderList, entry: StoredResponse) -> bool:
    """True if a GET/HEAD with these validators should get 304 from ``entry`` (RFC 9110 §13.2.2).

    If-None-Match takes precedence over If-Modified-Since (§13.1.3); conditionals only apply
    when the selected response would be a 2xx (§13.2.1).
    """
    if not 200 <= entry.status < 300:
        return False
    inm_values = header_values(request_headers, "if-none-match")
    if inm_values:
        if entry.etag is None:
            return any(v.strip() == "*" for v in inm_values)
        tags = split_list(inm_values)
        return any(t == "*" or etags_weak_match(t, entry.etag) for t in tags)
    ims = parse_http_date(header_get(request_headers, "if-modified-since"))
    if ims is None:
        return False
    # RFC 9111 §4.3.2: compare with Last-Modified, else Date, else the time of receipt.
    reference = parse_http_date(entry.last_modified) if entry.last_modified else None
    if reference is None:
        reference = parse_http_date(header_get(entry.headers, "date"))
    if reference is None:
        reference = entry.response_time
    return reference <= ims


UNSATISFIABLE = "unsatisfiable"


def select_range(request_headers: HeaderList, entry: StoredResponse) -> tuple[int, int] | str | None:
    """RFC 9110 §14.2: the one byte range to serve from a stored 200, as (first, last) inclusive;
    UNSATISFIABLE for a 416; None to serve the whole response (no or unusable Range, several
    ranges, or an If-Range that does not match: all allowed answers to a Range request).
    """
    values = header_values(request_headers, "range")
    if not values or entry.status != 200:
        return None
    if_range = header_get(request_headers, "if-range")
    if if_range is not None:
        validator = if_range.strip()
        if validator.startswith(("W/", '"')):
            # §13.1.5: If-Range needs a strong match; a weak tag never matches.
            etag = (entry.etag or "").strip()
            if validator.startswith("W/") or etag.startswith("W/") or etag != validator:
                return None
        else:
            date = parse_http_date(validator)
            if date is None or entry.last_modified is None or parse_http_date(entry.last_modified) != date:
                return None
    unit, sep, ranges = ",".join(values).partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [p.strip() for p in ranges.split(",") if p.strip()]
    if len(parts) != 1:
        return None
    first, dash, last = parts[0].partition("-")
    first, last = first.strip(), last.strip()
    length = len(entry.body)
    if not dash or not (_is_digits(first) or (first == "" and _is_digits(last))) or (last and not _is_digits(last)):
        return None  # RFC 9110 §14.1.1: ASCII digits only; anything else is not a valid range
    if first == "":  # suffix: the last N bytes
        suffix = _bounded_int(last)
        return (max(0, length - suffix), length - 1) if suffix and length else UNSATISFIABLE
    start = _bounded_int(first)
    end = _bounded_int(last) if last else length - 1
    if last and end < start:
        return None  # invalid: ignore the Range
    if start >= length:
        return UNSATISFIABLE
    return start, min(end, length - 1)


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _bounded_int(digits: str) -> int:
    """ASCII digits as an int, any length (no int() of 4,300+ digits: ValueError)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 30 else 10**30


def validators_for(entry: StoredResponse) -> list[tuple[str, str]]:
    """Conditional request fields to revalidate ``entry`` with (RFC 9111 §4.3.1)."""
    out: list[tuple[str, str]] = []
    if entry.etag:
        out.append(("If-None-Match", entry.etag))
    if entry.last_modified:
        out.append(("If-Modified-Since", entry.last_modified))
    return out


# RFC 9110 §15.4.5: fields a 304 carries (plus Last-Modified as a validator and our own).
_NOT_MODIFIED_FIELDS = frozenset(
    {"cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified"}
)


def not_modified_headers(entry: StoredResponse) -> list[tuple[str, str]]:
    return [(k, v) for k, v in entry.headers if k.lower() in _NOT_MODIFIED_FIELDS]


def validator_304_matches(entry: StoredResponse, response_headers: HeaderList) -> bool:
    """RFC 9111 §4.3.4: may this 304 update ``entry``?

    A strong ETag in the 304 selects only a stored response with that same strong ETag (a
    weak stored one is not it); a weak ETag selects by weak comparison; with only
    Last-Modified, the stored one must carry the same; with neither, only a stored response
    that also lacks validators is selected.
    """
    etag = header_get(response_headers, "etag")
    if etag is not None:
        if entry.etag is None:
            return False
        if etag.strip().startswith("W/"):
            return etags_weak_match(etag, entry.etag)
        return etags_strong_match(etag, entry.etag)
    last_modified = header_get(response_headers, "last-modified")
    if last_modified is not None:
        return entry.last_modified is not None and parse_http_date(last_modified) == parse_http_date(
            entry.last_modified
        )
    return entry.etag is None and entry.last_modified is None


def merge_304(
    entry: StoredResponse,
    response_headers: HeaderList,
    request_time: float,
    response_time: float,
    heuristic_cap: float = DEFAULT_HEURISTIC_CAP,
    targets: Sequence[str] = (),
) -> StoredResponse:
    """RFC 9111 §3.2 + §4.3.4: freshen a stored response with a 304's header fields.

    Fields in the 304 replace stored ones of the same name, except framing (Content-Length,
    Content-Encoding, Content-Range), hop-by-hop fields and Set-Cookie (it belongs to the
    client whose request got the 304, never to a shared entry: RFC 6265 §8.2); freshness is
    recomputed. Check ``merged_storability`` before storing the result.
    """
    incoming = [
        (k, v) for k, v in strip_for_storage(response_headers) if k.lower() not in NOT_UPDATED_BY_304 | NOT_SHARED
    ]
    replaced = {k.lower() for k, _ in incoming}
    headers = tuple((k, v) for k, v in entry.headers if k.lower() not in replaced) + tuple(incoming)
    return dataclasses.replace(
        entry,
        headers=headers,
        **_derived(entry.status, headers, response_headers, request_time, response_time, heuristic_cap, targets),
    )


def merged_storability(entry: StoredResponse, targets: Sequence[str] = ()) -> NotStorable | None:
    """RFC 9111 §3.2/§4.3.4/§4.3.5: after a merge, nothing that would have made the response
    unstorable (no-store, private, Vary: *) may enter the stored entry."""
    cc = ResponseDirectives.from_headers(entry.headers, targets)
    if cc.no_store:
        return NotStorable.NO_STORE
    if cc.private:
        return NotStorable.PRIVATE
    if vary_names(entry.headers) is None:
        return NotStorable.VARY_STAR
    return None


def freshen_with_head(
    entry: StoredResponse,
    head_headers: HeaderList,
    request_time: float,
    response_time: float,
    heuristic_cap: float = DEFAULT_HEURISTIC_CAP,
    targets: Sequence[str] = (),
) -> StoredResponse:
    """RFC 9111 §4.3.5: a 200 to HEAD updates the stored GET response like a 304 would, unless
    its ETag, Last-Modified or Content-Length disagree with it: then the stored response is
    marked stale (it no longer describes the resource; it may still be revalidated).
    """
    etag = header_get(head_headers, "etag")
    last_modified = header_get(head_headers, "last-modified")
    length = header_get(head_headers, "content-length")
    differs = (
        (etag is not None and (entry.etag is None or etag.strip() != entry.etag.strip()))
        or (last_modified is not None and entry.last_modified is not None
            and parse_http_date(last_modified) != parse_http_date(entry.last_modified))
        or (length is not None and length.strip() != str(len(entry.body)))
    )
    if differs:
        return dataclasses.replace(entry, freshness=0.0, stale_while_revalidate=0.0, stale_if_error=0.0)
    return merge_304(entry, head_headers, request_time, response_time, heuristic_cap, targets)


# --------------------------------------------------------------------------- invalidation (§4.4)


def invalidation_targets(method: str, status: int, target_url: str, response_headers: HeaderList) -> list[str]:
    """Absolute URLs to invalidate after an unsafe request (RFC 9111 §4.4).

    A non-error response (2xx/3xx) to an unsafe method invalidates the target URI and the
    URIs in Location and Content-Location (absolute or relative to the target), but only when
    those share the target's origin. The caller turns them into keys (``keys.KeyBuilder``).
    """
    if method in SAFE_METHODS or not 200 <= status < 400:  # case-sensitive (RFC 9110 §9.1)
        return []
    urls = [target_url]
    for name in ("location", "content-location"):
        value = header_get(response_headers, name)
        if not value:
            continue
        try:
            url = urljoin(target_url, value.strip())
        except ValueError:
            continue
        if url not in urls and same_origin(url, target_url):
            urls.append(url)
    return urls


# --------------------------------------------------------------------------- Cache-Status (RFC 9211)


@dataclass(slots=True)
class CacheStatus:
    """One RFC 9211 Cache-Status member, rendered as ``mitmcache; hit; ttl=12; detail=l1``."""

    hit: bool = False
    fwd: str | None = None  # bypass, method, uri-miss, vary-miss, miss, request, stale
    fwd_status: int | None = None
    stored: bool = False
    collapsed: bool = False
    ttl: int | None = None
    detail: list[str] = field(default_factory=list)

    def render(self, cache_name: str = "mitmcache") -> str:
        parts = [cache_name]
        if self.hit:
            parts.append("hit")
        if self.fwd:
            parts.append(f"fwd={self.fwd}")
        if self.fwd_status is not None:
            parts.append(f"fwd-status={self.fwd_status}")
        if self.stored:
            parts.append("stored")
        if self.collapsed:
            parts.append("collapsed")
        if self.ttl is not None:
            parts.append(f"ttl={self.ttl}")
        if self.detail:
            # detail is one sf-token; several facts are joined with "+" (a tchar). A fact with
            # a character a token cannot hold (policy=NAME) makes it an sf-string (RFC 8941 §3.3.3).
            detail = "+".join(self.detail)
            parts.append(f"detail={detail}" if _SF_TOKEN.fullmatch(detail) else f'detail="{detail}"')
        return "; ".join(parts)


def age_header_value(age: float) -> str:
    """RFC 9111 §5.1: Age is whole seconds, rounded down."""
    return str(min(int(max(0.0, age)), DELTA_SECONDS_MAX))
