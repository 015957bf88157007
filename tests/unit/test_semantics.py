"""Table-driven tests of the pure semantics module: one case per rule, with its RFC section."""

from __future__ import annotations

import calendar
import math

import pytest

from mitmcache import semantics as sem
from mitmcache.semantics import NotStorable, RequestDirectives, Use

NOW = 1_800_000_000.0


def date(offset: float = 0.0) -> str:
    return sem.format_http_date(NOW + offset)


def entry(resp: list[tuple[str, str]], status: int = 200, req: list[tuple[str, str]] | None = None,
          body: bytes = b"body", request_time: float = NOW, response_time: float = NOW) -> sem.StoredResponse:
    return sem.make_stored_response(status, "OK", req or [], resp, body, request_time, response_time)


# --------------------------------------------------------------------------- storing (§3)

STORABILITY = [
    # (id, RFC, method, status, request headers, response headers, body length, expected)
    ("GET with max-age is stored", "§3", "GET", 200, [], [("Cache-Control", "max-age=60")], 10, None),
    ("HEAD never stored", "§3 (HEAD answered from GET)", "HEAD", 200, [], [("Cache-Control", "max-age=60")], 0, NotStorable.METHOD),
    ("POST not stored", "§3", "POST", 200, [], [("Cache-Control", "max-age=60")], 10, NotStorable.METHOD),
    ("206 not stored without range support", "§3.3", "GET", 206, [], [("Cache-Control", "max-age=60")], 10, NotStorable.STATUS),
    ("304 not stored", "§3", "GET", 304, [], [("Cache-Control", "max-age=60")], 0, NotStorable.STATUS),
    ("1xx not stored", "§3 final status", "GET", 103, [], [("Cache-Control", "max-age=60")], 0, NotStorable.STATUS),
    ("response no-store", "§5.2.2.5", "GET", 200, [], [("Cache-Control", "max-age=60, no-store")], 10, NotStorable.NO_STORE),
    ("request no-store", "§5.2.1.5", "GET", 200, [("Cache-Control", "no-store")], [("Cache-Control", "max-age=60")], 10, NotStorable.REQUEST_NO_STORE),
    ("private", "§5.2.2.7", "GET", 200, [], [("Cache-Control", "private, max-age=60")], 10, NotStorable.PRIVATE),
    ('private="x" treated as private', "§5.2.2.7", "GET", 200, [], [("Cache-Control", 'private="Set-Cookie", max-age=60')], 10, NotStorable.PRIVATE),
    ("Authorization without permission", "§3.5", "GET", 200, [("Authorization", "Bearer a")], [("Cache-Control", "max-age=60")], 10, NotStorable.AUTHORIZATION),
    ("Authorization with public", "§3.5", "GET", 200, [("Authorization", "Bearer a")], [("Cache-Control", "public, max-age=60")], 10, None),
    ("Authorization with s-maxage", "§3.5", "GET", 200, [("Authorization", "Bearer a")], [("Cache-Control", "s-maxage=60")], 10, None),
    ("Authorization with must-revalidate", "§3.5", "GET", 200, [("Authorization", "Bearer a")], [("Cache-Control", "max-age=60, must-revalidate")], 10, None),
    ("Set-Cookie not stored by default", "RFC 6265 §8.2", "GET", 200, [], [("Cache-Control", "public, max-age=60"), ("Set-Cookie", "a=b")], 10, NotStorable.SET_COOKIE),
    ("Vary: *", "RFC 9110 §12.5.5", "GET", 200, [], [("Cache-Control", "max-age=60"), ("Vary", "*")], 10, NotStorable.VARY_STAR),
    ("Vary: a, * anywhere", "RFC 9110 §12.5.5", "GET", 200, [], [("Cache-Control", "max-age=60"), ("Vary", "Accept"), ("Vary", "Origin, *")], 10, NotStorable.VARY_STAR),
    ("larger than max object", "spec §3", "GET", 200, [], [("Cache-Control", "max-age=60")], 101, NotStorable.TOO_LARGE),
    ("streamed body unknown", "spec §3", "GET", 200, [], [("Cache-Control", "max-age=60")], None, NotStorable.INCOMPLETE),
    ("302 without explicit freshness", "§3 / RFC 9110 §15.1", "GET", 302, [], [("Last-Modified", date(-3600))], 10, NotStorable.NOT_CACHEABLE),
    ("302 with max-age is stored", "§3", "GET", 302, [], [("Cache-Control", "max-age=60")], 10, None),
    ("404 heuristically cacheable", "RFC 9110 §15.1", "GET", 404, [], [], 10, None),
    ("200 no-cache is stored (revalidate each use)", "§5.2.2.4", "GET", 200, [], [("Cache-Control", "no-cache")], 10, None),
    ("500 without freshness", "§3", "GET", 500, [], [], 10, NotStorable.NOT_CACHEABLE),
]


@pytest.mark.parametrize("case", STORABILITY, ids=[c[0] for c in STORABILITY])
def test_storability(case: tuple) -> None:
    _id, _rfc, method, status, req, resp, length, expected = case
    assert sem.storability(method, status, req, resp, length, 100) == expected


# --------------------------------------------------------------------------- freshness (§4.2.1, §4.2.2)

FRESHNESS = [
    ("s-maxage beats max-age", "§4.2.1", 200, [("Cache-Control", "max-age=100, s-maxage=10"), ("Expires", date(1000))], (10.0, False)),
    ("max-age beats Expires", "§4.2.1", 200, [("Cache-Control", "max-age=100"), ("Expires", date(1000))], (100.0, False)),
    ("Expires - Date", "§4.2.1", 200, [("Date", date(-50)), ("Expires", date(50))], (100.0, False)),
    ("Expires without Date uses receipt time", "§4.2.1", 200, [("Expires", date(30))], (30.0, False)),
    ("invalid Expires means expired", "§5.3", 200, [("Expires", "0"), ("Last-Modified", date(-10000))], (0.0, False)),
    ("past Expires", "§5.3", 200, [("Date", date()), ("Expires", date(-10))], (0.0, False)),
    ("invalid max-age means stale", "§4.2.1", 200, [("Cache-Control", "max-age=abc"), ("Last-Modified", date(-10000))], (0.0, False)),
    ("first max-age wins", "§4.2.1", 200, [("Cache-Control", "max-age=5, max-age=50")], (5.0, False)),
    ("max-age over 2^31 is 2^31", "§1.2.2", 200, [("Cache-Control", "max-age=99999999999")], (float(2**31), False)),
    ("heuristic 10% of Date - Last-Modified", "§4.2.2", 200, [("Date", date()), ("Last-Modified", date(-1000))], (100.0, True)),
    ("heuristic is capped", "§4.2.2", 200, [("Date", date()), ("Last-Modified", date(-10**8))], (sem.DEFAULT_HEURISTIC_CAP, True)),
    ("no heuristic for 302", "§4.2.2", 302, [("Date", date()), ("Last-Modified", date(-1000))], (0.0, False)),
    ("no heuristic without Last-Modified", "§4.2.2", 200, [("Date", date())], (0.0, False)),
    ("Last-Modified in the future gives nothing", "§4.2.2", 200, [("Date", date()), ("Last-Modified", date(100))], (0.0, False)),
    ("Cache-Control split over lines", "§5.2", 200, [("Cache-Control", "public"), ("Cache-Control", "max-age=7")], (7.0, False)),
]


@pytest.mark.parametrize("case", FRESHNESS, ids=[c[0] for c in FRESHNESS])
def test_freshness_lifetime(case: tuple) -> None:
    _id, _rfc, status, headers, expected = case
    assert sem.freshness_lifetime(status, headers, NOW) == expected


AGE = [
    # (id, headers, request_time, response_time, expected corrected_initial_age)
    ("no Date no Age: response delay only", [], NOW - 2, NOW, 2.0),
    ("upstream Age adds delay", [("Age", "30")], NOW - 2, NOW, 32.0),
    ("apparent age from Date wins when larger", [("Date", date(-20)), ("Age", "5")], NOW, NOW, 20.0),
    ("Date in the future gives no negative age", [("Date", date(100))], NOW, NOW, 0.0),
    ("invalid Age ignored", [("Age", "-3")], NOW, NOW, 0.0),
]


@pytest.mark.parametrize("case", AGE, ids=[c[0] for c in AGE])
def test_corrected_initial_age_4_2_3(case: tuple) -> None:
    _id, headers, req_t, resp_t, expected = case
    assert sem.corrected_initial_age(headers, req_t, resp_t) == expected


def test_current_age_and_freshness_include_upstream_age() -> None:
    # §4.2.3/§4.2: max-age=300 with Age: 250 has 50 s left, not 300.
    e = entry([("Cache-Control", "max-age=300"), ("Age", "250")])
    assert e.age(NOW + 10) == 260
    assert e.is_fresh(NOW + 49)
    assert not e.is_fresh(NOW + 51)
    assert sem.age_header_value(e.age(NOW + 10.9)) == "260"


# --------------------------------------------------------------------------- request directives (§5.2.1)

REQUEST_CC = [
    ("no-cache", "§5.2.1.4", [("Cache-Control", "no-cache")], RequestDirectives(no_cache=True)),
    ("Pragma without Cache-Control", "§5.4", [("Pragma", "no-cache")], RequestDirectives(no_cache=True)),
    ("Pragma ignored with Cache-Control", "§5.4", [("Pragma", "no-cache"), ("Cache-Control", "max-stale")], RequestDirectives(max_stale=math.inf)),
    ("max-age=0", "§5.2.1.1", [("Cache-Control", "max-age=0")], RequestDirectives(max_age=0)),
    ("bare max-stale is unlimited", "§5.2.1.2", [("Cache-Control", "max-stale")], RequestDirectives(max_stale=math.inf)),
    ("max-stale=60", "§5.2.1.2", [("Cache-Control", "max-stale=60")], RequestDirectives(max_stale=60)),
    ("min-fresh", "§5.2.1.3", [("Cache-Control", "min-fresh=30")], RequestDirectives(min_fresh=30)),
    ("only-if-cached", "§5.2.1.7", [("Cache-Control", "only-if-cached")], RequestDirectives(only_if_cached=True)),
    ("no-store", "§5.2.1.5", [("Cache-Control", "NO-STORE")], RequestDirectives(no_store=True)),
]


@pytest.mark.parametrize("case", REQUEST_CC, ids=[c[0] for c in REQUEST_CC])
def test_request_directives(case: tuple) -> None:
    _id, _rfc, headers, expected = case
    assert RequestDirectives.from_headers(headers) == expected


def rd(cc: str) -> RequestDirectives:
    return RequestDirectives.from_headers([("Cache-Control", cc)] if cc else [])


DECIDE = [
    # (id, RFC, response headers, request CC, seconds after storing, expected Use)
    ("fresh", "§4.2", [("Cache-Control", "max-age=60")], "", 10, Use.FRESH),
    ("stale", "§4.2", [("Cache-Control", "max-age=60")], "", 61, Use.REVALIDATE),
    ("request no-cache", "§5.2.1.4", [("Cache-Control", "max-age=60")], "no-cache", 1, Use.REVALIDATE),
    ("request max-age=0", "§5.2.1.1", [("Cache-Control", "max-age=60")], "max-age=0", 1, Use.REVALIDATE),
    ("request max-age larger than age", "§5.2.1.1", [("Cache-Control", "max-age=60")], "max-age=30", 10, Use.FRESH),
    ("min-fresh satisfied", "§5.2.1.3", [("Cache-Control", "max-age=60")], "min-fresh=30", 10, Use.FRESH),
    ("min-fresh not satisfied", "§5.2.1.3", [("Cache-Control", "max-age=60")], "min-fresh=30", 40, Use.REVALIDATE),
    ("max-stale allows stale", "§5.2.1.2", [("Cache-Control", "max-age=60")], "max-stale=30", 80, Use.STALE_OK),
    ("max-stale too small", "§5.2.1.2", [("Cache-Control", "max-age=60")], "max-stale=10", 80, Use.REVALIDATE),
    ("bare max-stale", "§5.2.1.2", [("Cache-Control", "max-age=60")], "max-stale", 10**6, Use.STALE_OK),
    ("must-revalidate blocks max-stale", "§5.2.2.2", [("Cache-Control", "max-age=60, must-revalidate")], "max-stale", 80, Use.REVALIDATE),
    ("proxy-revalidate blocks max-stale", "§5.2.2.8", [("Cache-Control", "max-age=60, proxy-revalidate")], "max-stale", 80, Use.REVALIDATE),
    ("s-maxage blocks max-stale", "§5.2.2.10", [("Cache-Control", "s-maxage=60")], "max-stale", 80, Use.REVALIDATE),
    ("response no-cache always revalidates", "§5.2.2.4", [("Cache-Control", "no-cache, max-age=60")], "", 1, Use.REVALIDATE),
    ("swr window (background allowed)", "RFC 5861 §3", [("Cache-Control", "max-age=60, stale-while-revalidate=30")], "", 80, Use.STALE_WHILE_REVALIDATE),
    ("past swr window", "RFC 5861 §3", [("Cache-Control", "max-age=60, stale-while-revalidate=30")], "", 95, Use.REVALIDATE),
]


@pytest.mark.parametrize("case", DECIDE, ids=[c[0] for c in DECIDE])
def test_decide(case: tuple) -> None:
    _id, _rfc, resp, cc, after, expected = case
    assert sem.decide(entry(resp), rd(cc), NOW + after, allow_background_revalidation=True).use is expected


def test_swr_window_needs_background_revalidation() -> None:
    e = entry([("Cache-Control", "max-age=60, stale-while-revalidate=30")])
    assert sem.decide(e, rd(""), NOW + 80).use is Use.REVALIDATE


STALE_IF_ERROR = [
    ("inside window", "RFC 5861 §4", "max-age=60, stale-if-error=30", "", 80, True),
    ("past window", "RFC 5861 §4", "max-age=60, stale-if-error=30", "", 100, False),
    ("must-revalidate forbids", "§4.2.4", "max-age=60, stale-if-error=30, must-revalidate", "", 80, False),
    ("s-maxage forbids", "§4.2.4", "s-maxage=60, stale-if-error=30", "", 80, False),
    ("client max-stale narrows", "§5.2.1.2", "max-age=60, stale-if-error=30", "max-stale=5", 80, False),
]


@pytest.mark.parametrize("case", STALE_IF_ERROR, ids=[c[0] for c in STALE_IF_ERROR])
def test_stale_if_error_window(case: tuple) -> None:
    _id, _rfc, cc, req, after, expected = case
    assert sem.may_serve_stale_if_error(entry([("Cache-Control", cc)]), rd(req), NOW + after) is expected


# --------------------------------------------------------------------------- conditionals (RFC 9110 §13, RFC 9111 §4.3)

CONDITIONAL = [
    ("INM weak match", "RFC 9110 §13.1.2", [("If-None-Match", 'W/"a"')], [("ETag", '"a"')], True),
    ("INM list", "RFC 9110 §13.1.2", [("If-None-Match", '"x", "a"')], [("ETag", '"a"')], True),
    ("INM no match", "RFC 9110 §13.1.2", [("If-None-Match", '"b"')], [("ETag", '"a"')], False),
    ("INM star", "RFC 9110 §13.1.2", [("If-None-Match", "*")], [("ETag", '"a"')], True),
    ("INM takes precedence over IMS", "RFC 9110 §13.1.3", [("If-None-Match", '"b"'), ("If-Modified-Since", date())], [("ETag", '"a"'), ("Last-Modified", date(-100))], False),
    ("IMS not modified", "RFC 9110 §13.1.3", [("If-Modified-Since", date(-50))], [("Last-Modified", date(-100))], True),
    ("IMS modified since", "RFC 9110 §13.1.3", [("If-Modified-Since", date(-150))], [("Last-Modified", date(-100))], False),
    ("IMS falls back to Date", "§4.3.2", [("If-Modified-Since", date())], [("Date", date(-10))], True),
    ("invalid IMS ignored", "RFC 9110 §13.1.3", [("If-Modified-Since", "yesterday")], [("Last-Modified", date(-100))], False),
]


@pytest.mark.parametrize("case", CONDITIONAL, ids=[c[0] for c in CONDITIONAL])
def test_client_conditionals(case: tuple) -> None:
    _id, _rfc, req, resp, expected = case
    e = entry(resp + [("Cache-Control", "max-age=60")])
    assert sem.client_conditional_matches(req, e) is expected


def test_conditionals_only_for_2xx_entries() -> None:
    e = entry([("Cache-Control", "max-age=60"), ("ETag", '"a"')], status=404)
    assert not sem.client_conditional_matches([("If-None-Match", '"a"')], e)


def test_validators_for_revalidation_4_3_1() -> None:
    e = entry([("ETag", '"a"'), ("Last-Modified", date(-100)), ("Cache-Control", "max-age=1")])
    assert sem.validators_for(e) == [("If-None-Match", '"a"'), ("If-Modified-Since", date(-100))]


def test_304_merge_updates_headers_but_not_framing_3_2() -> None:
    e = entry(
        [("Cache-Control", "max-age=1"), ("ETag", '"a"'), ("Content-Length", "4"), ("X-Old", "1"),
         ("Content-Encoding", "gzip")],
        response_time=NOW - 100, request_time=NOW - 100,
    )
    assert not e.is_fresh(NOW)
    merged = sem.merge_304(
        e,
        [("Cache-Control", "max-age=60"), ("ETag", '"a"'), ("Content-Length", "0"), ("X-Old", "2"),
         ("Content-Encoding", "br"), ("Connection", "close"), ("Date", date())],
        NOW, NOW,
    )
    h = dict((k.lower(), v) for k, v in merged.headers)
    assert h["cache-control"] == "max-age=60"
    assert h["x-old"] == "2"
    assert h["content-length"] == "4"  # §3.2: Content-Length is not updated
    assert h["content-encoding"] == "gzip"
    assert "connection" not in h
    assert merged.body == e.body
    assert merged.is_fresh(NOW + 30)


VALIDATOR_304 = [
    ("same strong ETag", [("ETag", '"a"')], [("ETag", '"a"')], True),
    ("other ETag", [("ETag", '"b"')], [("ETag", '"a"')], False),
    ("no validator in 304 selects only a stored response without one", [], [("ETag", '"a"')], False),
    ("no validator in 304, none stored", [], [], True),
    ("Last-Modified matches", [("Last-Modified", date(-100))], [("Last-Modified", date(-100))], True),
    ("Last-Modified differs", [("Last-Modified", date(-50))], [("Last-Modified", date(-100))], False),
]


@pytest.mark.parametrize("case", VALIDATOR_304, ids=[c[0] for c in VALIDATOR_304])
def test_which_stored_response_a_304_updates_4_3_4(case: tuple) -> None:
    _id, resp304, stored, expected = case
    assert sem.validator_304_matches(entry(stored), resp304) is expected


# --------------------------------------------------------------------------- Vary (§4.1)


def test_vary_lines_combined_sorted_lowercased() -> None:
    assert sem.vary_names([("Vary", "Accept-Language, accept"), ("Vary", "Origin")]) == ("accept", "accept-language", "origin")


VARY_MATCH = [
    ("same value", [("Accept-Language", "en")], [("Accept-Language", "en")], True),
    ("case-insensitive field lower-cased", [("Accept-Language", "en-US")], [("Accept-Language", "EN-us")], True),
    ("whitespace collapsed", [("Accept-Encoding", "gzip,  br")], [("Accept-Encoding", "gzip, br")], True),
    ("multiple lines combined", [("Accept-Encoding", "gzip"), ("Accept-Encoding", "br")], [("Accept-Encoding", "gzip, br")], True),
    ("different value", [("Accept-Language", "en")], [("Accept-Language", "de")], False),
    ("missing differs from empty", [], [("Accept-Language", "")], False),
    ("case-sensitive field kept", [("X-Tenant", "Acme")], [("X-Tenant", "acme")], False),
]


@pytest.mark.parametrize("case", VARY_MATCH, ids=[c[0] for c in VARY_MATCH])
def test_vary_matching(case: tuple) -> None:
    _id, stored_req, new_req, expected = case
    names = "accept-language, accept-encoding, x-tenant"
    e = entry([("Cache-Control", "max-age=60"), ("Vary", names)], req=stored_req)
    assert sem.variant_matches(e, new_req) is expected


def test_select_most_recent_matching_variant_4_1() -> None:
    old = entry([("Vary", "Accept")], req=[("Accept", "a")], response_time=NOW - 10, body=b"old")
    new = entry([("Vary", "Accept")], req=[("Accept", "a")], response_time=NOW, body=b"new")
    other = entry([("Vary", "Accept")], req=[("Accept", "b")], body=b"other")
    assert sem.select_variant([old, other, new], [("Accept", "a")]).body == b"new"  # type: ignore[union-attr]
    assert sem.select_variant([old, new], [("Accept", "c")]) is None


# --------------------------------------------------------------------------- hygiene


def test_hop_by_hop_and_connection_named_fields_not_stored_3_1() -> None:
    e = entry([("Connection", "X-Private, close"), ("X-Private", "1"), ("Keep-Alive", "5"),
               ("Transfer-Encoding", "chunked"), ("Age", "3"), ("X-Cache-Status", "HIT"), ("ETag", '"a"')])
    assert [k for k, _ in e.headers] == ["ETag", "Date"]  # Date added: none was received (RFC 9110 §6.6.1)


def test_not_modified_headers_are_the_304_set() -> None:
    e = entry([("Cache-Control", "max-age=60"), ("ETag", '"a"'), ("Content-Type", "text/plain"), ("Content-Length", "4")])
    assert {k.lower() for k, _ in sem.not_modified_headers(e)} == {"cache-control", "etag", "date"}


def test_retention_bounds_no_cache_entries() -> None:
    # reference W17: TTL-0 entries must not live forever.
    e = entry([("Cache-Control", "no-cache"), ("ETag", '"a"')])
    assert NOW < e.retain_until() <= NOW + 3600


def test_cache_status_rendering_rfc_9211() -> None:
    s = sem.CacheStatus(fwd="uri-miss", fwd_status=200, stored=True, ttl=59)
    assert s.render() == "mitmcache; fwd=uri-miss; fwd-status=200; stored; ttl=59"
    assert sem.CacheStatus(hit=True, ttl=3, detail=["l1"]).render() == "mitmcache; hit; ttl=3; detail=l1"


@pytest.mark.parametrize("value", ["", "garbage", "Sun, 99 Foo 2026 99:99:99 GMT", "\x00\xff", "Mon, 01 Jan 99999 00:00:00 GMT"])
def test_bad_dates_are_ignored_not_raised(value: str) -> None:
    assert sem.parse_http_date(value) is None


def test_http_date_formats_rfc_9110_5_6_7() -> None:
    expected = 784111777.0
    assert sem.parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == expected
    assert sem.parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT") == expected
    assert sem.parse_http_date("Sun Nov  6 08:49:37 1994") == expected


MALFORMED = [
    ("valid", [("Cache-Control", "max-age=5"), ("Date", date()), ("Age", "3")], []),
    ("bad max-age", [("Cache-Control", "max-age=x")], ["cache-control"]),
    ("bad stale-if-error", [("Cache-Control", "stale-if-error=1.5")], ["cache-control"]),
    ("bad Date", [("Date", "nope")], ["date"]),
    ("bad Last-Modified", [("Last-Modified", "nope")], ["last-modified"]),
    ("Expires 0 is an idiom", [("Expires", "0")], []),
    ("bad Expires", [("Expires", "soon")], ["expires"]),
    ("bad Age", [("Age", "old")], ["age"]),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_fields_reported(case: tuple) -> None:
    _id, headers, expected = case
    assert sem.malformed_fields(headers) == expected


HEAD_FRESHEN = [
    ("same validators: freshened", [("ETag", '"a"'), ("Content-Length", "4"), ("Cache-Control", "max-age=60")], True),
    ("no validators in HEAD: freshened", [("Cache-Control", "max-age=60")], True),
    ("other ETag: marked stale", [("ETag", '"b"'), ("Cache-Control", "max-age=60")], False),
    ("other length: marked stale", [("Content-Length", "99"), ("Cache-Control", "max-age=60")], False),
]


@pytest.mark.parametrize("case", HEAD_FRESHEN, ids=[c[0] for c in HEAD_FRESHEN])
def test_head_response_freshens_or_marks_stale_4_3_5(case: tuple) -> None:
    _id, head, fresh_after = case
    old = entry([("Cache-Control", "max-age=1"), ("ETag", '"a"')], response_time=NOW - 100, request_time=NOW - 100)
    updated = sem.freshen_with_head(old, head, NOW, NOW)
    assert updated.is_fresh(NOW + 1) is fresh_after
    assert updated.body == old.body


RANGES = [
    # (id, request headers, expected) against a 10-byte stored 200 with ETag "a"
    ("no Range", [], None),
    ("first bytes", [("Range", "bytes=0-3")], (0, 3)),
    ("open end", [("Range", "bytes=7-")], (7, 9)),
    ("end past length is clipped", [("Range", "bytes=5-100")], (5, 9)),
    ("suffix", [("Range", "bytes=-3")], (7, 9)),
    ("suffix longer than body", [("Range", "bytes=-50")], (0, 9)),
    ("start past end: 416", [("Range", "bytes=10-")], sem.UNSATISFIABLE),
    ("zero suffix: 416", [("Range", "bytes=-0")], sem.UNSATISFIABLE),
    ("several ranges: whole", [("Range", "bytes=0-1,4-5")], None),
    ("other unit: whole", [("Range", "items=0-1")], None),
    ("garbage: whole", [("Range", "bytes=x-y")], None),
    ("reversed: whole", [("Range", "bytes=5-2")], None),
    ("If-Range matching ETag", [("Range", "bytes=0-1"), ("If-Range", '"a"')], (0, 1)),
    ("If-Range other ETag: whole", [("Range", "bytes=0-1"), ("If-Range", '"b"')], None),
    ("If-Range weak never matches", [("Range", "bytes=0-1"), ("If-Range", 'W/"a"')], None),
    ("If-Range date matching", [("Range", "bytes=0-1"), ("If-Range", date(-100))], (0, 1)),
    ("If-Range other date: whole", [("Range", "bytes=0-1"), ("If-Range", date(-50))], None),
]


@pytest.mark.parametrize("case", RANGES, ids=[c[0] for c in RANGES])
def test_byte_ranges_from_a_stored_200_rfc_9110_14(case: tuple) -> None:
    _id, req, expected = case
    e = entry([("Cache-Control", "max-age=60"), ("ETag", '"a"'), ("Last-Modified", date(-100))], body=b"0123456789")
    assert sem.select_range(req, e) == expected


def test_no_ranges_from_other_statuses() -> None:
    e = entry([("Cache-Control", "max-age=60")], status=404, body=b"0123456789")
    assert sem.select_range([("Range", "bytes=0-1")], e) is None


# --------------------------------------------------------------------------- HTTP-date grammar (RFC 9110 §5.6.7)

# RFC 850 two-digit years are read relative to this clock (passed as now=): 2026-01-15.
DATE_NOW = float(calendar.timegm((2026, 1, 15, 0, 0, 0)))


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return float(calendar.timegm((year, month, day, hour, minute, second)))


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param("Sun, 06 Nov 1994 08:49:37 GMT", utc(1994, 11, 6, 8, 49, 37), id="IMF-fixdate §5.6.7"),
        pytest.param("Thu, 18 Aug 2050 02:01:18 GMT", utc(2050, 8, 18, 2, 1, 18), id="IMF-fixdate in the future §5.6.7"),
        pytest.param("Thu, 29 Feb 2024 00:00:00 GMT", utc(2024, 2, 29), id="IMF-fixdate leap day §5.6.7"),
        pytest.param("Sun, 06 Nov 1994 08:49:37 GMT ", utc(1994, 11, 6, 8, 49, 37), id="surrounding OWS is not part of the field value §5.5"),
        pytest.param("Sunday, 06-Nov-94 08:49:37 GMT", utc(1994, 11, 6, 8, 49, 37), id="rfc850-date: 94 is 76 years ahead, so 1994 §5.6.7"),
        pytest.param("Thursday, 18-Aug-50 02:01:18 GMT", utc(2050, 8, 18, 2, 1, 18), id="rfc850-date: 50 is 24 years ahead, so 2050 §5.6.7"),
        pytest.param("Wednesday, 01-Jan-75 00:00:00 GMT", utc(2075, 1, 1), id="rfc850-date: 49 years ahead stays in this century §5.6.7"),
        pytest.param("Friday, 01-Jan-77 00:00:00 GMT", utc(1977, 1, 1), id="rfc850-date: 51 years ahead is the past century §5.6.7"),
        pytest.param("Thursday, 01-Jan-26 00:00:00 GMT", utc(2026, 1, 1), id="rfc850-date: this year §5.6.7"),
        pytest.param("Friday, 31-Dec-99 23:59:59 GMT", utc(1999, 12, 31, 23, 59, 59), id="rfc850-date: 99 is 1999 §5.6.7"),
        pytest.param(
            "Tuesday, 01-Dec-76 00:00:00 GMT", utc(1976, 12, 1),
            id="rfc850-date: a timestamp 50 years 10 months ahead is the past century §5.6.7",
        ),
        pytest.param("Sun Nov  6 08:49:37 1994", utc(1994, 11, 6, 8, 49, 37), id="asctime-date: one-digit day after two spaces §5.6.7"),
        pytest.param("Wed Nov 16 08:49:37 1994", utc(1994, 11, 16, 8, 49, 37), id="asctime-date: two-digit day §5.6.7"),
        pytest.param("Sun Nov 06 08:49:37 1994", utc(1994, 11, 6, 8, 49, 37), id="asctime-date: date3 allows 2DIGIT §5.6.7"),
        pytest.param("Wed, 31 Dec 2025 23:59:60 GMT", utc(2025, 12, 31, 23, 59, 59), id="leap second 60 accepted (clamped to 59) §5.6.7"),
    ],
)
def test_http_date_accepts_the_three_forms_5_6_7(value: str, expected: float) -> None:
    assert sem.parse_http_date(value, now=DATE_NOW) == expected


INVALID_HTTP_DATES = [
    pytest.param("Thu, 18 Aug 2050 02:01:18 UTC", id="UTC is not GMT"),
    pytest.param("Thu, 18 Aug 2050 02:01:18 +1000", id="numeric zone"),
    pytest.param("Thu, 18 Aug 2050 02:01:18 +0000", id="numeric zone even +0000"),
    pytest.param("Thu, 18 Aug 2050 02:01:18", id="no zone"),
    pytest.param("Thu, 18 Aug 50 02:01:18 GMT", id="two-digit year in IMF-fixdate"),
    pytest.param("Thu 18 Aug 2050 02:01:18 GMT", id="missing comma"),
    pytest.param("Thu,  18 Aug 2050 02:01:18 GMT", id="doubled space"),
    pytest.param("Thu,\t18 Aug 2050 02:01:18 GMT", id="HTAB for SP"),
    pytest.param("Thu, 18-Aug-2050 02:01:18 GMT", id="dashes in IMF-fixdate"),
    pytest.param("Thu, 18 Aug 2050 02.01.18 GMT", id="periods in time-of-day"),
    pytest.param("Thu, 18 Aug 2050 2:01:18 GMT", id="one-digit hour"),
    pytest.param("Thu, 8 Aug 2050 02:01:18 GMT", id="one-digit day in IMF-fixdate"),
    pytest.param("Thu, 18 Aug 2050 02:01:18 gmt", id="lower-case gmt (case-sensitive)"),
    pytest.param("thu, 18 Aug 2050 02:01:18 GMT", id="lower-case day-name (case-sensitive)"),
    pytest.param("Thu, 18 aug 2050 02:01:18 GMT", id="lower-case month (case-sensitive)"),
    pytest.param("Thu, 18 August 2050 02:01:18 GMT", id="long month name"),
    pytest.param("Thursday, 18 Aug 2050 02:01:18 GMT", id="long day-name in IMF-fixdate"),
    pytest.param("Thursday, 18-Aug-2050 02:01:18 GMT", id="four-digit year in rfc850-date"),
    pytest.param("Thu, 18-Aug-50 02:01:18 GMT", id="short day-name in rfc850-date"),
    pytest.param("Thu Aug 18 02:01:18 50", id="two-digit year in asctime-date"),
    pytest.param("Thu, \u0661\u0668 Aug 2050 02:01:18 GMT", id="Arabic-Indic digits"),
    pytest.param("Thu, 18 Aug \uff12\uff10\uff15\uff10 02:01:18 GMT", id="fullwidth digits"),
    pytest.param("Thu, 30 Feb 2050 02:01:18 GMT", id="Feb 30"),
    pytest.param("Thu, 18 Aug 2050 24:00:00 GMT", id="hour 24"),
    pytest.param("Thu, 18 Aug 2050 02:60:18 GMT", id="minute 60"),
    pytest.param("", id="empty"),
    pytest.param(None, id="None"),
]


@pytest.mark.parametrize("value", INVALID_HTTP_DATES)
def test_http_date_rejects_anything_else_5_6_7(value: str | None) -> None:
    assert sem.parse_http_date(value, now=DATE_NOW) is None


# Expires: 2030-01-01 00:00:00 GMT, a Tuesday; Date: NOW.
EXPIRES_AT = utc(2030, 1, 1)


@pytest.mark.parametrize(
    "expires, expected",
    [
        pytest.param("Tue, 01 Jan 2030 00:00:00 GMT", (EXPIRES_AT - NOW, False), id="IMF-fixdate Expires - Date §4.2.1"),
        pytest.param("Tuesday, 01-Jan-30 00:00:00 GMT", (EXPIRES_AT - NOW, False), id="rfc850-date Expires - Date §4.2.1"),
        pytest.param("Tue Jan  1 00:00:00 2030", (EXPIRES_AT - NOW, False), id="asctime-date Expires - Date §4.2.1"),
    ],
)
def test_expires_in_any_http_date_form_gives_its_lifetime_4_2_1(expires: str, expected: tuple[float, bool]) -> None:
    assert sem.freshness_lifetime(200, [("Date", date()), ("Expires", expires)], NOW) == expected


@pytest.mark.parametrize("expires", [p for p in INVALID_HTTP_DATES if p.values[0] is not None])
def test_expires_that_is_not_an_http_date_means_stale_5_3(expires: str) -> None:
    assert sem.freshness_lifetime(200, [("Date", date()), ("Expires", expires)], NOW) == (0.0, False)


# --------------------------------------------------------------------------- Age (RFC 9111 §5.1)


@pytest.mark.parametrize(
    "headers, expected",
    [
        pytest.param([("Age", "7200, 0")], 7200.0, id="list: first member used §5.1"),
        pytest.param([("Age", "0, 7200")], 0.0, id="list: later members discarded §5.1"),
        pytest.param([("Age", "7200"), ("Age", "0")], 7200.0, id="two lines: first used §5.1"),
        pytest.param([("Age", "abc, 5")], 0.0, id="invalid first member: field ignored §5.1"),
        pytest.param([("Age", "-3, 5")], 0.0, id="negative first member: field ignored §5.1"),
        pytest.param([("Age", "abc"), ("Age", "5")], 0.0, id="invalid first line: field ignored §5.1"),
    ],
)
def test_age_list_uses_its_first_member_5_1(headers: list[tuple[str, str]], expected: float) -> None:
    assert sem.corrected_initial_age(headers, NOW, NOW) == expected


def test_age_list_first_member_makes_a_max_age_response_stale_5_1() -> None:
    e = entry([("Cache-Control", "max-age=3600"), ("Age", "7200, 0")])
    assert e.initial_age >= 7200
    assert not e.is_fresh(NOW)


@pytest.mark.parametrize(
    "headers, expected",
    [
        pytest.param([("Age", "7200, 0")], [], id="list with a valid first member is not malformed"),
        pytest.param([("Age", "abc, 5")], ["age"], id="invalid first member is reported"),
        pytest.param([("Age", "abc"), ("Age", "5")], ["age"], id="invalid first line is reported"),
    ],
)
def test_malformed_age_is_reported_5_1(headers: list[tuple[str, str]], expected: list[str]) -> None:
    assert sem.malformed_fields(headers) == expected


# --------------------------------------------------------------------------- delta-seconds (RFC 9111 §1.2.2)

HUGE = "9" * 5000  # int() refuses more than 4,300 digits: the parser must not call it


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param(HUGE, 2**31, id="5,000 digits is 2^31 §1.2.2"),
        pytest.param("1" + "0" * 4999, 2**31, id="5,000 digits from 1 is 2^31 §1.2.2"),
        pytest.param("0" * 4999 + "7", 7, id="5,000 digits with leading zeros is 7 §1.2.2"),
        pytest.param("2147483647", 2**31 - 1, id="2^31 - 1 kept §1.2.2"),
        pytest.param("2147483648", 2**31, id="2^31 §1.2.2"),
        pytest.param("99999999999", 2**31, id="beyond 2^31 is 2^31 §1.2.2"),
        pytest.param("00060", 60, id="leading zeros §1.2.2"),
        pytest.param("0", 0, id="zero §1.2.2"),
        pytest.param('"60"', 60, id="quoted-string form accepted §5.2"),
        pytest.param("\u00b2", None, id="superscript two is not a DIGIT §1.2.2"),
        pytest.param("\u0666\u0660", None, id="Arabic-Indic digits are not DIGITs §1.2.2"),
        pytest.param("-1", None, id="negative §1.2.2"),
        pytest.param("+5", None, id="sign §1.2.2"),
        pytest.param("1.5", None, id="decimal §1.2.2"),
        pytest.param("1e3", None, id="exponent §1.2.2"),
        pytest.param("", None, id="empty §1.2.2"),
        pytest.param(None, None, id="absent"),
    ],
)
def test_delta_seconds_1_2_2(value: str | None, expected: int | None) -> None:
    assert sem.parse_delta_seconds(value) == expected


@pytest.mark.parametrize(
    "cc, max_age, s_maxage, invalid",
    [
        pytest.param(f"max-age={HUGE}", 2**31, None, False, id="5,000-digit max-age is 2^31 §1.2.2"),
        pytest.param(f"s-maxage={HUGE}", None, 2**31, False, id="5,000-digit s-maxage is 2^31 §1.2.2"),
        pytest.param("max-age=00060", 60, None, False, id="max-age=00060 is 60 §1.2.2"),
        pytest.param("max-age=\u00b2", None, None, True, id="max-age=superscript two is invalid §4.2.1"),
    ],
)
def test_response_delta_seconds_1_2_2(cc: str, max_age: int | None, s_maxage: int | None, invalid: bool) -> None:
    d = sem.ResponseDirectives.from_headers([("Cache-Control", cc)])
    assert (d.max_age, d.s_maxage, d.invalid_freshness) == (max_age, s_maxage, invalid)


@pytest.mark.parametrize(
    "cc, expected",
    [
        pytest.param(f"max-age={HUGE}", (2**31, None, None), id="5,000-digit max-age is 2^31 §1.2.2"),
        pytest.param(f"min-fresh={HUGE}", (None, 2**31, None), id="5,000-digit min-fresh is 2^31 §1.2.2"),
        pytest.param(f"max-stale={HUGE}", (None, None, 2**31), id="5,000-digit max-stale is 2^31 §1.2.2"),
        pytest.param("max-age=00060, min-fresh=007, max-stale=0030", (60, 7, 30), id="leading zeros §1.2.2"),
        pytest.param("max-age=\u00b2, min-fresh=\u00b2, max-stale=\u00b2", (None, None, None), id="superscript two ignored §1.2.2"),
    ],
)
def test_request_delta_seconds_1_2_2(cc: str, expected: tuple[int | None, int | None, float | None]) -> None:
    d = RequestDirectives.from_headers([("Cache-Control", cc)])
    assert (d.max_age, d.min_fresh, d.max_stale) == expected


@pytest.mark.parametrize(
    "age, expected",
    [
        pytest.param(HUGE, float(2**31), id="5,000-digit Age is 2^31 §1.2.2"),
        pytest.param("00060", 60.0, id="Age 00060 is 60 §1.2.2"),
        pytest.param("\u00b2", 0.0, id="Age superscript two is ignored §5.1"),
    ],
)
def test_age_delta_seconds_1_2_2(age: str, expected: float) -> None:
    assert sem.corrected_initial_age([("Age", age)], NOW, NOW) == expected


def test_five_thousand_digit_max_age_gives_a_2_31_lifetime() -> None:
    assert sem.freshness_lifetime(200, [("Cache-Control", f"max-age={HUGE}")], NOW) == (float(2**31), False)


# --------------------------------------------------------------------------- targeted Cache-Control (RFC 9213)

TARGETS = ("mitmcache-cache-control", "cdn-cache-control")
CC_60 = ("Cache-Control", "max-age=60")


@pytest.mark.parametrize(
    "headers, targets, expected",
    [
        pytest.param([CC_60, ("CDN-Cache-Control", "private")], TARGETS, NotStorable.PRIVATE, id="CDN private beats Cache-Control RFC 9213 §2.2"),
        pytest.param([CC_60, ("CDN-Cache-Control", "no-store")], TARGETS, NotStorable.NO_STORE, id="CDN no-store beats Cache-Control RFC 9213 §2.2"),
        pytest.param([CC_60, ("CDN-Cache-Control", "no-cache")], TARGETS, None, id="CDN no-cache: stored, validated on use RFC 9213 §2.2"),
        pytest.param([("Cache-Control", "private"), ("CDN-Cache-Control", "max-age=60")], TARGETS, None, id="Cache-Control private ignored when targeted RFC 9213 §2.2"),
        pytest.param([("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=60")], TARGETS, None, id="Cache-Control no-store ignored when targeted RFC 9213 §2.2"),
        pytest.param([CC_60, ("CDN-Cache-Control", "max-age=60"), ("Mitmcache-Cache-Control", "no-store")], TARGETS, NotStorable.NO_STORE, id="first target wins RFC 9213 §2.2"),
        pytest.param([CC_60, ("CDN-Cache-Control", "private"), ("Mitmcache-Cache-Control", "max-age=5")], TARGETS, None, id="later target ignored RFC 9213 §2.2"),
        pytest.param([CC_60, ("CDN-Cache-Control", 'private, ,, "')], TARGETS, None, id="invalid targeted field falls back RFC 9213 §2.1"),
        pytest.param([CC_60, ("CDN-Cache-Control", "Private")], TARGETS, None, id="upper-case key is invalid: falls back RFC 9213 §2.1"),
        pytest.param([CC_60, ("CDN-Cache-Control", "")], TARGETS, None, id="empty targeted field falls back RFC 9213 §2.2"),
        pytest.param([CC_60, ("CDN-Cache-Control", "private")], (), None, id="without targets CDN-Cache-Control is ignored"),
        pytest.param([("Cache-Control", "private"), ("CDN-Cache-Control", "max-age=60")], (), NotStorable.PRIVATE, id="without targets Cache-Control governs"),
        pytest.param(
            [("Cache-Control", "private"), ("CDN-Cache-Control", "max-age=60,, public")], TARGETS, NotStorable.PRIVATE,
            id="empty list member is a Structured Field parse error: falls back RFC 9213 §2.1 RFC 8941 §4.2.2",
        ),
    ],
)
def test_targeted_field_decides_storability_rfc_9213(
    headers: list[tuple[str, str]], targets: tuple[str, ...], expected: NotStorable | None
) -> None:
    assert sem.storability("GET", 200, [], headers, 10, 100, targets) == expected


@pytest.mark.parametrize(
    "headers, targets, expected",
    [
        pytest.param([("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "max-age=10")], TARGETS, (10.0, False), id="CDN max-age overrides Cache-Control RFC 9213 §2.2"),
        pytest.param([("Cache-Control", "s-maxage=600"), ("CDN-Cache-Control", "max-age=10")], TARGETS, (10.0, False), id="CDN max-age overrides Cache-Control s-maxage RFC 9213 §2.2"),
        pytest.param(
            [("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "max-age=10"), ("Mitmcache-Cache-Control", "max-age=5")],
            TARGETS, (5.0, False), id="Mitmcache-Cache-Control beats CDN-Cache-Control RFC 9213 §2.2",
        ),
        pytest.param(
            [("Date", date()), ("Expires", date(600)), ("CDN-Cache-Control", "must-revalidate")],
            TARGETS, (0.0, False), id="targeted field makes Expires ignored RFC 9213 §2.2",
        ),
        pytest.param([("Date", date()), ("Expires", date(600)), ("CDN-Cache-Control", "max-age=10")], TARGETS, (10.0, False), id="targeted max-age over Expires RFC 9213 §2.2"),
        pytest.param([("Date", date()), ("Expires", date(600)), ("CDN-Cache-Control", "Max-Age=10")], TARGETS, (600.0, False), id="invalid targeted field: Expires used RFC 9213 §2.1"),
        pytest.param([("Cache-Control", "max-age=600"), ("CDN-Cache-Control", 'max-age=10, ,, "')], TARGETS, (600.0, False), id="unterminated quote: falls back RFC 9213 §2.1"),
        pytest.param([("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "Max-Age=10")], TARGETS, (600.0, False), id="upper-case key: falls back RFC 9213 §2.1"),
        pytest.param([("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "max-age = 10")], TARGETS, (600.0, False), id="spaces around = : falls back RFC 9213 §2.1"),
        pytest.param(
            [("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "max-age=10"), ("Mitmcache-Cache-Control", "Max-Age=5")],
            TARGETS, (10.0, False), id="invalid first target falls back to the next RFC 9213 §2.2",
        ),
        pytest.param([("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "")], TARGETS, (600.0, False), id="empty targeted field falls back RFC 9213 §2.2"),
        pytest.param([("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "max-age=10")], (), (600.0, False), id="without targets CDN-Cache-Control is ignored"),
        pytest.param(
            [("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "max-age=10"), ("Mitmcache-Cache-Control", "max-age=5")],
            ("cdn-cache-control",), (10.0, False), id="a field not on the target list is ignored RFC 9213 §2.2",
        ),
        pytest.param(
            [("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "max-age=10;foo=1")], TARGETS, (10.0, False),
            id="parameters on a directive are ignored RFC 9213 §2.1",
        ),
        pytest.param(
            [("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "max-age=1234567890123456")], TARGETS, (600.0, False),
            id="16-digit sf-integer is a parse error: falls back RFC 9213 §2.1 RFC 8941 §3.3.1",
        ),
    ],
)
def test_targeted_field_decides_freshness_rfc_9213(
    headers: list[tuple[str, str]], targets: tuple[str, ...], expected: tuple[float, bool]
) -> None:
    assert sem.freshness_lifetime(200, headers, NOW, targets=targets) == expected


@pytest.mark.parametrize(
    "targets, requires_revalidation",
    [
        pytest.param(TARGETS, True, id="CDN no-cache: validate on every use RFC 9213 §2.2 RFC 9111 §5.2.2.4"),
        pytest.param((), False, id="without targets: Cache-Control max-age=60 governs"),
    ],
)
def test_targeted_no_cache_requires_revalidation_rfc_9213(targets: tuple[str, ...], requires_revalidation: bool) -> None:
    e = sem.make_stored_response(200, "OK", [], [CC_60, ("CDN-Cache-Control", "no-cache")], b"b", NOW, NOW, targets=targets)
    assert e.requires_revalidation is requires_revalidation
    expected = Use.REVALIDATE if requires_revalidation else Use.FRESH
    assert sem.decide(e, rd(""), NOW + 1).use is expected


def test_targeted_field_hides_expires_from_the_explicit_freshness_test_rfc_9213() -> None:
    # RFC 9111 §3: a 302 is stored only with explicit freshness; RFC 9213 §2.2: Expires is ignored.
    headers = [("Date", date()), ("Expires", date(600)), ("CDN-Cache-Control", "must-revalidate")]
    assert sem.storability("GET", 302, [], headers, 10, 100, TARGETS) == NotStorable.NOT_CACHEABLE
    assert sem.storability("GET", 302, [], headers, 10, 100, ()) is None


# --------------------------------------------------------------------------- which stored response a 304 updates (§4.3.4)


@pytest.mark.parametrize(
    "stored, not_modified, expected",
    [
        pytest.param([("ETag", 'W/"abc"')], [("ETag", '"abc"')], False, id="strong 304 ETag never selects a weak stored one §4.3.4"),
        pytest.param([("ETag", '"abc"')], [("ETag", '"abc"')], True, id="strong ETags equal §4.3.4"),
        pytest.param([("ETag", 'W/"abc"')], [("ETag", 'W/"abc"')], True, id="weak ETags equal §4.3.4"),
        pytest.param([("ETag", '"abc"')], [("ETag", 'W/"abc"')], True, id="weak 304 ETag selects by weak comparison §4.3.4"),
        pytest.param([("ETag", '"abc"')], [("ETag", 'W/"xyz"')], False, id="weak 304 ETag of another representation §4.3.4"),
        pytest.param([("ETag", 'W/"abc"')], [("ETag", '"xyz"')], False, id="strong 304 ETag of another representation §4.3.4"),
        pytest.param([], [("ETag", '"abc"')], False, id="stored response without ETag is not selected by one §4.3.4"),
        pytest.param([("ETag", '"abc"'), ("Last-Modified", date(-100))], [("Last-Modified", date(-100))], True, id="304 with Last-Modified only, equal §4.3.4"),
        pytest.param([("ETag", '"abc"'), ("Last-Modified", date(-100))], [("Last-Modified", date(-50))], False, id="304 with Last-Modified only, different §4.3.4"),
        pytest.param([("Last-Modified", date(-100))], [("Last-Modified", date(-100))], True, id="Last-Modified only on both, equal §4.3.4"),
        pytest.param([], [], True, id="no validator on either side: the one stored response §4.3.4"),
        pytest.param(
            [("ETag", '"abc"')], [("Last-Modified", date(-100))], False,
            id="304 Last-Modified does not correspond to a stored response without one §4.3.4",
        ),
    ],
)
def test_304_selects_stored_response_by_validator_4_3_4(
    stored: list[tuple[str, str]], not_modified: list[tuple[str, str]], expected: bool
) -> None:
    assert sem.validator_304_matches(entry(stored + [("Cache-Control", "max-age=1")]), not_modified) is expected


# --------------------------------------------------------------------------- updating a stored entry (§3.2, §4.3.4, §4.3.5)


def stale_entry() -> sem.StoredResponse:
    return entry([("Cache-Control", "max-age=1"), ("ETag", '"a"')], body=b"body", request_time=NOW - 100, response_time=NOW - 100)


def via_304(e: sem.StoredResponse, headers: list[tuple[str, str]], targets: tuple[str, ...] = ()) -> sem.StoredResponse:
    return sem.merge_304(e, headers, NOW, NOW, targets=targets)


def via_head(e: sem.StoredResponse, headers: list[tuple[str, str]], targets: tuple[str, ...] = ()) -> sem.StoredResponse:
    # No ETag, Last-Modified or Content-Length in the HEAD response: it freshens like a 304.
    return sem.freshen_with_head(e, headers, NOW, NOW, targets=targets)


UPDATES = [pytest.param(via_304, id="304 §4.3.4"), pytest.param(via_head, id="HEAD §4.3.5")]


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param(("Set-Cookie", "session=secret-a"), id="Set-Cookie"),
        pytest.param(("set-cookie", "session=secret-a"), id="set-cookie lower-case"),
        pytest.param(("SET-COOKIE", "session=secret-a"), id="SET-COOKIE upper-case"),
        pytest.param(("Set-Cookie2", "session=secret-a"), id="Set-Cookie2"),
    ],
)
def test_update_never_stores_set_cookie_rfc_6265_8_2(update, cookie: tuple[str, str]) -> None:  # type: ignore[no-untyped-def]
    merged = update(stale_entry(), [("Cache-Control", "max-age=60"), cookie, ("X-New", "1")])
    names = {k.lower() for k, _ in merged.headers}
    assert not names & {"set-cookie", "set-cookie2"}
    assert not any("secret-a" in v for _, v in merged.headers)
    assert "x-new" in names  # the other fields were merged
    assert merged.is_fresh(NOW + 30)


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize(
    "headers, targets, expected",
    [
        pytest.param([("Cache-Control", "max-age=60")], (), None, id="max-age: still storable"),
        pytest.param([("Cache-Control", "private, max-age=60")], (), NotStorable.PRIVATE, id="adds private §5.2.2.7"),
        pytest.param([("Cache-Control", "no-store")], (), NotStorable.NO_STORE, id="adds no-store §5.2.2.5"),
        pytest.param([("Cache-Control", "max-age=60"), ("Vary", "*")], (), NotStorable.VARY_STAR, id="adds Vary: * RFC 9110 §12.5.5"),
        pytest.param([CC_60, ("CDN-Cache-Control", "no-store")], TARGETS, NotStorable.NO_STORE, id="adds targeted no-store RFC 9213"),
        pytest.param([CC_60, ("CDN-Cache-Control", "private")], TARGETS, NotStorable.PRIVATE, id="adds targeted private RFC 9213"),
        pytest.param([CC_60, ("CDN-Cache-Control", "no-store")], (), None, id="untargeted CDN-Cache-Control ignored"),
    ],
)
def test_merged_entry_is_rechecked_for_storability(  # type: ignore[no-untyped-def]
    update, headers: list[tuple[str, str]], targets: tuple[str, ...], expected: NotStorable | None
) -> None:
    merged = update(stale_entry(), headers, targets)
    assert sem.merged_storability(merged, targets) == expected


# --------------------------------------------------------------------------- Date on stored responses (RFC 9110 §6.6.1)


@pytest.mark.parametrize(
    "headers, expected_dates",
    [
        pytest.param([("Cache-Control", "max-age=60")], [sem.format_http_date(NOW + 7)], id="Date added: time of receipt §6.6.1"),
        pytest.param([("Date", date(-30))], [date(-30)], id="origin's Date kept §6.6.1"),
        pytest.param([("date", date(-30))], [date(-30)], id="origin's lower-case date kept §6.6.1"),
        pytest.param([("Date", "Sun, 06 Nov 1994 08:49:37 GMT")], ["Sun, 06 Nov 1994 08:49:37 GMT"], id="origin's old Date kept §6.6.1"),
    ],
)
def test_stored_response_has_one_date_6_6_1(headers: list[tuple[str, str]], expected_dates: list[str]) -> None:
    e = entry(headers, request_time=NOW + 7, response_time=NOW + 7)
    assert sem.header_values(e.headers, "date") == expected_dates


def test_added_date_is_an_imf_fixdate_of_the_response_time_6_6_1() -> None:
    e = entry([("Cache-Control", "max-age=60")], request_time=NOW + 7, response_time=NOW + 7)
    added = sem.header_get(e.headers, "date")
    assert added is not None and sem._IMF_FIXDATE.fullmatch(added)
    assert sem.parse_http_date(added) == NOW + 7
