"""Fixtures that start real processes: a local origin, real mitmdump proxies with the addon."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
            with socket.create_connection(("127.0.0.1", port), 0.2) as s:
                # A connect to a free port in the ephemeral range can reach itself (TCP
                # simultaneous open): that is nobody listening, and it holds the port.
                if s.getsockname() != s.getpeername():
                    return
        except OSError:
            pass
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
        c = httpx.Client(base_url=self.url, **{"timeout": 10, **kwargs})  # type: ignore[arg-type]
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


def popen_child(args: list[str], cwd: Path, stdout: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """A child process (stdout+stderr together) that dies with the test run."""
    return subprocess.Popen(args, stdout=stdout, stderr=subprocess.STDOUT, cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent)


# Sequence options: every ``--set name=value`` adds one item instead of replacing the last.
SEQUENCE_OPTIONS = frozenset({"cache_policy"})


def start_proxy(tmp: Path, mode: str, *sets: str, script: Path = ENTRY) -> Proxy:
    """Start mitmdump with the addon; ``sets`` are ``name=value`` options (they win; a
    sequence option such as ``cache_policy`` may be given several times)."""
    port, metrics_port = free_port(), free_port()
    while metrics_port == port:  # two binds to port 0 may hand out the same port
        metrics_port = free_port()
    confdir = tmp / "mitmproxy-conf"
    confdir.mkdir(parents=True, exist_ok=True)
    options = {
        "confdir": str(confdir),
        "cache_metrics_port": str(metrics_port),
        "termlog_verbosity": "warn",
    }
    items: list[str] = []
    for s in sets:
        name, _, value = s.partition("=")
        if name in SEQUENCE_OPTIONS:
            items.append(s)
        else:
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
    for item in items:
        args += ["--set", item]
    proc = popen_child(args, tmp)
    proxy = Proxy(proc, port, metrics_port, confdir)
    try:
        wait_for_port(port, proc)
        if metrics_port:
            wait_for_port(metrics_port, proc)
    except Exception:
        proxy.stop()
        raise
    return proxy


MITMWEB = Path(sys.executable).parent / "mitmweb"
WEB_PASSWORD = "s3cret"
# mitmweb wants a password and tornado's double-submit XSRF token (same value in both places).
WEB_AUTH = {"Authorization": f"Bearer {WEB_PASSWORD}", "X-XSRFToken": "t", "Cookie": "_mitmproxy_xsrf=t"}


@dataclass
class Web:
    """A running ``mitmweb -s addon/mitmcache_addon.py --mode reverse:<origin>``."""

    proc: subprocess.Popen[bytes]
    port: int  # the proxy's listener
    web_port: int
    log: Path
    api: httpx.Client = field(init=False)  # mitmweb's REST API
    client: httpx.Client = field(init=False)  # a client of the proxy

    def __post_init__(self) -> None:
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.web_port}", headers=WEB_AUTH, timeout=10)
        self.client = httpx.Client(base_url=self.proxy_url, timeout=10)

    @property
    def proxy_url(self) -> str:
        """The URL a client of the reverse proxy uses (not the origin's)."""
        return f"http://127.0.0.1:{self.port}"

    def new_client(self, **kwargs: Any) -> httpx.Client:
        """Another client of the proxy (e.g. with its own default headers); close it."""
        return httpx.Client(base_url=self.proxy_url, timeout=10, **kwargs)

    def call(self, name: str, *args: str) -> dict[str, Any]:
        """``POST /commands/<name>``: ``{"value": …}`` or ``{"error": …}`` (both with status 200)."""
        r = self.api.post(f"/commands/{name}", json={"arguments": list(args)})
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def command(self, name: str, *args: str) -> Any:
        body = self.call(name, *args)
        assert "error" not in body, body
        return body["value"]

    def command_json(self, name: str, *args: str) -> Any:
        """A command that answers with a JSON string (cache.explain, cache.inspect, cache.stats)."""
        return json.loads(self.command(name, *args))

    def flows(self, path_prefix: str) -> list[dict[str, Any]]:
        """The flow list (``GET /flows``), only flows whose path starts with ``path_prefix``."""
        return [f for f in self.api.get("/flows").json() if f["request"]["path"].startswith(path_prefix)]

    def set_options(self, **options: object) -> None:
        self.api.put("/options", json=options).raise_for_status()

    def stop(self) -> str:
        self.client.close()
        self.api.close()
        stop_process(self.proc)
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_mitmweb(tmp: Path, origin: Origin, *sets: str) -> Iterator[Web]:
    """mitmweb with the addon in front of ``origin``; fails if it logged an addon error."""
    port, web_port = free_port(), free_port()
    while web_port == port:
        web_port = free_port()
    log = tmp / "mitmweb.log"
    args = [str(MITMWEB), "-s", str(ENTRY), "--mode", f"reverse:{origin.url}", "--listen-host", "127.0.0.1",
            "-p", str(port), "--web-port", str(web_port), "--no-web-open-browser",
            "--set", f"web_password={WEB_PASSWORD}", "--set", f"confdir={tmp}", "--set", "termlog_verbosity=warn"]
    for s in sets:
        args += ["--set", s]
    with log.open("wb") as out:  # a file, not a pipe: nobody reads a pipe while tests run
        proc = popen_child(args, tmp, stdout=out)
    w = Web(proc, port, web_port, log)
    try:
        wait_for_port(port, proc)
        wait_for_port(web_port, proc)
    except Exception:
        print(w.stop())
        raise
    yield w
    output = w.stop()
    assert "Addon error" not in output, output[-5000:]


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
