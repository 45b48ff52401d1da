"""Reconciliation against the engine, the safety latch, and the automatic responses.

- Lag: for every stream, the engine's seq (``Spotex-Last-Seq`` of the stream's last EVT message)
  against the ledger's checkpoint. ``lag >= lag_warn_seq`` warns; ``lag >= lag_throttle_seq`` (T2)
  held for ``lag_breach_s`` engages the symbol's latch with CANCEL_ONLY; ``lag >= lag_halt_seq`` (T3)
  escalates it to SOFT_HALT (seed §3.2). A breach on ``_sys`` (deposits, withdrawals) latches the
  withdrawals instead (WithdrawalsHalt on).
- The latch never releases itself. :func:`release_latch` (the edge's
  ``POST /v1/admin/reconciliation/latch/{symbol}/release`` and ``spotex ledger latch release``)
  needs an approval reason and ticket, a distinct second approver when required, lag 0 and passing
  invariants; it then sets the symbol back to NORMAL through the core's admin command.
- Responses to alerts (seed §3.1): an invariant violation halts withdrawals and sets the affected
  symbols CANCEL_ONLY (latched); a stopped stream (gap, fencing refusal) latches its symbol.

Every automatic action is appended to the audit chain (actor ``ledger``) before it takes effect:
the latch row changes in the same transaction as its audit entry, and a command to the core is sent
only after its entry is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import Gauge

from core.bus import cmd_subject
from core.bus import evt_last_seqs as engine_seqs
from core.wire import SetSymbolMode, SymbolMode, WithdrawalsHalt, encode_request
from ledger import audit
from ledger.invariants import run_invariants

__all__ = [
    "MODE_RANK",
    "CoreAdmin",
    "LatchReleaseResult",
    "Reconciler",
    "ReconcilerOptions",
    "Responder",
    "engage_latch",
    "engine_seqs",
    "lag_report",
    "latch_state",
    "release_latch",
    "second_approver_required",
]

log = logging.getLogger("ledger.reconcile")

ACTOR = "ledger"
SYS = "_sys"
MODE_RANK = {"NORMAL": 0, "CANCEL_ONLY": 1, "SOFT_HALT": 2, "HARD_HALT": 3}

M_LAG_SEQ = Gauge("ledger_settlement_lag_seq", "Engine seq (EVT) minus ledger seq, per stream", ["stream"])
M_ENGINE_SEQ = Gauge("ledger_engine_seq", "Engine seq per stream as seen on EVT", ["stream"])
M_LEVEL = Gauge("ledger_reconciliation_level", "0 ok, 1 warn, 2 throttle (T2), 3 halt (T3)", ["stream"])
M_LATCH = Gauge("ledger_latch_engaged", "1 while the symbol's safety latch is engaged", ["symbol"])
M_LATCH_MODE = Gauge("ledger_latch_mode", "Mode the latch holds: 0 none, 1 CANCEL_ONLY, 2 SOFT_HALT, 3 HARD_HALT",
                     ["symbol"])

LEVELS = ("ok", "warn", "throttle", "halt")


def second_approver_required(cfg: Any) -> bool:
    """Release needs a distinct second approver when configured, and always in production."""
    return bool(cfg.ledger.latch_requires_second_approver or getattr(cfg, "production", False))


# --------------------------------------------------------------------------------------------------
# Commands to the core


class CoreAdmin:
    """Publishes the core's admin commands on CMD (JetStream, unique Nats-Msg-Id), each appended to
    the audit chain first."""

    def __init__(self, pool: Any, js: Any, actor: str = ACTOR) -> None:
        self.pool = pool
        self.js = js
        self.actor = actor

    async def publish(self, cmd: Any, msg_id: str) -> None:
        symbol = getattr(cmd, "symbol", None)
        await self.js.publish(cmd_subject(symbol), encode_request(cmd), headers={"Nats-Msg-Id": msg_id}, timeout=5.0)

    async def send(self, cmd: SetSymbolMode | WithdrawalsHalt, *, reason: str, ticket: str,
                   params: dict[str, Any] | None = None, actor: str | None = None, audited: bool = False) -> int | None:
        """Audit (unless the caller already did), then publish. Returns the audit seq."""
        seq = None
        if not audited:
            entry = await audit.append(self.pool, actor or self.actor, type(cmd).__name__,
                                       {**_cmd_params(cmd), **(params or {})}, reason, ticket)
            seq = entry.seq
        await self.publish(cmd, f"ledger:{type(cmd).__name__}:{uuid.uuid4().hex}")
        return seq


def _cmd_params(cmd: Any) -> dict[str, Any]:
    if isinstance(cmd, SetSymbolMode):
        return {"symbol": cmd.symbol, "mode": str(cmd.mode)}
    if isinstance(cmd, WithdrawalsHalt):
        return {"on": cmd.on}
    return {}


def _latch_cmd(symbol: str, mode: str, reason: str, ticket: str) -> SetSymbolMode | WithdrawalsHalt:
    if symbol == SYS:
        return WithdrawalsHalt(on=mode != "NORMAL", reason=reason, ticket=ticket)
    return SetSymbolMode(symbol=symbol, mode=SymbolMode(mode), reason=reason, ticket=ticket)


# --------------------------------------------------------------------------------------------------
# Engine and ledger positions


async def lag_report(pool: Any, js: Any | None, evt_stream: str = "EVT") -> dict[str, dict[str, Any]]:
    """Per stream: engine seq, ledger seq, lag, settlement state (engine side empty without ``js``)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT stream, last_seq, state, stop_reason, last_occurred_at_ms, updated_at "
            "FROM ledger_consumer_checkpoint ORDER BY stream")
    eng = await engine_seqs(js, evt_stream) if js is not None else {}
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        out[r["stream"]] = {"ledger_seq": r["last_seq"], "state": r["state"], "stop_reason": r["stop_reason"],
                            "last_occurred_at_ms": r["last_occurred_at_ms"]}
    for s, e in eng.items():
        out.setdefault(s, {"ledger_seq": 0, "state": "running", "stop_reason": None, "last_occurred_at_ms": 0})
        out[s]["engine_seq"] = e
    for v in out.values():
        if "engine_seq" in v:
            v["lag"] = max(0, v["engine_seq"] - v["ledger_seq"])
    return out


async def latch_state(pool: Any) -> dict[str, dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM ledger_latches ORDER BY symbol")
    return {r["symbol"]: {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in dict(r).items()}
            for r in rows}


# --------------------------------------------------------------------------------------------------
# The latch


async def engage_latch(pool: Any, admin: CoreAdmin | None, symbol: str, mode: str, cause: str, reason: str,
                       ticket: str, detail: dict[str, Any] | None = None) -> bool:
    """Engage (or escalate) the latch of ``symbol`` and set its mode through the core.

    The latch row changes together with its audit entry (actor ``ledger``); the command to the core
    follows. Never lowers a latch, never releases one. Returns True when something changed."""
    if mode not in ("CANCEL_ONLY", "SOFT_HALT", "HARD_HALT"):
        raise ValueError(f"latch mode {mode!r}")
    action = "LatchEngage"
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT * FROM ledger_latches WHERE symbol = $1 FOR UPDATE", symbol)
        if row is not None and row["engaged"] and MODE_RANK[row["mode"]] >= MODE_RANK[mode]:
            return False
        if row is not None and row["engaged"]:
            action = "LatchEscalate"
        params = {"symbol": symbol, "mode": mode, "cause": cause, **(detail or {})}
        entry = await audit.append(conn, ACTOR, action, params, reason, ticket)
        await conn.execute(
            """INSERT INTO ledger_latches AS l (symbol, engaged, mode, cause, reason, engaged_at, engaged_audit_seq,
                                                updated_at)
               VALUES ($1, true, $2, $3, $4, now(), $5, now())
               ON CONFLICT (symbol) DO UPDATE SET engaged = true, mode = EXCLUDED.mode, cause = EXCLUDED.cause,
                   reason = EXCLUDED.reason, engaged_at = CASE WHEN l.engaged THEN l.engaged_at ELSE now() END,
                   engaged_audit_seq = EXCLUDED.engaged_audit_seq, released_at = NULL, released_by = NULL,
                   release_reason = NULL, release_ticket = NULL, release_audit_seq = NULL, updated_at = now()""",
            symbol, mode, cause, reason, entry.seq)
        await conn.execute(
            "INSERT INTO ledger_latch_history (symbol, action, mode, cause, reason, actors, ticket, audit_seq, detail) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)",
            symbol, "escalate" if action == "LatchEscalate" else "engage", mode, cause, reason, [ACTOR], ticket,
            entry.seq, msgspec.json.encode(detail or {}).decode())
    M_LATCH.labels(symbol).set(1)
    M_LATCH_MODE.labels(symbol).set(MODE_RANK[mode])
    log.error("safety latch engaged", extra={"symbol": symbol, "mode": mode, "cause": cause, "reason": reason})
    if admin is not None:
        await _send_mode(pool, admin, symbol, mode, reason, ticket)
    return True


async def _send_mode(pool: Any, admin: CoreAdmin, symbol: str, mode: str, reason: str, ticket: str) -> None:
    """Set the mode the latch holds, unless the core already has a stricter one (an operator's
    HARD_HALT is never lowered by the ledger)."""
    async with pool.acquire() as conn:
        if symbol == SYS:
            cur = await conn.fetchval("SELECT value FROM ledger_core_flags WHERE name = 'withdrawals_halt'")
            if cur == "on" and mode != "NORMAL":
                return
        else:
            cur = await conn.fetchval("SELECT mode FROM ledger_markets WHERE symbol = $1", symbol)
            if cur is not None and MODE_RANK.get(cur, 0) > MODE_RANK[mode]:
                return
    try:
        await admin.send(_latch_cmd(symbol, mode, reason, ticket), reason=reason, ticket=ticket,
                         params={"source": "latch"})
    except Exception as exc:  # the latch stays engaged; the reconciler re-asserts the mode later
        log.error("could not send the latch's mode to the core", extra={"symbol": symbol, "mode": mode,
                                                                         "error": f"{type(exc).__name__}: {exc}"})


@dataclass
class LatchReleaseResult:
    """``ok`` with code RELEASED, else a stable error code; ``status`` is the HTTP status the edge
    answers with (200, 400, 404, 409, 503)."""

    ok: bool
    code: str
    status: int
    symbol: str
    detail: str = ""
    lag: int | None = None
    mode_set: str | None = None
    audit_seq: int | None = None
    invariants: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "code": self.code, "status": self.status, "symbol": self.symbol, "detail": self.detail,
                "lag": self.lag, "mode_set": self.mode_set, "audit_seq": self.audit_seq,
                "invariants": self.invariants}


async def _ledger_seq(pool: Any, symbol: str) -> int:
    async with pool.acquire() as conn:
        v = await conn.fetchval("SELECT last_seq FROM ledger_consumer_checkpoint WHERE stream = $1", symbol)
    return int(v or 0)


async def release_latch(pool: Any, symbol: str, approvers: list[str], reason: str, ticket: str, *, js: Any = None,
                        evt_stream: str = "EVT", requires_second_approver: bool = False,
                        catch_up_s: float = 2.0) -> LatchReleaseResult:
    """Release ``symbol``'s latch: approvals (one, or two distinct when ``requires_second_approver``),
    a reason and a ticket; only when the stream's lag is 0 and the invariants pass. Audited (actor =
    the first approver, every approver in the entry) before the latch row changes, then the symbol is
    set back to NORMAL (``_sys``: withdrawals resume) through the core. ``js`` (a JetStream context)
    is needed to read the engine's seq and to send the command; without it: ENGINE_UNAVAILABLE.

    Lag 0 means the ledger has settled everything the engine had published when the release was
    asked: a latched market still carries events (cancels, refused orders), so a lag seen above 0 is
    given ``catch_up_s`` for the ledger to reach that engine seq before the release is refused."""
    def refuse(code: str, status: int, detail: str) -> LatchReleaseResult:
        return LatchReleaseResult(False, code, status, symbol, detail)

    names: list[str] = []
    for a in approvers or []:
        a = (a or "").strip()
        if a and a not in names:
            names.append(a)
    if not (reason or "").strip():
        return refuse("AUDIT_REASON_REQUIRED", 400, "an approval reason is required")
    if not (ticket or "").strip():
        return refuse("AUDIT_TICKET_REQUIRED", 400, "a ticket id is required")
    if not names:
        return refuse("APPROVER_REQUIRED", 400, "an approver is required")
    if requires_second_approver and len(names) < 2:
        return refuse("SECOND_APPROVER_REQUIRED", 409, "a distinct second approver is required")
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM ledger_latches WHERE symbol = $1", symbol)
    if row is None or not row["engaged"]:
        return refuse("LATCH_NOT_ENGAGED", 409 if row is not None else 404, f"no engaged latch on {symbol}")
    if js is None:  # the engine's seq (EVT) and the core's admin commands both need JetStream
        return refuse("ENGINE_UNAVAILABLE", 503, "no JetStream context: cannot read the engine's seq")
    try:
        lags = await lag_report(pool, js, evt_stream)
    except Exception as exc:
        return refuse("ENGINE_UNAVAILABLE", 503, f"cannot read the engine's seq: {type(exc).__name__}: {exc}")
    info = lags.get(symbol, {"lag": 0, "state": "running"})
    lag = int(info.get("lag", 0))
    if lag > 0 and info.get("state") != "stopped" and "engine_seq" in info:
        target = int(info["engine_seq"])
        deadline = time.monotonic() + catch_up_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            lag = max(0, target - await _ledger_seq(pool, symbol))
            if lag == 0:
                break
    if info.get("state") == "stopped":
        why = f"settlement of {symbol} is stopped ({info.get('stop_reason')}); resume it first"
        return await _refused(pool, symbol, names, ticket, "SETTLEMENT_STOPPED", 409, why, lag=lag)
    if lag != 0:
        return await _refused(pool, symbol, names, ticket, "LAG_NOT_ZERO", 409,
                              f"settlement lag on {symbol} is {lag}, must be 0", lag=lag)
    report = await run_invariants(pool)
    if not report.ok:
        failing = {k: v for k, v in report.checks.items() if not v["ok"]}
        return await _refused(pool, symbol, names, ticket, "INVARIANTS_FAILING", 409,
                              f"invariants failing: {', '.join(sorted(failing))}", lag=lag,
                              invariants={k: v["samples"][:3] for k, v in failing.items()})
    async with pool.acquire() as conn:
        mode_now = (await conn.fetchval("SELECT mode FROM ledger_markets WHERE symbol = $1", symbol)
                    if symbol != SYS else None)
        async with conn.transaction():
            row = await conn.fetchrow("SELECT * FROM ledger_latches WHERE symbol = $1 FOR UPDATE", symbol)
            if row is None or not row["engaged"]:
                return LatchReleaseResult(False, "LATCH_NOT_ENGAGED", 409, symbol, "released meanwhile")
            try:
                entry = await audit.append(conn, names[0], "LatchRelease",
                                           {"symbol": symbol, "approvers": names, "latched_mode": row["mode"],
                                            "cause": row["cause"], "lag": lag}, reason, ticket,
                                           roles=["approver"])
            except audit.AuditError as exc:
                return LatchReleaseResult(False, exc.code, exc.status, symbol, exc.detail)
            await conn.execute(
                "UPDATE ledger_latches SET engaged = false, released_at = now(), released_by = $2, release_reason = $3,"
                " release_ticket = $4, release_audit_seq = $5, updated_at = now() WHERE symbol = $1",
                symbol, names, reason, ticket, entry.seq)
            await conn.execute(
                "INSERT INTO ledger_latch_history (symbol, action, mode, cause, reason, actors, ticket, audit_seq) "
                "VALUES ($1, 'release', $2, $3, $4, $5, $6, $7)", symbol, row["mode"], row["cause"], reason, names,
                ticket, entry.seq)
    # An operator's stricter mode (e.g. HARD_HALT) is theirs to lift: the ledger only undoes its own.
    mode_set: str | None = "NORMAL"
    if mode_now is not None and MODE_RANK.get(mode_now, 0) > MODE_RANK[row["mode"]]:
        mode_set = None
    if mode_set is not None:
        try:
            await CoreAdmin(pool, js).send(_latch_cmd(symbol, "NORMAL", reason, ticket), reason=reason, ticket=ticket,
                                           audited=True)
        except Exception as exc:
            # The entry says release; say it failed and keep the latch engaged (safe side).
            with contextlib.suppress(Exception):
                await audit.append(pool, ACTOR, "LatchReleaseFailed", {"symbol": symbol, "audit_seq": entry.seq,
                                                                        "error": f"{type(exc).__name__}"},
                                   f"could not send NORMAL to the core: {exc}", ticket)
            async with pool.acquire() as conn:
                await conn.execute("UPDATE ledger_latches SET engaged = true, updated_at = now() WHERE symbol = $1",
                                   symbol)
            return LatchReleaseResult(False, "CORE_UNAVAILABLE", 503, symbol, f"mode not sent: {exc}", lag=lag,
                                      audit_seq=entry.seq)
    M_LATCH.labels(symbol).set(0)
    M_LATCH_MODE.labels(symbol).set(0)
    log.warning("safety latch released", extra={"symbol": symbol, "approvers": names, "ticket": ticket})
    return LatchReleaseResult(True, "RELEASED", 200, symbol, "latch released", lag=lag, mode_set=mode_set,
                              audit_seq=entry.seq)


async def _refused(pool: Any, symbol: str, names: list[str], ticket: str, code: str, status: int, detail: str,
                   **kw: Any) -> LatchReleaseResult:
    with contextlib.suppress(Exception):
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO ledger_latch_history (symbol, action, reason, actors, ticket, detail) "
                "VALUES ($1, 'release_refused', $2, $3, $4, $5::jsonb)", symbol, detail, names, ticket,
                msgspec.json.encode({"code": code}).decode())
    return LatchReleaseResult(False, code, status, symbol, detail, **kw)


# --------------------------------------------------------------------------------------------------
# Responses to alerts


class Responder:
    """Carries out the automatic response of new alerts (``response_state = 'pending'``), once each.

    - invariant: WithdrawalsHalt(on) and CANCEL_ONLY (latched) for the symbols trading an affected
      asset; SOFT_HALT on every known symbol when the scope is unknown (seed §3.1);
    - gap, fencing, decode: the stopped stream's latch (CANCEL_ONLY; ``_sys``: withdrawals halt).
    """

    def __init__(self, pool: Any, admin: CoreAdmin | None) -> None:
        self.pool = pool
        self.admin = admin
        self._halted = False

    async def run_pending(self) -> int:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, category, check_name, key, stream, detail FROM ledger_alerts "
                "WHERE response_state = 'pending' ORDER BY id LIMIT 100")
        done = 0
        self._halted = False  # one WithdrawalsHalt per pass, however many alerts ask for it
        for r in rows:
            detail = msgspec.json.decode(r["detail"].encode() if isinstance(r["detail"], str) else r["detail"])
            try:
                response = await self._respond(int(r["id"]), r["category"], r["check_name"], r["key"], r["stream"],
                                               detail)
                state = "done"
            except Exception as exc:
                log.exception("alert response failed")
                response, state = {"error": f"{type(exc).__name__}: {exc}"}, "failed"
            async with self.pool.acquire() as conn:
                await conn.execute("UPDATE ledger_alerts SET response_state = $2, response = $3::jsonb WHERE id = $1",
                                   r["id"], state, msgspec.json.encode(response).decode())
            done += 1
        return done

    async def _scope(self, assets: list[str], stream: str | None) -> tuple[list[str], str]:
        """The affected symbols and the mode for them: CANCEL_ONLY for the market a stream names or
        the markets trading an affected asset; every market SOFT_HALT when the scope is unknown."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT symbol, base, quote FROM ledger_markets WHERE base <> '' ORDER BY symbol")
        if stream and stream != SYS and not stream.startswith("~"):
            return [stream], "CANCEL_ONLY"
        hit = [r["symbol"] for r in rows if r["base"] in assets or r["quote"] in assets] if assets else []
        if hit:
            return hit, "CANCEL_ONLY"
        return [r["symbol"] for r in rows], "SOFT_HALT"

    async def _respond(self, alert_id: int, category: str, check: str, key: str, stream: str | None,
                       detail: dict[str, Any]) -> dict[str, Any]:
        ticket = f"LEDGER-ALERT-{alert_id}"
        actions: list[str] = []
        if category == "invariant":
            assets = list(detail.get("assets") or ([detail["asset"]] if detail.get("asset") else []))
            reason = f"ledger invariant violation: {check} ({key})"
            if self.admin is not None and not self._halted:
                await self.admin.send(WithdrawalsHalt(on=True, reason=reason, ticket=ticket), reason=reason,
                                      ticket=ticket, params={"alert_id": alert_id, "check": check})
                self._halted = True
                actions.append("WithdrawalsHalt(on)")
            elif self._halted:
                actions.append("WithdrawalsHalt(on) already sent")
            symbols, mode = await self._scope(assets, stream)
            for sym in symbols:
                await engage_latch(self.pool, self.admin, sym, mode, f"invariant:{check}", reason, ticket,
                                   {"alert_id": alert_id})
                actions.append(f"{sym}:{mode}")
        elif category in ("gap", "fencing", "decode"):
            sym = stream or SYS
            reason = f"settlement stopped on {sym}: {category} ({key})"
            await engage_latch(self.pool, self.admin, sym, "CANCEL_ONLY", category, reason, ticket,
                               {"alert_id": alert_id})
            actions.append(f"{sym}:latched")
        return {"actions": actions}


# --------------------------------------------------------------------------------------------------
# The reconciler loop


class ReconcilerOptions(msgspec.Struct, frozen=True, kw_only=True):
    evt_stream: str = "EVT"
    warn_seq: int = 100
    throttle_seq: int = 1_000
    halt_seq: int = 10_000
    breach_s: float = 5.0
    interval_s: float = 1.0
    reassert_s: float = 60.0


class Reconciler:
    def __init__(self, pool: Any, js: Any, admin: CoreAdmin | None, opts: ReconcilerOptions | None = None) -> None:
        self.pool = pool
        self.js = js
        self.admin = admin
        self.opts = opts or ReconcilerOptions()
        self.breach_since: dict[str, float] = {}
        self.levels: dict[str, str] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.last_reassert: dict[str, float] = {}
        self.last_error: str | None = None

    def level(self, lag: int) -> str:
        o = self.opts
        if lag >= o.halt_seq:
            return "halt"
        if lag >= o.throttle_seq:
            return "throttle"
        if lag >= o.warn_seq:
            return "warn"
        return "ok"

    async def tick(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        now = time.monotonic() if now is None else now
        async with self.pool.acquire() as conn:  # the database's clock before the engine's seqs are read
            snapshot = await conn.fetchval("SELECT clock_timestamp()")
        report = await lag_report(self.pool, self.js, self.opts.evt_stream)
        async with self.pool.acquire() as conn:
            for stream, r in report.items():
                if "engine_seq" not in r:
                    continue
                lag = int(r["lag"])
                level = self.level(lag)
                M_LAG_SEQ.labels(stream).set(lag)
                M_ENGINE_SEQ.labels(stream).set(r["engine_seq"])
                M_LEVEL.labels(stream).set(LEVELS.index(level))
                prev = self.levels.get(stream)
                if level in ("throttle", "halt"):
                    self.breach_since.setdefault(stream, now)
                else:
                    self.breach_since.pop(stream, None)
                since = self.breach_since.get(stream)
                r["level"] = level
                await conn.execute(
                    """INSERT INTO ledger_reconciliation (stream, engine_seq, ledger_seq, lag, level, breach_since,
                                                          checked_at)
                       VALUES ($1, $2, $3, $4, $5, CASE WHEN $6 THEN now() END, now())
                       ON CONFLICT (stream) DO UPDATE SET engine_seq = $2, ledger_seq = $3, lag = $4, level = $5,
                           breach_since = CASE WHEN NOT $6 THEN NULL
                                               ELSE coalesce(ledger_reconciliation.breach_since, now()) END,
                           checked_at = now()""",
                    stream, r["engine_seq"], r["ledger_seq"], lag, level, since is not None)
                if prev != level:
                    self.levels[stream] = level
                    await conn.execute(
                        "INSERT INTO ledger_reconciliation_history (stream, engine_seq, ledger_seq, lag, level, "
                        "previous_level) VALUES ($1, $2, $3, $4, $5, $6)",
                        stream, r["engine_seq"], r["ledger_seq"], lag, level, prev)
                    if level != "ok":
                        log.warning("settlement lag", extra={"stream": stream, "lag": lag, "level": level})
                if since is not None and now - since >= self.opts.breach_s:
                    mode = "SOFT_HALT" if level == "halt" else "CANCEL_ONLY"
                    t = "T3" if level == "halt" else "T2"
                    reason = f"settlement lag {lag} on {stream} beyond {t} for {now - since:.0f}s"
                    ticket = f"LEDGER-LAG-{stream}-{int(time.time())}"
                    await engage_latch(self.pool, self.admin, stream, mode, f"lag:{t}", reason, ticket,
                                       {"lag": lag, "engine_seq": r["engine_seq"], "ledger_seq": r["ledger_seq"]})
        await self._reassert(report, now, snapshot)
        self.last = report
        return report

    async def _reassert(self, report: dict[str, dict[str, Any]], now: float, snapshot: Any) -> None:
        """An engaged latch holds its mode: if the core's mode (as the ledger, caught up, last saw it)
        is looser, send it again (audited).

        A latch engaged or escalated after ``snapshot`` (the database's clock before the report read the
        engine's seqs) waits for the next tick: the report cannot show the latch's own command, so a
        core not yet in the latch's mode is not yet loose. The rate limit (``reassert_s``) holds while
        the core stays loose; once the core is seen holding the mode, the next loosening is answered at
        once."""
        if self.admin is None:
            return
        async with self.pool.acquire() as conn:
            latches = await conn.fetch("SELECT symbol, mode FROM ledger_latches WHERE engaged AND updated_at < $1",
                                       snapshot)
            modes = {r["symbol"]: r["mode"] for r in await conn.fetch("SELECT symbol, mode FROM ledger_markets")}
            halt = await conn.fetchval("SELECT value FROM ledger_core_flags WHERE name = 'withdrawals_halt'")
        for latch in latches:
            sym = latch["symbol"]
            M_LATCH.labels(sym).set(1)
            M_LATCH_MODE.labels(sym).set(MODE_RANK[latch["mode"]])
            if report.get(sym, {}).get("lag", 1) != 0:
                continue  # our view of the core's mode is stale while behind
            if sym == SYS:
                loose = halt != "on"
            else:
                loose = MODE_RANK.get(modes.get(sym, "NORMAL"), 0) < MODE_RANK[latch["mode"]]
            if not loose:
                self.last_reassert.pop(sym, None)
                continue
            if now - self.last_reassert.get(sym, -1e9) < self.opts.reassert_s:
                continue
            self.last_reassert[sym] = now
            reason = f"safety latch on {sym} holds {latch['mode']}; release it through the latch release"
            with contextlib.suppress(Exception):
                await self.admin.send(_latch_cmd(sym, latch["mode"], reason, f"LEDGER-LATCH-{sym}"), reason=reason,
                                      ticket=f"LEDGER-LATCH-{sym}", params={"source": "latch_reassert"})

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
                self.last_error = None
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("reconciliation tick failed", extra={"error": self.last_error})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.opts.interval_s)
