"""The seed §6 emergency controls as signed edge admin requests, and how each one is confirmed by
the services' own state afterwards (a 200 from the edge is "sent", not "applied")."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from cockpit.model import AWAITING_SECOND_APPROVER, approval_time, latch_approvals
from cockpit.signing import OperatorKey
from cockpit.sources import Snapshot

__all__ = ["CONTROLS", "MAX_THROTTLE", "MODES", "THROTTLE_LAYERS", "ControlRequest", "ControlSpec", "PendingAction",
           "SendResult", "latch_text", "send", "throttle_layers_text"]

MODES = ("CANCEL_ONLY", "SOFT_HALT", "HARD_HALT", "NORMAL")
THROTTLE_LAYERS = ("operator", "policy", "all")  # what ClearSymbolThrottle lifts
MAX_THROTTLE = 1_000_000  # the edge's bound on ordersPerSecond and burst


@dataclass(frozen=True)
class ControlSpec:
    id: str
    title: str
    needs_symbol: bool
    options: tuple[str, ...]
    role: str
    help: str
    target: str = "symbol"  # what needs_symbol picks: a market symbol, or a scheduled check ("job")
    # The source whose fresh state gives the impact and confirms the action (must be LIVE to confirm).
    state_source: str = "admin"
    inputs: tuple[str, ...] = ()  # numeric fields: "rate" (required), "burst" (optional)


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
                "Run a scheduled check now (the jobs service runs it and reports its outcome).", target="job",
                state_source="jobs"),
    ControlSpec("set_throttle", "SetSymbolThrottle", True, (), "operator",
                "Limit NEW orders/s on a symbol across all traders (operator layer; cancels pass).",
                state_source="throttles", inputs=("rate", "burst")),
    ControlSpec("clear_throttle", "ClearSymbolThrottle", True, THROTTLE_LAYERS, "operator",
                "Lift a symbol's throttle: the operator layer, the settlement-lag policy's, or all.",
                state_source="throttles"),
)}


def _layers(entry: Any) -> dict[str, Any]:
    layers = entry.get("layers") if isinstance(entry, dict) else None
    return layers if isinstance(layers, dict) else {}


def throttle_layers_text(entry: Any) -> str:
    """The layers of one symbol in GET /v1/admin/throttles as words: ``operator 50/s burst 50 (by ..., T-1)``."""
    layers = entry.get("layers") if isinstance(entry, dict) else None
    if not isinstance(layers, dict) or not layers:
        return "none"
    parts = []
    for la in sorted(layers):
        v = layers[la] if isinstance(layers[la], dict) else {}
        parts.append(f"{la} {v.get('ordersPerSecond', '-')}/s burst {v.get('burst', '-')}"
                     f" (by {v.get('actor') or '-'}, {v.get('ticket') or '-'})")
    return "; ".join(parts)


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
    rate: int | None = None  # SetSymbolThrottle: orders/s
    burst: int | None = None  # SetSymbolThrottle: None = the edge's default (one second's worth)

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
        if self.rate is not None:
            parts.append(f"{self.rate}/s" + (f" burst {self.burst}" if self.burst is not None else ""))
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
        if self.control == "set_throttle":
            body: dict[str, Any] = {"ordersPerSecond": self.rate}
            if self.burst is not None:
                body["burst"] = self.burst
            return f"/v1/admin/symbols/{self.symbol}/throttle", {**body, **rt}
        if self.control == "clear_throttle":
            return f"/v1/admin/symbols/{self.symbol}/throttle/clear", {"layer": self.option or "operator", **rt}
        raise ValueError(self.control)

    def cleared_layers(self) -> tuple[str, ...]:
        return ("operator", "policy") if self.option == "all" else (self.option or "operator",)

    def throttle_impact(self, throttles: dict[str, Any] | None, order_rate: float | None,
                        drop_rate: float | None) -> list[str]:
        """Set/clear throttle: the layers now (GET /v1/admin/throttles), what the edge will enforce after,
        and the symbol's recent command rate and throttle refusals (metrics)."""
        if throttles is None:
            return ["throttle state unavailable: impact unknown"]
        entry = throttles.get(self.symbol or "")
        layers = _layers(entry)
        enf = entry.get("enforced") if isinstance(entry, dict) else None
        now = f"{enf.get('ordersPerSecond')}/s ({enf.get('layer')})" if isinstance(enf, dict) else "none"
        out = [f"{self.symbol} throttle layers: {throttle_layers_text(entry)}", f"enforced now: {now}"]
        after = {la: (int(v.get("ordersPerSecond") or 0), int(v.get("burst") or 0)) for la, v in layers.items()
                 if isinstance(v, dict)}
        if self.control == "set_throttle":
            if self.rate is None:
                out.append("enter orders/s (1..1000000) to see the effect")
            else:
                burst = self.burst if self.burst is not None else self.rate
                old = after.get("operator")
                out.append(f"operator layer: {f'{old[0]}/s burst {old[1]}' if old else 'none'} -> {self.rate}/s"
                           f" burst {burst}")
                after["operator"] = (self.rate, burst)
        else:
            gone = [la for la in self.cleared_layers() if la in after]
            if not gone:
                out.append(f"no {self.option or 'operator'} layer set: the edge will refuse (THROTTLE_NOT_SET)")
            else:
                out.append(f"clears: {', '.join(gone)}")
                if "policy" in gone:
                    out.append("the settlement_lag job sets its layer again at its next run while lag >= T2")
            for la in gone:
                after.pop(la, None)
        if after:
            la, (r, b) = min(after.items(), key=lambda kv: (kv[1][0], kv[1][1]))
            out.append(f"enforced after: {r}/s burst {b} ({la}); new orders beyond it get 429 SYMBOL_THROTTLED,"
                       " cancels pass")
        else:
            out.append("enforced after: none (new orders unthrottled)")
        rate_txt = "-" if order_rate is None else f"{order_rate:.1f}"
        drops_txt = "-" if drop_rate is None else f"{drop_rate:.1f}"
        out.append(f"recent rate: {rate_txt} commands/s on {self.symbol}; throttle refusals {drops_txt}/s")
        return out

    def impact(self, admin: dict[str, Any] | None, ticker: dict[str, Any] | None,
               jobs: list[dict[str, Any]] | None = None, *, throttles: dict[str, Any] | None = None,
               order_rate: float | None = None, drop_rate: float | None = None) -> list[str]:
        """What changes, from fresh server state (admin status, ticker, scheduled checks, throttles)."""
        if self.control in ("set_throttle", "clear_throttle"):
            lines = self.throttle_impact(throttles, order_rate, drop_rate)
            if admin is not None:
                lines.append(f"{self.symbol} mode {(admin.get('modes') or {}).get(self.symbol, '-')}")
            return lines
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
                for a in latch_approvals(got):
                    out.append(f"approval pending: {a.get('actor', '-')} on ticket {a.get('ticket', '-')} at "
                               f"{approval_time(a)}: a distinct approver with the same ticket completes it")
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

    def confirmed_by(self, snap: Snapshot, audit_seq: int | None = None) -> bool | None:
        """True once the services' own state shows the action applied; None when it cannot tell."""
        if self.control in ("set_throttle", "clear_throttle"):
            if snap.throttles is None:
                return None
            layers = _layers(snap.throttles.get(self.symbol or ""))
            if self.control == "clear_throttle":
                return not any(la in layers for la in self.cleared_layers())
            got = layers.get("operator")
            # Ours, not an earlier identical setting: the stored layer names the audit entry that set it.
            return (isinstance(got, dict) and got.get("ordersPerSecond") == self.rate
                    and got.get("burst") == (self.burst if self.burst is not None else self.rate)
                    and (audit_seq is None or got.get("auditSeq") == audit_seq))
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
    # PENDING -> SENT -> APPLIED | REJECTED | UNCONFIRMED; a latch release's first approval (202) is
    # PENDING -> AWAITING SECOND APPROVER -> APPLIED (the latch released) | UNCONFIRMED (the approval lapsed).
    state: str = "PENDING"
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
        if self.state == AWAITING_SECOND_APPROVER:
            self._observe_approval(snap)
            return
        if self.state != "SENT":
            return
        ok = self.request.confirmed_by(snap, self.audit_seq)
        if ok is None and self.request.spec.state_source == "throttles":
            ok = False  # only the throttle list itself confirms a throttle change: wait for it
        if (ok is True or (ok is None and self.audited)) and (self.audited or self.audit_seq is None):
            self.state = "APPLIED"
        elif snap.at - self.started > timeout_s:
            self.state = "UNCONFIRMED"
            self.detail = (self.detail + "; " if self.detail else "") + "service state did not confirm in time"


    def _observe_approval(self, snap: Snapshot) -> None:
        """A recorded approval waits (up to the edge's 1 h window) for a distinct second approver: the
        latch released means done; our approval gone from the latch's pending list means it lapsed."""
        latches = snap.admin.get("latches") if snap.admin is not None else None
        latch = latches.get(self.request.symbol) if isinstance(latches, dict) else None
        if not isinstance(latch, dict):
            return  # cannot tell: keep waiting
        if latch.get("engaged") is False:
            self.state = "APPLIED"
            self.detail = (self.detail + "; " if self.detail else "") + "latch released"
        elif "pendingApprovals" in latch and not any(a.get("auditSeq") == self.audit_seq
                                                     for a in latch_approvals(latch)):
            self.state = "UNCONFIRMED"
            self.detail = (self.detail + "; " if self.detail else "") + \
                "the approval is no longer pending (older than 1 h, or the latch engaged again)"


@dataclass(frozen=True)
class SendResult:
    accepted: bool
    detail: str
    audit_seq: int | None
    status: str | None = None  # the body's "status" (AWAITING_SECOND_APPROVER for a 202 first approval)


def control_client() -> httpx.AsyncClient:
    """The HTTP client controls are sent with: a new connection for every control. Controls are minutes
    apart and a signed, audited POST is not retried (the edge may have acted on it), so a pooled
    connection would mostly be one the edge's keep-alive timeout (uvicorn: 5 s) is closing as the
    request goes out, and the control would fail with ``ReadError`` without reaching the edge."""
    return httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_keepalive_connections=0))


async def send(client: httpx.AsyncClient, edge_url: str, key: OperatorKey, req: ControlRequest) -> SendResult:
    """POST the signed request. Never raises for an HTTP refusal."""
    path, payload = req.http()
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {**key.headers("POST", path, body), "Content-Type": "application/json"}
    # A check run replies when the check ends (the edge waits up to 60 s); the others are quick.
    timeout = 75.0 if req.control == "run_check" else 10.0
    try:
        r = await client.post(edge_url + path, content=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return SendResult(False, f"not sent: {type(exc).__name__} {exc}".strip(), None)
    try:
        data = r.json()
    except ValueError:
        data = {}
    if r.status_code >= 400:
        code = data.get("code") if isinstance(data, dict) else None
        detail = data.get("detail") if isinstance(data, dict) else None
        return SendResult(False, f"{r.status_code} {code or ''} {detail or r.reason_phrase}".strip(), None)
    seq = data.get("auditSeq", data.get("audit_seq")) if isinstance(data, dict) else None
    status = data.get("status") if isinstance(data, dict) and r.status_code == 202 else None
    if status == "AWAITING_SECOND_APPROVER":
        approvers = data.get("approvers") or []
        summary = (f"202 approval recorded ({', '.join(map(str, approvers))}, ticket {data.get('ticket')}); "
                   "a distinct approver must send the same release")
    else:
        summary = ", ".join(f"{k}={v}" for k, v in data.items() if k != "auditSeq") if isinstance(data, dict) else ""
    return SendResult(True, summary, int(seq) if isinstance(seq, int) else None,
                      str(status) if isinstance(status, str) else None)
