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
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import Parameter

from core.wire import (
    AdminCancelAll,
    CancelAllDone,
    CommandRejected,
    SetSymbolMode,
    SymbolMode,
    SymbolModeChanged,
    WithdrawalsHalt,
    WithdrawalsHaltChanged,
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


@post("/v1/admin/symbols/{symbol:str}/mode", status_code=200, responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
      summary="SetSymbolMode (operator): NORMAL, CANCEL_ONLY, SOFT_HALT, HARD_HALT")
async def set_mode(request: Request[Any, Any, Any], symbol: str, data: ModeIn) -> Response[Any]:
    st = edge_state(request)
    ident = await st.authenticate_operator(request, "operator")
    _symbol(st, symbol)
    assert st.core is not None
    core = st.core

    async def act() -> Any:
        res = await core.submit(SetSymbolMode(symbol=symbol, mode=data.mode, reason=data.reason, ticket=data.ticket),
                                correlation_for(ident.key_hex, None), symbol=symbol)
        _check_core(res.events)
        return next((e for e in res.events if isinstance(e, SymbolModeChanged)), None)

    entry, ev = await _audited(st, ident, "SetSymbolMode", {"symbol": symbol, "mode": str(data.mode)}, data, act)
    if ev is not None:
        st.modes[symbol] = str(ev.mode)
    return json_response({"symbol": symbol, "mode": str(data.mode),
                          "previousMode": str(ev.previous_mode) if ev is not None else None,
                          "seq": ev.seq if ev is not None else None, "auditSeq": entry.seq})


@post("/v1/admin/symbols/{symbol:str}/cancel-all", status_code=200, responses=ADMIN_ERRORS, security=_SEC,
      tags=["admin"], summary="CancelAll(symbol) (operator): cancel every open order of the market")
async def admin_cancel_all(request: Request[Any, Any, Any], symbol: str, data: AdminIn) -> Response[Any]:
    st = edge_state(request)
    ident = await st.authenticate_operator(request, "operator")
    _symbol(st, symbol)
    assert st.core is not None
    core = st.core

    async def act() -> Any:
        res = await core.submit(AdminCancelAll(symbol=symbol, reason=data.reason, ticket=data.ticket),
                                correlation_for(ident.key_hex, None), symbol=symbol,
                                until_done=lambda e: isinstance(e, (CancelAllDone, CommandRejected)))
        _check_core(res.events)
        return sum(e.canceled for e in res.events if isinstance(e, CancelAllDone))

    entry, n = await _audited(st, ident, "CancelAll", {"symbol": symbol}, data, act)
    return json_response({"symbol": symbol, "canceled": n, "auditSeq": entry.seq})


@post("/v1/admin/withdrawals/halt", status_code=200, responses=ADMIN_ERRORS, security=_SEC, tags=["admin"],
      summary="WithdrawalsHalt on/off (operator)")
async def withdrawals_halt(request: Request[Any, Any, Any], data: WithdrawalsHaltIn) -> Response[Any]:
    st = edge_state(request)
    ident = await st.authenticate_operator(request, "operator")
    assert st.core is not None
    core = st.core

    async def act() -> Any:
        res = await core.submit(WithdrawalsHalt(on=data.on, reason=data.reason, ticket=data.ticket),
                                correlation_for(ident.key_hex, None), symbol=None)
        _check_core(res.events)
        return next((e for e in res.events if isinstance(e, WithdrawalsHaltChanged)), None)

    entry, _ev = await _audited(st, ident, "WithdrawalsHalt", {"on": data.on}, data, act)
    st.withdrawals_halted = data.on
    return json_response({"withdrawalsHalted": data.on, "auditSeq": entry.seq})


def _reconcile() -> Any:
    try:
        return importlib.import_module("ledger.reconcile")
    except ImportError:
        return None


@post("/v1/admin/reconciliation/latch/{symbol:str}/release", status_code=200, responses=ADMIN_ERRORS,
      security=_SEC, tags=["admin"], summary="Release the reconciliation latch of a symbol (approver)")
async def latch_release(request: Request[Any, Any, Any], symbol: str, data: AdminIn) -> Response[Any]:
    st = edge_state(request)
    ident = await st.authenticate_operator(request, "approver")
    _symbol(st, symbol)
    rec = _reconcile()
    fn = getattr(rec, "release_latch", None) if rec is not None else None
    if fn is None:
        raise SpotexError("UNAVAILABLE", detail="the reconciliation latch is not available in this deployment")

    async def act() -> Any:
        return await fn(st.pool, symbol, [ident.actor], data.reason, data.ticket)

    entry, result = await _audited(st, ident, "LatchReleaseRequested", {"symbol": symbol}, data, act)
    out = result if isinstance(result, (dict, list, str, int, bool)) or result is None else str(result)
    if hasattr(result, "to_dict"):
        out = result.to_dict()
    return json_response({"symbol": symbol, "result": out, "auditSeq": entry.seq})


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
    for name in ("latch_states", "latch_status", "latches"):
        fn = getattr(rec, name, None) if rec is not None else None
        if fn is not None:
            try:
                got = await fn(st.pool)
                latches = got.to_dict() if hasattr(got, "to_dict") else got
                latches = json.loads(json.dumps(latches, default=str))
            except Exception as exc:
                latches = {"error": type(exc).__name__}
            break
    seq, h = await audit.head(st.pool)
    bg = await audit.break_glass_status(st.pool)
    return json_response({
        "core": core, "modes": await st.symbol_modes(), "withdrawalsHalted": st.withdrawals_halted,
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


ROUTES = [set_mode, admin_cancel_all, withdrawals_halt, latch_release, break_glass_enable, break_glass_disable,
          break_glass_status, admin_status, audit_list, audit_export]
