"""The ``jobs`` service: an APScheduler 3.x ``AsyncIOScheduler`` running the checks of
``jobs.checks`` on their crons (``[jobs]`` config section), and ``run_job`` for ``spotex jobs run``.

Every run is a row in ``job_runs`` (ledger/migrations/0004_jobs.sql): inserted as ``running`` when it
starts, completed with its outcome and output JSON when it ends, so a crashed run stays visible.
Jobs coalesce missed runs into one, never overlap themselves (``max_instances=1``) and run late
within ``misfire_grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from jobs.checks import CHECKS, JobContext, JobResult

__all__ = ["JOB_CRONS", "job_table", "make_context", "run", "run_job"]

log = logging.getLogger("jobs.scheduler")

M_RUNS = Counter("jobs_runs_total", "Job runs by outcome", ["job", "outcome"])
M_LAST_OK = Gauge("jobs_last_outcome_ok", "1 when the job's last run was ok", ["job"])
M_SECONDS = Histogram("jobs_run_seconds", "Job run time", ["job"], buckets=(0.01, 0.1, 0.5, 1, 5, 30, 120, 600))

# job name -> config field holding its cron
JOB_CRONS = {
    "invariants": "invariants_cron",
    "reconciliation": "reconciliation_cron",
    "settlement_lag": "settlement_lag_cron",
    "anomaly": "anomaly_cron",
    "safety_budget": "safety_budget_cron",
    "snapshot_verify": "snapshot_verify_cron",
    "freshness": "freshness_cron",
}


def job_table(cfg: Any) -> list[dict[str, str]]:
    return [{"job": name, "cron": str(getattr(cfg.jobs, field)), "check": CHECKS[name].__name__}
            for name, field in JOB_CRONS.items()]


def make_context(cfg: Any, data_dir: Path, *, pg_dsn: str | None, nats_url: str | None,
                 edge_metrics_url: str | None = None, evidence_dir: Path | None = None, **kw: Any) -> JobContext:
    kw.setdefault("webhook_url", cfg.jobs.webhook_url)
    kw.setdefault("webhook_secret", cfg.jobs.webhook_secret)
    return JobContext(cfg=cfg, pg_dsn=pg_dsn, nats_url=nats_url, data_dir=data_dir,
                      evidence_dir=evidence_dir or data_dir / "evidence" / "jobs", edge_metrics_url=edge_metrics_url,
                      **kw)


async def _open(ctx: JobContext) -> list[Any]:
    """Connect what the checks need; a dependency that is down is left None (checks report it)."""
    closers: list[Any] = []
    if ctx.pg_dsn and ctx.pool is None:
        try:
            import asyncpg

            from ledger.migrate import migrate

            await migrate(ctx.pg_dsn)
            ctx.pool = await asyncpg.create_pool(ctx.pg_dsn, min_size=1, max_size=3, timeout=10)
            closers.append(ctx.pool.close)
        except Exception as exc:
            log.warning("PostgreSQL not available to the jobs", extra={"error": str(exc)})
    if ctx.nats_url and ctx.js is None:
        try:
            import nats

            nc = await nats.connect(ctx.nats_url, connect_timeout=3, max_reconnect_attempts=-1)
            ctx.js = nc.jetstream()
            closers.append(nc.close)
        except Exception as exc:
            log.warning("NATS not available to the jobs", extra={"error": str(exc)})
    return closers


async def _record_start(ctx: JobContext, job: str, trigger: str) -> int | None:
    if ctx.pool is None:
        return None
    try:
        async with ctx.pool.acquire() as c:
            rid = await c.fetchval("INSERT INTO job_runs (job, trigger) VALUES ($1, $2) RETURNING id", job, trigger)
            return int(rid)
    except Exception as exc:
        log.warning("could not record job start", extra={"job": job, "error": str(exc)})
        return None


async def _record_end(ctx: JobContext, run_id: int | None, res: JobResult) -> None:
    if ctx.pool is None or run_id is None:
        return
    async with ctx.pool.acquire() as c:
        await c.execute("UPDATE job_runs SET finished_at = now(), outcome = $2, output = $3::jsonb WHERE id = $1",
                        run_id, res.outcome, json.dumps(res.output, default=str))


async def run_job(ctx: JobContext, name: str, trigger: str = "schedule") -> dict[str, Any]:
    """Run one check, store the run, return {job, run_id, outcome, output, seconds}."""
    check = CHECKS[name]
    t0 = time.perf_counter()
    run_id = await _record_start(ctx, name, trigger)
    try:
        res = await check(ctx)
    except Exception as exc:
        res = JobResult("error", {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]})
    secs = time.perf_counter() - t0
    res.output.setdefault("seconds", round(secs, 3))
    try:
        await _record_end(ctx, run_id, res)
    except Exception as exc:
        log.warning("could not record job end", extra={"job": name, "error": str(exc)})
    M_RUNS.labels(name, res.outcome).inc()
    M_LAST_OK.labels(name).set(1 if res.outcome == "ok" else 0)
    M_SECONDS.labels(name).observe(secs)
    log.info("job run", extra={"job": name, "outcome": res.outcome, "run_id": run_id, "seconds": round(secs, 3)})
    return {"job": name, "run_id": run_id, "outcome": res.outcome, "output": res.output, "seconds": round(secs, 3)}


async def open_context(ctx: JobContext) -> list[Any]:
    return await _open(ctx)


async def close_context(closers: list[Any]) -> None:
    for close in reversed(closers):
        with contextlib.suppress(Exception):
            await close()


async def run(ctx: Any) -> None:
    """The ``jobs`` service (``spotex serve jobs``)."""
    import signal

    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.cron import CronTrigger

    from core.obs import ProbeServer

    cfg = ctx.cfg
    ep = ctx.endpoints
    try:
        edge_metrics: str | None = ep.probe_url("edge") + "/metrics"
    except (AttributeError, KeyError):
        edge_metrics = None
    jctx = make_context(cfg, ctx.data.root, pg_dsn=ep.pg_dsn, nats_url=ep.nats_url, edge_metrics_url=edge_metrics)
    closers = await _open(jctx)
    last: dict[str, dict[str, Any]] = {}

    async def fire(name: str) -> None:
        r = await run_job(jctx, name)
        last[name] = {k: r[k] for k in ("run_id", "outcome", "seconds")} | {"at": time.time()}

    sched = AsyncIOScheduler(timezone="UTC", job_defaults={
        "coalesce": True, "max_instances": 1, "misfire_grace_time": int(cfg.jobs.misfire_grace_s)})
    for name, field in JOB_CRONS.items():
        sched.add_job(fire, CronTrigger.from_crontab(getattr(cfg.jobs, field), timezone="UTC"), args=[name],
                      id=name, name=name, replace_existing=True)
    sched.start()

    async def ready() -> str | None:
        return None if jctx.pool is not None else "PostgreSQL not connected"

    async def status() -> dict[str, Any]:
        jobs = []
        for j in sched.get_jobs():
            jobs.append({"job": j.id, "next_run": str(j.next_run_time), "last": last.get(j.id)})
        return {"jobs": jobs}

    probe = ProbeServer("127.0.0.1", ctx.probe_port, service=ctx.name, readiness=[("postgres", ready)],
                        extra_routes={"/status": status})
    await probe.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        sched.shutdown(wait=False)
        with contextlib.suppress(Exception):
            await probe.stop()
        await close_context(closers)
