"""Property tests: whatever arrives in headers or from Valkey, the semantics never raise and the
codec round-trips. (Bad input must never crash the cache or produce a wrong response.)"""

from __future__ import annotations

import math

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mitmcache import codec
from mitmcache import semantics as sem

NAMES = st.sampled_from([
    "Cache-Control", "Expires", "Date", "Last-Modified", "Age", "Vary", "ETag", "Pragma",
    "Authorization", "Set-Cookie", "Connection", "Location", "Content-Location", "If-None-Match",
    "If-Modified-Since", "Accept-Language", "X-Other",
])
# Header-ish text: directives, numbers, dates and junk.
VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from([
        "max-age=60", "s-maxage=0", "no-cache", "no-store, private", 'no-cache="a,b"', "max-age=-1",
        "max-age=99999999999999999999", "stale-while-revalidate=5", "public, max-age=1.5", "*", "W/\"x\"",
        "Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "0", "-1", ",,,", '"unterminated',
    ]),
)
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=8)
NOW = 1_800_000_000.0

# RFC 9110 §5.5: field-value = *field-content; field-content = field-vchar [ 1*( SP / HTAB /
# field-vchar ) field-vchar ]; field-vchar = VCHAR / obs-text (0x21-0x7E, 0x80-0xFF).
FIELD_VCHAR = st.sampled_from([*range(0x21, 0x7F), *range(0x80, 0x100)])
FIELD_CHAR = st.one_of(FIELD_VCHAR, st.sampled_from([0x20, 0x09]))
FIELD_VALUES = st.one_of(
    st.just(b""),
    FIELD_VCHAR.map(lambda c: bytes([c])),
    st.builds(lambda first, inner, last: bytes([first, *inner, last]), FIELD_VCHAR, st.lists(FIELD_CHAR, max_size=30), FIELD_VCHAR),
)


def as_mitmproxy_str(raw: bytes) -> str:
    """How mitmproxy hands header bytes to addons: UTF-8 with surrogateescape."""
    return raw.decode("utf-8", "surrogateescape")


@settings(max_examples=400, deadline=None)
@given(req=HEADERS, resp=HEADERS, status=st.integers(100, 599), body=st.binary(max_size=64),
       delay=st.floats(0, 100))
def test_semantics_never_raise_on_any_headers(req, resp, status, body, delay) -> None:  # type: ignore[no-untyped-def]
    sem.storability("GET", status, req, resp, len(body), 1000)
    sem.malformed_fields(resp)
    lifetime, _ = sem.freshness_lifetime(status, resp, NOW)
    assert lifetime >= 0 and math.isfinite(lifetime)
    entry = sem.make_stored_response(status, "OK", req, resp, body, NOW - delay, NOW)
    assert entry.initial_age >= 0
    directives = sem.RequestDirectives.from_headers(req)
    sem.decide(entry, directives, NOW + delay, allow_background_revalidation=True)
    sem.may_serve_stale_if_error(entry, directives, NOW + delay)
    sem.client_conditional_matches(req, entry)
    sem.validator_304_matches(entry, resp)
    sem.merge_304(entry, resp, NOW, NOW + 1)
    sem.select_variant([entry], req)
    sem.invalidation_targets("POST", 201, "http://o.example/a", resp)
    # Nothing hop-by-hop or cache-generated is ever stored (RFC 9111 §3.1).
    assert not {k.lower() for k, _ in entry.headers} & (sem.HOP_BY_HOP | sem.CACHE_GENERATED)


@settings(max_examples=200, deadline=None)
@given(req=HEADERS, resp=HEADERS, body=st.binary(max_size=256), count=st.integers(1, 3))
def test_codec_round_trips_any_entry(req, resp, body, count) -> None:  # type: ignore[no-untyped-def]
    entry = sem.make_stored_response(200, "OK", req, resp, body, NOW, NOW)
    variants = (entry,) * count
    assert codec.decode(codec.encode(variants, "k"), "k") == variants


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300))
def test_codec_rejects_arbitrary_bytes_cleanly(data: bytes) -> None:
    try:
        codec.decode(data, "k")
    except codec.DecodeError:
        pass


@settings(max_examples=60, deadline=None)
@given(raws=st.lists(FIELD_VALUES, min_size=1, max_size=3))
def test_codec_round_trips_any_field_value_bytes_rfc_9110_5_5(raws: list[bytes]) -> None:
    """The L2 value keeps header bytes (obs-text, SP/HTAB inside) exactly, ETag too."""
    values = [as_mitmproxy_str(r) for r in raws]
    resp = [("Cache-Control", "max-age=60"), ("ETag", values[0]), *(("X-Bytes", v) for v in values)]
    entry = sem.make_stored_response(200, "OK", [], resp, b"body", NOW, NOW)
    (decoded,) = codec.decode(codec.encode((entry,), "k"), "k")
    assert decoded == entry
    assert decoded.headers == entry.headers
    assert [v.encode("utf-8", "surrogateescape") for v in sem.header_values(decoded.headers, "x-bytes")] == raws
    assert decoded.etag is not None and decoded.etag.encode("utf-8", "surrogateescape") == raws[0]


# The fields storability reads, the targeted ones (RFC 9213) and others, in any case.
STORABILITY_NAMES = st.sampled_from([
    "Cache-Control", "cache-control", "CDN-Cache-Control", "Mitmcache-Cache-Control", "Expires", "Date",
    "Last-Modified", "Age", "Vary", "Set-Cookie", "set-cookie2", "Pragma", "Authorization", "ETag", "X-Other",
    "Connection", "Keep-Alive",
])
STORABILITY_VALUES = st.one_of(
    VALUES,
    st.sampled_from([
        "no-store", "private", "max-age=60, public", "s-maxage=5", "must-revalidate", "a=1", "Accept, *",
        "stale-while-revalidate=30", "cache-control", "etag, last-modified", "keep-alive", "expires",
    ]),
)
STORABILITY_HEADERS = st.lists(st.tuples(STORABILITY_NAMES, STORABILITY_VALUES), max_size=8)
TARGETS = ("mitmcache-cache-control", sem.CDN_CACHE_CONTROL)


def picked(headers: list[tuple[str, str]], names: frozenset[str]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() in names]


@settings(max_examples=500, deadline=None)
@given(req=STORABILITY_HEADERS, resp=STORABILITY_HEADERS, status=st.sampled_from([200, 203, 204, 206, 302, 304, 404, 500, 503]),
       length=st.integers(0, 2000))
@example(req=[], resp=[("Connection", "cache-control"), ("Cache-Control", "max-age=60")], status=200, length=10)
@example(req=[], resp=[("ETag", '"x"'), ("Cache-Control", "max-age=0")], status=200, length=10)
def test_storability_reads_only_the_fields_it_names(req, resp, status, length) -> None:  # type: ignore[no-untyped-def]
    """The hit-for-pass fast path judges an answer from just these lines (one pass over the
    fields): the verdict, the malformed-field report and how long a stored entry would be kept
    are the full lists'."""
    names = sem.STORABILITY_RESPONSE_FIELDS | set(TARGETS)
    few_req, few_resp = picked(req, sem.STORABILITY_REQUEST_FIELDS), picked(resp, names)
    assert sem.storability("GET", status, few_req, few_resp, length, 1000, TARGETS) == sem.storability(
        "GET", status, req, resp, length, 1000, TARGETS
    )
    assert sem.malformed_fields(few_resp) == sem.malformed_fields(resp)
    kept = [sem.make_stored_response(status, "", r, h, b"", NOW - 1, NOW, 86400, TARGETS).retain_until() for r, h in ((req, resp), (few_req, few_resp))]
    assert kept[0] == kept[1]


def split_list_per_character(values: list[str]) -> list[str]:
    """RFC 9110 §5.6.1, the long way: a state machine over every character (the reference)."""
    out: list[str] = []
    for value in values:
        buf: list[str] = []
        quoted = escaped = False
        for ch in value:
            if escaped:
                escaped = False
            elif ch == "\\" and quoted:
                escaped = True
            elif ch == '"':
                quoted = not quoted
            elif ch == "," and not quoted:
                if item := "".join(buf).strip():
                    out.append(item)
                buf = []
                continue
            buf.append(ch)
        if item := "".join(buf).strip():
            out.append(item)
    return out


@settings(max_examples=500, deadline=None)
@given(values=st.lists(st.one_of(VALUES, st.text(alphabet=' ,"\\\tab=\u00a0', max_size=20)), max_size=4))
def test_split_list_without_quotes_splits_as_the_state_machine(values: list[str]) -> None:
    assert sem.split_list(values) == split_list_per_character(values)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(STORABILITY_VALUES, max_size=3))
def test_memoised_response_directives_are_the_parsed_ones(lines: list[str]) -> None:
    headers = [("Cache-Control", v) for v in lines]
    assert sem.ResponseDirectives.from_headers(headers) == sem.ResponseDirectives.from_lines(lines)
    assert sem.ResponseDirectives.from_headers(headers) == sem.ResponseDirectives.from_headers(headers)
