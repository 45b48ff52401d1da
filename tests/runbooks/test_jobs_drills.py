"""The lag-spike drill against a real stack: ledger paused under load, the settlement_lag job's policy
(a symbol throttle past T2, seen at the edge as 429 SYMBOL_THROTTLED; SOFT_HALT past T3, seen as
MARKET_HALTED; audited as jobs:settlement_lag), then recovery (both lifted, orders flow)."""

from __future__ import annotations

import json
from pathlib import Path

from spotex.testing import spotex_cli


def _lines(out: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)


def test_lag_spike(tmp_path: Path) -> None:
    res = spotex_cli("drill", "lag-spike", "--out", str(tmp_path / "ev"), timeout=400)
    kv = _lines(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["runbook_lag_spike_ok"] == "true" and kv["recommended_action"] == "NONE"
    for step in ("baseline_clear", "t2_throttle", "t3_soft_halt", "recovered", "every_action_audited"):
        assert kv[f"lag_spike_{step}"] == "true", step
    s = json.loads((tmp_path / "ev" / "lag-spike-summary.json").read_text())
    entries = s["policy_audit_entries"]
    modes = [e["params"]["mode"] for e in entries if e["action"] == "SetSymbolMode"]
    assert "SOFT_HALT" in modes and "NORMAL" in modes and "CANCEL_ONLY" not in modes
    assert {"SetSymbolThrottle", "ClearSymbolThrottle"} <= {e["action"] for e in entries}
    assert s["edge_probes"]["t2"]["seen"] and s["edge_probes"]["t2"]["want"] == "SYMBOL_THROTTLED"
    assert s["edge_probes"]["t3"]["seen"] and s["edge_probes"]["t3"]["want"] == "MARKET_HALTED"
    assert s["edge_probes"]["recovery"] and all(p["flowing"] for p in s["edge_probes"]["recovery"].values())
    assert all(e["actor"] == "jobs:settlement_lag" for e in s["policy_audit_entries"])
    assert s["phases"]["recovery"]["imposed"] == {} and s["phases"]["recovery"]["throttled"] == {}
    assert s["ledger_latches_engaged"] == []
    assert (tmp_path / "ev" / "status-before.json").exists() and (tmp_path / "ev" / "status-after.json").exists()
