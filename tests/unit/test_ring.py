"""Rendezvous ring: agreement, minimal movement on membership change, balance, URL parsing."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mitmcache.ring import Ring, ValkeyURLError, parse_valkey_url, parse_valkey_urls

KEYS = [f"mitmcache:r1:{random.Random(i).getrandbits(128):032x}".encode() for i in range(50_000)]


def nodes(n: int) -> list[str]:
    return [f"valkey://10.0.0.{i}:6379/0" for i in range(1, n + 1)]


def test_every_proxy_agrees_whatever_the_order() -> None:
    a = Ring(nodes(5))
    b = Ring(list(reversed(nodes(5))))
    assert all(a.owner(k) == b.owner(k) for k in KEYS[:5000])
    assert a.ranked(KEYS[0])[0] == a.owner(KEYS[0])


@pytest.mark.parametrize("n", [3, 5, 8])
def test_adding_a_node_moves_about_one_in_n_plus_one(n: int) -> None:
    before, after = Ring(nodes(n)), Ring(nodes(n + 1))
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    ideal = 1 / (n + 1)
    assert abs(len(moved) / len(KEYS) - ideal) < 0.02, (len(moved) / len(KEYS), ideal)
    # Only keys that now belong to the new node move; nothing shuffles between old nodes.
    assert all(after.owner(k) == nodes(n + 1)[-1] for k in moved)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_removing_a_middle_node_moves_only_its_keys(n: int) -> None:
    full = nodes(n)
    gone = full[n // 2]
    before, after = Ring(full), Ring([x for x in full if x != gone])
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    assert abs(len(moved) / len(KEYS) - 1 / n) < 0.02
    assert all(before.owner(k) == gone for k in moved)


@pytest.mark.parametrize("n", [2, 3, 8, 16])
def test_balance_no_node_starved(n: int) -> None:
    ring = Ring(nodes(n))
    counts = Counter(ring.owner(k) for k in KEYS)
    assert len(counts) == n
    mean = len(KEYS) / n
    assert max(counts.values()) / mean < 1.06
    assert min(counts.values()) / mean > 0.94


def test_empty_ring_raises() -> None:
    with pytest.raises(LookupError):
        Ring([]).owner(b"k")


URLS = [
    ("valkey://127.0.0.1:6379", ("127.0.0.1", 6379, 0, False, None, None)),
    ("valkey://:s3cret@127.0.0.1:7000/2", ("127.0.0.1", 7000, 2, False, None, "s3cret")),
    ("valkeys://user:p%40ss@cache.example:6380", ("cache.example", 6380, 0, True, "user", "p@ss")),
]


@pytest.mark.parametrize("url,expected", URLS)
def test_parse_valkey_url(url: str, expected: tuple) -> None:
    a = parse_valkey_url(url)
    assert (a.host, a.port, a.db, a.tls, a.username, a.password) == expected
    assert "s3cret" not in a.name and "s3cret" not in repr(a)


@pytest.mark.parametrize(
    "url,message",
    [
        ("redis://127.0.0.1:6379", "scheme"),
        ("valkey://127.0.0.1", "no port"),
        ("valkey://127.0.0.1:99999", "invalid"),
        ("valkey://127.0.0.1:6379/x", "database number"),
        ("valkey://:s3cret@127.0.0.1:6379?x=1", "query"),
        ("127.0.0.1:6379", "scheme"),
    ],
)
def test_bad_urls_rejected_without_leaking_passwords(url: str, message: str) -> None:
    with pytest.raises(ValkeyURLError, match=message) as info:
        parse_valkey_url(url)
    assert "s3cret" not in str(info.value)


def test_duplicate_nodes_rejected() -> None:
    with pytest.raises(ValkeyURLError, match="twice"):
        parse_valkey_urls("valkey://a:1,valkey://a:1/0")
    assert len(parse_valkey_urls(" valkey://a:1 , valkey://b:1 ,")) == 2
