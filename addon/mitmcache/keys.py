"""The cache key: one builder for requests, §4.4 invalidation, purge and revalidation.

RFC 9111 §2: the primary key is the target URI (scheme, normalised authority, path and
query). If the request's Host field names another authority than the one the request goes to,
the origin may answer for that name, so the name joins the key: a client-chosen Host never
poisons the entry others get.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from . import semantics as sem
from .messages import Request
from .policy import KEY_VALUES_MARK, Policy


_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _normalize_pct(match: re.Match[str]) -> str:
    """RFC 3986 §6.2.2.1/§6.2.2.2: %xx in upper case; unreserved characters decoded."""
    byte = int(match.group(1), 16)
    return chr(byte) if byte in _UNRESERVED else f"%{byte:02X}"


def normalize_target(path: str) -> str:
    """One spelling per URI for the key: ``/caf%c3%a9`` and ``/caf%C3%A9`` are one URI, and so
    are ``/%7Euser`` and ``/~user`` (RFC 3986 §6.2.2). Only keys use it; what goes upstream is
    sent as the client sent it."""
    return _PCT.sub(_normalize_pct, path) if "%" in path else path


def split_host_port(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) → (host, port or None); a bad port is None."""
    authority = authority.strip()
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_s = authority.rpartition(":") if authority.count(":") == 1 else (authority, "", "")
    try:
        port = int(port_s) if port_s else None
    except ValueError:
        port = None
    return host, port


class KeyBuilder:
    """Builds primary cache keys. The one place where a key is made (operator policies and
    query normalisation attach here)."""

    def build(
        self,
        scheme: str,
        host: str,
        port: int | None,
        path: str,
        host_header: str | None = None,
        policy: Policy | None = None,
        request_headers: sem.HeaderList = (),
        authority: str = "",
    ) -> str:
        """``scheme://authority/path?query``, plus ``\\nauthority=NAME`` / ``\\nhost=NAME`` when
        the request target's authority or the Host field names another authority than the one
        the request goes to (the origin may answer for that name; a newline never occurs in a
        request target), plus the values of an operator rule's key_headers/key_cookies; the
        rule's query normalisation applies first."""
        scheme = scheme.lower()
        if not path.startswith("/") and path != "*":
            path = "/" + path
        path = normalize_target(path)
        if policy is not None:
            path = policy.key_path(path)
        target = sem.normalize_authority(scheme, host, port)
        key = f"{scheme}://{target}{path}"
        for label, value in (("authority", authority), ("host", host_header)):
            if value:
                h, p = split_host_port(value)
                named = sem.normalize_authority(scheme, h, p if p is not None else sem.default_port(scheme))
                if named != target:
                    key += f"\n{label}={named}"
        if policy is not None and (policy.key_headers or policy.key_cookies):
            key += policy.key_suffix(request_headers)
        return key

    @staticmethod
    def base(key: str) -> str:
        """The URL's key without request values (key_headers/key_cookies): what invalidation
        and purge name; the store reaches the keys with values through its index."""
        return key.split(KEY_VALUES_MARK, 1)[0]

    def for_request(self, req: Request) -> str:
        return self.build(
            req.scheme, req.host, req.port, req.path, req.host_header, req.policy, req.headers, req.authority
        )

    def for_url(
        self, url: str, policy: Policy | None = None, request_headers: sem.HeaderList = (), host_header: str | None = None
    ) -> str | None:
        """Key of an absolute http(s) URL (invalidation targets, purge) under ``policy`` (its
        key_headers values taken from ``request_headers``; ``host_header``: the Host the origin
        sees, when another than the URL's), or None if it is not one."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            return None
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return self.build(parts.scheme, parts.hostname, port, path, host_header, policy, request_headers)
