"""The ``jobs`` service: an APScheduler 3.x ``AsyncIOScheduler`` running the checks of
``jobs.checks`` on their crons (``[jobs]`` config section), and ``run_job`` for ``spotex jobs run``.

Every run is a row in ``job_runs`` (ledger/migrations/0004_jobs.sql): inserted as ``running`` when it
starts, completed with its outcome and output JSON when it ends, so a crashed run stays visible.
Jobs coalesce missed runs into one, never overlap themselves (``max_instances=1``) and run late
within ``misfire_grace_s``.

The service answers two NATS request/reply subjects (:class:`JobsService`, contract in docs/jobs.md):
``jobs.list`` (schedule, next run, last run of every job) and ``jobs.run`` (run one now through the
same path as the scheduler: one instance per job whether the scheduler or a request started it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from jobs.checks import CHECKS, JobContext, JobResult

__all__ = ["API_LIST", "API_RUN", "JOB_CRONS", "JobsService", "job_table", "make_context", "run", "run_job",
           "run_summary"]

API_LIST = "jobs.list"
API_RUN = "jobs.run"

log = logging.getLogger("jobs.scheduler")

M_RUNS = Counter("jobs_runs_total", "Job runs by outcome", ["job", "outcome"])
M_LAST_OK = Gauge("jobs_last_outcome_ok", "1 when the job's last run was ok", ["job"])
M_SECONDS = Histogram("jobs_run_seconds", "Job run time", ["job"], buckets=(0.01, 0.1, 0.5, 1, 5, 30, 120, 600))
M_SKIPPED = Counter("jobs_runs_skipped_total", "Runs not started because the job was already running",
                    ["job", "trigger"])

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
            ctx.nc = nc
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


async def run_job(ctx: JobContext, name: str, trigger: str = "schedule",
                  checks: Mapping[str, Callable[[JobContext], Awaitable[JobResult]]] | None = None) -> dict[str, Any]:
    """Run one check, store the run, return {job, run_id, outcome, output, seconds}."""
    check = (checks or CHECKS)[name]
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


_SUMMARY_KEYS = ("recommended_action", "severity", "reason", "error", "violation_count", "max_lag_events",
                 "stale_or_missing", "missing")


def run_summary(outcome: str, output: Mapping[str, Any] | None) -> str:
    """One line for a run: its outcome and the telling fields of its output (at most 300 chars)."""
    parts = [outcome]
    for k in _SUMMARY_KEYS:
        v = (output or {}).get(k)
        if v not in (None, "", "NONE"):
            parts.append(f"{k}={v}")
    return " ".join(parts)[:300]


def _iso(v: Any) -> str | None:
    return v.isoformat() if v is not None else None


class JobsService:
    """The scheduler and the request API over one set of jobs, with one run per job at a time.

    ``jobs.list`` (body empty or ``{}``) replies
    ``{"jobs": [{"name", "schedule", "next_run_at", "last_run": {"id", "started_at", "ended_at",
    "outcome", "summary"} | null}]}``; ``jobs.run`` (``{"job", "actor", "reason", "ticket"}``)
    replies ``{"run_id", "outcome", "summary"}`` when the run ends, or ``{"error": "UNKNOWN_JOB" |
    "JOB_RUNNING" | "BAD_REQUEST", "detail"}``. Times are ISO 8601 UTC strings.
    """

    def __init__(self, ctx: JobContext, crons: Mapping[str, str],
                 checks: Mapping[str, Callable[[JobContext], Awaitable[JobResult]]] | None = None,
                 misfire_grace_s: int = 60) -> None:
        self.ctx = ctx
        self.crons = dict(crons)
        self.checks = dict(checks or CHECKS)
        self.misfire_grace_s = misfire_grace_s
        self.running: dict[str, float] = {}
        self.sched: Any = None
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def start_scheduler(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.cron import CronTrigger

        self.sched = AsyncIOScheduler(timezone="UTC", job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": int(self.misfire_grace_s)})
        for name, cron in self.crons.items():
            self.sched.add_job(self.scheduled, CronTrigger.from_crontab(cron, timezone="UTC"), args=[name],
                               id=name, name=name, replace_existing=True)
        self.sched.start()

    async def scheduled(self, name: str) -> None:
        await self.run(name, "schedule")

    def _claim(self, name: str, trigger: str) -> bool:
        if name in self.running:
            M_SKIPPED.labels(name, trigger.split(":", 1)[0]).inc()
            log.info("job already running: not started again", extra={"job": name, "trigger": trigger})
            return False
        self.running[name] = time.time()
        return True

    async def _run_claimed(self, name: str, trigger: str) -> dict[str, Any]:
        try:
            return await run_job(self.ctx, name, trigger, self.checks)
        finally:
            self.running.pop(name, None)

    async def run(self, name: str, trigger: str) -> dict[str, Any] | None:
        """Run ``name`` now unless it is running already (then None)."""
        if not self._claim(name, trigger):
            return None
        return await self._run_claimed(name, trigger)

    async def last_runs(self) -> dict[str, dict[str, Any]]:
        if self.ctx.pool is None:
            return {}
        async with self.ctx.pool.acquire() as c:
            rows = await c.fetch("SELECT DISTINCT ON (job) id, job, started_at, finished_at, outcome, output "
                                 "FROM job_runs ORDER BY job, id DESC")
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            output = json.loads(r["output"]) if isinstance(r["output"], str) else r["output"]
            out[r["job"]] = {"id": int(r["id"]), "started_at": _iso(r["started_at"]),
                             "ended_at": _iso(r["finished_at"]), "outcome": r["outcome"],
                             "summary": run_summary(r["outcome"], output)}
        return out

    async def list_jobs(self) -> dict[str, Any]:
        lasts = await self.last_runs()
        jobs = []
        for name, cron in self.crons.items():
            j = self.sched.get_job(name) if self.sched is not None else None
            nxt = j.next_run_time if j is not None else None
            jobs.append({"name": name, "schedule": cron, "next_run_at": _iso(nxt), "last_run": lasts.get(name)})
        return {"jobs": jobs}

    # -- NATS request/reply ------------------------------------------------------------------------

    async def start_api(self, nc: Any) -> None:
        self._subs.append(await nc.subscribe(API_LIST, cb=self._on_list))
        self._subs.append(await nc.subscribe(API_RUN, cb=self._on_run))

    @property
    def api_ready(self) -> bool:
        return len(self._subs) == 2

    async def _reply(self, msg: Any, body: Mapping[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await msg.respond(json.dumps(body, default=str).encode())

    async def _on_list(self, msg: Any) -> None:
        try:
            body = await self.list_jobs()
        except Exception as exc:
            body = {"error": "UNAVAILABLE", "detail": f"{type(exc).__name__}: {exc}"[:300]}
        await self._reply(msg, body)

    async def _on_run(self, msg: Any) -> None:
        # Replies to a run come when it ends; the callback returns at once so that other requests
        # (a list, a JOB_RUNNING answer) are not queued behind a long run.
        try:
            req = json.loads(msg.data or b"null")
        except ValueError:
            req = None
        if not isinstance(req, dict) or not isinstance(req.get("job"), str):
            await self._reply(msg, {"error": "BAD_REQUEST", "detail": 'expected JSON {"job", "actor", "reason", '
                                                                       '"ticket"}'})
            return
        name = req["job"]
        missing = [k for k in ("actor", "reason", "ticket") if not str(req.get(k) or "").strip()]
        if name not in self.checks:
            await self._reply(msg, {"error": "UNKNOWN_JOB", "detail": f"unknown job {name!r}; one of "
                                                                      f"{', '.join(self.checks)}"})
            return
        if missing:
            await self._reply(msg, {"error": "BAD_REQUEST", "detail": f"missing {', '.join(missing)}"})
            return
        trigger = f"api:{str(req['actor']).strip()[:100]}"
        if not self._claim(name, trigger):
            await self._reply(msg, {"error": "JOB_RUNNING", "detail": f"{name} is running since "
                                                                      f"{self.running.get(name, 0):.0f} (epoch s)"})
            return
        log.info("job run requested", extra={"job": name, "actor": req["actor"], "reason": req["reason"],
                                              "ticket": req["ticket"]})

        async def go() -> None:
            try:
                r = await self._run_claimed(name, trigger)
                body: dict[str, Any] = {"run_id": r["run_id"], "outcome": r["outcome"],
                                        "summary": run_summary(r["outcome"], r["output"])}
            except Exception as exc:
                body = {"error": "UNAVAILABLE", "detail": f"{type(exc).__name__}: {exc}"[:300]}
            await self._reply(msg, body)

        t = asyncio.create_task(go())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self.sched is not None:
            self.sched.shutdown(wait=False)
            self.sched = None
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(t, 30)


async def open_context(ctx: JobContext) -> list[Any]:
    return await _open(ctx)


async def close_context(closers: list[Any]) -> None:
    for close in reversed(closers):
        with contextlib.suppress(Exception):
            await close()


async def run(ctx: Any) -> None:
    """The ``jobs`` service (``spotex serve jobs``)."""
    import signal

    from core.obs import ProbeServer

    cfg = ctx.cfg
    ep = ctx.endpoints
    try:
        edge_metrics: str | None = ep.probe_url("edge") + "/metrics"
    except (AttributeError, KeyError):
        edge_metrics = None
    jctx = make_context(cfg, ctx.data.root, pg_dsn=ep.pg_dsn, nats_url=ep.nats_url, edge_metrics_url=edge_metrics)
    closers = await _open(jctx)
    svc = JobsService(jctx, {name: str(getattr(cfg.jobs, field)) for name, field in JOB_CRONS.items()},
                      misfire_grace_s=int(cfg.jobs.misfire_grace_s))
    svc.start_scheduler()
    if jctx.nc is not None:
        await svc.start_api(jctx.nc)

    async def ready() -> str | None:
        return None if jctx.pool is not None else "PostgreSQL not connected"

    async def api_ready() -> str | None:
        return None if svc.api_ready else f"not answering {API_LIST} / {API_RUN} (NATS not connected at start)"

    async def status() -> dict[str, Any]:
        return {**await svc.list_jobs(), "running": dict(svc.running)}

    probe = ProbeServer("127.0.0.1", ctx.probe_port, service=ctx.name,
                        readiness=[("postgres", ready), ("api", api_ready)], extra_routes={"/status": status})
    await probe.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await svc.close()
        with contextlib.suppress(Exception):
            await probe.stop()
        await close_context(closers)
