"""The one key builder (RFC 9111 §2) and the §4.4 invalidation targets it keys."""

from __future__ import annotations

import pytest

from mitmcache import semantics as sem
from mitmcache.keys import KeyBuilder
from mitmcache.messages import Request

KEYS = KeyBuilder()


@pytest.mark.parametrize(
    "scheme, host, port, path, expected",
    [
        pytest.param("http", "Example.COM", 80, "/a?b=1", "http://example.com/a?b=1", id="host lower-cased, default port dropped"),
        pytest.param("https", "example.com", 443, "/", "https://example.com/", id="https default port"),
        pytest.param("http", "example.com", 8080, "/", "http://example.com:8080/", id="non-default port kept"),
        pytest.param("http", "example.com", 443, "/", "http://example.com:443/", id="http on 443 keeps its port"),
        pytest.param("http", "::1", 8080, "/", "http://[::1]:8080/", id="IPv6 bracketed"),
    ],
)
def test_key_normalises_the_target_uri(scheme: str, host: str, port: int, path: str, expected: str) -> None:
    assert KEYS.build(scheme, host, port, path) == expected


def test_http_and_https_never_share_a_key() -> None:
    assert KEYS.build("http", "a.example", 8443, "/") != KEYS.build("https", "a.example", 8443, "/")


@pytest.mark.parametrize(
    "host_header, expected",
    [
        pytest.param(None, "http://o.example/p", id="no Host field"),
        pytest.param("o.example", "http://o.example/p", id="Host names the target"),
        pytest.param("O.EXAMPLE:80", "http://o.example/p", id="Host with default port and case"),
        pytest.param("evil.example", "http://o.example/p\nhost=evil.example", id="another authority joins the key"),
        pytest.param("o.example:8080", "http://o.example/p\nhost=o.example:8080", id="another port joins the key"),
    ],
)
def test_host_field_naming_another_authority_joins_the_key(host_header: str | None, expected: str) -> None:
    assert KEYS.build("http", "o.example", 80, "/p", host_header) == expected


def test_request_url_is_spelled_like_mitmproxys() -> None:
    assert Request("GET", "http", "o.example", 80, "/p?q=1", ()).url == "http://o.example/p?q=1"
    assert Request("GET", "https", "o.example", 8443, "/", ()).url == "https://o.example:8443/"
    assert Request("GET", "http", "::1", 8080, "/x", ()).url == "http://[::1]:8080/x"


def test_request_url_and_purge_url_build_the_same_key() -> None:
    req = Request("GET", "http", "O.example", 80, "/p?q=1", (), "o.example")
    assert KEYS.for_request(req) == KEYS.for_url("http://o.example:80/p?q=1") == "http://o.example/p?q=1"


@pytest.mark.parametrize("url", ["not a url", "ftp://x/y", "http:///nohost", "http://h:99999/"])
def test_for_url_rejects_what_is_not_an_absolute_http_url(url: str) -> None:
    assert KEYS.for_url(url) is None


@pytest.mark.parametrize(
    "method, status, headers, expected",
    [
        pytest.param("POST", 200, [], ["http://o.example/r"], id="POST 200 invalidates target"),
        pytest.param("DELETE", 204, [], ["http://o.example/r"], id="DELETE 204"),
        pytest.param("PURGEME", 200, [], ["http://o.example/r"], id="custom unsafe method"),
        pytest.param("POST", 403, [], [], id="error status does not"),
        pytest.param("GET", 200, [], [], id="safe method does not"),
        pytest.param("get", 200, [], ["http://o.example/r"], id="lower-case get is not GET: unknown, so unsafe"),
        pytest.param("POST", 201, [("Location", "/other")], ["http://o.example/r", "http://o.example/other"], id="relative Location"),
        pytest.param("PUT", 200, [("Content-Location", "http://O.example:80/c")], ["http://o.example/r", "http://o.example/c"], id="absolute same-origin Content-Location"),
        pytest.param("POST", 201, [("Location", "http://evil.example/r2")], ["http://o.example/r"], id="cross-origin Location ignored"),
        pytest.param("POST", 201, [("Location", "https://o.example/r")], ["http://o.example/r"], id="https Location is another origin"),
    ],
)
def test_invalidation_4_4(method: str, status: int, headers: list[tuple[str, str]], expected: list[str]) -> None:
    urls = sem.invalidation_targets(method, status, "http://o.example/r", headers)
    assert [KEYS.for_url(u) for u in urls] == expected


@pytest.mark.parametrize(
    "path, expected",
    [
        pytest.param("/caf%c3%a9", "http://o.example/caf%C3%A9", id="hex digits upper-cased RFC 3986 §6.2.2.1"),
        pytest.param("/caf%C3%A9", "http://o.example/caf%C3%A9", id="upper-case hex kept RFC 3986 §6.2.2.1"),
        pytest.param("/%7Euser", "http://o.example/~user", id="%7E is unreserved ~: decoded RFC 3986 §6.2.2.2"),
        pytest.param("/%7euser", "http://o.example/~user", id="%7e lower-case decoded too RFC 3986 §6.2.2.2"),
        pytest.param("/%41%62%30%2D%2E%5F", "http://o.example/Ab0-._", id="ALPHA DIGIT - . _ decoded RFC 3986 §6.2.2.2"),
        pytest.param("/a%2Fb", "http://o.example/a%2Fb", id="%2F is reserved /: kept encoded RFC 3986 §2.2"),
        pytest.param("/a%2fb", "http://o.example/a%2Fb", id="%2f kept encoded, upper-cased RFC 3986 §6.2.2.1"),
        pytest.param("/a%3Fb%23c%26d%3De", "http://o.example/a%3Fb%23c%26d%3De", id="? # & = kept encoded RFC 3986 §2.2"),
        pytest.param("/%20", "http://o.example/%20", id="space is not unreserved RFC 3986 §2.3"),
        pytest.param("/%252F", "http://o.example/%252F", id="%25 kept: no double decoding RFC 3986 §2.4"),
        pytest.param("/p?q=%7e&r=%c3%a9", "http://o.example/p?q=~&r=%C3%A9", id="query normalised the same way RFC 3986 §6.2.2"),
        pytest.param("/p?q=%2f", "http://o.example/p?q=%2F", id="reserved in query kept encoded RFC 3986 §2.2"),
        pytest.param("/%zz", "http://o.example/%zz", id="invalid %zz unchanged"),
        pytest.param("/%c", "http://o.example/%c", id="truncated %c unchanged"),
        pytest.param("/100%", "http://o.example/100%", id="trailing % unchanged"),
        pytest.param("/~user", "http://o.example/~user", id="no percent-encoding: unchanged"),
    ],
)
def test_key_normalises_percent_encoding_rfc_3986_6_2_2(path: str, expected: str) -> None:
    assert KEYS.build("http", "o.example", 80, path) == expected


@pytest.mark.parametrize(
    "a, b, same",
    [
        pytest.param("/caf%c3%a9", "/caf%C3%A9", True, id="case of hex digits RFC 3986 §6.2.2.1"),
        pytest.param("/%7Euser", "/~user", True, id="encoded and plain unreserved RFC 3986 §6.2.2.2"),
        pytest.param("/p?q=%41", "/p?q=A", True, id="encoded and plain unreserved in query RFC 3986 §6.2.2.2"),
        pytest.param("/a%2Fb", "/a/b", False, id="encoded / is another URI RFC 3986 §2.2"),
        pytest.param("/p?a=1%26b=2", "/p?a=1&b=2", False, id="encoded & is another query RFC 3986 §2.2"),
    ],
)
def test_equivalent_targets_share_a_key_rfc_3986_6_2_2(a: str, b: str, same: bool) -> None:
    assert (KEYS.build("http", "o.example", 80, a) == KEYS.build("http", "o.example", 80, b)) is same


def test_purge_url_is_normalised_like_a_request() -> None:
    req = Request("GET", "http", "o.example", 80, "/caf%c3%a9?x=%7e", ())
    assert KEYS.for_request(req) == KEYS.for_url("http://o.example/caf%C3%A9?x=~") == "http://o.example/caf%C3%A9?x=~"
