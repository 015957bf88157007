"""Benchmark: flood cold keys through N proxies and count what reaches the origin.

For N = 1, 2, 4 proxies (real mitmdump processes) it fires --clients concurrent requests at
one cold key, spread evenly over the proxies, for --keys different keys, and prints the
origin requests per key. Side by side: proxies sharing a Valkey ring (coalescing across the
cluster through the key's lease) and L1-only proxies (coalescing inside each proxy only).
A benchmark, not a test: it asserts nothing.

    .venv/bin/python scripts/flood_cold_key.py [--clients 100] [--keys 5] [--delay-ms 300]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from mitmcache.valkey_nodes import start_nodes  # noqa: E402
from tests.conftest import Proxy, start_proxy  # noqa: E402
from tests.origin import start_origin  # noqa: E402


async def flood(urls: list[str]) -> tuple[int, float]:
    clients = [httpx.AsyncClient(timeout=30) for _ in urls]
    t0 = time.perf_counter()
    try:
        responses = await asyncio.gather(*(c.get(u) for c, u in zip(clients, urls)), return_exceptions=True)
    finally:
        for c in clients:
            await c.aclose()
    ok = sum(1 for r in responses if isinstance(r, httpx.Response) and r.status_code == 200)
    return ok, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--delay-ms", type=int, default=300, help="origin latency")
    args = parser.parse_args()

    origin = start_origin()
    nodes = start_nodes(3)
    ring = ",".join(n.url for n in nodes)
    tmp = Path(tempfile.mkdtemp(prefix="mitmcache-flood-"))
    print(f"{args.clients} concurrent clients per cold key, {args.keys} keys, origin latency {args.delay_ms} ms\n")
    print(f"{'proxies':>7} {'store':>8} {'origin requests per key':>24} {'ok':>9} {'time/key':>9}")
    try:
        for n in (1, 2, 4):
            for mode in ("ring", "l1-only"):
                sets = [f"cache_valkey_urls={ring}"] if mode == "ring" else []
                proxies: list[Proxy] = [
                    start_proxy(tmp / f"{mode}-{n}-{i}", f"reverse:{origin.url}", *sets) for i in range(n)
                ]
                try:
                    per_key, ok_total, seconds = [], 0, 0.0
                    for k in range(args.keys):
                        path = f"/flood-{mode}-{n}-{k}?cc=max-age%3D300&delay={args.delay_ms}"
                        urls = [proxies[i % n].url + path for i in range(args.clients)]
                        ok, elapsed = asyncio.run(flood(urls))
                        per_key.append(origin.count(path))
                        ok_total += ok
                        seconds += elapsed
                    counts = ",".join(str(c) for c in per_key)
                    print(f"{n:>7} {mode:>8} {counts:>24} {ok_total:>5}/{args.clients * args.keys:<3} "
                          f"{seconds / args.keys:>8.2f}s")
                finally:
                    for p in proxies:
                        p.stop()
    finally:
        for node in nodes:
            node.stop()
        origin.stop()


if __name__ == "__main__":
    main()
