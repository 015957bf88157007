"""Benchmark baseline: an addon that answers every request from memory, doing nothing else.

The ceiling for a cache hit in stock mitmdump (mitmproxy-notes §0.8): what mitmproxy itself
costs per request. scripts/bench.py runs it beside the cache (``ceiling``, and ``fast-ceiling``
under the fast launcher).
"""

from mitmproxy import http

BODY = b"x" * 1024


class MemoryAnswer:
    async def request(self, flow: http.HTTPFlow) -> None:
        flow.response = http.Response.make(200, BODY, {"Content-Type": "text/plain", "X-Cache-Status": "HIT"})


addons = [MemoryAnswer()]
