"""The core drills against a real stack: kill -9 under load, and split brain by SIGSTOP."""

from __future__ import annotations

import json
from pathlib import Path

from spotex.testing import spotex_cli


def _lines(out: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)


def test_core_kill_recover(tmp_path: Path) -> None:
    res = spotex_cli("drill", "core-kill-recover", "--commands", "1500", "--rate", "500",
                     "--out", str(tmp_path / "ev"), timeout=300)
    kv = _lines(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["core_kill_recover_ok"] == "true"
    assert kv["core_recovery_hash"] == kv["core_precrash_wal_hash"]
    assert kv["lost_acked_commands"] == "0" and kv["duplicate_commands"] == "0"
    summary = json.loads((tmp_path / "ev" / "core-kill-recover-summary.json").read_text())
    assert summary["commands_acked"] > 0 and summary["core_recovery_seq"] > 0
    assert (tmp_path / "ev" / "status-before.json").exists() and (tmp_path / "ev" / "status-after.json").exists()
    # The drill's private stack is gone, its service logs are kept with the evidence.
    assert '"msg":"recovered"' in (tmp_path / "ev" / "stack-logs" / "core.log").read_text()


def test_split_brain_is_fenced(tmp_path: Path) -> None:
    res = spotex_cli("drill", "split-brain", "--commands", "10000", "--rate", "700",
                     "--out", str(tmp_path / "ev"), timeout=300)
    kv = _lines(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["split_brain_ok"] == "true"
    assert int(kv["fencing_rejections"]) >= 1
    assert kv["stale_events_on_evt"] == "0"
    assert int(kv["new_token"]) > int(kv["old_token"])
    summary = json.loads((tmp_path / "ev" / "split-brain-summary.json").read_text())
    assert summary["tokens_increase"] and summary["lost_acked_commands"] == 0
    assert summary["episodes"][-1]["outcome"] == "write refused: FENCING_TOKEN"


def test_startup_guardrails_drill(tmp_path: Path) -> None:
    res = spotex_cli("drill", "startup-guardrails", "--out", str(tmp_path / "ev"), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    kv = _lines(res.stdout)
    for key in ("core_guardrails_ok", "edge_guardrails_tests_ok", "ledger_guardrails_tests_ok",
                "runbook_startup_guardrails_ok"):
        assert kv[key] == "true", key
