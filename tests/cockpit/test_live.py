"""Pilot tests against the real stack: live values, a control through confirmation to the service
and the audit chain, and a refused control with its reason."""

from __future__ import annotations

from typing import Any

from textual.pilot import Pilot
from textual.widgets import Button, DataTable, Input, Static

from cockpit.app import CockpitApp, ControlScreen
from cockpit.signing import OperatorKey
from cockpit.sources import HttpPoller, SourceState
from tests.cockpit.conftest import CockpitStack
from tests.edge.test_admin_latch import engage_latch_async, wait_lag_zero_async


def _app(cs: CockpitStack, key: OperatorKey | None, roles: set[str]) -> CockpitApp:
    return CockpitApp(HttpPoller(cs.stack.data_dir, key=key), roles=frozenset(roles), poll_interval=0.5)


def _seen(app: CockpitApp) -> str:
    """What the operator would see when a wait times out: the screen, a control's impact and Confirm
    state, the actions and the sources that are not LIVE."""
    parts = [f"screen={type(app.screen).__name__}"]
    if isinstance(app.screen, ControlScreen):
        scr = app.screen
        fresh = scr.fresh
        parts += [f"impact={str(scr.query_one('#impact', Static).render())!r}",
                  f"confirm_disabled={scr.query_one('#confirm', Button).disabled}",
                  f"focused={getattr(app.focused, 'id', None)}",
                  "inputs=" + str({i.id: i.value for i in scr.query(Input)}),
                  "fresh=" + ("none" if fresh is None else str(fresh.sources.get(scr.state_source)))]
    parts.append(f"actions={[(a.request.spec.id, a.state, a.detail) for a in app.actions]}")
    snap = app.model.snapshot
    if snap is not None:
        parts.append(f"not_live={[str(s) for s in snap.sources.values() if s.state is not SourceState.LIVE]}")
    return "; ".join(parts)


async def _until(pilot: Pilot[None], cond: object, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if callable(cond) and cond():
            return
        await pilot.pause(0.1)
    app = pilot.app
    raise AssertionError("condition not reached in time; "
                         + (_seen(app) if isinstance(app, CockpitApp) else type(app).__name__))


async def _type_into(pilot: Pilot[None], selector: str, text: str) -> None:
    """Click a field, and type once it has the focus, as a person watching the cursor would; the field
    must then show exactly what was typed. Under CPU load a control's third dialog was once left with
    Confirm disabled although its server state was fresh: a typed field did not hold its text (which
    one, and whether keys or the click went astray, was not captured; :func:`_seen` now shows it)."""
    field = pilot.app.screen.query_one(selector, Input)
    await pilot.click(selector)
    await _until(pilot, lambda: pilot.app.focused is field)
    await pilot.press(*text)
    await _until(pilot, lambda: field.value == text)


async def _set_control_fields(pilot: Pilot[None], reason: str, ticket: str, word: str) -> None:
    for selector, text in (("#reason", reason), ("#ticket", ticket), ("#confirm-word", word)):
        if text:
            await _type_into(pilot, selector, text)


async def test_overview_fills_with_live_values(cockpit_stack: CockpitStack) -> None:
    app = _app(cockpit_stack, cockpit_stack.operator, {"operator"})
    async with app.run_test(size=(160, 50)) as pilot:
        await _until(pilot, lambda: app.polls >= 3 and app.model.values.get("eng_tps") is not None)
        snap = app.model.snapshot
        assert snap is not None
        for name in ("core", "edge", "ledger", "admin", "audit"):
            assert snap.state(name) is SourceState.LIVE, snap.sources[name]
        for key in ("api_p99", "api_loop", "eng_queue", "eng_seq", "led_lag", "auth_fail"):
            assert app.model.values[key] is not None, key
        assert snap.state("jobs") is SourceState.LIVE and snap.jobs, snap.sources["jobs"]  # the jobs service API
        assert app.model.auth_fail_reasons() is not None  # the edge's auth_fail_total{reason} family
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
        await _set_control_fields(pilot, "pd", "T-1", "ETH-USD")
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
        assert entry["action"] == "SetSymbolMode" and entry["ticket"] == "T-1"
        assert entry["params"] == {"symbol": "ETH-USDT", "mode": "SOFT_HALT"}
        assert app.audit_state[0] == "VERIFIED"
        assert "APPLIED" in str(app.query_one("#last-action", Static).render())
        # Put the market back for the other tests.
        app.call_later(app.open_control, "set_mode", symbol="ETH-USDT", option="NORMAL")
        await _until(pilot, lambda: isinstance(app.screen, ControlScreen))
        await _until(pilot, lambda: "SOFT_HALT -> NORMAL" in str(app.screen.query_one("#impact", Static).render()))
        await _set_control_fields(pilot, "end", "T-1", "ETH-USDT")
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
        await _set_control_fields(pilot, "no", "T-2", "WithdrawalsHalt")
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


async def _confirm(pilot: Pilot[None], app: CockpitApp, reason: str, ticket: str, word: str, impact: str) -> None:
    await _until(pilot, lambda: isinstance(app.screen, ControlScreen))
    await _until(pilot, lambda: impact in str(app.screen.query_one("#impact", Static).render()))
    await _set_control_fields(pilot, reason, ticket, word)
    await _until(pilot, lambda: not app.screen.query_one("#confirm", Button).disabled)
    assert await pilot.click("#confirm"), "the click did not land on Confirm; " + _seen(app)


async def test_cancel_all_reaches_the_core_and_the_audit_chain(cockpit_stack: CockpitStack) -> None:
    app = _app(cockpit_stack, cockpit_stack.operator, {"operator"})
    async with app.run_test(size=(160, 50)) as pilot:
        await _until(pilot, lambda: app.model.snapshot is not None and app.model.snapshot.admin is not None)
        app.call_later(app.open_control, "cancel_all", symbol="BTC-USDT")
        await _until(pilot, lambda: isinstance(app.screen, ControlScreen))
        await _until(pilot, lambda: "every open order of BTC-USDT" in str(app.screen.query_one("#impact",
                                                                                                Static).render()))
        await _set_control_fields(pilot, "ca", "", "BTC-USDT")
        assert app.screen.query_one("#confirm", Button).disabled  # no ticket: the control cannot be sent
        await pilot.click("#confirm")
        await pilot.pause(0.2)
        assert isinstance(app.screen, ControlScreen) and not app.actions
        await _type_into(pilot, "#ticket", "T-3")
        await pilot.click("#confirm")
        await _until(pilot, lambda: bool(app.actions) and app.actions[-1].done)
        action = app.actions[-1]
        assert action.state == "APPLIED", action
        assert "canceled=" in action.detail and action.audited
        entry = next(e for e in app.model.snapshot.audit or [] if e["seq"] == action.audit_seq)  # type: ignore[union-attr]
        assert entry["action"] == "CancelAll" and entry["params"] == {"symbol": "BTC-USDT"}
        assert entry["ticket"] == "T-3" and entry["reason"] == "ca"
        assert not any(e["action"] == "CancelAll.failed" for e in app.model.snapshot.audit or [])  # type: ignore[union-attr]


async def test_latch_release_through_the_cockpit(cockpit_stack: CockpitStack) -> None:
    sym = "SOL-USDT"
    app = _app(cockpit_stack, cockpit_stack.approver, {"approver"})
    async with app.run_test(size=(160, 50)) as pilot:
        await _until(pilot, lambda: app.model.snapshot is not None and app.model.snapshot.admin is not None)
        assert "OPERATOR" in str(app.query_one("#mode-bar", Static).render())  # approver: controls, not read-only
        await engage_latch_async(cockpit_stack.stack, sym)
        await _until(pilot, lambda: next((r.latch for r in app.model.rows() if r.symbol == sym), None)
                     == "ENGAGED CANCEL_ONLY" and (app.model.snapshot.admin or {})["modes"].get(sym) == "CANCEL_ONLY")
        await wait_lag_zero_async(cockpit_stack.stack, sym)
        app.call_later(app.open_control, "latch_release", symbol=sym)
        await _confirm(pilot, app, "lag 0", "I-7", sym, "ENGAGED CANCEL_ONLY -> released")
        await _until(pilot, lambda: bool(app.actions) and app.actions[-1].done, timeout=30)
        action = app.actions[-1]
        assert action.state == "APPLIED", action
        assert action.audited and "released=True" in action.detail and "modeSet=NORMAL" in action.detail
        audit = app.model.snapshot.audit or []  # type: ignore[union-attr]
        req = next(e for e in audit if e["seq"] == action.audit_seq)
        assert req["action"] == "LatchReleaseRequested" and req["params"]["symbol"] == sym
        assert req["ticket"] == "I-7" and req["reason"] == "lag 0"
        assert any(e["action"] == "LatchRelease" and e["params"]["symbol"] == sym and e["seq"] > req["seq"]
                   for e in audit)
        await _until(pilot, lambda: (app.model.snapshot.admin or {})["modes"].get(sym) == "NORMAL")
        assert next(r.latch for r in app.model.rows() if r.symbol == sym) == "released"
        assert app.audit_state[0] == "VERIFIED"

        # Refused by the service, with its reason: the latch is no longer engaged.
        app.call_later(app.open_control, "latch_release", symbol=sym)
        await _confirm(pilot, app, "re", "I-7", sym, "released -> released")
        await _until(pilot, lambda: len(app.actions) == 2 and app.actions[-1].done)
        refused = app.actions[-1]
        assert refused.state == "REJECTED" and "409 LATCH_NOT_ENGAGED" in refused.detail, refused
        assert "LATCH_NOT_ENGAGED" in str(app.query_one("#last-action", Static).render())

        # Refused locally, with its reason: an approver has no SetSymbolMode (roles are no hierarchy).
        app.open_control("set_mode", symbol=sym, option="NORMAL")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, ControlScreen)
        assert any("lack 'operator'" in str(n.message) for n in app._notifications)


async def test_run_check_now_from_the_checks_screen(cockpit_stack: CockpitStack) -> None:
    app = _app(cockpit_stack, cockpit_stack.operator, {"operator"})
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("4")
        table = app.query_one("#jobs-table", DataTable)
        await _until(pilot, lambda: app.model.snapshot is not None and bool(app.model.snapshot.jobs)
                     and table.row_count >= 5)
        assert "invariants" in [str(k.value) for k in table.rows]
        row = table.get_row("invariants")
        assert row[1] == "*/1 * * * *" and row[2] != "-"  # schedule and next run from the jobs service
        table.move_cursor(row=table.get_row_index("invariants"))
        await pilot.press("n")  # the selected check, through the same confirmation flow
        await _confirm(pilot, app, "now", "T-5", "invariants", "check invariants (*/1 * * * *) runs now")
        await _until(pilot, lambda: bool(app.actions) and app.actions[-1].done, timeout=60)
        action = app.actions[-1]
        assert action.state == "APPLIED" and "outcome=ok" in action.detail, action
        entry = next(e for e in app.model.snapshot.audit or [] if e["seq"] == action.audit_seq)  # type: ignore[union-attr]
        assert entry["action"] == "RunCheck" and entry["params"] == {"job": "invariants"} and entry["ticket"] == "T-5"
        run_id = int(action.detail.split("runId=")[1].split(",")[0])
        await _until(pilot, lambda: any((j.get("last_run") or {}).get("id", 0) >= run_id
                                        for j in app.model.snapshot.jobs or [] if j["name"] == "invariants"))
        assert str(table.get_row("invariants")[4]) in ("ok", "violation", "error")


async def test_symbol_throttle_set_and_clear_through_the_cockpit(cockpit_stack: CockpitStack) -> None:
    sym = "ETH-USDT"
    app = _app(cockpit_stack, cockpit_stack.operator, {"operator"})

    def throttles() -> dict[str, Any]:
        snap = app.model.snapshot
        assert snap is not None and snap.throttles is not None
        return snap.throttles

    def row() -> Any:
        return next(r for r in app.model.rows() if r.symbol == sym)

    async with app.run_test(size=(160, 50)) as pilot:
        await _until(pilot, lambda: app.model.snapshot is not None and app.model.snapshot.throttles is not None
                     and app.model.snapshot.admin is not None and sym in app.model.symbols())
        assert sym not in throttles()
        assert row().throttle_layer == "none" and row().throttle_rate is None

        # Set: orders/s and burst, reason, ticket, the typed symbol; impact from the throttle list.
        app.call_later(app.open_control, "set_throttle", symbol=sym)
        await _until(pilot, lambda: isinstance(app.screen, ControlScreen))
        screen = app.screen
        assert app.focused is screen.query_one("#cancel", Button)
        await _until(pilot, lambda: f"{sym} throttle layers: none" in str(screen.query_one("#impact", Static).render()))
        await _type_into(pilot, "#rate", "400")
        await _type_into(pilot, "#burst", "800")
        await _until(pilot, lambda: "enforced after: 400/s burst 800 (operator)"
                     in str(screen.query_one("#impact", Static).render()))
        await _set_control_fields(pilot, "lag drill", "T-9", sym)
        await pilot.press("enter")  # Enter never confirms
        await pilot.pause(0.2)
        assert app.screen is screen and not app.actions
        await pilot.click("#confirm")
        await _until(pilot, lambda: bool(app.actions) and app.actions[-1].done, timeout=30)
        action = app.actions[-1]
        assert action.state == "APPLIED", action
        assert action.audited and action.audit_seq is not None
        layer = throttles()[sym]["layers"]["operator"]
        assert (layer["ordersPerSecond"], layer["burst"], layer["auditSeq"]) == (400, 800, action.audit_seq)
        audit = app.model.snapshot.audit or []  # type: ignore[union-attr]
        entry = next(e for e in audit if e["seq"] == action.audit_seq)
        assert entry["action"] == "SetSymbolThrottle" and entry["ticket"] == "T-9" and entry["reason"] == "lag drill"
        assert entry["params"] == {"symbol": sym, "layer": "operator", "orders_per_s": 400, "burst": 800}
        await _until(pilot, lambda: (row().throttle_rate, row().throttle_layer) == (400.0, "operator"))
        table = app.query_one("#markets-table", DataTable)
        assert str(table.get_row(sym)[8]) == "400/s operator"
        assert row().throttle_drops is not None  # the edge's drops counter: a rate, not a dash

        # Clear the operator layer: gone from GET /v1/admin/throttles, audited.
        app.call_later(app.open_control, "clear_throttle", symbol=sym, option="operator")
        await _confirm(pilot, app, "recovered", "T-9", sym, "clears: operator")
        await _until(pilot, lambda: len(app.actions) == 2 and app.actions[-1].done, timeout=30)
        cleared = app.actions[-1]
        assert cleared.state == "APPLIED", cleared
        assert sym not in throttles()
        entry = next(e for e in app.model.snapshot.audit or [] if e["seq"] == cleared.audit_seq)  # type: ignore[union-attr]
        assert entry["action"] == "ClearSymbolThrottle" and entry["params"]["layers"] == ["operator"]
        assert entry["params"]["was"]["operator"]["orders_per_s"] == 400
        await _until(pilot, lambda: row().throttle_rate is None and row().throttle_layer == "none")
        assert str(app.query_one("#markets-table", DataTable).get_row(sym)[8]) == "-"
        assert app.audit_state[0] == "VERIFIED"

        # Clearing again is refused by the edge, with its reason (nothing to clear).
        app.call_later(app.open_control, "clear_throttle", symbol=sym, option="operator")
        await _confirm(pilot, app, "again", "T-9", sym, "no operator layer set")
        await _until(pilot, lambda: len(app.actions) == 3 and app.actions[-1].done)
        refused = app.actions[-1]
        assert refused.state == "REJECTED" and "404 THROTTLE_NOT_SET" in refused.detail, refused
