"""The seed §6 emergency controls as signed edge admin requests, and how each one is confirmed by
the services' own state afterwards (a 200 from the edge is "sent", not "applied")."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from cockpit.signing import OperatorKey
from cockpit.sources import Snapshot

__all__ = ["CONTROLS", "MODES", "ControlRequest", "ControlSpec", "PendingAction", "latch_text", "send"]

MODES = ("CANCEL_ONLY", "SOFT_HALT", "HARD_HALT", "NORMAL")


@dataclass(frozen=True)
class ControlSpec:
    id: str
    title: str
    needs_symbol: bool
    options: tuple[str, ...]
    role: str
    help: str
    target: str = "symbol"  # what needs_symbol picks: a market symbol, or a scheduled check ("job")


CONTROLS: dict[str, ControlSpec] = {c.id: c for c in (
    ControlSpec("set_mode", "SetSymbolMode", True, MODES, "operator",
                "Set a symbol's trading mode (CANCEL_ONLY / SOFT_HALT / HARD_HALT / NORMAL)."),
    ControlSpec("cancel_all", "CancelAll", True, (), "operator", "Cancel every open order of a symbol."),
    ControlSpec("withdrawals", "WithdrawalsHalt", False, ("on", "off"), "operator", "Halt or resume withdrawals."),
    ControlSpec("latch_release", "LatchRelease", True, (), "approver",
                "Release a symbol's reconciliation safety latch (manual release only)."),
    ControlSpec("break_glass", "BreakGlass", False, ("enable", "disable"), "operator",
                "Enable or disable break-glass access."),
    ControlSpec("run_check", "RunCheck", True, (), "operator",
                "Run a scheduled check now (the jobs service runs it and reports its outcome).", target="job"),
)}


def latch_text(latch: Any) -> str:
    """A latch row of admin status as a word: ENGAGED <mode>, released, or a dash."""
    if isinstance(latch, dict):
        return f"ENGAGED {latch.get('mode') or ''}".strip() if latch.get("engaged") else "released"
    return "-" if latch is None else str(latch)


@dataclass(frozen=True)
class ControlRequest:
    control: str
    symbol: str | None  # the target: a market symbol, or the job name for run_check
    option: str | None
    reason: str
    ticket: str

    @property
    def spec(self) -> ControlSpec:
        return CONTROLS[self.control]

    @property
    def confirm_word(self) -> str:
        """What the operator types to confirm: the symbol, or the action's name."""
        return self.symbol if self.spec.needs_symbol and self.symbol else self.spec.title

    def describe(self) -> str:
        parts = [self.spec.title]
        if self.symbol:
            parts.append(self.symbol)
        if self.option:
            parts.append(self.option)
        return " ".join(parts)

    def http(self) -> tuple[str, dict[str, Any]]:
        rt = {"reason": self.reason, "ticket": self.ticket}
        if self.control == "set_mode":
            return f"/v1/admin/symbols/{self.symbol}/mode", {"mode": self.option, **rt}
        if self.control == "cancel_all":
            return f"/v1/admin/symbols/{self.symbol}/cancel-all", rt
        if self.control == "withdrawals":
            return "/v1/admin/withdrawals/halt", {"on": self.option == "on", **rt}
        if self.control == "latch_release":
            return f"/v1/admin/reconciliation/latch/{self.symbol}/release", rt
        if self.control == "break_glass":
            action = "enable" if self.option == "enable" else "disable"
            return f"/v1/admin/break-glass/{action}", rt
        if self.control == "run_check":
            return f"/v1/admin/jobs/{self.symbol}/run", rt
        raise ValueError(self.control)

    def impact(self, admin: dict[str, Any] | None, ticker: dict[str, Any] | None,
               jobs: list[dict[str, Any]] | None = None) -> list[str]:
        """What changes, from fresh server state (admin status, ticker, scheduled checks)."""
        if admin is None:
            return ["server state unavailable: impact unknown"]
        modes = admin.get("modes") or {}
        out: list[str] = []
        if self.control == "set_mode":
            cur = modes.get(self.symbol, "-")
            out.append(f"{self.symbol}: mode {cur} -> {self.option}")
            if cur == self.option:
                out.append("already in this mode: no change")
            if self.option in ("SOFT_HALT", "HARD_HALT"):
                out.append("new orders are refused" + ("; open orders are canceled" if self.option == "HARD_HALT"
                                                       else ""))
            elif self.option == "CANCEL_ONLY":
                out.append("only cancels are accepted")
        elif self.control == "cancel_all":
            out.append(f"every open order of {self.symbol} is canceled (mode {modes.get(self.symbol, '-')})")
        elif self.control == "withdrawals":
            cur = admin.get("withdrawalsHalted")
            out.append(f"withdrawals halted: {'-' if cur is None else cur} -> {self.option == 'on'}")
        elif self.control == "latch_release":
            latches = admin.get("latches")
            got = latches.get(self.symbol) if isinstance(latches, dict) else None
            out.append(f"latch of {self.symbol}: {latch_text(got)} -> released")
            if isinstance(got, dict) and got.get("engaged"):
                out.append(f"cause {got.get('cause', '-')}: {got.get('reason', '-')}")
                out.append("the ledger refuses unless lag is 0 and the invariants pass; then the mode goes NORMAL")
            elif latches is not None:
                out.append("no engaged latch: the edge will refuse this release")
        elif self.control == "break_glass":
            bg = admin.get("breakGlass") or {}
            out.append(f"break-glass active: {bg.get('active', '-')} -> {self.option == 'enable'}")
        elif self.control == "run_check":
            job = next((j for j in jobs or [] if isinstance(j, dict) and j.get("name") == self.symbol), None)
            if job is None:
                out.append(f"check {self.symbol}: unknown to the jobs service (or it is unreachable)")
            else:
                last = job.get("last_run") or {}
                out.append(f"check {self.symbol} ({job.get('schedule', '-')}) runs now, once")
                out.append(f"last run: {last.get('outcome') or '-'} at {last.get('started_at') or '-'}")
            return out
        if ticker:
            out.append(f"{self.symbol} bid {ticker.get('bestBid') or '-'} ask {ticker.get('bestAsk') or '-'}"
                       f" last {ticker.get('last') or '-'}")
        return out

    def confirmed_by(self, snap: Snapshot) -> bool | None:
        """True once the services' own state shows the action applied; None when it cannot tell."""
        admin = snap.admin
        if admin is None:
            return None
        if self.control == "set_mode":
            return (admin.get("modes") or {}).get(self.symbol) == self.option
        if self.control == "withdrawals":
            return admin.get("withdrawalsHalted") == (self.option == "on")
        if self.control == "break_glass":
            return (admin.get("breakGlass") or {}).get("active") == (self.option == "enable")
        if self.control == "latch_release":
            latch = (admin.get("latches") or {}).get(self.symbol)
            return None if not isinstance(latch, dict) else latch.get("engaged") is False
        return None  # cancel-all and run-check: confirmed by the response and the audit entry


@dataclass
class PendingAction:
    """One control from confirmation to its outcome."""

    id: int
    request: ControlRequest
    started: float = field(default_factory=time.time)
    state: str = "PENDING"  # PENDING -> SENT -> APPLIED | REJECTED | UNCONFIRMED
    detail: str = ""
    audit_seq: int | None = None
    audited: bool = False

    @property
    def done(self) -> bool:
        return self.state in ("APPLIED", "REJECTED", "UNCONFIRMED")

    def observe(self, snap: Snapshot, timeout_s: float = 20.0) -> None:
        """Move SENT to APPLIED when the service's state and the audit chain show it."""
        if self.audit_seq is not None and snap.audit is not None:
            self.audited = any(e.get("seq") == self.audit_seq for e in snap.audit if isinstance(e, dict))
        if self.state != "SENT":
            return
        ok = self.request.confirmed_by(snap)
        if (ok is True or (ok is None and self.audited)) and (self.audited or self.audit_seq is None):
            self.state = "APPLIED"
        elif snap.at - self.started > timeout_s:
            self.state = "UNCONFIRMED"
            self.detail = (self.detail + "; " if self.detail else "") + "service state did not confirm in time"


async def send(client: httpx.AsyncClient, edge_url: str, key: OperatorKey, req: ControlRequest
               ) -> tuple[bool, str, int | None]:
    """POST the signed request; (accepted, detail, audit seq). Never raises for an HTTP refusal."""
    path, payload = req.http()
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {**key.headers("POST", path, body), "Content-Type": "application/json"}
    # A check run replies when the check ends (the edge waits up to 60 s); the others are quick.
    timeout = 75.0 if req.control == "run_check" else 10.0
    try:
        r = await client.post(edge_url + path, content=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return False, f"not sent: {type(exc).__name__} {exc}".strip(), None
    try:
        data = r.json()
    except ValueError:
        data = {}
    if r.status_code >= 400:
        code = data.get("code") if isinstance(data, dict) else None
        detail = data.get("detail") if isinstance(data, dict) else None
        return False, f"{r.status_code} {code or ''} {detail or r.reason_phrase}".strip(), None
    seq = data.get("auditSeq", data.get("audit_seq")) if isinstance(data, dict) else None
    summary = ", ".join(f"{k}={v}" for k, v in data.items() if k != "auditSeq") if isinstance(data, dict) else ""
    return True, summary, int(seq) if isinstance(seq, int) else None
