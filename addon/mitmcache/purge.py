"""Purge by URL, tag and prefix, hard or soft, cluster-wide (no mitmproxy imports).

- **URL**: every variant of the URL (and the keys its index records: key_headers), as §4.4
  invalidation does.
- **Tag**: responses name their tags in the fields of ``cache_tag_headers`` (``Surrogate-Key``:
  space-separated, Fastly's convention; any other field, e.g. ``Cache-Tag``: comma-separated,
  Cloudflare's). Each stored key is listed in a set per tag in Valkey on the node that owns the
  tag (``<prefix>:grp:<xxh3 of "tag:<tag>">``), bounded (``MAX_GROUP_MEMBERS``) and expiring with
  its longest-lived member. Purge = SSCAN of that set, then deletes on each key's owner.
- **Prefix**: every stored key is listed in its origin's set (``host:<scheme://authority>``,
  same mechanism); purge = SSCAN of the origin's set, keep the members that start with the
  prefix's key. Valkey keys are hashes, so ``SCAN MATCH`` over the keyspace could not find URLs.
- **Soft**: every variant is rewritten with its freshness ended now (its age becomes its
  lifetime), so the next request sees a STALE entry: served while revalidating where
  stale-while-revalidate allows, else revalidated (a 304 renews it); stale-if-error still covers
  an origin that fails. An entry with no stale window and no validator is simply deleted.

Every delete and rewrite reaches the other proxies' L1 through their invalidation listeners.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .semantics import HeaderList, StoredResponse
from .store import Resource
from .valkey_tier import L2Error

if TYPE_CHECKING:
    from .service import CacheService

log = logging.getLogger("mitmcache")

DEFAULT_TAG_HEADERS = "Surrogate-Key,Cache-Tag"
DEFAULT_ALLOW = "127.0.0.1/32,::1/128"
MAX_TAGS = 64  # tags per response kept (more are ignored)
MAX_TAG_LENGTH = 256  # characters; longer tags are ignored
PURGE_BATCH = 500  # keys deleted per round trip


@dataclass(frozen=True, slots=True)
class Result:
    """What one purge did. ``purged``: keys (a URL, or a URL with key_headers values) that were
    cached and are now gone or stale; ``pending``: keys on down nodes, deleted when they return;
    ``error``: why the purge could not complete (e.g. the tag's node is down), else None."""

    kind: str  # url | tag | prefix
    soft: bool
    purged: int
    pending: int = 0
    error: str | None = None

    def body(self) -> dict[str, object]:
        out: dict[str, object] = {"purged": self.purged, "kind": self.kind, "soft": self.soft}
        if self.pending:
            out["pending"] = self.pending
        if self.error:
            out["error"] = self.error
        return out


def parse_tag_headers(value: str) -> tuple[str, ...]:
    """``cache_tag_headers``: comma-separated field names, lower-cased. Raises ValueError."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+", name):
            raise ValueError(f"not a field name: {name!r}")
    return tuple(dict.fromkeys(n.lower() for n in names))


def tags_of(headers: HeaderList, tag_headers: tuple[str, ...]) -> tuple[str, ...]:
    """The tags a response names (total: odd values give fewer tags, never an error)."""
    if not tag_headers:
        return ()
    tags: dict[str, None] = {}
    for name, value in headers:
        lname = name.lower()
        if lname not in tag_headers:
            continue
        parts = value.split() if lname == "surrogate-key" else value.split(",")
        for part in parts:
            tag = part.strip()
            if tag and len(tag) <= MAX_TAG_LENGTH and len(tags) < MAX_TAGS:
                tags[tag] = None
    return tuple(tags)


def origin_of(key: str) -> str:
    """``scheme://authority`` of a cache key (its host group)."""
    scheme, sep, rest = key.partition("://")
    authority = rest.split("/", 1)[0].split("\n", 1)[0]
    return f"{scheme}{sep}{authority}"


def groups_for(key: str, tags: Iterable[str]) -> tuple[str, ...]:
    """The purge groups that list a stored key: its tags and its origin."""
    return (*(f"tag:{t}" for t in tags), f"host:{origin_of(key)}")


def expire(entry: StoredResponse, now: float) -> StoredResponse:
    """The entry with its freshness ended now (soft purge): stale from now on, its stale
    windows (RFC 5861) counted from now."""
    return dataclasses.replace(entry, freshness=min(entry.freshness, entry.age(now)))


@dataclass(frozen=True, slots=True)
class Access:
    """Who may send PURGE: a client address in ``networks`` and, when ``token`` is set,
    ``Authorization: Bearer <token>`` (compared in constant time)."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    token: str = ""

    @classmethod
    def parse(cls, allow: str, token: str = "") -> Access:
        """``cache_purge_allow`` (comma-separated CIDRs or addresses; empty: nobody). Raises ValueError."""
        nets = []
        for item in allow.split(","):
            if item.strip():
                try:
                    nets.append(ipaddress.ip_network(item.strip(), strict=False))
                except ValueError:
                    raise ValueError(f"not an address or CIDR: {item.strip()!r}") from None
        return cls(tuple(nets), token)

    def allows(self, address: str | None, authorization: str | None) -> bool:
        try:
            ip = ipaddress.ip_address((address or "").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(ip.version == net.version and ip in net for net in self.networks):
            return False
        if not self.token:
            return True
        scheme, _, given = (authorization or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())


class Purger:
    """Runs purges against the store and counts them (``mitmcache_purges_total`` …)."""

    def __init__(self, service: CacheService) -> None:
        self.service = service

    async def urls(self, keys: list[str], soft: bool = False) -> Result:
        """Purge every variant of the URLs with these keys."""
        keys = list(dict.fromkeys(self.service.keys.base(k) for k in keys))
        purged, pending = await self._remove(keys, soft)
        self.service.metrics.invalidations.inc(len(keys))
        return self._count(Result("url", soft, purged, pending))

    async def tag(self, tag: str, soft: bool = False) -> Result:
        """Purge every key stored with ``tag`` (in L2's tag set, and in this proxy's L1)."""
        tag_headers = self.service.settings.tag_headers
        return await self._group("tag", f"tag:{tag}", soft,
                                 lambda key, r: any(tag in tags_of(v.headers, tag_headers) for v in r.variants),
                                 lambda key: True)

    async def prefix(self, prefix_key: str, soft: bool = False) -> Result:
        """Purge every key that starts with ``prefix_key`` (the key of a URL prefix)."""
        return await self._group("prefix", f"host:{origin_of(prefix_key)}", soft,
                                 lambda key, r: key.startswith(prefix_key),
                                 lambda key: key.startswith(prefix_key))

    async def _group(
        self, kind: str, group: str, soft: bool,
        l1_match: Callable[[str, Resource], bool], l2_match: Callable[[str], bool],
    ) -> Result:
        store = self.service.store
        purged = pending = 0
        error = None
        if not store.near.enabled:
            # L1 may hold entries L2's indexes do not list (L1 only, or fallback writes without
            # coherence). With coherence, deleting what L2 lists drops the copies everywhere.
            local = await store.l1_keys(time.time(), l1_match)
            if local:
                p, q = await self._remove(local, soft)
                purged, pending = purged + p, pending + q
        try:
            async for batch in store.group_members(group):
                wanted = [k for k in batch if l2_match(k)]
                for start in range(0, len(wanted), PURGE_BATCH):
                    chunk = wanted[start : start + PURGE_BATCH]
                    p, q = await self._remove(chunk, soft)
                    purged, pending = purged + p, pending + q
                if not soft:
                    await store.group_forget(group, wanted)
        except L2Error as e:
            error = f"the {kind} index is unreachable: {e}"
            log.warning(f"mitmcache: purge {group!r} incomplete: {error}")
        return self._count(Result(kind, soft, purged, pending, error))

    async def _remove(self, keys: list[str], soft: bool) -> tuple[int, int]:
        store = self.service.store
        if soft:
            return await store.soft_purge(keys, time.time(), expire)
        return await store.purge(keys)

    def _count(self, result: Result) -> Result:
        metrics = self.service.metrics
        metrics.purges.labels(result.kind, "soft" if result.soft else "hard").inc()
        metrics.purged_keys.labels(result.kind).inc(result.purged)
        return result

