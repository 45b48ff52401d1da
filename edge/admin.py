"""Operator routes (``/v1/admin``): Ed25519-signed requests with roles, every action audited first.

Order of every action: verify the operator's signature and role -> append the audit entry (reason
and ticket required, refused otherwise) -> take the action -> on failure append ``<Action>.failed``.
An action without an entry is impossible; an entry whose action failed is visible as such.

Roles (docs/security.md §3): reads need ``viewer`` (any role); SetSymbolMode, CancelAll,
WithdrawalsHalt and break-glass need ``operator``; a latch release needs ``approver``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import time
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from core.wire import (
    AdminCancelAll,
    CancelAllDone,
    CommandRejected,
    SetSymbolMode,
    SymbolMode,
    SymbolModeChanged,
    WithdrawalsHalt,
)
from edge.app import EdgeState, edge_state, json_response
from edge.auth import OperatorIdentity
from edge.core_client import correlation_for
from edge.errors import SpotexError, order_rejected
from edge.orders import _problem_responses
from ledger import audit

__all__ = ["ROUTES", "AdminIn", "BreakGlassIn", "ModeIn", "WithdrawalsHaltIn"]

ADMIN_ERRORS = _problem_responses(400, 401, 403, 404, 409, 422, 429, 503, 504)
_SEC: list[dict[str, list[str]]] = [{"apiKey": []}]


class AdminIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: str = ""
    ticket: str = ""


class ModeIn(AdminIn, kw_only=True, forbid_unknown_fields=True):
    mode: SymbolMode


class WithdrawalsHaltIn(AdminIn, kw_only=True, forbid_unknown_fields=True):
    on: bool


class BreakGlassIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: str = ""
    ticket: str | None = None
    ttl_s: int = 3600


def _symbol(st: EdgeState, symbol: str) -> str:
    if symbol not in st.markets:
        raise SpotexError("NOT_FOUND", detail=f"unknown symbol {symbol!r}")
    return symbol


async def _audited(st: EdgeState, ident: OperatorIdentity, action: str, params: dict[str, Any], body: AdminIn,
                   act: Any) -> Any:
    """Append, then act; record a failure as a follow-up entry."""
    entry = await audit.append(st.pool, ident, action, params, body.reason, body.ticket)
    try:
        result = await act()
    except Exception as exc:
        code = exc.code if isinstance(exc, SpotexError) else "INTERNAL"
        with contextlib.suppress(Exception):
            await audit.append(st.pool, ident, f"{action}.failed", {**params, "error": code,
                                                                     "audit_seq": entry.seq},
                               body.reason, body.ticket)
        raise
    return entry, result


def _check_core(events: list[Any]) -> None:
    for ev in events:
        if isinstance(ev, CommandRejected):
            raise order_rejected(str(ev.code), ev.detail or None)


async def _operator_command(request: Request[Any, Any, Any], symbol: str | None, action: str,
                            params: dict[str, Any], body: AdminIn, cmd: Any,
                            until_done: Any = None) -> tuple[EdgeState, Any, list[Any]]:
    """The shape every operator command to the core shares: operator auth, the symbol known, the
    audit entry appended first (a failure recorded after it), the command submitted and a core
    rejection raised as its problem. Returns the edge state, the audit entry and the core's events."""
    st = edge_state(request)
    ident = await st.authenticate_operator(request, "operator")
    if symbol is not None:
        _symbol(st, symbol)
    assert st.core is not None
    core = st.core

    async def act() -> list[Any]:
        kw = {} if until_done is None else {"until_done": until_done}
        res = await core.submit(cmd, correlation_for(ident.key_hex, None), symbol=symbol, **kw)
        _check_core(res.events)
        return list(res.events)

    entry, events = await _audited(st, ident, action, params, body, act)
    return st, entry, events


@post("/v1/admin/symbols/{symbol:str}/mode", status_code=200, responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
      summary="SetSymbolMode (operator): NORMAL, CANCEL_ONLY, SOFT_HALT, HARD_HALT")
async def set_mode(request: Request[Any, Any, Any], symbol: str, data: ModeIn) -> Response[Any]:
    st, entry, events = await _operator_command(
        request, symbol, "SetSymbolMode", {"symbol": symbol, "mode": str(data.mode)}, data,
        SetSymbolMode(symbol=symbol, mode=data.mode, reason=data.reason, ticket=data.ticket))
    ev = next((e for e in events if isinstance(e, SymbolModeChanged)), None)
    if ev is not None:
        st.modes[symbol] = str(ev.mode)
    return json_response({"symbol": symbol, "mode": str(data.mode),
                          "previousMode": str(ev.previous_mode) if ev is not None else None,
                          "seq": ev.seq if ev is not None else None, "auditSeq": entry.seq})


@post("/v1/admin/symbols/{symbol:str}/cancel-all", status_code=200, responses=ADMIN_ERRORS, security=_SEC,
      tags=["admin"], summary="CancelAll(symbol) (operator): cancel every open order of the market")
async def admin_cancel_all(request: Request[Any, Any, Any], symbol: str, data: AdminIn) -> Response[Any]:
    _st, entry, events = await _operator_command(
        request, symbol, "CancelAll", {"symbol": symbol}, data,
        AdminCancelAll(symbol=symbol, reason=data.reason, ticket=data.ticket),
        until_done=lambda e: isinstance(e, (CancelAllDone, CommandRejected)))
    n = sum(e.canceled for e in events if isinstance(e, CancelAllDone))
    return json_response({"symbol": symbol, "canceled": n, "auditSeq": entry.seq})


@post("/v1/admin/withdrawals/halt", status_code=200, responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
      summary="WithdrawalsHalt on/off (operator)")
async def withdrawals_halt(request: Request[Any, Any, Any], data: WithdrawalsHaltIn) -> Response[Any]:
    st, entry, _events = await _operator_command(
        request, None, "WithdrawalsHalt", {"on": data.on}, data,
        WithdrawalsHalt(on=data.on, reason=data.reason, ticket=data.ticket))
    st.withdrawals_halted = data.on
    return json_response({"withdrawalsHalted": data.on, "auditSeq": entry.seq})


def _reconcile() -> Any:
    try:
        return importlib.import_module("ledger.reconcile")
    except ImportError:
        return None


# A second approver's release counts the earlier requests of other approvers for the same latch
# (engaged after the same audit entry) and the same ticket, made within this window.
APPROVAL_WINDOW_MS = 3_600_000
SYS_STREAM = "_sys"


async def latch_approvals(st: EdgeState, symbol: str, engaged_seq: int | None,
                          ticket: str | None = None) -> list[dict[str, Any]]:
    """The recorded approvals (``LatchReleaseRequested`` entries) of ``symbol``'s current latch within
    the window, oldest first: one per (ticket, approver), the earliest, as ``{"actor", "ticket",
    "auditSeq", "tsMs", "reason"}``; only ``ticket``'s when given."""
    rows = await st.pool.fetch(
        "SELECT seq, actor, ts_ms, body FROM audit_chain WHERE chain = 'admin' AND action = 'LatchReleaseRequested' "
        "AND seq > $1 AND ts_ms >= $2 ORDER BY seq", engaged_seq or 0, time.time_ns() // 1_000_000 - APPROVAL_WINDOW_MS)
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for r in rows:
        body = json.loads(r["body"])
        t = str(body.get("ticket") or "")
        if (body.get("params") or {}).get("symbol") != symbol or (ticket is not None and t != ticket.strip()):
            continue
        if (t, str(r["actor"])) in seen:
            continue
        seen.add((t, str(r["actor"])))
        out.append({"actor": str(r["actor"]), "ticket": t, "auditSeq": int(r["seq"]), "tsMs": int(r["ts_ms"]),
                    "reason": body.get("reason")})
    return out


class LatchAwaitingSecondApprover(msgspec.Struct, kw_only=True):
    """202 of a latch release whose approval is recorded and awaits a distinct second approver."""

    status: str  # AWAITING_SECOND_APPROVER
    symbol: str
    ticket: str
    approvers: list[str]
    auditSeq: int


_RELEASE_RESPONSES = {**ADMIN_ERRORS, 202: ResponseSpec(
    data_container=LatchAwaitingSecondApprover, generate_examples=False,
    description="Approval recorded (LatchReleaseRequested); a distinct second approver must send the same ticket")}


async def _earlier_approvers(st: EdgeState, symbol: str, engaged_seq: int | None, ticket: str) -> list[str]:
    return list(dict.fromkeys(a["actor"] for a in await latch_approvals(st, symbol, engaged_seq, ticket)))


async def pending_approvals(st: EdgeState, latches: Any) -> None:
    """Adds ``pendingApprovals`` (see :func:`latch_approvals`) to each engaged latch of an admin status
    ``latches`` map where a release needs a second approver (``[]`` otherwise or when released)."""
    rec = _reconcile()
    if not isinstance(latches, dict) or "error" in latches or rec is None:
        return
    second = rec.second_approver_required(st.cfg)
    for symbol, latch in latches.items():
        if isinstance(latch, dict):
            latch["pendingApprovals"] = (await latch_approvals(st, symbol, latch.get("engaged_audit_seq"))
                                         if second and latch.get("engaged") else [])


@post("/v1/admin/reconciliation/latch/{symbol:str}/release", status_code=200, responses=_RELEASE_RESPONSES,
      security=_SEC, tags=["admin"],
      summary="Release the reconciliation latch of a symbol (approver; `_sys` resumes withdrawals)")
async def latch_release(request: Request[Any, Any, Any], symbol: str, data: AdminIn) -> Response[Any]:
    """Audited (``LatchReleaseRequested``) before anything changes. ``ledger.reconcile.release_latch``
    then checks lag 0 (the engine's seq on EVT, read over the edge's JetStream context) and the
    invariants, writes ``LatchRelease`` and sends NORMAL to the core. A refusal is a problem+json with
    the ledger's code (LATCH_NOT_FOUND, LATCH_NOT_ENGAGED, LAG_NOT_ZERO, ...) and a
    ``LatchReleaseRequested.failed`` entry.

    Where a second approver is required, the first approver's request records the approval (the
    ``LatchReleaseRequested`` entry) and answers 202 ``AWAITING_SECOND_APPROVER``; the same approver
    again is 409 ``APPROVER_ALREADY_APPROVED`` with nothing recorded; a distinct approver's request
    with the same ticket (within ``APPROVAL_WINDOW_MS``) completes the release (200)."""
    st = edge_state(request)
    ident = await st.authenticate_operator(request, "approver")
    if symbol != SYS_STREAM:
        _symbol(st, symbol)
    rec = _reconcile()
    if rec is None or st.pool is None:
        raise SpotexError("UNAVAILABLE", detail="the reconciliation latch is not available in this deployment")
    if not data.reason.strip():
        raise SpotexError("AUDIT_REASON_REQUIRED", detail="an approval reason is required")
    if not data.ticket.strip():
        raise SpotexError("AUDIT_TICKET_REQUIRED", detail="a ticket id is required")
    latch = (await rec.latch_state(st.pool)).get(symbol)
    if latch is None:
        raise SpotexError("LATCH_NOT_FOUND", detail=f"the latch of {symbol} was never engaged")
    if not latch.get("engaged"):
        raise SpotexError("LATCH_NOT_ENGAGED", detail=f"the latch of {symbol} is already released")
    if st.js is None or st.nc is None or not st.nc.is_connected:
        raise SpotexError("ENGINE_UNAVAILABLE", detail="the edge has no JetStream connection: cannot check the lag")
    second = rec.second_approver_required(st.cfg)
    earlier = await _earlier_approvers(st, symbol, latch.get("engaged_audit_seq"), data.ticket)
    approvers = list(dict.fromkeys([*earlier, ident.actor]))
    params = {"symbol": symbol, "latched_mode": latch.get("mode"), "second_approver": second}
    if second and len(approvers) < 2:
        if ident.actor in earlier:  # a repeat: still one approval, and nothing new in the chain
            raise SpotexError("APPROVER_ALREADY_APPROVED",
                              detail=f"{ident.actor} already approved the release of {symbol} on ticket "
                                     f"{data.ticket.strip()}; a distinct second approver must send it")
        entry = await audit.append(st.pool, ident, "LatchReleaseRequested", params, data.reason, data.ticket)
        return json_response({"status": "AWAITING_SECOND_APPROVER", "symbol": symbol, "ticket": data.ticket.strip(),
                              "approvers": approvers, "auditSeq": entry.seq}, status=202)
    js = st.js

    async def act() -> Any:
        res = await rec.release_latch(st.pool, symbol, approvers, data.reason, data.ticket, js=js,
                                      evt_stream=st.cfg.nats.evt_stream, requires_second_approver=second)
        if not res.ok:
            raise SpotexError(res.code, status=res.status, detail=res.detail)
        return res

    entry, res = await _audited(st, ident, "LatchReleaseRequested", params, data, act)
    if symbol == SYS_STREAM:
        st.withdrawals_halted = False
    elif res.mode_set:
        st.modes[symbol] = res.mode_set
    return json_response({"symbol": symbol, "released": True, "modeSet": res.mode_set, "lag": res.lag,
                          "approvers": approvers, "releaseAuditSeq": res.audit_seq, "auditSeq": entry.seq})


@post("/v1/admin/break-glass/enable", status_code=200, responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
      summary="Enable break-glass for ttl_s seconds (operator)")
async def break_glass_enable(request: Request[Any, Any, Any], data: BreakGlassIn) -> Response[Any]:
    st = edge_state(request)
    ident = await st.authenticate_operator(request, "operator")
    s = await audit.break_glass_enable(st.pool, ident, data.ttl_s, data.reason, data.ticket)
    return json_response(s.to_dict())


@post("/v1/admin/break-glass/disable", status_code=200, responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
      summary="Disable break-glass (operator)")
async def break_glass_disable(request: Request[Any, Any, Any], data: BreakGlassIn) -> Response[Any]:
    st = edge_state(request)
    ident = await st.authenticate_operator(request, "operator")
    s = await audit.break_glass_disable(st.pool, ident, data.reason, data.ticket)
    return json_response(s.to_dict())


@get("/v1/admin/break-glass", responses=ADMIN_ERRORS, security=_SEC, tags=["admin"], summary="Break-glass status")
async def break_glass_status(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    await st.authenticate_operator(request, "viewer")
    return json_response((await audit.break_glass_status(st.pool)).to_dict())


@get("/v1/admin/status", responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
     summary="Summary for the cockpit: core, modes, withdrawals, latches, break-glass, audit head")
async def admin_status(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    await st.authenticate_operator(request, "viewer")
    core: Any
    try:
        assert st.core is not None
        core = await st.core.query("status")
    except SpotexError as exc:
        core = {"error": exc.code}
    latches: Any = None
    rec = _reconcile()
    for name in ("latch_state",):
        fn = getattr(rec, name, None) if rec is not None else None
        if fn is not None:
            try:
                got = await fn(st.pool)
                latches = got.to_dict() if hasattr(got, "to_dict") else got
                latches = json.loads(json.dumps(latches, default=str))
                await pending_approvals(st, latches)
            except Exception as exc:
                latches = {"error": type(exc).__name__}
            break
    seq, h = await audit.head(st.pool)
    bg = await audit.break_glass_status(st.pool)
    return json_response({
        "core": core, "modes": await st.symbol_modes(), "withdrawalsHalted": await st.withdrawals_state(),
        "latches": latches, "breakGlass": bg.to_dict(), "audit": {"seq": seq, "head": h},
        "edge": {"readiness": await st.ready_reason() or "ready", "startedMs": st.started_ms},
    })


@get("/v1/admin/audit", responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
     summary="Audit chain entries, newest first")
async def audit_list(request: Request[Any, Any, Any],
                     limit: Annotated[int, Parameter(query="limit", ge=1, le=1000)] = 100,
                     before_seq: Annotated[int | None, Parameter(query="beforeSeq", ge=1)] = None,
                     chain: Annotated[str, Parameter(query="chain", pattern=r"^[a-z]{1,32}$")] = "admin",
                     ) -> Response[Any]:
    st = edge_state(request)
    await st.authenticate_operator(request, "viewer")
    if chain not in ("admin", "change"):
        raise SpotexError("VALIDATION", detail="chain must be admin or change")
    rows = await st.pool.fetch(
        "SELECT body FROM audit_chain WHERE chain = $1 AND ($2::bigint IS NULL OR seq < $2) ORDER BY seq DESC LIMIT $3",
        chain, before_seq, limit)
    return json_response([json.loads(r["body"]) for r in rows])


@get("/v1/admin/audit/export", responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
     summary="The whole chain as JSONL (oldest first), verifiable with `spotex audit verify --file`")
async def audit_export(request: Request[Any, Any, Any],
                       chain: Annotated[str, Parameter(query="chain", pattern=r"^[a-z]{1,32}$")] = "admin",
                       ) -> Response[bytes]:
    st = edge_state(request)
    await st.authenticate_operator(request, "viewer")
    if chain not in ("admin", "change"):
        raise SpotexError("VALIDATION", detail="chain must be admin or change")
    rows = await st.pool.fetch("SELECT body FROM audit_chain WHERE chain = $1 ORDER BY seq", chain)
    body = "".join(r["body"] + "\n" for r in rows).encode()
    return Response(content=body, media_type="application/x-ndjson",
                    headers={"Content-Disposition": f'attachment; filename="audit-{chain}.jsonl"'})


# --- scheduled checks (the jobs service's NATS request/reply API) --------------------------------

JOBS_LIST_SUBJECT = "jobs.list"
JOBS_RUN_SUBJECT = "jobs.run"
JOBS_LIST_TIMEOUT_S = 3.0
JOBS_RUN_TIMEOUT_S = 60.0  # a run replies when it ends; the checks are seconds, not minutes
_JOB_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


async def _jobs_request(st: EdgeState, subject: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to the jobs service; 503 UNAVAILABLE (with why) when it cannot answer."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    if st.nc is None or not st.nc.is_connected:
        raise SpotexError("UNAVAILABLE", detail="the edge is not connected to NATS")
    try:
        msg = await st.nc.request(subject, json.dumps(payload).encode(), timeout=timeout)
    except NoRespondersError:
        raise SpotexError("UNAVAILABLE", detail=f"no jobs service answers {subject} (not running, or a version "
                                                "without its request API)") from None
    except NatsTimeout:
        raise SpotexError("UNAVAILABLE",
                          detail=f"the jobs service did not answer {subject} in {timeout:.0f}s") from None
    try:
        out = json.loads(msg.data)
    except ValueError:
        out = None
    if not isinstance(out, dict):
        raise SpotexError("UNAVAILABLE", detail=f"the jobs service sent a malformed reply to {subject}")
    return out


@get("/v1/admin/jobs", responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
     summary="Scheduled checks: schedule, next run, last run and its outcome (viewer)")
async def jobs_list(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    await st.authenticate_operator(request, "viewer")
    out = await _jobs_request(st, JOBS_LIST_SUBJECT, {}, JOBS_LIST_TIMEOUT_S)
    if not isinstance(out.get("jobs"), list):
        why = f"{out.get('error')}: {out.get('detail') or ''}" if out.get("error") else "no jobs array"
        raise SpotexError("UNAVAILABLE", detail=f"the jobs service could not list its jobs ({why})"[:300])
    return json_response({"jobs": out["jobs"]})


@post("/v1/admin/jobs/{name:str}/run", status_code=200, responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
      summary="Run a scheduled check now (operator); replies with its outcome when it ends")
async def job_run(request: Request[Any, Any, Any], name: str, data: AdminIn) -> Response[Any]:
    st = edge_state(request)
    ident = await st.authenticate_operator(request, "operator")
    if not _JOB_NAME.match(name):
        raise SpotexError("VALIDATION", detail="a job name is 1-64 characters of [a-z0-9_], starting with a letter")

    async def act() -> dict[str, Any]:
        out = await _jobs_request(st, JOBS_RUN_SUBJECT, {"job": name, "actor": ident.actor, "reason": data.reason,
                                                         "ticket": data.ticket}, JOBS_RUN_TIMEOUT_S)
        err = out.get("error")
        if err in ("UNKNOWN_JOB", "JOB_RUNNING"):
            raise SpotexError(str(err), detail=f"{name}: {out.get('detail') or err}")
        if err is not None:
            raise SpotexError("UNAVAILABLE", detail=f"the jobs service refused the run: {err}")
        return out

    entry, out = await _audited(st, ident, "RunCheck", {"job": name}, data, act)
    return json_response({"job": name, "runId": out.get("run_id"), "outcome": out.get("outcome"),
                          "summary": out.get("summary"), "auditSeq": entry.seq})


ROUTES = [set_mode, admin_cancel_all, withdrawals_halt, latch_release, break_glass_enable, break_glass_disable,
          break_glass_status, admin_status, audit_list, audit_export, jobs_list, job_run]


# --- symbol throttle (per-symbol new-order limit; edge.throttle, KV bucket symbol_throttle) --------


class ThrottleIn(AdminIn, kw_only=True, forbid_unknown_fields=True):
    ordersPerSecond: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
    burst: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None  # default: one second's worth


class ThrottleClearIn(AdminIn, kw_only=True, forbid_unknown_fields=True):
    layer: Annotated[str, msgspec.Meta(pattern="^(operator|policy|all)$")] = "operator"


async def _audited_entry(st: EdgeState, ident: OperatorIdentity, action: str, params: dict[str, Any], body: AdminIn,
                         act: Any) -> Any:
    """As :func:`_audited`, but ``act`` receives the audit entry (its seq is stored with the setting)."""
    entry = await audit.append(st.pool, ident, action, params, body.reason, body.ticket)
    try:
        result = await act(entry)
    except Exception as exc:
        code = exc.code if isinstance(exc, SpotexError) else "INTERNAL"
        with contextlib.suppress(Exception):
            await audit.append(st.pool, ident, f"{action}.failed", {**params, "error": code, "audit_seq": entry.seq},
                               body.reason, body.ticket)
        raise
    return entry, result


@post("/v1/admin/symbols/{symbol:str}/throttle", status_code=200, responses=ADMIN_ERRORS, security=_SEC,
      tags=["admin"], summary="SetSymbolThrottle (operator): limit NEW orders/s on a symbol across all traders")
async def throttle_set(request: Request[Any, Any, Any], symbol: str, data: ThrottleIn) -> Response[Any]:
    """Audited (``SetSymbolThrottle``) before it is written to ``symbol_throttle`` (operator layer),
    which every edge watches. Cancels are never throttled."""
    from core.bus import SymbolThrottle, throttle_bucket, throttle_key

    st = edge_state(request)
    ident = await st.authenticate_operator(request, "operator")
    _symbol(st, symbol)
    if st.js is None:
        raise SpotexError("UNAVAILABLE", detail="the edge has no JetStream connection")
    burst = data.burst if data.burst is not None else data.ordersPerSecond
    params = {"symbol": symbol, "layer": "operator", "orders_per_s": data.ordersPerSecond, "burst": burst}
    js = st.js

    async def act(entry: Any) -> Any:
        s = SymbolThrottle(symbol=symbol, layer="operator", orders_per_s=data.ordersPerSecond, burst=burst,
                           actor=ident.actor, reason=data.reason.strip(), ticket=data.ticket.strip(),
                           audit_seq=entry.seq, set_at_ms=time.time_ns() // 1_000_000)
        kv = await throttle_bucket(js)
        rev = await kv.put(throttle_key(symbol, "operator"), msgspec.json.encode(s))
        return s, rev

    entry, (s, rev) = await _audited_entry(st, ident, "SetSymbolThrottle", params, data, act)
    if st.throttle is not None:
        st.throttle.set_local(s)
    eff = st.throttle.effective(symbol) if st.throttle is not None else s
    return json_response({"symbol": symbol, "layer": "operator", "ordersPerSecond": s.orders_per_s, "burst": burst,
                          "effective": {"ordersPerSecond": eff.orders_per_s, "burst": eff.burst, "layer": eff.layer}
                          if eff is not None else None, "revision": rev, "auditSeq": entry.seq})


@post("/v1/admin/symbols/{symbol:str}/throttle/clear", status_code=200, responses=ADMIN_ERRORS, security=_SEC,
      tags=["admin"], summary="ClearSymbolThrottle (operator): the operator's layer, the policy's, or all")
async def throttle_clear(request: Request[Any, Any, Any], symbol: str, data: ThrottleClearIn) -> Response[Any]:
    """Audited (``ClearSymbolThrottle``) before the keys are deleted. Clearing the ``policy`` layer
    lifts the settlement-lag job's throttle now; the job sets it again on its next run if the lag is
    still at or beyond T2. 404 THROTTLE_NOT_SET (nothing audited) when the layer(s) hold nothing."""
    from core.bus import throttle_bucket, throttle_key
    from edge.throttle import read_settings

    st = edge_state(request)
    ident = await st.authenticate_operator(request, "operator")
    _symbol(st, symbol)
    if st.js is None:
        raise SpotexError("UNAVAILABLE", detail="the edge has no JetStream connection")
    kv = await throttle_bucket(st.js)
    present = (await read_settings(st.js)).get(symbol, {})
    layers = [la for la in ("operator", "policy") if data.layer in (la, "all") and la in present]
    if not layers:
        raise SpotexError("THROTTLE_NOT_SET", detail=f"{symbol} has no {data.layer} throttle")
    params = {"symbol": symbol, "layers": layers,
              "was": {la: {"orders_per_s": present[la][0].orders_per_s, "actor": present[la][0].actor}
                      for la in layers}}

    async def act() -> Any:
        for la in layers:
            await kv.delete(throttle_key(symbol, la))
        return layers

    entry, _ = await _audited(st, ident, "ClearSymbolThrottle", params, data, act)
    if st.throttle is not None:
        for la in layers:
            st.throttle.clear_local(symbol, la)
    eff = st.throttle.effective(symbol) if st.throttle is not None else None
    return json_response({"symbol": symbol, "cleared": layers,
                          "effective": {"ordersPerSecond": eff.orders_per_s, "burst": eff.burst, "layer": eff.layer}
                          if eff is not None else None, "auditSeq": entry.seq})


@get("/v1/admin/throttles", responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
     summary="Symbol throttles: every layer in symbol_throttle and what this edge enforces (viewer)")
async def throttle_list(request: Request[Any, Any, Any]) -> Response[Any]:
    from edge.throttle import read_settings

    st = edge_state(request)
    await st.authenticate_operator(request, "viewer")
    if st.js is None:
        raise SpotexError("UNAVAILABLE", detail="the edge has no JetStream connection")
    stored = await read_settings(st.js)
    enforced = st.throttle.snapshot() if st.throttle is not None else {}
    out = {sym: {"layers": {la: {"ordersPerSecond": s.orders_per_s, "burst": s.burst, "actor": s.actor,
                                 "reason": s.reason, "ticket": s.ticket, "auditSeq": s.audit_seq,
                                 "setAtMs": s.set_at_ms, "revision": rev} for la, (s, rev) in layers.items()},
                 "enforced": enforced.get(sym)}
           for sym, layers in sorted(stored.items())}
    return json_response({"throttles": out})


ROUTES += [throttle_set, throttle_clear, throttle_list]
