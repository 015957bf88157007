"""Storage addon: L1 budget, object size limit, heuristic cap, and the Valkey ring (L2)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import time

from mitmproxy import ctx, exceptions

from .. import semantics as sem
from ..ring import ValkeyURLError, parse_valkey_urls
from ..service import CacheService
from ..valkey_tier import ValkeyTier
from .config import at_least, parse_size, reject_unparsable, report_option_errors, spawn

log = logging.getLogger("mitmcache")

PURGE_INTERVAL = 10.0  # seconds between sweeps of expired L1 entries
L2_OPTIONS = {
    "cache_valkey_urls", "cache_key_prefix", "cache_valkey_timeout_ms", "cache_valkey_tls_ca", "cache_l1_invalidation",
}
# With invalidation listeners an L1 copy is dropped within milliseconds of any change in Valkey;
# the TTL only bounds the damage of an invalidation lost on a connection that still answers PING.
DEFAULT_L1_TTL = 600
INT_OPTIONS = ("cache_heuristic_max", "cache_l1_ttl", "cache_valkey_timeout_ms", "cache_l1_fallback_ttl")


class Storage:
    """Owns the store's options; builds the L2 tier; sweeps L1; reports the ring at start-up."""

    name = "mitmcache.storage"

    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.l1_max_bytes = 268435456
        self._purge_task: asyncio.Task[None] | None = None

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "cache_l1_max_bytes", str, "256m",
            "L1 budget (bytes, or 256k/256m/1g): everything an entry costs, not just its body.",
        )
        loader.add_option(
            "cache_max_object_bytes", str, "10m",
            "Responses with larger bodies (bytes, or 512k/10m/1g) pass through and are not stored.",
        )
        loader.add_option(
            "cache_heuristic_max", int, 86400,
            "Upper bound in seconds for heuristic freshness (10% of Date - Last-Modified).",
        )
        loader.add_option(
            "cache_targeted_cc", str, "Mitmcache-Cache-Control",
            "Targeted Cache-Control field for this cache (RFC 9213): takes precedence over "
            "CDN-Cache-Control, which takes precedence over Cache-Control and Expires. Empty: none.",
        )
        loader.add_option(
            "cache_valkey_urls", str, "",
            "Comma-separated valkey://[user:password@]host:port[/db] or valkeys:// (TLS) URLs, "
            "one per ring node. Empty: L1 only.",
        )
        loader.add_option(
            "cache_l1_ttl", int, DEFAULT_L1_TTL,
            "Seconds an entry may live in L1 when Valkey is configured (near-cache backstop); "
            "0 = L1 only as fallback.",
        )
        loader.add_option(
            "cache_l1_invalidation", bool, True,
            "Keep L1 coherent with Valkey: one invalidation listener per node (CLIENT TRACKING "
            "BCAST) drops L1 copies of keys changed anywhere. Off: copies live up to cache_l1_ttl.",
        )
        loader.add_option(
            "cache_l1_fallback_ttl", int, 5,
            "Seconds L1 keeps a response Valkey could not take while its node's invalidation "
            "listener is down too (0 = none: every request for that node's keys goes to the origin).",
        )
        loader.add_option("cache_key_prefix", str, "mitmcache", "Namespace of every key written to Valkey.")
        loader.add_option(
            "cache_valkey_tls_ca", str, "",
            "CA bundle (PEM file) to verify valkeys:// nodes with; empty: the system's CAs.",
        )
        loader.add_option(
            "cache_valkey_timeout_ms", int, 250,
            "Timeout of one Valkey operation in milliseconds; a slower node counts as failing.",
        )
        reject_unparsable(loader, (*INT_OPTIONS, "cache_l1_invalidation"))

    @report_option_errors
    def configure(self, updated: set[str]) -> None:
        opts, service = ctx.options, self.service
        settings = service.settings
        if "cache_l1_max_bytes" in updated:
            self.l1_max_bytes = parse_size("cache_l1_max_bytes", opts.cache_l1_max_bytes, minimum=1)
            service.store.resize(self.l1_max_bytes)
        if "cache_max_object_bytes" in updated:
            settings = dataclasses.replace(
                settings, max_object_bytes=parse_size("cache_max_object_bytes", opts.cache_max_object_bytes)
            )
        if "cache_targeted_cc" in updated:
            name = opts.cache_targeted_cc.strip().lower()
            if name and not re.fullmatch(r"[a-z0-9!#$%&'*+\-.^_`|~]+", name):
                raise exceptions.OptionsError(f"cache_targeted_cc: not a field name: {opts.cache_targeted_cc!r}")
            targets = (name, sem.CDN_CACHE_CONTROL) if name and name != sem.CDN_CACHE_CONTROL else (sem.CDN_CACHE_CONTROL,)
            settings = dataclasses.replace(settings, targets=targets)
        if "cache_heuristic_max" in updated:
            settings = dataclasses.replace(settings, heuristic_cap=float(at_least("cache_heuristic_max", 0)))
        service.settings = settings
        if "cache_l1_ttl" in updated:
            service.store.set_l1_ttl(float(at_least("cache_l1_ttl", 0)))
        if "cache_l1_fallback_ttl" in updated:
            service.store.l1_fallback_ttl = float(at_least("cache_l1_fallback_ttl", 0))
        if updated & L2_OPTIONS:
            self._configure_l2()

    def _configure_l2(self) -> None:
        opts = ctx.options
        timeout_ms = at_least("cache_valkey_timeout_ms", 1)
        if not opts.cache_key_prefix.strip():
            raise exceptions.OptionsError("cache_key_prefix: must not be empty")
        if opts.cache_valkey_tls_ca and not os.path.isfile(opts.cache_valkey_tls_ca):
            raise exceptions.OptionsError(f"cache_valkey_tls_ca: no such file: {opts.cache_valkey_tls_ca}")
        try:
            nodes = parse_valkey_urls(opts.cache_valkey_urls)
        except ValkeyURLError as e:
            raise exceptions.OptionsError(f"cache_valkey_urls: {e}") from None
        store, metrics = self.service.store, self.service.metrics
        store.set_coherence(opts.cache_l1_invalidation)
        tier = None
        if nodes:
            tier = ValkeyTier(
                nodes, opts.cache_key_prefix, timeout_ms, metrics, store.forget_node,
                tls_ca=opts.cache_valkey_tls_ca or None,
            )
            log.info(f"mitmcache: L2 ring of {len(nodes)} Valkey node(s): {', '.join(n.name for n in nodes)}")
        else:
            metrics.ring_members.labels("up").set(0)
            metrics.ring_members.labels("down").set(0)
        old = store.attach_l2(tier)
        if old is not None:
            spawn(old.close(), "close old Valkey clients")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # start-up: running() starts the listeners
        store.start_coherence()

    def running(self) -> None:
        # Sync on purpose: an async running breaks live reload (mitmproxy-notes A3).
        if self._purge_task is None or self._purge_task.done():
            self._purge_task = spawn(self._purge_loop(), "L1 expiry sweep")
        self.service.store.start_coherence()
        spawn(self._report_ready(), "start-up report")

    def done(self) -> None:
        # Sync on purpose (mitmproxy-notes A3); closing Valkey clients is scheduled.
        if self._purge_task is not None:
            self._purge_task.cancel()
            self._purge_task = None
        old = self.service.store.attach_l2(None)
        if old is not None:
            spawn(old.close(), "close Valkey clients")

    async def _report_ready(self) -> None:
        """One start-up line; nodes that do not answer now are named (and marked down) now,
        not after three failed requests."""
        service = self.service
        answers = await service.store.check_l2()
        for name, error in answers.items():
            if error is not None:
                log.warning(f"mitmcache: Valkey node {name} does not answer at start-up ({error}); "
                            "its keys are served from L1 and the origin until it does")
        up = sum(1 for e in answers.values() if e is None)
        l2 = f"L2 ring {up}/{len(answers)} Valkey nodes up" if answers else "no L2 (L1 only)"
        settings = service.settings
        log.info(
            f"mitmcache: ready: L1 {self.l1_max_bytes / 2**20:.0f} MiB, {l2}, objects up to "
            f"{settings.max_object_bytes / 2**20:.1f} MiB, {service.revalidator.worker_count} revalidation workers"
        )
        if settings.max_object_bytes > self.l1_max_bytes:
            log.warning("mitmcache: cache_max_object_bytes exceeds cache_l1_max_bytes: the largest objects never fit L1")

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            await self.service.store.purge_expired(time.time())
