"""The change workflow drill (seed §4.7) through its seed entrypoint against a self-started stack, in
the full-verification mode: proposal, the four refusals, two approvals, apply verified (effects,
invariants, both audit chains), a trader's order refused CANCEL_ONLY at the edge, re-apply refused,
the revert leaving the symbol as found (orders accepted again), and the change chain verified with
every step in it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("proposed", "refused_unapproved", "refused_self_approval", "refused_duplicate_approval", "refused_tampered",
         "approved", "applied_verified", "edge_cancel_only", "refused_reapply", "reverted", "edge_orders_after_revert",
         "change_chain_verified")


def test_change_workflow_drill_full_verification(tmp_path: Path) -> None:
    ev = tmp_path / "ev"
    env = {k: v for k, v in os.environ.items() if k != "SPOTEX_DATA_DIR"}
    env["RUNBOOK_SKIP_VERIFICATION"] = "false"
    res = subprocess.run([str(ROOT / "runbooks" / "change_workflow.sh"), "--out", str(ev)],
                         capture_output=True, text=True, timeout=400, env=env)
    kv = dict(ln.split("=", 1) for ln in res.stdout.splitlines() if "=" in ln)
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["runbook_change_workflow_ok"] == "true" and kv["change_workflow_skip_verification"] == "false"
    s = json.loads((ev / "change-workflow-summary.json").read_text())
    assert s["change_workflow_ok"] is True and s["failed_steps"] == [] and s["recommended_action"] == "NONE"
    st = s["steps"]
    assert all(st[name]["ok"] is True for name in STEPS)
    assert "CHANGE_TAMPERED" in st["refused_tampered"]["stderr"] and st["refused_tampered"]["throttle_untouched"]
    applied = st["applied_verified"]
    assert applied["state_after"] == [{"throttle": {"orders_per_s": 5, "burst": 5}}, {"mode": "CANCEL_ONLY"}]
    assert [e["action"] for e in applied["admin_entries"]] == ["SetSymbolThrottle", "SetSymbolMode"]
    assert all(applied["checks"][k]["ok"] for k in ("invariants", "audit_admin", "audit_change"))
    assert st["edge_cancel_only"]["probe"]["statuses"].get("CANCEL_ONLY", 0) >= 1
    assert st["edge_orders_after_revert"]["burst"]["statuses"] == {"201": 2}
    assert st["reverted"]["state_after"] == st["reverted"]["state_before"] == applied["state_before"]
    files = sorted(ev.glob("verify-change-audit-chain-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["result"]["ok"] is True
    assert (ev / "status-before.json").exists() and (ev / "status-after.json").exists()
