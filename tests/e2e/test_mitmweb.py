"""mitmweb: the flow list shows the cache outcome, and the commands answer over its REST API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import ENTRY, free_port, wait_for_port
from tests.origin import Origin

MITMWEB = Path(sys.executable).parent / "mitmweb"
PASSWORD = "s3cret"
# mitmweb wants a password and tornado's double-submit XSRF token (same value in both places).
AUTH = {"Authorization": f"Bearer {PASSWORD}", "X-XSRFToken": "t", "Cookie": "_mitmproxy_xsrf=t"}


def test_mitmweb_shows_outcomes_and_runs_commands(tmp_path: Path, origin: Origin) -> None:
    port, web_port = free_port(), free_port()
    proc = subprocess.Popen(
        [str(MITMWEB), "-s", str(ENTRY), "--mode", f"reverse:{origin.url}", "--listen-host", "127.0.0.1",
         "-p", str(port), "--web-port", str(web_port), "--no-web-open-browser",
         "--set", f"web_password={PASSWORD}", "--set", f"confdir={tmp_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc)
        wait_for_port(web_port, proc)
        path = "/web?cc=max-age%3D60"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get(path).headers["x-cache-status"] == "MISS"
            assert c.get(path).headers["x-cache-status"] == "HIT"
        web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers=AUTH, timeout=10)
        flows = web.get("/flows").json()
        comments = [f["comment"] for f in flows]
        assert comments[0].startswith("cache MISS") and comments[1].startswith("cache HIT")
        stats = json.loads(web.post("/commands/cache.stats", json={"arguments": []}).json()["value"])
        assert stats["l1_entries"] == 1 and stats["requests"]["hit"] == 1
        purged = web.post("/commands/cache.purge", json={"arguments": [origin.url + path]}).json()
        assert purged["value"] == 1
        assert web.post("/commands/cache.clear", json={"arguments": []}).json()["value"] == 0
        web.close()
    finally:
        proc.terminate()
        proc.wait(10)
