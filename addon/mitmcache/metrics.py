"""Prometheus metrics under the spec's names (prefix ``mitmcache_``).

Each addon instance owns its own registry, so live reloads and tests never collide with
prometheus-client's global default registry.

Every documented label value of a counter, histogram and gauge with a known set of labels is
created at start-up, so each exports a zero sample before its first event (dashboards show 0
instead of "no data", and ``rate()``/``increase()`` see the first increment). The label values
live in the tuples below, shared by the code and the tests. ``valkey_errors_total{node,op}`` is
the exception: its nodes are only known when the ring is configured.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from .semantics import NotStorable

# The *_created series double every counter on the page and nobody graphs them.
disable_created_metrics()

# The documented label values (README, "Metrics" and "Telling what happened").
REQUEST_RESULTS = ("hit", "miss", "stale", "revalidated")
REVALIDATION_OUTCOMES = ("304", "200", "error", "skipped")
STORE_TIERS = ("l1", "l2")
BAD_INPUT_KINDS = ("cache-control", "date", "expires", "last-modified", "age", "valkey-value", "304-mismatch")
# Every Cache-Status reason for not storing (NotStorable), plus the addon's own "no-freshness"
# (an entry whose retention already ended) and "too-large-for-l1".
NOT_STORED_REASONS = tuple(
    dict.fromkeys([*(r.value for r in NotStorable), "no-freshness", "too-large-for-l1", "l2-down"])
)
VALKEY_OPS = ("get", "set", "delete", "lease", "release", "poll", "index")
RING_STATES = ("up", "down")
HIT_FOR_PASS_EVENTS = ("marked", "passed", "ended")
# Near-cache coherence and purge (coherence.py, purge.py).
INVALIDATION_DROP_CAUSES = ("key", "flush")  # one key invalidated / every key of a node whose listener was lost
PURGE_KINDS = ("url", "tag", "prefix")
PURGE_MODES = ("hard", "soft")
INDEX_KINDS = ("tag", "host")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mitmcache_requests", "GET/HEAD requests handled by the cache, by result.", ["result"], registry=r
        )
        self.l1_hits = Counter("mitmcache_l1_hits", "Lookups answered by the in-process L1.", registry=r)
        self.stores = Counter("mitmcache_stores", "Responses stored, by tier.", ["tier"], registry=r)
        self.not_stored = Counter(
            "mitmcache_not_stored", "Responses to GET not stored, by reason.", ["reason"], registry=r
        )
        self.invalidations = Counter(
            "mitmcache_invalidations", "Cache keys invalidated (unsafe methods, purge).", registry=r
        )
        self.revalidations = Counter(
            "mitmcache_revalidations",
            "Revalidations of stored responses, by outcome (304, 200, error, skipped).",
            ["outcome"],
            registry=r,
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
        # L2 (Valkey)
        self.l2_hits = Counter("mitmcache_l2_hits", "Lookups answered by Valkey (L1 missed).", registry=r)
        self.valkey_miss = Counter(
            "mitmcache_valkey_miss", "Lookups Valkey answered with no entry (a clean miss).", registry=r
        )
        self.valkey_get_fallback = Counter(
            "mitmcache_valkey_get_fallback", "Lookups that could not use Valkey and fell back to L1.", registry=r
        )
        self.valkey_set_fallback = Counter(
            "mitmcache_valkey_set_fallback", "Stores that could not reach Valkey and went to L1 only.", registry=r
        )
        self.valkey_decode_errors = Counter(
            "mitmcache_valkey_decode_errors", "Valkey values that failed to decode (treated as a miss).", registry=r
        )
        self.valkey_errors = Counter(
            "mitmcache_valkey_errors", "Failed Valkey operations, by node and operation.", ["node", "op"], registry=r
        )
        self.valkey_op_seconds = Histogram(
            "mitmcache_valkey_op_seconds",
            "Latency of Valkey operations.",
            ["op"],
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.ring_members = Gauge("mitmcache_ring_members", "Valkey ring nodes by state.", ["state"], registry=r)
        self.ring_state_changes = Counter(
            "mitmcache_ring_state_changes", "Valkey nodes marked down or back up.", registry=r
        )
        # Coalescing and revalidation (spec §5)
        self.coalesced = Counter(
            "mitmcache_coalesced", "Requests that waited for another request's fetch of the same key.", registry=r
        )
        self.lease_waits = Counter(
            "mitmcache_lease_waits", "Fills this proxy waited for because another proxy held the lease.", registry=r
        )
        self.lease_timeouts = Counter(
            "mitmcache_lease_timeouts", "Lease waits that ended without the entry appearing in time.", registry=r
        )
        self.reval_dropped = Counter(
            "mitmcache_reval_dropped", "Background revalidations dropped because the queue was full.", registry=r
        )
        self.reval_duplicates = Counter(
            "mitmcache_reval_duplicates", "Background revalidations not queued: one was already pending.", registry=r
        )
        self.reval_queue_depth = Gauge("mitmcache_reval_queue_depth", "Background revalidations waiting.", registry=r)
        self.reval_seconds = Histogram(
            "mitmcache_reval_seconds", "Duration of revalidation requests to the origin.", registry=r
        )
        self.stale_if_error = Counter(
            "mitmcache_stale_if_error", "Stale responses served because the origin failed (RFC 5861 §4).", registry=r
        )
        self.hit_for_pass = Counter(
            "mitmcache_hit_for_pass",
            "Hit-for-pass markers set (marked), requests sent straight upstream by one (passed), "
            "markers ended by a storable answer (ended).",
            ["event"],
            registry=r,
        )
        # Near-cache coherence (coherence.py)
        self.invalidations_received = Counter(
            "mitmcache_l1_invalidations_received",
            "Key invalidations received from Valkey (CLIENT TRACKING), own writes' echoes included.", registry=r,
        )
        self.invalidation_drops = Counter(
            "mitmcache_l1_invalidation_drops",
            "L1 entries dropped by invalidations (key) or because a node's listener was lost or restored (flush).",
            ["cause"], registry=r,
        )
        self.listener_reconnects = Counter(
            "mitmcache_invalidation_listener_reconnects", "Invalidation listeners subscribed again after a loss.",
            registry=r,
        )
        self.listener_flushes = Counter(
            "mitmcache_invalidation_listener_flushes",
            "Times every L1 entry of one node was dropped (listener lost, restored, or node flushed).", registry=r,
        )
        self.invalidation_delay = Histogram(
            "mitmcache_invalidation_delay_seconds",
            "From sending a write to Valkey to receiving its invalidation (the channel every proxy hears).",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.listeners = Gauge(
            "mitmcache_invalidation_listeners", "Invalidation listeners by state (up: subscribed).", ["state"],
            registry=r,
        )
        self.origin_timeouts = Counter(
            "mitmcache_origin_timeouts",
            "Forwarded requests leading a fetch whose origin gave no response headers within"
            " cache_origin_timeout_ms (answered 504 or stale).", registry=r,
        )
        # Purge (purge.py)
        self.purges = Counter(
            "mitmcache_purges", "Purges (HTTP PURGE and commands), by kind and mode.", ["kind", "mode"], registry=r
        )
        self.purged_keys = Counter(
            "mitmcache_purged_keys", "Cache keys removed or marked stale by purges, by kind.", ["kind"], registry=r
        )
        self.purge_denied = Counter(
            "mitmcache_purge_denied", "PURGE requests refused (address not allowed, or token missing/wrong).",
            registry=r,
        )
        self.index_full = Counter(
            "mitmcache_index_full",
            "Entries not recorded in a full purge index (a tag or a host with too many URLs).", ["index"], registry=r,
        )
        for kind in PURGE_KINDS:
            self.purged_keys.labels(kind)
            for mode in PURGE_MODES:
                self.purges.labels(kind, mode)
        for metric, values in (
            (self.invalidation_drops, INVALIDATION_DROP_CAUSES),
            (self.listeners, RING_STATES),
            (self.index_full, INDEX_KINDS),
            (self.requests, REQUEST_RESULTS),
            (self.hit_for_pass, HIT_FOR_PASS_EVENTS),
            (self.not_stored, NOT_STORED_REASONS),
            (self.revalidations, REVALIDATION_OUTCOMES),
            (self.stores, STORE_TIERS),
            (self.bad_input, BAD_INPUT_KINDS),
            (self.valkey_op_seconds, VALKEY_OPS),
            (self.ring_members, RING_STATES),
        ):
            for value in values:
                metric.labels(value)  # a zero sample from start-up
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
