"""`spotex smoke g0` / `spotex smoke g3` (seed §5, §5.1) against a real stack, as an operator runs them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotex.testing import Stack, stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("smoke") / "stack") as s:
        yield s


def _lines(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.parametrize("gate", ["g0", "g3"])
def test_smoke_passes(st: Stack, tmp_path: Path, gate: str) -> None:
    res = st.cli("smoke", gate, "--out", str(tmp_path), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = _lines(res.stdout)
    assert res.stdout.strip().splitlines()[-1] == f"smoke_{gate}_success=true"
    assert {"TradeExecuted", "CandleUpdated"} <= set(lines["ws_events"].split(","))
    ev = json.loads((tmp_path / f"smoke-{gate}.json").read_text())
    assert ev["success"] is True and all(c["ok"] for c in ev["checks"].values())
    trades = ev["checks"]["trade_executed"]["trade_ids"]
    entries = ev["ledger_entries"]
    assert trades and sorted(int(e["reference_id"]) for e in entries) == sorted(trades)
    assert all(e["entry_kind"] == "settlement" for e in entries)
    if gate == "g3":
        assert {"one_trade_entry", "reserve_maker", "reserve_taker", "postings_balanced",
                "ledger_checkpoint"} <= set(ev["checks"])
    assert (tmp_path / "status-before.json").exists() and (tmp_path / "status-after.json").exists()


def test_smoke_names_what_failed(st: Stack, tmp_path: Path) -> None:
    res = st.cli("smoke", "g0", "--symbol", "NOPE-USDT", "--out", str(tmp_path), timeout=180)
    assert res.returncode == 1
    lines = _lines(res.stdout)
    assert lines["smoke_g0_success"] == "false"
    assert lines["smoke_g0_failed"].startswith("market: ")
