"""mitmweb: the flow list shows the cache outcome, and the commands answer over its REST API.

One mitmweb process (reverse mode in front of the module's origin) serves every test here; each
test uses its own paths and looks only at its own flows and keys.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

import pytest
from mitmproxy import io as mitmio

from tests.conftest import Web, running_mitmweb
from tests.origin import Origin

# GET /flows shows flow.marked as mitmproxy's emoji for the marker's shortcode.
GREEN, ORANGE = "\N{LARGE GREEN CIRCLE}", "\N{LARGE ORANGE CIRCLE}"


@pytest.fixture(scope="module")
def web(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    with running_mitmweb(tmp_path_factory.mktemp("mitmweb"), origin) as w:
        yield w


def test_mitmweb_shows_outcomes_and_runs_commands(web: Web, origin: Origin) -> None:
    path = "/web?cc=max-age%3D60"
    before = web.command_json("cache.stats")
    assert web.client.get(path).headers["x-cache-status"] == "MISS"
    assert web.client.get(path).headers["x-cache-status"] == "HIT"
    comments = [f["comment"] for f in web.flows("/web?")]
    assert len(comments) == 2
    assert comments[0].startswith("cache MISS") and comments[1].startswith("cache HIT")
    stats = web.command_json("cache.stats")
    assert stats["l1_entries"] == before["l1_entries"] + 1
    assert stats["requests"]["hit"] == before["requests"]["hit"] + 1
    assert stats["requests"]["miss"] == before["requests"]["miss"] + 1
    assert web.command("cache.purge", origin.url + path) == 1
    assert web.command("cache.purge", origin.url + path) == 0
    # cache.clear answers L1's count, whatever other tests left there.
    assert web.client.get(path).headers["x-cache-status"] == "MISS"
    held = web.command_json("cache.stats")["l1_entries"]
    assert held >= 1
    assert web.command("cache.clear") == held
    assert web.command_json("cache.stats")["l1_entries"] == 0
    assert web.client.get(path).headers["x-cache-status"] == "MISS"
    assert origin.count(path) == 3


# The HIT's response: swr and sie so non-zero stale windows show, Vary: Accept so a variant shows.
HIT_PATH = "/explain-hit?cc=max-age%3D60,stale-while-revalidate%3D30,stale-if-error%3D90&vary=Accept&etag=e1"


def test_explain_tells_miss_hit_not_stored_and_post(web: Web, origin: Origin) -> None:
    accept = {"Accept": "text/csv"}
    assert web.client.get(HIT_PATH, headers=accept).headers["x-cache-status"] == "MISS"
    hit = web.client.get(HIT_PATH, headers=accept)
    assert hit.headers["x-cache-status"] == "HIT"
    assert origin.count(HIT_PATH) == 1
    vary_miss = web.client.get(HIT_PATH, headers={"Accept": "text/html"})
    assert vary_miss.headers["x-cache-status"] == "MISS"
    private_path, no_store_path = "/explain-private?cc=private,max-age%3D60", "/explain-nostore?cc=no-store"
    assert web.client.get(private_path).headers["x-cache-status"] == "MISS"
    assert web.client.get(no_store_path).headers["x-cache-status"] == "MISS"
    post = web.client.post("/explain-post?cc=max-age%3D60", content=b"form=1")
    assert post.status_code == 200 and "x-cache-status" not in post.headers

    rows = web.command_json("cache.explain", "~u /explain-")
    assert [(r["method"], r["url"]) for r in rows] == [
        ("GET", origin.url + HIT_PATH), ("GET", origin.url + HIT_PATH), ("GET", origin.url + HIT_PATH),
        ("GET", origin.url + private_path), ("GET", origin.url + no_store_path),
        ("POST", origin.url + "/explain-post?cc=max-age%3D60"),
    ]
    miss, hit_row, vary_row, private, no_store, post_row = rows

    # The first request: nothing stored yet (uri-miss); the response it stored is described.
    assert miss["x-cache-status"] == "MISS"
    assert miss["key"] == origin.url + HIT_PATH
    assert miss["tier"] is None and miss["age"] is None
    assert miss["why"] == "nothing stored for this URL (RFC 9111 §4)"
    assert "fwd=uri-miss" in miss["cache-status"] and "stored" in miss["cache-status"].split("; ")
    assert miss["variant"] == {"accept": "text/csv"} and "not_stored" not in miss

    # The HIT: where it came from, how old, how fresh, which variant.
    assert hit_row["x-cache-status"] == "HIT"
    assert hit_row["key"] == origin.url + HIT_PATH
    assert hit_row["tier"] == "l1"
    assert isinstance(hit_row["age"], int) and 0 <= hit_row["age"] <= 2
    assert hit_row["age"] == int(hit.headers["age"])
    assert hit_row["freshness_lifetime"] == 60
    assert isinstance(hit_row["ttl"], int) and 57 <= hit_row["ttl"] <= 60
    assert hit_row["cache-status"] == f"mitmcache; hit; ttl={hit_row['ttl']}; detail=l1"
    assert hit_row["cache-status"] == hit.headers["cache-status"]
    assert hit_row["stale_while_revalidate"] == 30
    assert hit_row["stale_if_error"] == 90
    assert hit_row["never_serve_stale"] is False and hit_row["heuristic"] is False
    assert hit_row["variant"] == {"accept": "text/csv"}
    assert hit_row["etag"] == '"e1"'
    assert "why" not in hit_row and "not_stored" not in hit_row

    # Another Accept value: the URL is stored, but not for this variant (§4.1).
    assert vary_row["x-cache-status"] == "MISS" and vary_row["tier"] == "l1"
    assert vary_row["why"].endswith("(RFC 9111 §4.1)") and "other request header values" in vary_row["why"]
    assert vary_row["variant"] == {"accept": "text/html"}

    # Not stored: the reason is named (and in Cache-Status); nothing about an entry is shown.
    assert private["x-cache-status"] == "MISS" and private["not_stored"] == "private"
    assert private["why"] == "nothing stored for this URL (RFC 9111 §4)"
    assert private["cache-status"].endswith("detail=private") and "stored" not in private["cache-status"].split("; ")
    assert "ttl" not in private and "variant" not in private
    assert no_store["not_stored"] == "no-store" and no_store["cache-status"].endswith("detail=no-store")

    # A POST is not looked up.
    assert post_row["x-cache-status"] is None
    assert post_row["why"] == "not looked up or stored: only GET and HEAD are; a 2xx/3xx answer to an unsafe method invalidates the URL and its same-origin Location/Content-Location (RFC 9111 §4.4)"
    assert "key" not in post_row

    # Other flow specs: a filter for one URL, and one flow by id.
    assert [r["x-cache-status"] for r in web.command_json("cache.explain", "~u /explain-hit")] == ["MISS", "HIT", "MISS"]
    hit_flow = web.flows("/explain-hit")[1]
    assert web.command_json("cache.explain", f"@{hit_flow['id']}") == [hit_row]
    assert web.command_json("cache.explain", "~u /explain-nothing-like-this") == []
    assert web.call("cache.explain", "~~bad")["error"].startswith("Invalid filter expression")


def test_explain_gives_the_rule_for_not_storing(web: Web, origin: Origin) -> None:
    path = "/rule-for-not-storing?cc=private,max-age%3D60"
    assert web.client.get(path).headers["x-cache-status"] == "MISS"
    (row,) = web.command_json("cache.explain", "~u /rule-for-not-storing")
    assert row["not_stored"] == "private"
    assert "RFC 9111 §5.2.2.7" in json.dumps(row, ensure_ascii=False)


VARY_PATH = "/inspect-vary?cc=max-age%3D120&vary=Accept&etag=iv"


def test_inspect_shows_stored_variants_by_origin_and_client_url(web: Web, origin: Origin) -> None:
    bodies = {}
    for accept, status in (("text/html", "MISS"), ("application/json", "MISS"), ("text/html", "HIT")):
        r = web.client.get(VARY_PATH, headers={"Accept": accept})
        assert r.headers["x-cache-status"] == status
        bodies.setdefault(accept, r.content)
    assert origin.count(VARY_PATH) == 2

    origin_key = origin.url + VARY_PATH
    by_origin = web.command_json("cache.inspect", origin_key)
    assert by_origin["url"] == origin_key
    assert [k["key"] for k in by_origin["keys"]] == [origin_key]
    variants = by_origin["keys"][0]["l1"]
    assert [v["variant"] for v in variants] == [{"accept": "text/html"}, {"accept": "application/json"}]
    for v in variants:
        accept = v["variant"]["accept"]
        assert v["status"] == 200
        assert v["etag"] == '"iv"'
        assert v["freshness_lifetime"] == 120
        assert isinstance(v["ttl"], int) and 115 <= v["ttl"] <= 120
        assert v["body_bytes"] == len(bodies[accept]) > 0
        headers = {name.lower(): value for name, value in v["headers"]}
        assert headers["vary"] == "Accept" and headers["etag"] == '"iv"'
        assert headers["cache-control"] == "max-age=120"
        assert headers["content-length"] == str(len(bodies[accept]))
        assert "body" not in v and "content" not in v
    raw = web.command("cache.inspect", origin_key)
    assert all(body.decode() not in raw for body in bodies.values())  # metadata only

    # The URL the client used (the proxy's own) finds the same entry: the origin's key.
    client_url = web.proxy_url + VARY_PATH
    by_client = web.command_json("cache.inspect", client_url)
    assert by_client["url"] == client_url
    keys = {k["key"]: k["l1"] for k in by_client["keys"]}
    assert list(keys) == [origin_key]  # a reverse listener's URL names the origin's key only
    same = ("variant", "status", "etag", "stored_at", "body_bytes", "headers")
    assert [{n: v[n] for n in same} for v in keys[origin_key]] == [{n: v[n] for n in same} for v in variants]

    # Never fetched: no L1 entry under any key.
    never = web.command_json("cache.inspect", web.proxy_url + "/inspect-never")
    assert [k["l1"] for k in never["keys"]] == [None]
    assert [k["key"] for k in never["keys"]] == [origin.url + "/inspect-never"]
    assert web.call("cache.inspect", "not a url") == {"error": "not an absolute http(s) URL: 'not a url'"}


def test_flow_list_marks_hits_and_stale(web: Web, origin: Origin) -> None:
    path = "/marker?cc=max-age%3D60"
    assert [web.client.get(path).headers["x-cache-status"] for _ in range(2)] == ["MISS", "HIT"]
    stale_path = "/marker-stale?cc=max-age%3D1,stale-while-revalidate%3D60&age=5"  # stale on arrival
    assert [web.client.get(stale_path).headers["x-cache-status"] for _ in range(2)] == ["MISS", "STALE"]

    miss_flow, hit_flow = web.flows("/marker?")
    assert miss_flow["marked"] == "" and miss_flow["comment"].startswith("cache MISS")
    assert hit_flow["marked"] == GREEN
    assert re.fullmatch(r"cache HIT \(.*\bl1\b.*, age=\d+s\)", hit_flow["comment"]), hit_flow["comment"]
    stale_miss, stale_flow = web.flows("/marker-stale")
    assert stale_miss["marked"] == ""
    assert stale_flow["marked"] == ORANGE and stale_flow["comment"].startswith("cache STALE")

    # What the flow itself holds (GET /flows/dump is a flow file): the shortcode and the outcome.
    dumped = list(mitmio.FlowReader(io.BytesIO(web.api.get("/flows/dump", params={"filter": "~u /marker"}).content)).stream())
    assert [f.marked for f in dumped] == ["", ":green_circle:", "", ":orange_circle:"]
    assert [f.metadata["mitmcache"]["x-cache-status"] for f in dumped] == ["MISS", "HIT", "MISS", "STALE"]
    # @marked selects the flows the cache answered.
    marked = [r for r in web.command_json("cache.explain", "@marked") if "/marker" in r["url"]]
    assert [(r["url"], r["x-cache-status"]) for r in marked] == [
        (origin.url + path, "HIT"), (origin.url + stale_path, "STALE"),
    ]

    # cache_mark_flows=false: the comment still tells, the marker is left alone.
    web.set_options(cache_mark_flows=False)
    try:
        off = "/marker-off?cc=max-age%3D60"
        assert [web.client.get(off).headers["x-cache-status"] for _ in range(2)] == ["MISS", "HIT"]
    finally:
        web.set_options(cache_mark_flows=True)
    off_flows = web.flows("/marker-off")
    assert [f["marked"] for f in off_flows] == ["", ""]
    assert [f["comment"].split(" (")[0] for f in off_flows] == ["cache MISS", "cache HIT"]


def test_purge_with_the_client_url(web: Web, origin: Origin) -> None:
    path = "/purge-me?cc=max-age%3D60"
    assert [web.client.get(path).headers["x-cache-status"] for _ in range(2)] == ["MISS", "HIT"]
    assert web.command("cache.purge", web.proxy_url + path) == 1
    assert web.command_json("cache.inspect", origin.url + path)["keys"][0]["l1"] is None
    again = web.client.get(path)
    assert again.headers["x-cache-status"] == "MISS" and "fwd=uri-miss" in again.headers["cache-status"]
    assert origin.count(path) == 2
    assert web.command("cache.purge", web.proxy_url + path) == 1
    assert web.command("cache.purge", web.proxy_url + path) == 0
    assert web.call("cache.purge", "/purge-me") == {"error": "not an absolute http(s) URL: '/purge-me'"}


def test_purge_with_keep_host_header(web: Web, origin: Origin) -> None:
    path = "/purge-khh?cc=max-age%3D60"
    web.set_options(keep_host_header=True)
    try:
        assert [web.client.get(path).headers["x-cache-status"] for _ in range(2)] == ["MISS", "HIT"]
        assert web.command("cache.purge", web.proxy_url + path) == 1
    finally:
        web.set_options(keep_host_header=False)
