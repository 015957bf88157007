"""Revalidation addon: background workers, the cache's own origin client, coalescing bounds."""

from __future__ import annotations

import dataclasses

from mitmproxy import ctx, exceptions

from ..origin_client import OriginClient, tls_verification
from ..service import MAX_PASS_SECONDS, CacheService
from .config import at_least, reject_unparsable, report_option_errors, spawn

# mitmproxy's own TLS options that the cache's origin client follows.
TLS_OPTIONS = {"ssl_insecure", "ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir"}
INT_OPTIONS = (
    "cache_revalidate_workers", "cache_revalidate_queue", "cache_coalesce_wait_ms", "cache_lease_ms",
    "cache_origin_timeout_ms", "cache_hit_for_pass",
)


class Revalidation:
    """Owns revalidation and origin-protection options (RFC 5861, coalescing, fill leases)."""

    name = "mitmcache.revalidation"

    def __init__(self, service: CacheService) -> None:
        self.service = service

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "cache_revalidate_workers", int, 4, "Background revalidation workers (stale-while-revalidate)."
        )
        loader.add_option(
            "cache_revalidate_queue", int, 256,
            "Background revalidations that may wait; more are dropped and counted (reval_dropped).",
        )
        loader.add_option(
            "cache_coalesce_wait_ms", int, 15000,
            "How long a request waits for another request's fetch of the same key before going alone.",
        )
        loader.add_option(
            "cache_lease_ms", int, 5000,
            "Lifetime of a key's fill lease in Valkey: how long other proxies wait for one fetch.",
        )
        loader.add_option(
            "cache_origin_timeout_ms", int, 10000,
            "How long the origin may take: the cache's own requests (revalidation, stale-if-error), and "
            "the response headers of a forwarded request leading a fetch (then 504); its waiters share it.",
        )
        loader.add_option(
            "cache_hit_for_pass", int, 10,
            "Seconds a URL whose answer could not be stored or shared (no-store, private, Set-Cookie, "
            "Vary: *, too large, no freshness) goes straight upstream, when the answer names no "
            "max-age (at most 300): no lookup, no waiting for another request. 0 = off.",
        )
        reject_unparsable(loader, INT_OPTIONS)

    @report_option_errors
    def configure(self, updated: set[str]) -> None:
        service = self.service
        values = {name: at_least(name, 0 if name == "cache_hit_for_pass" else 1) for name in INT_OPTIONS if name in updated}
        if "cache_hit_for_pass" in updated:
            if ctx.options.cache_hit_for_pass > MAX_PASS_SECONDS:
                raise exceptions.OptionsError(
                    f"cache_hit_for_pass: at most {MAX_PASS_SECONDS:g} seconds, not {ctx.options.cache_hit_for_pass}"
                )
            service.settings = dataclasses.replace(service.settings, hit_for_pass=float(ctx.options.cache_hit_for_pass))
        if values.keys() & {"cache_coalesce_wait_ms", "cache_lease_ms", "cache_origin_timeout_ms"}:
            service.settings = dataclasses.replace(
                service.settings,
                coalesce_wait=ctx.options.cache_coalesce_wait_ms / 1000,
                lease_ms=ctx.options.cache_lease_ms,
                origin_timeout=ctx.options.cache_origin_timeout_ms / 1000,
            )
        if updated & ({"cache_revalidate_workers", "cache_revalidate_queue", "cache_origin_timeout_ms"} | TLS_OPTIONS):
            opts = ctx.options
            client = OriginClient(
                tls_verification(
                    getattr(opts, "ssl_insecure", False),
                    getattr(opts, "ssl_verify_upstream_trusted_ca", None),
                    getattr(opts, "ssl_verify_upstream_trusted_confdir", None),
                ),
                opts.cache_origin_timeout_ms / 1000,
            )
            old = service.revalidator.configure(opts.cache_revalidate_workers, opts.cache_revalidate_queue, client)
            if old is not None:
                spawn(old.aclose(), "close old origin client")

    def done(self) -> None:
        revalidator = self.service.revalidator
        old = revalidator.configure(revalidator.worker_count, revalidator.queue_size, None)
        if old is not None:
            spawn(old.aclose(), "close origin client")
