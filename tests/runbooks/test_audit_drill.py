"""Seed §4.6: the audit-chain tamper drill against a real stack."""

from __future__ import annotations

import json
from pathlib import Path

from spotex.testing import spotex_cli


def test_audit_chain_tamper_drill(tmp_path: Path) -> None:
    res = spotex_cli("drill", "audit-chain-tamper", "--out", str(tmp_path / "ev"), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "runbook_audit_tamper_ok=true"
    summary = json.loads((tmp_path / "ev" / "audit-chain-tamper-summary.json").read_text())
    assert summary["baseline_ok"] is True and summary["tamper_detected"] is True
    assert {k: v["kind"] for k, v in summary["cases"].items()} == {
        "changed": "changed", "missing": "missing", "reordered": "reordered", "truncated": "missing"}
    for name in ("status-before.json", "status-after.json", "audit-chain-copy.jsonl"):
        assert (tmp_path / "ev" / name).exists()
