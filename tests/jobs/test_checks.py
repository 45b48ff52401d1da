"""Scheduled checks: classification, budgets, and runs stored in PostgreSQL (real server)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import asyncpg

from jobs.checks import anomaly_findings, evaluate_budgets, lag_policy_target, lag_throttle_rate, sign_webhook
from jobs.scheduler import close_context, make_context, open_context, run_job
from spotex.config import load_config


def test_anomaly_thresholds_map_to_severity_and_action() -> None:
    th = {"reconciliation_lag": 10, "latch_breach": 1, "ws_drops": 100, "ws_slow_closes": 20, "ws_resume_gaps": 20}
    assert anomaly_findings({"ws_drops": 99}, th)["severity"] == "NONE"
    r = anomaly_findings({"ws_drops": 100, "reconciliation_lag": 10}, th)
    assert r["severity"] == "SEV2" and r["recommended_action"] == "CANCEL_ONLY" and len(r["findings"]) == 2
    r = anomaly_findings({"latch_breach": 1, "ws_resume_gaps": 50}, th)
    assert r["severity"] == "SEV1" and r["recommended_action"] == "WITHDRAW_HALT"


def test_lag_policy_levels_and_throttle_rate() -> None:
    """Seed §3.2: T2 throttles new orders (a per-symbol rate, not CANCEL_ONLY), T3 SOFT_HALT. The job
    acting on these levels over a real stack is in tests/edge/test_throttle.py and the lag-spike drill."""
    t2, t3 = 150, 600
    assert [lag_policy_target(n, t2, t3) for n in (0, 149, 150, 599, 600, 10**6)] == [
        "NORMAL", "NORMAL", "THROTTLE", "THROTTLE", "SOFT_HALT", "SOFT_HALT"]
    cfg = load_config(None)
    assert lag_throttle_rate(cfg) == cfg.jobs.lag_throttle_orders_per_s == 50
    assert lag_throttle_rate(None) == 50


def test_webhook_signature_covers_timestamp_and_body() -> None:
    a = sign_webhook("s", b"{}", 1000)
    assert a.startswith("sha256=") and a != sign_webhook("s", b"{}", 1001) and a != sign_webhook("s", b"{ }", 1000)


def test_budgets_missing_stale_breached_and_ok(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text(json.dumps({"v": {"n": 1}}))
    (tmp_path / "old.json").write_text(json.dumps({"v": {"n": 1}}))
    os.utime(tmp_path / "old.json", (time.time() - 1000, time.time() - 1000))
    budgets = [
        {"name": "good", "evidence": "good.json", "field": "v.n", "op": "<=", "limit": 1, "max_age_s": 60},
        {"name": "breach", "evidence": "good.json", "field": "v.n", "op": "<=", "limit": 0, "max_age_s": 60,
         "action": "CANCEL_ONLY"},
        {"name": "old", "evidence": "old.json", "field": "v.n", "op": "<=", "limit": 1, "max_age_s": 60},
        {"name": "none", "evidence": "none-*.json", "field": "v", "op": "==", "limit": 1, "max_age_s": 60},
    ]
    r = evaluate_budgets(budgets, [tmp_path], time.time())
    assert not r["budget_ok"] and r["violation_count"] == 3
    assert {v["name"]: v["reason"] for v in r["violations"]} == {
        "breach": "LIMIT_BREACHED", "old": "EVIDENCE_STALE", "none": "EVIDENCE_MISSING"}
    assert r["recommended_action"] == "CANCEL_ONLY"
    assert evaluate_budgets(budgets[:1], [tmp_path], time.time())["budget_ok"]


def test_runs_are_stored_and_missing_ledger_is_not_available(pg_dsn: str, tmp_path: Path) -> None:
    async def go() -> None:
        cfg = load_config(None)
        ctx = make_context(cfg, tmp_path, pg_dsn=pg_dsn, nats_url=None, evidence_dir=tmp_path / "ev",
                           inject={"ws_drops": 500})
        closers = await open_context(ctx)
        try:
            a = await run_job(ctx, "anomaly", trigger="manual")
            s = await run_job(ctx, "snapshot_verify", trigger="manual")
        finally:
            await close_context(closers)
        assert a["outcome"] == "violation" and a["output"]["recommended_action"] == "INVESTIGATE"
        assert list((tmp_path / "ev").glob("anomaly-detector-*.json"))
        assert s["outcome"] == "not_available"
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = await conn.fetch("SELECT job, trigger, outcome, finished_at, output FROM job_runs ORDER BY id")
        finally:
            await conn.close()
        assert [(r["job"], r["outcome"]) for r in rows] == [
            ("anomaly", "violation"), ("snapshot_verify", "not_available")]
        assert all(r["finished_at"] is not None and r["trigger"] == "manual" for r in rows)
        assert json.loads(rows[0]["output"])["severity"] == "SEV3"

    asyncio.run(go())
