"""Scheduled-check drills (seed §4.5, §4.8), run through the same ``run_job`` the ``jobs`` service uses
(so every run is stored in ``job_runs``).

``spotex drill game-day-anomaly``: a baseline anomaly run, then one with forced signals over every
threshold; the detector must classify them (SEV1 / WITHDRAW_HALT first), write
``anomaly-detector-*.json`` and deliver a signed webhook: to ``WEBHOOK_URL`` when set, else to a
local receiver that checks the HMAC signature and timestamp. Then a safety-budget run writes
``safety-budget-*.json``. Success line ``runbook_game_day_anomaly_ok=true``.

``spotex drill budget-failure``: a budgets file with one budget of each failure kind (evidence
missing, evidence stale, limit breached) and one that holds; the evaluation must fail with exactly
those three violations, each with its reason and recommended action, and a healthy budgets file
must pass. Success line ``runbook_budget_failure_ok=true``.

``spotex drill lag-spike`` (seed §4.0 reconciliation lag, §3.2 policy): the ledger service is
paused (SIGSTOP: it stays up for the supervisor, but settles nothing) while orders keep flowing
through the real core, so settlement lag grows on the traded symbols. The ``settlement_lag`` job,
run through ``run_job`` with the drill's thresholds (T2/T3 well below the ledger's own T2, so the
ledger's latch stays out of it) and a small throttle (``--throttle``, 2 new orders/s), must:
past T2, throttle the symbol (the policy layer of ``symbol_throttle``): a trader's signed REST orders
through the real edge beyond the rate get ``429 SYMBOL_THROTTLED`` while cancels pass and the core's
mode stays NORMAL; past T3, SOFT_HALT it: the core's mode and a ``409 MARKET_HALTED`` at the edge.
Every action has its audit entry with actor ``jobs:settlement_lag``. Then the ledger resumes
(SIGCONT), catches up, and the job lifts both (audited): the core's mode is NORMAL and a burst of
orders over the old rate is no longer refused. Evidence: ``lag-spike-summary.json``
(``lag_spike_ok``, per-phase runs, edge probes, audit entries, ``recommended_action``) and
``settlement-lag-latest.json``. Success line ``runbook_lag_spike_ok=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from runbooks.common import Drill, Trader, jobs_context, wait_until

__all__ = ["budget_failure", "game_day_anomaly", "lag_spike"]


@contextlib.asynccontextmanager
async def _webhook_receiver(secret: str) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A minimal HTTP receiver recording each POST and whether its signature verifies."""
    from jobs.checks import sign_webhook

    got: list[dict[str, Any]] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            body = await r.readexactly(int(hdrs.get("content-length", "0")))
            ts = int(hdrs.get("x-spotex-timestamp", "0"))
            ok = hdrs.get("x-spotex-signature") == sign_webhook(secret, body, ts) and abs(time.time() - ts) < 300
            got.append({"signature_ok": ok, "timestamp": ts, "body": json.loads(body)})
            w.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await w.drain()
        finally:
            w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/anomaly", got
    finally:
        srv.close()


async def game_day_anomaly(d: Drill) -> bool:
    from jobs.checks import ANOMALY_DEFAULTS
    from jobs.scheduler import close_context, run_job

    d.status("before")
    external = os.environ.get("WEBHOOK_URL")
    secret = d.cfg.jobs.webhook_secret or os.environ.get("WEBHOOK_SECRET") or "game-day-secret"
    forced = {k: float(v[0]) * 5 for k, v in ANOMALY_DEFAULTS.items()}
    async with _webhook_receiver(secret) as (local_url, received):
        ctx, closers = await jobs_context(d, webhook_url=external or local_url, webhook_secret=secret)
        try:
            ctx.webhook_url = None  # the baseline is not an incident
            baseline = await run_job(ctx, "anomaly", trigger="drill")
            ctx.webhook_url = external or local_url
            ctx.inject = forced
            injected = await run_job(ctx, "anomaly", trigger="drill")
            ctx.inject = {}
            budget = await run_job(ctx, "safety_budget", trigger="drill")
        finally:
            await close_context(closers)
    out = injected["output"]
    webhook = out.get("webhook") or {}
    webhook_ok = bool(webhook.get("delivered")) and (
        bool(external) or (len(received) == 1 and received[0]["signature_ok"]))
    anomaly_files = sorted(p.name for p in d.out_dir.glob("anomaly-detector-*.json"))
    budget_files = sorted(p.name for p in d.out_dir.glob("safety-budget-*.json"))
    classified = (injected["outcome"] == "violation" and out.get("severity") == "SEV1"
                  and out.get("recommended_action") == "WITHDRAW_HALT"
                  and {f["signal"] for f in out.get("findings", [])} == set(ANOMALY_DEFAULTS))
    d.status("after")
    ok = classified and webhook_ok and len(anomaly_files) >= 2 and bool(budget_files) and \
        baseline["outcome"] in ("ok", "not_available", "violation")
    summary = {
        "game_day_anomaly_ok": ok, "baseline": {k: baseline[k] for k in ("outcome", "run_id")} | {
            "severity": baseline["output"].get("severity"), "signals": baseline["output"].get("signals")},
        "injected": {"outcome": injected["outcome"], "run_id": injected["run_id"], "signals": forced,
                     "severity": out.get("severity"), "recommended_action": out.get("recommended_action"),
                     "findings": out.get("findings")},
        "webhook": {**webhook, "receiver": "external" if external else "local", "received": len(received),
                    "signature_ok": all(r["signature_ok"] for r in received) if received else None},
        "safety_budget": {"outcome": budget["outcome"], "run_id": budget["run_id"],
                          "violation_count": budget["output"].get("violation_count")},
        "anomaly_files": anomaly_files, "safety_budget_files": budget_files,
    }
    d.write("game-day-anomaly-summary.json", summary)
    d.emit("anomaly_severity", out.get("severity"))
    d.emit("anomaly_recommended_action", out.get("recommended_action"))
    d.emit("anomaly_webhook_delivered", webhook_ok)
    d.emit("anomaly_evidence", anomaly_files[-1] if anomaly_files else "")
    d.emit("safety_budget_evidence", budget_files[-1] if budget_files else "")
    d.emit("runbook_game_day_anomaly_ok", ok)
    return ok


async def budget_failure(d: Drill) -> bool:
    from jobs.checks import evaluate_budgets

    d.status("before")
    ev = d.out_dir / "evidence"
    ev.mkdir(parents=True, exist_ok=True)
    (ev / "healthy.json").write_text(json.dumps({"ok": True}))
    (ev / "stale.json").write_text(json.dumps({"ok": True}))
    old = time.time() - 7200
    os.utime(ev / "stale.json", (old, old))
    (ev / "breached.json").write_text(json.dumps({"missing": 3}))
    with contextlib.suppress(FileNotFoundError):
        (ev / "missing.json").unlink()
    budgets = [
        {"name": "healthy", "evidence": "evidence/healthy.json", "field": "ok", "op": "==", "limit": True,
         "max_age_s": 600, "action": "INVESTIGATE"},
        {"name": "stale_evidence", "evidence": "evidence/stale.json", "field": "ok", "op": "==", "limit": True,
         "max_age_s": 600, "action": "INVESTIGATE"},
        {"name": "missing_evidence", "evidence": "evidence/missing.json", "field": "ok", "op": "==",
         "limit": True, "max_age_s": 600, "action": "INVESTIGATE"},
        {"name": "export_complete", "evidence": "evidence/breached.json", "field": "missing", "op": "<=",
         "limit": 0, "max_age_s": 600, "action": "CANCEL_ONLY"},
    ]
    (d.out_dir / "budgets.json").write_text(json.dumps({"budgets": budgets}, indent=2))
    res = evaluate_budgets(budgets, [d.out_dir], time.time())
    healthy = evaluate_budgets(budgets[:1], [d.out_dir], time.time())
    reasons = {v["name"]: v["reason"] for v in res["violations"]}
    expected = {"stale_evidence": "EVIDENCE_STALE", "missing_evidence": "EVIDENCE_MISSING",
                "export_complete": "LIMIT_BREACHED"}
    diagnosed = (not res["budget_ok"] and res["violation_count"] == 3 and reasons == expected
                 and all(v.get("recommended_action") for v in res["violations"]))
    d.status("after")
    ok = diagnosed and healthy["budget_ok"] and res["recommended_action"] == "CANCEL_ONLY"
    summary = {"budget_failure_ok": ok, "budget_ok": res["budget_ok"], "violation_count": res["violation_count"],
               "recommended_action": res["recommended_action"], "violations": res["violations"],
               "results": res["results"], "healthy_budget_ok": healthy["budget_ok"]}
    d.write("budget-failure-summary.json", summary)
    d.emit("budget_ok", res["budget_ok"])
    d.emit("violation_count", res["violation_count"])
    for v in res["violations"]:
        d.emit(f"violation_{v['name']}", f"{v['reason']}:{v['recommended_action']}")
    d.emit("recommended_action", res["recommended_action"])
    d.emit("runbook_budget_failure_ok", ok)
    return ok


async def _until(pred: Any, timeout: float, every: float = 0.3) -> Any:
    return await wait_until(pred, timeout, None, every)


async def lag_spike(d: Drill, t2: int = 150, t3: int = 600, recovered: int = 50, commands: int = 20_000,
                    rate: float = 150.0, seed: int = 21, throttle: int = 2) -> bool:
    """Load is paced (``rate`` commands/s) so that the T2 -> T3 climb on a symbol takes seconds: the
    job's T2 run must see the symbol between T2 and T3. ``commands`` only bounds it: the load stops
    once T3 is passed. ``throttle`` is the policy's new-orders/s for the drill (small, so a handful of
    orders shows it)."""
    import signal

    import msgspec

    from core.sim import generate
    from jobs.checks import POLICY_ACTOR, core_symbol_mode
    from jobs.scheduler import close_context, run_job
    from ledger.audit import load_entries
    from ledger.reconcile import lag_report
    from runbooks.common import publish_load

    lc = d.cfg.ledger
    if not (recovered < t2 < t3 < lc.lag_throttle_seq):
        raise SystemExit(f"spotex: lag-spike needs recovered < T2 < T3 < the ledger's own T2 "
                         f"({recovered} < {t2} < {t3} < {lc.lag_throttle_seq})")
    before = d.status("before")
    comp = d.component("ledger")
    if not comp.get("pid"):
        raise SystemExit("spotex: no ledger service in this stack")
    ledger_pid = int(comp["pid"])
    d.cfg = msgspec.structs.replace(d.cfg, ledger=msgspec.structs.replace(
        lc, lag_warn_seq=recovered, lag_throttle_seq=t2, lag_halt_seq=t3),
        jobs=msgspec.structs.replace(d.cfg.jobs, lag_throttle_orders_per_s=throttle))
    edge_url = next((c.get("endpoint") for c in before.get("components") or [] if c.get("name") == "edge"), None)
    if not edge_url:
        raise SystemExit("spotex: no edge in this stack (the drill observes the policy through it)")
    ctx, closers = await jobs_context(d)
    trader: Trader | None = None
    probes: dict[str, Any] = {}
    phases: dict[str, Any] = {}
    stop_load = asyncio.Event()
    load: asyncio.Task[Any] | None = None
    paused = False
    t0 = time.monotonic()
    timeline: list[dict[str, Any]] = []

    def mark(event: str, **kw: Any) -> None:
        timeline.append({"t_s": round(time.monotonic() - t0, 3), "event": event, **kw})

    async def lags() -> dict[str, int]:
        rep = await lag_report(ctx.pool, ctx.js, d.cfg.nats.evt_stream)
        return {s: int(v.get("lag", 0)) for s, v in rep.items() if "engine_seq" in v and not s.startswith("_")}

    async def job(label: str) -> dict[str, Any]:
        r = await run_job(ctx, "settlement_lag", trigger="drill")
        out = r["output"]
        phases[label] = {"run_id": r["run_id"], "outcome": r["outcome"], "max_lag_events": out.get("max_lag_events"),
                         "recommended_action": out.get("recommended_action"),
                         "actions": (out.get("policy") or {}).get("actions"),
                         "imposed": (out.get("policy") or {}).get("imposed"),
                         "throttled": (out.get("policy") or {}).get("throttled"),
                         "core_modes": {s: v.get("core_mode") for s, v in (out.get("streams") or {}).items()
                                        if v.get("core_mode")}}
        mark(f"job_{label}", outcome=r["outcome"], actions=len(phases[label]["actions"] or []))
        return r

    async def core_mode(symbol: str) -> str | None:
        return await core_symbol_mode(ctx, symbol)

    async def core_shows(symbol: str, mode: str, timeout: float = 20) -> bool:
        """The command goes through CMD: wait for the core to have applied it."""
        async def hit() -> bool:
            return await core_mode(symbol) == mode

        return bool(await _until(hit, timeout, every=0.2))

    audit_from = 0
    ok_steps: dict[str, bool] = {}
    hot: str | None = None
    try:
        async with ctx.pool.acquire() as c:
            audit_from = int(await c.fetchval("SELECT coalesce(max(seq), 0) FROM audit_chain WHERE chain = 'admin'"))
        base = await job("baseline")
        ok_steps["baseline_clear"] = base["outcome"] == "ok" and not phases["baseline"]["actions"]
        trader = await Trader.create(d, ctx.pool, d.endpoints.nats_url, str(edge_url))
        os.kill(ledger_pid, signal.SIGSTOP)
        paused = True
        mark("ledger_paused", pid=ledger_pid)
        load = asyncio.create_task(publish_load(d.endpoints.nats_url, list(generate(seed, commands)), rate,
                                                f"lag-spike-{int(time.time())}", stop_load))

        async def past(limit: int) -> str | None:
            ls = await lags()
            over = [s for s, n in sorted(ls.items(), key=lambda kv: -kv[1]) if n >= limit]
            return over[0] if over else None

        hot = await _until(lambda: past(t2), 120)
        mark("past_t2", symbol=hot, lags=await lags())
        if hot is not None:
            await job("t2")
            # The edge learns the throttle from its watch of symbol_throttle: orders over the rate are
            # refused, cancels pass, and the market stays open (no mode change at T2).
            probes["t2"] = p2 = await trader.probe(hot, "SYMBOL_THROTTLED")
            mark("probe_t2", **{k: p2[k] for k in ("seen", "orders", "statuses")})
            ok_steps["t2_throttle"] = (any(a["symbol"] == hot and a["kind"] == "throttle" and a["to"] == "THROTTLE"
                                           for a in phases["t2"]["actions"] or [])
                                       and p2["seen"] and p2["cancels_ok"] == p2["cancels"]
                                       and await core_mode(hot) == "NORMAL")
            hot3 = await _until(lambda: past(t3), 120)
            mark("past_t3", symbol=hot3, lags=await lags())
            if hot3 is not None:
                await job("t3")
                halted = await core_shows(hot3, "SOFT_HALT")
                probes["t3"] = p3 = await trader.probe(hot3, "MARKET_HALTED")
                mark("probe_t3", **{k: p3[k] for k in ("seen", "orders", "statuses")})
                ok_steps["t3_soft_halt"] = (any(a["symbol"] == hot3 and a["to"] == "SOFT_HALT"
                                                for a in phases["t3"]["actions"] or [])
                                            and halted and p3["seen"])
        stop_load.set()
        load_res = await load
        mark("load_stopped", sent=load_res.sent, acked=len(load_res.acked), errors=load_res.errors)
        os.kill(ledger_pid, signal.SIGCONT)
        paused = False
        mark("ledger_resumed")

        async def caught_up() -> bool:
            ls = await lags()
            return bool(ls) and max(ls.values()) < recovered

        settled = await _until(caught_up, 180)
        mark("ledger_caught_up", ok=bool(settled), lags=await lags())
        rec = await job("recovery")
        lifted = list(phases.get("t3", {}).get("imposed") or {})
        normal = {s: await core_shows(s, "NORMAL") for s in lifted}
        unthrottled = list(phases.get("t3", {}).get("throttled") or {})
        # Give the edge's watch a moment, then a burst of 3x the old rate must flow on every symbol
        # the policy had throttled.
        await asyncio.sleep(1.0)
        probes["recovery"] = {s: await trader.burst(s, 3 * throttle + 2) for s in unthrottled}
        flowing = {s: p["flowing"] and p["cancels_ok"] for s, p in probes["recovery"].items()}
        ok_steps["recovered"] = (bool(settled) and rec["outcome"] == "ok" and not phases["recovery"]["imposed"]
                                 and not phases["recovery"]["throttled"] and bool(normal) and all(normal.values())
                                 and bool(flowing) and all(flowing.values()))
        mark("core_modes_after", **{s: await core_mode(s) for s in lifted})
        mark("orders_flow_after", **flowing)
        async with ctx.pool.acquire() as c:
            entries = await load_entries(c, "admin", after_seq=audit_from)
            latched = [r["symbol"] for r in await c.fetch("SELECT symbol FROM ledger_latches WHERE engaged")]
    finally:
        stop_load.set()
        if paused:
            os.kill(ledger_pid, signal.SIGCONT)
        if load is not None and not load.done():
            await load
        if trader is not None:
            await trader.close()
        await close_context(closers)
    ours = [e for e in entries if e.get("actor") == POLICY_ACTOR]
    # Each action against the audit entry the job wrote for it (action name and seq).
    by_seq = {e["seq"]: e for e in ours}
    want = {("throttle", "THROTTLE"): "SetSymbolThrottle", ("throttle", "UNTHROTTLED"): "ClearSymbolThrottle",
            ("mode", "SOFT_HALT"): "SetSymbolMode", ("mode", "NORMAL"): "SetSymbolMode"}
    acted = [a for ph in phases.values() for a in (ph.get("actions") or [])]
    audited = [a for a in acted if (by_seq.get(a.get("audit_seq")) or {}).get("action") == want.get(
        (a.get("kind"), a.get("to"))) and (by_seq.get(a.get("audit_seq")) or {}).get("params", {}).get("symbol")
        == a["symbol"]]
    ok_steps["every_action_audited"] = bool(acted) and len(audited) == len(acted)
    ok_steps["ledger_latch_not_involved"] = not latched
    after = d.status("after")
    ok = all(ok_steps.get(k) for k in ("baseline_clear", "t2_throttle", "t3_soft_halt", "recovered",
                                       "every_action_audited", "ledger_latch_not_involved"))
    failed = [k for k in ("baseline_clear", "t2_throttle", "t3_soft_halt", "recovered", "every_action_audited",
                          "ledger_latch_not_involved") if not ok_steps.get(k)]
    action = "NONE" if ok else ("INVESTIGATE_LAG_POLICY" if set(failed) - {"recovered"} else "INVESTIGATE_LEDGER")
    summary = {
        "lag_spike_ok": ok, "recommended_action": action, "steps": ok_steps, "failed_steps": failed,
        "thresholds": {"recovered_below": recovered, "t2": t2, "t3": t3,
                       "ledger_own_t2": lc.lag_throttle_seq, "ledger_own_t3": lc.lag_halt_seq},
        "throttle_orders_per_s": throttle, "edge_probes": probes,
        "hot_symbol": hot, "phases": phases, "policy_audit_entries": ours, "ledger_latches_engaged": latched,
        "timeline": timeline, "stack_healthy_before": before.get("healthy"),
        "stack_healthy_after": after.get("healthy"),
    }
    d.write("lag-spike-summary.json", summary)
    for k in ("baseline_clear", "t2_throttle", "t3_soft_halt", "recovered", "every_action_audited"):
        d.emit(f"lag_spike_{k}", bool(ok_steps.get(k)))
    d.emit("lag_spike_policy_audit_entries", len(ours))
    d.emit("recommended_action", action)
    d.emit("runbook_lag_spike_ok", ok)
    return ok
