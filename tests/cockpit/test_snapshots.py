"""SVG snapshots of every screen in LIVE, STALE and DISCONNECTED states: fixed terminal size, fixed
data fed through a StaticPoller (no network, no wall clock on screen: ages and times come from the
data), so the pictures change only when the presentation does. The data layer is tested live
(test_live.py). Update with ``--snapshot-update`` and look at the SVGs before committing them."""

from __future__ import annotations

from typing import Any

import pytest
from textual.pilot import Pilot

from cockpit.app import CockpitApp
from cockpit.metrics import parse_metrics
from cockpit.signing import OperatorKey
from cockpit.sources import SOURCE_NAMES, Snapshot, SourceState, SourceStatus, StaticPoller
from ledger.audit import GENESIS_HASH, entry_hash

AT = 1_800_000_000.0  # the frozen "now" of every snapshot (2027-01-15 08:00 UTC)

CORE = """# TYPE core_queue_depth gauge
core_queue_depth 3
# TYPE core_trades_total counter
core_trades_total{symbol="BTC-USDT"} %d
core_trades_total{symbol="ETH-USDT"} %d
# TYPE core_commands_total counter
core_commands_total{symbol="BTC-USDT"} %d
# TYPE core_stream_seq gauge
core_stream_seq{stream="BTC-USDT"} %d
core_stream_seq{stream="ETH-USDT"} %d
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
ledger_settlement_lag_ms_last{stream="ETH-USDT"} 40
# TYPE ledger_settlement_lag_seq gauge
ledger_settlement_lag_seq{stream="BTC-USDT"} 12
ledger_settlement_lag_seq{stream="ETH-USDT"} 0
# TYPE ledger_reconciliation_level gauge
ledger_reconciliation_level{stream="BTC-USDT"} 1
ledger_reconciliation_level{stream="ETH-USDT"} 0
# TYPE ledger_applied_seq gauge
ledger_applied_seq{stream="BTC-USDT"} 888
ledger_applied_seq{stream="ETH-USDT"} 420
# TYPE ledger_engine_seq gauge
ledger_engine_seq{stream="BTC-USDT"} 900
ledger_engine_seq{stream="ETH-USDT"} 420
# TYPE ledger_stream_stopped gauge
ledger_stream_stopped{stream="BTC-USDT"} 0
ledger_stream_stopped{stream="ETH-USDT"} 0
# TYPE ledger_invariants_ok gauge
ledger_invariants_ok 0
# TYPE ledger_invariant_check_ok gauge
ledger_invariant_check_ok{check="tx_sums_zero"} 1
ledger_invariant_check_ok{check="no_negative_balances"} 1
ledger_invariant_check_ok{check="custody_equals_total"} 0
# TYPE ledger_consumer_lag_messages gauge
ledger_consumer_lag_messages 2
# TYPE ledger_corrections_pending gauge
ledger_corrections_pending 1
"""
EDGE = """# TYPE auth_fail counter
auth_fail_total{reason="bad_signature"} %d
auth_fail_total{reason="timestamp_skew"} %d
auth_fail_total{reason="unknown_key"} 4
# TYPE replay_detect counter
replay_detect_total 1
# TYPE ws_connected_clients gauge
ws_connected_clients 12
# TYPE edge_symbol_throttle_drops counter
edge_symbol_throttle_drops_total{symbol="BTC-USDT"} %d
# TYPE edge_symbol_throttle_orders_per_s gauge
edge_symbol_throttle_orders_per_s{symbol="BTC-USDT"} 50
edge_symbol_throttle_orders_per_s{symbol="ETH-USDT"} 0
# TYPE event_loop_lag_seconds histogram
event_loop_lag_seconds_bucket{le="0.001"} %d
event_loop_lag_seconds_bucket{le="0.01"} %d
event_loop_lag_seconds_bucket{le="0.025"} %d
event_loop_lag_seconds_bucket{le="+Inf"} %d
event_loop_lag_seconds_count %d
event_loop_lag_seconds_sum %f
"""
# GET /v1/admin/throttles: BTC-USDT throttled by both layers, the operator's (stricter) enforced.
THROTTLES = {"BTC-USDT": {
    "layers": {"operator": {"ordersPerSecond": 50, "burst": 50, "actor": "alice:0123456789abcdef",
                            "reason": "lag spike", "ticket": "INC-43", "auditSeq": 4,
                            "setAtMs": int(AT * 1000) - 30_000, "revision": 7},
               "policy": {"ordersPerSecond": 100, "burst": 100, "actor": "jobs:settlement_lag",
                          "reason": "settlement lag 1200 >= T2", "ticket": "LEDGER-LAG-BTC-USDT",
                          "auditSeq": 3, "setAtMs": int(AT * 1000) - 60_000, "revision": 6}},
    "enforced": {"ordersPerSecond": 50, "burst": 50, "layer": "operator", "drops": 42}}}


def _audit() -> list[dict[str, Any]]:
    """Three entries of a real hash chain (ledger.audit.entry_hash), newest first."""
    out: list[dict[str, Any]] = []
    prev = GENESIS_HASH
    rows = [("ledger", "LatchEngage", {"symbol": "ETH-USDT", "mode": "CANCEL_ONLY", "cause": "lag:T2"},
             "settlement lag 1200 on ETH-USDT beyond T2 for 5s", "LEDGER-LAG-ETH-USDT-1"),
            ("alice:0123456789abcdef", "SetSymbolMode", {"symbol": "BTC-USDT", "mode": "CANCEL_ONLY"},
             "invariant violation drill", "INC-41"),
            ("alice:0123456789abcdef", "WithdrawalsHalt", {"on": True}, "custody mismatch", "INC-42")]
    for i, (actor, action, params, reason, ticket) in enumerate(rows, 1):
        fields = {"prev_hash": prev, "seq": i, "ts_ms": int(AT * 1000) - (4 - i) * 60_000, "actor": actor,
                  "roles": ["operator"], "action": action, "params": params, "reason": reason, "ticket": ticket}
        prev = entry_hash(fields)
        out.append({**fields, "hash": prev})
    return out[::-1]


JOBS = [
    {"name": "invariants", "schedule": "*/1 * * * *", "next_run_at": "2027-01-15T08:01:00Z",
     "last_run": {"id": 41, "started_at": "2027-01-15T08:00:00Z", "ended_at": "2027-01-15T08:00:01Z",
                  "outcome": "violation", "summary": "violation violation_count=1 custody_equals_total"}},
    {"name": "reconciliation_summary", "schedule": "*/5 * * * *", "next_run_at": "2027-01-15T08:05:00Z",
     "last_run": {"id": 40, "started_at": "2027-01-15T07:55:00Z", "ended_at": "2027-01-15T07:55:02Z",
                  "outcome": "ok", "summary": "ok max_lag_events=12"}},
    {"name": "snapshot_verify", "schedule": "0 * * * *", "next_run_at": "2027-01-15T09:00:00Z", "last_run": None},
]
CONFIG_JOBS = {"invariants": "*/1 * * * *", "reconciliation_summary": "*/5 * * * *", "snapshot_verify": "0 * * * *"}


def _snapshot(state: SourceState) -> Snapshot:
    age = {SourceState.LIVE: 0.4, SourceState.STALE: 12.0, SourceState.DISCONNECTED: None}[state]
    err = None if state is SourceState.LIVE else "connection refused"
    sources = {n: SourceStatus(n, state, age, err) for n in SOURCE_NAMES}
    snap = Snapshot(at=AT, sources=sources)
    if state is SourceState.DISCONNECTED:
        return snap
    snap.metrics = {"core": parse_metrics(CORE % (120, 40, 300, 900, 420, 10.5)), "ledger": parse_metrics(LEDGER),
                    "edge": parse_metrics(EDGE % (30, 7, 42, 140, 170, 180, 180, 180, 1.2))}
    snap.prev_metrics = {"core": (parse_metrics(CORE % (100, 38, 240, 700, 410, 10.4)), 1.0),
                         "edge": (parse_metrics(EDGE % (25, 7, 30, 100, 100, 100, 100, 100, 0.05)), 1.0)}
    audit = _audit()
    snap.admin = {"modes": {"BTC-USDT": "CANCEL_ONLY", "ETH-USDT": "CANCEL_ONLY"}, "withdrawalsHalted": True,
                  "latches": {"ETH-USDT": {"symbol": "ETH-USDT", "engaged": True, "mode": "CANCEL_ONLY",
                                           "cause": "lag:T2", "reason": "settlement lag beyond T2"}},
                  "breakGlass": {"active": False}, "audit": {"seq": 3, "head": audit[0]["hash"]}}
    snap.audit = audit
    snap.markets = [{"symbol": "BTC-USDT", "mode": "CANCEL_ONLY"}, {"symbol": "ETH-USDT", "mode": "CANCEL_ONLY"}]
    snap.tickers = {"BTC-USDT": {"bestBid": "65000.00", "bestAsk": "65001.00", "last": "65000.50"},
                    "ETH-USDT": {"bestBid": "3400.10", "bestAsk": "3400.30", "last": "3400.20"}}
    snap.jobs = JOBS
    snap.throttles = THROTTLES
    return snap


def _app(state: SourceState) -> CockpitApp:
    return CockpitApp(StaticPoller(_snapshot(state)), poll_interval=0, jobs=CONFIG_JOBS)


STATES = list(SourceState)


@pytest.mark.parametrize("state", STATES)
def test_overview_snapshot(snap_compare: Any, state: SourceState) -> None:
    """Every dashboard, down to the edge auth failures broken down by reason."""
    assert snap_compare(_app(state), terminal_size=(150, 64))


@pytest.mark.parametrize("state", STATES)
def test_markets_snapshot(snap_compare: Any, state: SourceState) -> None:
    assert snap_compare(_app(state), press=["2"], terminal_size=(150, 30))


def test_markets_throttles_lost_snapshot(snap_compare: Any) -> None:
    """Every source LIVE but the throttle list: the enforced rate still comes from the edge's gauge,
    without its layer (``?``), and the note above the table says the throttles source is lost."""
    snap = _snapshot(SourceState.LIVE)
    snap.sources["throttles"] = SourceStatus("throttles", SourceState.DISCONNECTED, 25.0, "HTTP 503 UNAVAILABLE")
    snap.throttles = None
    assert snap_compare(CockpitApp(StaticPoller(snap), poll_interval=0, jobs=CONFIG_JOBS), press=["2"],
                        terminal_size=(150, 30))


def test_set_throttle_dialog_snapshot(snap_compare: Any) -> None:
    """The SetSymbolThrottle confirmation: the layers now, the operator layer's change, what the edge
    will enforce after, the recent command rate and refusals; Confirm disabled until the typed symbol."""
    key = OperatorKey.from_hex("11" * 32)
    app = CockpitApp(StaticPoller(_snapshot(SourceState.LIVE), "http://edge.invalid", key),
                     roles=frozenset({"operator"}), poll_interval=0, jobs=CONFIG_JOBS)

    async def fill(pilot: Pilot[None]) -> None:
        await pilot.pause()
        app.open_control("set_throttle", symbol="BTC-USDT")
        await pilot.pause()
        await pilot.click("#rate")
        await pilot.press(*"20")
        await pilot.click("#reason")
        await pilot.press(*"lag spike")
        await pilot.click("#ticket")
        await pilot.press(*"INC-44")
        await pilot.pause()

    assert snap_compare(app, run_before=fill, terminal_size=(150, 48))


@pytest.mark.parametrize("state", STATES)
def test_ledger_snapshot(snap_compare: Any, state: SourceState) -> None:
    assert snap_compare(_app(state), press=["3"], terminal_size=(150, 30))


@pytest.mark.parametrize("state", STATES)
def test_checks_snapshot(snap_compare: Any, state: SourceState) -> None:
    assert snap_compare(_app(state), press=["4"], terminal_size=(150, 30))


@pytest.mark.parametrize("state", STATES)
def test_audit_snapshot(snap_compare: Any, state: SourceState) -> None:
    assert snap_compare(_app(state), press=["5"], terminal_size=(150, 30))


@pytest.mark.parametrize("state", STATES)
def test_playbooks_snapshot(snap_compare: Any, state: SourceState) -> None:
    assert snap_compare(_app(state), press=["6"], terminal_size=(150, 48))


async def test_lag_playbook_offers_the_throttle_controls() -> None:
    """§3.2's buttons open SetSymbolThrottle / ClearSymbolThrottle on the most lagged symbol (BTC-USDT:
    level warn, 12 behind), and its lines show that symbol's throttle; ETH-USDT (no lag, no throttle)
    is not listed."""
    from cockpit.app import ControlScreen
    from cockpit.playbooks import PLAYBOOKS, lag_throttle_details

    key = OperatorKey.from_hex("11" * 32)
    app = CockpitApp(StaticPoller(_snapshot(SourceState.LIVE), "http://edge.invalid", key),
                     roles=frozenset({"operator"}), poll_interval=0, jobs=CONFIG_JOBS)
    i = next(n for n, pb in enumerate(PLAYBOOKS) if pb.id == "3.2")
    async with app.run_test(size=(150, 48)) as pilot:
        await pilot.press("6")
        await pilot.pause()
        lines = lag_throttle_details(app.model)
        assert [sev for _, sev in lines] == ["warn"] and "BTC-USDT" in lines[0][0]
        assert "throttle 50/s operator +policy" in lines[0][0] and "drops 12.0/s" in lines[0][0]
        for control, option in (("set_throttle", None), ("clear_throttle", "operator")):
            j = next(n for n, a in enumerate(PLAYBOOKS[i].actions) if a.control == control)
            button = app.query_one(f"#pb-{i}-{j}")
            assert not button.disabled
            app.query_one(f"#pb-{i}-{j}").press()
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, ControlScreen) and screen.spec.id == control
            req = screen.request()
            assert (req.symbol, req.option) == ("BTC-USDT", option)
            await pilot.click("#cancel")
            await pilot.pause()
            assert not isinstance(app.screen, ControlScreen)


async def test_control_fields_stay_put_while_the_impact_loads() -> None:
    """The impact (below reason and ticket) grows from one line to several when the fresh server state
    arrives. The fields above it must not move meanwhile: with the dialog centred they rose 4 rows, and a
    click aimed at reason as the impact appeared landed on ticket (the live throttle test saw exactly that)."""
    import asyncio

    from textual.widgets import Input, Static

    from cockpit.app import ControlScreen

    key = OperatorKey.from_hex("11" * 32)
    app = CockpitApp(StaticPoller(_snapshot(SourceState.LIVE), "http://edge.invalid", key),
                     roles=frozenset({"operator"}), poll_interval=0, jobs=CONFIG_JOBS)
    fresh = app.fresh_snapshot
    release = asyncio.Event()

    async def held_fresh_snapshot() -> Snapshot | None:
        await release.wait()
        return await fresh()

    app.fresh_snapshot = held_fresh_snapshot  # type: ignore[method-assign]
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.pause()
        app.open_control("clear_throttle", symbol="BTC-USDT", option="operator")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ControlScreen)

        def rows() -> tuple[int, int, int]:
            return (screen.query_one("#reason", Input).region.y, screen.query_one("#ticket", Input).region.y,
                    screen.query_one("#impact", Static).region.height)

        before = rows()
        release.set()
        for _ in range(50):
            await pilot.pause(0.02)
            if rows()[2] > before[2] + 2:
                break
        after = rows()
        assert after[2] > before[2] + 2, (before, after)  # the impact did grow
        assert after[:2] == before[:2], (before, after)


# The first approval of ETH-USDT's latch release, recorded by the edge (202) and awaiting a second approver.
BOB = "bob:fedcba9876543210"
APPROVAL = {"actor": BOB, "ticket": "INC-45", "auditSeq": 4, "tsMs": int(AT * 1000) - 20_000,
            "reason": "lag back to 0"}


def _awaiting_snapshot() -> Snapshot:
    snap = _snapshot(SourceState.LIVE)
    assert snap.admin is not None
    snap.admin["latches"]["ETH-USDT"]["pendingApprovals"] = [APPROVAL]
    return snap


def _awaiting_action() -> Any:
    from cockpit.controls import ControlRequest, PendingAction
    from cockpit.model import AWAITING_SECOND_APPROVER

    return PendingAction(1, ControlRequest("latch_release", "ETH-USDT", None, "lag back to 0", "INC-45"),
                         started=AT, state=AWAITING_SECOND_APPROVER, audit_seq=4,
                         detail=f"202 approval recorded ({BOB}, ticket INC-45); a distinct approver must send the "
                                "same release")


def test_ledger_pending_approval_snapshot(snap_compare: Any) -> None:
    """Ledger screen with ETH-USDT's latch release approved once: the latch cell says what it awaits, the
    pending approval is listed (who, ticket, when, audit entry), and the last action reads AWAITING
    SECOND APPROVER (magenta, a pending state), not REJECTED."""
    app = CockpitApp(StaticPoller(_awaiting_snapshot()), poll_interval=0, jobs=CONFIG_JOBS)

    async def fill(pilot: Pilot[None]) -> None:
        await pilot.pause()
        app.actions.append(_awaiting_action())
        app._render_all()
        await pilot.pause()

    assert snap_compare(app, press=["3"], run_before=fill, terminal_size=(150, 34))


def test_awaiting_second_approver_state_mapping() -> None:
    """A first approval stays AWAITING SECOND APPROVER (not done, never REJECTED or timed out) while
    the latch is engaged and the approval is pending; APPLIED once the latch is released;
    UNCONFIRMED once the approval is no longer pending on an engaged latch."""
    from cockpit.model import AWAITING_SECOND_APPROVER, Model, approval_note

    pa = _awaiting_action()
    snap = _awaiting_snapshot()
    snap.at = AT + 3600  # far beyond the 20 s a SENT control waits for confirmation
    pa.observe(snap)
    assert pa.state == AWAITING_SECOND_APPROVER and not pa.done
    m = Model()
    m.update(snap)
    row = next(r for r in m.rows() if r.symbol == "ETH-USDT")
    assert row.latch == "ENGAGED CANCEL_ONLY" and row.latch_approvals == (APPROVAL,)
    assert approval_note(row.latch_approvals) == "awaiting 2nd approver"
    assert next(r for r in m.rows() if r.symbol == "BTC-USDT").latch_approvals == ()
    assert m.pending_approvals() == [("ETH-USDT", APPROVAL)]
    # Two approvers on one ticket whose release was then refused (e.g. LAG_NOT_ZERO): a retry completes it.
    assert approval_note([APPROVAL, {**APPROVAL, "actor": "carol:0011", "auditSeq": 5}]) == "2 approvals: retry release"
    # The admin source lost: cannot tell, keep waiting.
    lost = _awaiting_snapshot()
    lost.admin = None
    pa.observe(lost)
    assert pa.state == AWAITING_SECOND_APPROVER
    # The approval gone from an engaged latch (older than the edge's window, or a new engagement).
    lapsed = _awaiting_snapshot()
    assert lapsed.admin is not None
    lapsed.admin["latches"]["ETH-USDT"]["pendingApprovals"] = []
    gone = _awaiting_action()
    gone.observe(lapsed)
    assert gone.state == "UNCONFIRMED" and "no longer pending" in gone.detail
    # The second approver released it.
    released = _awaiting_snapshot()
    assert released.admin is not None
    released.admin["latches"]["ETH-USDT"].update(engaged=False, pendingApprovals=[])
    pa.observe(released)
    assert pa.state == "APPLIED" and pa.done and "latch released" in pa.detail
    m.update(released)
    assert m.pending_approvals() == [] and next(r for r in m.rows() if r.symbol == "ETH-USDT").latch == "released"
