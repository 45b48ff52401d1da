"""``spotex ledger ...`` as an operator runs it (a child process, the stack's endpoints from config)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from ledger.reconcile import engage_latch
from ledger.settlement import Book
from spotex.testing import spotex_cli
from tests.ledger.test_settlement import Bus, engine_feed, pool, settle_all

__all__ = ["pool"]


def cli(env: dict[str, str], *args: str) -> Any:
    return spotex_cli("ledger", *args, env=env, timeout=60)


def envs(pg_dsn: str, nats_url: str) -> dict[str, str]:
    return {"SPOTEX_POSTGRES__DSN": pg_dsn, "SPOTEX_NATS__URL": nats_url}


async def test_rebuild_balances_invariants_and_status(pool: asyncpg.Pool, pg_dsn: str, nats_srv: Any) -> None:
    _eng, ds = engine_feed(300, seed=71)
    await settle_all(Book(pool), ds)
    env = envs(pg_dsn, nats_srv.url)
    res = await asyncio.to_thread(cli, env, "rebuild-balances")
    assert res.returncode == 0 and "differences=0 written=false" in res.stdout
    async with pool.acquire() as c:
        await c.execute("UPDATE ledger_accounts SET balance = balance + 5 WHERE account_id = 1002 AND asset = 'BTC' "
                        "AND bucket = 'available'")
    res = await asyncio.to_thread(cli, env, "invariants", "--full")
    assert res.returncode == 1 and "materialized_balances=1" in res.stdout
    res = await asyncio.to_thread(cli, env, "rebuild-balances", "--dry-run")
    assert res.returncode == 1 and "difference account=1002 asset=BTC bucket=available" in res.stdout
    assert "written=false" in res.stdout
    res = await asyncio.to_thread(cli, env, "rebuild-balances")
    assert res.returncode == 1 and "not rebuilt" in res.stderr  # writing needs a reason and a ticket
    res = await asyncio.to_thread(cli, env, "rebuild-balances", "--reason", "drift found by invariants",
                                  "--ticket", "INC-12", "--actor", "alice")
    assert res.returncode == 1 and "differences=1 written=true" in res.stdout
    res = await asyncio.to_thread(cli, env, "rebuild-balances")
    assert res.returncode == 0 and "differences=0" in res.stdout
    res = await asyncio.to_thread(cli, env, "invariants", "--full")
    assert res.returncode == 0 and res.stdout.startswith("ok=true")
    async with Bus(nats_srv.url) as bus:
        await bus.publish(ds)
        res = await asyncio.to_thread(cli, env, "status", "--json")
    st = json.loads(res.stdout)
    assert res.returncode == 0 and st["engine_reachable"] and st["streams"]["BTC-USDT"]["lag"] == 0
    assert st["counts"]["trades"] > 0
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) FROM audit_chain WHERE action = 'LedgerRebuildBalances' "
                                "AND actor = 'alice'") == 1


async def test_latch_release_and_corrections_from_the_terminal(pool: asyncpg.Pool, pg_dsn: str,
                                                               nats_srv: Any) -> None:
    _eng, ds = engine_feed(200, seed=73)
    await settle_all(Book(pool), ds)
    env = envs(pg_dsn, nats_srv.url)
    async with Bus(nats_srv.url) as bus:
        await bus.publish(ds)
        await engage_latch(pool, None, "ETH-USDT", "CANCEL_ONLY", "test", "drill", "INC-13")
        res = await asyncio.to_thread(cli, {**env, "SPOTEX_LEDGER__LATCH_REQUIRES_SECOND_APPROVER": "true"},
                                      "latch", "release", "ETH-USDT", "--reason", "ok", "--ticket", "INC-13",
                                      "--approver", "alice")
        assert res.returncode == 1 and json.loads(res.stdout)["code"] == "SECOND_APPROVER_REQUIRED"
        res = await asyncio.to_thread(cli, {**env, "SPOTEX_LEDGER__LATCH_REQUIRES_SECOND_APPROVER": "true"},
                                      "latch", "release", "ETH-USDT", "--reason", "ok", "--ticket", "INC-13",
                                      "--approver", "alice", "--approver", "bob")
        assert res.returncode == 0, res.stdout + res.stderr
        assert json.loads(res.stdout)["code"] == "RELEASED"
    res = await asyncio.to_thread(cli, env, "correction", "request", "--requested-by", "carol", "--reason", "fix",
                                  "--ticket", "INC-14", "--posting", "1001:USDT:available:10",
                                  "--posting", "1:USDT:available:-10")
    rid = json.loads(res.stdout)["id"]
    for who in ("alice", "bob"):
        res = await asyncio.to_thread(cli, env, "correction", "approve", str(rid), "--approver", who)
    out = json.loads(res.stdout)
    assert out["status"] == "applied" and out["approvers"] == ["alice", "bob"]
    res = await asyncio.to_thread(cli, env, "correction", "approve", str(rid), "--approver", "dave")
    assert res.returncode == 1 and json.loads(res.stdout)["code"] == "NOT_PENDING"
