"""Benchmark: an L2 (Valkey) hit against an L1 hit, through real mitmdump processes.

Starts a local origin, a 3-node Valkey ring and three proxies side by side:
  base: a trivial addon answering every request from memory (mitmproxy's own cost: the ceiling)
  l1:   the cache, L1 only (every request a hit from process memory)
  l2:   the cache with cache_l1_ttl=0, so every hit is read from Valkey and decoded
then drives the same hot URL through each with keep-alive connections, alternating rounds,
and prints throughput, latency and the ratios l1/base and l2/l1. A benchmark, not a test.

With ``--before DIR`` (a checkout of another commit, e.g. ``git worktree add /tmp/before HEAD~1``)
a fourth proxy runs that checkout's addon in L1 mode, side by side, and the ratio l1/l1-before
(median and spread of the per-round ratios) says what the change did to the hit path.

    .venv/bin/python scripts/bench_l2_vs_l1.py [--seconds 5] [--rounds 3] [--conns 8] [--size 1024] [--before DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mitmcache.valkey_nodes import start_nodes  # noqa: E402
from tests.conftest import start_proxy  # noqa: E402
from tests.origin import start_origin  # noqa: E402


async def _one_connection(port: int, path: str, deadline: float, latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    done = 0
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if b"x-cache-status: hit" not in head.lower():
                raise RuntimeError(f"not a hit: {head!r}")
            latencies.append(time.perf_counter() - t0)
            done += 1
    finally:
        writer.close()
    return done


async def load(port: int, path: str, seconds: float, conns: int) -> tuple[float, float, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    counts = await asyncio.gather(*(_one_connection(port, path, deadline, latencies) for _ in range(conns)))
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    return sum(counts) / seconds, p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024, help="response body bytes")
    parser.add_argument("--before", type=Path, help="a checkout whose addon runs as 'l1-before' (L1 only)")
    parser.add_argument(
        "--rules", type=int, default=0,
        help="also run 'l1-rules': the L1 proxy with this many cache_policy rules (the last one matches)",
    )
    args = parser.parse_args()
    if args.before is not None and not (args.before / "addon" / "mitmcache_addon.py").is_file():
        parser.error(f"--before: no addon/mitmcache_addon.py in {args.before}")

    origin = start_origin()
    nodes = start_nodes(3)
    tmp = Path(tempfile.mkdtemp(prefix="mitmcache-bench-"))
    urls = ",".join(n.url for n in nodes)
    proxies = {
        "base": start_proxy(tmp / "base", f"reverse:{origin.url}", "cache_metrics_port=0",
                            script=ROOT / "scripts" / "baseline_memory_addon.py"),
        "l1": start_proxy(tmp / "l1", f"reverse:{origin.url}"),
        "l2": start_proxy(tmp / "l2", f"reverse:{origin.url}", f"cache_valkey_urls={urls}", "cache_l1_ttl=0"),
    }
    if args.rules:
        rules = [f"cache_policy=|~d host{i}.example & ~u /api/v{i}/|ttl=5m swr=30s" for i in range(args.rules - 1)]
        rules.append("cache_policy=|~u /bench|ttl=1h name=bench")
        proxies["l1-rules"] = start_proxy(tmp / "rules", f"reverse:{origin.url}", *rules)
    if args.before is not None:
        proxies["l1-before"] = start_proxy(
            tmp / "before", f"reverse:{origin.url}", script=args.before / "addon" / "mitmcache_addon.py"
        )
    path = f"/bench?cc=max-age%3D3600&size={args.size}"
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in proxies}
    try:
        for proxy in proxies.values():
            proxy.client().get(path)  # fill
            asyncio.run(load(proxy.port, path, 1.0, args.conns))  # warm up
        names = list(proxies)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
                proxy = proxies[name]
                rps, p50, p99 = asyncio.run(load(proxy.port, path, args.seconds, args.conns))
                results[name].append((rps, p50, p99))
                print(f"round {r + 1} {name}: {rps:8.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms")
        m = proxies["l2"].metrics()
        print(f"l2 proxy: l2 hits {m['mitmcache_l2_hits_total']:.0f}, l1 hits {m['mitmcache_l1_hits_total']:.0f}")
    finally:
        for proxy in proxies.values():
            proxy.stop()
        for n in nodes:
            n.stop()
        origin.stop()
    med = {name: statistics.median(x[0] for x in rs) for name, rs in results.items()}
    p50 = {name: statistics.median(x[1] for x in rs) for name, rs in results.items()}
    print(f"\nmedian throughput: base {med['base']:.0f}, l1 {med['l1']:.0f}, l2 {med['l2']:.0f} req/s")
    print(f"ratio l1/base throughput: {med['l1'] / med['base']:.3f}  (what the cache's hit path costs)")
    print(f"ratio l2/l1 throughput:   {med['l2'] / med['l1']:.3f}")
    print(f"ratio l2/l1 p50 latency:  {p50['l2'] / p50['l1']:.3f}")
    if "l1-rules" in results:
        per_round = sorted(a[0] / b[0] for a, b in zip(results["l1-rules"], results["l1"]))
        print(
            f"ratio l1-rules/l1 throughput ({args.rules} rules): median {statistics.median(per_round):.3f} "
            f"(rounds {per_round[0]:.3f}..{per_round[-1]:.3f})"
        )
    if "l1-before" in results:
        per_round = sorted(a[0] / b[0] for a, b in zip(results["l1"], results["l1-before"]))
        print(
            f"ratio l1/l1-before throughput: median {statistics.median(per_round):.3f} "
            f"(rounds {per_round[0]:.3f}..{per_round[-1]:.3f}); medians {med['l1']:.0f} vs {med['l1-before']:.0f} req/s"
        )


if __name__ == "__main__":
    main()
