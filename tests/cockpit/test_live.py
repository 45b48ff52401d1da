"""Pilot tests against the real stack: live values, a control through confirmation to the service
and the audit chain, and a refused control with its reason."""

from __future__ import annotations

from textual.pilot import Pilot
from textual.widgets import Button, DataTable, Static

from cockpit.app import CockpitApp, ControlScreen
from cockpit.signing import OperatorKey
from cockpit.sources import HttpPoller, SourceState
from tests.cockpit.conftest import CockpitStack


def _app(cs: CockpitStack, key: OperatorKey | None, roles: set[str]) -> CockpitApp:
    return CockpitApp(HttpPoller(cs.stack.data_dir, key=key), roles=frozenset(roles), poll_interval=0.5)


async def _until(pilot: Pilot[None], cond: object, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if callable(cond) and cond():
            return
        await pilot.pause(0.1)
    raise AssertionError("condition not reached in time")


async def _set_control_fields(pilot: Pilot[None], reason: str, ticket: str, word: str) -> None:
    await pilot.click("#reason")
    await pilot.press(*reason)
    await pilot.click("#ticket")
    await pilot.press(*ticket)
    await pilot.click("#confirm-word")
    await pilot.press(*word)


async def test_overview_fills_with_live_values(cockpit_stack: CockpitStack) -> None:
    app = _app(cockpit_stack, cockpit_stack.operator, {"operator"})
    async with app.run_test(size=(160, 50)) as pilot:
        await _until(pilot, lambda: app.polls >= 3 and app.model.values.get("eng_tps") is not None)
        snap = app.model.snapshot
        assert snap is not None
        for name in ("core", "edge", "ledger", "admin", "audit"):
            assert snap.state(name) is SourceState.LIVE, snap.sources[name]
        for key in ("api_p99", "eng_queue", "eng_seq", "led_lag", "auth_fail"):
            assert app.model.values[key] is not None, key
        assert snap.state("jobs") is SourceState.DISCONNECTED  # no jobs API yet: dashes, no crash
        tile = str(app.query_one("#tile-eng_queue", Static).render())
        assert "queue depth" in tile
        await pilot.press("2")
        await _until(pilot, lambda: app.query_one("#markets-table", DataTable).row_count >= 3)


async def test_set_symbol_mode_end_to_end(cockpit_stack: CockpitStack) -> None:
    app = _app(cockpit_stack, cockpit_stack.operator, {"operator"})
    async with app.run_test(size=(160, 50)) as pilot:
        await _until(pilot, lambda: len(app.model.symbols()) >= 3 and app.model.snapshot is not None
                     and app.model.snapshot.admin is not None)
        app.call_later(app.open_control, "set_mode", symbol="ETH-USDT", option="SOFT_HALT")
        await _until(pilot, lambda: isinstance(app.screen, ControlScreen))
        screen = app.screen
        assert app.focused is screen.query_one("#cancel", Button)  # Cancel has the focus
        await _until(pilot, lambda: "NORMAL -> SOFT_HALT" in str(screen.query_one("#impact", Static).render()))
        await _set_control_fields(pilot, "pilot drill", "TCK-1", "ETH-USD")
        assert screen.query_one("#confirm", Button).disabled  # the typed word does not match yet
        await pilot.press("T", "enter")  # now it matches, but Enter alone never confirms
        await pilot.pause(0.2)
        assert app.screen is screen and not app.actions
        assert not screen.query_one("#confirm", Button).disabled
        await pilot.click("#confirm")
        await _until(pilot, lambda: bool(app.actions))
        action = app.actions[-1]
        assert action.state in ("PENDING", "SENT", "APPLIED")
        await _until(pilot, lambda: action.done)
        assert action.state == "APPLIED", action
        assert action.audited and action.audit_seq is not None
        audit = app.model.snapshot.audit if app.model.snapshot else None
        entry = next(e for e in audit or [] if e["seq"] == action.audit_seq)
        assert entry["action"] == "SetSymbolMode" and entry["ticket"] == "TCK-1"
        assert entry["params"] == {"symbol": "ETH-USDT", "mode": "SOFT_HALT"}
        assert app.audit_state[0] == "VERIFIED"
        assert "APPLIED" in str(app.query_one("#last-action", Static).render())
        # Put the market back for the other tests.
        app.call_later(app.open_control, "set_mode", symbol="ETH-USDT", option="NORMAL")
        await _until(pilot, lambda: isinstance(app.screen, ControlScreen))
        await _until(pilot, lambda: "SOFT_HALT -> NORMAL" in str(app.screen.query_one("#impact", Static).render()))
        await _set_control_fields(pilot, "end of drill", "TCK-1", "ETH-USDT")
        await pilot.click("#confirm")
        await _until(pilot, lambda: len(app.actions) == 2 and app.actions[-1].done)
        assert app.actions[-1].state == "APPLIED"


async def test_refused_control_shows_reason(cockpit_stack: CockpitStack) -> None:
    # The local config believes this key may act; the edge (the authority) knows it as a viewer only.
    app = _app(cockpit_stack, cockpit_stack.viewer, {"operator"})
    async with app.run_test(size=(160, 50)) as pilot:
        await _until(pilot, lambda: app.model.snapshot is not None and app.model.snapshot.admin is not None)
        app.call_later(app.open_control, "withdrawals", option="on")
        await _until(pilot, lambda: isinstance(app.screen, ControlScreen))
        await _until(pilot, lambda: "withdrawals halted" in str(app.screen.query_one("#impact", Static).render()))
        await _set_control_fields(pilot, "should fail", "TCK-2", "WithdrawalsHalt")
        await pilot.click("#confirm")
        await _until(pilot, lambda: bool(app.actions) and app.actions[-1].done)
        action = app.actions[-1]
        assert action.state == "REJECTED"
        assert "403" in action.detail, action.detail
        assert "REJECTED" in str(app.query_one("#last-action", Static).render())


async def test_read_only_without_key(cockpit_stack: CockpitStack) -> None:
    app = _app(cockpit_stack, None, set())
    async with app.run_test(size=(160, 50)) as pilot:
        await _until(pilot, lambda: app.polls >= 1)
        await pilot.press("m")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, ControlScreen)
        assert "READ-ONLY" in str(app.query_one("#mode-bar", Static).render())
        snap = app.model.snapshot
        assert snap is not None and snap.state("admin") is SourceState.DISCONNECTED
