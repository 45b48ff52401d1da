"""The idempotency+latch failure drill through its seed entrypoint against a self-started stack:
Idempotency-Key under a retry storm and an edge kill -9; the safety latch holding and re-asserting
its mode, refusing releases short of approvers or with lag, surviving a ledger kill -9, released
by two approvers, audited."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STEPS = ("idem_replay", "idem_concurrent", "idem_conflict", "idem_edge_kill9", "latch_holds_mode",
         "latch_reasserted", "latch_release_refused", "latch_survives_ledger_kill9", "latch_released", "audited")


def test_idempotency_latch_failure_drill(tmp_path: Path) -> None:
    ev = tmp_path / "ev"
    env = {k: v for k, v in os.environ.items() if k != "SPOTEX_DATA_DIR"}
    res = subprocess.run([str(ROOT / "runbooks" / "idempotency_latch_failure.sh"), "--out", str(ev)],
                         capture_output=True, text=True, timeout=400, env=env)
    kv = dict(ln.split("=", 1) for ln in res.stdout.splitlines() if "=" in ln)
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["runbook_idempotency_latch_failure_ok"] == "true" and kv["recommended_action"] == "NONE"
    for step in STEPS:
        assert kv[f"idempotency_latch_{step}"] == "true", step
    s = json.loads((ev / "idempotency-latch-summary.json").read_text())
    p = s["probes"]
    assert s["idempotency_latch_ok"] is True and s["failed_step_count"] == 0
    # The storm: one order id among every 201, the rest told the original is still running.
    storm = p["idem_concurrent"]
    assert len(storm["order_ids"]) == 1 and storm["open_orders_after"] == storm["open_orders_before"] + 1
    assert set(storm["answers"]) <= {"201", "IDEMPOTENCY_IN_PROGRESS"}
    assert p["idem_edge_kill9"]["replay"][2] is True  # replayed by the restarted edge, from PostgreSQL
    assert p["latch_holds_mode"]["new_order"] == [409, "CANCEL_ONLY"] and p["latch_holds_mode"]["cancel"] == 200
    assert p["latch_reasserted"]["reassert_audit_seq"] > p["latch_reasserted"]["operator_audit_seq"]
    assert p["release_one_approver"]["code"] == "SECOND_APPROVER_REQUIRED"
    assert p["release_same_approver_twice"]["code"] == "SECOND_APPROVER_REQUIRED"
    assert p["release_ledger_paused"]["code"] == "LAG_NOT_ZERO" and p["release_ledger_paused"]["lag"] > 0
    assert p["latch_survives_ledger_kill9"]["latch"] == {"engaged": True, "mode": "CANCEL_ONLY"}
    assert p["release_two_approvers"]["code"] == "RELEASED" and p["latch_released"]["core_mode"] == "NORMAL"
    assert p["latch_released"]["refused_key_retried"] == [409, "CANCEL_ONLY", True]
    assert p["audit"]["latch_history"][0] == "engage" and p["audit"]["latch_history"][-1] == "release"
    assert p["audit"]["admin_chain"]["ok"] is True
    assert (ev / "status-before.json").exists() and (ev / "status-after.json").exists()
