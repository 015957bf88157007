"""Every documented label value exports a zero sample from start-up (README, "Metrics")."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from mitmcache import metrics as m
from mitmcache.semantics import NotStorable


def samples() -> dict[str, float]:
    out: dict[str, float] = {}
    for line in generate_latest(m.Metrics().registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


DOCUMENTED = (
    [f'mitmcache_requests_total{{result="{v}"}}' for v in ("hit", "miss", "stale", "revalidated")]
    + [f'mitmcache_revalidations_total{{outcome="{v}"}}' for v in ("304", "200", "error", "skipped")]
    + [f'mitmcache_stores_total{{tier="{v}"}}' for v in ("l1", "l2")]
    + [
        f'mitmcache_bad_input_total{{kind="{v}"}}'
        for v in ("cache-control", "date", "expires", "last-modified", "age", "valkey-value", "304-mismatch")
    ]
    + [
        f'mitmcache_not_stored_total{{reason="{v}"}}'
        # README "Telling what happened": the reasons a response was not stored.
        for v in ("no-store", "request-no-store", "private", "authorization", "set-cookie", "vary-star",
                  "too-large", "no-freshness", "method", "status", "incomplete", "too-large-for-l1")
    ]
    + [f'mitmcache_valkey_op_seconds_count{{op="{v}"}}' for v in ("get", "set", "delete", "lease", "release", "poll", "index")]
    + [f'mitmcache_valkey_op_seconds_sum{{op="{v}"}}' for v in ("get", "set", "delete", "lease", "release", "poll", "index")]
    + [f'mitmcache_ring_members{{state="{v}"}}' for v in ("up", "down")]
)


@pytest.mark.parametrize("sample", DOCUMENTED)
def test_documented_sample_is_zero_from_the_start(sample: str) -> None:
    assert samples().get(sample) == 0.0, sample


def test_every_not_storable_reason_is_pre_initialised() -> None:
    s = samples()
    for reason in NotStorable:
        assert s.get(f'mitmcache_not_stored_total{{reason="{reason.value}"}}') == 0.0, reason


def test_label_tuples_are_the_documented_ones() -> None:
    assert m.REQUEST_RESULTS == ("hit", "miss", "stale", "revalidated")
    assert m.REVALIDATION_OUTCOMES == ("304", "200", "error", "skipped")
    assert m.STORE_TIERS == ("l1", "l2")
    assert m.BAD_INPUT_KINDS == ("cache-control", "date", "expires", "last-modified", "age", "valkey-value", "304-mismatch")
    assert set(m.NOT_STORED_REASONS) == {r.value for r in NotStorable} | {"no-freshness", "too-large-for-l1", "l2-down"}
    assert len(m.NOT_STORED_REASONS) == len(set(m.NOT_STORED_REASONS))
    assert m.VALKEY_OPS == ("get", "set", "delete", "lease", "release", "poll", "index")
    assert m.RING_STATES == ("up", "down")
    assert m.INVALIDATION_DROP_CAUSES == ("key", "flush")
    assert m.PURGE_KINDS == ("url", "tag", "prefix")
    assert m.PURGE_MODES == ("hard", "soft")
    assert m.INDEX_KINDS == ("tag", "host")


def test_every_tuple_value_renders_a_zero_sample() -> None:
    s = samples()
    for metric, label, values in (
        ("mitmcache_requests_total", "result", m.REQUEST_RESULTS),
        ("mitmcache_not_stored_total", "reason", m.NOT_STORED_REASONS),
        ("mitmcache_revalidations_total", "outcome", m.REVALIDATION_OUTCOMES),
        ("mitmcache_stores_total", "tier", m.STORE_TIERS),
        ("mitmcache_bad_input_total", "kind", m.BAD_INPUT_KINDS),
        ("mitmcache_valkey_op_seconds_count", "op", m.VALKEY_OPS),
        ("mitmcache_ring_members", "state", m.RING_STATES),
        ("mitmcache_l1_invalidation_drops_total", "cause", m.INVALIDATION_DROP_CAUSES),
        ("mitmcache_purged_keys_total", "kind", m.PURGE_KINDS),
        ("mitmcache_index_full_total", "index", m.INDEX_KINDS),
    ):
        for v in values:
            assert s.get(f'{metric}{{{label}="{v}"}}') == 0.0, (metric, v)


def test_every_purge_kind_and_mode_renders_a_zero_sample() -> None:
    s = samples()
    for kind in m.PURGE_KINDS:
        for mode in m.PURGE_MODES:
            assert s.get(f'mitmcache_purges_total{{kind="{kind}",mode="{mode}"}}') == 0.0, (kind, mode)
    for name in ("mitmcache_l1_invalidations_received_total", "mitmcache_invalidation_listener_reconnects_total",
                 "mitmcache_invalidation_listener_flushes_total", "mitmcache_purge_denied_total",
                 "mitmcache_invalidation_delay_seconds_count"):
        assert s.get(name) == 0.0, name


def test_two_instances_do_not_share_counts() -> None:
    a, b = m.Metrics(), m.Metrics()
    a.requests.labels("hit").inc()
    text = generate_latest(b.registry).decode()
    assert 'mitmcache_requests_total{result="hit"} 0.0' in text
