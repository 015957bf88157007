"""Policies addon: ``cache_policy`` rules (operator overrides) and ``cache.policy.explain``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

from mitmproxy import command, connection, ctx, exceptions, flowfilter, http

from ..messages import Headers
from ..policy import Policy, PolicyError, PolicySet, parse_rule
from ..service import CacheService
from .config import origin_urls, report_option_errors

log = logging.getLogger("mitmcache")


def flow_for_url(url: str, headers: Headers = ()) -> http.HTTPFlow:
    """A GET flow for ``url`` to match rules against outside a request (purge, §4.4 targets)."""
    client = connection.Client(peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0), timestamp_start=time.time())
    flow = http.HTTPFlow(client, connection.Server(address=None))
    raw = [(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape")) for k, v in headers]
    flow.request = http.Request.make("GET", url, b"", raw)
    return flow


def match_flow(policies: PolicySet, flow: http.HTTPFlow) -> Policy | None:
    """The first rule that matches ``flow`` (memoised by method, host and URL when it can be)."""
    if not policies:
        return None
    data = flow.request.data
    # What ~d/~u/~m read (method, scheme, host, port, path, the Host field or :authority),
    # without building pretty_url on the hit path.
    return policies.match(flow, (data.method, data.scheme, data.authority, data.host, data.port, data.path,
                                 data.headers.get(b"host")))


def _header_args(args: Sequence[str]) -> Headers:
    out = []
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or not name:
            raise exceptions.CommandError(f"not a header=value pair: {arg!r}")
        out.append((name, value))
    return tuple(out)


class Policies:
    name = "mitmcache.policies"

    def __init__(self, service: CacheService) -> None:
        self.service = service
        service.policy_for_url = self.for_url

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "cache_policy", Sequence[str], [],
            "Operator rules, one per --set (first match wins): SEP filter SEP settings, e.g. "
            "'|~d api.example.com & ~u /v1/|ttl=5m error_ttl=10s swr=30s sie=1h key_headers=X-Tenant-ID'. "
            "Settings: ttl, error_ttl, swr, sie, override, key_headers, key_cookies, ignore_params, "
            "keep_params, sort_params, bypass, no_store, l1_ttl, name.",
        )

    @report_option_errors
    def configure(self, updated: set[str]) -> None:
        if "cache_policy" not in updated:
            return
        rules = []
        for i, spec in enumerate(ctx.options.cache_policy, start=1):
            try:
                rules.append(parse_rule(spec, i, flowfilter.parse))
            except PolicyError as e:
                raise exceptions.OptionsError(f"cache_policy: rule {i} ({spec!r}): {e}") from None
        self.service.policies = PolicySet(rules)
        if rules:
            log.info(f"mitmcache: {len(rules)} cache_policy rules")

    def for_url(self, url: str, headers: Headers = ()) -> Policy | None:
        policies = self.service.policies
        if not policies:
            return None
        try:
            return match_flow(policies, flow_for_url(url, headers))
        except ValueError:
            return None

    @command.command("cache.policy.explain")
    def explain(self, url: str, *headers: str) -> str:
        """The rule that matches a GET for ``url`` (the origin's, or in reverse mode the one
        the client used; request headers given as ``name=value``), the key it gets, and the
        effective TTL/SWR/SIE in seconds, as JSON."""
        request_headers = _header_args(headers)
        keys = self.service.keys
        if keys.for_url(url) is None:
            raise exceptions.CommandError(f"not an absolute http(s) URL: {url!r}")
        view: dict[str, object] = {"url": url}
        mapped = origin_urls(url)  # the URL a client of a reverse listener used → the origin's
        if mapped:
            url = view["origin_url"] = mapped[0][0]
        policy = self.for_url(url, request_headers)
        view["key"] = keys.for_url(url, policy, request_headers)
        if policy is None:
            view["rule"] = None
            view["effective"] = "RFC 9111: what the response headers say"
        else:
            view["rule"] = {"index": policy.index, "name": policy.name, "spec": policy.spec}
            view["effective"] = {
                "ttl": policy.ttl, "error_ttl": policy.error_ttl, "swr": policy.swr, "sie": policy.sie,
                "override": sorted(policy.override), "bypass": policy.bypass, "no_store": policy.no_store,
                "l1_ttl": policy.l1_ttl, "key_headers": list(policy.key_headers),
                "key_cookies": list(policy.key_cookies),
            }
        return json.dumps(view, indent=1, ensure_ascii=False)
