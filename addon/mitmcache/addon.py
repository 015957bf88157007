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
import time
from dataclasses import dataclass, field

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.net.http import status_codes

from . import semantics as sem
from .metrics import Metrics
from .ring import ValkeyURLError, parse_valkey_urls
from .semantics import CacheStatus, StoredResponse, Use
from .store import Resource, TieredStore
from .valkey_tier import ValkeyTier

log = logging.getLogger("mitmcache")

METADATA_KEY = "mitmcache"
PURGE_INTERVAL = 10.0


@dataclass(slots=True)
class FlowState:
    """What the request hook decided, for the response hook (kept in flow.metadata)."""

    key: str
    method: str
    served: bool = False  # answered from cache in the request hook
    resource: Resource | None = None  # what the lookup found (other variants to keep)
    store_allowed: bool = True
    revalidating: StoredResponse | None = None
    client_conditionals: list[tuple[str, str]] = field(default_factory=list)
    status: CacheStatus = field(default_factory=CacheStatus)


def _headers(message: http.Message) -> list[tuple[str, str]]:
    return [(k, v) for k, v in message.headers.items(multi=True)]


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
            "cache_valkey_timeout_ms", int, 250,
            "Timeout of one Valkey operation in milliseconds; a slower node counts as failing.",
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
        if updated & {"cache_valkey_urls", "cache_key_prefix", "cache_valkey_timeout_ms"}:
            self._configure_l2()
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
                nodes, opts.cache_key_prefix, opts.cache_valkey_timeout_ms, self.metrics, self.store.forget_node
            )
            log.info(f"mitmcache: L2 ring of {len(nodes)} Valkey nodes: {', '.join(n.name for n in nodes)}")
        else:
            self.metrics.ring_members.labels("up").set(0)
            self.metrics.ring_members.labels("down").set(0)

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

    def done(self) -> None:
        # Sync on purpose (mitmproxy-notes A3); closing Valkey clients is scheduled if a loop runs.
        if self._purge_task is not None:
            self._purge_task.cancel()
            self._purge_task = None
        if self.store.l2 is not None:
            self._spawn(self.store.l2.close())
            self.store.l2 = None
        self.metrics.stop()

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            self.store.purge_expired(time.time())

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
            named = sem.normalize_authority(req.scheme, h, p if p is not None else sem._default_port(req.scheme))
            if named != target:
                key += f" host={named}"
        return key

    # ------------------------------------------------------------------ request

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return  # already answered by someone else
        req = flow.request
        method = req.method.upper()
        key = self._key(req)
        state = FlowState(key=key, method=method)
        flow.metadata[METADATA_KEY] = state
        if method not in ("GET", "HEAD"):
            state.store_allowed = False
            return
        now = time.time()
        req_headers = _headers(req)
        directives = sem.RequestDirectives.from_headers(req_headers)
        if "range" in req.headers:
            # We do not store or serve ranges: pass through, never store the 206.
            state.status.fwd = "bypass"
            state.status.detail.append("range")
            state.store_allowed = False
            return

        lookup = await self.store.get(key, now)
        entry = sem.select_variant(lookup.resource.variants, req_headers) if lookup else None
        if entry is None:
            if directives.only_if_cached:
                return self._only_if_cached_miss(flow, state)
            state.resource = lookup.resource if lookup else None
            state.status.fwd = "vary-miss" if lookup else "uri-miss"
            return
        assert lookup is not None
        state.resource = lookup.resource
        state.status.detail.append(lookup.tier)

        decision = sem.decide(entry, directives, now)
        if decision.use is Use.FRESH:
            return self._serve(flow, state, entry, now, label="HIT")
        if decision.use in (Use.STALE_OK, Use.STALE_WHILE_REVALIDATE):
            # SWR serving arrives with background revalidation; until then only max-stale.
            return self._serve(flow, state, entry, now, label="STALE")
        # REVALIDATE: never contact the origin for only-if-cached (§5.2.1.7).
        if directives.only_if_cached:
            return self._only_if_cached_miss(flow, state)
        state.status.fwd = "request" if decision.reason == "request" else "stale"
        validators = sem.validators_for(entry)
        if validators and method == "GET":
            # Send the entry's validators, remember the client's own to answer it ourselves.
            for name in ("if-none-match", "if-modified-since"):
                for value in req.headers.get_all(name):
                    state.client_conditionals.append((name, value))
                req.headers.pop(name, None)
            for name, value in validators:
                req.headers[name] = value
            state.revalidating = entry

    def _only_if_cached_miss(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """RFC 9111 §5.2.1.7: no usable stored response → 504, origin untouched."""
        state.served = True
        state.status.detail.append("only-if-cached")
        resp = http.Response.make(504, b"", {"Content-Type": "text/plain"})
        self._label(resp, state, "MISS")
        flow.response = resp
        flow.comment = "cache MISS (only-if-cached → 504)"
        self.metrics.requests.labels("miss").inc()

    # ------------------------------------------------------------------ serving

    def _build(self, flow: http.HTTPFlow, entry: StoredResponse, now: float, not_modified: bool) -> http.Response:
        head = flow.request.method.upper() == "HEAD"
        if not_modified:
            fields = sem.not_modified_headers(entry)
            status, body = 304, b""
        else:
            fields = [(k, v) for k, v in entry.headers if k.lower() != "content-length"]
            status, body = entry.status, entry.body
        resp = http.Response(
            b"HTTP/1.1",
            status,
            (entry.reason or status_codes.RESPONSES.get(status, "")).encode("latin-1", "replace")
            if not not_modified
            else b"Not Modified",
            http.Headers([(k.encode("latin-1", "replace"), v.encode("latin-1", "replace")) for k, v in fields]),
            None,
            None,
            now,
            now,
        )
        # mitmproxy-notes §0.7: HEAD and 304 carry no body and we set the framing ourselves.
        if not_modified or status in (204,) or 100 <= status < 200:
            resp.raw_content = b""
            resp.headers.pop("content-length", None)
        elif head:
            resp.raw_content = b""
            resp.headers["content-length"] = str(len(body))
        else:
            resp.raw_content = body
            resp.headers["content-length"] = str(len(body))
        resp.headers["age"] = sem.age_header_value(entry.age(now))
        return resp

    def _serve(self, flow: http.HTTPFlow, state: FlowState, entry: StoredResponse, now: float, label: str) -> None:
        not_modified = sem.client_conditional_matches(_headers(flow.request), entry)
        resp = self._build(flow, entry, now, not_modified)
        state.served = True
        state.status.hit = True
        state.status.ttl = int(entry.ttl(now))
        if label == "STALE":
            state.status.fwd = None
            state.status.detail.append("stale")
        self._label(resp, state, label)
        flow.response = resp
        age = int(entry.age(now))
        flow.comment = f"cache {label}{' 304' if not_modified else ''} ({'/'.join(state.status.detail)}, age={age}s)"
        self.metrics.requests.labels(label.lower()).inc()

    @staticmethod
    def _label(resp: http.Response, state: FlowState, label: str) -> None:
        resp.headers["X-Cache-Status"] = label
        resp.headers["Cache-Status"] = state.status.render()

    # ------------------------------------------------------------------ response

    async def response(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(METADATA_KEY)
        if state is None or state.served or flow.response is None:
            return
        resp = flow.response
        now = time.time()
        if state.method not in ("GET", "HEAD"):
            keys = sem.invalidation_keys(state.method, resp.status_code, state.key, flow.request.url, _headers(resp))
            if keys:
                removed = await self.store.delete(keys)
                self.metrics.invalidations.inc(len(keys))
                log.debug(f"mitmcache: {state.method} {resp.status_code} invalidated {keys} ({removed} cached)")
            return

        if state.revalidating is not None:
            if resp.status_code == 304:
                return await self._revalidated(flow, state, now)
            self.metrics.revalidations.labels(str(resp.status_code // 100) + "xx").inc()

        state.status.fwd = state.status.fwd or "uri-miss"
        state.status.fwd_status = resp.status_code
        await self._maybe_store(flow, state, now)
        self._label(resp, state, "MISS")
        self.metrics.requests.labels("miss").inc()
        flow.comment = f"cache MISS ({state.status.render()})"

    async def _maybe_store(self, flow: http.HTTPFlow, state: FlowState, now: float) -> None:
        resp = flow.response
        assert resp is not None
        if not state.store_allowed:
            return
        body = resp.raw_content
        reason = sem.storability(
            state.method,
            resp.status_code,
            _headers(flow.request),
            _headers(resp),
            len(body) if body is not None else None,
            ctx.options.cache_max_object_bytes,
        )
        if reason is not None:
            if state.method == "GET":
                self.metrics.not_stored.labels(reason.value).inc()
                state.status.detail.append(reason.value)
            return
        assert body is not None
        request_time = flow.request.timestamp_start or now
        response_time = resp.timestamp_end or now
        entry = sem.make_stored_response(
            resp.status_code,
            resp.reason,
            # The request as the client sent it: our own validators are not part of Vary.
            [(k, v) for k, v in _headers(flow.request) if k.lower() not in ("if-none-match", "if-modified-since")]
            + state.client_conditionals,
            _headers(resp),
            body,
            request_time,
            response_time,
            float(ctx.options.cache_heuristic_max),
        )
        if entry.retain_until() <= now:
            state.status.detail.append("no-freshness")
            self.metrics.not_stored.labels("no-freshness").inc()
            return
        if await self.store.put(state.key, entry, now, base=state.resource):
            state.status.stored = True
            state.status.ttl = int(entry.ttl(now))
        else:
            state.status.detail.append("too-large-for-l1")

    async def _revalidated(self, flow: http.HTTPFlow, state: FlowState, now: float) -> None:
        """Origin said 304 to our validators: freshen the entry and serve it (§4.3.3, §4.3.4)."""
        entry = state.revalidating
        resp = flow.response
        assert entry is not None and resp is not None
        self.metrics.revalidations.labels("304").inc()
        state.status.fwd_status = 304
        if sem.validator_304_matches(entry, _headers(resp)):
            entry = sem.merge_304(
                entry,
                _headers(resp),
                flow.request.timestamp_start or now,
                resp.timestamp_end or now,
                float(ctx.options.cache_heuristic_max),
            )
            await self.store.put(state.key, entry, now, base=state.resource)
            state.status.stored = True
        else:
            log.warning(f"mitmcache: 304 for {state.key} does not match the stored validators; not merged")
            self.metrics.bad_input.labels("304-mismatch").inc()
        # Answer the client: its own conditionals (if any) against the freshened entry.
        client_headers = [(k, v) for k, v in _headers(flow.request) if k.lower() not in ("if-none-match", "if-modified-since")]
        client_headers += state.client_conditionals
        not_modified = sem.client_conditional_matches(client_headers, entry)
        new = self._build(flow, entry, now, not_modified)
        state.status.ttl = int(entry.ttl(now))
        self._label(new, state, "HIT")
        flow.response = new
        flow.comment = f"cache HIT revalidated ({state.status.render()})"
        self.metrics.requests.labels("revalidated").inc()

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
        removed = 1 if self.store.l1.delete(key) else 0
        self.store._update_gauges()
        if self.store.l2 is not None:
            self._spawn(self.store.delete([key]))
        self.metrics.invalidations.inc()
        return removed

