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
