"""A tiny stand-in for mitmproxy in in-process pipeline tests.

``Driver.send`` does what mitmproxy and the ``HttpCache`` addon do with one flow: build a
``messages.Request``, ask the pipeline; if the cache did not answer, forward the request to the
real origin (``tests/origin.py``) with the entry's validators in place of the client's, hand
the origin's answer to ``Pipeline.response`` and send its replacement, if any, else the
origin's answer. No mitmdump, no proxy port: the pipeline runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

import httpx

from mitmcache.messages import Request, Response
from mitmcache.origin_client import OriginClient
from mitmcache.outcome import Outcome
from mitmcache.service import CacheService
from tests.origin import Origin

_CONDITIONAL = ("if-none-match", "if-modified-since")


class Answer(NamedTuple):
    """What the client got, and the pipeline's record of it (``(response, outcome)``)."""

    response: Response
    outcome: Outcome

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def body(self) -> bytes | None:
        return self.response.body

    @property
    def label(self) -> str | None:
        """X-Cache-Status as the addon sets it: HIT, MISS, STALE, or None (not handled)."""
        return self.outcome.label

    @property
    def cache_status(self) -> str:
        """Cache-Status (RFC 9211) as the addon renders it."""
        return self.outcome.status.render()

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.response.headers if k.lower() == name), None)


class Driver:
    """Sends requests for ``origin`` through ``service``'s pipeline, as mitmproxy would."""

    def __init__(self, service: CacheService, origin: Origin) -> None:
        self.service = service
        self.origin = origin
        self.client = httpx.AsyncClient(timeout=10.0, trust_env=False, follow_redirects=False)

    def request(self, method: str, path: str, headers: list[tuple[str, str]] | None = None) -> Request:
        authority = f"127.0.0.1:{self.origin.port}"
        fields = (("Host", authority), *(headers or []))
        return Request(
            method, "http", "127.0.0.1", self.origin.port, path, tuple(fields), authority, time.time(),
        )

    async def send(
        self, method: str, path: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> Answer:
        pipeline = self.service.pipeline
        req = self.request(method, path, headers)
        ex = await pipeline.request(req)
        if ex.reply is not None:
            return Answer(ex.reply, ex.outcome)
        fields = list(req.headers)
        if ex.validators:  # as the HttpCache addon does: the entry's validators replace the client's
            fields = [(k, v) for k, v in fields if k.lower() not in _CONDITIONAL] + list(ex.validators)
        forwarded = httpx.Request(method, req.url, headers=fields, content=body or None)
        forwarded.method = method  # httpx upper-cases it; mitmproxy forwards the method as sent
        request_time = time.time()
        try:
            upstream = await self.client.send(forwarded, stream=True)
            try:
                content = b"".join([chunk async for chunk in upstream.aiter_raw()])
            finally:
                await upstream.aclose()
        except httpx.HTTPError as e:
            await pipeline.error(ex)
            text = f"origin unreachable: {e}".encode()
            now = time.time()
            return Answer(Response(502, "Bad Gateway", (("content-length", str(len(text))),), text, now, now), ex.outcome)
        resp = Response(
            upstream.status_code, upstream.reason_phrase, tuple(upstream.headers.multi_items()), content,
            request_time, time.time(),
        )
        replacement = await pipeline.response(ex, resp)
        return Answer(replacement if replacement is not None else resp, ex.outcome)

    async def aclose(self) -> None:
        await self.client.aclose()


@contextlib.asynccontextmanager
async def running_service(workers: int = 2, queue: int = 16) -> AsyncIterator[CacheService]:
    """A cache service whose revalidator has its own origin client (background revalidation,
    stale-if-error); stopped and closed afterwards."""
    service = CacheService()
    service.revalidator.configure(workers, queue, OriginClient(False, 5.0))
    try:
        yield service
    finally:
        client = service.revalidator.client
        service.revalidator.stop()
        if client is not None:
            await client.aclose()
        await service.store.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``condition`` on the event loop (background work runs meanwhile), bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
