"""``scripts/replay --cassette FILE [--mode MODE] [--set NAME=VALUE …] [--] CMD…``: run any test
command against a recording.

Starts ``mitmdump`` as a forward proxy with the cache addon on a free 127.0.0.1 port (L1 only,
no Valkey: every request is either replayed or recorded, so the RFC cache never answers), with a
private confdir so its CA is fresh and known; writes a CA bundle (the system's CAs plus
mitmproxy's) and runs CMD with the variables common clients read. Then it stops the proxy (by
PID, SIGTERM: the recording is flushed), prints the report and exits with CMD's status, or 3 when
CMD passed but a request went unmatched in a replay-only mode. 2: bad arguments, or the proxy
did not start (its log is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .valkey_nodes import die_with_parent, free_port

ROOT = Path(__file__).resolve().parents[2]
MODES = ("none", "once", "new_episodes", "all")
UNMATCHED_EXIT = 3
SETUP_EXIT = 2
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/replay",
        description="Run CMD through a recording/replaying proxy (see README, Record and replay).",
    )
    parser.add_argument("--cassette", required=True, help="the recording (.har = HAR 1.2, else a mitmproxy flow file)")
    parser.add_argument("--mode", default="once", choices=MODES, help="VCR record mode (default: once)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                        help="another mitmdump option, e.g. cache_replay_ignore_params=ts (repeatable)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the test command")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("a command to run is required (after --)")
    return args


def system_ca_file() -> str | None:
    """The system's CA bundle (OpenSSL's default file), else certifi's."""
    cafile = ssl.get_default_verify_paths().cafile
    if cafile and os.path.isfile(cafile):
        return cafile
    try:
        import certifi

        return certifi.where()
    except ImportError:
        return None


def write_bundle(target: Path, mitmproxy_ca: Path) -> None:
    parts = []
    system = system_ca_file()
    if system:
        parts.append(Path(system).read_bytes().rstrip(b"\n") + b"\n")
    parts.append(mitmproxy_ca.read_bytes())
    target.write_bytes(b"".join(parts))


def wait_until_listening(port: int, proc: subprocess.Popen[bytes], ca: Path, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2) as s:
                # A connect to a free ephemeral port can reach itself (TCP simultaneous open).
                if s.getsockname() != s.getpeername() and ca.exists():
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (mitmdump shuts down and flushes the recording), SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def print_report(report: dict[str, object]) -> None:
    out = sys.stderr
    print(f"mitmcache replay report ({report['effective_mode']}, {report['file']}):", file=out)
    print(f"  matched: {report['matched']}, newly recorded: {report['recorded']}", file=out)
    unmatched = report["unmatched"]
    assert isinstance(unmatched, list)
    unused = report["recorded_but_unused"]
    assert isinstance(unused, list)
    print(f"  unmatched: {sum(u['count'] for u in unmatched)}", file=out)
    for u in unmatched:
        print(f"    {u['request']}" + (f" (x{u['count']})" if u["count"] > 1 else ""), file=out)
    print(f"  recorded but unused: {len(unused)}", file=out)
    for desc in unused[:20]:
        print(f"    {desc}", file=out)
    if len(unused) > 20:
        print(f"    … and {len(unused) - 20} more", file=out)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a cancelled CI job: stop CMD, then the proxy (the recording is flushed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupted)
    work = Path(tempfile.mkdtemp(prefix="mitmcache-replay-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    confdir, report_file, log_file = work / "confdir", work / "report.json", work / "mitmdump.log"
    confdir.mkdir()
    port = free_port()
    # The fast launcher (scripts/run's default), L1 only (a hermetic run needs no Valkey): it
    # configures the cache before opening the listener, so a cassette it cannot use stops it
    # before the port opens (a -s script under stock mitmdump is loaded after the listeners).
    cmd = [
        sys.executable, "-O", "-m", "mitmcache.launch", "--l1-only",  # as scripts/run starts it
        "--mode", "regular", "--listen-host", "127.0.0.1", "-p", str(port),
        "--set", f"confdir={confdir}", "--set", "termlog_verbosity=warn", "--set", "flow_detail=0",
        "--set", "connection_strategy=lazy",  # never connect upstream before a request is known
        "--set", f"cache_replay_file={os.path.abspath(args.cassette)}",
        "--set", f"cache_replay_mode={args.mode}",
        "--set", f"cache_replay_report_file={report_file}",
    ]
    for item in args.sets:
        cmd += ["--set", item]
    with log_file.open("wb") as log:
        # The proxy dies with this process even if it is SIGKILLed (no orphan holding the port).
        proxy = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    try:
        ca = confdir / "mitmproxy-ca-cert.pem"
        if not wait_until_listening(port, proxy, ca):
            stop(proxy)
            sys.stderr.write(f"scripts/replay: the proxy did not start:\n{log_file.read_text(errors='replace')}")
            return SETUP_EXIT
        bundle = work / "ca-bundle.pem"
        write_bundle(bundle, ca)
        env = dict(os.environ)
        env.update({name: f"http://127.0.0.1:{port}" for name in PROXY_VARIABLES})
        env.update({name: str(bundle) for name in CA_VARIABLES})
        try:
            status = subprocess.call(args.command, env=env)
        except FileNotFoundError:
            sys.stderr.write(f"scripts/replay: command not found: {args.command[0]}\n")
            status = 127
        except KeyboardInterrupt:
            status = 130
    finally:
        stop(proxy)
    output = log_file.read_text(errors="replace")
    if output.strip():
        sys.stderr.write(output if output.endswith("\n") else output + "\n")
    try:
        report = json.loads(report_file.read_text())
    except (OSError, ValueError):
        sys.stderr.write("scripts/replay: the proxy wrote no report\n")
        return status or SETUP_EXIT
    print_report(report)
    if status == 0 and report["replay_only"] and report["unmatched"]:
        return UNMATCHED_EXIT
    return status


if __name__ == "__main__":
    sys.exit(main())
