"""Seed §8 DR rehearsal against a real stack: backup, restore elsewhere, replay, same state, invariants."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from spotex.testing import spotex_cli, stack

ROOT = Path(__file__).resolve().parents[2]


def _lines(out: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)


def test_dr_rehearsal_restores_the_same_state(tmp_path: Path) -> None:
    with stack(tmp_path / "stack") as st:
        out = tmp_path / "dr"
        env = {**os.environ, "SPOTEX_DATA_DIR": str(st.data_dir), "SPOTEX_RUNBOOK_OUT": str(out)}
        res = subprocess.run([str(ROOT / "scripts" / "dr_rehearsal.sh"), "--commands", "240", "--rate", "300"],
                             capture_output=True, text=True, env=env, timeout=400)
        kv = _lines(res.stdout)
        assert res.returncode == 0, res.stdout + res.stderr
        assert kv["dr_rehearsal_ok"] == "true"
        report = json.loads((out / "dr-report.json").read_text())
        assert report["data_dir"] == str(st.data_dir)  # the running stack, not a private one
        for key in ("restore_time_ms", "replay_time_ms", "verify_time_ms", "rto_ms"):
            assert isinstance(report[key], int) and report[key] >= 0, key
        assert report["invariant_violations"] == 0 and report["invariants"]["scope"] == "full"
        assert report["rpo_lost_records"] == 0 and report["rpo_ok"] and report["rto_ok"]
        # The live leader took a snapshot after the base (as the hourly snapshot_verify check does);
        # the restore still started from the base snapshot and replayed the shipped WAL after it.
        assert report["live_snapshot"]["snapshot_seq"] > report["base_backup"]["snapshot_seq"], report["live_snapshot"]
        rc = report["restored_core"]
        assert rc["snapshot_seq"] == report["base_backup"]["snapshot_seq"]
        assert 0 < rc["snapshot_seq"] < rc["last_seq"] and rc["replayed"] == rc["last_seq"] - rc["snapshot_seq"]
        assert report["source"]["ledger"]["rows"]["ledger_trades"] > 0
        assert report["restored_ledger"] == report["source"]["ledger"]
        assert report["ledger_totals_vs_restored_core"]["equal"]
        # Independent check: the live stack's own offline replay lands on the reported hash and seq.
        live = json.loads(st.cli("core", "hash", "--json", check=True).stdout)
        assert (live["last_seq"], live["state_hash"]) == (report["core_seq"], report["state_hash"])
        assert report["restore_dir"] is None and (out / "status-after.json").exists()

        # A target the restore cannot meet fails the rehearsal: non-zero, one reason, the report says so.
        out2 = tmp_path / "dr-fail"
        res = spotex_cli("drill", "dr-rehearsal", "--commands", "40", "--out", str(out2), "--data-dir",
                         str(st.data_dir), timeout=400, env={"SPOTEX_DR__RTO_TARGET_S": "0"})
        kv = _lines(res.stdout)
        assert res.returncode == 1, res.stdout + res.stderr
        assert kv["dr_rehearsal_ok"] == "false" and kv["dr_rehearsal_failed"].startswith("RTO ")
        failed = json.loads((out2 / "dr-report.json").read_text())
        assert failed["dr_rehearsal_ok"] is False and failed["rto_ok"] is False
        assert failed["state_hash_matches_source"] is True and failed["invariant_violations"] == 0
