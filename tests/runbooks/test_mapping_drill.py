"""The mapping integrity failure drill through its seed entrypoint: a market's lot size drifted between
the configuration and the engine is caught before deploy, refused by the edge once deployed (409
MARKET_MAPPING_MISMATCH, cancels pass, other markets trade), and repaired."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("baseline", "detected_before_deploy", "edge_refuses_drifted_market", "repaired")


def test_mapping_integrity_failure_drill(tmp_path: Path) -> None:
    ev = tmp_path / "ev"
    env = {k: v for k, v in os.environ.items() if k not in ("SPOTEX_DATA_DIR", "SPOTEX_RUNBOOK_OUT")}
    res = subprocess.run([str(ROOT / "runbooks" / "mapping_integrity_failure.sh"), "--out", str(ev)],
                         capture_output=True, text=True, timeout=400, env=env)
    kv = dict(ln.split("=", 1) for ln in res.stdout.splitlines() if "=" in ln)
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["runbook_mapping_integrity_failure_ok"] == "true" and kv["recommended_action"] == "NONE"
    for step in STEPS:
        assert kv[f"mapping_integrity_{step}"] == "true", step
    s = json.loads((ev / "mapping-integrity-summary.json").read_text())
    p = s["probes"]
    assert p["deployed"]["order"][:2] == [409, "MARKET_MAPPING_MISMATCH"] and p["symbol"] in p["deployed"]["order"][2]
    assert p["deployed"]["cancel_resting"] == 200 and p["deployed"]["other_market_order"][0] == 201
    assert "lot_size" in p["deployed"]["core_mismatch_fields"] and p["repaired"]["order"][0] == 201
    before = json.loads((ev / "mapping-check-before-deploy.json").read_text())
    assert before["recommended_action"] == "HOLD_DEPLOY_FIX_CONFIG" and before["mismatched_markets"] == [p["symbol"]]
    assert json.loads((ev / "mapping-check-repaired.json").read_text())["mapping_integrity_ok"] is True
    # The stack's configuration file ends as it began.
    assert (ev / "config-deployed.toml").read_text() == (ev / "config-original.toml").read_text()
    assert (ev / "status-before.json").exists() and (ev / "status-after.json").exists()
