"""The fast launcher: mitmdump's proxy core in-process with only the built-in addons a cache needs.

Stock ``mitmdump`` dispatches every hook event (eight per request) to ~36 built-in addons; on
a cache hit that dispatching is most of the CPU (mitmproxy-notes §0.8). This module runs the
same proxy core (``mitmproxy.master.Master``), parses the same command line (mitmdump's own
parser, ``mitmproxy.tools.cmdline.mitmdump``) and loads:

- always: Core, Block, DisableH2C, Proxyserver, the cache (``MitmCache``), NextLayer,
  TlsConfig, ErrorCheck (start-up errors stop the proxy), TermLog (log lines);
- when an option asks for them: ProxyAuth (``proxyauth``), ScriptLoader (``-s``), Save
  (``-w``), UpstreamAuth (``upstream_auth``), UpdateAltSvc (a reverse mode, unless
  ``keep_alt_svc_header``), Dumper (flow lines; not with ``-q`` / ``flow_detail=0``).

Every built-in addon's options are declared, so the parser, ``config.yaml`` and user scripts
see mitmdump's full option set; an option the user changed whose addon is not loaded (e.g.
``--map-remote``, ``--anticache``, ``-r``) and the modes that need other addons (dns,
wireguard, local, tun) are refused before anything starts, in one line naming the option and
pointing to ``scripts/run --stock``. Hook events go only to the addons that implement them
(``HookIndex``). Runs on uvloop when it is installed (the ``fast`` extra).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks, master, optmanager
from mitmproxy import options as mitm_options
from mitmproxy.addons import (
    block,
    core,
    default_addons,
    disable_h2c,
    dumper,
    errorcheck,
    keepserving,
    next_layer,
    proxyauth,
    proxyserver,
    readfile,
    save,
    script,
    termlog,
    tlsconfig,
    update_alt_svc,
    upstream_auth,
)
from mitmproxy.proxy import mode_specs
from mitmproxy.tools import cmdline
from mitmproxy.tools.main import process_options
from mitmproxy.utils import debug

PROG = "scripts/run"
STOCK_HINT = "use 'scripts/run --stock …' (stock mitmdump with every built-in addon)"
MODES = ("regular", "reverse", "upstream", "socks5", "transparent")
"""Proxy modes served by the loaded addons (dns, wireguard, local and tun need DnsResolver)."""

IGNORED = {"command_history", "onboarding"}
"""Options of addons not loaded that change nothing a proxy without a console does: console
history, and mitmproxy's onboarding app (mitm.it) — switching it off is what the launcher does."""


class Refused(ValueError):
    """An option or mode the fast launcher does not support; the message is one line."""


class _Declarer:
    """A stand-in for mitmproxy's ``Loader``: records which addon declares which option."""

    def __init__(self, opts: mitm_options.Options, owner: str, owners: dict[str, str]) -> None:
        self.opts, self.owner, self.owners = opts, owner, owners

    def add_option(self, name: str, typespec: type, default: Any, help: str, choices: Sequence[str] | None = None) -> None:
        if name not in self.opts:
            self.opts.add_option(name, typespec, default, help, choices)
        self.owners.setdefault(name, self.owner)

    def add_command(self, path: str, func: Callable[..., Any]) -> None:
        pass


def declare_builtin_options(opts: mitm_options.Options) -> dict[str, str]:
    """Declare the options of every addon stock mitmdump loads; returns {option: addon class}."""
    owners: dict[str, str] = {}
    log = termlog.TermLog()
    log.uninstall()  # constructed only for its option: Master brings its own TermLog
    builtins = [*default_addons(), dumper.Dumper(), keepserving.KeepServing(), readfile.ReadFileStdin(), log]
    for addon in builtins:
        if hasattr(addon, "load"):
            addon.load(_Declarer(opts, type(addon).__name__, owners))
    return owners


def _reverse(opts: mitm_options.Options) -> bool:
    return any(spec.startswith("reverse:") for spec in opts.mode)


def _always(opts: mitm_options.Options) -> bool:
    return True


CACHE_SLOT = None
CHAIN: list[tuple[type | None, Callable[[mitm_options.Options], bool]]] = [
    (core.Core, _always),
    (block.Block, _always),
    (disable_h2c.DisableH2C, _always),
    (proxyauth.ProxyAuth, lambda o: bool(o.proxyauth)),
    (proxyserver.Proxyserver, _always),
    (CACHE_SLOT, _always),  # where stock mitmdump's first -s script sits: user scripts run after it
    (script.ScriptLoader, lambda o: bool(o.scripts)),
    (next_layer.NextLayer, _always),
    (save.Save, lambda o: bool(o.save_stream_file)),
    (tlsconfig.TlsConfig, _always),
    (upstream_auth.UpstreamAuth, lambda o: bool(o.upstream_auth)),
    (update_alt_svc.UpdateAltSvc, lambda o: _reverse(o) and not o.keep_alt_svc_header),
    (dumper.Dumper, lambda o: o.flow_detail > 0),
]
"""The fast launcher's built-in addons in stock mitmdump's relative order, each with the
condition (on the parsed options) under which it is loaded. ErrorCheck and TermLog come too."""

SUPPORTED = {cls.__name__ for cls, _ in CHAIN if cls is not None} | {"TermLog"}
"""Built-in addons whose options the fast launcher honours."""


def select_addons(opts: mitm_options.Options, cache: Any) -> list[Any]:
    """The addon chain for these options (``cache`` in CACHE_SLOT)."""
    return [cache if cls is CACHE_SLOT else cls() for cls, wanted in CHAIN if wanted(opts)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_supported(opts: mitm_options.Options, owners: dict[str, str]) -> None:
    """Raise Refused for the first option set away from its default whose addon the fast
    launcher does not load (every option of an addon in CHAIN is supported: that addon is
    loaded when its option asks for it), and for modes other than MODES."""
    for name in sorted(opts.keys()):
        owner = owners.get(name)
        if owner is None or owner in SUPPORTED or name in IGNORED:
            continue
        if opts._options[name].has_changed():
            raise Refused(f"option {name} ({_flag(name)}) needs mitmproxy's {owner} addon, which the fast launcher does not load; {STOCK_HINT}")
    for spec in opts.mode:
        try:
            kind = mode_specs.ProxyMode.parse(spec).type_name
        except ValueError:
            continue  # Proxyserver reports an invalid spec with mitmproxy's own message
        if kind not in MODES:
            raise Refused(f"--mode {spec}: the fast launcher serves {', '.join(MODES)} modes only; {STOCK_HINT}")


class HookIndex(addonmanager.AddonManager):
    """mitmproxy's AddonManager, except that an event goes only to the addons that handle it.

    Stock dispatch walks every addon for every event (eight per request, four of them
    ``update``, which none of the addons here implements), entering a context manager per
    addon. This keeps, per event name, the top-level addons that have the hook, plus every
    addon with nested ``addons`` (ScriptLoader's scripts come and go, so containers are always
    asked); order, ``safecall`` and ``AddonHalt`` are mitmproxy's own. The index is rebuilt
    whenever the chain changes."""

    def __init__(self, m: master.Master) -> None:
        super().__init__(m)
        self._index: dict[str, list[Any]] = {}

    def _hooked(self, name: str) -> list[Any]:
        found = self._index.get(name)
        if found is None:
            found = self._index[name] = [
                a for a in self.chain if hasattr(a, "addons") or getattr(a, name, None) is not None
            ]
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        for addon in self._hooked(event.name):
            try:
                with addonmanager.safecall():
                    await self.invoke_addon(addon, event)
            except exceptions.AddonHalt:
                return

    def add(self, *addons: Any) -> None:
        super().add(*addons)
        self._index = {}

    def remove(self, addon: Any) -> None:
        super().remove(addon)
        self._index = {}

    def clear(self) -> None:
        super().clear()
        self._index = {}


class FastMaster(master.Master):
    """mitmproxy's Master with the HookIndex addon manager and a TermLog for log lines."""

    def __init__(self, opts: mitm_options.Options) -> None:
        super().__init__(opts, with_termlog=False)
        self.options.changed.disconnect(self.addons._configure_all)  # the stock manager is replaced, unused
        self.addons = HookIndex(self)
        self._termlog_addon = termlog.TermLog()
        self.addons.add(self._termlog_addon)


def _configure_logging() -> None:
    # As mitmproxy.tools.main.run does: the root logger passes everything to TermLog, which filters.
    logging.getLogger().setLevel(logging.DEBUG)
    for name, level in (("tornado", logging.WARNING), ("asyncio", logging.WARNING), ("hpack", logging.WARNING),
                        ("quic", logging.WARNING)):
        logging.getLogger(name).setLevel(level)
    debug.register_info_dumpers()


def _apply_arguments(opts: mitm_options.Options, argv: list[str]) -> Any:
    """Parse mitmdump's command line into ``opts`` exactly as mitmdump does (``--set`` values of
    options not declared yet stay deferred, ``config.yaml`` in confdir, ``-q``/``-v``, filter
    arguments); returns argparse's namespace. Raises OptionsError, SystemExit (argparse)."""
    parser = cmdline.mitmdump(opts)
    parser.prog = PROG
    args = parser.parse_args(argv)  # argparse: usage line and exit status 2 on bad arguments
    opts.set(*args.setoptions, defer=True)
    optmanager.load_paths(opts, os.path.join(opts.confdir, "config.yaml"), os.path.join(opts.confdir, "config.yml"))
    process_options(parser, opts, args)
    if args.filter_args:
        spec = " ".join(args.filter_args)
        opts.update(save_stream_filter=spec, dumper_filter=spec)
    return args


def preflight(argv: list[str]) -> tuple[mitm_options.Options, Any]:
    """First pass, on a scratch option set holding every built-in option: parse the command line
    and check the fast launcher supports what it asks for. Returns (options, argparse namespace);
    raises Refused, OptionsError, SystemExit (argparse)."""
    scratch = mitm_options.Options()
    owners = declare_builtin_options(scratch)
    args = _apply_arguments(scratch, argv)
    if not args.version:
        check_supported(scratch, owners)
    return scratch, args


async def _main(argv: list[str], make_cache: Callable[[], Any]) -> int:
    _configure_logging()
    try:
        scratch, args = preflight(argv)
    except exceptions.OptionsError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except Refused as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.version:
        print(debug.dump_system_info())
        return 0

    # Second pass, for real: the chain first (each addon declares its options), then the rest of
    # the built-in options, then the arguments, so every addon is configured as under mitmdump.
    opts = mitm_options.Options()
    m = FastMaster(opts)
    cache = make_cache()
    m.addons.add(*select_addons(scratch, cache), errorcheck.ErrorCheck())
    declare_builtin_options(opts)
    try:
        # As mitmproxy's ScriptLoader does for a -s script: the cache is configured with every
        # option, defaults included (e.g. it builds its origin client from them), not only
        # with those the arguments change next.
        m.addons.invoke_addon_sync(cache, hooks.ConfigureHook(set(opts.keys())))
        _apply_arguments(opts, argv)
    except exceptions.OptionsError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if args.options:
        optmanager.dump_defaults(opts, sys.stdout)
        return 0
    if args.commands:
        m.commands.dump()
        return 0

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, m.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    await m.run()
    return 0


def loop_factory(use_uvloop: bool = True) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """(event loop factory, its name): uvloop when installed and wanted, else asyncio's default."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop, "uvloop"
    return None, "asyncio"


def run(argv: list[str], make_cache: Callable[[], Any], use_uvloop: bool = True) -> int:
    """Run the trimmed proxy until it is stopped (SIGINT, SIGTERM, SIGHUP); the exit status."""
    factory, _ = loop_factory(use_uvloop)
    return asyncio.run(_main(argv, make_cache), loop_factory=factory)
