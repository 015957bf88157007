"""The fast launcher's choices (mitmcache.fastdump): which options it refuses and which built-in
addons it loads for a command line. Parsed with mitmdump's own parser; no proxy is started."""

from __future__ import annotations

import pytest
from mitmproxy import options

from mitmcache import fastdump

CACHE = object()  # stands for MitmCache in the chain


def parsed(*argv: str) -> tuple[options.Options, dict[str, str]]:
    opts = options.Options()
    owners = fastdump.declare_builtin_options(opts)
    fastdump._apply_arguments(opts, list(argv))
    return opts, owners


def chain(*argv: str) -> list[str]:
    opts, _ = parsed(*argv)
    return [type(a).__name__ if a is not CACHE else "cache" for a in fastdump.select_addons(opts, CACHE)]


@pytest.mark.parametrize(
    "argv, named",
    [
        pytest.param(["--map-remote", "|/a|/b"], "map_remote (--map-remote)", id="map-remote"),
        pytest.param(["--anticache"], "anticache (--anticache)", id="anticache"),
        pytest.param(["-S", "/tmp/flows"], "server_replay (--server-replay)", id="server replay"),
        pytest.param(["-r", "/tmp/flows"], "rfile (--rfile)", id="read file"),
        pytest.param(["--set", "modify_headers=/~q/X-A/1"], "modify_headers", id="--set form"),
        pytest.param(["--mode", "dns"], "--mode dns", id="dns mode"),
        pytest.param(["--mode", "wireguard"], "--mode wireguard", id="wireguard mode"),
    ],
)
def test_unsupported_option_is_refused_by_name(argv: list[str], named: str) -> None:
    opts, owners = parsed(*argv)
    with pytest.raises(fastdump.Refused) as e:
        fastdump.check_supported(opts, owners)
    assert named in str(e.value) and "scripts/run --stock" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--mode", "reverse:http://127.0.0.1:1", "-p", "8080", "--listen-host", "0.0.0.0"], id="reverse"),
        pytest.param(["-k", "--set", "confdir=/tmp/c", "--certs", "*=/tmp/c.pem", "--ignore-hosts", "x", "--allow-hosts", "y"],
                     id="regular with TLS options"),
        pytest.param(["--mode", "upstream:http://127.0.0.1:1", "--upstream-auth", "u:p"], id="upstream"),
        pytest.param(["--proxyauth", "u:p", "-w", "/tmp/f", "-s", "/tmp/s.py", "-q"], id="auth, save, scripts, quiet"),
        pytest.param(["--set", "stream_large_bodies=1m", "--set", "keep_host_header=true", "--set", "onboarding=false"],
                     id="proxy core options"),
        pytest.param(["--set", "cache_l1_ttl=0", "--set", "my_script_option=1"], id="cache and script options"),
    ],
)
def test_supported_options_pass(argv: list[str]) -> None:
    fastdump.check_supported(*parsed(*argv))


def test_minimal_chain_and_optional_addons() -> None:
    base = ["Core", "Block", "DisableH2C", "Proxyserver", "cache", "NextLayer", "TlsConfig"]
    assert chain("-q") == base
    assert chain() == [*base, "Dumper"]  # flow lines unless -q
    assert chain("-q", "-w", "/tmp/f", "-s", "/tmp/s.py", "--proxyauth", "u:p", "--upstream-auth", "u:p") == [
        "Core", "Block", "DisableH2C", "ProxyAuth", "Proxyserver", "cache", "ScriptLoader", "NextLayer", "Save",
        "TlsConfig", "UpstreamAuth",
    ]
    assert chain("-q", "--mode", "reverse:http://127.0.0.1:1") == [*base, "UpdateAltSvc"]
    assert chain("-q", "--mode", "reverse:http://127.0.0.1:1", "--set", "keep_alt_svc_header=true") == base


class Recorder:
    def __init__(self, name: str, seen: list[str], halt: bool = False) -> None:
        self.name, self.seen, self.halt = name, seen, halt

    def request(self, flow: object) -> None:
        self.seen.append(self.name)
        if self.halt:
            from mitmproxy import exceptions

            raise exceptions.AddonHalt


class Silent:
    name = "silent"


class Container:
    """Like ScriptLoader: nested addons that may change after start-up."""

    name = "container"

    def __init__(self) -> None:
        self.addons: list[object] = []


async def test_hook_index_dispatches_in_order_to_handlers_and_containers() -> None:
    from mitmproxy.proxy.layers.http import HttpRequestHook
    from mitmproxy.test import tflow

    seen: list[str] = []
    m = fastdump.FastMaster(options.Options())
    try:
        container = Container()
        m.addons.add(Recorder("a", seen), Silent(), container, Recorder("b", seen))
        assert Silent not in [type(a) for a in m.addons._hooked("request")]
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        assert seen == ["a", "b"]
        container.addons.append(Recorder("nested", seen))  # a script loaded later is reached
        m.addons.add(Recorder("c", seen, halt=True), Recorder("d", seen))  # AddonHalt stops the rest
        seen.clear()
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        assert seen == ["a", "nested", "b", "c"]
    finally:
        m._termlog_addon.uninstall()  # type: ignore[union-attr]
