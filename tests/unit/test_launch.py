"""scripts/run's argument handling (mitmcache.launch.plan): which --set options it adds and
whether it starts local Valkey nodes. Pure functions, no processes."""

from __future__ import annotations

import pytest

from mitmcache.launch import DEFAULT_NODES, Plan, UsageError, _redacted, mitmdump_command, plan, user_sets

MODE = ["--mode", "reverse:http://127.0.0.1:8000", "-p", "8080"]
URL = "valkey://10.0.0.5:6379"


def sets_in(cmd: list[str], name: str) -> list[str]:
    """Every value the command line gives option ``name``, in either --set form."""
    values = []
    for i, arg in enumerate(cmd):
        spec = cmd[i + 1] if arg == "--set" and i + 1 < len(cmd) else arg.removeprefix("--set=") if arg.startswith("--set=") else None
        if spec is not None and spec.partition("=")[0] == name:
            values.append(spec.partition("=")[2])
    return values


def test_default_starts_three_local_nodes_and_forces_lazy() -> None:
    assert plan(MODE) == Plan({"connection_strategy": "lazy"}, DEFAULT_NODES, MODE)
    assert DEFAULT_NODES == 3


def test_nodes_flag() -> None:
    assert plan(["--nodes", "1", *MODE]).local_nodes == 1


@pytest.mark.parametrize("n", ["0", "-2"])
def test_nodes_below_one_is_an_error(n: str) -> None:
    with pytest.raises(UsageError, match="--nodes must be at least 1"):
        plan(["--nodes", n])


def test_valkey_urls_flag() -> None:
    p = plan(["--valkey-urls", URL, *MODE])
    assert p == Plan({"connection_strategy": "lazy", "cache_valkey_urls": URL}, 0, MODE)


def test_l1_only_flag() -> None:
    p = plan(["--l1-only", *MODE])
    assert p == Plan({"connection_strategy": "lazy"}, 0, MODE)


@pytest.mark.parametrize(
    "user",
    [
        ["--set", f"cache_valkey_urls={URL}"],
        [f"--set=cache_valkey_urls={URL}"],
    ],
)
def test_users_own_cache_valkey_urls_wins_without_local_nodes(user: list[str]) -> None:
    argv = [*MODE, *user]
    sets, local_nodes, passthrough, *_ = plan(argv)
    assert local_nodes == 0
    assert "cache_valkey_urls" not in sets
    assert passthrough == argv
    cmd = mitmdump_command(passthrough, sets)
    assert sets_in(cmd, "cache_valkey_urls") == [URL]  # exactly once: the user's
    assert sets_in(cmd, "connection_strategy") == ["lazy"]


@pytest.mark.parametrize("user", [["--set", "cache_valkey_urls="], ["--set=cache_valkey_urls="]])
def test_users_empty_cache_valkey_urls_means_l1_only(user: list[str]) -> None:
    sets, local_nodes, passthrough, *_ = plan([*user, *MODE])
    assert local_nodes == 0
    assert sets_in(mitmdump_command(passthrough, sets), "cache_valkey_urls") == [""]


def test_url_value_with_equals_signs_is_kept_whole() -> None:
    url = "valkey://:pa=ss@10.0.0.5:6379/2"
    sets, local_nodes, passthrough, *_ = plan(["--set", f"cache_valkey_urls={url}"])
    assert local_nodes == 0
    assert sets_in(mitmdump_command(passthrough, sets), "cache_valkey_urls") == [url]


@pytest.mark.parametrize("user", [["--set", "connection_strategy=eager"], ["--set=connection_strategy=lazy"]])
def test_users_connection_strategy_is_not_duplicated(user: list[str]) -> None:
    sets, local_nodes, passthrough, *_ = plan([*MODE, *user])
    assert "connection_strategy" not in sets
    assert local_nodes == DEFAULT_NODES  # unrelated to the Valkey choice
    assert len(sets_in(mitmdump_command(passthrough, sets), "connection_strategy")) == 1


def test_other_sets_do_not_change_the_plan() -> None:
    argv = ["--set", "cache_metrics_port=9090", "--set=cache_l1_ttl=5", *MODE]
    assert plan(argv) == Plan({"connection_strategy": "lazy"}, DEFAULT_NODES, argv)


def test_an_option_merely_named_like_ours_is_not_ours() -> None:
    # "cache_valkey_urls_x" is another (unknown) option; a value mentioning the name is not a --set.
    argv = ["--set", "cache_valkey_urls_x=1", "--mode", "reverse:http://h/cache_valkey_urls=1"]
    assert plan(argv).local_nodes == DEFAULT_NODES


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--valkey-urls", URL], "--valkey-urls"),
        (["--l1-only"], "--l1-only"),
        (["--nodes", "2"], "--nodes"),
    ],
)
@pytest.mark.parametrize("form", [["--set", f"cache_valkey_urls={URL}"], [f"--set=cache_valkey_urls={URL}"]])
def test_launcher_flag_and_users_set_together_are_an_error(flags: list[str], flag: str, form: list[str]) -> None:
    with pytest.raises(UsageError) as e:
        plan([*flags, *MODE, *form])
    message = str(e.value)
    assert "\n" not in message
    assert flag in message and "cache_valkey_urls" in message


def test_bare_set_without_value_is_an_error() -> None:
    with pytest.raises(UsageError, match="needs a value"):
        plan(["--set", "cache_valkey_urls"])


def test_main_reports_the_conflict_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from mitmcache.launch import main

    assert main(["--valkey-urls", URL, "--set", f"cache_valkey_urls={URL}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scripts/run: error: --valkey-urls and --set cache_valkey_urls")


def test_user_sets_forms() -> None:
    assert user_sets(["--set", "a=1", "--set=b=2=3", "--set", "c", "-p", "8080", "--set"]) == {
        "a": "1", "b": "2=3", "c": None,
    }


def test_listen_host_default_only_when_not_given() -> None:
    assert mitmdump_command([], {})[3:5] == ["--listen-host", "127.0.0.1"]
    for given in (["--listen-host", "0.0.0.0"], ["--listen-host=0.0.0.0"]):
        assert mitmdump_command(given, {}).count("127.0.0.1") == 0


def test_passwords_are_redacted_in_both_forms() -> None:
    cmd = ["--set", "cache_valkey_urls=valkey://:s3cret@h:1,valkeys://u:pw@h:2/3", "--set=cache_valkey_urls=valkey://:s3cret@h:1"]
    shown = " ".join(_redacted(cmd))
    assert "s3cret" not in shown and "pw@" not in shown
    assert "valkey://***@h:1/0" in shown and "valkeys://***@h:2/3" in shown


def test_fast_launcher_is_the_default_and_stock_is_a_flag() -> None:
    assert plan(MODE).stock is False and plan(MODE).uvloop is True
    assert plan(["--stock", *MODE]) == Plan({"connection_strategy": "lazy"}, DEFAULT_NODES, MODE, stock=True)
    assert plan(["--no-uvloop", "--l1-only", *MODE]).uvloop is False


def test_no_uvloop_with_stock_is_an_error() -> None:
    with pytest.raises(UsageError, match="--no-uvloop"):
        plan(["--stock", "--no-uvloop"])
