"""Fixtures that start real processes: a local origin, real mitmdump proxies with the addon."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from mitmcache.valkey_nodes import ValkeyNode, die_with_parent, free_port, start_nodes
from tests.origin import Origin, start_origin

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ROOT / "addon" / "mitmcache_addon.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode}:\n{out}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a child we started (by its PID), kill it if it does not exit within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Proxy:
    """A running ``mitmdump -s addon/mitmcache_addon.py``."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    confdir: Path
    clients: list[httpx.Client] = field(default_factory=list)
    output: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: object) -> httpx.Client:
        c = httpx.Client(base_url=self.url, timeout=10, **kwargs)  # type: ignore[arg-type]
        self.clients.append(c)
        return c

    def metrics(self) -> dict[str, float]:
        """Scrape the Prometheus endpoint into {'name{labels}': value}."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> str:
        """Stop mitmdump and return its output; an addon exception in it fails the test."""
        for c in self.clients:
            c.close()
        stop_process(self.proc)
        if self.output is None:
            self.output = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
            assert "Addon error" not in self.output, self.output[-5000:]
        return self.output


def start_proxy(tmp: Path, mode: str, *sets: str, script: Path = ENTRY) -> Proxy:
    """Start mitmdump with the addon; ``sets`` are ``name=value`` options (they win)."""
    port, metrics_port = free_port(), free_port()
    confdir = tmp / "mitmproxy-conf"
    confdir.mkdir(parents=True, exist_ok=True)
    options = {
        "confdir": str(confdir),
        "cache_metrics_port": str(metrics_port),
        "termlog_verbosity": "warn",
    }
    for s in sets:
        name, _, value = s.partition("=")
        options[name] = value
    metrics_port = int(options["cache_metrics_port"])
    args = [
        str(MITMDUMP), "-q",
        "-s", str(script),
        "--mode", mode,
        "--listen-host", "127.0.0.1", "-p", str(port),
    ]
    for name, value in options.items():
        args += ["--set", f"{name}={value}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent)
    proxy = Proxy(proc, port, metrics_port, confdir)
    try:
        wait_for_port(port, proc)
        if metrics_port:
            wait_for_port(metrics_port, proc)
    except Exception:
        proxy.stop()
        raise
    return proxy


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    o = start_origin()
    yield o
    o.stop()


@pytest.fixture(scope="module")
def proxy(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One reverse proxy in front of the module's origin; tests use distinct paths."""
    p = start_proxy(tmp_path_factory.mktemp("proxy"), f"reverse:{origin.url}")
    yield p
    p.stop()


@pytest.fixture
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    c = proxy.client()
    yield c
    c.close()


@contextlib.contextmanager
def running_nodes(count: int = 3) -> Iterator[list[ValkeyNode]]:
    """Real valkey-server processes on ephemeral ports, killed afterwards."""
    nodes = start_nodes(count)
    try:
        yield nodes
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture
def ring_nodes() -> Iterator[list[ValkeyNode]]:
    """A three-node ring for one test."""
    with running_nodes(3) as nodes:
        yield nodes


@pytest.fixture
def fresh_origin() -> Iterator[Origin]:
    o = start_origin()
    yield o
    try:
        o.stop()
    except Exception:
        pass
