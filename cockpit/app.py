"""spotex cockpit: the on-call terminal app (Textual).

Data comes only over the services' HTTP APIs (see :mod:`cockpit.sources`); controls are signed
edge admin requests (see :mod:`cockpit.controls`). One poll round at a time: the next one is
scheduled only after the previous finished, from an exclusive worker on the app's event loop.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Select, Static, TabbedContent, TabPane

from cockpit import model as cm
from cockpit.commands import COMMANDS, CommandsProvider, bindings, by_id, key_label
from cockpit.controls import CONTROLS, MAX_THROTTLE, ControlRequest, PendingAction, control_client, send
from cockpit.model import DASHBOARDS, TILES, Model, TileSpec, fmt_value, level, sparkline
from cockpit.playbooks import PLAYBOOKS
from cockpit.sources import SOURCE_NAMES, Poller, Snapshot, SourceState

__all__ = ["CockpitApp", "ControlScreen", "HelpScreen", "verify_audit"]

TABS = ("overview", "markets", "ledger", "checks", "audit", "playbooks")
_STATE_STYLE = {SourceState.LIVE: "green", SourceState.STALE: "yellow", SourceState.DISCONNECTED: "red"}
_LEVEL_STYLE = {"ok": "green", "warn": "yellow", "throttle T2": "red", "halt T3": "red bold"}
# Job outcomes (jobs.checks): ok, violation, error, not_available.
_OUTCOME_STYLE = {"OK": "green", "VIOLATION": "red bold", "FAIL": "red bold", "ERROR": "red bold",
                  "NOT_AVAILABLE": "yellow"}
# A control's state (cockpit.controls.PendingAction); anything else (PENDING, SENT) is cyan.
_ACTION_STYLE = {"APPLIED": "green", "REJECTED": "red bold", "UNCONFIRMED": "yellow",
                 cm.AWAITING_SECOND_APPROVER: "magenta bold"}


def dash(v: Any, fmt: str = "{}") -> str:
    """A missing value is a dash, never 0."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return fmt.format(v) if fmt != "{}" else (f"{v:.0f}" if v.is_integer() else f"{v:.2f}")
    return fmt.format(v)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def verify_audit(entries: list[dict[str, Any]] | None, head: str | None) -> tuple[str, str]:
    """Recompute the hashes and links of the entries we hold (newest first): (state, detail)."""
    if entries is None:
        return "UNKNOWN", "audit source unavailable"
    if not entries:
        return "EMPTY", "no entries"
    for i, e in enumerate(entries):
        body = {k: v for k, v in e.items() if k != "hash"}
        if hashlib.sha256(_canonical(body)).hexdigest() != e.get("hash"):
            return "BROKEN", f"seq {e.get('seq')}: hash does not match its content"
        if i + 1 < len(entries) and entries[i + 1].get("hash") != e.get("prev_hash"):
            return "BROKEN", f"seq {e.get('seq')}: prev_hash does not link to seq {entries[i + 1].get('seq')}"
    if head is not None and entries[0].get("hash") != head:
        return "BROKEN", "newest entry is not the chain head the edge reports"
    return "VERIFIED", f"{len(entries)} newest entries re-hashed and linked; head matches"


class SourceBar(Static):
    def show(self, snap: Snapshot | None) -> None:
        t = Text()
        if snap is None:
            t.append("waiting for the first poll...", style="dim")
        else:
            for name in SOURCE_NAMES:
                st = snap.sources.get(name)
                if st is None:
                    continue
                age = "" if st.age_s is None else f" {st.age_s:.0f}s" if st.age_s >= 1 else ""
                t.append(f" {name} ", style="bold")
                t.append(f"{st.state.value}{age}", style=_STATE_STYLE[st.state])
                t.append(" │")
        self.update(t)


class Tile(Static):
    def __init__(self, spec: TileSpec) -> None:
        super().__init__(id=f"tile-{spec.key}", classes="tile none")
        self.spec = spec

    def show(self, model: Model) -> None:
        snap = model.snapshot
        v = model.values.get(self.spec.key)
        st = snap.state(self.spec.source) if snap is not None else SourceState.DISCONNECTED
        lvl = level(self.spec, v)
        for c in ("ok", "warn", "crit", "none", "stale"):
            self.set_class(c == lvl, c)
        self.set_class(st is SourceState.STALE, "stale")
        t = Text()
        t.append(self.spec.title + "\n", style="bold")
        t.append(fmt_value(self.spec, v) + "\n", style="bold")
        t.append(sparkline(model.history.get(self.spec.key, []), 18) + "\n")
        if st is not SourceState.LIVE:
            age = snap.sources[self.spec.source].age_s if snap is not None and self.spec.source in snap.sources \
                else None
            t.append(f"{st.value}" + (f" {age:.0f}s" if age is not None else ""), style=_STATE_STYLE[st])
        self.update(t)


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        t = Text()
        t.append("spotex cockpit: commands\n\n", style="bold")
        for c in COMMANDS:
            t.append(f"{key_label(c):>3}  ", style="bold cyan")
            t.append(f"{c.title:<32}")
            t.append(c.help + ("  [control]" if c.control else "") + "\n", style="dim")
        t.append("\nctrl+p  command palette (the same commands)\n", style="dim")
        with Vertical(id="help-box"):
            yield Static(t, id="help-text")
            yield Button("Close", id="help-close")

    @on(Button.Pressed, "#help-close")
    def _close(self) -> None:
        self.dismiss(None)


class ControlScreen(ModalScreen[ControlRequest | None]):
    """Reason + ticket, impact from fresh server state, typed confirmation. Cancel has the focus and
    Enter in any field never confirms: only the Confirm button does, once the typed word matches."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "cancel", "Cancel")]

    def __init__(self, control: str, symbols: list[str], symbol: str | None = None, option: str | None = None
                 ) -> None:
        super().__init__()
        self.spec = CONTROLS[control]
        self.symbols = symbols
        self.init_symbol = symbol if symbol in symbols else (symbols[0] if symbols else None)
        self.init_option = option if option in self.spec.options else (self.spec.options[0] if self.spec.options
                                                                       else None)
        self.fresh: Snapshot | None = None
        # The fresh server state the impact is computed from (and that must be LIVE to confirm).
        self.state_source = self.spec.state_source

    def compose(self) -> ComposeResult:
        with Vertical(id="control-box"):
            yield Label(f"{self.spec.title}: {self.spec.help}", id="control-title")
            if self.spec.needs_symbol:
                yield Select([(s, s) for s in self.symbols], value=self.init_symbol or Select.NULL,
                             id="symbol", allow_blank=not self.symbols)
            if self.spec.options:
                yield Select([(o, o) for o in self.spec.options], value=self.init_option or Select.NULL,
                             id="option", allow_blank=False)
            if "rate" in self.spec.inputs:
                yield Input(placeholder=f"new orders per second (1..{MAX_THROTTLE}, required)", id="rate",
                            type="integer")
            if "burst" in self.spec.inputs:
                yield Input(placeholder="burst (optional; default one second's worth)", id="burst", type="integer")
            yield Input(placeholder="reason (required)", id="reason")
            yield Input(placeholder="ticket id (required)", id="ticket")
            yield Static("impact: loading fresh server state...", id="impact")
            yield Input(placeholder="type the confirmation word", id="confirm-word")
            with Horizontal(id="control-buttons"):
                yield Button("Cancel", id="cancel", variant="primary")
                yield Button("Confirm", id="confirm", variant="error", disabled=True)

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()
        self.load_impact()

    def _number(self, field: str) -> int | None:
        """An integer field's value; None when empty, not a number or out of the edge's bounds."""
        if field not in self.spec.inputs:
            return None
        try:
            v = int(self.query_one(f"#{field}", Input).value.strip())
        except ValueError:
            return None
        return v if 1 <= v <= MAX_THROTTLE else None

    def _numbers_ok(self) -> bool:
        if "rate" in self.spec.inputs and self._number("rate") is None:
            return False
        return not ("burst" in self.spec.inputs and self.query_one("#burst", Input).value.strip()
                    and self._number("burst") is None)

    def request(self) -> ControlRequest:
        sym = self.query_one("#symbol", Select).value if self.spec.needs_symbol else None
        opt = self.query_one("#option", Select).value if self.spec.options else None
        return ControlRequest(self.spec.id, str(sym) if isinstance(sym, str) else None,
                              str(opt) if isinstance(opt, str) else None,
                              self.query_one("#reason", Input).value.strip(),
                              self.query_one("#ticket", Input).value.strip(),
                              rate=self._number("rate"), burst=self._number("burst"))

    @work(exclusive=True, group="impact")
    async def load_impact(self) -> None:
        app = self.app
        assert isinstance(app, CockpitApp)
        self.fresh = await app.fresh_snapshot()
        self._render_impact()
        self._validate()

    def _render_impact(self) -> None:
        req = self.request()
        snap = self.fresh
        t = Text()
        if snap is None or snap.state(self.state_source) is not SourceState.LIVE:
            t.append("server state unavailable: cannot confirm\n", style="red")
        else:
            sym = req.symbol or ""
            for line in req.impact(snap.admin, snap.tickers.get(sym), snap.jobs, throttles=snap.throttles,
                                   order_rate=cm.command_rate(snap, sym), drop_rate=cm.throttle_drop_rate(snap, sym)):
                t.append("• " + line + "\n")
        t.append(f"type {req.confirm_word!r} to enable Confirm", style="bold")
        self.query_one("#impact", Static).update(t)

    def _validate(self) -> None:
        req = self.request()
        ok = (bool(req.reason) and bool(req.ticket) and (req.symbol is not None or not self.spec.needs_symbol)
              and self._numbers_ok()
              and self.query_one("#confirm-word", Input).value.strip() == req.confirm_word
              and self.fresh is not None and self.fresh.state(self.state_source) is SourceState.LIVE)
        self.query_one("#confirm", Button).disabled = not ok

    @on(Select.Changed)
    def _sel(self) -> None:
        if self.is_mounted:
            self._render_impact()
            self._validate()
            self.load_impact()

    @on(Input.Changed)
    def _typed(self, event: Input.Changed) -> None:
        if event.input.id in ("rate", "burst") and self.fresh is not None:
            self._render_impact()  # the "after" lines follow the numbers typed
        self._validate()

    @on(Input.Submitted)
    def _enter(self, event: Input.Submitted) -> None:
        event.stop()  # Enter alone never confirms

    @on(Button.Pressed, "#confirm")
    def _confirm(self) -> None:
        self._validate()
        if not self.query_one("#confirm", Button).disabled:
            self.dismiss(self.request())

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class CockpitApp(App[None]):
    TITLE = "spotex cockpit"
    CSS_PATH = "cockpit.tcss"
    COMMANDS = {CommandsProvider}
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = bindings()  # type: ignore[assignment]

    def __init__(self, poller: Poller, *, roles: frozenset[str] = frozenset(), poll_interval: float = 1.0,
                 jobs: dict[str, str] | None = None, readonly_reason: str | None = None) -> None:
        super().__init__()
        self.poller = poller
        self.roles = roles
        self.poll_interval = poll_interval
        self.jobs = jobs or {}
        self.model = Model()
        self.actions: list[PendingAction] = []
        self._readonly_reason = readonly_reason
        self._client = control_client()
        self.selected_symbol: str | None = None
        self.audit_state: tuple[str, str] = ("UNKNOWN", "not polled yet")
        self.polls = 0

    # --- roles -------------------------------------------------------------------------------------
    def can_control(self, control: str | None = None) -> tuple[bool, str]:
        if self.poller.key is None:
            return False, self._readonly_reason or "read-only: no operator key (--operator-key / SPOTEX_OPERATOR_KEY)"
        need = CONTROLS[control].role if control else "operator"
        # As the edge: roles are no hierarchy (an admin is not an approver); viewer is any role.
        if need in self.roles or (need == "viewer" and self.roles):
            return True, ""
        return False, self._readonly_reason or f"read-only: your roles {sorted(self.roles) or '-'} lack {need!r}"

    # --- layout ------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        ok, why = self.can_control()
        ok = ok or any(self.can_control(c)[0] for c in CONTROLS)  # e.g. an approver-only key
        yield Static(escape(f"OPERATOR {sorted(self.roles)}" if ok else why.upper()), id="mode-bar",
                     classes="operator" if ok else "readonly")
        with TabbedContent(initial="overview", id="tabs"):
            with TabPane("Overview [1]", id="overview"), VerticalScroll():
                for dash_name in DASHBOARDS:
                    yield Label(dash_name, classes="dash-title")
                    with Grid(classes="tiles"):
                        for spec in TILES:
                            if spec.dashboard == dash_name:
                                yield Tile(spec)
                    if dash_name == "Edge auth":
                        yield Static(id="auth-reasons")
            with TabPane("Markets [2]", id="markets"), Vertical():
                yield Static(id="markets-state")
                yield DataTable(id="markets-table", cursor_type="row")
            with TabPane("Ledger [3]", id="ledger"), VerticalScroll():
                yield DataTable(id="ledger-table", cursor_type="row")
                yield Static(id="invariants")
            with TabPane("Checks [4]", id="checks"), Vertical():
                yield Static(id="jobs-state")
                yield DataTable(id="jobs-table", cursor_type="row")
            with TabPane("Audit [5]", id="audit"), Vertical():
                yield Static(id="audit-state")
                yield DataTable(id="actions-table")
                yield DataTable(id="audit-table")
            with TabPane("Playbooks [6]", id="playbooks"), VerticalScroll():
                for i, pb in enumerate(PLAYBOOKS):
                    with Vertical(classes="playbook"):
                        yield Static(id=f"pb-{i}-signals")
                        with Horizontal(classes="pb-actions"):
                            for j, act in enumerate(pb.actions):
                                if act.control is not None:
                                    yield Button(act.label, id=f"pb-{i}-{j}", classes="pb-action")
        yield Static(id="last-action")
        yield SourceBar(id="sources")
        yield Footer()

    def on_mount(self) -> None:
        mt = self.query_one("#markets-table", DataTable)
        mt.add_columns("symbol", "mode", "best bid", "best ask", "last", "trades/s", "seq/s", "latch", "throttle",
                       "drops/s")
        lt = self.query_one("#ledger-table", DataTable)
        lt.add_columns("stream", "lag seq", "lag ms", "recon level", "applied seq", "engine seq", "stopped", "latch")
        jt = self.query_one("#jobs-table", DataTable)
        jt.add_columns("job", "schedule", "next run", "last run", "outcome", "summary")
        at = self.query_one("#audit-table", DataTable)
        at.add_columns("seq", "time (UTC)", "action", "actor", "params", "reason", "ticket")
        act = self.query_one("#actions-table", DataTable)
        act.add_columns("#", "control", "state", "audit", "detail")
        self.query_one(SourceBar).show(None)
        self._render_all()
        self.poll()

    async def on_unmount(self) -> None:
        await self._client.aclose()
        await self.poller.aclose()

    # --- polling -----------------------------------------------------------------------------------
    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        try:
            snap: Snapshot | None = await self.poller.poll()
        except Exception as exc:  # a source bug never ends the cockpit
            self.log.error(f"poll failed: {exc!r}")
            snap = None
        if snap is not None:
            self.apply_snapshot(snap)
        if self.poll_interval > 0:
            self.set_timer(self.poll_interval, self.poll)

    async def fresh_snapshot(self) -> Snapshot | None:
        try:
            snap = await self.poller.poll()
        except Exception:
            return None
        self.apply_snapshot(snap)
        return snap

    def apply_snapshot(self, snap: Snapshot) -> None:
        self.polls += 1
        self.model.update(snap)
        for a in self.actions:
            a.observe(snap)
        admin = snap.admin or {}
        self.audit_state = verify_audit(snap.audit, (admin.get("audit") or {}).get("head") if snap.admin else None)
        self._render_all()

    # --- rendering ---------------------------------------------------------------------------------
    def _render_all(self) -> None:
        try:
            self._render_all_unsafe()
        except NoMatches:
            pass  # the screen is being torn down (exit) or not composed yet: nothing to draw on

    def _render_all_unsafe(self) -> None:
        snap = self.model.snapshot
        self.query_one(SourceBar).show(snap)
        for tile in self.query(Tile):
            tile.show(self.model)
        self._render_auth_reasons()
        self._render_markets()
        self._render_ledger()
        self._render_jobs()
        self._render_audit()
        self._render_playbooks()
        self._render_last_action()

    @staticmethod
    def _src_note(snap: Snapshot | None, *names: str) -> Text:
        t = Text()
        for n in names:
            st = snap.sources.get(n) if snap is not None else None
            state = st.state if st is not None else SourceState.DISCONNECTED
            age = f" {st.age_s:.0f}s" if st is not None and st.age_s is not None else ""
            t.append(f"{n}: ")
            t.append(f"{state.value}{age}", style=_STATE_STYLE[state])
            if st is not None and st.error and state is not SourceState.LIVE:
                t.append(f" ({st.error})", style="dim")
            t.append("   ")
        return t

    def _render_markets(self) -> None:
        self.query_one("#markets-state", Static).update(self._src_note(self.model.snapshot, "market", "core", "admin",
                                                                       "throttles", "edge"))
        table = self.query_one("#markets-table", DataTable)
        cursor = table.cursor_row
        table.clear()
        for r in self.model.rows():
            throttled = r.throttle_rate is not None
            table.add_row(escape(r.symbol), dash(r.mode), dash(r.best_bid), dash(r.best_ask), dash(r.last),
                          dash(r.tps, "{:.1f}"), dash(r.seq_rate, "{:.1f}"),
                          self._latch_cell(r, styled=False),
                          Text(cm.throttle_text(r.throttle_rate, r.throttle_layer, r.throttle_others),
                               style="yellow bold" if throttled else ""),
                          Text(dash(r.throttle_drops, "{:.1f}"), style="red" if r.throttle_drops else ""),
                          key=r.symbol)
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))

    @staticmethod
    def _latch_cell(r: cm.SymbolRow, styled: bool = True) -> Text:
        """The latch word, with what a pending release approval awaits (``· awaiting 2nd approver``)."""
        t = Text(dash(r.latch), style="red bold" if styled and (r.latch or "").startswith("ENGAGED") else "")
        note = cm.approval_note(r.latch_approvals)
        if note:
            t.append(f" · {note}", style=_ACTION_STYLE[cm.AWAITING_SECOND_APPROVER])
        return t

    def _render_ledger(self) -> None:
        table = self.query_one("#ledger-table", DataTable)
        table.clear()
        for r in self.model.rows():
            level = None if r.recon_level is None else cm.RECON_LEVELS.get(int(r.recon_level), dash(r.recon_level))
            stopped = None if r.stopped is None else ("STOPPED" if r.stopped >= 0.5 else "no")
            table.add_row(escape(r.symbol), dash(r.settle_lag_seq), dash(r.settle_lag_ms),
                          Text(dash(level), style=_LEVEL_STYLE.get(level or "", "")), dash(r.applied_seq),
                          dash(r.engine_seq), Text(dash(stopped), style="red bold" if stopped == "STOPPED" else ""),
                          self._latch_cell(r), key=r.symbol)
        snap = self.model.snapshot
        t = self._src_note(snap, "ledger", "admin")
        t.append("\n\nLatest invariant run\n", style="bold")
        checks = self.model.invariant_checks()
        if not checks:
            t.append("  -\n")
        for name, ok in sorted(checks.items()):
            t.append(f"  {name:<24}")
            t.append("OK\n" if ok and ok >= 0.5 else "FAIL\n", style="green" if ok and ok >= 0.5 else "red bold")
        ledger = snap.metrics.get("ledger") if snap else None
        corr = ledger.get("ledger_corrections_pending") if ledger is not None else None
        t.append(f"\nCorrections pending: {dash(corr)}\n")
        pending = self.model.pending_approvals()
        if pending:
            t.append("\nLatch releases awaiting a second approver", style="bold")
            t.append(" (a distinct approver's release with the same ticket completes it)\n", style="dim")
            for sym, a in pending:
                t.append(f"  {sym:<10} ", style="bold")
                t.append(cm.AWAITING_SECOND_APPROVER, style=_ACTION_STYLE[cm.AWAITING_SECOND_APPROVER])
                t.append(f"  ticket {a.get('ticket', '-')}  approved by {a.get('actor', '-')} at "
                         f"{cm.approval_time(a)} (audit #{a.get('auditSeq', '-')})")
                if a.get("reason"):
                    t.append(f": {a['reason']}", style="dim")
                t.append("\n")
        self.query_one("#invariants", Static).update(t)

    def _render_auth_reasons(self) -> None:
        t = Text()
        t.append("auth failures by reason  ", style="bold")
        reasons = self.model.auth_fail_reasons()
        if reasons is None:
            t.append("-", style="dim")
        elif not reasons:
            t.append("none since the edge started", style="dim")
        for i, (reason, r, total) in enumerate(reasons or []):
            t.append(" · " if i else "")
            t.append(f"{reason} ", style="bold")
            t.append(f"{dash(r, '{:.2f}')}/s", style="yellow" if r else "")
            t.append(f" ({total:.0f} total)", style="dim")
        self.query_one("#auth-reasons", Static).update(t)

    def _render_jobs(self) -> None:
        snap = self.model.snapshot
        t = self._src_note(snap, "jobs")
        t.append("\n'n' runs the selected check now (operator; reason, ticket and typed confirmation).", style="dim")
        if snap is not None and snap.jobs is None:
            t.append("\nthe jobs service is unreachable: schedules below are from config, runs unknown", style="dim")
        self.query_one("#jobs-state", Static).update(t)
        table = self.query_one("#jobs-table", DataTable)
        cursor = table.cursor_row
        table.clear()
        for row in self.model.job_rows(self.jobs):
            cells: list[str | Text] = [escape(dash(v)) for v in row]
            cells[4] = Text(dash(row[4]), style=_OUTCOME_STYLE.get((row[4] or "").upper(), "dim"))
            table.add_row(*cells, key=row[0])
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))

    def _current_job(self) -> str | None:
        table = self.query_one("#jobs-table", DataTable)
        if table.row_count:
            try:
                return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
            except Exception:
                return None
        return None

    def _render_audit(self) -> None:
        snap = self.model.snapshot
        state, detail = self.audit_state
        t = self._src_note(snap, "audit")
        style = {"VERIFIED": "green", "BROKEN": "red bold", "EMPTY": "green"}.get(state, "yellow")
        t.append("\nchain: ")
        t.append(state, style=style)
        t.append(f"  {detail}")
        if snap is not None and snap.admin:
            head = snap.admin.get("audit") or {}
            t.append(f"  (head seq {dash(head.get('seq'))})", style="dim")
        self.query_one("#audit-state", Static).update(t)
        table = self.query_one("#audit-table", DataTable)
        table.clear()
        for e in (snap.audit or []) if snap is not None else []:
            ts = e.get("ts_ms")
            when = time.strftime("%H:%M:%S", time.gmtime(ts / 1000)) if isinstance(ts, int) else "-"
            table.add_row(dash(e.get("seq")), when, escape(str(e.get("action", "-"))),
                          escape(str(e.get("actor", "-"))),
                          escape(json.dumps(e.get("params", {}), sort_keys=True)),
                          escape(str(e.get("reason", "-"))), escape(str(e.get("ticket", "-"))))
        at = self.query_one("#actions-table", DataTable)
        at.clear()
        for a in reversed(self.actions):
            at.add_row(str(a.id), escape(a.request.describe()), Text(a.state, style=_ACTION_STYLE.get(a.state, "")),
                       f"#{a.audit_seq}" + (" ✓" if a.audited else "") if a.audit_seq else "-", escape(a.detail))

    def _render_playbooks(self) -> None:
        snap = self.model.snapshot
        for i, pb in enumerate(PLAYBOOKS):
            t = Text()
            t.append(f"§{pb.id} {pb.title} ({pb.severity})\n", style="bold")
            for spec in pb.signals:
                v = None
                if snap is not None:
                    try:
                        v = spec.compute(snap)
                    except Exception:
                        v = None
                lvl = level(spec, v)
                t.append(f"  {spec.title:<28}")
                t.append(fmt_value(spec, v), style={"ok": "green", "warn": "yellow", "crit": "red bold"}.get(lvl,
                                                                                                           "dim"))
                t.append("\n")
            if pb.details is not None:
                for line, lvl in pb.details(self.model):
                    t.append(f"  {line}\n", style={"ok": "green", "warn": "yellow", "crit": "red bold"}.get(lvl, "dim"))
            manual = [a.label for a in pb.actions if a.control is None]
            for m in manual:
                t.append(f"  · {m}\n", style="dim")
            self.query_one(f"#pb-{i}-signals", Static).update(t)
            for j, act in enumerate(pb.actions):
                if act.control is not None:
                    self.query_one(f"#pb-{i}-{j}", Button).disabled = not self.can_control(act.control)[0]

    def _render_last_action(self) -> None:
        w = self.query_one("#last-action", Static)
        if not self.actions:
            w.update("")
            w.display = False
            return
        a = self.actions[-1]
        w.display = True
        style = _ACTION_STYLE.get(a.state, "cyan")
        t = Text(f"action #{a.id} {a.request.describe()}: ")
        t.append(a.state, style=style)
        if a.detail:
            t.append(f"  {a.detail}")
        if a.audit_seq:
            t.append(f"  audit #{a.audit_seq}{' in chain' if a.audited else ''}")
        w.update(t)

    # --- commands ----------------------------------------------------------------------------------
    def action_run_command(self, cid: str) -> None:
        self.run_command(cid)

    def run_command(self, cid: str) -> None:
        cmd = by_id(cid)
        if cid in TABS:
            self.query_one(TabbedContent).active = cid
        elif cid == "help":
            self.push_screen(HelpScreen())
        elif cid == "quit":
            self.exit()
        elif cid == "refresh":
            self.poll()
        elif cid == "run_check":
            snap = self.model.snapshot
            if snap is None or snap.jobs is None:
                why = snap.sources["jobs"].error if snap is not None and "jobs" in snap.sources else None
                self.notify(escape(f"scheduled checks unavailable: {why or 'no data'}"), severity="warning")
            else:
                self.open_control("run_check", symbol=self._current_job())
        elif cmd.control is not None:
            self.open_control(cmd.control)

    def _current_symbol(self) -> str | None:
        table = self.query_one("#markets-table", DataTable)
        if table.row_count:
            try:
                return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
            except Exception:
                return None
        return None

    def open_control(self, control: str, symbol: str | None = None, option: str | None = None) -> None:
        ok, why = self.can_control(control)
        if not ok:
            self.notify(why, severity="error", title="read-only")
            return
        if CONTROLS[control].target == "job":
            targets = [str(j.get("name")) for j in (self.model.snapshot.jobs if self.model.snapshot else None) or []
                       if isinstance(j, dict) and j.get("name")]
            default = symbol
        else:
            targets = self.model.symbols()
            if control == "latch_release":  # the withdrawals latch (_sys) and any other latched stream
                targets += [s for s in self.model.latched() if s not in targets]
            default = symbol or self._current_symbol()
        self.push_screen(ControlScreen(control, targets, default, option), self._control_chosen)

    def _control_chosen(self, req: ControlRequest | None) -> None:
        if req is None:
            return
        pa = PendingAction(len(self.actions) + 1, req)
        self.actions.append(pa)
        self._render_all()
        self.send_control(pa)

    @work(group="control")
    async def send_control(self, pa: PendingAction) -> None:
        edge, key = self.poller.edge_url, self.poller.key
        if edge is None or key is None:
            pa.state, pa.detail = "REJECTED", "no edge endpoint or operator key"
        else:
            res = await send(self._client, edge, key, pa.request)
            pa.detail, pa.audit_seq = res.detail, res.audit_seq
            if not res.accepted:
                pa.state = "REJECTED"
            elif res.status == "AWAITING_SECOND_APPROVER":  # a recorded, pending step: not a failure
                pa.state = cm.AWAITING_SECOND_APPROVER
                self.notify(escape(res.detail), title=f"{pa.request.describe()}: awaiting a second approver")
            else:
                pa.state = "SENT"
        self._render_all()
        if pa.state == "REJECTED":
            self.notify(escape(pa.detail), title=f"{pa.request.describe()} refused", severity="error")
        self.poll()  # look for the service's own confirmation right away

    @on(Button.Pressed, ".pb-action")
    def _playbook_action(self, event: Button.Pressed) -> None:
        _, i, j = str(event.button.id).split("-")
        pb = PLAYBOOKS[int(i)]
        act = pb.actions[int(j)]
        if act.control is not None:
            self.open_control(act.control, symbol=pb.target(self.model) if pb.target else None, option=act.option)


def jobs_from_config(cfg: Any) -> dict[str, str]:
    """The scheduled checks and their cron schedules, from the config's [jobs] section."""
    jobs = getattr(cfg, "jobs", None)
    out: dict[str, str] = {}
    if jobs is None:
        return out
    for name in dir(jobs):
        if name.endswith("_cron"):
            out[name.removesuffix("_cron")] = str(getattr(jobs, name))
    return out


def default_data_dir(path: str | None) -> Path | None:
    return Path(path) if path else None
