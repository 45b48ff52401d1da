"""The Kafka fault drills against a real stack (small sizes): the fault must be seen while it lasts
and nothing may be missing in Kafka afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spotex.testing import spotex_cli


def _lines(out: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)


@pytest.mark.parametrize(("drill", "probe_key", "fault_s"), [
    ("redpanda-broker-bounce", "during_stop_broker_reachable", "3"),
    ("network-partition", "during_partition_broker_reachable", "3"),
])
def test_kafka_fault_drill(tmp_path: Path, drill: str, probe_key: str, fault_s: str) -> None:
    ev = tmp_path / "ev"
    # The load must outlast the fault (it starts ~1.7 s in; a bounce first lets the broker drain for up
    # to 2 s): 1500 commands at 300/s run 5 s. Less, and the drill rightly reports fault_observed=false.
    res = spotex_cli("drill", drill, "--commands", "1500", "--rate", "300", "--fault-seconds", fault_s,
                     "--out", str(ev), timeout=400)
    kv = _lines(res.stdout)
    key = drill.replace("-", "_")
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv[f"runbook_{key}_ok"] == "true" and kv["recommended_action"] == "NONE"
    assert kv[probe_key] == "false" and kv["fault_observed"] == "true"
    assert kv["export_missing"] == "0" and int(kv["export_backlog_max_during_fault"]) > 0
    s = json.loads((ev / f"{drill}-summary.json").read_text())
    assert s[f"{key}_ok"] is True and s["verify"]["unexpected"] == 0 and s["trading_unaffected"] is True
    if drill == "redpanda-broker-bounce":
        # The broker came back empty: exactly one loss detected and one re-export, nothing twice.
        assert kv["exporter_rewinds"] == "1"
    else:
        assert kv["exporter_rewinds"] == "0"  # a partition loses nothing: no re-export
    assert json.loads((ev / "chaos" / f"{drill}-latest.json").read_text()) == s
    assert (ev / "status-before.json").exists() and (ev / "status-after.json").exists()
