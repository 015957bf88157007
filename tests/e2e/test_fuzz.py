"""A short seeded run of the fuzzing harness (scripts/fuzz.py): its own origin, a 3-node Valkey
ring, two real mitmdump proxies, 300 raw-socket exchanges.

The harness checks every response against what the origin recorded sending; this test asserts
what must never happen: an addon error, a 5xx the origin did not send (a 504 for only-if-cached
excepted), an answer made for another target / authority / method / variant, a Set-Cookie handed
to a client whose request did not fetch it, a private / no-store / Vary: * answer made for
another request, a 5xx that replaced a stored response. On failure the message is the harness's
report: each kind with up to 10 examples (raw request bytes, what came back, the origin's
answer). To reproduce one, ``.venv/bin/python scripts/fuzz.py --seed 1 --exchanges 300 --only
s1-17,s1-42`` sends just those exchanges of the same plan.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED, EXCHANGES = 1, 300


def load_fuzz() -> ModuleType:
    """scripts/ is not a package: load scripts/fuzz.py by its path."""
    name = "mitmcache_fuzz_harness"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(110)
def test_seeded_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    fuzz = load_fuzz()
    # 30 exchanges a second: the run lasts ~10 s, so 1–3 s lifetimes expire and get revalidated.
    result = fuzz.run(seed=SEED, exchanges=EXCHANGES, proxies=2, time_limit=45, rate=30, tmp=tmp_path)
    report = result.summary()
    assert result.sent == EXCHANGES, report
    assert result.counts["addon-error"] == 0, report
    assert result.counts["proxy-5xx"] == 0, report
    assert result.counts["wrong-answer"] == 0, report
    assert result.counts["cookie-leak"] == 0, report
    assert result.counts["shared-private"] == 0, report
    assert result.counts["5xx-over-stored"] == 0, report
    assert not result.failed, report
    assert result.origin_requests > 0 and result.cache_status["HIT"] > 0, report  # it did exercise the cache
