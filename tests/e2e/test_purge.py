"""Coherent near-cache and cluster-wide purge end to end: real mitmdump proxies (and a mitmweb
for the commands) on one ring of real Valkey nodes, with the default near-cache.

No test sleeps longer than 100 ms: waits poll the proxies' metrics up to a deadline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import valkey

from mitmcache.ring import Ring, parse_valkey_urls
from mitmcache.valkey_nodes import ValkeyNode
from tests.conftest import Proxy, Web, running_mitmweb, running_nodes, start_proxy
from tests.e2e.test_startup import LISTENING, run_to_exit
from tests.origin import Origin

DEADLINE = 10.0
FRESH = quote("max-age=300", safe="")
SWR = quote("max-age=300, stale-while-revalidate=60", safe="")
KEY_DROPS = 'mitmcache_l1_invalidation_drops_total{cause="key"}'


def tagged(tags: str) -> str:
    return quote(f"Surrogate-Key: {tags}", safe="")


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[ValkeyNode]]:
    with running_nodes(3) as n:
        yield n


def urls(nodes: list[ValkeyNode]) -> str:
    return ",".join(n.url for n in nodes)


def wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def listening(proxy: Proxy) -> bool:
    return proxy.metrics().get('mitmcache_invalidation_listeners{state="up"}') == 3


def ring_proxy(tmp: Path, origin: Origin, nodes: list[ValkeyNode], *sets: str) -> Proxy:
    p = start_proxy(tmp, f"reverse:{origin.url}", f"cache_valkey_urls={urls(nodes)}", "cache_valkey_timeout_ms=200", *sets)
    wait(lambda: listening(p), "invalidation listeners never subscribed")
    return p


@pytest.fixture(scope="module")
def proxies(origin: Origin, nodes: list[ValkeyNode], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proxy]]:
    """A, B and C: three proxies on the ring."""
    started: list[Proxy] = []
    try:
        for name in "abc":
            started.append(ring_proxy(tmp_path_factory.mktemp(name), origin, nodes))
        yield started
    finally:
        for p in started:
            p.stop()


def purge(proxy: Proxy, path: str, **headers: str) -> httpx.Response:
    return proxy.client().request("PURGE", path, headers=headers)


def held_in_l1(proxy: Proxy, path: str, body: str) -> None:
    """GETs until one is the proxy's L1 copy with ``body`` (an L2 read that crossed the echo of
    the write it reads keeps no copy: the proxy cannot tell whether the write came first)."""
    c = proxy.client()
    for _ in range(5):
        r = c.get(path)
        assert r.text == body
        if r.headers["x-cache-status"] == "HIT" and "detail=l1" in r.headers["cache-status"]:
            return
    raise AssertionError(f"{path} never held in L1: {r.headers}")


def after_invalidation(proxy: Proxy, before: float) -> None:
    wait(lambda: proxy.metrics()[KEY_DROPS] > before, "the invalidation never reached the proxy")


def test_purge_by_url_on_a_makes_b_and_c_miss(proxies: list[Proxy], origin: Origin) -> None:
    a, b, c = proxies
    path = f"/p-url?cc={FRESH}"
    assert a.client().get(path).text == "/p-url #1"
    for p in (b, c):
        held_in_l1(p, path, "/p-url #1")
    drops = [p.metrics()[KEY_DROPS] for p in (b, c)]
    r = purge(a, path)
    assert r.status_code == 200 and r.json() == {"purged": 1, "kind": "url", "soft": False}
    for p, before in zip((b, c), drops):
        after_invalidation(p, before)
    rb = b.client().get(path)
    assert rb.headers["x-cache-status"] == "MISS" and rb.text == "/p-url #2"
    assert c.client().get(path).text == "/p-url #2"  # B's refill, from L2
    assert origin.count(path, "PURGE") == 0
    assert purge(a, "/p-url-never-cached").status_code == 404
    m = a.metrics()
    assert m['mitmcache_purges_total{kind="url",mode="hard"}'] == 2
    assert m['mitmcache_purged_keys_total{kind="url"}'] == 1


def test_purge_by_tag_reaches_every_tagged_url_and_tags_never_reach_clients(
    proxies: list[Proxy], origin: Origin
) -> None:
    a, b, _ = proxies
    red = [f"/p-tag{i}?cc={FRESH}&hdr={tagged('red shared')}" for i in range(3)]
    blue = f"/p-tag-blue?cc={FRESH}&hdr={tagged('blue shared')}"
    for path in [*red, blue]:
        r = a.client().get(path)
        assert "surrogate-key" not in r.headers  # stored, but stripped
        held_in_l1(b, path, r.text)
    before = b.metrics()[KEY_DROPS]
    r = purge(a, "/anything", **{"Surrogate-Key": "red"})
    assert r.status_code == 200 and r.json() == {"purged": 3, "kind": "tag", "soft": False}
    wait(lambda: b.metrics()[KEY_DROPS] >= before + 3, "B kept tagged copies")
    for path in red:
        rb = b.client().get(path)
        assert rb.headers["x-cache-status"] == "MISS" and rb.text.endswith("#2"), path
        assert "surrogate-key" not in rb.headers
    assert b.client().get(blue).headers["x-cache-status"] == "HIT"  # another tag: untouched
    assert purge(a, "/", **{"Surrogate-Key": "nosuchtag"}).status_code == 404


def test_soft_purge_serves_stale_while_revalidating(proxies: list[Proxy], origin: Origin) -> None:
    a, b, _ = proxies
    path = f"/p-soft?cc={SWR}"
    a.client().get(path)
    held_in_l1(b, path, "/p-soft #1")
    before = b.metrics()[KEY_DROPS]
    r = purge(a, path, **{"Cache-Purge-Soft": "1"})
    assert r.status_code == 200 and r.json() == {"purged": 1, "kind": "url", "soft": True}
    after_invalidation(b, before)
    rb = b.client().get(path)
    assert rb.headers["x-cache-status"] == "STALE" and rb.text == "/p-soft #1"
    assert "stale-while-revalidate" in rb.headers["cache-status"]
    wait(lambda: origin.count(path) == 2, "no background revalidation")
    assert a.metrics()['mitmcache_purges_total{kind="url",mode="soft"}'] == 1


def test_newer_response_stored_by_a_replaces_bs_fresh_copy(proxies: list[Proxy], origin: Origin) -> None:
    a, b, _ = proxies
    path = f"/p-newer?cc={FRESH}"
    a.client().get(path)
    held_in_l1(b, path, "/p-newer #1")
    before = b.metrics()[KEY_DROPS]
    r = a.client().get(path, headers={"Cache-Control": "no-cache"})  # A revalidates: a new body
    assert r.text == "/p-newer #2"
    after_invalidation(b, before)
    rb = b.client().get(path)
    assert rb.headers["x-cache-status"] == "HIT" and rb.text == "/p-newer #2"
    assert origin.count(path) == 2
    assert a.client().get(path).headers["cache-status"].endswith("detail=l1")  # A's own write kept its copy


def owned_by(nodes: list[ValkeyNode], node: ValkeyNode, origin: Origin, prefix: str) -> str:
    """A path whose entry lives on ``node``."""
    import xxhash

    names = {a.name: n for a, n in zip(parse_valkey_urls(urls(nodes)), nodes)}
    ring = Ring(names)
    for i in range(1000):
        path = f"{prefix}{i}?cc={FRESH}"
        digest = xxhash.xxh3_128_hexdigest(f"http://127.0.0.1:{origin.port}{path}".encode())
        if names[ring.owner(f"mitmcache:r1:{digest}".encode())] is node:
            return path
    raise AssertionError("no path on that node")


def test_killed_invalidation_connection_never_leaves_b_serving_a_purged_body(
    proxies: list[Proxy], origin: Origin, nodes: list[ValkeyNode]
) -> None:
    a, b, _ = proxies
    node = nodes[0]
    path = owned_by(nodes, node, origin, "/p-kill")
    a.client().get(path)
    held_in_l1(b, path, f"{path.split('?')[0]} #1")
    flushes = b.metrics()["mitmcache_invalidation_listener_flushes_total"]
    valkey.Valkey(port=node.port).client_kill_filter(_type="pubsub")  # every proxy's listener on it
    wait(lambda: b.metrics()["mitmcache_invalidation_listener_flushes_total"] > flushes, "B never noticed")
    assert purge(a, path).status_code == 200  # while B's listener may still be reconnecting
    rb = b.client().get(path)
    assert rb.headers["x-cache-status"] == "MISS" and rb.text.endswith("#2")
    wait(lambda: listening(b), "B's listener never came back")
    assert b.metrics()["mitmcache_invalidation_listener_reconnects_total"] >= 1


def test_purge_while_a_node_is_down_then_it_restarts(
    origin: Origin, tmp_path: Path
) -> None:
    with running_nodes(3) as ring:
        a = ring_proxy(tmp_path / "a", origin, ring)
        b = ring_proxy(tmp_path / "b", origin, ring)
        try:
            node = ring[2]
            path = owned_by(ring, node, origin, "/p-down")
            stem = path.split("?")[0]
            a.client().get(path)
            held_in_l1(b, path, f"{stem} #1")
            node.stop()
            wait(lambda: b.metrics()['mitmcache_invalidation_listeners{state="down"}'] == 1, "B never noticed")
            r = purge(a, path)
            assert r.status_code == 200 and r.json()["pending"] == 1  # replayed when the node returns
            rb = b.client().get(path)  # the copy went with the listener: to the origin
            assert rb.text != f"{stem} #1"
            node.start()
            wait(lambda: listening(b), "B's listener never came back")
            assert all(b.client().get(path).text != f"{stem} #1" for _ in range(3))
        finally:
            a.stop()
            b.stop()


# ---------------------------------------------------------------- commands and access (mitmweb)


@pytest.fixture(scope="module")
def web(origin: Origin, nodes: list[ValkeyNode], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    with running_mitmweb(tmp_path_factory.mktemp("web"), origin, f"cache_valkey_urls={urls(nodes)}") as w:
        yield w


def test_prefix_and_tag_commands_reach_the_other_proxies(web: Web, proxies: list[Proxy], origin: Origin) -> None:
    _, b, _ = proxies
    inside = [f"/p-pre/a{i}?cc={FRESH}" for i in range(3)]
    outside = f"/p-prefix?cc={FRESH}"
    for path in [*inside, outside]:
        web.client.get(path)
        held_in_l1(b, path, f"{path.split('?')[0]} #1")
    before = b.metrics()[KEY_DROPS]
    web.command("cache.purge.prefix", f"{web.proxy_url}/p-pre/")  # the URL clients use
    wait(lambda: b.metrics()[KEY_DROPS] >= before + 3, "B kept copies inside the prefix")
    assert [b.client().get(p).headers["x-cache-status"] for p in inside] == ["MISS"] * 3
    assert b.client().get(outside).headers["x-cache-status"] == "HIT"
    path = f"/p-cmd-tag?cc={FRESH}&hdr={quote('Cache-Tag: green, other', safe='')}"
    web.client.get(path)
    held_in_l1(b, path, "/p-cmd-tag #1")
    before = b.metrics()[KEY_DROPS]
    web.command("cache.purge.tag", "green")
    after_invalidation(b, before)
    assert b.client().get(path).headers["x-cache-status"] == "MISS"


@pytest.mark.parametrize(
    "options, headers, status",
    [
        pytest.param({"cache_purge_allow": "10.0.0.0/8"}, {}, 403, id="address not allowed"),
        pytest.param({"cache_purge_allow": "127.0.0.1/32", "cache_purge_token": "tok"}, {}, 403, id="token missing"),
        pytest.param({"cache_purge_token": "tok"}, {"Authorization": "Bearer nope"}, 403, id="token wrong"),
        pytest.param({"cache_purge_token": "tok"}, {"Authorization": "Bearer tok"}, 200, id="token right"),
    ],
)
def test_purge_access(web: Web, origin: Origin, options: dict[str, str], headers: dict[str, str], status: int) -> None:
    path = f"/p-access?cc={FRESH}"
    web.client.get(path)
    web.set_options(**{"cache_purge_allow": "127.0.0.1/32,::1/128", "cache_purge_token": "", **options})
    try:
        r = web.client.request("PURGE", path, headers=headers)
    finally:
        web.set_options(cache_purge_allow="127.0.0.1/32,::1/128", cache_purge_token="")
    assert r.status_code == status, r.text
    assert origin.count(path, "PURGE") == 0  # never forwarded
    if status == 403:
        assert r.json() == {"error": "forbidden"}
        assert web.client.get(path).headers["x-cache-status"] == "HIT"  # nothing purged
        assert origin.count(path) == 1


@pytest.mark.parametrize(
    "option, value",
    [
        pytest.param("cache_purge_allow", "10.0.0.0/33", id="bad CIDR"),
        pytest.param("cache_tag_headers", "Surrogate Key", id="bad field name"),
    ],
)
def test_bad_purge_option_stops_startup_with_one_line(tmp_path: Path, origin: Origin, option: str, value: str) -> None:
    rc, out = run_to_exit(tmp_path, origin, f"{option}={value}")
    assert rc != 0, out
    assert any(option in line and value.split("/")[0] in line for line in out.splitlines()), out
    assert "Traceback" not in out and LISTENING not in out, out


def test_passthrough_keeps_tag_fields_for_clients(tmp_path: Path, origin: Origin) -> None:
    p = start_proxy(tmp_path, f"reverse:{origin.url}", "cache_tag_headers_passthrough=true")
    try:
        path = f"/p-pass?cc={FRESH}&hdr={tagged('x y')}"
        c = p.client()
        assert c.get(path).headers["surrogate-key"] == "x y"
        hit = c.get(path)
        assert hit.headers["x-cache-status"] == "HIT" and hit.headers["surrogate-key"] == "x y"
        r = c.request("PURGE", "/", headers={"Surrogate-Key": "y"})  # L1 only: found by a scan
        assert r.status_code == 200 and json.loads(r.text)["purged"] == 1
        assert c.get(path).headers["x-cache-status"] == "MISS"
    finally:
        p.stop()
