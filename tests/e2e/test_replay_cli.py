"""``scripts/replay``: any test command through a recording/replaying forward proxy, HTTPS to a
local TLS origin, with Python urllib, curl and Node clients; exit codes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.origin import Origin, start_origin

ROOT = Path(__file__).resolve().parents[2]
REPLAY = ROOT / "scripts" / "replay"
NODE_CLIENT = ROOT / "tests" / "fixtures" / "node_client.js"
URLLIB_CLIENT = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=10) as r:\n"
    "    print(r.status, r.read().decode())\n"
)
NODE = shutil.which("node")


def replay(cassette: Path, mode: str, command: list[str], *sets: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    args = [str(REPLAY), "--cassette", str(cassette), "--mode", mode]
    for s in sets:
        args += ["--set", s]
    return subprocess.run([*args, "--", *command], capture_output=True, text=True, timeout=120, env=env)


@dataclass
class Clients:
    origin: Origin
    cassette: Path
    command: list[str]
    recorded: subprocess.CompletedProcess[str]

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.origin.port}{path}"


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clients]:
    """Record the clients' requests over HTTPS (mode all), then stop the origin."""
    tmp = tmp_path_factory.mktemp("replay-cli")
    origin = start_origin(tls=True)
    base = f"https://127.0.0.1:{origin.port}"
    script = " && ".join([
        f"{sys.executable} -c '{URLLIB_CLIENT}' {base}/py",
        f"curl -sS -w '\\n' {base}/curl",
        f"curl -sS -w '\\n' -d 'b=2&a=1' {base}/form",
        *([f"{NODE} {NODE_CLIENT} {base}/node"] if NODE else []),
    ])
    command = ["sh", "-c", script]
    cassette = tmp / "ci.har"
    recorded = replay(cassette, "all", command, f"ssl_verify_upstream_trusted_ca={origin.cert_file}")
    origin.stop()
    yield Clients(origin, cassette, command, recorded)


def test_clients_record_over_https_then_replay_with_the_origin_stopped(clients: Clients) -> None:
    assert clients.recorded.returncode == 0, clients.recorded.stderr
    expected = ["200 /py #1", "/curl #1", "/form #1"] + (["200 /node #1"] if NODE else [])
    assert clients.recorded.stdout.split("\n")[:len(expected)] == expected
    assert clients.origin.counts == {"/py": 1, "/curl": 1, "/form": 1, **({"/node": 1} if NODE else {})}

    replayed = replay(clients.cassette, "none", clients.command)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == clients.recorded.stdout
    assert f"matched: {len(expected)}, newly recorded: 0" in replayed.stderr
    assert "unmatched: 0" in replayed.stderr


@pytest.mark.parametrize("script, status, report", [
    pytest.param("curl -sS {base}/unrecorded", 3, "GET {base}/unrecorded", id="passed but unmatched: 3"),
    pytest.param("curl -sSf {base}/unrecorded", 22, "GET {base}/unrecorded", id="failed and unmatched: the command's status"),
    pytest.param("curl -sS {base}/curl && exit 7", 7, "unmatched: 0", id="the command's own status"),
])
def test_exit_status(clients: Clients, script: str, status: int, report: str) -> None:
    base = f"https://127.0.0.1:{clients.origin.port}"
    result = replay(clients.cassette, "once", ["sh", "-c", script.format(base=base)])
    assert result.returncode == status, result.stderr
    assert report.format(base=base) in result.stderr
    if status != 7:
        assert "0 matched, 1 unmatched" in result.stderr  # the proxy's exit summary line


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert replay(tmp_path / "x.har", "none", []).returncode == 2  # no command
    ran = tmp_path / "command-ran"
    missing = replay(tmp_path / "missing.har", "none", ["touch", str(ran)])
    assert missing.returncode == 2
    assert "cache_replay_file" in missing.stderr and "does not exist" in missing.stderr
    garbage = tmp_path / "garbage.flows"
    garbage.write_bytes(b"\x00not a flow file\xff" * 10)
    unreadable = replay(garbage, "none", ["touch", str(ran)])
    assert unreadable.returncode == 2 and "cannot read" in unreadable.stderr
    assert not ran.exists()  # the command never runs against a proxy that could not start
