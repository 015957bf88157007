"""mitmproxy glue: options, hooks, commands. HTTP rules live in ``semantics``.

Flow of one GET/HEAD:
  request hook  → key → store lookup → select variant (Vary) → decide (fresh/stale/revalidate)
                → short-circuit with the stored response, or forward (adding validators)
  response hook → 304 merge, or store the upstream response if RFC 9111 allows it
Unsafe methods invalidate in the response hook (RFC 9111 §4.4).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
import weakref
from dataclasses import dataclass, field

from mitmproxy import command, ctx, exceptions, http

from . import responses
from . import semantics as sem
from .coalesce import Coalescer, Flight, Outcome
from .metrics import Metrics
from .origin_client import OriginClient, OriginError, tls_verification
from .revalidate import Job, Revalidator
from .ring import ValkeyURLError, parse_valkey_urls
from .semantics import CacheStatus, StoredResponse, Use
from .store import Lease, Lookup, Resource, TieredStore
from .valkey_tier import ValkeyTier

log = logging.getLogger("mitmcache")

METADATA_KEY = "mitmcache"
PURGE_INTERVAL = 10.0
BAD_INPUT_LOG_INTERVAL = 60.0
# What the stale-if-error path reads of an origin answer it hands to the client unstored.
FOREGROUND_MAX_BODY = 1 << 30
# mitmproxy's own TLS options that the cache's origin client follows.
TLS_OPTIONS = {"ssl_insecure", "ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir"}


@dataclass(slots=True)
class FlowState:
    """What the request hook decided, for the response hook.

    Kept beside the flow (a weak mapping), not in ``flow.metadata``: metadata is written to
    flow files (``-w``) and this holds live objects. The metadata gets a plain summary.
    """

    key: str
    method: str
    served: bool = False  # answered from cache in the request hook
    resource: Resource | None = None  # what the lookup found (other variants to keep)
    store_allowed: bool = True
    revalidating: StoredResponse | None = None
    # The request as the client sent it, read once: Vary matching, the client's own
    # conditionals, revalidation jobs. flow.request later carries the validators we add.
    request_headers: tuple[tuple[str, str], ...] = ()
    wants_range: bool = False  # a Range request: served from a usable entry, else passed through
    forwarded_at: float | None = None  # when the request hook let the request go upstream
    flight: Flight | None = None  # set while this flow leads the fetch of its key
    lease_token: str | None = None  # set while this flow holds the key's fill lease
    status: CacheStatus = field(default_factory=CacheStatus)


def _headers(message: http.Message) -> list[tuple[str, str]]:
    return [(k, v) for k, v in message.headers.items(multi=True)]


def _request_time(flow: http.HTTPFlow, state: FlowState, now: float) -> float:
    """RFC 9111 §4.2.3 request_time: when the request went upstream (see FlowState.forwarded_at)."""
    return state.forwarded_at or flow.request.timestamp_start or now


def _heuristic_cap() -> float:
    return float(ctx.options.cache_heuristic_max)


def _split_host_port(authority: str) -> tuple[str, int | None]:
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


class MitmCache:
    """A shared HTTP cache (RFC 9111) for mitmproxy."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.store = TieredStore(self.metrics, 268435456)
        self._purge_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[object]] = set()
        self._bad_input_logged: dict[str, float] = {}
        self._states: weakref.WeakKeyDictionary[http.HTTPFlow, FlowState] = weakref.WeakKeyDictionary()
        self.coalescer = Coalescer()
        self.revalidator = Revalidator(self.store, self.metrics, self._revalidation_settings)

    def _revalidation_settings(self) -> tuple[int, int, float]:
        opts = ctx.options
        return opts.cache_max_object_bytes, opts.cache_lease_ms, _heuristic_cap()

    # ------------------------------------------------------------------ lifecycle

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "cache_l1_max_bytes", int, 268435456,
            "L1 budget in bytes: everything an entry costs, not just its body.",
        )
        loader.add_option(
            "cache_max_object_bytes", int, 10485760,
            "Responses with larger bodies pass through and are not stored.",
        )
        loader.add_option(
            "cache_metrics_port", int, 0,
            "Serve Prometheus metrics on 127.0.0.1:PORT (0 = off).",
        )
        loader.add_option(
            "cache_heuristic_max", int, 86400,
            "Upper bound in seconds for heuristic freshness (10% of Date - Last-Modified).",
        )
        loader.add_option(
            "cache_valkey_urls", str, "",
            "Comma-separated valkey://[user:password@]host:port[/db] or valkeys:// (TLS) URLs, "
            "one per ring node. Empty: L1 only.",
        )
        loader.add_option(
            "cache_l1_ttl", int, 60,
            "Seconds an entry may live in L1 when Valkey is configured (near-cache bound); "
            "0 = L1 only as fallback.",
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
            "Timeout of the cache's own requests to the origin (revalidation, stale-if-error).",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "cache_l1_max_bytes" in updated:
            if opts.cache_l1_max_bytes < 1:
                raise exceptions.OptionsError("cache_l1_max_bytes must be a positive number of bytes")
            self.store.resize(opts.cache_l1_max_bytes)
        if "cache_max_object_bytes" in updated and opts.cache_max_object_bytes < 0:
            raise exceptions.OptionsError("cache_max_object_bytes must be >= 0")
        if "cache_heuristic_max" in updated and opts.cache_heuristic_max < 0:
            raise exceptions.OptionsError("cache_heuristic_max must be >= 0 seconds")
        if "cache_l1_ttl" in updated:
            if opts.cache_l1_ttl < 0:
                raise exceptions.OptionsError("cache_l1_ttl must be >= 0 seconds")
            self.store.l1_ttl = float(opts.cache_l1_ttl)
        if "cache_valkey_timeout_ms" in updated and opts.cache_valkey_timeout_ms < 1:
            raise exceptions.OptionsError("cache_valkey_timeout_ms must be >= 1")
        if "cache_key_prefix" in updated and not opts.cache_key_prefix.strip():
            raise exceptions.OptionsError("cache_key_prefix must not be empty")
        if "cache_valkey_tls_ca" in updated and opts.cache_valkey_tls_ca:
            if not os.path.isfile(opts.cache_valkey_tls_ca):
                raise exceptions.OptionsError(f"cache_valkey_tls_ca: no such file: {opts.cache_valkey_tls_ca}")
        if updated & {"cache_valkey_urls", "cache_key_prefix", "cache_valkey_timeout_ms", "cache_valkey_tls_ca"}:
            self._configure_l2()
        for name in ("cache_revalidate_workers", "cache_revalidate_queue", "cache_coalesce_wait_ms",
                     "cache_lease_ms", "cache_origin_timeout_ms"):
            if name in updated and getattr(opts, name) < 1:
                raise exceptions.OptionsError(f"{name} must be >= 1")
        if updated & ({"cache_revalidate_workers", "cache_revalidate_queue", "cache_origin_timeout_ms"} | TLS_OPTIONS):
            self._configure_revalidation()
        if "cache_metrics_port" in updated:
            port = opts.cache_metrics_port
            if not 0 <= port <= 65535:
                raise exceptions.OptionsError(f"cache_metrics_port must be 0..65535, not {port}")
            try:
                self.metrics.serve(port)
            except OSError as e:
                raise exceptions.OptionsError(f"cache_metrics_port: cannot listen on 127.0.0.1:{port}: {e}") from e
            if port:
                log.info(f"mitmcache: metrics on http://127.0.0.1:{port}/metrics")
        # mitmproxy-notes §0.4: with the default eager strategy a HIT cannot be served while
        # the origin is down (the client connection is closed first). A cache needs lazy.
        if "connection_strategy" in updated and getattr(opts, "connection_strategy", "lazy") != "lazy":
            log.warning("mitmcache: setting connection_strategy=lazy so hits are served without the origin")
            opts.update(connection_strategy="lazy")

    def _configure_l2(self) -> None:
        opts = ctx.options
        try:
            nodes = parse_valkey_urls(opts.cache_valkey_urls)
        except ValkeyURLError as e:
            raise exceptions.OptionsError(f"cache_valkey_urls: {e}") from None
        old, self.store.l2 = self.store.l2, None
        if old is not None:
            self._spawn(old.close())
        if nodes:
            self.store.l2 = ValkeyTier(
                nodes,
                opts.cache_key_prefix,
                opts.cache_valkey_timeout_ms,
                self.metrics,
                self.store.forget_node,
                tls_ca=opts.cache_valkey_tls_ca or None,
            )
            log.info(f"mitmcache: L2 ring of {len(nodes)} Valkey nodes: {', '.join(n.name for n in nodes)}")
        else:
            self.metrics.ring_members.labels("up").set(0)
            self.metrics.ring_members.labels("down").set(0)

    def _configure_revalidation(self) -> None:
        opts = ctx.options
        old = self.revalidator.client
        client = OriginClient(
            tls_verification(
                getattr(opts, "ssl_insecure", False),
                getattr(opts, "ssl_verify_upstream_trusted_ca", None),
                getattr(opts, "ssl_verify_upstream_trusted_confdir", None),
            ),
            opts.cache_origin_timeout_ms / 1000,
        )
        self.revalidator.configure(opts.cache_revalidate_workers, opts.cache_revalidate_queue, client)
        if old is not None:
            self._spawn(old.aclose())

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        """Run a coroutine in the background (keeping a reference so it is not collected)."""
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def running(self) -> None:
        # Sync on purpose: an async running breaks live reload (mitmproxy-notes A3).
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._purge_task is None or self._purge_task.done():
            self._purge_task = loop.create_task(self._purge_loop())
        opts = ctx.options
        l2 = f"L2 ring of {len(self.store.l2.nodes)} Valkey nodes" if self.store.l2 else "no L2 (L1 only)"
        log.info(
            f"mitmcache: ready: L1 {opts.cache_l1_max_bytes / 2**20:.0f} MiB, {l2}, objects up to "
            f"{opts.cache_max_object_bytes / 2**20:.1f} MiB, {opts.cache_revalidate_workers} revalidation workers"
        )
        if opts.cache_max_object_bytes > opts.cache_l1_max_bytes:
            log.warning("mitmcache: cache_max_object_bytes exceeds cache_l1_max_bytes: the largest objects never fit L1")

    def done(self) -> None:
        # Sync on purpose (mitmproxy-notes A3); closing Valkey clients is scheduled if a loop runs.
        if self._purge_task is not None:
            self._purge_task.cancel()
            self._purge_task = None
        self.revalidator.stop()
        if self.revalidator.client is not None:
            self._spawn(self.revalidator.client.aclose())
            self.revalidator.client = None
        if self.store.l2 is not None:
            self._spawn(self.store.l2.close())
            self.store.l2 = None
        self.metrics.stop()

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            await self.store.purge_expired(time.time())

    # ------------------------------------------------------------------ keys

    def _key(self, req: http.Request) -> str:
        """Primary key from where the request really goes (scheme, host, port, path+query).

        If the Host header names another authority than the connection target, the origin may
        answer for that name, so it joins the key: an unkeyed header never poisons an entry.
        """
        key = sem.cache_key(req.scheme, req.host, req.port, req.path)
        host_header = req.host_header
        if host_header:
            h, p = _split_host_port(host_header)
            target = sem.normalize_authority(req.scheme, req.host, req.port)
            named = sem.normalize_authority(req.scheme, h, p if p is not None else sem.default_port(req.scheme))
            if named != target:
                key += f"\nhost={named}"  # a newline never occurs in a request target
        return key

    # ------------------------------------------------------------------ request

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return  # already answered by someone else
        req = flow.request
        method = req.method.upper()
        state = FlowState(key=self._key(req), method=method)
        self._states[flow] = state
        if method not in ("GET", "HEAD"):
            state.store_allowed = False
            return
        state.request_headers = tuple(_headers(req))
        state.wants_range = "range" in req.headers
        directives = sem.RequestDirectives.from_headers(state.request_headers)
        try:
            await self._lookup_and_decide(flow, state, directives)
            # RFC 9111 §4.2.3 request_time: when the request goes upstream, after any coalescing
            # or lease wait (counting those waits would make stored responses look older).
            state.forwarded_at = time.time()
        except BaseException:
            # Cancelled (e.g. the client left) or a bug: never leave waiters or a lease behind.
            await self._finish(state, Outcome.FAILED)
            raise

    async def _lookup_and_decide(self, flow: http.HTTPFlow, state: FlowState, directives: sem.RequestDirectives) -> None:
        now = time.time()
        lookup = await self.store.get(state.key, now)
        entry = sem.select_variant(lookup.resource.variants, state.request_headers) if lookup else None
        if lookup is not None and lookup.tier == "l1" and self.store.l2 is not None and entry is not None \
                and not entry.is_fresh(now):
            # A stale near-cache copy: L2 may hold a newer one (another proxy refreshed it).
            newer = await self.store.get(state.key, now, skip_l1=True)
            if newer is not None:
                lookup = newer
                entry = sem.select_variant(lookup.resource.variants, state.request_headers)
        stale = self._use_cached(flow, state, lookup, entry, directives, now)
        if flow.response is not None:
            return
        # The origin is needed. only-if-cached must never contact it (§5.2.1.7).
        if directives.only_if_cached:
            return self._only_if_cached_miss(flow, state)
        if state.wants_range:
            # Forwarded as it is: the origin answers the range; a 206 is never stored (§3.3),
            # a full 200 may be.
            state.status.detail.append("range")
            return
        if not (directives.no_cache or directives.no_store):
            if await self._coalesce(flow, state, directives):
                return
        if stale is None or state.method != "GET":
            return
        if stale.stale_if_error > 0 and not stale.never_serve_stale and self.revalidator.client is not None:
            # RFC 5861 §4 needs an answer even when the origin is unreachable, which mitmproxy's
            # forwarding cannot give (mitmproxy-notes §0.5): revalidate with our own client.
            return await self._refresh_in_foreground(flow, state, stale, directives)
        self._add_validators(flow, state, stale)

    def _use_cached(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        lookup: Lookup | None,
        entry: StoredResponse | None,
        directives: sem.RequestDirectives,
        now: float,
    ) -> StoredResponse | None:
        """Serve ``entry`` (this request's variant of ``lookup``) if usable (sets flow.response);
        else return it as a stale entry to revalidate."""
        state.resource = lookup.resource if lookup else None
        if entry is None:
            state.status.fwd = "vary-miss" if lookup else "uri-miss"
            return None
        assert lookup is not None
        state.status.detail.append(lookup.tier)
        decision = sem.decide(entry, directives, now, allow_background_revalidation=True)
        if decision.use is Use.FRESH:
            self._serve(flow, state, entry, now, "HIT")
        elif decision.use is Use.STALE_OK:
            state.status.detail.append("max-stale")
            self._serve(flow, state, entry, now, "STALE")
        elif decision.use is Use.STALE_WHILE_REVALIDATE:
            # RFC 5861 §3: serve now, revalidate in the background.
            state.status.fwd = "stale"
            state.status.detail.append("stale-while-revalidate")
            self._schedule_revalidation(flow, state, entry)
            self._serve(flow, state, entry, now, "STALE")
        else:
            state.status.fwd = "request" if decision.reason == "request" else "stale"
            return entry
        return None

    def _schedule_revalidation(self, flow: http.HTTPFlow, state: FlowState, entry: StoredResponse) -> None:
        # A HEAD can trigger it too: the GET entry is what gets refreshed.
        job = Job(state.key, flow.request.url, state.request_headers, entry)
        outcome = self.revalidator.enqueue(job)
        state.status.detail.append(f"reval-{outcome}")

    def _add_validators(self, flow: http.HTTPFlow, state: FlowState, stale: StoredResponse) -> None:
        """Forward a conditional request (§4.3.1) with the entry's validators in place of the
        client's; its own (kept in state.request_headers) are answered by us after the reply."""
        validators = sem.validators_for(stale)
        state.revalidating = stale
        if not validators:
            return
        req = flow.request
        for name in ("if-none-match", "if-modified-since"):
            req.headers.pop(name, None)
        for name, value in validators:
            req.headers[name] = value

    # ------------------------------------------------------------------ coalescing

    async def _coalesce(self, flow: http.HTTPFlow, state: FlowState, directives: sem.RequestDirectives) -> bool:
        """Wait for another request's fetch of this key, or lead one. True if answered."""
        wait = ctx.options.cache_coalesce_wait_ms / 1000
        for _ in range(3):
            flight = self.coalescer.current(state.key)
            if flight is None:
                if state.method != "GET":
                    return False  # a HEAD cannot fill the GET entry, so it never leads
                state.flight = self.coalescer.lead(state.key)
                return await self._lease(flow, state, directives)
            self.metrics.coalesced.inc()
            result = await self.coalescer.wait(flight, wait)
            if result is None:
                return False  # waited long enough: go alone
            outcome, resource = result
            if outcome is Outcome.FAILED:
                continue  # the leader failed or left: someone else leads now
            if resource is None or outcome is Outcome.NOT_SHAREABLE:
                return False
            entry = sem.select_variant(resource.variants, state.request_headers)
            if entry is None:
                continue  # another Vary variant was fetched: one of us leads the fetch of ours
            return self._serve_collapsed(flow, state, entry, directives, outcome, None)
        return False

    async def _lease(self, flow: http.HTTPFlow, state: FlowState, directives: sem.RequestDirectives) -> bool:
        """Across proxies: take the key's fill lease, or wait for the proxy that holds it."""
        if self.store.l2 is None:
            return False
        token = uuid.uuid4().hex
        lease_ms = ctx.options.cache_lease_ms
        lease = await self.store.acquire_lease(state.key, token, lease_ms)
        if lease is Lease.ACQUIRED:
            state.lease_token = token
            return False
        if lease is Lease.UNAVAILABLE:
            return False
        self.metrics.lease_waits.inc()
        resource, why = await self.store.wait_for_fill(state.key, lease_ms / 1000, known=state.resource)
        if why == "timeout":
            self.metrics.lease_timeouts.inc()
        entry = sem.select_variant(resource.variants, state.request_headers) if resource is not None else None
        if entry is not None and self._serve_collapsed(flow, state, entry, directives, Outcome.STORED, "lease-wait"):
            await self._finish(state, Outcome.STORED, resource)
            return True
        return False  # fetch ourselves; our local waiters keep waiting for us

    def _serve_collapsed(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        entry: StoredResponse,
        directives: sem.RequestDirectives,
        outcome: Outcome,
        detail: str | None,
    ) -> bool:
        """Answer from another request's fetch (``entry``: this request's variant of it)."""
        now = time.time()
        if outcome is Outcome.STALE_IF_ERROR:
            if not sem.may_serve_stale_if_error(entry, directives, now):
                return False
            state.status.fwd = "stale"
            state.status.detail += [d for d in (detail, "stale-if-error") if d]
            self.metrics.stale_if_error.inc()
            self._serve(flow, state, entry, now, "STALE", hit=False)
            return True
        if sem.decide(entry, directives, now).use is not Use.FRESH:
            return False  # e.g. no-cache: every use needs its own validation
        state.status.collapsed = True
        if detail:
            state.status.detail.append(detail)
        self._serve(flow, state, entry, now, "MISS", hit=False)
        return True

    async def _finish(self, state: FlowState, outcome: Outcome, resource: Resource | None = None) -> None:
        """Wake this flow's waiters and release its lease (idempotent)."""
        if state.flight is not None:
            self.coalescer.finish(state.key, state.flight, outcome, resource)
            state.flight = None
        if state.lease_token is not None:
            token, state.lease_token = state.lease_token, None
            await self.store.release_lease(state.key, token)

    # ------------------------------------------------------------------ stale-if-error path

    async def _refresh_in_foreground(
        self, flow: http.HTTPFlow, state: FlowState, stale: StoredResponse, directives: sem.RequestDirectives
    ) -> None:
        job = Job(state.key, flow.request.url, state.request_headers, stale)
        result = await self.revalidator.refresh(job, max_body=FOREGROUND_MAX_BODY)
        now = time.time()
        fetched = result.fetched
        if fetched is not None:
            state.status.fwd_status = fetched.status
        if result.entry is not None:
            resource = (state.resource or Resource(())).with_variant(result.entry)
            state.status.stored = True
            if result.outcome == "304":
                self._serve(flow, state, result.entry, now, "HIT", hit=False, metric="revalidated")
            else:
                self._serve(flow, state, result.entry, now, "MISS", hit=False)
            await self._finish(state, Outcome.STORED, resource)
            return
        if result.outcome == "error" and sem.may_serve_stale_if_error(stale, directives, now):
            state.status.detail.append("stale-if-error")
            self.metrics.stale_if_error.inc()
            self._serve(flow, state, stale, now, "STALE", hit=False)
            await self._finish(state, Outcome.STALE_IF_ERROR, state.resource)
            return
        # Hand the origin's own answer to the client (not stored), or a 502 if there was none.
        resp = responses.from_fetched(fetched, result.error)
        state.served = True
        self._label(flow, resp, state, "MISS")
        flow.response = resp
        flow.comment = f"cache MISS ({state.status.render()})"
        self.metrics.requests.labels("miss").inc()
        await self._finish(state, Outcome.NOT_SHAREABLE)

    def _only_if_cached_miss(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """RFC 9111 §5.2.1.7: no usable stored response → 504, origin untouched."""
        state.served = True
        state.status.detail.append("only-if-cached")
        resp = http.Response.make(504, b"", {"Content-Type": "text/plain"})
        self._label(flow, resp, state, "MISS")
        flow.response = resp
        flow.comment = "cache MISS (only-if-cached → 504)"
        self.metrics.requests.labels("miss").inc()

    # ------------------------------------------------------------------ serving

    def _serve(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        entry: StoredResponse,
        now: float,
        label: str,
        hit: bool = True,
        metric: str | None = None,
    ) -> None:
        """Answer the flow from ``entry`` (a 304 if the client's validators match it)."""
        not_modified = sem.client_conditional_matches(state.request_headers, entry)
        byte_range = None
        if state.wants_range and not not_modified and state.method == "GET":
            byte_range = sem.select_range(state.request_headers, entry)
            if byte_range is not None:
                state.status.detail.append("range")
        resp = responses.from_entry(flow.request.method.upper() == "HEAD", entry, now, not_modified, byte_range)
        state.served = True
        state.status.hit = hit
        state.status.ttl = int(entry.ttl(now))
        self._label(flow, resp, state, label)
        flow.response = resp
        flow.comment = (
            f"cache {label}{' 304' if not_modified else ''} ({'/'.join(state.status.detail)}, age={int(entry.age(now))}s)"
        )
        self.metrics.requests.labels(metric or label.lower()).inc()

    @staticmethod
    def _label(flow: http.HTTPFlow, resp: http.Response, state: FlowState, label: str) -> None:
        """The outcome on the response headers, and as plain strings in flow.metadata (shown by
        mitmproxy's console and kept in flow files)."""
        rendered = state.status.render()
        resp.headers["X-Cache-Status"] = label
        resp.headers["Cache-Status"] = rendered
        flow.metadata[METADATA_KEY] = {"x-cache-status": label, "cache-status": rendered}

    # ------------------------------------------------------------------ response

    async def response(self, flow: http.HTTPFlow) -> None:
        state = self._states.pop(flow, None)
        if state is None or state.served or flow.response is None:
            return
        try:
            await self._handle_response(flow, state)
        finally:
            await self._finish(state, Outcome.NOT_SHAREABLE)  # no-op if already finished

    async def error(self, flow: http.HTTPFlow) -> None:
        state = self._states.pop(flow, None)
        if state is not None:
            await self._finish(state, Outcome.FAILED)

    async def _handle_response(self, flow: http.HTTPFlow, state: FlowState) -> None:
        resp = flow.response
        assert resp is not None
        now = time.time()
        if state.method not in ("GET", "HEAD"):
            keys = sem.invalidation_keys(state.method, resp.status_code, state.key, flow.request.url, _headers(resp))
            if keys:
                removed = await self.store.delete(keys)
                self.metrics.invalidations.inc(len(keys))
                log.debug(f"mitmcache: {state.method} {resp.status_code} invalidated {keys} ({removed} cached)")
            return

        if state.method == "HEAD" and resp.status_code == 200 and state.resource is not None:
            await self._freshen_from_head(flow, state, now)

        if state.revalidating is not None and state.method == "GET":
            if resp.status_code == 304 and sem.validators_for(state.revalidating):
                if sem.validator_304_matches(state.revalidating, _headers(resp)):
                    return await self._revalidated(flow, state, now)
                # §4.3.4: this 304 selects no stored response; the client asked for none of it.
                self._bad_input("304-mismatch", f"304 for {state.key} names other validators")
                resp = flow.response = await self._refetch_unconditionally(flow, state)
                now = time.time()
            else:
                self.metrics.revalidations.labels("200" if resp.status_code < 400 else "error").inc()

        state.status.fwd = state.status.fwd or "uri-miss"
        state.status.fwd_status = resp.status_code
        resource = await self._maybe_store(flow, state, now)
        await self._finish(state, Outcome.STORED if resource else Outcome.NOT_SHAREABLE, resource)
        self._label(flow, resp, state, "MISS")
        self.metrics.requests.labels("miss").inc()
        flow.comment = f"cache MISS ({state.status.render()})"

    def _bad_input(self, kind: str, message: str) -> None:
        """Count malformed input; log it, at most once a minute per kind (no log floods)."""
        self.metrics.bad_input.labels(kind).inc()
        now = time.monotonic()
        if now - self._bad_input_logged.get(kind, -BAD_INPUT_LOG_INTERVAL) >= BAD_INPUT_LOG_INTERVAL:
            self._bad_input_logged[kind] = now
            log.info(f"mitmcache: malformed {kind}: {message} (counted in mitmcache_bad_input_total)")

    async def _refetch_unconditionally(self, flow: http.HTTPFlow, state: FlowState) -> http.Response:
        """Ask the origin again without validators, with the cache's own client."""
        if self.revalidator.client is None:
            return responses.from_fetched(None, "no origin client")
        headers = [(k, v) for k, v in state.request_headers if k.lower() not in ("if-none-match", "if-modified-since")]
        try:
            fetched = await self.revalidator.client.fetch("GET", flow.request.url, headers, FOREGROUND_MAX_BODY)
        except OriginError as e:
            return responses.from_fetched(None, str(e))
        return responses.from_fetched(fetched, None)

    async def _freshen_from_head(self, flow: http.HTTPFlow, state: FlowState, now: float) -> None:
        """A forwarded HEAD's 200 updates (or marks stale) the stored GET response (§4.3.5)."""
        assert state.resource is not None and flow.response is not None
        entry = sem.select_variant(state.resource.variants, state.request_headers)
        if entry is None:
            return
        updated = sem.freshen_with_head(
            entry, _headers(flow.response), _request_time(flow, state, now),
            flow.response.timestamp_end or now, _heuristic_cap(),
        )
        if await self.store.put(state.key, updated, now, base=state.resource) is not None:
            state.status.detail.append("head-freshened" if updated.freshness else "head-marked-stale")

    async def _maybe_store(self, flow: http.HTTPFlow, state: FlowState, now: float) -> Resource | None:
        resp = flow.response
        assert resp is not None
        for kind in sem.malformed_fields(_headers(resp)):
            self._bad_input(kind, f"{resp.headers.get(kind, '')!r} from {flow.request.url}")
        if not state.store_allowed:
            return None
        body = resp.raw_content
        reason = sem.storability(
            state.method,
            resp.status_code,
            state.request_headers,
            _headers(resp),
            len(body) if body is not None else None,
            ctx.options.cache_max_object_bytes,
        )
        if reason is not None:
            if state.method == "GET":
                self.metrics.not_stored.labels(reason.value).inc()
                state.status.detail.append(reason.value)
            return None
        assert body is not None
        entry = sem.make_stored_response(
            resp.status_code,
            resp.reason,
            state.request_headers,
            _headers(resp),
            body,
            _request_time(flow, state, now),
            resp.timestamp_end or now,
            _heuristic_cap(),
        )
        if entry.retain_until() <= now:
            state.status.detail.append("no-freshness")
            self.metrics.not_stored.labels("no-freshness").inc()
            return None
        resource = await self.store.put(state.key, entry, now, base=state.resource)
        if resource is not None:
            state.status.stored = True
            state.status.ttl = int(entry.ttl(now))
        else:
            state.status.detail.append("too-large-for-l1")
        return resource

    async def _revalidated(self, flow: http.HTTPFlow, state: FlowState, now: float) -> None:
        """Origin said 304 to our validators: freshen the entry and serve it (§4.3.3, §4.3.4)."""
        entry = state.revalidating
        resp = flow.response
        assert entry is not None and resp is not None
        self.metrics.revalidations.labels("304").inc()
        state.status.fwd_status = 304
        entry = sem.merge_304(
            entry,
            _headers(resp),
            _request_time(flow, state, now),
            resp.timestamp_end or now,
            _heuristic_cap(),
        )
        resource = await self.store.put(state.key, entry, now, base=state.resource)
        state.status.stored = resource is not None
        # Answer the client, evaluating its own conditionals (if any) against the entry.
        self._serve(flow, state, entry, now, "HIT", hit=False, metric="revalidated")
        flow.comment = f"cache HIT revalidated ({state.status.render()})"
        await self._finish(state, Outcome.STORED if resource else Outcome.NOT_SHAREABLE, resource)

    # ------------------------------------------------------------------ commands

    @command.command("cache.stats")
    def stats(self) -> str:
        """Entries, bytes and request counters of this proxy's cache, as JSON."""
        counts = {
            s.labels["result"]: int(s.value)
            for m in self.metrics.requests.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        return json.dumps(
            {
                "l1_entries": len(self.store.l1),
                "l1_bytes": self.store.l1.bytes,
                "l1_max_bytes": self.store.l1.max_bytes,
                "l2_nodes": self.store.l2.members() if self.store.l2 else {},
                "requests": counts,
                "fetches_in_flight": len(self.coalescer.flights),
                "revalidations_pending": len(self.revalidator.in_progress),
            },
            sort_keys=True,
        )

    @command.command("cache.clear")
    def clear(self) -> int:
        """Drop every cached entry in L1 and (in the background) in Valkey; returns L1's count."""
        n = self.store.clear_l1()
        if self.store.l2 is not None:
            self._spawn(self.store.l2.clear())
        log.info(f"mitmcache: cleared {n} cached URLs from L1" + (" and Valkey" if self.store.l2 else ""))
        return n

    @command.command("cache.purge")
    def purge(self, url: str) -> int:
        """Drop every variant cached for an absolute URL; returns 1 if something was cached."""
        key = sem.key_for_uri(url)
        if key is None:
            raise exceptions.CommandError(f"cache.purge needs an absolute http(s) URL, not {url!r}")
        removed = self.store.delete_l1([key])  # now, so this proxy's next request misses
        if self.store.l2 is not None:
            self._spawn(self.store.delete_l2([key]))
        self.metrics.invalidations.inc()
        return removed

