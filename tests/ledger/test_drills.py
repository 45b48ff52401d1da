"""The ledger drills end to end, small: seed §4.1 "Ledger only" on a whole stack, and the
exactly-once proof with 2,000 trades and 10 kill -9 points (the million is run by hand)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from spotex.testing import spotex_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ledger_kill_recover_drill(tmp_path: Path) -> None:
    out = tmp_path / "evidence"
    res = spotex_cli("drill", "ledger-kill-recover", "--out", str(out), "--commands", "1500", "--rate", "500",
                     timeout=400)
    lines = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    assert res.returncode == 0, res.stdout + res.stderr
    assert lines["ledger_kill_recover_ok"] == "true" and lines["ok"] == "true"
    assert lines["ledger_duplicate_rows"] == "0"
    assert lines["ledger_trade_rows"] == lines["generated_trades"] and int(lines["generated_trades"]) > 0
    summary = json.loads((out / "ledger-kill-recover-summary.json").read_text())
    assert summary["kills"] and summary["balance_differences_vs_core"] == []
    assert (out / "status-before.json").exists() and (out / "status-after.json").exists()


@pytest.mark.slow
def test_exactly_once_million_drill_small(tmp_path: Path) -> None:
    out = tmp_path / "eom"
    # Through the seed's entrypoint (runbooks/exactly_once_million_failure.sh), at a small size.
    res = subprocess.run([str(ROOT / "runbooks" / "exactly_once_million_failure.sh"), "--trades", "2000",
                          "--kills", "10", "--out", str(out), "--dup-deliveries", "300"],
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exactly_once_million_ok=true" in res.stdout
    s = json.loads((out / "exactly-once-million-summary.json").read_text())
    assert s["kill_count"] >= 10 and s["forced_full_redeliveries"] >= 1
    # Most kills land while trades are still being published (a slow restart may push the last
    # ones past the end of the paced feed).
    assert sum(k["while_trades_flowing"] for k in s["kills"]) >= 5
    at = [k["settled_events_at_kill"] for k in s["kills"]]
    assert at == sorted(at)
    # While trades flow, each kill lands after the restarted process made progress; once the paced
    # feed is done and everything settled (a slow machine), the remaining kills land at the end.
    flowing = [k["settled_events_at_kill"] for k in s["kills"] if k["while_trades_flowing"]]
    assert flowing == sorted(set(flowing))
    assert all(v >= s["events"] for v in at if at.count(v) > 1)  # repeats only once all was settled
    assert s["duplicates"] == 0 and s["gaps"] == [] and s["balances_equal_core"]
    assert s["ledger_trade_rows"] == 2001 and s["duplicate_delivery"]["journal_rows"] == 1
    assert set(s["engine_checkpoints"]) == {"match"}
