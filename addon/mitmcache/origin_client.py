"""The cache's own HTTP client to origins: background revalidation and stale-if-error fetches.

Requests go straight to the origin the flow was going to (no loop back through the proxy, no
internal marker header a client could spoof: reference W9). TLS verification follows
mitmproxy's options (``ssl_insecure``, ``ssl_verify_upstream_trusted_ca/confdir``). Upstream
proxy modes are not followed (documented).
"""

from __future__ import annotations

import ssl
import time
from urllib.parse import urlsplit
import certifi
import httpx

from . import semantics as sem
from .messages import Response

# Never forwarded: hop-by-hop fields and framing.
_DROP = sem.HOP_BY_HOP | {"content-length", "expect"}


class OriginError(Exception):
    """The origin could not be reached or did not answer in time."""


def _wire(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def tls_verification(insecure: bool, ca_file: str | None, ca_dir: str | None) -> bool | ssl.SSLContext:
    if insecure:
        return False
    return ssl.create_default_context(cafile=ca_file or (None if ca_dir else certifi.where()), capath=ca_dir or None)


class OriginClient:
    def __init__(self, verify: bool | ssl.SSLContext, timeout: float) -> None:
        self._client = httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=False,  # no proxies from the environment
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )

    async def fetch(
        self, method: str, url: str, headers: list[tuple[str, str]], max_body: int | None, target: bytes | None = None
    ) -> Response:
        """One request; a body over ``max_body`` bytes is dropped (None), None = no limit.

        ``target``: the request target to send byte for byte (httpx would re-encode ``url``'s);
        header values go out as the bytes they were received as.
        Raises OriginError when the origin cannot be reached or does not answer in time."""
        limit = max_body if max_body is not None else float("inf")
        # A bare httpx.Request: no client default headers (e.g. Accept-Encoding) sneak in and
        # change the representation that gets stored under the client's Vary values.
        # mitmproxy decodes header bytes as UTF-8 with surrogateescape: encode them back.
        fields = [(_wire(k), _wire(v)) for k, v in headers if k.lower() not in _DROP]
        if target:
            # Only scheme and authority come from the URL: the target may hold bytes httpx
            # would re-encode or refuse (a raw 0xE9), and is sent as it came.
            parts = urlsplit(url)
            url = f"{parts.scheme}://{parts.netloc}/"
        try:
            request = httpx.Request(method, url, headers=fields, extensions={"target": target} if target else None)
        except (httpx.InvalidURL, ValueError) as e:
            raise OriginError(f"cannot request {url!r}: {e}") from e
        request_time = time.time()
        try:
            response = await self._client.send(request, stream=True)
            try:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                    if size > limit:
                        chunks = []
                        break
                    chunks.append(chunk)
                body = None if size > limit else b"".join(chunks)
            finally:
                await response.aclose()
        except httpx.HTTPError as e:
            raise OriginError(f"{type(e).__name__}: {e}") from e
        return Response(
            status=response.status_code,
            reason=response.reason_phrase,
            # Header bytes as received (httpx decodes them as Latin-1 when they are not ASCII).
            headers=tuple(
                (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                for k, v in response.headers.raw
            ),
            body=body,
            request_time=request_time,
            response_time=time.time(),
        )

    async def aclose(self) -> None:
        await self._client.aclose()
