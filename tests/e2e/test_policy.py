"""End to end: operator policies (``cache_policy``) through real mitmdump/mitmweb processes in
front of the counting origin, and two proxies sharing one Valkey ring.

One module proxy carries every rule below (each test uses its own path prefix, so the rules'
``~u`` filters never overlap); start-up failures, the ring, a stopped origin and run-time changes
start their own processes. Responses that must arrive already stale use the origin's ``date=N``
(a Date N seconds old counts as age, RFC 9111 §4.2.3), so only expiry itself is waited for.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from mitmcache.valkey_nodes import ValkeyNode, free_port
from tests.conftest import ENTRY, MITMDUMP, Proxy, Web, popen_child, running_mitmweb, start_proxy
from tests.origin import Origin, start_origin

RULES = [
    "|~u /forced/|ttl=60",  # 1
    "|~u /neg/|error_ttl=2",  # 2
    "|~u /neg-never/|error_ttl=0",  # 3
    "|~u /swr/|ttl=2 swr=30",  # 4
    "|~u /sie/|ttl=2 sie=60",  # 5
    "|~u /sie-mr/|ttl=2 sie=60",  # 6
    "|~u /sie-mr-ok/|ttl=2 sie=60 override=must-revalidate",  # 7
    "|~u /tenant/|ttl=60 key_headers=X-Tenant-ID",  # 8
    "|~u /norm/|ttl=60 ignore_params=utm_* sort_params",  # 9
    "|~u /bypass/|bypass",  # 10
    "|~u /private/|override=private",  # 11
    "|~u /cookie/|override=set-cookie",  # 12
    "|~u /cookie-private/|override=private,set-cookie",  # 13
    "|~u /named/|ttl=60 name=catalog",  # 14
    "|~u /nostore/|no_store",  # 15
    "|~u /auth-key/|ttl=60 key_headers=authorization",  # 16
    "|~u /auth/|ttl=60",  # 17
]
LISTENING = "listening at"


def q(value: str) -> str:
    return quote(value, safe="")


def start_policy_proxy(tmp: Path, origin: Origin, rules: list[str], *sets: str) -> Proxy:
    """A reverse proxy with these ``cache_policy`` rules (one ``--set`` each)."""
    tmp.mkdir(parents=True, exist_ok=True)
    return start_proxy(tmp, f"reverse:{origin.url}", *(f"cache_policy={r}" for r in rules), *sets)


@pytest.fixture(scope="module")
def proxy(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_policy_proxy(tmp_path_factory.mktemp("policy-proxy"), origin, RULES)
    yield p
    p.stop()


def wait_for_count(origin: Origin, path: str, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while origin.count(path) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert origin.count(path) == count, (path, origin.count(path))


def cache_ttl(response: httpx.Response) -> int:
    members = dict(p.partition("=")[::2] for p in response.headers["cache-status"].split("; "))
    return int(members["ttl"])


# ---------------------------------------------------------------- freshness the operator sets


def test_forced_ttl_caches_a_response_without_caching_headers(client: httpx.Client, origin: Origin) -> None:
    path = "/forced/plain"
    miss, hit = client.get(path), client.get(path)
    assert miss.headers["x-cache-status"] == "MISS" and "; stored; ttl=" in miss.headers["cache-status"]
    assert hit.headers["x-cache-status"] == "HIT"
    assert hit.text == miss.text == "/forced/plain #1"
    assert 55 <= cache_ttl(hit) <= 60
    assert "cache-control" not in hit.headers  # nothing added to what the client sees
    assert origin.count(path) == 1


def test_forced_ttl_changes_freshness_not_the_headers_clients_see(client: httpx.Client, origin: Origin) -> None:
    # 5 s old on arrival: stale under the origin's max-age=1, fresh under the rule's 60 s.
    path = f"/forced/short?cc={q('max-age=1, must-revalidate')}&date=5"
    client.get(path)
    hit = client.get(path)
    assert hit.headers["x-cache-status"] == "HIT"
    assert hit.headers["cache-control"] == "max-age=1, must-revalidate"  # the origin's, passed through
    assert 50 <= cache_ttl(hit) <= 55  # Cache-Status ttl= is the rule's, less the age
    assert origin.count(path) == 1


@pytest.mark.parametrize("status", [pytest.param(404, id="404"), pytest.param(503, id="503")])
def test_error_ttl_caches_an_error_that_long_and_no_longer(client: httpx.Client, origin: Origin, status: int) -> None:
    path = f"/neg/{status}?status={status}"
    first, second = client.get(path), client.get(path)
    assert first.status_code == second.status_code == status
    assert second.headers["x-cache-status"] == "HIT" and second.text == first.text
    assert origin.count(path) == 1
    time.sleep(2.1)
    third = client.get(path)
    assert third.status_code == status and third.headers["x-cache-status"] == "MISS"
    assert third.text == f"/neg/{status} #2"
    assert origin.count(path) == 2


@pytest.mark.parametrize("status", [pytest.param(404, id="404"), pytest.param(503, id="503")])
def test_error_ttl_zero_never_stores_an_error(client: httpx.Client, origin: Origin, status: int) -> None:
    # max-age=60 would store a 404 under RFC 9111; the rule says never.
    path = f"/neg-never/{status}?status={status}&cc={q('max-age=60')}"
    responses = [client.get(path) for _ in range(2)]
    assert [r.headers["x-cache-status"] for r in responses] == ["MISS", "MISS"]
    assert "policy" in responses[0].headers["cache-status"].split("detail=")[1].strip('"').split("+")
    assert origin.count(path) == 2


# ---------------------------------------------------------------- the operator's stale windows


def test_operator_swr_serves_stale_and_revalidates_once(client: httpx.Client, origin: Origin) -> None:
    path = "/swr/a"
    assert client.get(path).headers["x-cache-status"] == "MISS"
    time.sleep(2.1)
    stale = client.get(path)
    assert stale.headers["x-cache-status"] == "STALE" and stale.text == "/swr/a #1"
    assert "stale-while-revalidate" in stale.headers["cache-status"]
    wait_for_count(origin, path, 2)
    time.sleep(0.2)
    fresh = client.get(path)
    assert fresh.headers["x-cache-status"] == "HIT" and fresh.text == "/swr/a #2"
    assert origin.count(path) == 2  # one background revalidation, nothing else


def test_operator_sie_serves_stale_when_the_origin_answers_503(client: httpx.Client, origin: Origin) -> None:
    path = "/sie/a?date=10&then_status=503"  # arrives 10 s old: stale at once under ttl=2
    assert client.get(path).headers["x-cache-status"] == "MISS"
    stale = client.get(path)
    assert stale.status_code == 200 and stale.headers["x-cache-status"] == "STALE"
    assert stale.text == "/sie/a #1" and "stale-if-error" in stale.headers["cache-status"]
    assert origin.count(path) == 2


def test_operator_sie_serves_stale_when_the_origin_is_gone(tmp_path: Path) -> None:
    gone = start_origin()
    p = start_policy_proxy(tmp_path, gone, ["|~u /sie/|ttl=2 sie=60"])
    try:
        c = p.client()
        assert c.get("/sie/gone?date=10").headers["x-cache-status"] == "MISS"
        gone.stop()
        stale = c.get("/sie/gone?date=10")
        assert stale.status_code == 200 and stale.headers["x-cache-status"] == "STALE"
        assert stale.text == "/sie/gone #1" and "stale-if-error" in stale.headers["cache-status"]
    finally:
        p.stop()


def test_upstream_must_revalidate_still_forbids_operator_sie(client: httpx.Client, origin: Origin) -> None:
    path = f"/sie-mr/a?date=10&then_status=503&cc={q('must-revalidate')}"
    assert client.get(path).headers["x-cache-status"] == "MISS"
    failed = client.get(path)
    assert failed.status_code == 503 and failed.headers.get("x-cache-status") != "STALE"


def test_override_must_revalidate_lets_operator_sie_serve_stale(client: httpx.Client, origin: Origin) -> None:
    path = f"/sie-mr-ok/a?date=10&then_status=503&cc={q('must-revalidate')}"
    assert client.get(path).headers["x-cache-status"] == "MISS"
    stale = client.get(path)
    assert stale.status_code == 200 and stale.headers["x-cache-status"] == "STALE"
    assert stale.headers["cache-control"] == "must-revalidate"  # still the origin's header


# ---------------------------------------------------------------- the key


def test_key_headers_keep_tenants_apart(proxy: Proxy, origin: Origin) -> None:
    path = "/tenant/a?echo=X-Tenant-ID"
    tenants: list[dict[str, str]] = [{"X-Tenant-ID": "a"}, {"X-Tenant-ID": "b"}, {}, {"X-Tenant-ID": ""}]
    first = [proxy.client(headers=h).get(path) for h in tenants]
    again = [proxy.client(headers=h).get(path) for h in tenants]
    assert [r.headers["x-cache-status"] for r in first] == ["MISS"] * 4
    assert [r.headers["x-cache-status"] for r in again] == ["HIT"] * 4
    assert [r.text for r in again] == [r.text for r in first] == [
        "/tenant/a #1 X-Tenant-ID=a", "/tenant/a #2 X-Tenant-ID=b", "/tenant/a #3 X-Tenant-ID=", "/tenant/a #4 X-Tenant-ID=",
    ]
    assert origin.count(path) == 4


def test_ignored_and_sorted_params_share_one_entry(client: httpx.Client, origin: Origin) -> None:
    plain, noisy = "/norm/p?a=1&b=2", "/norm/p?utm_source=x&b=2&a=1"
    assert client.get(plain).headers["x-cache-status"] == "MISS"
    hit = client.get(noisy)
    assert hit.headers["x-cache-status"] == "HIT" and hit.text == "/norm/p #1"
    assert origin.count(plain) == 1 and origin.count(noisy) == 0


def test_origin_gets_the_query_as_the_client_sent_it(client: httpx.Client, origin: Origin) -> None:
    noisy, plain = "/norm/q?utm_source=x&b=2&a=1", "/norm/q?a=1&b=2"
    assert client.get(noisy).headers["x-cache-status"] == "MISS"
    assert client.get(plain).headers["x-cache-status"] == "HIT"
    assert [s.line for s in origin.requests_for(noisy)] == [b"GET /norm/q?utm_source=x&b=2&a=1 HTTP/1.1"]
    assert origin.count(plain) == 0


def test_post_invalidates_the_normalised_key(client: httpx.Client, origin: Origin) -> None:
    path = "/norm/inv?a=1&b=2"
    client.get(path)
    assert client.get(path).headers["x-cache-status"] == "HIT"
    assert client.post("/norm/inv?utm_medium=z&b=2&a=1", content=b"x").status_code == 200
    after = client.get(path)
    assert after.headers["x-cache-status"] == "MISS" and after.text == "/norm/inv #2"


def test_post_by_one_tenant_invalidates_every_tenants_copy(proxy: Proxy, origin: Origin) -> None:
    # RFC 9111 §4.4: an unsafe request invalidates the stored responses for its target URI; the
    # tenant header only splits what is stored under it.
    path = "/tenant/inv?echo=X-Tenant-ID"
    a, b = proxy.client(headers={"X-Tenant-ID": "a"}), proxy.client(headers={"X-Tenant-ID": "b"})
    a.get(path), b.get(path)
    assert b.get(path).headers["x-cache-status"] == "HIT"
    assert a.post(path, content=b"x").status_code == 200
    assert a.get(path).headers["x-cache-status"] == "MISS"
    assert b.get(path).headers["x-cache-status"] == "MISS"


# ---------------------------------------------------------------- bypass, no_store, Authorization


def test_bypass_never_looks_up_nor_stores(client: httpx.Client, origin: Origin) -> None:
    path = f"/bypass/a?cc={q('max-age=60')}"
    responses = [client.get(path) for _ in range(3)]
    assert all(r.headers.get("x-cache-status") != "HIT" for r in responses)
    assert all("fwd=bypass" in r.headers["cache-status"] for r in responses)
    assert [r.text for r in responses] == ["/bypass/a #1", "/bypass/a #2", "/bypass/a #3"]
    assert origin.count(path) == 3


def test_no_store_never_stores(client: httpx.Client, origin: Origin) -> None:
    path = f"/nostore/a?cc={q('max-age=60')}"
    responses = [client.get(path) for _ in range(2)]
    assert [r.headers["x-cache-status"] for r in responses] == ["MISS", "MISS"]
    assert origin.count(path) == 2


def test_authorization_is_not_stored_under_a_forced_ttl(client: httpx.Client, origin: Origin) -> None:
    path = f"/auth/a?cc={q('max-age=60')}"
    responses = [client.get(path, headers={"Authorization": "Bearer x"}) for _ in range(2)]
    assert [r.headers["x-cache-status"] for r in responses] == ["MISS", "MISS"]
    assert "authorization" in responses[0].headers["cache-status"]
    assert origin.count(path) == 2


def test_authorization_in_key_headers_stores_one_entry_per_credential(proxy: Proxy, origin: Origin) -> None:
    path = "/auth-key/a?echo=Authorization"
    users: list[dict[str, str]] = [{"Authorization": "Bearer x"}, {"Authorization": "Bearer y"}, {}]
    first = [proxy.client(headers=h).get(path) for h in users]
    again = [proxy.client(headers=h).get(path) for h in users]
    assert [r.headers["x-cache-status"] for r in again] == ["HIT"] * 3
    assert [r.text for r in again] == [r.text for r in first] == [
        "/auth-key/a #1 Authorization=Bearer x", "/auth-key/a #2 Authorization=Bearer y", "/auth-key/a #3 Authorization=",
    ]


# ---------------------------------------------------------------- overrides


def test_override_private_stores_a_private_response(client: httpx.Client, origin: Origin) -> None:
    path = f"/private/a?cc={q('private, max-age=60')}"
    client.get(path)
    hit = client.get(path)
    assert hit.headers["x-cache-status"] == "HIT"
    assert hit.headers["cache-control"] == "private, max-age=60"
    assert origin.count(path) == 1


def test_override_set_cookie_keeps_the_cookie_from_other_clients(proxy: Proxy, origin: Origin) -> None:
    path = f"/cookie/a?cc={q('max-age=60')}&cookie=1"
    first = proxy.client().get(path)
    assert first.headers["x-cache-status"] == "MISS"
    assert first.headers["set-cookie"] == "session=user1; Path=/"  # its own cookie
    for _ in range(2):
        other = proxy.client().get(path)
        assert other.headers["x-cache-status"] == "HIT" and other.text == "/cookie/a #1"
        assert "set-cookie" not in other.headers
    assert origin.count(path) == 1


def test_override_with_set_cookie_still_passes_cache_control_through(proxy: Proxy, origin: Origin) -> None:
    path = f"/cookie-private/a?cc={q('private, max-age=60')}&cookie=1"
    proxy.client().get(path)
    hit = proxy.client().get(path)
    assert hit.headers["x-cache-status"] == "HIT" and "set-cookie" not in hit.headers
    assert hit.headers["cache-control"] == "private, max-age=60"


# ---------------------------------------------------------------- Cache-Status names the rule


@pytest.mark.parametrize(
    "path, label",
    [
        pytest.param("/forced/label", "policy=1", id="by position"),
        pytest.param("/named/label", "policy=catalog", id="by name"),
    ],
)
def test_cache_status_detail_names_the_rule(client: httpx.Client, path: str, label: str) -> None:
    for r in (client.get(path), client.get(path)):
        assert label in r.headers["cache-status"].partition("detail=")[2].strip('"').split("+"), r.headers["cache-status"]


def test_request_no_rule_matches_has_no_policy_detail(client: httpx.Client) -> None:
    r = client.get(f"/unruled/a?cc={q('max-age=60')}")
    assert "policy" not in r.headers["cache-status"]


# ---------------------------------------------------------------- start-up


@pytest.mark.parametrize(
    "rules, index, problem",
    [
        pytest.param(["|~u /a|tll=5m"], 1, "tll: unknown setting", id="unknown setting"),
        pytest.param(["|~u /a|ttl=5m", "|~u /b|ttl=5x"], 2, "ttl: not a duration: '5x'", id="bad duration in rule 2"),
        pytest.param(["|~zz|ttl=5m"], 1, "Invalid filter expression", id="bad filter"),
    ],
)
def test_invalid_rule_stops_startup_with_one_line(tmp_path: Path, origin: Origin, rules: list[str], index: int, problem: str) -> None:
    args = [str(MITMDUMP), "-q", "-s", str(ENTRY), "--mode", f"reverse:{origin.url}", "--listen-host", "127.0.0.1",
            "-p", str(free_port()), "--set", f"confdir={tmp_path}", *(a for r in rules for a in ("--set", f"cache_policy={r}"))]
    proc = popen_child(args, tmp_path)
    try:
        out = proc.communicate(timeout=20)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"mitmdump still running: {proc.communicate()[0].decode(errors='replace')}")
    assert proc.returncode != 0, out
    lines = [line for line in out.splitlines() if "cache_policy" in line]
    assert len(lines) == 1, out
    assert f"rule {index}" in lines[0] and problem in lines[0] and rules[index - 1] in lines[0], out
    assert "Traceback" not in out and LISTENING not in out, out


# ---------------------------------------------------------------- two proxies, one ring


def test_two_proxies_with_the_same_rules_share_entries(tmp_path: Path, origin: Origin, ring_nodes: list[ValkeyNode]) -> None:
    rules = ["|~u /ring/|ttl=60 ignore_params=utm_* sort_params key_headers=X-Tenant-ID"]
    sets = (f"cache_valkey_urls={','.join(n.url for n in ring_nodes)}", "cache_valkey_timeout_ms=200")
    a = start_policy_proxy(tmp_path / "a", origin, rules, *sets)
    b = start_policy_proxy(tmp_path / "b", origin, rules, *sets)
    try:
        tenant = {"X-Tenant-ID": "t"}
        ra = a.client(headers=tenant).get("/ring/a?utm_source=x&b=2&a=1")
        rb = b.client(headers=tenant).get("/ring/a?a=1&b=2")
        assert ra.headers["x-cache-status"] == "MISS"
        assert rb.headers["x-cache-status"] == "HIT" and "l2" in rb.headers["cache-status"].partition("detail=")[2].strip('"').split("+")
        assert rb.text == ra.text == "/ring/a #1"
        other = b.client(headers={"X-Tenant-ID": "u"}).get("/ring/a?a=1&b=2")
        assert other.headers["x-cache-status"] == "MISS" and other.text == "/ring/a #1"  # counted per query as sent
        assert origin.count("/ring/a?a=1&b=2") == 1 and origin.count("/ring/a?utm_source=x&b=2&a=1") == 1
    finally:
        a.stop()
        b.stop()


def test_l1_ttl_zero_keeps_a_rules_entries_in_valkey_only(
    tmp_path: Path, origin: Origin, ring_nodes: list[ValkeyNode]
) -> None:
    rules = ["|~u /ring-l1/|ttl=60 l1_ttl=0", "|~u /ring-near/|ttl=60"]
    sets = (f"cache_valkey_urls={','.join(n.url for n in ring_nodes)}", "cache_valkey_timeout_ms=200")
    a = start_policy_proxy(tmp_path / "a", origin, rules, *sets)
    b = start_policy_proxy(tmp_path / "b", origin, rules, *sets)
    try:
        def tiers(path: str) -> list[str]:
            responses = [a.client().get(path)] + [c.get(path) for c in (a.client(), b.client(), b.client())]
            return [r.headers["cache-status"].partition("detail=")[2].strip('"').split("+")[-1] for r in responses[1:]]

        assert tiers("/ring-l1/a") == ["l2", "l2", "l2"]  # never a near-cache copy, on either proxy
        assert tiers("/ring-near/a") == ["l1", "l2", "l1"]  # the store's default near-cache
        assert origin.count("/ring-l1/a") == origin.count("/ring-near/a") == 1
    finally:
        a.stop()
        b.stop()


# ---------------------------------------------------------------- mitmweb: run-time changes and commands

WEB_RULES = [
    "|~u /web-rt/|ttl=60",  # 1
    "|~u /web-norm/|ttl=60 ignore_params=utm_* sort_params",  # 2
    "|~u /web-tenant/|ttl=60 key_headers=X-Tenant-ID",  # 3
    "|~hq X-Debug|bypass name=debug",  # 4
]


@pytest.fixture(scope="module")
def web(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    with running_mitmweb(tmp_path_factory.mktemp("policy-web"), origin, *(f"cache_policy={r}" for r in WEB_RULES)) as w:
        yield w


def test_rules_change_at_run_time(web: Web, origin: Origin) -> None:
    path = f"/web-rt/a?cc={q('max-age=60')}"
    with web.new_client() as c:
        c.get(path)
        assert c.get(path).headers["x-cache-status"] == "HIT"
        try:
            web.api.put("/options", json={"cache_policy": ["|~u /web-rt/|bypass", *WEB_RULES[1:]]}).raise_for_status()
            bypassed = c.get(path)
            assert "fwd=bypass" in bypassed.headers["cache-status"] and bypassed.text == "/web-rt/a #2"
            rejected = web.api.put("/options", json={"cache_policy": ["|~u /web-rt/|ttl=5x"]})
            assert rejected.status_code == 400 and "rule 1" in rejected.text, rejected.text
            assert "fwd=bypass" in c.get(path).headers["cache-status"]  # the previous rules stay
        finally:
            web.api.put("/options", json={"cache_policy": WEB_RULES}).raise_for_status()
        assert c.get(path).headers["x-cache-status"] == "HIT"  # the stored entry is used again
    assert origin.count(path) == 3


def test_purge_reaches_the_normalised_key(web: Web, origin: Origin) -> None:
    with web.new_client() as c:
        c.get("/web-norm/p?b=2&a=1")
        assert c.get("/web-norm/p?a=1&b=2").headers["x-cache-status"] == "HIT"
        assert web.command("cache.purge", f"{web.proxy_url}/web-norm/p?utm_x=1&a=1&b=2") == 1
        assert c.get("/web-norm/p?a=1&b=2").headers["x-cache-status"] == "MISS"
        assert web.command("cache.purge", f"{origin.url}/web-norm/p?b=2&a=1") == 1  # by the origin's URL too


def test_purge_drops_every_tenants_copy(web: Web, origin: Origin) -> None:
    path = "/web-tenant/purge"
    for tenant in ("a", "b"):
        with web.new_client(headers={"X-Tenant-ID": tenant}) as c:
            c.get(path)
    web.command("cache.purge", f"{web.proxy_url}{path}")
    for tenant in ("a", "b"):
        with web.new_client(headers={"X-Tenant-ID": tenant}) as c:
            assert c.get(path).headers["x-cache-status"] == "MISS", tenant


def test_policy_explain_gives_rule_key_and_effective_values(web: Web, origin: Origin) -> None:
    view = json.loads(web.command("cache.policy.explain", f"{origin.url}/web-norm/p?b=2&utm_x=9&a=1"))
    assert view["rule"] == {"index": 2, "name": None, "spec": WEB_RULES[1]}
    assert view["key"] == f"{origin.url}/web-norm/p?a=1&b=2"
    assert view["effective"]["ttl"] == 60 and view["effective"]["swr"] is None
    tenant = json.loads(web.command("cache.policy.explain", f"{origin.url}/web-tenant/x", "X-Tenant-ID=a"))
    assert tenant["rule"]["index"] == 3 and tenant["key"].startswith(f"{origin.url}/web-tenant/x\nkh:x-tenant-id=")
    assert '"a"' not in tenant["key"]  # values are hashed in keys
    assert tenant["effective"]["key_headers"] == ["x-tenant-id"]
    debug = json.loads(web.command("cache.policy.explain", f"{origin.url}/elsewhere", "X-Debug=1"))
    assert debug["rule"]["name"] == "debug" and debug["effective"]["bypass"] is True
    none = json.loads(web.command("cache.policy.explain", f"{origin.url}/elsewhere"))
    assert none["rule"] is None and none["key"] == f"{origin.url}/elsewhere"
    # The URL a client of the reverse listener uses is mapped to the origin's, as purge does.
    by_client = json.loads(web.command("cache.policy.explain", f"{web.proxy_url}/web-norm/p?b=2&a=1"))
    assert by_client["origin_url"] == f"{origin.url}/web-norm/p?b=2&a=1"
    assert by_client["rule"]["index"] == 2 and by_client["key"] == f"{origin.url}/web-norm/p?a=1&b=2"
