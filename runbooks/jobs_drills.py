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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from runbooks.common import Drill

__all__ = ["budget_failure", "game_day_anomaly"]


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


async def _ctx(d: Drill, **kw: Any) -> tuple[Any, list[Any]]:
    from jobs.scheduler import make_context, open_context

    ep = d.endpoints
    try:
        edge: str | None = ep.probe_url("edge") + "/metrics"
    except KeyError:
        edge = None
    ctx = make_context(d.cfg, d.data_dir, pg_dsn=ep.pg_dsn, nats_url=ep.nats_url, edge_metrics_url=edge,
                       evidence_dir=d.out_dir, **kw)
    return ctx, await open_context(ctx)


async def game_day_anomaly(d: Drill) -> bool:
    from jobs.checks import ANOMALY_DEFAULTS
    from jobs.scheduler import close_context, run_job

    d.status("before")
    external = os.environ.get("WEBHOOK_URL")
    secret = d.cfg.jobs.webhook_secret or os.environ.get("WEBHOOK_SECRET") or "game-day-secret"
    forced = {k: float(v[0]) * 5 for k, v in ANOMALY_DEFAULTS.items()}
    async with _webhook_receiver(secret) as (local_url, received):
        ctx, closers = await _ctx(d, webhook_url=external or local_url, webhook_secret=secret)
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
