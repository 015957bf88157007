"""Benchmark: how fast a purge on one proxy reaches another proxy's L1, and what coherence costs
the hit path. Real mitmdump processes on a 3-node Valkey ring and a local origin.

Part 1 (propagation): proxies A and B, B under a steady keep-alive load on one hot URL that it
serves from L1. Each round purges the URL with an HTTP PURGE on A and measures the time from
A's answer to the start of B's first request that reflects the purge (a MISS or a new body);
responses to B requests started after A's answer that still carry the purged body are counted
as stale serves. Prints p50/p99/max over the rounds.

Part 2 (cost): four proxies side by side, alternating rounds (the order rotated each round):
L1 hits and L2 hits (``cache_l1_ttl=0``), each with ``cache_l1_invalidation`` on and off;
prints the median req/s and the median and range of the per-round on/off ratios.

    .venv/bin/python scripts/bench_coherence.py [--purges 100] [--load-conns 4] [--rounds 6] [--seconds 3]
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
sys.path.insert(0, str(ROOT / "scripts"))

import httpx  # noqa: E402

from bench import python_rps  # noqa: E402
from mitmcache.valkey_nodes import start_nodes  # noqa: E402
from tests.conftest import Proxy, start_proxy  # noqa: E402
from tests.origin import start_origin  # noqa: E402

CC = "cc=max-age%3D3600"


async def _reader(port: int, path: str, stop: asyncio.Event, seen: list[tuple[float, bytes, bytes]]) -> None:
    """One keep-alive connection: (request start, X-Cache-Status, body) for every response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length, status = 0, b""
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                elif name.lower() == b"x-cache-status":
                    status = value.strip()
            body = await reader.readexactly(length)
            seen.append((t0, status, body))
    finally:
        writer.close()


async def propagation(a: Proxy, b: Proxy, purges: int, conns: int) -> tuple[list[float], int, int]:
    path = f"/hot?{CC}"
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as ca, httpx.AsyncClient(base_url=b.url, timeout=10) as cb:
        await ca.get(path)
        for _ in range(3):
            await cb.get(path)
        seen: list[tuple[float, bytes, bytes]] = []
        stop = asyncio.Event()
        readers = [asyncio.create_task(_reader(b.port, path, stop, seen)) for _ in range(conns)]
        delays: list[float] = []
        stale = total = 0
        try:
            for _ in range(purges):
                await asyncio.sleep(0.15)  # B back on L1 hits of the refilled entry
                old = seen[-1][2]
                mark = len(seen)
                r = await ca.request("PURGE", path)
                answered = time.perf_counter()
                assert r.status_code == 200, r.text
                while True:
                    await asyncio.sleep(0.002)
                    # In start order: a request in flight at A's answer may already reflect it.
                    recent = sorted(seen[mark:])
                    hit = next((s for s in recent if s[1] != b"HIT" or s[2] != old), None)
                    if hit is not None:
                        break
                    if time.perf_counter() - answered > 5:
                        raise RuntimeError("B never reflected the purge")
                after = [s for s in recent if s[0] >= answered]
                stale += sum(1 for s in after if s[0] < hit[0] and s[2] == old)
                total += len(after)
                delays.append(max(0.0, hit[0] - answered))
        finally:
            stop.set()
            await asyncio.gather(*readers, return_exceptions=True)
    return delays, stale, total


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--purges", type=int, default=100)
    parser.add_argument("--load-conns", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--conns", type=int, default=8)
    args = parser.parse_args()

    origin = start_origin()
    nodes = start_nodes(3)
    urls = ",".join(n.url for n in nodes)
    tmp = Path(tempfile.mkdtemp(prefix="bench-coherence-"))
    started: list[Proxy] = []

    def proxy(name: str, *sets: str) -> Proxy:
        p = start_proxy(tmp / name, f"reverse:{origin.url}", f"cache_valkey_urls={urls}", *sets)
        started.append(p)
        return p

    try:
        a, b = proxy("a"), proxy("b")
        time.sleep(1)  # listeners subscribed
        delays, stale, total = asyncio.run(propagation(a, b, args.purges, args.load_conns))
        ms = [d * 1000 for d in delays]
        print(f"purge on A -> first reflecting request on B ({len(ms)} purges, {args.load_conns} connections of load on B):")
        print(f"  p50 {pct(ms, 0.5):.2f} ms   p99 {pct(ms, 0.99):.2f} ms   max {max(ms):.2f} ms")
        print(f"  stale serves after A's answer: {stale} of {total} responses")
        for p in (a, b):
            p.stop()
        started.clear()

        kinds = {
            "l1-on": (), "l1-off": ("cache_l1_invalidation=false",),
            "l2-on": ("cache_l1_ttl=0",), "l2-off": ("cache_l1_ttl=0", "cache_l1_invalidation=false"),
        }
        proxies = {k: proxy(k, *sets) for k, sets in kinds.items()}
        time.sleep(1)
        path = f"/bench?{CC}&size=1024"
        for p in proxies.values():
            for _ in range(3):
                httpx.get(p.url + path)
        results: dict[str, list[float]] = {k: [] for k in kinds}
        order = list(kinds)
        for rnd in range(args.rounds):
            for k in order[rnd % 4:] + order[: rnd % 4]:
                rps = python_rps(proxies[k].port, path, args.seconds, args.conns)
                results[k].append(rps)
        print(f"\nthroughput, {args.rounds} rounds x {args.seconds:.0f} s, {args.conns} connections, 1 KiB body:")
        for k, v in results.items():
            print(f"  {k:7s} median {statistics.median(v):7.0f} req/s  (range {min(v):.0f}-{max(v):.0f})")
        for tier in ("l1", "l2"):
            ratios = [on / off for on, off in zip(results[f"{tier}-on"], results[f"{tier}-off"])]
            print(f"  {tier} hit, coherence on/off: median {statistics.median(ratios):.3f} "
                  f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    finally:
        for p in started:
            p.stop()
        for n in nodes:
            n.stop()
        origin.stop()


if __name__ == "__main__":
    main()
