"""``scripts/run``: start mitmdump with the cache addon (and, later, its Valkey ring).

Everything after the launcher's own flags goes to mitmdump unchanged, e.g.
``scripts/run --mode reverse:http://127.0.0.1:8000 -p 8080``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "addon" / "mitmcache_addon.py"


def mitmdump_command(passthrough: list[str], sets: dict[str, str]) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "mitmdump"), "-s", str(ENTRY)]
    if "--listen-host" not in passthrough:
        cmd += ["--listen-host", "127.0.0.1"]
    for name, value in sets.items():
        cmd += ["--set", f"{name}={value}"]
    return cmd + passthrough


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/run",
        description="Run mitmdump as a caching proxy. Unknown arguments are passed to mitmdump.",
    )
    args, passthrough = parser.parse_known_args(argv)
    sets = {"connection_strategy": "lazy"}
    cmd = mitmdump_command(passthrough, sets)
    print("mitmcache: " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd)

    def forward(signum: int, _frame: object) -> None:
        # Stop mitmdump the same way we were asked to stop, then clean up after it.
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
