"""Start-up through real processes: option validation, human sizes, the ready line, Valkey nodes
that do not answer, zero metric samples, and scripts/run honouring the user's own
``--set cache_valkey_urls``. Every test reads mitmdump's real output."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import valkey

from mitmcache.valkey_nodes import free_port
from tests.conftest import ENTRY, MITMDUMP, ROOT, popen_child, running_nodes, wait_for_port
from tests.origin import Origin

CC = quote("max-age=300", safe="")
EXIT_TIMEOUT = 20.0  # a start-up failure must end the process well within this
LISTENING = "listening at"  # mitmproxy's "reverse proxy to … listening at 127.0.0.1:PORT."


def mitmdump_args(tmp: Path, origin: Origin, port: int, *sets: str) -> list[str]:
    confdir = tmp / "mitmproxy-conf"
    confdir.mkdir(parents=True, exist_ok=True)
    args = [
        str(MITMDUMP), "-s", str(ENTRY),
        "--listen-host", "127.0.0.1", "-p", str(port),
        "--set", "connection_strategy=lazy",
        "--mode", f"reverse:{origin.url}",
        "--set", f"confdir={confdir}",
    ]
    for s in sets:
        args += ["--set", s]
    return args


def run_to_exit(tmp: Path, origin: Origin, *sets: str) -> tuple[int, str]:
    """Start mitmdump expecting it to stop by itself; (exit code, stdout+stderr)."""
    proc = popen_child(mitmdump_args(tmp, origin, free_port(), *sets), tmp)
    try:
        out, _ = proc.communicate(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"mitmdump still running after {EXIT_TIMEOUT:.0f} s; output:\n{out.decode(errors='replace')}")
    return proc.returncode, out.decode(errors="replace")


class Running:
    """A process whose output is collected line by line while it runs."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pred: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if pred(line):
                    return line
            if self.proc.poll() is not None:
                self._reader.join(2)
                break
            time.sleep(0.05)
        for line in list(self.lines):
            if pred(line):
                return line
        pytest.fail(f"no line {what} within {timeout:.0f} s; output:\n{self.output}")

    def stop(self) -> str:
        """Stop the process by its PID (and, for scripts/run, the mitmdump it started)."""
        children = _children(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in children:  # normally already gone: the launcher waits for its mitmdump
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reader.join(5)
        assert "Addon error" not in self.output, self.output[-5000:]
        return self.output


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def start_running(tmp: Path, origin: Origin, *sets: str) -> tuple[Running, int]:
    port = free_port()
    run = Running(popen_child(mitmdump_args(tmp, origin, port, *sets), tmp))
    try:
        wait_for_port(port, run.proc)
    except Exception:
        run.stop()
        raise
    return run, port


def cache_status(client: httpx.Client, path: str) -> str:
    r = client.get(path)
    assert r.status_code == 200, (path, r.status_code, r.text[:200])
    return r.headers.get("x-cache-status", "<no X-Cache-Status>")


# ---------------------------------------------------------------- (a) invalid values stop start-up


@pytest.mark.parametrize("option", ["cache_l1_max_bytes", "cache_lease_ms"])
def test_non_numeric_value_stops_startup_with_one_clear_line(tmp_path: Path, origin: Origin, option: str) -> None:
    rc, out = run_to_exit(tmp_path, origin, f"{option}=abc")
    assert rc != 0, out
    assert any(option in line and "abc" in line for line in out.splitlines()), out
    assert "Traceback" not in out, out
    assert LISTENING not in out, out


# ---------------------------------------------------------------- (b) human sizes and the ready line


def test_human_sizes_are_accepted_and_the_ready_line_says_so(tmp_path: Path, origin: Origin) -> None:
    metrics_port = free_port()
    run, port = start_running(
        tmp_path, origin,
        "cache_l1_max_bytes=256m", "cache_max_object_bytes=1m",
        f"cache_metrics_port={metrics_port}", "termlog_verbosity=info",
    )
    try:
        ready = run.wait_for_line(lambda s: "ready" in s and "mitmcache" in s, 10, "with 'mitmcache' and 'ready'")
        assert "256 MiB" in ready, ready
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            small = f"/human-sizes-small?cc={CC}&size=900000"  # under 1m however it is counted
            assert [cache_status(c, small) for _ in range(2)] == ["MISS", "HIT"]
            big = f"/human-sizes-big?cc={CC}&size=1100000"  # over 1m however it is counted
            r = c.get(big)
            assert r.headers.get("x-cache-status") == "MISS" and "too-large" in r.headers.get("cache-status", "")
            assert cache_status(c, big) == "MISS"
        assert origin.count(small) == 1 and origin.count(big) == 2
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'mitmcache_requests_total{result="hit"} 1.0' in text, text
    finally:
        run.stop()


# ---------------------------------------------------------------- (c) a busy metrics port


def test_busy_metrics_port_stops_startup_with_one_clear_line(tmp_path: Path, origin: Origin) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out = run_to_exit(tmp_path, origin, f"cache_metrics_port={port}")
    assert rc != 0, out
    lines = [line for line in out.splitlines() if "cache_metrics_port" in line and str(port) in line]
    assert len(lines) == 1, out
    assert "Traceback" not in out, out
    assert LISTENING not in out, out


# ---------------------------------------------------------------- (d) dead Valkey nodes at start-up


def test_dead_valkey_node_is_reported_at_startup(tmp_path: Path, origin: Origin) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with running_nodes(1) as (live,):
        live_addr = f"127.0.0.1:{live.port}"
        run, port = start_running(
            tmp_path, origin, f"cache_valkey_urls=valkey://{dead},{live.url}", "termlog_verbosity=info",
        )
        try:
            # Before any request: a line naming the dead node (and not the live one: not the
            # list of all nodes), and a ready line counting the nodes that answered.
            warning = run.wait_for_line(lambda s: dead in s and live_addr not in s, 5, f"naming only {dead}")
            assert "mitmcache" in warning, warning
            ready = run.wait_for_line(lambda s: "mitmcache" in s and "ready" in s, 5, "with 'mitmcache' and 'ready'")
            assert "1/2" in ready, ready
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                path = f"/dead-node-at-start?cc={CC}"
                assert [cache_status(c, path) for _ in range(2)] == ["MISS", "HIT"]
            assert origin.count(path) == 1
        finally:
            run.stop()


# ---------------------------------------------------------------- (e) zero samples before any request


def test_documented_counters_export_zero_before_the_first_request(tmp_path: Path, origin: Origin) -> None:
    metrics_port = free_port()
    run, _ = start_running(tmp_path, origin, f"cache_metrics_port={metrics_port}")
    try:
        wait_for_port(metrics_port, run.proc)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        for sample in (
            'mitmcache_requests_total{result="revalidated"} 0.0',
            'mitmcache_not_stored_total{reason="private"} 0.0',
            'mitmcache_revalidations_total{outcome="304"} 0.0',
        ):
            assert sample in text.splitlines(), (sample, text)
    finally:
        run.stop()


# ---------------------------------------------------------------- (g) scripts/run with the user's Valkey


def test_scripts_run_honours_the_users_cache_valkey_urls(tmp_path: Path, origin: Origin) -> None:
    with running_nodes(1) as (node,):
        port = free_port()
        confdir = tmp_path / "mitmproxy-conf"
        args = [
            str(ROOT / "scripts" / "run"),
            "--set", f"cache_valkey_urls={node.url}",
            "--mode", f"reverse:{origin.url}", "-p", str(port),
            "--set", f"confdir={confdir}",
        ]
        run = Running(popen_child(args, tmp_path))
        try:
            wait_for_port(port, run.proc, timeout=60)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                path = f"/scripts-run-own-valkey?cc={CC}"
                assert [cache_status(c, path) for _ in range(2)] == ["MISS", "HIT"]
            assert origin.count(path) == 1
            assert valkey.Valkey(port=node.port).dbsize() > 0  # the entry landed in the user's node
        finally:
            out = run.stop()
        assert not re.search(r"started \d+ local Valkey nodes", out), out
        command = [line for line in out.splitlines() if line.startswith("mitmcache: ") and "mitmdump" in line]
        assert len(command) == 1 and command[0].count("cache_valkey_urls=") == 1, out
        assert "Received multiple values" not in out, out
