"""The adversarial reliability bundle (seed §4.9) at its smallest, through its seed entrypoint, against
a self-started stack; and the diagnostic mode's contract on the recommended action."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from runbooks.adversarial import STEPS, recommended_action

ROOT = Path(__file__).resolve().parents[2]


def test_recommended_action_order() -> None:
    assert recommended_action([]) == "NONE"
    assert recommended_action(["candle", "exactly_once"]) == "WITHDRAW_HALT"
    assert recommended_action(["candle", "ws_resume"]) == "INVESTIGATE_WS_RESUME"


def test_adversarial_reliability_bundle(tmp_path: Path) -> None:
    ev = tmp_path / "ev"
    env = {k: v for k, v in os.environ.items() if k not in ("SPOTEX_DATA_DIR", "RUNBOOK_ALLOW_ADVERSARIAL_FAIL")}
    res = subprocess.run([str(ROOT / "runbooks" / "adversarial_reliability.sh"), "--out", str(ev), "--eo-trades",
                          "500"], capture_output=True, text=True, timeout=900, env=env)
    kv = dict(ln.split("=", 1) for ln in res.stdout.splitlines() if "=" in ln)
    assert res.returncode == 0 and kv["runbook_adversarial_reliability_ok"] == "true", res.stdout + res.stderr
    for step in STEPS:
        assert kv[f"adversarial_{step}"] == "true", step
    s = json.loads((ev / "adversarial-reliability-summary.json").read_text())
    assert s["adversarial_ok"] is True and s["failed_step_count"] == 0 and s["recommended_action"] == "NONE"
    t = json.loads((ev / "adversarial" / "adversarial-tests-latest.json").read_text())["steps"]
    assert t["policy"]["success_line_seen"] and (ev / "policy-tamper" / "policy-tamper-summary.json").exists()
    assert t["ws_resume"]["success_line_seen"] and (ev / "ws-resume-gap-spike" / "ws-resume-smoke.json").exists()
    assert t["exactly_once"]["trades"] == 500
    assert json.loads((ev / "exactly-once" / "exactly-once-million-summary.json").read_text())["duplicates"] == 0
    cases = t["snapshot"]["cases"]
    assert cases["intact"]["verified"] is True
    for bad in ("payload_byte_flipped", "truncated", "sidecar_other_digest"):
        assert cases[bad]["verified"] is False and cases[bad]["refused"] is True, bad
    http = t["candle"]["http_cases"]
    assert all(c["ok"] for c in http.values()) and http["unknown_symbol"]["code"] == "UNKNOWN_SYMBOL"
    assert http["limit_30_digits"]["status"] == 400 and t["candle"]["pytest"]["rc"] == 0
    assert (ev / "status-before.json").exists() and (ev / "status-after.json").exists()
