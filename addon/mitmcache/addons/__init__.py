"""The cache's mitmproxy addons, composed like mitmproxy's ``default_addons()``.

Each small addon owns its options, ``configure`` and commands; only ``HttpCache`` has the
``request``/``response``/``error`` hooks. They share one ``CacheService`` under one
``MitmCache`` container.

Why the container hands the lifecycle events on itself: mitmproxy walks every nested addon
(``addons`` attribute) for every event — eight per request — so six nested addons cost the hit
path ~3 % of throughput (measured with ``scripts/bench.py --before``). Only
``HttpCache``, which has the per-request hooks, is nested; the others get ``load``,
``configure``, ``running`` and ``done`` from the container, in the order below, and their
commands are registered with mitmproxy's command manager at ``load``.
"""

from __future__ import annotations

from typing import Any

from ..service import CacheService
from .admin import Admin
from .http_cache import HttpCache
from .policies import Policies
from .replay import Replay
from .purge import Purge
from .revalidation import Revalidation
from .storage import Storage
from .tracing import Tracing


def default_addons(service: CacheService) -> list[Any]:
    """The cache's addons in lifecycle order (``Admin`` last: it checks every ``cache_*``
    option is declared)."""
    http_cache = HttpCache(service)
    http_cache.replay = Replay(service)  # asked by the request hook after PURGE (record and replay)
    purge = Purge(service)
    http_cache.purge = purge.http  # PURGE requests are answered by the Purge addon
    return [
        Storage(service), Revalidation(service), Policies(service), Tracing(service), purge, http_cache.replay,
        http_cache, Admin(service, http_cache),
    ]


class MitmCache:
    """The container ``mitmdump -s addon/mitmcache_addon.py`` loads."""

    name = "mitmcache"

    def __init__(self, service: CacheService | None = None) -> None:
        self.service = service or CacheService()
        self.all = default_addons(self.service)
        self.http_cache = next(a for a in self.all if isinstance(a, HttpCache))
        self.addons = [self.http_cache]  # what mitmproxy walks on every event
        self._lifecycle = [a for a in self.all if a is not self.http_cache]

    def load(self, loader: Any) -> None:
        for addon in self._lifecycle:
            addon.load(loader)
            loader.master.commands.collect_commands(addon)

    def configure(self, updated: set[str]) -> None:
        for addon in self._lifecycle:
            addon.configure(updated)

    def running(self) -> None:
        for addon in self._lifecycle:
            if hasattr(addon, "running"):
                addon.running()

    def done(self) -> None:
        for addon in self._lifecycle:
            if hasattr(addon, "done"):
                addon.done()
