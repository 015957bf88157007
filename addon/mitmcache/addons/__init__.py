"""The cache's mitmproxy addons, composed like mitmproxy's ``default_addons()``.

Each small addon owns its options, ``configure`` and commands; only ``HttpCache`` has the
``request``/``response``/``error`` hooks. They share one ``CacheService`` and sit nested under
one ``MitmCache`` container, so mitmproxy walks one chain entry per hook.
"""

from __future__ import annotations

from ..service import CacheService
from .admin import Admin
from .http_cache import HttpCache
from .policies import Policies
from .revalidation import Revalidation
from .storage import Storage
from .tracing import Tracing


def default_addons(service: CacheService) -> list[object]:
    http_cache = HttpCache(service)
    return [
        Storage(service), Revalidation(service), Policies(service), Tracing(service), http_cache,
        Admin(service, http_cache),
    ]


class MitmCache:
    """The container ``mitmdump -s addon/mitmcache_addon.py`` loads."""

    def __init__(self, service: CacheService | None = None) -> None:
        self.service = service or CacheService()
        self.addons = default_addons(self.service)
