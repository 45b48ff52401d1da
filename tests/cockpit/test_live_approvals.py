"""Pilot test of the two-approver latch release on a real stack configured as production is
(``ledger.latch_requires_second_approver``): the first approval shows as AWAITING SECOND APPROVER (a
pending step, not REJECTED) and on the Ledger screen; the same approver again is refused with its
reason; a distinct approver's release completes it and the pending action turns APPLIED."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from textual.widgets import DataTable, Static

from cockpit.controls import ControlRequest, send
from cockpit.model import AWAITING_SECOND_APPROVER
from cockpit.signing import OperatorKey
from spotex.testing import Stack, stack
from tests.cockpit.conftest import _key
from tests.cockpit.test_live import _confirm, _until
from tests.edge.test_admin_latch import engage_latch_async, wait_lag_zero_async

pytestmark = pytest.mark.slow


@dataclass
class TwoApprovers:
    stack: Stack
    first: OperatorKey
    second: OperatorKey


@pytest.fixture(scope="module")
def two_approvers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoApprovers]:
    a, b = _key(), _key()
    keys = {a.public_hex: ["approver"], b.public_hex: ["approver"]}
    data_dir: Path = tmp_path_factory.mktemp("cockpit-approvals") / "stack"
    with stack(data_dir, env={"SPOTEX_SECURITY__ADMIN_KEYS": json.dumps(keys),
                              "SPOTEX_LEDGER__LATCH_REQUIRES_SECOND_APPROVER": "true"}) as st:
        yield TwoApprovers(st, a, b)


def _actor(k: OperatorKey) -> str:
    return f"op-{k.public_hex[:12]}:{k.public_hex[:16]}"  # how the edge names a config key in the audit chain


async def test_first_approval_awaits_the_second_approver(two_approvers: TwoApprovers) -> None:
    from cockpit.app import CockpitApp
    from cockpit.sources import HttpPoller

    sym, ta = "BTC-USDT", two_approvers
    app = CockpitApp(HttpPoller(ta.stack.data_dir, key=ta.first), roles=frozenset({"approver"}), poll_interval=0.5)
    async with app.run_test(size=(180, 50)) as pilot:
        await _until(pilot, lambda: app.model.snapshot is not None and app.model.snapshot.admin is not None)
        await engage_latch_async(ta.stack, sym)
        await _until(pilot, lambda: next((r.latch for r in app.model.rows() if r.symbol == sym), None)
                     == "ENGAGED CANCEL_ONLY")
        await wait_lag_zero_async(ta.stack, sym)

        # The first approval: recorded and pending, not refused.
        app.call_later(app.open_control, "latch_release", symbol=sym)
        await _confirm(pilot, app, "lag 0", "I-9", sym, "ENGAGED CANCEL_ONLY -> released")
        await _until(pilot, lambda: bool(app.actions) and app.actions[-1].state not in ("PENDING", "SENT"))
        first = app.actions[-1]
        assert first.state == AWAITING_SECOND_APPROVER and not first.done, first
        assert "202 approval recorded" in first.detail and "I-9" in first.detail, first.detail
        await _until(pilot, lambda: first.audited)
        entry = next(e for e in app.model.snapshot.audit or [] if e["seq"] == first.audit_seq)  # type: ignore[union-attr]
        assert entry["action"] == "LatchReleaseRequested" and entry["actor"] == _actor(ta.first)
        assert entry["params"] == {"symbol": sym, "latched_mode": "CANCEL_ONLY", "second_approver": True}
        assert AWAITING_SECOND_APPROVER in str(app.query_one("#last-action", Static).render())
        assert "REJECTED" not in str(app.query_one("#last-action", Static).render())
        # The Ledger screen: the latched symbol's pending approval (who, ticket, audit entry).
        row = next(r for r in app.model.rows() if r.symbol == sym)
        assert [(a["actor"], a["ticket"], a["auditSeq"]) for a in row.latch_approvals] == [
            (_actor(ta.first), "I-9", first.audit_seq)]
        await pilot.press("3")
        await pilot.pause(0.2)
        table = app.query_one("#ledger-table", DataTable)
        latch_cell = str(table.get_row(sym)[-1])
        assert latch_cell == "ENGAGED CANCEL_ONLY · awaiting 2nd approver", latch_cell
        ledger_text = str(app.query_one("#invariants", Static).render())
        assert "Latch releases awaiting a second approver" in ledger_text
        assert f"ticket I-9  approved by {_actor(ta.first)}" in ledger_text and f"#{first.audit_seq}" in ledger_text

        # The same approver again: the impact shows the pending approval; the edge refuses with its reason.
        app.call_later(app.open_control, "latch_release", symbol=sym)
        await _confirm(pilot, app, "again", "I-9", sym, f"approval pending: {_actor(ta.first)} on ticket I-9")
        await _until(pilot, lambda: len(app.actions) == 2 and app.actions[-1].done)
        again = app.actions[-1]
        assert again.state == "REJECTED" and "409 APPROVER_ALREADY_APPROVED" in again.detail, again
        assert first.state == AWAITING_SECOND_APPROVER

        # A distinct approver sends the same release (the cockpit's own signed request): released.
        async with httpx.AsyncClient() as client:
            assert app.poller.edge_url is not None
            res = await send(client, app.poller.edge_url, ta.second, ControlRequest("latch_release", sym, None,
                                                                                     "checked too", "I-9"))
        assert res.accepted and res.status is None and "released=True" in res.detail, res
        await _until(pilot, lambda: first.done, timeout=30)
        assert first.state == "APPLIED" and "latch released" in first.detail, first
        await _until(pilot, lambda: next(r.latch for r in app.model.rows() if r.symbol == sym) == "released")
        assert app.model.pending_approvals() == []
        assert "awaiting a second approver" not in str(app.query_one("#invariants", Static).render())
        assert app.audit_state[0] == "VERIFIED"
