"""The shared verification bundle through its seed entrypoint against a self-started stack: the quick
checks plus two drills (startup guardrails, mapping integrity), and the verdict logic (a drill whose
entrypoint is not in the checkout is not_available, never a pass)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import runbooks.verification_factory as vf
from runbooks.verification_factory import StepResult, build_report

ROOT = Path(__file__).resolve().parents[2]
QUICK = ("status_before", "audit_self_test_change", "audit_admin", "audit_change", "pii_scan", "ledger_invariants",
         "export_verify", "jobs_invariants", "jobs_anomaly", "safety_budget", "status_after")


def test_verdict_needs_every_step_passed() -> None:
    ok = StepResult("a", "quick", ["x"], "passed")
    assert build_report([ok], {})["verification_factory_ok"] is True
    na = StepResult("m", "drill", ["y"], "not_available", reason="no such drill")
    rep = build_report([ok, na], {})
    assert rep["verification_factory_ok"] is False and rep["not_available_steps"] == ["m"]
    rep = build_report([ok, StepResult("b", "quick", ["z"], "failed")], {})
    assert rep["verification_factory_ok"] is False and rep["failed_steps"] == ["b"]
    assert build_report([], {})["verification_factory_ok"] is False


def test_a_drill_missing_from_the_checkout_is_not_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(vf.DRILLS, "startup-guardrails", ("startup-guardrails", "runbooks/no_such_drill.sh",
                                                          "runbook_startup_guardrails_ok=true"))
    [step] = vf.drill_steps(["startup-guardrails"], tmp_path, tmp_path / "rb", 1000)
    r = vf.run_step(step)
    assert r.status == "not_available" and r.exit_code is None and "no_such_drill.sh" in (r.reason or "")
    assert build_report([r], {})["not_available_steps"] == ["startup-guardrails"]


def test_factory_quick_checks_and_one_drill(tmp_path: Path) -> None:
    out, rb = tmp_path / "verification", tmp_path / "runbooks"
    # The default budgets plus the load-regression ones need evidence this test does not produce; the
    # factory's safety_budget check is pointed at a budgets file of the stack's own always-on evidence.
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps({"budgets": [
        {"name": "invariants_ok", "evidence": "jobs/invariants-latest.json", "field": "ok", "op": "==",
         "limit": True, "max_age_s": 900, "action": "WITHDRAW_HALT"},
        {"name": "export_complete", "evidence": "jobs/export-verify-latest.json", "field": "missing", "op": "<=",
         "limit": 0, "max_age_s": 900, "action": "INVESTIGATE"}]}))
    env = {k: v for k, v in os.environ.items() if k not in ("SPOTEX_DATA_DIR", "SPOTEX_RUNBOOK_OUT")}
    res = subprocess.run([str(ROOT / "scripts" / "verification_factory.sh"), "--out", str(out), "--runbooks-out",
                          str(rb), "--budgets", str(budgets), "--run-startup-guardrails",
                          "--run-mapping-integrity-runbook"], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    kv = dict(ln.split("=", 1) for ln in res.stdout.splitlines() if "=" in ln)
    assert res.returncode == 0 and kv["verification_factory_ok"] == "true", res.stdout + res.stderr
    assert kv["verification_factory_failed_steps"] == "-", res.stdout
    assert kv["verification_factory_not_available"] == "-"
    latest = json.loads((out / "verification-factory-latest.json").read_text())
    assert Path(kv["verification_factory_report"]).read_text() == (out / "verification-factory-latest.json").read_text()
    steps = {s["name"]: s for s in latest["steps"]}
    assert latest["self_started"] is True and latest["selected"] == ["startup-guardrails", "mapping-integrity-runbook"]
    for name in (*QUICK, "startup-guardrails"):
        s = steps[name]
        assert s["status"] == "passed" and s["exit_code"] == 0 and s["seconds"] >= 0, s
    g = steps["startup-guardrails"]
    assert g["success_line"] == "runbook_startup_guardrails_ok=true" and g["success_line_seen"] is True
    assert str(rb / "startup-guardrails" / "startup-guardrails-summary.json") in g["evidence"]
    assert steps["pii_scan"]["success_line_seen"] is True
    m = steps["mapping-integrity-failure"]
    assert m["status"] == "passed" and m["success_line"] == "runbook_mapping_integrity_failure_ok=true"
    assert m["success_line_seen"] is True
    assert str(rb / "mapping-integrity-failure" / "mapping-integrity-summary.json") in m["evidence"]
    # The audit chains were verified with events in them (the self-test change put them there).
    for chain in ("admin", "change"):
        v = json.loads((out / "checks" / f"audit-{chain}.json").read_text())
        assert v["ok"] is True and v["count"] >= 1
    assert json.loads((out / "status-after.json").read_text())["healthy"] is True
    assert json.loads((out / "checks" / "ledger-invariants.json").read_text())["ok"] is True


def test_factory_refuses_a_stack_that_is_not_running(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "spotex", "drill", "verification-factory", "--data-dir",
                          str(tmp_path / "nothing"), "--out", str(tmp_path / "v")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and "no healthy stack" in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "v" / "verification-factory-latest.json").exists()
    res = subprocess.run([sys.executable, "-m", "spotex", "drill", "verification-factory", "--run", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "nope" in res.stderr
