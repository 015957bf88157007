"""In-process microbenchmark of an L2 read: CPU per call of the cache's tier and store reads
against a real local Valkey node, next to the floor (a bare ``GET`` on a raw asyncio stream).

    .venv/bin/python scripts/bench_l2_get.py [--calls 20000] [--conc 1,16] [--size 1024] [--rounds 5]

Prints microseconds of this process's CPU (``time.process_time``: user + system, what the
proxy pays per hit) per call, median over rounds (min–max), for each concurrency (``--conc 16``:
16 reads in flight at once, as under wrk -c16). Rows:

  raw GET          asyncio StreamReader/Writer, RESP written and parsed by hand: the floor
  client.get       valkey-py's ``Valkey.get`` as the tier's node client is set up
  tier.get         ValkeyTier.get (placement, breaker, timeout, metrics; reads of a loop tick
                   leave as one MGET per node)
  store.get        TieredStore.get with ``l1_ttl=0`` (tier.get + decode + near-cache bookkeeping)

Also prints whether valkey-py uses the libvalkey C parser (``valkey.utils.LIBVALKEY_AVAILABLE``).
Wrap it in ``flock /work/bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addon"))

import valkey.utils  # noqa: E402

from mitmcache import codec  # noqa: E402
from mitmcache.metrics import Metrics  # noqa: E402
from mitmcache.ring import parse_valkey_urls  # noqa: E402
from mitmcache.semantics import StoredResponse  # noqa: E402
from mitmcache.store import TieredStore  # noqa: E402
from mitmcache.valkey_nodes import start_nodes  # noqa: E402
from mitmcache.valkey_tier import ValkeyTier  # noqa: E402

KEY = "GET|http://127.0.0.1/hot"


def entry(size: int) -> StoredResponse:
    now = time.time()
    return StoredResponse(
        status=200, reason="OK",
        headers=(("content-type", "text/plain"), ("cache-control", "max-age=3600"), ("content-length", str(size))),
        body=b"x" * size, request_time=now, response_time=now, initial_age=0.0, freshness=3600.0,
        stale_while_revalidate=0.0, stale_if_error=0.0, never_serve_stale=False,
        requires_revalidation=False, heuristic=False,
    )


async def per_call_us(call: Callable[[], Awaitable[object]], calls: int, conc: int) -> float:
    """CPU µs per call with ``conc`` calls in flight (each worker awaits its calls in turn)."""

    async def worker(n: int) -> None:
        for _ in range(n):
            await call()

    start = time.process_time()
    await asyncio.gather(*(worker(calls // conc) for _ in range(conc)))
    return (time.process_time() - start) / (calls // conc * conc) * 1e6


class RawGet:
    """The floor: one connection, RESP by hand, replies matched to requests in order."""

    def __init__(self, port: int, key: bytes) -> None:
        self.port = port
        self.request = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)
        self.waiters: list[asyncio.Future[bytes]] = []

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            line = await self.reader.readline()
            length = int(line[1:-2])
            data = await self.reader.readexactly(length + 2)
            self.waiters.pop(0).set_result(data[:-2])

    async def get(self) -> bytes:
        future = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        self.writer.write(self.request)
        return await future


async def run(args: argparse.Namespace) -> None:
    # mitmproxy runs its loop with the eager task factory; so does this benchmark.
    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
    nodes = start_nodes(1)
    try:
        metrics = Metrics()
        tier = ValkeyTier(parse_valkey_urls(nodes[0].url), "bench", 250, metrics)
        store = TieredStore(metrics, 64 << 20, l1_ttl=0)
        store.set_coherence(False)
        store.attach_l2(tier)
        await tier.set(KEY, codec.encode((entry(args.size),), KEY), 3_600_000)
        vkey = tier.valkey_key(KEY)
        client = tier.node_for(KEY).client
        raw = RawGet(nodes[0].port, vkey.encode())
        await raw.start()
        assert (await raw.get()) == await tier.get(KEY)
        assert (await store.get(KEY, time.time())) is not None
        rows: dict[str, Callable[[], Awaitable[object]]] = {
            "raw GET": raw.get,
            "client.get": lambda: client.get(vkey),
            "tier.get": lambda: tier.get(KEY),
            "store.get": lambda: store.get(KEY, time.time()),
        }
        print(f"libvalkey C parser: {valkey.utils.LIBVALKEY_AVAILABLE}; {args.size} B body; "
              f"{args.calls} calls per row and round, {args.rounds} rounds; CPU µs per call, median (min–max)\n")
        concs = [int(c) for c in args.conc.split(",")]
        print("| read | " + " | ".join(f"conc {c}" for c in concs) + " |")
        print("|---|" + "---|" * len(concs))
        for name, call in rows.items():
            cells = []
            for conc in concs:
                await per_call_us(call, args.calls // 10, conc)  # warm up
                samples = [await per_call_us(call, args.calls, conc) for _ in range(args.rounds)]
                cells.append(f"{statistics.median(samples):.1f} ({min(samples):.1f}–{max(samples):.1f})")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        raw.task.cancel()
        raw.writer.close()
        await tier.close()
    finally:
        for n in nodes:
            n.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--conc", default="1,16", help="comma-separated numbers of reads in flight")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (the fast launcher's loop)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
