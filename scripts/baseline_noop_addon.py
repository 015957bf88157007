"""Benchmark baseline: an addon shaped like the cache that does nothing.

The same nesting as ``addon/mitmcache_addon.py`` (the file's ``addons`` → a container whose
``addons`` holds the one addon with the per-flow hooks) and the same hooks (async ``request``,
``responseheaders``, async ``response``, async ``error``), each returning at once. What
mitmproxy itself charges for an addon with these hooks: scripts/bench.py runs it beside the
cache's uncacheable path (``nostore-noop``), so the no-store ratios can be read against it.
"""

from mitmproxy import http


class Hooks:
    name = "noop.hooks"

    async def request(self, flow: http.HTTPFlow) -> None:
        pass

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        pass

    async def response(self, flow: http.HTTPFlow) -> None:
        pass

    async def error(self, flow: http.HTTPFlow) -> None:
        pass


class Container:
    name = "noop"

    def __init__(self) -> None:
        self.addons = [Hooks()]


addons = [Container()]
