"""End to end with the shared tier: real mitmdump processes on a ring of real Valkey nodes."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import valkey

from mitmcache.ring import Ring, parse_valkey_urls
from mitmcache.valkey_nodes import ValkeyNode, free_port
from tests.conftest import Proxy, start_proxy
from tests.origin import Origin
from tests.tls_terminator import TLSTerminator

CC = quote("max-age=300", safe="")


def ring_proxy(tmp: Path, origin: Origin, nodes: list[ValkeyNode], *sets: str) -> Proxy:
    urls = ",".join(n.url for n in nodes)
    return start_proxy(tmp, f"reverse:{origin.url}", f"cache_valkey_urls={urls}", "cache_valkey_timeout_ms=200", *sets)


def valkey_key(cache_key: str, prefix: str = "mitmcache") -> str:
    import xxhash

    return f"{prefix}:r1:{xxhash.xxh3_128_hexdigest(cache_key.encode())}"


def owner(nodes: list[ValkeyNode], vkey: str) -> ValkeyNode:
    names = {a.name: n for a, n in zip(parse_valkey_urls(",".join(n.url for n in nodes)), nodes)}
    return names[Ring(names).owner(vkey.encode())]


def test_miss_on_proxy_a_is_a_hit_on_proxy_b(tmp_path: Path, origin: Origin, ring_nodes: list[ValkeyNode]) -> None:
    a = ring_proxy(tmp_path / "a", origin, ring_nodes)
    b = ring_proxy(tmp_path / "b", origin, ring_nodes)
    try:
        path = f"/shared?cc={CC}"
        ra = a.client().get(path)
        rb = b.client().get(path)
        assert ra.headers["x-cache-status"] == "MISS"
        assert rb.headers["x-cache-status"] == "HIT"
        assert "detail=l2" in rb.headers["cache-status"]
        assert rb.text == ra.text == "/shared #1"
        assert origin.count(path) == 1
        rb2 = b.client().get(path)
        assert "detail=l1" in rb2.headers["cache-status"]  # near-cache on B now
        assert b.metrics()["mitmcache_l2_hits_total"] == 1
        assert b.metrics()['mitmcache_ring_members{state="up"}'] == 3
    finally:
        a.stop()
        b.stop()


def test_node_killed_mid_test_no_client_errors_then_rejoins(
    tmp_path: Path, origin: Origin, ring_nodes: list[ValkeyNode]
) -> None:
    a = ring_proxy(tmp_path, origin, ring_nodes, "cache_l1_ttl=0")
    try:
        c = a.client()
        paths = [f"/kill{i}?cc={CC}" for i in range(30)]
        assert all(c.get(p).status_code == 200 for p in paths)
        assert all(c.get(p).headers["x-cache-status"] == "HIT" for p in paths)
        victim = ring_nodes[1]
        victim.stop()
        statuses = [c.get(p).status_code for p in paths] + [c.get(f"/kill-new{i}?cc={CC}").status_code for i in range(30)]
        assert statuses == [200] * 60  # zero client errors
        m = a.metrics()
        assert m["mitmcache_valkey_get_fallback_total"] > 0
        assert m["mitmcache_valkey_set_fallback_total"] > 0
        assert m['mitmcache_ring_members{state="down"}'] == 1
        victim.start()  # same port, empty
        deadline = time.monotonic() + 10
        while a.metrics()['mitmcache_ring_members{state="up"}'] != 3:
            assert time.monotonic() < deadline, "node never rejoined"
            time.sleep(0.1)
        for i in range(30):
            assert c.get(f"/kill-after{i}?cc={CC}").status_code == 200
        assert valkey.Valkey(port=victim.port).dbsize() > 0  # used again
    finally:
        a.stop()


def test_garbage_under_a_live_key_is_served_as_a_miss(
    tmp_path: Path, origin: Origin, ring_nodes: list[ValkeyNode]
) -> None:
    a = ring_proxy(tmp_path / "a", origin, ring_nodes)
    b = ring_proxy(tmp_path / "b", origin, ring_nodes)
    try:
        path = f"/garbage?cc={CC}"
        a.client().get(path)
        vkey = valkey_key(f"http://127.0.0.1:{origin.port}{path}")
        node = owner(ring_nodes, vkey)
        client = valkey.Valkey(port=node.port)
        assert client.exists(vkey) == 1
        client.set(vkey, b"\x80\x04garbage")
        r = b.client().get(path)  # B has no L1 copy: it reads the garbage
        assert r.status_code == 200
        assert r.headers["x-cache-status"] == "MISS"
        assert r.text == "/garbage #2"
        assert b.metrics()["mitmcache_valkey_decode_errors_total"] == 1
        assert b.client().get(path).headers["x-cache-status"] == "HIT"  # rewritten, good again
    finally:
        a.stop()
        b.stop()


def test_password_protected_node_through_the_proxy(tmp_path: Path, origin: Origin) -> None:
    node = ValkeyNode(free_port(), password="s3cret").start()
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}", f"cache_valkey_urls={node.url}", "cache_l1_ttl=0")
    try:
        c = proxy.client()
        path = f"/auth-node?cc={CC}"
        c.get(path)
        r = c.get(path)
        assert r.headers["x-cache-status"] == "HIT" and "detail=l2" in r.headers["cache-status"]
        assert len(valkey.Valkey(port=node.port, password="s3cret").keys("mitmcache:r1:*")) == 1
        assert "s3cret" not in httpx.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics").text
        assert "s3cret" not in c.get("/x").text
        assert "s3cret" not in proxy.stop()
    finally:
        proxy.stop()
        node.stop()


def test_bad_valkey_url_rejected_at_startup(tmp_path: Path, origin: Origin) -> None:
    with pytest.raises(RuntimeError, match="cache_valkey_urls: invalid Valkey URL") as info:
        start_proxy(tmp_path, f"reverse:{origin.url}", "cache_valkey_urls=redis://:s3cret@127.0.0.1:1")
    assert "s3cret" not in str(info.value)


def test_proxy_starts_and_serves_with_every_node_down(tmp_path: Path, origin: Origin) -> None:
    proxy = start_proxy(tmp_path, f"reverse:{origin.url}", f"cache_valkey_urls=valkey://127.0.0.1:{free_port()}")
    try:
        c = proxy.client()
        path = f"/alldown?cc={CC}"
        assert [c.get(path).headers["x-cache-status"] for _ in range(5)] == ["MISS"] + ["HIT"] * 4
        assert origin.count(path) == 1
    finally:
        proxy.stop()


def test_valkeys_tls_node_verified_with_the_given_ca(tmp_path: Path, origin: Origin) -> None:
    node = ValkeyNode(free_port()).start()
    tls = TLSTerminator(node.port, tmp_path).start()
    url = f"valkeys://127.0.0.1:{tls.port}"
    good = start_proxy(tmp_path / "good", f"reverse:{origin.url}", f"cache_valkey_urls={url}",
                       f"cache_valkey_tls_ca={tls.cert_file}", "cache_l1_ttl=0")
    untrusted = start_proxy(tmp_path / "bad", f"reverse:{origin.url}", f"cache_valkey_urls={url}", "cache_l1_ttl=0")
    try:
        path = f"/tls-node?cc={CC}"
        c = good.client()
        c.get(path)
        r = c.get(path)
        assert r.headers["x-cache-status"] == "HIT" and "detail=l2" in r.headers["cache-status"]
        assert len(valkey.Valkey(port=node.port).keys("mitmcache:r1:*")) == 1
        # Without the CA the self-signed node is not trusted: L2 is skipped, clients never notice.
        bad = untrusted.client()
        assert [bad.get(f"/tls-untrusted?cc={CC}").status_code for _ in range(3)] == [200] * 3
        assert untrusted.metrics()["mitmcache_valkey_set_fallback_total"] >= 1
        assert len(valkey.Valkey(port=node.port).keys("mitmcache:r1:*")) == 1
        # The invalidation listener speaks TLS too, verified the same way.
        deadline = time.monotonic() + 10
        while good.metrics()['mitmcache_invalidation_listeners{state="up"}'] != 1:
            assert time.monotonic() < deadline, "the listener never subscribed over TLS"
            time.sleep(0.05)
        assert untrusted.metrics()['mitmcache_invalidation_listeners{state="down"}'] == 1
    finally:
        good.stop()
        untrusted.stop()
        tls.stop()
        node.stop()
