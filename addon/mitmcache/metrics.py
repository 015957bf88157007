"""Prometheus metrics under the spec's names (prefix ``mitmcache_``).

Each addon instance owns its own registry, so live reloads and tests never collide with
prometheus-client's global default registry.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mitmcache_requests", "GET/HEAD requests handled by the cache, by result.", ["result"], registry=r
        )
        for result in ("hit", "miss", "stale"):
            self.requests.labels(result)
        self.l1_hits = Counter("mitmcache_l1_hits", "Lookups answered by the in-process L1.", registry=r)
        self.stores = Counter("mitmcache_stores", "Responses stored, by tier.", ["tier"], registry=r)
        self.not_stored = Counter(
            "mitmcache_not_stored", "Responses to GET not stored, by reason.", ["reason"], registry=r
        )
        self.invalidations = Counter(
            "mitmcache_invalidations", "Cache keys invalidated (unsafe methods, purge).", registry=r
        )
        self.revalidations = Counter(
            "mitmcache_revalidations", "Conditional requests sent to the origin, by outcome.", ["outcome"], registry=r
        )
        self.lru_evictions = Counter(
            "mitmcache_lru_eviction", "L1 entries evicted to stay within cache_l1_max_bytes.", registry=r
        )
        self.lru_oversized = Counter(
            "mitmcache_lru_oversized", "Entries refused by L1 because they alone exceed its budget.", registry=r
        )
        self.lru_bytes = Gauge("mitmcache_lru_bytes", "Bytes held by L1 (entries and overhead).", registry=r)
        self.lru_entries = Gauge("mitmcache_lru_entries", "Cached URLs held by L1.", registry=r)
        self.bad_input = Counter(
            "mitmcache_bad_input", "Malformed input ignored by the cache, by kind.", ["kind"], registry=r
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def serve(self, port: int) -> None:
        """(Re)start the scrape endpoint on 127.0.0.1:port; 0 stops it. Raises OSError."""
        if port == self.port:
            return
        self.stop()
        if port:
            self._server, self._thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self.port = port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._server = self._thread = None
        self.port = 0
