"""Every shell entrypoint of the seed manual (as RUNBOOK.md lists them; checked against the seed itself
when it is beside the repo) exists, is executable, and the thin shims reach the spotex command
RUNBOOK.md maps them to (asked for their --help, so nothing is started)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT.parent / "shared" / "seed" / "RUNBOOK.md"
# Each shim reaches this spotex verb: its --help names it.
EXPECT = {
    "./scripts/anomaly_detector.sh": "jobs run",
    "./scripts/anomaly_detector_smoke.sh": "drill game-day-anomaly",
    "./scripts/prove_budget_freshness.sh": "jobs run",
    "./scripts/prove_controls_freshness.sh": "jobs run",
    "./scripts/smoke_g0.sh": "smoke g0",
    "./scripts/smoke_g3.sh": "smoke g3",
    "./scripts/snapshot_verify.sh": "core verify-snapshot",
    "./scripts/verify_audit_chain.sh": "audit verify",
    "./scripts/chaos/core_kill_recover.sh": "drill core-kill-recover",
    "./scripts/chaos/ledger_kill_recover.sh": "drill ledger-kill-recover",
    "./scripts/chaos/network_partition.sh": "drill network-partition",
    "./scripts/chaos/redpanda_broker_bounce.sh": "drill redpanda-broker-bounce",
    "./runbooks/mapping_integrity_failure.sh": "drill mapping-integrity-failure",
    "./runbooks/idempotency_latch_failure.sh": "drill idempotency-latch-failure",
    "./runbooks/exactly_once_million_failure.sh": "drill exactly-once-million",
}


_ENTRY = r"\./(?:scripts|runbooks)/[A-Za-z0-9_/]+\.sh"


def _entrypoints(path: Path) -> set[str]:
    return set(re.findall(_ENTRY, path.read_text()))


def test_every_seed_entrypoint_exists_and_is_executable() -> None:
    ours = _entrypoints(ROOT / "RUNBOOK.md")
    assert len(ours) >= 40, sorted(ours)
    if SEED.exists():  # the manual itself, when the workspace has it: RUNBOOK.md leaves none out
        assert sorted(_entrypoints(SEED) - ours) == []
    assert sorted(p for p in ours if not (ROOT / p).is_file()) == []
    assert sorted(p for p in ours if not os.access(ROOT / p, os.X_OK)) == []


@pytest.mark.parametrize("entry", sorted(EXPECT))
def test_shim_reaches_its_spotex_command(entry: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SPOTEX_DATA_DIR", "SPOTEX_RUNBOOK_OUT")}
    res = subprocess.run([str(ROOT / entry), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"spotex {EXPECT[entry]}" in " ".join(res.stdout.split()), res.stdout
