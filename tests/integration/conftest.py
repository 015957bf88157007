"""Fixtures of the in-process pipeline tests: a running cache service and a Driver that plays
mitmproxy's part against the real counting origin (``tests/origin.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mitmcache.service import CacheService
from tests.driver import Driver, running_service
from tests.origin import Origin


@pytest.fixture
async def service() -> AsyncIterator[CacheService]:
    async with running_service() as s:
        yield s


@pytest.fixture
async def driver(service: CacheService, origin: Origin) -> AsyncIterator[Driver]:
    d = Driver(service, origin)
    yield d
    await d.aclose()
