"""Admin addon: the ``cache.*`` commands and the Prometheus endpoint.

Command names match ``[a-z.]+`` (mitmweb routes no others: mitmproxy-notes A1.7).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

from mitmproxy import command, ctx, exceptions, flow, http

from ..semantics import StoredResponse
from ..service import CacheService
from ..store import Resource
from .config import origin_urls, reject_unknown, reject_unparsable, report_option_errors, spawn
from .http_cache import METADATA_KEY, HttpCache

log = logging.getLogger("mitmcache")


def variant_view(entry: StoredResponse, now: float) -> dict[str, object]:
    """A stored response's metadata for inspection (no body)."""
    return {
        "status": entry.status,
        "variant": dict((k, v) for k, v in entry.vary),
        "age": int(entry.age(now)),
        "freshness_lifetime": entry.freshness,
        "ttl": int(entry.ttl(now)),
        "heuristic": entry.heuristic,
        "stale_while_revalidate": entry.stale_while_revalidate,
        "stale_if_error": entry.stale_if_error,
        "never_serve_stale": entry.never_serve_stale,
        "no_cache": entry.requires_revalidation,
        "etag": entry.etag,
        "last_modified": entry.last_modified,
        "stored_at": entry.response_time,
        "retain_until": entry.retain_until(),
        "body_bytes": len(entry.body),
        "headers": [[k, v] for k, v in entry.headers],
    }


def url_keys(service: CacheService, url: str, include_given: bool = True, policy: bool = True) -> list[str]:
    """Keys a URL may name. When its port is one of this proxy's reverse-mode listeners (the
    URL the client used), first the key of the origin's URL the entry is stored under (with
    the client's authority joined in when ``keep_host_header`` passes it upstream); then the URL
    as given (it may be an origin's own URL; ``include_given=False`` leaves it out when a
    listener matched). ``policy=False``: no operator rule shapes the key (URL prefixes)."""
    keys = service.keys

    def rule(u: str) -> object:
        return service.policy_for_url(u, ()) if policy else None

    key = keys.for_url(url, rule(url))  # type: ignore[arg-type]
    if key is None:
        raise exceptions.CommandError(f"not an absolute http(s) URL: {url!r}")
    out: list[str] = []
    for origin_url, host_header in origin_urls(url):
        origin_key = keys.for_url(origin_url, rule(origin_url), (), host_header)  # type: ignore[arg-type]
        if origin_key is not None and origin_key not in out:
            out.append(origin_key)
    if key not in out and (include_given or not out):
        out.append(key)
    return out


def _resource_view(resource: Resource | None, now: float) -> list[dict[str, object]] | None:
    return None if resource is None else [variant_view(v, now) for v in resource.variants]


class Admin:
    name = "mitmcache.admin"

    def __init__(self, service: CacheService, http_cache: HttpCache) -> None:
        self.service = service
        self.http_cache = http_cache
        self._l2_views: dict[str, list[dict[str, object]] | None] = {}

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("cache_metrics_port", int, 0, "Serve Prometheus metrics on 127.0.0.1:PORT (0 = off).")
        reject_unparsable(loader, ("cache_metrics_port",))

    @report_option_errors
    def configure(self, updated: set[str]) -> None:
        reject_unknown()  # the last of the cache's addons: every cache_* option is declared by now
        if "cache_metrics_port" in updated:
            port = ctx.options.cache_metrics_port
            if not 0 <= port <= 65535:
                raise exceptions.OptionsError(f"cache_metrics_port: must be 0..65535, not {port}")
            try:
                self.service.metrics.serve(port)
            except OSError as e:
                raise exceptions.OptionsError(
                    f"cache_metrics_port: cannot listen on 127.0.0.1:{port}: {e.strerror or e}"
                ) from None
            if port:
                log.info(f"mitmcache: metrics on http://127.0.0.1:{port}/metrics")

    def done(self) -> None:
        self.service.metrics.stop()

    def _keys(self, url: str, include_given: bool = True) -> list[str]:
        return url_keys(self.service, url, include_given)

    # ------------------------------------------------------------------ commands

    @command.command("cache.stats")
    def stats(self) -> str:
        """Entries, bytes and request counters of this proxy's cache, as JSON."""
        service = self.service
        counts = {
            s.labels["result"]: int(s.value)
            for m in service.metrics.requests.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        return json.dumps(
            {
                **service.store.l1_stats(),
                "l2_nodes": {name: "up" if up else "down" for name, up in service.store.members().items()},
                # per node: does L1 keep copies of its keys (invalidation listener subscribed)?
                "l1_coherent": {name: service.store.near.coherent(name) for name in service.store.members()},
                "requests": counts,
                "fetches_in_flight": len(service.coalescer.flights),
                "revalidations_pending": len(service.revalidator.in_progress),
            },
            sort_keys=True,
        )

    @command.command("cache.clear")
    def clear(self) -> int:
        """Drop every cached entry in L1 and (in the background) in Valkey; returns L1's count."""
        store = self.service.store
        n = store.clear_l1()
        if store.has_l2:
            spawn(store.clear_l2(), "clear Valkey")
        log.info(f"mitmcache: cleared {n} cached URLs from L1" + (" and Valkey" if store.has_l2 else ""))
        return n

    @command.command("cache.purge")
    def purge(self, url: str) -> int:
        """Drop every variant cached for an absolute URL — the origin's, or in reverse mode the
        one the client used; returns how many keys this proxy's L1 held."""
        service = self.service
        keys = list(dict.fromkeys(service.keys.base(k) for k in self._keys(url)))
        store = service.store
        removed = store.delete_l1(store.expand_l1(keys))  # now, so this proxy's next request misses
        # L2 too (with the keys its index records: key_headers); other proxies' L1 through
        # their invalidation listeners.
        spawn(service.purger.urls(keys), "purge")
        return removed

    @command.command("cache.explain")
    def explain(self, flows: Sequence[flow.Flow]) -> str:
        """What the cache did for each flow, as JSON: key, tier, age, freshness lifetime, TTL
        left, stale windows, the variant chosen, and for a MISS why (with the RFC rule)."""
        out = []
        for f in flows:
            if not isinstance(f, http.HTTPFlow):
                continue
            summary = f.metadata.get(METADATA_KEY)  # the request's Outcome, as rendered onto the flow
            view: dict[str, object] = {"url": f.request.url, "method": f.request.method}
            if summary is None:
                view["x-cache-status"] = None
                view["why"] = (
                    "not looked up or stored: only GET and HEAD are; a 2xx/3xx answer to an unsafe "
                    "method invalidates the URL and its same-origin Location/Content-Location (RFC 9111 §4.4)"
                )
            else:
                view.update(summary)
            out.append(view)
        return json.dumps(out, indent=1, ensure_ascii=False)

    @command.command("cache.inspect")
    def inspect(self, url: str) -> str:
        """The stored variants of a URL with their metadata (no bodies), as JSON: what this
        proxy's L1 holds now, and what Valkey held when last asked (each call asks again in
        the background: commands cannot wait for I/O without stalling the proxy)."""
        store, now = self.service.store, time.time()
        views = []
        for key in self._keys(url, include_given=False):
            view: dict[str, object] = {"key": key, "l1": _resource_view(store.peek(key, now), now)}
            if store.has_l2:
                view["l2"] = self._l2_views.get(key, "pending: run cache.inspect again")
                spawn(self._read_l2(key), "inspect Valkey")
            views.append(view)
        return json.dumps({"url": url, "keys": views}, indent=1, ensure_ascii=False)

    async def _read_l2(self, key: str) -> None:
        resource = await self.service.store.peek_l2(key)
        self._l2_views[key] = _resource_view(resource, time.time())
        if len(self._l2_views) > 100:
            self._l2_views.pop(next(iter(self._l2_views)))
