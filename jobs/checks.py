"""The scheduled checks (seed §4 "Daily", §4.5, §4.8). Each check is ``async def (JobContext) ->
JobResult``; the scheduler stores every run in ``job_runs``.

Outcomes: ``ok``; ``violation`` (the check ran and found something: the output names it and a
recommended action); ``not_available`` (a dependency of the check is missing, e.g. the ledger's
tables or an edge to scrape; said plainly, never reported as ok); ``error`` (the check itself failed).

The anomaly detector (seed §4.5) reads five signals (reconciliation lag, latch breaches, WS drops,
WS slow-consumer closes, WS resume gaps), compares them with thresholds (origin defaults
10 / 1 / 100 / 20 / 20), and maps each breach to a severity and a recommended action:
latch breach -> SEV1 WITHDRAW_HALT; reconciliation lag -> SEV2 CANCEL_ONLY; WS signals -> SEV3
INVESTIGATE. It writes ``anomaly-detector-<ts>.json`` and, when a webhook URL is configured, POSTs
the finding signed with HMAC-SHA256 over ``<timestamp>.<body>`` (headers ``X-Spotex-Timestamp``,
``X-Spotex-Signature: sha256=<hex>``).

The safety budget (seed §4.8) evaluates a budgets file (JSON) against the newest evidence files:
a budget whose evidence is missing or older than its ``max_age_s`` fails, as does one whose value
breaks its limit; each violation carries a recommended action. It writes ``safety-budget-<ts>.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ANOMALY_DEFAULTS",
    "CHECKS",
    "DEFAULT_BUDGETS",
    "POLICY_ACTOR",
    "JobContext",
    "JobResult",
    "anomaly_findings",
    "core_symbol_mode",
    "dotted_get",
    "evaluate_budgets",
    "lag_policy_target",
    "lag_policy_thresholds",
    "lag_throttle_rate",
    "sign_webhook",
]

SEVERITY_ORDER = {"SEV1": 1, "SEV2": 2, "SEV3": 3, "NONE": 9}
ACTION_ORDER = {"WITHDRAW_HALT": 1, "CANCEL_ONLY": 2, "INVESTIGATE": 3, "NONE": 9}

# signal -> (default threshold, severity, recommended action)
ANOMALY_DEFAULTS: dict[str, tuple[float, str, str]] = {
    "reconciliation_lag": (10, "SEV2", "CANCEL_ONLY"),
    "latch_breach": (1, "SEV1", "WITHDRAW_HALT"),
    "ws_drops": (100, "SEV3", "INVESTIGATE"),
    "ws_slow_closes": (20, "SEV3", "INVESTIGATE"),
    "ws_resume_gaps": (20, "SEV3", "INVESTIGATE"),
}

# Each budget: the newest file matching ``evidence`` (a glob, relative to the evidence root), the
# JSON ``field`` in it (dotted path), ``op`` and ``limit``; ``max_age_s`` for freshness.
DEFAULT_BUDGETS: list[dict[str, Any]] = [
    {"name": "anomaly_detector_clear", "evidence": "jobs/anomaly-detector-*.json", "field": "severity",
     "op": "in", "limit": ["NONE", "SEV3"], "max_age_s": 900, "action": "INVESTIGATE"},
    {"name": "invariants_ok", "evidence": "jobs/invariants-latest.json", "field": "ok", "op": "==",
     "limit": True, "max_age_s": 900, "action": "WITHDRAW_HALT"},
    {"name": "export_complete", "evidence": "jobs/export-verify-latest.json", "field": "missing", "op": "<=",
     "limit": 0, "max_age_s": 86_400, "action": "INVESTIGATE"},
]

# The load regression gate (seed §4.3, §7; runbooks/load_drills.py): per profile (orders, trader
# connections) the p99 ack latency in ms and the minimum orders/s, and no errors; evidence from the
# drill's load-all-latest.json, at most a week old. The rationale of the limits is in
# docs/performance.md "Load regression gate".
LOAD_EVIDENCE = "load-regression/load-all-latest.json"
LOAD_MAX_AGE_S = 7 * 86_400
LOAD_LIMITS: dict[str, tuple[float, float]] = {  # profile -> (p99 ms at most, orders/s at least)
    "load-smoke": (1_000, 15),
    "load-10k": (1_000, 200),
    "load-50k": (1_000, 300),
}


def _load_budgets() -> list[dict[str, Any]]:
    def b(name: str, field: str, op: str, limit: Any) -> dict[str, Any]:
        return {"name": name, "evidence": LOAD_EVIDENCE, "field": field, "op": op, "limit": limit,
                "max_age_s": LOAD_MAX_AGE_S, "action": "BLOCK_RELEASE"}

    out = []
    for prof, (p99, tps) in LOAD_LIMITS.items():
        key = prof.replace("-", "_")
        out += [b(f"{key}_p99_ms", f"profiles.{prof}.order_p99_ms", "<=", p99),
                b(f"{key}_error_rate", f"profiles.{prof}.order_error_rate", "<=", 0),
                b(f"{key}_orders_per_s", f"profiles.{prof}.order_tps", ">=", tps)]
    return [*out, b("load_ws_trades_delivered", "ws_trade_frames", ">=", 1),
            b("load_ws_none_lost", "ws_lost", "<=", 0), b("load_full_size", "full_size", "==", True)]


DEFAULT_BUDGETS += _load_budgets()


@dataclass
class JobResult:
    outcome: str
    output: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobContext:
    cfg: Any
    pg_dsn: str | None
    nats_url: str | None
    data_dir: Path
    evidence_dir: Path
    pool: Any = None
    nc: Any = None
    js: Any = None
    edge_metrics_url: str | None = None
    budgets_file: str | None = None
    inject: dict[str, float] = field(default_factory=dict)  # game-day: forced signal values
    webhook_url: str | None = None
    webhook_secret: str | None = None
    now: Callable[[], float] = time.time

    def write_evidence(self, name: str, data: dict[str, Any]) -> Path:
        self.evidence_dir.mkdir(parents=True, exist_ok=True)
        path = self.evidence_dir / name
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        return path

    def stamp(self) -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.now())) + f"-{int(self.now() * 1000) % 1000:03d}"


def _not_available(what: str, exc: BaseException | None = None) -> JobResult:
    detail = f"{what}" + (f": {type(exc).__name__}: {exc}" if exc else "")
    return JobResult("not_available", {"reason": detail})


def _missing_table(exc: BaseException) -> bool:
    return type(exc).__name__ in ("UndefinedTableError", "UndefinedColumnError", "UndefinedFunctionError")


# ------------------------------------------------------------------------------------------------
# ledger-backed checks


async def check_invariants(ctx: JobContext) -> JobResult:
    if ctx.pool is None:
        return _not_available("no PostgreSQL connection")
    try:
        from ledger.invariants import run_invariants
    except ImportError as exc:
        return _not_available("ledger.invariants not available", exc)
    try:
        rep = await run_invariants(ctx.pool, full=False, record=True)
    except Exception as exc:
        if _missing_table(exc):
            return _not_available("ledger tables not migrated", exc)
        raise
    out = {"ok": bool(rep.ok), "scope": rep.scope, "checked_through_tx": rep.checked_through_tx,
           "checks": rep.checks, "at": ctx.now()}
    ctx.write_evidence("invariants-latest.json", out)
    return JobResult("ok" if rep.ok else "violation",
                     {**out, "recommended_action": "NONE" if rep.ok else "WITHDRAW_HALT"})


async def _lag_and_latches(ctx: JobContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from ledger.reconcile import lag_report, latch_state

    lag = await lag_report(ctx.pool, ctx.js, ctx.cfg.nats.evt_stream if ctx.cfg is not None else "EVT")
    latches = await latch_state(ctx.pool)
    return lag, latches


async def _lag_and_latches_or_why_not(ctx: JobContext) -> tuple[dict[str, Any], dict[str, Any]] | JobResult:
    """(lag report, latch states) from the ledger, or the not-available result saying why not."""
    if ctx.pool is None:
        return _not_available("no PostgreSQL connection")
    try:
        return await _lag_and_latches(ctx)
    except ImportError as exc:
        return _not_available("ledger.reconcile not available", exc)
    except Exception as exc:
        if _missing_table(exc):
            return _not_available("ledger tables not migrated", exc)
        raise


async def check_reconciliation(ctx: JobContext) -> JobResult:
    got = await _lag_and_latches_or_why_not(ctx)
    if isinstance(got, JobResult):
        return got
    lag, latches = got
    engaged = sorted(s for s, v in latches.items() if v.get("engaged"))
    stopped = sorted(s for s, v in lag.items() if v.get("state") == "stopped")
    out = {"streams": lag, "latches_engaged": engaged, "streams_stopped": stopped,
           "max_lag": max((int(v.get("lag", 0)) for v in lag.values()), default=0)}
    ok = not engaged and not stopped
    out["recommended_action"] = "NONE" if ok else ("WITHDRAW_HALT" if "_sys" in engaged else "CANCEL_ONLY")
    ctx.write_evidence("reconciliation-latest.json", out)
    return JobResult("ok" if ok else "violation", out)


POLICY_ACTOR = "jobs:settlement_lag"
_MODE_RANK = {"NORMAL": 0, "CANCEL_ONLY": 1, "SOFT_HALT": 2, "HARD_HALT": 3}


def lag_policy_thresholds(cfg: Any) -> tuple[int, int, int]:
    """(recovered below, T2, T3): one policy with the ledger's latch, from ``[ledger]``."""
    lc = cfg.ledger
    return int(lc.lag_warn_seq), int(lc.lag_throttle_seq), int(lc.lag_halt_seq)


def lag_policy_target(lag: int, t2: int, t3: int) -> str:
    """Seed §3.2: at or above T3 ``SOFT_HALT`` (and throttled); at or above T2 ``THROTTLE`` (new
    orders limited per second on the symbol, at every edge); else ``NORMAL``."""
    if lag >= t3:
        return "SOFT_HALT"
    if lag >= t2:
        return "THROTTLE"
    return "NORMAL"


def lag_throttle_rate(cfg: Any) -> int:
    """The policy's throttle (new orders/s on the symbol, burst the same): ``[jobs] lag_throttle_orders_per_s``."""
    return max(1, int(getattr(cfg.jobs, "lag_throttle_orders_per_s", 50))) if cfg is not None else 50


async def core_symbol_mode(ctx: JobContext, symbol: str) -> str | None:
    """The symbol's mode in the core now (core query ``book`` at depth 0), None if it cannot tell."""
    import msgspec

    if ctx.nc is None:
        return None
    subject = ctx.cfg.core.query_subject if ctx.cfg is not None else "core.query"
    try:
        resp = await ctx.nc.request(subject, msgspec.msgpack.encode({"op": "book", "symbol": symbol, "depth": 0}),
                                    timeout=3)
        data = msgspec.msgpack.decode(resp.data)
    except Exception:
        return None
    return str(data["mode"]) if isinstance(data, dict) and "mode" in data else None


async def _policy_imposed(ctx: JobContext) -> dict[str, str]:
    """Symbol -> mode this policy set and still holds, from the last finished settlement_lag run."""
    async with ctx.pool.acquire() as c:
        raw = await c.fetchval("SELECT output FROM job_runs WHERE job = 'settlement_lag' AND finished_at IS NOT NULL "
                               "ORDER BY id DESC LIMIT 1")
    out = json.loads(raw) if isinstance(raw, str) else (raw or {})
    imposed = (out.get("policy") or {}).get("imposed") or {}
    return {str(k): str(v) for k, v in imposed.items()}


async def _apply_mode(ctx: JobContext, symbol: str, mode: str, reason: str, params: dict[str, Any]) -> int | None:
    """Audit (actor ``jobs:settlement_lag``) then send SetSymbolMode to the core; the audit seq."""
    from core.wire import SetSymbolMode, SymbolMode
    from ledger.reconcile import CoreAdmin

    ticket = f"JOBS-LAG-{symbol}-{int(ctx.now())}"
    cmd = SetSymbolMode(symbol=symbol, mode=SymbolMode(mode), reason=reason, ticket=ticket)
    return await CoreAdmin(ctx.pool, ctx.js, actor=POLICY_ACTOR).send(cmd, reason=reason, ticket=ticket,
                                                                       params=params)


async def _policy_throttles(ctx: JobContext) -> tuple[Any, dict[str, tuple[dict[str, Any], int]]] | None:
    """The ``symbol_throttle`` bucket and its policy layer: symbol -> (value, KV revision); None
    without JetStream (the throttle part of the policy is then unavailable, said in the output)."""
    import msgspec

    from core.bus import read_settings, throttle_bucket

    if ctx.js is None:
        return None
    kv = await throttle_bucket(ctx.js)
    out: dict[str, tuple[dict[str, Any], int]] = {}
    for symbol, layers in (await read_settings(ctx.js, "*.policy")).items():
        if "policy" in layers:
            setting, revision = layers["policy"]
            out[symbol] = (msgspec.structs.asdict(setting), revision)
    return kv, out


async def _set_throttle(ctx: JobContext, kv: Any, symbol: str, rate: int, reason: str, params: dict[str, Any],
                        last: int | None) -> tuple[int, int]:
    """Audit (actor ``jobs:settlement_lag``, ``SetSymbolThrottle``) then write the policy layer. The
    write is conditional on the revision read (``last``; None: the key must not exist), so a
    concurrent change is never overwritten blindly. (audit seq, KV revision)."""
    import msgspec

    from core.bus import SymbolThrottle, throttle_key
    from ledger import audit

    ticket = f"JOBS-LAG-{symbol}-{int(ctx.now())}"
    entry = await audit.append(ctx.pool, POLICY_ACTOR, "SetSymbolThrottle",
                               {**params, "layer": "policy", "orders_per_s": rate, "burst": rate}, reason, ticket)
    value = msgspec.json.encode(SymbolThrottle(
        symbol=symbol, layer="policy", orders_per_s=rate, burst=rate, actor=POLICY_ACTOR, reason=reason,
        ticket=ticket, audit_seq=entry.seq, set_at_ms=int(ctx.now() * 1000)))
    try:
        key = throttle_key(symbol, "policy")
        rev = await (kv.create(key, value) if last is None else kv.update(key, value, last=last))
    except Exception as exc:
        with contextlib.suppress(Exception):
            await audit.append(ctx.pool, POLICY_ACTOR, "SetSymbolThrottle.failed",
                               {"symbol": symbol, "error": type(exc).__name__, "audit_seq": entry.seq}, reason, ticket)
        raise
    return entry.seq, int(rev)


async def _lift_throttle(ctx: JobContext, kv: Any, symbol: str, reason: str, params: dict[str, Any],
                         last: int) -> int:
    """Audit (``ClearSymbolThrottle``) then delete the policy layer, conditional on the revision the
    job read: only the policy's own key is ever touched, never the operator's."""
    from core.bus import throttle_key
    from ledger import audit

    ticket = f"JOBS-LAG-{symbol}-{int(ctx.now())}"
    entry = await audit.append(ctx.pool, POLICY_ACTOR, "ClearSymbolThrottle",
                               {**params, "layers": ["policy"]}, reason, ticket)
    try:
        await kv.delete(throttle_key(symbol, "policy"), last=last)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await audit.append(ctx.pool, POLICY_ACTOR, "ClearSymbolThrottle.failed",
                               {"symbol": symbol, "error": type(exc).__name__, "audit_seq": entry.seq}, reason, ticket)
        raise
    return entry.seq


async def check_settlement_lag(ctx: JobContext) -> JobResult:
    """Settlement lag report and policy (seed §3.2), per symbol stream:

    - lag >= T2: **throttle** new orders on the symbol (``[jobs] lag_throttle_orders_per_s``, the
      ``policy`` layer of the ``symbol_throttle`` KV bucket that every edge enforces; cancels pass);
    - lag >= T3: also ``SOFT_HALT`` in the core;
    - each change audited with actor ``jobs:settlement_lag`` before it takes effect.

    Recovery: once the lag is under ``lag_warn_seq`` the job lifts what it set (audited): its throttle
    (only the policy layer: an operator's throttle is never touched) and its mode (back to NORMAL,
    unless someone else changed the mode since (an operator, the ledger's latch) or the ledger's latch
    is engaged on the symbol: those stay theirs). Between ``lag_warn_seq`` and T2 both hold
    (hysteresis). Only ever tightens the core's mode; ``_sys`` is reported only (the ledger's latch
    halts withdrawals). Acts independently of the ledger service, so the policy holds even when the
    ledger itself is what stalls."""
    got = await _lag_and_latches_or_why_not(ctx)
    if isinstance(got, JobResult):
        return got
    lag, latches = got
    recovered, t2, t3 = lag_policy_thresholds(ctx.cfg)
    rate = lag_throttle_rate(ctx.cfg)
    now_ms = int(ctx.now() * 1000)
    per: dict[str, dict[str, Any]] = {}
    for s, v in lag.items():
        at = v.get("last_occurred_at_ms")
        per[s] = {"lag_events": int(v.get("lag", 0)), "last_settled_age_ms": (now_ms - int(at)) if at else None,
                  "engine_seq": v.get("engine_seq"), "ledger_seq": v.get("ledger_seq")}
    worst = max((int(p["lag_events"]) for p in per.values()), default=0)
    imposed = await _policy_imposed(ctx)
    try:
        thr = await _policy_throttles(ctx)
    except Exception as exc:
        thr = None
        throttle_error: str | None = f"{type(exc).__name__}: {exc}"[:200]
    else:
        throttle_error = None if thr is not None else "no JetStream connection"
    kv, throttled = thr if thr is not None else (None, {})
    actions: list[dict[str, Any]] = []
    unapplied: list[str] = []
    throttle_unapplied: list[str] = []
    for s, p in sorted(per.items()):
        if s.startswith("_") or p["engine_seq"] is None:
            continue
        n = int(p["lag_events"])
        target = lag_policy_target(n, t2, t3)
        p["policy_level"] = target
        params = {"symbol": s, "lag": n, "t2": t2, "t3": t3, "recovered_below": recovered}

        # The throttle: set at T2 and beyond, lifted below the warn level.
        ours_thr = throttled.get(s)
        if target != "NORMAL" and (ours_thr is None or int(ours_thr[0].get("orders_per_s", 0)) != rate):
            if kv is None:
                throttle_unapplied.append(s)
            else:
                reason = f"settlement lag {n} on {s} beyond T2 ({t2}): new orders throttled to {rate}/s"
                try:
                    seq, rev = await _set_throttle(ctx, kv, s, rate, reason, params,
                                                   ours_thr[1] if ours_thr is not None else None)
                except Exception as exc:
                    throttle_unapplied.append(s)
                    p["throttle_error"] = f"{type(exc).__name__}: {exc}"[:200]
                else:
                    actions.append({"symbol": s, "kind": "throttle", "from": "UNTHROTTLED" if ours_thr is None else
                                    f"THROTTLE {ours_thr[0].get('orders_per_s')}/s", "to": "THROTTLE",
                                    "orders_per_s": rate, "lag": n, "audit_seq": seq, "reason": reason})
                    throttled[s] = ({"orders_per_s": rate, "burst": rate, "audit_seq": seq}, rev)
        elif ours_thr is not None and n < recovered and kv is not None:
            reason = f"settlement lag on {s} back to {n} (< {recovered}): lifting the lag policy's throttle"
            try:
                seq = await _lift_throttle(ctx, kv, s, reason, params, ours_thr[1])
            except Exception as exc:
                throttle_unapplied.append(s)
                p["throttle_error"] = f"{type(exc).__name__}: {exc}"[:200]
            else:
                actions.append({"symbol": s, "kind": "throttle", "from": "THROTTLE", "to": "UNTHROTTLED",
                                "lag": n, "audit_seq": seq, "reason": reason})
                throttled.pop(s)
        p["policy_throttle_orders_per_s"] = int(throttled[s][0].get("orders_per_s", 0)) if s in throttled else None

        # The mode: SOFT_HALT at T3 and beyond, lifted below the warn level.
        target_mode = "SOFT_HALT" if target == "SOFT_HALT" else "NORMAL"
        ours = imposed.get(s)
        if target_mode == "NORMAL" and ours is None:
            continue
        current = await core_symbol_mode(ctx, s)
        p["core_mode"] = current
        if current is None:
            unapplied.append(s)
            continue
        if _MODE_RANK.get(target_mode, 0) > _MODE_RANK.get(current, 0):
            reason = f"settlement lag {n} on {s} beyond T3 ({t3})"
            mseq = await _apply_mode(ctx, s, target_mode, reason, {**params, "mode": target_mode, "from": current})
            actions.append({"symbol": s, "kind": "mode", "from": current, "to": target_mode, "lag": n,
                            "audit_seq": mseq, "reason": reason})
            imposed[s] = target_mode
        elif ours is not None and current != ours:
            imposed.pop(s)  # changed by someone else since: theirs now
        elif ours is not None and n < recovered and not (latches.get(s) or {}).get("engaged"):
            reason = f"settlement lag on {s} back to {n} (< {recovered}): lifting {ours} set by the lag policy"
            mseq = await _apply_mode(ctx, s, "NORMAL", reason, {**params, "mode": "NORMAL", "from": ours})
            actions.append({"symbol": s, "kind": "mode", "from": ours, "to": "NORMAL", "lag": n, "audit_seq": mseq,
                            "reason": reason})
            imposed.pop(s)
    levels = [p.get("policy_level", "NORMAL") for p in per.values()]
    action = "SOFT_HALT" if "SOFT_HALT" in levels else ("THROTTLE" if "THROTTLE" in levels else "NONE")
    out: dict[str, Any] = {
        "streams": per, "max_lag_events": worst, "t2": t2, "t3": t3, "recovered_below": recovered,
        "throttle_orders_per_s": rate,
        "policy": {"actor": POLICY_ACTOR, "imposed": imposed, "actions": actions, "core_mode_unknown": unapplied,
                   "throttled": {sym: int(v.get("orders_per_s", 0)) for sym, (v, _rev) in sorted(throttled.items())},
                   "throttle_unapplied": throttle_unapplied, "throttle_error": throttle_error},
        "recommended_action": action,
    }
    ctx.write_evidence("settlement-lag-latest.json", out)
    clean = action == "NONE" and not unapplied and not throttle_unapplied
    return JobResult("ok" if clean else "violation", out)


# ------------------------------------------------------------------------------------------------
# anomaly detector


async def _edge_counters(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=3) as c:
        r = await c.get(url)
        r.raise_for_status()
    out = {"ws_drops": 0.0, "ws_slow_closes": 0.0, "ws_resume_gaps": 0.0}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name == "ws_dropped_frames_total":
                out["ws_drops"] += s.value
            elif s.name == "ws_close_total" and "SLOW" in str(s.labels.get("reason", "")).upper():
                out["ws_slow_closes"] += s.value
            elif s.name in ("ws_resume_gaps_total", "ws_resume_gaps"):
                out["ws_resume_gaps"] += s.value
    return out


def anomaly_findings(signals: dict[str, float | None], thresholds: dict[str, float]) -> dict[str, Any]:
    """Signals over their thresholds -> findings, the worst severity and the recommended action."""
    findings: list[dict[str, Any]] = []
    for name, (default, sev, action) in ANOMALY_DEFAULTS.items():
        v = signals.get(name)
        limit = thresholds.get(name, default)
        if v is not None and v >= limit:
            findings.append({"signal": name, "value": v, "threshold": limit, "severity": sev,
                             "recommended_action": action})
    findings.sort(key=lambda f: SEVERITY_ORDER[f["severity"]])
    return {
        "anomaly": bool(findings),
        "severity": findings[0]["severity"] if findings else "NONE",
        "recommended_action": min((str(f["recommended_action"]) for f in findings),
                                  key=lambda a: ACTION_ORDER[a], default="NONE"),
        "findings": findings,
    }


def sign_webhook(secret: str, body: bytes, ts: int) -> str:
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={mac}"


async def _post_webhook(url: str, secret: str | None, payload: dict[str, Any], now: float) -> dict[str, Any]:
    import httpx

    body = json.dumps(payload, sort_keys=True, default=str).encode()
    ts = int(now)
    headers = {"Content-Type": "application/json", "X-Spotex-Timestamp": str(ts)}
    if secret:
        headers["X-Spotex-Signature"] = sign_webhook(secret, body, ts)
    try:
        async with httpx.AsyncClient(timeout=5) as c:
            r = await c.post(url, content=body, headers=headers)
        return {"url": url, "status": r.status_code, "signed": bool(secret), "delivered": r.is_success}
    except httpx.HTTPError as exc:
        return {"url": url, "delivered": False, "error": f"{type(exc).__name__}: {exc}", "signed": bool(secret)}


async def check_anomaly(ctx: JobContext) -> JobResult:
    signals: dict[str, float | None] = {k: None for k in ANOMALY_DEFAULTS}
    sources: dict[str, str] = {}
    if ctx.pool is not None:
        try:
            lag, latches = await _lag_and_latches(ctx)
            signals["reconciliation_lag"] = float(max((int(v.get("lag", 0)) for v in lag.values()), default=0))
            signals["latch_breach"] = float(sum(1 for v in latches.values() if v.get("engaged")))
            sources["reconciliation_lag"] = sources["latch_breach"] = "ledger"
        except Exception as exc:
            sources["ledger"] = f"not available: {type(exc).__name__}: {exc}"[:200]
    if ctx.edge_metrics_url:
        try:
            for k, v in (await _edge_counters(ctx.edge_metrics_url)).items():
                signals[k] = v
                sources[k] = "edge /metrics"
        except Exception as exc:
            sources["edge"] = f"not available: {type(exc).__name__}: {exc}"[:200]
    for k, v in ctx.inject.items():
        signals[k] = v
        sources[k] = "injected"
    thresholds = {k: float(getattr(ctx.cfg.jobs, f"anomaly_{k}_threshold", d[0])) if ctx.cfg is not None else d[0]
                  for k, d in ANOMALY_DEFAULTS.items()}
    res = anomaly_findings(signals, thresholds)
    out = {"at": ctx.now(), "signals": signals, "sources": sources, "thresholds": thresholds, **res}
    if res["anomaly"] and ctx.webhook_url:
        out["webhook"] = await _post_webhook(ctx.webhook_url, ctx.webhook_secret, {
            "source": "spotex.anomaly_detector", **{k: out[k] for k in (
                "at", "severity", "recommended_action", "findings")}}, ctx.now())
    path = ctx.write_evidence(f"anomaly-detector-{ctx.stamp()}.json", out)
    out["evidence"] = str(path)
    if all(v is None for v in signals.values()):
        return JobResult("not_available", {**out, "reason": "no signal source answered"})
    return JobResult("violation" if res["anomaly"] else "ok", out)


# ------------------------------------------------------------------------------------------------
# safety budget and evidence freshness


def dotted_get(data: Any, dotted: str) -> Any:
    """``data['a']['b']`` for ``'a.b'``; KeyError when a part is missing (evidence fields, budgets)."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(dotted)
        data = data[part]
    return data


def _holds(value: Any, op: str, limit: Any) -> bool:
    if op == "==":
        return bool(value == limit)
    if op == "!=":
        return bool(value != limit)
    if op == "<=":
        return bool(value <= limit)
    if op == ">=":
        return bool(value >= limit)
    if op == "<":
        return bool(value < limit)
    if op == ">":
        return bool(value > limit)
    if op == "in":
        return value in limit
    raise ValueError(f"unknown op {op!r}")


def _newest(root: Path, pattern: str) -> Path | None:
    files = [Path(p) for p in glob.glob(str(root / pattern))]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def evaluate_budgets(budgets: list[dict[str, Any]], roots: list[Path], now: float) -> dict[str, Any]:
    """Each budget against the newest matching evidence file under any of ``roots``."""
    results, violations = [], []
    for b in budgets:
        found = [p for p in (_newest(r, b["evidence"]) for r in roots) if p is not None]
        path = max(found, key=lambda p: p.stat().st_mtime) if found else None
        res: dict[str, Any] = {"name": b["name"], "evidence": b["evidence"], "file": str(path) if path else None}
        action = b.get("action", "INVESTIGATE")
        if path is None:
            res.update(ok=False, reason="EVIDENCE_MISSING", recommended_action=f"RUN_PRODUCER_OF:{b['evidence']}")
        else:
            age = now - path.stat().st_mtime
            res["age_s"] = round(age, 1)
            if age > float(b.get("max_age_s", 86_400)):
                res.update(ok=False, reason="EVIDENCE_STALE", recommended_action=f"REFRESH:{b['evidence']}")
            else:
                try:
                    value = dotted_get(json.loads(path.read_text()), b["field"])
                    res["value"] = value
                    if _holds(value, b.get("op", "=="), b.get("limit")):
                        res.update(ok=True)
                    else:
                        res.update(ok=False, reason="LIMIT_BREACHED", limit=b.get("limit"), op=b.get("op", "=="),
                                   recommended_action=action)
                except (KeyError, ValueError, TypeError) as exc:
                    res.update(ok=False, reason="EVIDENCE_UNREADABLE", detail=str(exc), recommended_action=action)
        results.append(res)
        if not res["ok"]:
            violations.append(res)
    worst = "NONE"
    for v in violations:
        a = v["recommended_action"]
        if ACTION_ORDER.get(a, 5) < ACTION_ORDER.get(worst, 9) or worst == "NONE":
            worst = a
    return {"budget_ok": not violations, "violation_count": len(violations), "violations": violations,
            "results": results, "recommended_action": worst}


def load_budgets(path: str | None) -> list[dict[str, Any]]:
    if not path:
        return DEFAULT_BUDGETS
    data = json.loads(Path(path).read_text())
    return list(data["budgets"] if isinstance(data, dict) else data)


def _policy(ctx: JobContext) -> Any:
    """The budgets to judge by, through the signed-policy loader (jobs/policy.py, docs/policy.md)."""
    from jobs.policy import load_policy

    return load_policy(ctx.budgets_file or (getattr(ctx.cfg.jobs, "budgets_file", None) if ctx.cfg else None),
                       ctx.cfg, ctx.data_dir)


async def check_safety_budget(ctx: JobContext) -> JobResult:
    pol = _policy(ctx)
    budgets = pol.budgets
    roots = [ctx.evidence_dir.parent, Path("build/runbooks").resolve()]
    res = evaluate_budgets(budgets, roots, ctx.now())
    out = {"at": ctx.now(), "roots": [str(r) for r in roots], **res, "policy": pol.info}
    if pol.refused and res["recommended_action"] not in ("WITHDRAW_HALT", "CANCEL_ONLY"):
        out["recommended_action"] = pol.info["recommended_action"]
    out["evidence"] = str(ctx.write_evidence(f"safety-budget-{ctx.stamp()}.json", out))
    return JobResult("ok" if res["budget_ok"] and not pol.refused else "violation", out)


async def check_freshness(ctx: JobContext) -> JobResult:
    """Every budget's evidence exists and is fresh (values not judged: that is the budget's job)."""
    pol = _policy(ctx)
    budgets = pol.budgets
    roots = [ctx.evidence_dir.parent, Path("build/runbooks").resolve()]
    out_rows = []
    stale = 0
    for b in budgets:
        found = [p for p in (_newest(r, b["evidence"]) for r in roots) if p is not None]
        path = max(found, key=lambda p: p.stat().st_mtime) if found else None
        age = (ctx.now() - path.stat().st_mtime) if path else None
        ok = age is not None and age <= float(b.get("max_age_s", 86_400))
        stale += not ok
        out_rows.append({"name": b["name"], "file": str(path) if path else None,
                         "age_s": round(age, 1) if age is not None else None, "fresh": ok})
    out = {"evidence": out_rows, "stale_or_missing": stale, "policy": pol.info,
           "recommended_action": pol.info.get("recommended_action") or ("NONE" if not stale else "REFRESH_EVIDENCE")}
    ctx.write_evidence("evidence-freshness-latest.json", out)
    return JobResult("ok" if not stale and not pol.refused else "violation", out)


async def check_snapshot(ctx: JobContext) -> JobResult:
    """``spotex core snapshot`` then ``spotex core verify-snapshot`` (child processes: the CLI is the
    contract, and the recovery code is core's own)."""
    core_dir = ctx.data_dir / "core"
    if not (core_dir / "wal").exists():
        return _not_available(f"no core WAL under {core_dir}")
    out_file = ctx.evidence_dir / "snapshot-verify-latest.json"
    ctx.evidence_dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "spotex", "core"]
    common = ["--data-dir", str(ctx.data_dir)]
    snap = await asyncio.to_thread(subprocess.run, [*base, "snapshot", *common], capture_output=True, text=True,
                                   timeout=600, env=os.environ.copy())
    ver = await asyncio.to_thread(subprocess.run, [*base, "verify-snapshot", *common, "--out", str(out_file)],
                                  capture_output=True, text=True, timeout=600, env=os.environ.copy())
    out: dict[str, Any] = {"snapshot_rc": snap.returncode, "snapshot_stdout": snap.stdout.strip()[-2000:],
                           "snapshot_stderr": snap.stderr.strip()[-1000:], "verify_rc": ver.returncode,
                           "verify_stdout": ver.stdout.strip()[-1000:], "verify_stderr": ver.stderr.strip()[-1000:]}
    if out_file.exists():
        out["verify"] = json.loads(out_file.read_text())
    if ver.returncode == 0:
        return JobResult("ok", out)
    if "nothing to snapshot" in snap.stderr and ver.returncode != 0:
        return JobResult("not_available", {**out, "reason": "the WAL is empty"})
    return JobResult("violation", {**out, "recommended_action": "INVESTIGATE"})


CHECKS: dict[str, Callable[[JobContext], Awaitable[JobResult]]] = {
    "invariants": check_invariants,
    "reconciliation": check_reconciliation,
    "settlement_lag": check_settlement_lag,
    "anomaly": check_anomaly,
    "safety_budget": check_safety_budget,
    "snapshot_verify": check_snapshot,
    "freshness": check_freshness,
}
