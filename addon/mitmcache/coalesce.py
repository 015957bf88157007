"""Request collapsing inside one proxy: one fetch per key, everyone else waits for it.

The first request for a key becomes the leader and goes to the origin as usual; later ones
await the leader's outcome. Waiting is shielded: a waiter that gives up or disconnects never
cancels the shared future, so the others still get the result (unlike a bare await).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum

from .store import Resource


class FlightResult(Enum):
    STORED = "stored"  # the response is in the cache: waiters serve it
    NOT_SHAREABLE = "not-shareable"  # waiters must fetch on their own (all at once)
    FAILED = "failed"  # the leader's fetch failed or its client left: elect a new leader
    STALE_IF_ERROR = "stale-if-error"  # the origin failed; waiters may serve the stale entry too
    TIMED_OUT = "timed-out"  # no answer within cache_origin_timeout_ms: waiters answer 504 (or stale) too


@dataclass(slots=True)
class Flight:
    future: asyncio.Future[tuple[FlightResult, Resource | None]]
    started: float = field(default_factory=time.monotonic)
    waiters: int = 0
    # The origin has sent the leader's response headers: the deadline (a bound on the first
    # byte, cache_origin_timeout_ms) no longer applies to its waiters.
    answering: bool = False


class Coalescer:
    def __init__(self) -> None:
        self.flights: dict[str, Flight] = {}

    def current(self, key: str) -> Flight | None:
        return self.flights.get(key)

    def lead(self, key: str) -> Flight:
        flight = Flight(asyncio.get_running_loop().create_future())
        self.flights[key] = flight
        return flight

    def finish(self, key: str, flight: Flight, outcome: FlightResult, resource: Resource | None = None) -> None:
        if self.flights.get(key) is flight:
            del self.flights[key]
        if not flight.future.done():
            flight.future.set_result((outcome, resource))

    async def wait(self, flight: Flight, timeout: float) -> tuple[FlightResult, Resource | None] | None:
        """The leader's outcome, or None after ``timeout`` seconds."""
        flight.waiters += 1
        try:
            return await asyncio.wait_for(asyncio.shield(flight.future), timeout)
        except TimeoutError:
            return None
        finally:
            flight.waiters -= 1
