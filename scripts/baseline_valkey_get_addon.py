"""Benchmark baseline: the memory answer of baseline_memory_addon.py after one bare ``GET``
round trip to a Valkey node: the floor for any L2 hit in stock mitmdump (what one Valkey read
costs the proxy with the leanest client there is, and no cache at all).

The client is as lean as it gets: one connection for the process, every request's ``GET``
written at once (RESP by hand), replies read as they come and handed out in order (several
per read under load). No timeouts, no fault handling: a benchmark, not a client.

    mitmdump -s scripts/baseline_valkey_get_addon.py --set bench_valkey_port=6379

scripts/bench.py runs it as ``ceiling-get``.
"""

from __future__ import annotations

import asyncio
from collections import deque

from mitmproxy import ctx, http

BODY = b"x" * 1024
KEY = b"bench:baseline"


class ValkeyGetThenAnswer:
    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.waiting: deque[asyncio.Future[bytes]] = deque()
        self.request_bytes = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(KEY), KEY)
        self.lock = asyncio.Lock()

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("bench_valkey_port", int, 6379, "Valkey port on 127.0.0.1 to GET from before answering")

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", ctx.options.bench_valkey_port)
        value = BODY
        self.writer.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(KEY), KEY, len(value), value))
        await self.reader.readline()  # +OK
        asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.reader is not None
        while True:
            line = await self.reader.readline()
            if not line:
                return
            data = await self.reader.readexactly(int(line[1:-2]) + 2)
            self.waiting.popleft().set_result(data[:-2])

    async def request(self, flow: http.HTTPFlow) -> None:
        if self.writer is None:
            async with self.lock:
                if self.writer is None:
                    await self._connect()
        assert self.writer is not None
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.writer.write(self.request_bytes)
        body = await future
        flow.response = http.Response.make(200, body, {"Content-Type": "text/plain", "X-Cache-Status": "HIT"})


addons = [ValkeyGetThenAnswer()]
