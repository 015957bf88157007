"""Benchmark: replaying 10,000 recorded exchanges, through real mitmdump processes.

1. Start-up: seconds from starting mitmdump until it answers its first request, for the cache addon with replay off
   (the baseline), and in ``cache_replay_mode=none`` with a 10,000-exchange flow file and HAR.
   Variants alternate within each round; medians and spreads (min..max) are printed.
2. Per-request overhead: three proxies side by side in reverse mode (the origin is never contacted),
   driven with keep-alive connections over distinct recorded URLs, alternating rounds:
     base:       an addon answering every request from memory (scripts/baseline_memory_addon.py)
     replay-100: the cache addon replaying a 100-exchange recording
     replay-10k: the cache addon replaying a 10,000-exchange recording
   mitmdump runs on one core at ~100 % under this load, so 1/throughput is its CPU per request;
   ``replay - base`` is what replay costs per request, and replay-10k against replay-100 shows
   a lookup does not grow with the recording (no linear scan).
3. The in-process lookup (``Cassette.lookup``) for 100 and 10,000 recorded exchanges.

    .venv/bin/python scripts/bench_replay.py [--exchanges 10000] [--rounds 5] [--seconds 3] [--conns 4]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mitmproxy import http  # noqa: E402
from mitmproxy.test import tflow, tutils  # noqa: E402

from mitmcache import replay as rp  # noqa: E402
from mitmcache.addons.replay import flow_bytes, har_bytes  # noqa: E402
from mitmcache.messages import Response  # noqa: E402
from mitmcache.valkey_nodes import free_port  # noqa: E402
from tests.conftest import ENTRY, MITMDUMP, popen_child, start_proxy, stop_process, wait_for_port  # noqa: E402

ORIGIN = ("127.0.0.1", 9)  # the discard port: replay never contacts it
BODY = b"x" * 1024


def path_of(i: int) -> str:
    return f"/item/{i}?q={i}&page=2"


def recording(n: int) -> list[http.HTTPFlow]:
    now = time.time()
    flows = []
    for i in range(n):
        f = tflow.tflow(
            req=tutils.treq(host=ORIGIN[0], port=ORIGIN[1], path=path_of(i).encode(), content=b"", headers=http.Headers()),
            resp=tutils.tresp(content=BODY, headers=http.Headers(
                [(b"Content-Type", b"text/plain"), (b"Content-Length", b"1024"), (b"Date", b"Sun, 01 Nov 2026 10:00:00 GMT")]
            )),
        )
        f.request.timestamp_start = f.request.timestamp_end = now
        f.response.timestamp_start = f.response.timestamp_end = now
        flows.append(f)
    return flows


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"median {fmt.format(statistics.median(values))} (spread {fmt.format(min(values))}..{fmt.format(max(values))})"


def first_answer(port: int, want_hit: bool) -> bool:
    """One GET for the first recorded URL; True once the proxy answered it (a replayed HIT when
    ``want_hit``: mitmproxy opens its listener while the addon still loads the recording)."""
    try:
        with socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(f"GET {path_of(0)} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(65536).lower()
    except OSError:
        return False
    return head.startswith(b"http/1.1") and (not want_hit or b"x-cache-status: hit" in head)


def startup_seconds(tmp: Path, sets: list[str]) -> float:
    port = free_port()
    args = [str(MITMDUMP), "-q", "-s", str(ENTRY), "--mode", f"reverse:http://{ORIGIN[0]}:{ORIGIN[1]}",
            "--listen-host", "127.0.0.1", "-p", str(port), "--set", f"confdir={tmp / 'conf'}"]
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    proc = popen_child(args, tmp, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout=120)
        while not first_answer(port, want_hit=bool(sets)):
            time.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        stop_process(proc)


async def _connection(port: int, paths: list[str], deadline: float) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    rng = random.Random(port)
    try:
        while time.perf_counter() < deadline:
            writer.write(f"GET {rng.choice(paths)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            if b"x-cache-status: hit" not in head.lower():
                raise RuntimeError(f"not replayed: {head!r}")
            done += 1
    finally:
        writer.close()
    return done


async def load(port: int, paths: list[str], seconds: float, conns: int) -> float:
    deadline = time.perf_counter() + seconds
    counts = await asyncio.gather(*(_connection(port, paths, deadline) for _ in range(conns)))
    return sum(counts) / seconds


def lookup_micro(n: int, lookups: int = 100_000) -> float:
    """Microseconds per Cassette.lookup with ``n`` recorded exchanges."""
    resp = Response(200, "OK", (), BODY, 0.0, 0.0)
    reqs = [rp.RecordedRequest("GET", "http", ORIGIN[0], ORIGIN[1], path_of(i), (), b"") for i in range(n)]
    cassette = rp.Cassette.of(rp.Spec(), ((r, resp) for r in reqs))
    rng = random.Random(1)
    sample = [rng.choice(reqs) for _ in range(lookups)]
    t0 = time.perf_counter()
    for r in sample:
        cassette.lookup(r)
    return (time.perf_counter() - t0) / lookups * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--conns", type=int, default=4)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mitmcache-bench-replay-"))
    flows = recording(args.exchanges)
    big_mitm, big_har, small = tmp / "big.mitm", tmp / "big.har", tmp / "small.mitm"
    big_mitm.write_bytes(flow_bytes(flows))
    big_har.write_bytes(har_bytes(flows))
    small.write_bytes(flow_bytes(flows[:100]))
    print(f"recording: {args.exchanges} exchanges, flow file {big_mitm.stat().st_size / 1e6:.1f} MB, "
          f"HAR {big_har.stat().st_size / 1e6:.1f} MB")

    print("\n1. start-up (seconds until the first request is answered: replayed, or a 502 with replay off)")
    variants = {
        "replay off": [],
        f"none, {args.exchanges} flow file": [f"cache_replay_file={big_mitm}", "cache_replay_mode=none"],
        f"none, {args.exchanges} HAR": [f"cache_replay_file={big_har}", "cache_replay_mode=none"],
    }
    startup: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            startup[name].append(startup_seconds(tmp, variants[name]))
    for name, values in startup.items():
        print(f"  {name:28s} {spread(values)} s")
    base_start = startup["replay off"]
    for name in names[1:]:
        extra = [a - b for a, b in zip(startup[name], base_start)]
        print(f"  {name}: extra start-up {spread(extra)} s per round")

    print("\n2. per-request (keep-alive, random recorded URLs)")
    target = f"reverse:http://{ORIGIN[0]}:{ORIGIN[1]}"
    proxies = {
        "base": start_proxy(tmp / "base", target, "cache_metrics_port=0", "connection_strategy=lazy", script=ROOT / "scripts" / "baseline_memory_addon.py"),
        "replay-100": start_proxy(tmp / "small", target, f"cache_replay_file={small}", "cache_replay_mode=none"),
        "replay-10k": start_proxy(tmp / "big", target, f"cache_replay_file={big_mitm}", "cache_replay_mode=none"),
    }
    paths = {"base": [path_of(i) for i in range(args.exchanges)], "replay-100": [path_of(i) for i in range(100)],
             "replay-10k": [path_of(i) for i in range(args.exchanges)]}
    rps: dict[str, list[float]] = {name: [] for name in proxies}
    try:
        for name, proxy in proxies.items():
            asyncio.run(load(proxy.port, paths[name], 1.0, args.conns))  # warm up
        names = list(proxies)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                rps[name].append(asyncio.run(load(proxies[name].port, paths[name], args.seconds, args.conns)))
    finally:
        for proxy in proxies.values():
            proxy.stop()
    for name, values in rps.items():
        print(f"  {name:12s} {spread(values, '{:.0f}')} req/s")
    ms = {name: [1000 / v for v in values] for name, values in rps.items()}
    for name in ("replay-100", "replay-10k"):
        overhead = [a - b for a, b in zip(ms[name], ms["base"])]
        ratio = [a / b for a, b in zip(rps[name], rps["base"])]
        print(f"  {name} - base: {spread(overhead)} ms per request; throughput ratio {spread(ratio)}")
    growth = [a / b for a, b in zip(ms["replay-10k"], ms["replay-100"])]
    print(f"  replay-10k / replay-100 time per request: {spread(growth)} (1.0 = independent of the recording's size)")

    print("\n3. in-process Cassette.lookup")
    for n in (100, args.exchanges):
        print(f"  {n:6d} recorded: {statistics.median(lookup_micro(n) for _ in range(3)):.2f} µs per lookup")


if __name__ == "__main__":
    main()
