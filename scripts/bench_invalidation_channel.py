"""Benchmark: the two ways for Valkey to tell every proxy that a key changed, side by side on
one real valkey-server.

  tracking: one connection per proxy runs ``CLIENT TRACKING on REDIRECT <own id> BCAST PREFIX
            p:r1:`` and ``SUBSCRIBE __redis__:invalidate``; writers just ``SET`` (what mitmcache uses)
  pubsub:   one connection per proxy ``SUBSCRIBE``s a channel; writers send ``SET`` and
            ``PUBLISH channel key`` in one pipeline

For each: the delay from starting a write to the moment ``--listeners`` listening connections
have all received the notice (p50/p99), and the writer's throughput (sequential writes of
``--size`` bytes, alternating rounds). A benchmark, not a test.

    .venv/bin/python scripts/bench_invalidation_channel.py [--writes 2000] [--listeners 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addon"))

import valkey.asyncio as va  # noqa: E402

from mitmcache.valkey_nodes import start_nodes  # noqa: E402

PREFIX = "p:r1:"
CHANNEL = "p:inv"


async def listener(port: int, mode: str, got: asyncio.Queue[float]) -> tuple[va.Connection, asyncio.Task[None]]:
    conn = va.Connection(host="127.0.0.1", port=port)
    await conn.connect()
    if mode == "tracking":
        await conn.send_command("CLIENT", "ID")
        cid = await conn.read_response()
        await conn.send_command("CLIENT", "TRACKING", "on", "REDIRECT", str(cid), "BCAST", "PREFIX", PREFIX)
        await conn.read_response()
        await conn.send_command("SUBSCRIBE", "__redis__:invalidate")
    else:
        await conn.send_command("SUBSCRIBE", CHANNEL)
    await conn.read_response()

    async def read() -> None:
        while True:
            msg = await conn.read_response()
            if isinstance(msg, list) and msg[0] == b"message":
                got.put_nowait(time.perf_counter())

    return conn, asyncio.get_running_loop().create_task(read())


async def write(client: va.Valkey, mode: str, key: str, value: bytes) -> None:
    if mode == "tracking":
        await client.set(key, value, px=60000)
    else:
        async with client.pipeline(transaction=False) as pipe:
            pipe.set(key, value, px=60000)
            pipe.publish(CHANNEL, key)
            await pipe.execute()


async def delays(port: int, mode: str, writes: int, listeners: int, size: int) -> list[float]:
    queues = [asyncio.Queue[float]() for _ in range(listeners)]
    conns = [await listener(port, mode, q) for q in queues]
    client = va.Valkey(port=port)
    value = b"x" * size
    out = []
    for i in range(writes):
        t0 = time.perf_counter()
        await write(client, mode, f"{PREFIX}{i % 100}", value)
        arrivals = [await q.get() for q in queues]
        out.append((max(arrivals) - t0) * 1000)
    await client.aclose()
    for c, task in conns:
        task.cancel()
        await c.disconnect()
    return out


async def throughput(port: int, mode: str, seconds: float, size: int) -> float:
    client = va.Valkey(port=port)
    value = b"x" * size
    n, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        await write(client, mode, f"{PREFIX}{n % 100}", value)
        n += 1
    await client.aclose()
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--listeners", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    node = start_nodes(1)[0]
    try:
        print(f"write -> all {args.listeners} listeners notified ({args.writes} writes of {args.size} B):")
        for mode in ("tracking", "pubsub"):
            d = sorted(asyncio.run(delays(node.port, mode, args.writes, args.listeners, args.size)))
            print(f"  {mode:8s} p50 {d[len(d) // 2]:.3f} ms  p99 {d[int(len(d) * 0.99)]:.3f} ms")
        rates: dict[str, list[float]] = {"tracking": [], "pubsub": []}
        for rnd in range(args.rounds):
            for mode in (("tracking", "pubsub") if rnd % 2 == 0 else ("pubsub", "tracking")):
                rates[mode].append(asyncio.run(throughput(node.port, mode, args.seconds, args.size)))
        print(f"writer throughput ({args.rounds} alternating rounds x {args.seconds:.0f} s, sequential):")
        for mode, v in rates.items():
            print(f"  {mode:8s} median {statistics.median(v):.0f} writes/s (range {min(v):.0f}-{max(v):.0f})")
        ratios = [t / p for t, p in zip(rates["tracking"], rates["pubsub"])]
        print(f"  tracking/pubsub: median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")
    finally:
        node.stop()


if __name__ == "__main__":
    main()
