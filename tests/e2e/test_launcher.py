"""scripts/run through real processes: the fast launcher (the default) in reverse and regular
mode with HTTPS interception, its ``-w`` flows read back with mitmproxy's reader, its refusal of
options it does not support, and ``--stock`` running stock mitmdump."""

from __future__ import annotations

import ssl
import time
import subprocess
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from mitmproxy import io as mitm_io

from mitmcache.valkey_nodes import free_port
from tests.conftest import ROOT, Proxy, popen_child, wait_for_port
from tests.origin import Origin, start_origin

RUN = ROOT / "scripts" / "run"
CC = quote("max-age=300", safe="")


def launch(tmp: Path, *args: str) -> Proxy:
    """``scripts/run ARGS -p PORT`` with its own confdir and metrics port, once it listens."""
    port, metrics_port = free_port(), free_port()
    while metrics_port == port:  # two binds to port 0 may hand out the same port
        metrics_port = free_port()
    confdir = tmp / "mitmproxy-conf"
    argv = [str(RUN), *args, "--listen-host", "127.0.0.1", "-p", str(port),
            "--set", f"confdir={confdir}", "--set", f"cache_metrics_port={metrics_port}"]
    proxy = Proxy(popen_child(argv, tmp), port, metrics_port, confdir)
    try:
        wait_for_port(port, proxy.proc, timeout=60)
    except Exception:
        proxy.stop()
        raise
    return proxy


def statuses(client: httpx.Client, url: str, times: int = 2) -> list[str]:
    out = []
    for _ in range(times):
        r = client.get(url)
        assert r.status_code == 200, (url, r.status_code, r.text[:200])
        out.append(r.headers.get("x-cache-status", "<none>"))
    return out


USER_SCRIPT = """
def response(flow):
    flow.response.headers["x-user-script"] = flow.response.headers.get("x-cache-status", "none")
"""


def test_fast_launcher_reverse_hit_miss_flow_lines_and_w_flows_read_back(tmp_path: Path, origin: Origin) -> None:
    flows_file = tmp_path / "out.flows"
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    proxy = launch(tmp_path, "--nodes", "1", "--mode", f"reverse:{origin.url}", "-w", str(flows_file), "-s", str(script))
    path = f"/fast-reverse?cc={CC}"
    try:
        with proxy.client() as c:
            assert statuses(c, path) == ["MISS", "HIT"]
            r = c.get(path)
            assert r.text == "/fast-reverse #1"
            assert r.headers["x-user-script"] == "HIT"  # the user's -s script runs after the cache
        assert proxy.metrics()['mitmcache_stores_total{tier="l2"}'] == 1  # the local node took it
    finally:
        out = proxy.stop()
    assert origin.count(path) == 1
    assert "(fast launcher" in out, out
    assert out.count(f"GET {origin.url}/fast-reverse") == 3, out  # a flow line per request (no -q)
    flows = list(mitm_io.read_flows_from_paths([str(flows_file)]))
    assert [f.response.headers["x-cache-status"] for f in flows] == ["MISS", "HIT", "HIT"]
    assert [f.response.content for f in flows] == [b"/fast-reverse #1"] * 3
    assert flows[1].metadata["mitmcache"]["tier"] == "l1"


def test_fast_launcher_regular_mode_intercepts_https(tmp_path: Path) -> None:
    tls_origin = start_origin(tls=True)
    proxy = launch(tmp_path, "--l1-only", "-q", "--ssl-insecure")
    try:
        ca = proxy.confdir / "mitmproxy-ca-cert.pem"
        with httpx.Client(proxy=proxy.url, verify=ssl.create_default_context(cafile=str(ca)), timeout=10) as c:
            url = f"https://127.0.0.1:{tls_origin.port}/fast-tls?cc={CC}"
            assert statuses(c, url) == ["MISS", "HIT"]
            assert c.get(url).text == "/fast-tls #1"
        assert tls_origin.count(f"/fast-tls?cc={CC}") == 1
    finally:
        proxy.stop()
        tls_origin.stop()


@pytest.mark.parametrize(
    "args, named",
    [
        pytest.param(["--map-remote", "|/a|/b"], "option map_remote (--map-remote)", id="map-remote"),
        pytest.param(["--set", "server_replay_nopop=true"], "option server_replay_nopop", id="--set"),
        pytest.param(["--mode", "dns"], "--mode dns", id="dns mode"),
    ],
)
def test_unsupported_option_stops_startup_in_one_line(tmp_path: Path, args: list[str], named: str) -> None:
    proc = popen_child([str(RUN), *args, "-p", str(free_port())], tmp_path)
    try:
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("scripts/run did not stop: " + proc.communicate()[0].decode(errors="replace"))
    assert proc.returncode == 2, out
    lines = out.splitlines()
    assert len(lines) == 1, out  # refused before anything starts: no Valkey nodes, no listener
    assert lines[0].startswith("scripts/run: error: ") and named in lines[0] and "scripts/run --stock" in lines[0], out


def test_stock_flag_runs_stock_mitmdump_with_its_addons(tmp_path: Path, origin: Origin) -> None:
    # --anticache is refused by the fast launcher; stock mitmdump has the addon.
    proxy = launch(tmp_path, "--stock", "--l1-only", "-q", "--anticache", "--mode", f"reverse:{origin.url}")
    path = f"/stock?cc={CC}"
    try:
        with proxy.client() as c:
            assert statuses(c, path) == ["MISS", "HIT"]
    finally:
        out = proxy.stop()
    assert origin.count(path) == 1
    command = [line for line in out.splitlines() if line.startswith("mitmcache: ")]
    assert len(command) == 1 and "/mitmdump -s " in command[0] and "--anticache" in command[0], out


def test_fast_launcher_configures_the_cache_with_every_option(tmp_path: Path, origin: Origin) -> None:
    # The cache builds its own origin client from options left at their defaults: without it,
    # background revalidation (and stale-if-error, refetches) cannot run under the launcher.
    proxy = launch(tmp_path, "--l1-only", "--mode", f"reverse:{origin.url}")
    path = f"/fast-swr?cc={quote('max-age=1, stale-while-revalidate=60', safe='')}&etag=v1&no304=1"
    try:
        client = proxy.client()
        assert client.get(path).text == "/fast-swr #1"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # stale after max-age=1 (Date has whole seconds)
            stale = client.get(path)
            if stale.headers["x-cache-status"] == "STALE":
                break
            time.sleep(0.1)
        assert stale.headers["x-cache-status"] == "STALE" and stale.text == "/fast-swr #1"
        while origin.count(path) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert origin.count(path) == 2  # the background revalidation reached the origin
        while time.monotonic() < deadline:
            fresh = client.get(path)
            if fresh.text == "/fast-swr #2":
                break
            time.sleep(0.05)
        assert (fresh.headers["x-cache-status"], fresh.text) == ("HIT", "/fast-swr #2")
    finally:
        output = proxy.stop()
    assert "origin client not configured" not in output
