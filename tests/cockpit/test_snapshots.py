"""SVG snapshots of the overview in LIVE, STALE and DISCONNECTED states (fixed size, fixed data,
no clock on screen). Prepared snapshots: this is presentation, the data layer is tested live."""

from __future__ import annotations

from typing import Any

import pytest

from cockpit.app import CockpitApp
from cockpit.metrics import parse_metrics
from cockpit.sources import SOURCE_NAMES, Snapshot, SourceState, SourceStatus, StaticPoller

CORE = """# TYPE core_queue_depth gauge
core_queue_depth 3
# TYPE core_trades_total counter
core_trades_total{symbol="BTC-USDT"} %d
# TYPE core_stream_seq gauge
core_stream_seq{stream="BTC-USDT"} %d
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total %f
# TYPE core_loop_seconds histogram
core_loop_seconds_bucket{le="0.001"} 50
core_loop_seconds_bucket{le="0.01"} 90
core_loop_seconds_bucket{le="+Inf"} 100
core_loop_seconds_count 100
core_loop_seconds_sum 0.5
"""
LEDGER = """# TYPE ledger_settlement_lag_ms_last gauge
ledger_settlement_lag_ms_last{stream="BTC-USDT"} 1500
# TYPE ledger_invariants_ok gauge
ledger_invariants_ok 1
# TYPE ledger_consumer_lag_messages gauge
ledger_consumer_lag_messages 2
"""


def _snapshot(state: SourceState) -> Snapshot:
    age = {SourceState.LIVE: 0.4, SourceState.STALE: 12.0, SourceState.DISCONNECTED: None}[state]
    err = None if state is SourceState.LIVE else "connection refused"
    sources = {n: SourceStatus(n, state, age, err) for n in SOURCE_NAMES}
    sources["jobs"] = SourceStatus("jobs", SourceState.DISCONNECTED, None, "the jobs service has no API yet")
    snap = Snapshot(at=1_800_000_000.0, sources=sources)
    if state is SourceState.DISCONNECTED:
        return snap
    snap.metrics = {"core": parse_metrics(CORE % (120, 900, 10.5)), "ledger": parse_metrics(LEDGER)}
    snap.prev_metrics = {"core": (parse_metrics(CORE % (100, 700, 10.4)), 1.0)}
    snap.admin: Any = {"modes": {"BTC-USDT": "NORMAL"}, "audit": {"seq": 0, "head": "0" * 64}}
    snap.audit = []
    snap.markets = [{"symbol": "BTC-USDT", "mode": "NORMAL"}]
    snap.tickers = {"BTC-USDT": {"bestBid": "65000.00", "bestAsk": "65001.00", "last": "65000.50"}}
    return snap


@pytest.mark.parametrize("state", list(SourceState))
def test_overview_snapshot(snap_compare: Any, state: SourceState) -> None:
    app = CockpitApp(StaticPoller(_snapshot(state)), poll_interval=0, jobs={"invariants": "*/1 * * * *"})
    assert snap_compare(app, terminal_size=(150, 48))


@pytest.mark.parametrize("state", [SourceState.LIVE, SourceState.DISCONNECTED])
def test_markets_snapshot(snap_compare: Any, state: SourceState) -> None:
    app = CockpitApp(StaticPoller(_snapshot(state)), poll_interval=0)
    assert snap_compare(app, press=["2"], terminal_size=(150, 30))
