"""Operator policies (``cache_policy``): durations, rule parsing, key shaping, the overridden
view the spec judges, force-mode storability and freshness, and rule matching."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest
from mitmproxy import flowfilter
from mitmproxy.test import tflow, tutils

from mitmcache import semantics as sem
from mitmcache.keys import KeyBuilder
from mitmcache.policy import Policy, PolicyError, PolicySet, parse_duration, parse_rule
from mitmcache.semantics import NotStorable


def H(values: list[str]) -> str:
    """How a rule's key holds request values: hashed (keys show up in logs and flow files)."""
    return hashlib.blake2b(json.dumps(values).encode(), digest_size=16).hexdigest()

NOW = 1_800_000_000.0
KEYS = KeyBuilder()


def rule(spec: str, index: int = 1) -> Policy:
    return parse_rule(spec, index, flowfilter.parse)


def entry(headers: list[tuple[str, str]], status: int = 200) -> sem.StoredResponse:
    return sem.make_stored_response(status, "OK", [], headers, b"body", NOW, NOW)


def flow(url: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Any:
    f = tflow.tflow(req=tutils.treq())
    f.request.url = url
    for name, value in headers:
        f.request.headers[name.decode()] = value.decode()
    return f


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "text, seconds",
    [
        pytest.param("300ms", 0.3, id="milliseconds"),
        pytest.param("5m", 300.0, id="minutes"),
        pytest.param("1h30m", 5400.0, id="hours and minutes"),
        pytest.param("2.5s", 2.5, id="fractional seconds"),
        pytest.param("45", 45.0, id="plain seconds"),
        pytest.param("1d", 86400.0, id="days"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("1s500ms", 1.5, id="seconds and milliseconds"),
    ],
)
def test_duration_parses_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("5x", id="unknown unit"),
        pytest.param("m5", id="unit before number"),
        pytest.param("1h 30m", id="space inside"),
        pytest.param("-5", id="negative"),
        pytest.param("5mm", id="unit repeated"),
        pytest.param("s", id="unit alone"),
    ],
)
def test_invalid_duration_is_rejected_with_an_example(text: str) -> None:
    with pytest.raises(PolicyError, match=r"not a duration: .*\(e\.g\. 300ms"):
        parse_duration(text)


# --------------------------------------------------------------------------- parsing rules


@pytest.mark.parametrize(
    "spec, expected",
    [
        pytest.param(
            "|~d api.example.com & ~u /v1/|ttl=5m error_ttl=10s swr=30s sie=1h",
            {"ttl": 300.0, "error_ttl": 10.0, "swr": 30.0, "sie": 3600.0},
            id="durations",
        ),
        pytest.param(
            "|~u /a|override=no-store,Private,no-cache,must-revalidate,set-cookie",
            {"override": frozenset({"no-store", "private", "no-cache", "must-revalidate", "set-cookie"})},
            id="every override, case-insensitive",
        ),
        pytest.param(
            "|~u /a|key_headers=X-Tenant-ID,Accept-Language key_cookies=sid,lang",
            {"key_headers": ("x-tenant-id", "accept-language"), "key_cookies": ("sid", "lang")},
            id="key headers lower-cased, cookies as given",
        ),
        pytest.param(
            "|~u /a|ignore_params=utm_*,fbclid sort_params",
            {"ignore_params": ("utm_*", "fbclid"), "sort_params": True, "keep_params": None},
            id="ignore_params globs and bare sort_params",
        ),
        pytest.param("|~u /a|keep_params=id,page", {"keep_params": ("id", "page")}, id="keep_params allow-list"),
        pytest.param("|~u /a|sort_params=false ttl=1", {"sort_params": False}, id="boolean false"),
        pytest.param("|~u /a|bypass", {"bypass": True, "ttl": None}, id="bare bypass"),
        pytest.param("|~u /a|bypass name=static", {"bypass": True, "name": "static"}, id="bypass with a name"),
        pytest.param("|~u /a|no_store=true", {"no_store": True}, id="no_store"),
        pytest.param("|~u /a|l1_ttl=500ms name=catalog", {"l1_ttl": 0.5, "name": "catalog"}, id="l1_ttl and name"),
        pytest.param("#~u /a|b#ttl=1", {"ttl": 1.0}, id="first character is the separator"),
        pytest.param("| ~u /a |  ttl=1   swr=2 ", {"ttl": 1.0, "swr": 2.0}, id="surrounding spaces ignored"),
    ],
)
def test_valid_rule_compiles_to_its_values(spec: str, expected: dict[str, object]) -> None:
    policy = rule(spec, 3)
    assert policy.index == 3 and policy.spec == spec
    assert {name: getattr(policy, name) for name in expected} == expected


def test_rule_filter_is_a_compiled_mitmproxy_filter() -> None:
    policy = rule("|~d api.example.com & ~u /v1/|ttl=5m")
    assert policy.matches(flow("http://api.example.com/v1/x"))
    assert not policy.matches(flow("http://api.example.com/v2/x"))
    assert not policy.matches(flow("http://www.example.com/v1/x"))


@pytest.mark.parametrize(
    "spec, message",
    [
        pytest.param("|~u /a|tll=5m", r"^tll: unknown setting \(ttl, error_ttl", id="unknown setting"),
        pytest.param("|~u /a|ttl=5x", r"^ttl: not a duration: '5x'", id="bad duration"),
        pytest.param("|~u /a|swr=", r"^swr: not a duration: ''", id="duration missing"),
        pytest.param("|~u /a|override=no-transform", r"^override: unknown no-transform \(one of ", id="unknown override"),
        pytest.param("|~u /a|override=", r"^override: unknown empty", id="empty override"),
        pytest.param("|~u /a ttl=5m", r"^no second '\|'", id="missing separator"),
        pytest.param("|~", r"^too short", id="too short"),
        pytest.param("|~zz|ttl=5m", r"^filter '~zz': Invalid filter expression", id="bad filter"),
        pytest.param("||ttl=5m", r"^filter '': Empty filter expression", id="empty filter"),
        pytest.param("|~u /a|", r"^no settings", id="empty settings"),
        pytest.param("|~u /a|   ", r"^no settings", id="blank settings"),
        pytest.param("|~u /a|bypass ttl=5m", r"^bypass takes no other settings", id="bypass with other settings"),
        pytest.param("|~u /a|ttl=5m ttl=6m", r"^ttl: given twice", id="duplicate setting"),
        pytest.param("|~u /a|sort_params=maybe", r"^sort_params: not a boolean: 'maybe'", id="bad boolean"),
        pytest.param("|~u /a|key_headers=X Y", r"^Y: unknown setting", id="space splits settings"),
        pytest.param("|~u /a|key_headers=,", r"^key_headers: empty list", id="empty header list"),
        pytest.param("|~u /a|key_headers=X:Y", r"^key_headers: not a name: 'X:Y'", id="bad header name"),
        pytest.param("|~u /a|ignore_params=", r"^ignore_params: empty list", id="empty glob list"),
        pytest.param("|~u /a|name=a/b", r"^name: not a name: 'a/b'", id="bad rule name"),
    ],
)
def test_invalid_rule_names_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        rule(spec)


# --------------------------------------------------------------------------- the key


@pytest.mark.parametrize(
    "settings, path, expected",
    [
        pytest.param("ignore_params=utm_*", "/p?utm_source=x&a=1&utm_medium=y", "/p?a=1", id="ignore glob"),
        pytest.param("ignore_params=utm_*,fbclid", "/p?fbclid=1&utm_x=2", "/p", id="every param ignored drops ?"),
        pytest.param("ignore_params=utm_*", "/p?xutm_a=1", "/p?xutm_a=1", id="glob anchored at the start"),
        pytest.param("ignore_params=utm_*", "/p?UTM_a=1", "/p?UTM_a=1", id="glob case-sensitive"),
        pytest.param("keep_params=id,page", "/p?x=1&page=2&id=3", "/p?page=2&id=3", id="keep allow-list"),
        pytest.param("keep_params=id", "/p?x=1", "/p", id="nothing kept"),
        pytest.param("keep_params=i*", "/p?id=1&item=2&x=3", "/p?id=1&item=2", id="keep globs"),
        pytest.param("sort_params", "/p?b=2&a=1&c=3", "/p?a=1&b=2&c=3", id="sorted by name"),
        pytest.param("sort_params", "/p?b=2&a=9&a=1", "/p?a=9&a=1&b=2", id="sort stable for repeated names"),
        pytest.param("sort_params", "/p?b&a=1", "/p?a=1&b", id="valueless param sorted by name"),
        pytest.param("ignore_params=utm_* sort_params", "/p?utm_source=x&b=2&a=1", "/p?a=1&b=2", id="ignore then sort"),
        pytest.param("sort_params", "/p", "/p", id="no query"),
        pytest.param("sort_params", "/p?a=1&&b=2&", "/p?a=1&b=2", id="empty pairs dropped"),
        pytest.param("ttl=1", "/p?b=2&a=1", "/p?b=2&a=1", id="rule without query settings leaves it"),
    ],
)
def test_key_path_normalises_the_query(settings: str, path: str, expected: str) -> None:
    assert rule(f"|~all|{settings}").key_path(path) == expected


@pytest.mark.parametrize(
    "headers, expected",
    [
        pytest.param((), "\nkh:x-tenant-id", id="absent"),
        pytest.param((("X-Tenant-ID", ""),), f"\nkh:x-tenant-id={H([''])}", id="empty is not absent"),
        pytest.param((("x-tenant-id", "a"),), f"\nkh:x-tenant-id={H(['a'])}", id="present, name case-insensitive"),
        pytest.param((("X-Tenant-ID", "a"), ("X-Tenant-ID", "b")), f"\nkh:x-tenant-id={H(['a', 'b'])}", id="every line"),
    ],
)
def test_key_suffix_marks_a_header_present_absent_or_empty(headers: sem.HeaderList, expected: str) -> None:
    assert rule("|~all|key_headers=X-Tenant-ID").key_suffix(headers) == expected


@pytest.mark.parametrize(
    "cookie, expected",
    [
        pytest.param(None, "\nkc:sid", id="no Cookie field"),
        pytest.param("lang=en", "\nkc:sid", id="other cookies only"),
        pytest.param("sid=", f"\nkc:sid={H([''])}", id="empty value is not absent"),
        pytest.param("lang=en; sid=42", f"\nkc:sid={H(['42'])}", id="value among others"),
    ],
)
def test_key_suffix_holds_key_cookies(cookie: str | None, expected: str) -> None:
    headers = (("Cookie", cookie),) if cookie is not None else ()
    assert rule("|~all|key_cookies=sid").key_suffix(headers) == expected


def test_key_suffix_tells_tenants_apart() -> None:
    policy = rule("|~all|key_headers=X-Tenant-ID")
    suffixes = {policy.key_suffix(h) for h in [(("X-Tenant-ID", "a"),), (("X-Tenant-ID", "b"),), (), (("X-Tenant-ID", ""),)]}
    assert len(suffixes) == 4


@pytest.mark.parametrize(
    "settings, path, headers, expected",
    [
        pytest.param("ttl=1", "/p?b=2&a=1", (), "http://o.example/p?b=2&a=1", id="no key settings: RFC key"),
        pytest.param("ignore_params=utm_* sort_params", "/p?utm_source=x&b=2&a=1", (), "http://o.example/p?a=1&b=2",
                     id="query normalised"),
        pytest.param("key_headers=X-Tenant-ID", "/p", (("X-Tenant-ID", "a"),), f"http://o.example/p\nkh:x-tenant-id={H(['a'])}",
                     id="header joins the key"),
        pytest.param("key_headers=X-Tenant-ID key_cookies=sid sort_params", "/p?b=1&a=2",
                     (("Cookie", "sid=7"),), f"http://o.example/p?a=2&b=1\nkh:x-tenant-id\nkc:sid={H(['7'])}",
                     id="query, header and cookie together"),
        pytest.param("sort_params", "/p?b=%7e&a=%c3%a9", (), "http://o.example/p?a=%C3%A9&b=~",
                     id="percent-encoding normalised after sorting"),
    ],
)
def test_key_builder_applies_the_policy(settings: str, path: str, headers: sem.HeaderList, expected: str) -> None:
    assert KEYS.build("http", "O.example", 80, path, None, rule(f"|~all|{settings}"), headers) == expected


def test_key_for_url_under_a_policy_matches_the_request_key() -> None:
    policy = rule("|~all|ignore_params=utm_* sort_params key_headers=X-Tenant-ID")
    headers = (("X-Tenant-ID", "a"),)
    from_request = KEYS.build("http", "o.example", 80, "/p?b=2&utm_x=1&a=1", None, policy, headers)
    assert KEYS.for_url("http://o.example/p?a=1&b=2", policy, headers) == from_request


@pytest.mark.parametrize(
    "path, same_as",
    [
        pytest.param("/p?utm%5Fsource=x&a=1", "/p?a=1", id="ignore_params sees an encoded unreserved name"),
        pytest.param("/p?%62=2&a=1", "/p?a=1&b=2", id="sort_params sees an encoded unreserved name"),
    ],
)
def test_query_normalisation_treats_equivalent_encodings_alike(path: str, same_as: str) -> None:
    # RFC 3986 §6.2.2.2: %5F is "_" and %62 is "b"; the key builder already treats them as one
    # URI, so the rule's ignore/sort must see the same names.
    policy = rule("|~all|ignore_params=utm_* sort_params")
    assert KEYS.build("http", "o.example", 80, path, None, policy) == KEYS.build("http", "o.example", 80, same_as, None, policy)


# --------------------------------------------------------------------------- the view the spec judges


@pytest.mark.parametrize(
    "override, headers, expected",
    [
        pytest.param("private", [("Cache-Control", "private, max-age=60")], [("Cache-Control", "max-age=60")],
                     id="private removed"),
        pytest.param("private", [("Cache-Control", 'private="Set-Cookie", max-age=60')], [("Cache-Control", "max-age=60")],
                     id="qualified private removed"),
        pytest.param("no-store", [("Cache-Control", "no-store")], [], id="only directive: field dropped"),
        pytest.param("no-cache", [("Cache-Control", "No-Cache, max-age=5")], [("Cache-Control", "max-age=5")],
                     id="directive names case-insensitive"),
        pytest.param("must-revalidate", [("Cache-Control", "max-age=5, must-revalidate, proxy-revalidate")],
                     [("Cache-Control", "max-age=5")], id="must-revalidate removes proxy-revalidate too"),
        pytest.param("private", [("CDN-Cache-Control", "private, max-age=9")], [("CDN-Cache-Control", "max-age=9")],
                     id="targeted field too"),
        pytest.param("set-cookie", [("Cache-Control", "max-age=60"), ("Set-Cookie", "a=1"), ("set-cookie2", "b=2")],
                     [("Cache-Control", "max-age=60")], id="set-cookie strips Set-Cookie and Set-Cookie2"),
        pytest.param("private", [("Cache-Control", "private, max-age=60"), ("Set-Cookie", "a=1"), ("ETag", '"x"')],
                     [("Cache-Control", "max-age=60"), ("Set-Cookie", "a=1"), ("ETag", '"x"')],
                     id="other fields untouched"),
    ],
)
def test_view_hides_the_overridden_prohibitions(override: str, headers: list[tuple[str, str]], expected: list[tuple[str, str]]) -> None:
    assert list(rule(f"|~all|override={override}").view(headers)) == expected


def test_view_without_override_is_the_response() -> None:
    headers = [("Cache-Control", "private, no-store"), ("Set-Cookie", "a=1")]
    assert list(rule("|~all|ttl=5").view(headers)) == headers


# --------------------------------------------------------------------------- storing


@pytest.mark.parametrize(
    "settings, status, spec_reason, expected",
    [
        pytest.param("ttl=60", 200, NotStorable.NOT_CACHEABLE, None, id="ttl stores a response without caching headers"),
        pytest.param("ttl=60", 302, NotStorable.NOT_CACHEABLE, None, id="ttl applies to 3xx"),
        pytest.param("ttl=60", 200, NotStorable.NO_STORE, NotStorable.NO_STORE, id="ttl does not override no-store"),
        pytest.param("ttl=60", 200, NotStorable.AUTHORIZATION, NotStorable.AUTHORIZATION, id="ttl keeps §3.5"),
        pytest.param("ttl=60", 200, NotStorable.SET_COOKIE, NotStorable.SET_COOKIE, id="ttl keeps Set-Cookie rule"),
        pytest.param("ttl=60", 503, NotStorable.NOT_CACHEABLE, NotStorable.NOT_CACHEABLE, id="ttl is not for errors"),
        pytest.param("ttl=60", 403, NotStorable.NOT_CACHEABLE, NotStorable.NOT_CACHEABLE, id="ttl is not for a 403"),
        pytest.param("ttl=0", 200, None, NotStorable.POLICY, id="ttl=0 never stores"),
        pytest.param("error_ttl=10", 404, None, None, id="error_ttl 404"),
        pytest.param("error_ttl=10", 410, None, None, id="error_ttl 410"),
        pytest.param("error_ttl=10", 503, NotStorable.NOT_CACHEABLE, None, id="error_ttl stores a 503"),
        pytest.param("error_ttl=10", 500, NotStorable.NOT_CACHEABLE, None, id="error_ttl stores a 500"),
        pytest.param("error_ttl=10", 200, NotStorable.NOT_CACHEABLE, NotStorable.NOT_CACHEABLE, id="error_ttl is not for 200"),
        pytest.param("error_ttl=0", 404, None, NotStorable.POLICY, id="error_ttl=0 never stores a 404"),
        pytest.param("error_ttl=0", 503, NotStorable.NOT_CACHEABLE, NotStorable.POLICY, id="error_ttl=0 never stores a 503"),
        pytest.param("no_store", 200, None, NotStorable.POLICY, id="no_store"),
        pytest.param("bypass", 200, None, NotStorable.POLICY, id="bypass"),
        pytest.param("swr=30", 200, None, None, id="no forced freshness: the spec decides"),
        pytest.param("swr=30", 200, NotStorable.NOT_CACHEABLE, NotStorable.NOT_CACHEABLE, id="swr alone does not force"),
    ],
)
def test_storability_adjusts_the_spec_verdict(
    settings: str, status: int, spec_reason: NotStorable | None, expected: NotStorable | None
) -> None:
    assert rule(f"|~all|{settings}").storability(status, spec_reason) is expected


def test_forced_ttl_stores_a_response_with_no_caching_headers() -> None:
    headers = [("Date", sem.format_http_date(NOW))]
    policy = rule("|~all|ttl=90")
    spec = sem.storability("GET", 200, [], policy.view(headers), 4, 1 << 20)
    assert policy.storability(200, spec) is None
    applied = policy.apply(entry(headers))
    assert (applied.freshness, applied.heuristic) == (90.0, False)
    assert applied.is_fresh(NOW + 89) and not applied.is_fresh(NOW + 91)


@pytest.mark.parametrize(
    "settings, status, headers, freshness",
    [
        pytest.param("ttl=90", 200, [("Cache-Control", "max-age=5")], 90.0, id="ttl replaces max-age"),
        pytest.param("ttl=90", 200, [("Cache-Control", "s-maxage=5, max-age=600")], 90.0, id="ttl replaces s-maxage"),
        pytest.param("ttl=90", 404, [("Cache-Control", "max-age=5")], 5.0, id="ttl leaves a 404 to the headers"),
        pytest.param("error_ttl=2", 404, [], 2.0, id="error_ttl on 404"),
        pytest.param("error_ttl=2", 503, [], 2.0, id="error_ttl on 503"),
        pytest.param("error_ttl=2", 200, [("Cache-Control", "max-age=5")], 5.0, id="error_ttl leaves a 200"),
        pytest.param("swr=30", 200, [("Cache-Control", "max-age=5")], 5.0, id="no ttl: freshness from headers"),
    ],
)
def test_apply_sets_the_operator_freshness(settings: str, status: int, headers: list[tuple[str, str]], freshness: float) -> None:
    assert rule(f"|~all|{settings}").apply(entry(headers, status)).freshness == freshness


def test_apply_leaves_the_stored_headers_alone() -> None:
    stored = entry([("Cache-Control", "private, max-age=5, must-revalidate")])
    applied = rule("|~all|ttl=90 swr=1 sie=2 override=private,must-revalidate").apply(stored)
    assert applied.headers == stored.headers


@pytest.mark.parametrize(
    "settings, cache_control, swr, sie, never_serve_stale",
    [
        pytest.param("swr=30 sie=60", "max-age=10", 30.0, 60.0, False, id="stale windows imposed"),
        pytest.param("swr=30 sie=60", "max-age=10, stale-while-revalidate=5, stale-if-error=5", 30.0, 60.0, False,
                     id="operator windows replace the origin's"),
        pytest.param("swr=30 sie=60", "max-age=10, must-revalidate", 0.0, 0.0, True, id="must-revalidate forbids"),
        pytest.param("swr=30 sie=60", "max-age=10, proxy-revalidate", 0.0, 0.0, True, id="proxy-revalidate forbids"),
        pytest.param("swr=30 sie=60", "s-maxage=10", 0.0, 0.0, True, id="s-maxage forbids"),
        pytest.param("swr=30 sie=60 override=must-revalidate", "max-age=10, must-revalidate", 30.0, 60.0, False,
                     id="override=must-revalidate allows must-revalidate"),
        pytest.param("swr=30 sie=60 override=must-revalidate", "max-age=10, proxy-revalidate", 30.0, 60.0, False,
                     id="override=must-revalidate allows proxy-revalidate"),
        pytest.param("swr=30 sie=60 override=must-revalidate", "s-maxage=10", 30.0, 60.0, False,
                     id="override=must-revalidate allows s-maxage"),
        pytest.param("swr=30 sie=60 override=no-cache", "no-cache, max-age=10", 30.0, 60.0, False,
                     id="override=no-cache: nothing left forbids stale"),
    ],
)
def test_apply_imposes_stale_windows_unless_upstream_forbids_stale(
    settings: str, cache_control: str, swr: float, sie: float, never_serve_stale: bool
) -> None:
    applied = rule(f"|~all|{settings}").apply(entry([("Cache-Control", cache_control)]))
    assert (applied.stale_while_revalidate, applied.stale_if_error, applied.never_serve_stale) == (swr, sie, never_serve_stale)


def test_override_no_cache_serves_without_validating_each_use() -> None:
    applied = rule("|~all|override=no-cache").apply(entry([("Cache-Control", "no-cache, max-age=10")]))
    assert not applied.requires_revalidation
    assert sem.decide(applied, sem.RequestDirectives(), NOW + 1).use is sem.Use.FRESH


def test_error_ttl_entry_expires_after_its_window() -> None:
    applied = rule("|~all|error_ttl=2").apply(entry([], 503))
    assert applied.is_fresh(NOW + 1.9)
    assert applied.retain_until() == pytest.approx(NOW + 2)


def test_label_names_the_rule_by_name_or_position() -> None:
    assert rule("|~all|ttl=1", 4).label == "policy=4"
    assert rule("|~all|ttl=1 name=catalog", 4).label == "policy=catalog"


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    "expr, url_only",
    [
        pytest.param("~d example.com", True, id="domain"),
        pytest.param("~u /v1/", True, id="url"),
        pytest.param("example.com", True, id="bare url"),
        pytest.param("~m GET & ~d a & !~u /x", True, id="method, domain and negated url"),
        pytest.param("~u /a | ~u /b", True, id="or of urls"),
        pytest.param("~all", True, id="all"),
        pytest.param("~hq X-Foo", False, id="request header"),
        pytest.param("~u /a & ~hq X-Foo", False, id="url and header"),
        pytest.param("!~h X-Foo", False, id="negated header"),
        pytest.param("~src 10.0.0.1", False, id="client address"),
        pytest.param("~bq secret", False, id="request body"),
    ],
)
def test_rule_knows_whether_its_filter_reads_only_the_url(expr: str, url_only: bool) -> None:
    assert rule(f"#{expr}#ttl=1").url_only is url_only  # "#": the filter may hold "|"


class Counting:
    """A filter that counts its evaluations."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, f: Any) -> bool:
        self.calls += 1
        return bool(self.inner(f))


def counted(spec: str, index: int = 1) -> tuple[Policy, Counting]:
    policy = rule(spec, index)
    counter = Counting(policy.matches)
    return dataclasses.replace(policy, matches=counter), counter


def match(policies: PolicySet, url: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Policy | None:
    f = flow(url, headers)
    return policies.match(f, (f.request.data.method, f.request.host, f.request.pretty_url))


def test_first_matching_rule_wins_and_no_match_is_none() -> None:
    policies = PolicySet([rule("|~u /api/v1/|ttl=1", 1), rule("|~u /api/|ttl=2", 2), rule("|~d other|ttl=3", 3)])
    assert match(policies, "http://h.example/api/v1/x").index == 1  # type: ignore[union-attr]
    assert match(policies, "http://h.example/api/v2/x").index == 2  # type: ignore[union-attr]
    assert match(policies, "http://h.example/static/x") is None
    assert not PolicySet() and PolicySet([rule("|~all|ttl=1")])


def test_url_only_rules_are_matched_once_per_url() -> None:
    first, c1 = counted("|~u /a|ttl=1", 1)
    second, c2 = counted("|~d h.example|ttl=2", 2)
    policies = PolicySet([first, second])
    for _ in range(3):
        assert match(policies, "http://h.example/b") is second
        assert match(policies, "http://h.example/a") is first
    assert (c1.calls, c2.calls) == (2, 1)
    assert match(policies, "http://h.example/b?x=1") is second  # another URL: evaluated again
    assert (c1.calls, c2.calls) == (3, 2)


def test_url_only_memo_remembers_no_match_too() -> None:
    only, counter = counted("|~u /a|ttl=1")
    policies = PolicySet([only])
    assert match(policies, "http://h.example/z") is None
    assert match(policies, "http://h.example/z") is None
    assert counter.calls == 1


def test_header_filter_is_evaluated_for_every_request() -> None:
    by_header, counter = counted("|~hq X-Foo|ttl=1", 1)
    fallback = rule("|~all|ttl=2", 2)
    policies = PolicySet([by_header, fallback])
    assert match(policies, "http://h.example/a", ((b"X-Foo", b"1"),)) is by_header
    assert match(policies, "http://h.example/a") is fallback
    assert match(policies, "http://h.example/a", ((b"X-Foo", b"1"),)) is by_header
    assert counter.calls == 3


def test_one_header_rule_turns_memoisation_off_for_the_set() -> None:
    # A URL-only rule after a header rule: what matches depends on the header, so nothing is memoised.
    by_url, counter = counted("|~u /a|ttl=1", 2)
    policies = PolicySet([rule("|~hq X-Foo|bypass", 1), by_url])
    assert match(policies, "http://h.example/a") is by_url
    assert match(policies, "http://h.example/a", ((b"X-Foo", b"1"),)).bypass  # type: ignore[union-attr]
    assert match(policies, "http://h.example/a") is by_url
    assert counter.calls == 2


def test_memo_is_bounded() -> None:
    only, _ = counted("|~u /a|ttl=1")
    policies = PolicySet([only])
    policies.MEMO_SIZE = 3
    for i in range(10):
        match(policies, f"http://h.example/a?{i}")
    assert policies._memo is not None and len(policies._memo) <= 3
