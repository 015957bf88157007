"""The record/replay core (``replay.py``): matching, answers in order, redaction, dates, report."""

from __future__ import annotations

import email.utils

import pytest

from mitmcache import replay as rp
from mitmcache.messages import Response

JSON = (("Content-Type", "application/json"),)
FORM = (("Content-Type", "application/x-www-form-urlencoded"),)


def req(path: str = "/a", method: str = "GET", headers: rp.Headers = (), body: bytes = b"",
        host: str = "example.com", port: int = 443, scheme: str = "https") -> rp.RecordedRequest:
    return rp.RecordedRequest(method, scheme, host, port, path, headers, body)


def resp(body: bytes, headers: rp.Headers = (), at: float = 1000.0) -> Response:
    return Response(200, "OK", headers, body, at, at)


def cassette(*exchanges: tuple[rp.RecordedRequest, bytes], spec: rp.Spec | None = None) -> rp.Cassette:
    return rp.Cassette.of(spec or rp.Spec(), ((r, resp(b)) for r, b in exchanges))


SPEC = rp.Spec.parse("ts,utm_*", "token", "accept-language,authorization", rp.DEFAULT_REDACT, True)


@pytest.mark.parametrize("recorded, live, matches", [
    pytest.param(req("/a?x=1&y=2"), req("/a?y=2&x=1"), True, id="query order does not matter"),
    pytest.param(req("/a?x=1&x=2"), req("/a?x=2&x=1"), True, id="repeated params as a multiset"),
    pytest.param(req("/a?x=1&x=1"), req("/a?x=1"), False, id="multiset counts repeats"),
    pytest.param(req("/a?x=1&ts=5"), req("/a?x=1&ts=9&utm_source=ci"), True, id="ignored params and globs"),
    pytest.param(req("/a?token=old"), req("/a?token=new"), True, id="redacted params are not matched"),
    pytest.param(req("/a"), req("/b"), False, id="path"),
    pytest.param(req("/a"), req("/a", method="POST"), False, id="method"),
    pytest.param(req("/a"), req("/a", port=8443), False, id="port"),
    pytest.param(req("/a"), req("/a", scheme="http", port=443), False, id="scheme"),
    pytest.param(req("/a", host="Example.COM"), req("/a"), True, id="host is case-insensitive"),
    pytest.param(req("/p", "POST", JSON, b'{"a": 1, "b": [1, 2]}'), req("/p", "POST", JSON, b'{"b":[1,2],"a":1}'),
                 True, id="JSON compared as JSON"),
    pytest.param(req("/p", "POST", JSON, b'{"b": [1, 2]}'), req("/p", "POST", JSON, b'{"b": [2, 1]}'),
                 False, id="JSON arrays keep their order"),
    pytest.param(req("/p", "POST", FORM, b"a=1&b=2&ts=1"), req("/p", "POST", FORM, b"b=2&a=1&ts=2"),
                 True, id="form as multiset without ignored params"),
    pytest.param(req("/p", "POST", (), b"a=1&b=2"), req("/p", "POST", (), b"b=2&a=1"), False, id="other bodies exact bytes"),
    pytest.param(req("/p", "POST", JSON, b"{not json"), req("/p", "POST", JSON, b"{not json"), True, id="broken JSON as bytes"),
    pytest.param(req("/v", headers=(("Accept-Language", "de"),)), req("/v", headers=(("accept-language", "en"),)),
                 False, id="match_headers are matched"),
    pytest.param(req("/v", headers=(("User-Agent", "a"),)), req("/v", headers=(("User-Agent", "b"),)),
                 True, id="other headers are not"),
    pytest.param(req("/v", headers=(("Authorization", "REDACTED"),)), req("/v", headers=(("Authorization", "Bearer x"),)),
                 True, id="a redacted header is never matched"),
])
def test_matching(recorded: rp.RecordedRequest, live: rp.RecordedRequest, matches: bool) -> None:
    c = cassette((recorded, b"r"), spec=SPEC)
    assert (c.lookup(live) is not None) == matches


def test_repeated_requests_answered_in_order_then_the_last_repeats() -> None:
    c = cassette((req("/s"), b"1"), (req("/other"), b"x"), (req("/s"), b"2"), (req("/s"), b"3"))
    bodies = [c.lookup(req("/s")).response.body for _ in range(5)]  # type: ignore[union-attr]
    assert bodies == [b"1", b"2", b"3", b"3", b"3"]
    assert c.matched == 5
    assert [r.request.path for r in c.unused()] == ["/other"]


def test_lookup_is_a_dict_access_not_a_scan() -> None:
    c = cassette(*((req(f"/p{i}"), b"") for i in range(5000)))
    c.recorded.clear()  # a scan would now find nothing; the index still answers
    assert c.lookup(req("/p4999")) is not None


def test_unmatched_requests_are_counted_with_redacted_urls() -> None:
    c = cassette((req("/a?token=abc"), b""), spec=SPEC)
    assert c.lookup(req("/b?token=s3cr3t&x=1")) is None
    assert c.lookup(req("/b?token=other&x=1")) is None
    assert dict(c.unmatched) == {"GET https://example.com/b?token=REDACTED&x=1": 2}


def test_miss_message_names_the_request_and_the_closest_recording_without_secrets() -> None:
    c = cassette((req("/api/items?page=1"), b""), (req("/zzz", "DELETE"), b""), spec=SPEC)
    text = c.miss_message(req("/api/items?page=2&token=s3cr3t"), "none")
    assert "Request:  GET https://example.com/api/items?page=2&token=REDACTED" in text
    assert "Closest recorded request: GET https://example.com/api/items?page=1" in text
    assert "Differs in: query" in text
    assert "s3cr3t" not in text


def test_miss_message_with_an_empty_recording() -> None:
    assert "none (the recording is empty)" in cassette().miss_message(req("/a"), "none")


@pytest.mark.parametrize("path, expected", [
    pytest.param("/a?token=s3&x=1", "/a?token=REDACTED&x=1", id="value replaced"),
    pytest.param("/a?x=1&token=", "/a?x=1&token=REDACTED", id="empty value"),
    pytest.param("/a?x=token", "/a?x=token", id="only names count"),
    pytest.param("/a", "/a", id="no query"),
])
def test_redact_query(path: str, expected: str) -> None:
    assert rp.redact_query(path, SPEC) == expected


def test_redact_form_and_headers() -> None:
    assert rp.redact_form(FORM, b"user=me&token=s3", SPEC) == b"user=me&token=REDACTED"
    assert rp.redact_form(JSON, b'{"token": "s3"}', SPEC) == b'{"token": "s3"}'
    headers = (("Authorization", "Bearer s3"), ("Set-Cookie", "a=1"), ("X-Other", "v"))
    assert rp.redact_headers(headers, SPEC) == (("Authorization", "REDACTED"), ("Set-Cookie", "REDACTED"), ("X-Other", "v"))


def test_refresh_dates_shifts_date_expires_last_modified() -> None:
    def date(t: float) -> str:
        return email.utils.formatdate(t, usegmt=True)

    headers = (("Date", date(1000)), ("Expires", date(1060)), ("Last-Modified", date(400)), ("X-Date", date(1000)),
               ("Expires", "0"))
    assert rp.refresh_dates(headers, 3600) == (
        ("Date", date(4600)), ("Expires", date(4660)), ("Last-Modified", date(4000)), ("X-Date", date(1000)), ("Expires", "0"),
    )


def test_report_and_summary_line() -> None:
    c = cassette((req("/a"), b""), (req("/b"), b""))
    c.lookup(req("/a"))
    c.lookup(req("/c"))
    report = rp.report(c, "once", "none", "rec.har", 0)
    assert report == {
        "file": "rec.har", "mode": "once", "effective_mode": "none", "replay_only": True, "matched": 1,
        "unmatched": [{"request": "GET https://example.com/c", "count": 1}],
        "recorded_but_unused": ["GET https://example.com/b"], "recorded": 0,
    }
    assert rp.summary_line(report).startswith("mitmcache replay (none, rec.har): 1 matched, 1 unmatched, 1 recorded but unused")


def test_spec_parse_drops_redacted_headers_from_matching() -> None:
    spec = rp.Spec.parse("", "", "Authorization, X-Tenant", "authorization", False)
    assert spec.match_headers == ("x-tenant",)
    assert spec.redact_headers == frozenset({"authorization"})
