"""Purge addon: HTTP ``PURGE`` (Varnish/Squid/ATS convention), the ``cache.purge.*`` commands,
and the tag options.

``PURGE <url>`` purges every variant of the URL; ``PURGE`` carrying a tag field (``Surrogate-Key:
t1 t2``, ``Cache-Tag: t1,t2``) purges those tags instead; ``Cache-Purge-Soft: 1`` marks stale
instead of deleting. Allowed only from ``cache_purge_allow`` and, when ``cache_purge_token`` is
set, with ``Authorization: Bearer <token>``; else 403. A PURGE never reaches the origin.
Answers are JSON: ``{"purged": N, "kind": "url"|"tag", "soft": false}`` (plus ``pending`` when
keys on down nodes will be deleted on their return, ``error`` when the purge could not finish):
200 when something was purged, 404 when nothing was cached, 503 when nothing could be purged
because Valkey could not answer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Coroutine
from typing import Any

from mitmproxy import command, ctx, exceptions, http

from ..purge import DEFAULT_ALLOW, DEFAULT_TAG_HEADERS, Access, Result, parse_tag_headers, tags_of
from ..service import CacheService
from .config import reject_unparsable, report_option_errors, spawn
from .admin import url_keys
from .http_cache import request_from_flow

log = logging.getLogger("mitmcache")

SOFT_VALUES = ("1", "true", "yes", "on")


def _json(status: int, body: dict[str, object]) -> http.Response:
    return http.Response.make(
        status, json.dumps(body) + "\n", {"Content-Type": "application/json", "Cache-Control": "no-store"}
    )


class Purge:
    name = "mitmcache.purge"

    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.access = Access.parse(DEFAULT_ALLOW)

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "cache_tag_headers", str, DEFAULT_TAG_HEADERS,
            "Response fields naming purge tags (Surrogate-Key: space-separated; others: comma-separated).",
        )
        loader.add_option(
            "cache_tag_headers_passthrough", bool, False,
            "Send the tag fields on to clients (default: stored, but removed from what clients get).",
        )
        loader.add_option(
            "cache_purge_allow", str, DEFAULT_ALLOW,
            "Client addresses allowed to send PURGE: comma-separated CIDRs; empty = nobody.",
        )
        loader.add_option(
            "cache_purge_token", str, "",
            "When set, PURGE also needs 'Authorization: Bearer <token>'.",
        )
        reject_unparsable(loader, ("cache_tag_headers_passthrough",))

    @report_option_errors
    def configure(self, updated: set[str]) -> None:
        opts, service = ctx.options, self.service
        if "cache_tag_headers" in updated:
            try:
                names = parse_tag_headers(opts.cache_tag_headers)
            except ValueError as e:
                raise exceptions.OptionsError(f"cache_tag_headers: {e}") from None
            service.settings = dataclasses.replace(service.settings, tag_headers=names)
        if "cache_tag_headers_passthrough" in updated:
            service.settings = dataclasses.replace(service.settings, tag_passthrough=opts.cache_tag_headers_passthrough)
        if updated & {"cache_purge_allow", "cache_purge_token"}:
            try:
                self.access = Access.parse(opts.cache_purge_allow, opts.cache_purge_token)
            except ValueError as e:
                raise exceptions.OptionsError(f"cache_purge_allow: {e}") from None

    # ------------------------------------------------------------------ HTTP PURGE

    async def http(self, flow: http.HTTPFlow) -> None:
        """Answer a PURGE request (HttpCache.request hands it over; it never goes upstream)."""
        service, req = self.service, flow.request
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
        if not self.access.allows(peer, req.headers.get("authorization")):
            service.metrics.purge_denied.inc()
            log.info(f"mitmcache: PURGE {req.pretty_url} from {peer} refused (cache_purge_allow/cache_purge_token)")
            flow.response = _json(403, {"error": "forbidden"})
            return
        soft = req.headers.get("cache-purge-soft", "").strip().lower() in SOFT_VALUES
        tags = tags_of(tuple(req.headers.items(multi=True)), service.settings.tag_headers)
        if tags:
            results = [await service.purger.tag(tag, soft) for tag in tags]
            result = Result(
                "tag", soft, sum(r.purged for r in results), sum(r.pending for r in results),
                next((r.error for r in results if r.error), None),
            )
        else:
            r = request_from_flow(flow, service.policies)
            r = dataclasses.replace(r, method="GET", policy=service.policy_for_url(req.url, r.headers))
            result = await service.purger.urls([service.keys.for_request(r)], soft)
        if result.purged or result.pending:
            status = 200
        else:
            status = 503 if result.error else 404
        flow.response = _json(status, result.body())
        flow.comment = f"cache PURGE {result.kind}: {result.purged} purged" + (" (soft)" if soft else "")

    # ------------------------------------------------------------------ commands

    def _background(self, what: str, coro: Coroutine[Any, Any, Result]) -> str:
        """Commands cannot wait for Valkey without stalling the proxy: the purge runs in the
        background and its result is logged (``mitmcache: purge …: {"purged": N, …}``)."""

        async def run() -> None:
            result = await coro
            log.info(f"mitmcache: purge {what}: {json.dumps(result.body())}")

        spawn(run(), f"purge {what}")
        return f"purging {what} across the cluster; the count is logged"

    @command.command("cache.purge.tag")
    def purge_tag(self, tag: str) -> str:
        """Drop every entry stored with this tag (Surrogate-Key/Cache-Tag), across the cluster
        (in the background; the count is logged)."""
        return self._background(f"tag {tag!r}", self.service.purger.tag(tag))

    @command.command("cache.purge.prefix")
    def purge_prefix(self, prefix: str) -> str:
        """Drop every entry whose URL starts with this absolute URL prefix (the origin's, or in
        reverse mode the one clients use), across the cluster (in the background; logged)."""
        keys = [self.service.keys.base(k) for k in url_keys(self.service, prefix, include_given=False, policy=False)]
        return "; ".join(self._background(f"prefix {k!r}", self.service.purger.prefix(k)) for k in keys)

    @command.command("cache.purge.soft")
    def purge_soft(self, url: str) -> str:
        """Mark every variant of a URL stale (soft purge: stale-while-revalidate and
        stale-if-error still apply), across the cluster (in the background; logged)."""
        keys = list(dict.fromkeys(self.service.keys.base(k) for k in url_keys(self.service, url)))
        return self._background(f"soft {url!r}", self.service.purger.urls(keys, soft=True))
