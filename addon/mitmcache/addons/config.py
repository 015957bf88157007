"""Option handling shared by the addons: start-up errors as one line, human sizes.

mitmproxy reports an ``OptionsError`` raised while a ``-s`` script loads with a traceback, and
a non-integer ``--set`` value of an ``int`` option makes it skip the script silently
(mitmproxy-notes A1.6); and the script loads while the listeners come up, so an ERROR line
alone lets mitmproxy announce "listening" before its start-up check stops it. So during
start-up (while mitmproxy's ``errorcheck`` addon is watching) a bad value is logged as one ERROR
line naming the option and the process exits (status 1) before anything listens; once running,
the ``OptionsError`` is raised so a live change (mitmweb's options editor, the console) is
rejected.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, NoReturn
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions
from mitmproxy.proxy import mode_specs
from mitmproxy.utils import asyncio_utils, human

log = logging.getLogger("mitmcache")

def starting_up() -> bool:
    """True while mitmproxy's errorcheck addon watches start-up (it stops the proxy on an
    ERROR line before any listener opens)."""
    master = getattr(ctx, "master", None)
    checker = master.addons.get("errorcheck") if master is not None else None
    return checker is not None and checker.logger in logging.getLogger().handlers


def stop_startup(message: str) -> NoReturn:
    """One ERROR line, then exit before any listener opens (status 1)."""
    log.error(f"mitmcache: {message}")
    raise SystemExit(1)


def report_option_errors[F: Callable[..., None]](configure: F) -> F:
    """Wrap an addon's ``configure``: at start-up an OptionsError becomes one ERROR line
    (mitmproxy then exits before listening); later it is raised (the change is rejected)."""

    @functools.wraps(configure)
    def wrapper(self: Any, updated: set[str]) -> None:
        try:
            configure(self, updated)
        except exceptions.OptionsError as e:
            if not starting_up():
                raise
            stop_startup(str(e))

    return wrapper  # type: ignore[return-value]


def reject_unparsable(loader: Any, names: Iterable[str]) -> None:
    """Call at the end of ``load``: a ``--set name=abc`` for an int option, or a bool option
    set to anything but true/false, stops start-up with one line naming it (mitmproxy itself
    would drop the whole script without a word)."""
    options = loader.master.options
    for name in names:
        pending = getattr(options.deferred.get(name), "val", None)  # --set values not yet parsed
        if not pending:
            continue
        value = pending[-1]
        kind = options._options[name].typespec if name in options._options else None
        if kind is bool:
            if value not in ("", "true", "false", "toggle"):
                del options.deferred[name]
                stop_startup(f"{name}: not a boolean: {value!r} (true or false)")
            continue
        try:
            int(value)
        except ValueError:
            del options.deferred[name]
            stop_startup(f"{name}: not an integer: {value!r}")


def reject_unknown() -> None:
    """At start-up, a ``--set cache_…`` name that no addon declares stops the proxy with one line
    (mitmproxy keeps unknown names deferred without a word: a typo would silently change
    nothing). Close matches are suggested."""
    if not starting_up():
        return
    known = [n for n in ctx.options.keys() if n.startswith("cache_")]
    for name in list(ctx.options.deferred):
        if name.startswith("cache_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            stop_startup(f"{name}: no such option" + (f" (did you mean {close[0]}?)" if close else ""))


def parse_size(name: str, value: str, minimum: int = 0) -> int:
    """A size option in bytes, in mitmproxy's human form (``1048576``, ``256k``, ``256m``,
    ``1g``). Raises OptionsError naming the option."""
    try:
        size = human.parse_size(value.strip().lower())
    except ValueError:
        size = None
    if size is None:
        raise exceptions.OptionsError(f"{name}: not a size: {value!r} (bytes, or e.g. 256k, 256m, 1g)")
    if size < minimum:
        raise exceptions.OptionsError(f"{name}: must be at least {minimum} bytes, not {value!r}")
    return size


def at_least(name: str, minimum: int) -> int:
    """The int option ``name``, checked to be >= ``minimum``. Raises OptionsError."""
    value = getattr(ctx.options, name)
    if value < minimum:
        raise exceptions.OptionsError(f"{name}: must be >= {minimum}, not {value}")
    return int(value)


def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
    """Run a coroutine in the background, held until done (mitmproxy's ``create_task``);
    closed unrun when no loop runs (e.g. ``configure`` in a synchronous test)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        coro.close()
        return None
    return asyncio_utils.create_task(coro, name=f"mitmcache {name}", keep_ref=True)


def origin_urls(url: str) -> list[tuple[str, str | None]]:
    """When ``url``'s port is one of this proxy's reverse-mode listeners (the URL a client
    used), the origin's URL the request goes to, with the Host the origin then sees when
    ``keep_host_header`` passes the client's on (else None). Empty for any other URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return []
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    out = []
    for spec in getattr(ctx.options, "mode", []):
        try:
            mode = mode_specs.ProxyMode.parse(spec)
        except ValueError:
            continue
        if isinstance(mode, mode_specs.ReverseMode) and mode.listen_port(ctx.options.listen_port) == port:
            host, origin_port = mode.address
            netloc = f"[{host}]:{origin_port}" if ":" in host else f"{host}:{origin_port}"
            host_header = parts.netloc.rpartition("@")[2] if getattr(ctx.options, "keep_host_header", False) else None
            out.append((f"{mode.scheme}://{netloc}{path}", host_header))
    return out
