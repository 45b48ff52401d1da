"""`spotex jobs list|run` and the jobs service's NATS API (jobs.list / jobs.run) over the real stack
(supervisor, NATS, PostgreSQL, the jobs service), and one-run-per-job over real NATS."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from jobs.checks import JobContext, JobResult
from jobs.scheduler import API_LIST, API_RUN, JOB_CRONS, JobsService, close_context, make_context, open_context
from spotex.config import load_config
from spotex.paths import DataDir
from spotex.supervisor import resolve_endpoints
from spotex.testing import RunningServer, Stack, stack


@pytest.fixture(scope="module")
def jobs_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Any]]:
    with stack(tmp_path_factory.mktemp("jobs") / "stack") as st:
        yield st, resolve_endpoints(load_config(None), DataDir(st.data_dir))


async def _rows(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def _request(url: str, subject: str, body: dict[str, Any] | None, timeout: float = 60) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        msg = await nc.request(subject, json.dumps(body).encode() if body is not None else b"", timeout=timeout)
        return dict(json.loads(msg.data))
    finally:
        await nc.close()


def test_cli_list_names_every_job_with_its_cron(jobs_stack: tuple[Stack, Any]) -> None:
    st, _ = jobs_stack
    res = st.cli("jobs", "list", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    cfg = load_config(None)
    assert {r["job"]: r["cron"] for r in rows} == {n: getattr(cfg.jobs, f) for n, f in JOB_CRONS.items()}
    text = st.cli("jobs", "list")
    assert text.returncode == 0 and all(name in text.stdout for name in JOB_CRONS)


def test_cli_run_stores_the_run_in_job_runs(jobs_stack: tuple[Stack, Any]) -> None:
    st, ep = jobs_stack
    res = st.cli("jobs", "run", "invariants")
    assert res.stdout.strip().splitlines()[-1] == "job_outcome=ok", res.stdout + res.stderr
    assert res.returncode == 0
    out = json.loads(res.stdout[: res.stdout.rindex("job_outcome=")])
    assert out["job"] == "invariants" and out["outcome"] == "ok" and out["output"]["ok"] is True
    rows = asyncio.run(_rows(ep.pg_dsn, "SELECT job, trigger, outcome, finished_at, output FROM job_runs WHERE id = $1",
                             out["run_id"]))
    assert len(rows) == 1
    assert rows[0]["job"] == "invariants" and rows[0]["trigger"] == "manual" and rows[0]["outcome"] == "ok"
    assert rows[0]["finished_at"] is not None and json.loads(rows[0]["output"])["ok"] is True
    listed = {r["job"]: r for r in json.loads(st.cli("jobs", "list", "--json").stdout)}
    assert listed["invariants"]["last_outcome"] == "ok" and listed["invariants"]["last_started_at"]


def test_cli_run_unknown_job_fails_with_one_clear_line(jobs_stack: tuple[Stack, Any]) -> None:
    st, ep = jobs_stack
    res = st.cli("jobs", "run", "no_such_job")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spotex: unknown job 'no_such_job'") and "invariants" in lines[0]
    assert res.stdout == ""
    assert asyncio.run(_rows(ep.pg_dsn, "SELECT id FROM job_runs WHERE job = 'no_such_job'")) == []


def test_service_api_list_and_run_over_nats(jobs_stack: tuple[Stack, Any]) -> None:
    """The jobs service the supervisor started answers jobs.list and jobs.run."""
    _, ep = jobs_stack

    async def go() -> None:
        run = await _request(ep.nats_url, API_RUN, {"job": "reconciliation", "actor": "alice", "reason": "drill",
                                                    "ticket": "T-7"})
        assert set(run) == {"run_id", "outcome", "summary"}, run
        assert run["outcome"] == "ok" and run["summary"].startswith("ok")
        rows = await _rows(ep.pg_dsn, "SELECT job, trigger, outcome, finished_at FROM job_runs WHERE id = $1",
                           run["run_id"])
        assert rows[0]["job"] == "reconciliation" and rows[0]["trigger"] == "api:alice"
        assert rows[0]["outcome"] == "ok" and rows[0]["finished_at"] is not None

        for body in (None, {}):
            listed = await _request(ep.nats_url, API_LIST, body, timeout=10)
            jobs = {j["name"]: j for j in listed["jobs"]}
            assert set(jobs) == set(JOB_CRONS)
            j = jobs["reconciliation"]
            assert set(j) == {"name", "schedule", "next_run_at", "last_run"}
            assert j["schedule"] == load_config(None).jobs.reconciliation_cron
            assert dt.datetime.fromisoformat(j["next_run_at"]) > dt.datetime.now(dt.UTC)
            lr = j["last_run"]
            assert set(lr) == {"id", "started_at", "ended_at", "outcome", "summary"}
            assert lr["id"] == run["run_id"] and lr["outcome"] == "ok" and lr["ended_at"] >= lr["started_at"]

        assert (await _request(ep.nats_url, API_RUN, {"job": "nope", "actor": "a", "reason": "r", "ticket": "t"})
                )["error"] == "UNKNOWN_JOB"
        bad = await _request(ep.nats_url, API_RUN, {"job": "invariants", "actor": "a", "reason": "r"})
        assert bad["error"] == "BAD_REQUEST" and "ticket" in bad["detail"]

    asyncio.run(go())


def test_one_run_per_job_whoever_starts_it(nats_srv: RunningServer, pg_dsn: str, tmp_path: Path) -> None:
    """While a run is going, jobs.run answers JOB_RUNNING at once, the scheduler's path does not start
    a second one, and jobs.list shows the run as running; the first caller gets its reply at the end."""

    async def go() -> None:
        release = asyncio.Event()
        started = asyncio.Event()

        async def slow(ctx: JobContext) -> JobResult:
            started.set()
            await release.wait()
            return JobResult("violation", {"recommended_action": "INVESTIGATE"})

        ctx = make_context(load_config(None), tmp_path, pg_dsn=pg_dsn, nats_url=nats_srv.url,
                           evidence_dir=tmp_path / "ev")
        closers = await open_context(ctx)
        svc = JobsService(ctx, {"slow": "0 0 1 1 *"}, checks={"slow": slow})
        svc.start_scheduler()
        await svc.start_api(ctx.nc)
        client = await nats.connect(nats_srv.url)
        try:
            req = json.dumps({"job": "slow", "actor": "bob", "reason": "r", "ticket": "t"}).encode()
            first = asyncio.create_task(client.request(API_RUN, req, timeout=30))
            await asyncio.wait_for(started.wait(), 10)
            second = json.loads((await client.request(API_RUN, req, timeout=5)).data)
            assert second["error"] == "JOB_RUNNING", second
            assert await svc.run("slow", "schedule") is None
            listed = json.loads((await client.request(API_LIST, b"", timeout=5)).data)
            assert listed["jobs"][0]["last_run"]["outcome"] == "running"
            assert listed["jobs"][0]["last_run"]["ended_at"] is None
            assert not first.done()
            release.set()
            reply = json.loads((await first).data)
            assert reply["outcome"] == "violation" and reply["summary"] == "violation recommended_action=INVESTIGATE"
            rows = await _rows(pg_dsn, "SELECT job, trigger, outcome FROM job_runs ORDER BY id")
            assert rows == [{"job": "slow", "trigger": "api:bob", "outcome": "violation"}]
            assert "slow" not in svc.running
        finally:
            await client.close()
            await svc.close()
            await close_context(closers)

    asyncio.run(go())


def test_cli_export_verify_on_the_stack(jobs_stack: tuple[Stack, Any]) -> None:
    """The stack's own exporter has exported EVT: nothing missing, and verify says it read back a
    settled export (no backlog, no re-export pending)."""
    import time

    st, _ = jobs_stack
    deadline = time.monotonic() + 60
    while True:
        res = st.cli("export", "verify")
        kv = dict(ln.split("=", 1) for ln in res.stdout.splitlines() if "=" in ln)
        if kv.get("export_exporter_settled") == "true" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["export_verify_ok"] == "true" and kv["export_missing"] == "0" and int(kv["export_evt_events"]) > 0
    assert kv["export_exporter_settled"] == "true"
    rep = json.loads((st.data_dir / "evidence" / "jobs" / "export-verify-latest.json").read_text())
    assert rep["exporter"]["backlog_messages"] == 0 and rep["exporter"]["rewind_pending"] is False
