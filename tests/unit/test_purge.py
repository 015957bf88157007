"""Purge helpers: tag parsing, PURGE access rules, soft expiry, groups."""

from __future__ import annotations

import pytest

from mitmcache.purge import Access, groups_for, origin_of, parse_tag_headers, tags_of

TAG_HEADERS = ("surrogate-key", "cache-tag")


@pytest.mark.parametrize(
    "headers, expected",
    [
        pytest.param([("Surrogate-Key", "a b  c")], ("a", "b", "c"), id="Surrogate-Key splits on whitespace"),
        pytest.param([("Cache-Tag", "a, b,c ,")], ("a", "b", "c"), id="Cache-Tag splits on commas"),
        pytest.param([("Cache-Tag", "a b")], ("a b",), id="a comma list keeps inner spaces"),
        pytest.param([("surrogate-key", "x"), ("Cache-Tag", "x,y")], ("x", "y"), id="both fields, deduplicated"),
        pytest.param([("X-Other", "z")], (), id="other fields ignored"),
        pytest.param([("Surrogate-Key", "Red red")], ("Red", "red"), id="case-sensitive"),
        pytest.param([("Surrogate-Key", "a" * 257 + " ok")], ("ok",), id="too long a tag ignored"),
        pytest.param([("Surrogate-Key", " ".join(f"t{i}" for i in range(100)))], tuple(f"t{i}" for i in range(64)),
                     id="at most 64 tags"),
    ],
)
def test_tags_of(headers: list[tuple[str, str]], expected: tuple[str, ...]) -> None:
    assert tags_of(headers, TAG_HEADERS) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param("Surrogate-Key,Cache-Tag", ("surrogate-key", "cache-tag"), id="default"),
        pytest.param(" X-Tags , ", ("x-tags",), id="spaces and empty items"),
        pytest.param("", (), id="empty: no tags"),
    ],
)
def test_parse_tag_headers(value: str, expected: tuple[str, ...]) -> None:
    assert parse_tag_headers(value) == expected


def test_parse_tag_headers_refuses_a_non_token() -> None:
    with pytest.raises(ValueError, match="Surrogate Key"):
        parse_tag_headers("Surrogate Key")


@pytest.mark.parametrize(
    "allow, token, address, authorization, allowed",
    [
        pytest.param("127.0.0.1/32,::1/128", "", "127.0.0.1", None, True, id="loopback v4"),
        pytest.param("127.0.0.1/32,::1/128", "", "::1", None, True, id="loopback v6"),
        pytest.param("127.0.0.1/32", "", "::ffff:127.0.0.1", None, True, id="v4-mapped v6 counts as v4"),
        pytest.param("127.0.0.1/32,::1/128", "", "10.1.2.3", None, False, id="other address"),
        pytest.param("10.0.0.0/8", "", "10.1.2.3", None, True, id="inside a CIDR"),
        pytest.param("", "", "127.0.0.1", None, False, id="empty list: nobody"),
        pytest.param("127.0.0.1", "s3", "127.0.0.1", "Bearer s3", True, id="right token"),
        pytest.param("127.0.0.1", "s3", "127.0.0.1", "bearer s3", True, id="scheme case-insensitive"),
        pytest.param("127.0.0.1", "s3", "127.0.0.1", "Bearer s4", False, id="wrong token"),
        pytest.param("127.0.0.1", "s3", "127.0.0.1", None, False, id="no token"),
        pytest.param("127.0.0.1", "s3", "127.0.0.1", "Basic s3", False, id="not a bearer token"),
        pytest.param("127.0.0.1", "s3", "10.0.0.1", "Bearer s3", False, id="token does not open other addresses"),
        pytest.param("127.0.0.1", "", None, None, False, id="no address"),
        pytest.param("127.0.0.1", "", "garbage", None, False, id="garbage address"),
    ],
)
def test_access(allow: str, token: str, address: str | None, authorization: str | None, allowed: bool) -> None:
    assert Access.parse(allow, token).allows(address, authorization) is allowed


@pytest.mark.parametrize("allow", ["10.0.0.0/33", "nonsense", "127.0.0.1/32,,x"])
def test_access_refuses_a_bad_list(allow: str) -> None:
    with pytest.raises(ValueError, match="not an address or CIDR"):
        Access.parse(allow)


@pytest.mark.parametrize(
    "key, origin",
    [
        pytest.param("http://h:8080/a/b?c", "http://h:8080", id="path and query"),
        pytest.param("https://h/", "https://h", id="root"),
        pytest.param("http://h/x\nhost=other", "http://h", id="a key with a Host suffix"),
    ],
)
def test_origin_of(key: str, origin: str) -> None:
    assert origin_of(key) == origin


def test_groups_for_lists_tags_and_the_origin() -> None:
    assert groups_for("http://h/a", ("t1", "t2")) == ("tag:t1", "tag:t2", "host:http://h")
