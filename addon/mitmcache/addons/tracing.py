"""Tracing addon: ``cache_tracing`` turns OpenTelemetry spans on (optional extra)."""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions

from ..outcome import Observer
from ..service import CacheService
from .config import reject_unparsable, report_option_errors

log = logging.getLogger("mitmcache")


class Tracing:
    name = "mitmcache.tracing"

    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.observer: Observer | None = None

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "cache_tracing", bool, False,
            "Emit an OpenTelemetry span per request and revalidation (needs mitmcache[tracing] and "
            "a configured tracer provider, e.g. opentelemetry-instrument).",
        )
        reject_unparsable(loader, ("cache_tracing",))

    @report_option_errors
    def configure(self, updated: set[str]) -> None:
        if "cache_tracing" not in updated:
            return
        if self.observer is not None:
            self.service.observers.remove(self.observer)
            self.observer = None
        if ctx.options.cache_tracing:
            try:
                from ..tracing import TracingObserver
            except ImportError as e:
                raise exceptions.OptionsError(
                    f"cache_tracing: OpenTelemetry is not installed ({e.name}); pip install 'mitmcache[tracing]'"
                ) from None
            self.observer = TracingObserver()
            self.service.observers.append(self.observer)
            log.info(
                "mitmcache: tracing on (OpenTelemetry): spans go to the global tracer provider; "
                "none configured means they are discarded (see README, Tracing)"
            )
