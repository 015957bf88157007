"""Operator policies: per host/path rules that override what the headers say (force mode).

A rule follows mitmproxy's spec convention (``map_local``, ``modify_headers``): its first
character is the separator, then a mitmproxy filter expression, then space-separated
``name=value`` settings (lists comma-separated), e.g.
``|~d api.example.com & ~u /v1/|ttl=5m error_ttl=10s swr=30s sie=1h key_headers=X-Tenant-ID``.
The first matching rule wins; no match = RFC behaviour. Modelled on the reference design's
"force" mode, Varnish ``beresp.ttl``/``grace``, nginx ``proxy_cache_valid``/``proxy_cache_key``
and ATS ``ignore_query``; applied in one place before the spec logic, as cachecontrol's
``BaseHeuristic.apply`` does: overrides change derived freshness, never the headers clients see.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from . import semantics as sem
from .semantics import StoredResponse

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
OVERRIDABLE = frozenset({"no-store", "private", "no-cache", "must-revalidate", "set-cookie"})
ERROR_STATUSES = frozenset({404, 410})  # and every 5xx: negative caching with error_ttl
_FIELD_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
KEY_VALUES_MARK = "\nk"  # starts the request values a rule joins to a key (never in a URL)
# Filters that read the response: a rule is chosen before there is one, so they never match.
_RESPONSE_FILTERS = {"FCode", "FResp", "FHeadResponse", "FContentTypeResponse", "FBodResponse", "FAsset"}


class PolicyError(ValueError):
    """A rule that does not parse; the message names the setting and what is wrong."""


def parse_duration(text: str) -> float:
    """``300ms``, ``5m``, ``1h30m``, ``2.5s`` or plain seconds → seconds. Raises PolicyError."""
    text = text.strip()
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text):
        return float(text)
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise PolicyError(f"not a duration: {text!r} (e.g. 300ms, 30s, 5m, 1h30m, 1d)")
    return total


def _bool(text: str) -> bool:
    if text in ("", "true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise PolicyError(f"not a boolean: {text!r} (true or false)")


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise PolicyError("empty list")
    for n in names:
        if not _FIELD_NAME.fullmatch(n):
            raise PolicyError(f"not a name: {n!r}")
    return names


@dataclass(frozen=True, slots=True)
class Policy:
    """One compiled rule. Durations in seconds; None = not set (the headers decide)."""

    index: int  # 1-based position in cache_policy
    spec: str
    matches: Callable[[Any], bool]  # a compiled mitmproxy filter expression
    url_only: bool  # the filter reads only method, host and URL (its result can be memoised)
    name: str | None = None
    ttl: float | None = None
    error_ttl: float | None = None
    swr: float | None = None
    sie: float | None = None
    override: frozenset[str] = frozenset()
    key_headers: tuple[str, ...] = ()  # lower-case
    key_cookies: tuple[str, ...] = ()
    ignore_params: tuple[str, ...] = ()  # fnmatch globs
    keep_params: tuple[str, ...] | None = None  # allow-list globs
    sort_params: bool = False
    bypass: bool = False
    no_store: bool = False
    l1_ttl: float | None = None

    @property
    def label(self) -> str:
        """What Cache-Status ``detail`` says: ``policy=NAME`` or ``policy=N``."""
        return f"policy={self.name or self.index}"

    # ------------------------------------------------------------------ the key

    def key_path(self, path: str) -> str:
        """The query normalised for the key (ignore_params, keep_params, sort_params); the
        origin still gets the request as the client sent it."""
        base, sep, query = path.partition("?")
        if not sep or not (self.ignore_params or self.keep_params is not None or self.sort_params):
            return path
        params = [p for p in query.split("&") if p]
        if self.ignore_params:
            params = [p for p in params if not any(fnmatch.fnmatchcase(p.partition("=")[0], g) for g in self.ignore_params)]
        if self.keep_params is not None:
            keep = self.keep_params
            params = [p for p in params if any(fnmatch.fnmatchcase(p.partition("=")[0], g) for g in keep)]
        if self.sort_params:
            params.sort(key=lambda p: p.partition("=")[0])  # stable: equal names keep their order
        return f"{base}?{'&'.join(params)}" if params else base

    def key_suffix(self, request_headers: sem.HeaderList) -> str:
        """The values of key_headers and key_cookies, each marked present or absent. Values
        are hashed (BLAKE2b, 128 bits): keys show up in logs, flow files and commands, and
        may hold credentials (key_headers=Authorization)."""
        parts = []
        for name in self.key_headers:
            values = sem.header_values(request_headers, name)
            parts.append(f"{KEY_VALUES_MARK}h:{name}={_digest(values)}" if values else f"{KEY_VALUES_MARK}h:{name}")
        if self.key_cookies:
            jar = _cookies(request_headers)
            for name in self.key_cookies:
                cookie_values = jar.get(name)
                parts.append(
                    f"{KEY_VALUES_MARK}c:{name}={_digest(cookie_values)}" if cookie_values else f"{KEY_VALUES_MARK}c:{name}"
                )
        return "".join(parts)

    # ------------------------------------------------------------------ storing

    def view(self, response_headers: sem.HeaderList) -> tuple[tuple[str, str], ...]:
        """The response as the spec logic should judge it: the prohibitions named in
        ``override`` removed from Cache-Control (and targeted fields), Set-Cookie dropped."""
        if not self.override:
            return tuple(response_headers)
        drop = {d for d in self.override if d != "set-cookie"}
        if "must-revalidate" in drop:
            drop.add("proxy-revalidate")
        out = []
        for k, v in response_headers:
            lk = k.lower()
            if lk in sem.NOT_SHARED and "set-cookie" in self.override:
                continue
            if drop and (lk == "cache-control" or lk.endswith("cache-control")):
                kept = [d for d in sem.split_list([v]) if d.partition("=")[0].strip().lower() not in drop]
                if not kept:
                    continue
                v = ", ".join(kept)
            out.append((k, v))
        return tuple(out)

    def forced_lifetime(self, status: int) -> float | None:
        """The operator's freshness for this status: ``ttl`` for 2xx/3xx, ``error_ttl`` for
        404, 410 and 5xx; None when the rule sets none for it."""
        if status in ERROR_STATUSES or 500 <= status < 600:
            return self.error_ttl
        if 200 <= status < 400:
            return self.ttl
        return None

    def storability(self, status: int, spec_reason: sem.NotStorable | None) -> sem.NotStorable | None:
        """The spec's verdict (on the overridden view) adjusted by the rule."""
        if self.no_store or self.bypass:
            return sem.NotStorable.POLICY
        forced = self.forced_lifetime(status)
        if forced is not None and forced <= 0:
            return sem.NotStorable.POLICY  # error_ttl=0 / ttl=0: never stored
        if spec_reason is sem.NotStorable.NOT_CACHEABLE and forced is not None:
            return None  # force mode: no caching headers needed
        return spec_reason

    def apply(self, entry: StoredResponse, targets: Sequence[str] = ()) -> StoredResponse:
        """The operator's freshness and stale windows on a stored response (its headers are
        untouched). An upstream must-revalidate/proxy-revalidate/s-maxage (or no-cache) still
        forbids serving stale unless ``override`` names it."""
        changes: dict[str, object] = {}
        forced = self.forced_lifetime(entry.status)
        if forced is not None:
            changes.update(freshness=forced, heuristic=False)
        never_stale, no_cache = entry.never_serve_stale, entry.requires_revalidation
        if self.override & {"must-revalidate", "no-cache"}:
            seen = sem.ResponseDirectives.from_headers(self.view(entry.headers), targets)
            # override=must-revalidate lifts must-revalidate, proxy-revalidate and s-maxage alike.
            never_stale = seen.no_cache if "must-revalidate" in self.override else seen.never_serve_stale
            no_cache = seen.no_cache
        if never_stale != entry.never_serve_stale:
            changes["never_serve_stale"] = never_stale
        if no_cache != entry.requires_revalidation:
            changes["requires_revalidation"] = no_cache
        if self.swr is not None and not never_stale:
            changes["stale_while_revalidate"] = self.swr
        if self.sie is not None and not never_stale:
            changes["stale_if_error"] = self.sie
        return dataclasses.replace(entry, **changes) if changes else entry  # type: ignore[arg-type]


def _digest(values: list[str]) -> str:
    data = json.dumps(values).encode("utf-8", "surrogateescape")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _cookies(request_headers: sem.HeaderList) -> dict[str, list[str]]:
    jar: dict[str, list[str]] = {}
    for line in sem.header_values(request_headers, "cookie"):
        for pair in line.split(";"):
            name, sep, value = pair.strip().partition("=")
            if sep and name:
                jar.setdefault(name, []).append(value)
    return jar


# ------------------------------------------------------------------------------ parsing


def parse_rule(spec: str, index: int, parse_filter: Callable[[str], Any]) -> Policy:
    """Compile one rule (``index`` 1-based). Raises PolicyError naming what is wrong."""
    if len(spec) < 3:
        raise PolicyError("too short: a rule is SEP filter SEP settings, e.g. |~d example.com|ttl=5m")
    sep = spec[0]
    expr, found, settings = spec[1:].partition(sep)
    if not found:
        raise PolicyError(f"no second {sep!r}: a rule is SEP filter SEP settings")
    expr = expr.strip()
    try:
        matches = parse_filter(expr)
    except ValueError as e:
        raise PolicyError(f"filter {expr!r}: {e}") from None
    if _reads_response(matches):
        raise PolicyError(f"filter {expr!r} reads the response, but a rule is chosen before there is one")
    values: dict[str, object] = {}
    for item in settings.split():
        name, _, raw = item.partition("=")
        if not name:
            raise PolicyError(f"a setting without a name: {item!r}")
        if name in values:
            raise PolicyError(f"{name}: given twice")
        try:
            values[name] = _setting(name, raw)
        except PolicyError as e:
            raise PolicyError(f"{name}: {e}") from None
    if not values:
        raise PolicyError("no settings (e.g. ttl=5m, bypass)")
    if values.get("bypass") and len(set(values) - {"bypass", "name"}) > 0:
        raise PolicyError("bypass takes no other settings: the cache does not handle these requests")
    return Policy(index=index, spec=spec, matches=matches, url_only=_url_only(matches), **values)  # type: ignore[arg-type]


def _setting(name: str, raw: str) -> object:
    if name in ("ttl", "error_ttl", "swr", "sie", "l1_ttl"):
        return parse_duration(raw)
    if name == "override":
        items = frozenset(i.strip().lower() for i in raw.split(",") if i.strip())
        unknown = items - OVERRIDABLE
        if unknown or not items:
            raise PolicyError(f"unknown {', '.join(sorted(unknown)) or 'empty'} (one of {', '.join(sorted(OVERRIDABLE))})")
        return items
    if name == "key_headers":
        return tuple(n.lower() for n in _names(raw))
    if name == "key_cookies":
        return _names(raw)
    if name in ("ignore_params", "keep_params"):
        globs = tuple(g for g in raw.split(",") if g)
        if not globs:
            raise PolicyError("empty list")
        return globs
    if name in ("sort_params", "bypass", "no_store"):
        return _bool(raw)
    if name == "name":
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", raw):
            raise PolicyError(f"not a name: {raw!r} (letters, digits, _ . -)")
        return raw
    raise PolicyError(
        "unknown setting (ttl, error_ttl, swr, sie, override, key_headers, key_cookies, ignore_params, "
        "keep_params, sort_params, bypass, no_store, l1_ttl, name)"
    )


_URL_ONLY = {"FDomain", "FUrl", "FMethod", "FHTTP", "FReq", "FAll"}


def _filter_kinds(flt: Any) -> set[str]:
    """The kinds of test a compiled mitmproxy filter expression makes (its leaves)."""
    kind = type(flt).__name__
    if kind in ("FAnd", "FOr"):
        return set().union(*(_filter_kinds(x) for x in flt.lst))
    if kind == "FNot":
        return _filter_kinds(flt.itm)
    return {kind}


def _reads_response(flt: Any) -> bool:
    return bool(_filter_kinds(flt) & _RESPONSE_FILTERS)


def _url_only(flt: Any) -> bool:
    """Does the filter read only the method, host and URL (so a match can be memoised)?"""
    return _filter_kinds(flt) <= _URL_ONLY


class PolicySet:
    """The compiled ``cache_policy`` rules; ``match`` returns the first matching rule.

    When every rule reads only method, host and URL, matches are memoised per request line
    (``memo_key``: whatever determines method, host and URL) in a bounded map, so 50 rules cost
    the hit path one dict lookup.
    """

    MEMO_SIZE = 10000

    def __init__(self, rules: Sequence[Policy] = ()) -> None:
        self.rules = tuple(rules)
        self._memo: dict[Hashable, Policy | None] | None = (
            {} if all(r.url_only for r in self.rules) else None
        )

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, flow: object, memo_key: Hashable) -> Policy | None:
        memo = self._memo
        if memo is not None:
            key = memo_key
            try:
                return memo[key]
            except KeyError:
                pass
        found = next((r for r in self.rules if r.matches(flow)), None)
        if memo is not None:
            if len(memo) >= self.MEMO_SIZE:
                memo.clear()
            memo[key] = found
        return found
