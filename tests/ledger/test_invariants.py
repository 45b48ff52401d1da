"""Each invariant catches a bad book: postings injected past the database's own guards (as someone
with superuser rights could), a tampered materialized balance, a core checkpoint that disagrees.
A violation counts, writes an alert row and triggers the seed §3.1 response, audited first."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import msgspec

from core.wire import AssetTotal, EngineCheckpoint, SymbolMode, decode_request
from ledger.invariants import run_invariants
from ledger.reconcile import CoreAdmin, Responder
from ledger.settlement import Book, Delivery
from tests.ledger.test_settlement import Bus, engine_feed, metric, pool, settle_all

__all__ = ["pool"]


async def book_with_trades(p: asyncpg.Pool) -> Any:
    eng, ds = engine_feed(400, seed=31)
    await settle_all(Book(p), ds)
    assert (await run_invariants(p, full=True)).ok
    return eng


async def bypass(p: asyncpg.Pool, sql: str, *args: Any) -> None:
    """Run SQL with triggers off (session_replication_role = replica): what an attacker or a broken
    tool with superuser rights could do, and what only the invariant checker can then catch."""
    async with p.acquire() as c, c.transaction():
        await c.execute("SET LOCAL session_replication_role = replica")
        await c.execute(sql, *args)


async def test_unbalanced_transaction_is_caught(pool: asyncpg.Pool) -> None:
    await book_with_trades(pool)
    before = metric("invariant_violation_total", {"check": "transaction_balanced"})
    await bypass(pool, "INSERT INTO ledger_journal (tx_id, stream, seq, kind, reference_type, reference_id, "
                       "occurred_at_ms, fencing_token, correlation_id, legs) "
                       "VALUES (10000000, 'BTC-USDT', 999999, 'TradeExecuted', 'trade', 'x', 0, 1, 'x', 2)")
    await bypass(pool, "INSERT INTO ledger_postings VALUES (10000000, 0, 1001, 'USDT', 'available', 5), "
                       "(10000000, 1, 1002, 'USDT', 'available', -4)")
    rep = await run_invariants(pool, full=True)
    assert not rep.ok and not rep.checks["transaction_balanced"]["ok"]
    assert rep.checks["transaction_balanced"]["samples"][0]["tx_id"] == 10000000
    assert metric("invariant_violation_total", {"check": "transaction_balanced"}) == before + 1
    async with pool.acquire() as c:
        alert = await c.fetchrow("SELECT * FROM ledger_alerts WHERE check_name = 'transaction_balanced'")
    assert alert["category"] == "invariant" and alert["key"] == "tx:10000000:USDT"
    assert alert["response_state"] == "pending"


async def test_orphan_postings_and_missing_legs_are_caught(pool: asyncpg.Pool) -> None:
    await book_with_trades(pool)
    await bypass(pool, "INSERT INTO ledger_postings VALUES (20000000, 0, 1001, 'BTC', 'available', 1), "
                       "(20000000, 1, 1002, 'BTC', 'available', -1)")
    async with pool.acquire() as c:
        tx = await c.fetchval("SELECT max(tx_id) FROM ledger_journal WHERE legs > 2")
    await bypass(pool, "DELETE FROM ledger_postings WHERE tx_id = $1 AND leg = 0", tx)
    rep = await run_invariants(pool, full=True)
    keys = {s["key"] for s in rep.checks["transaction_balanced"]["samples"]}
    assert "tx:20000000:orphan" in keys and f"tx:{tx}:legs" in keys
    # The deleted leg also leaves its materialized balance without a posting behind it.
    assert not rep.checks["materialized_balances"]["ok"]


async def test_negative_balance_and_custody_total_are_caught(pool: asyncpg.Pool) -> None:
    await book_with_trades(pool)
    async with pool.acquire() as c:
        await c.execute("UPDATE ledger_accounts SET balance = -7 WHERE account_id = 1003 AND asset = 'ETH' "
                        "AND bucket = 'hold'")
    rep = await run_invariants(pool, full=True)
    assert rep.checks["non_negative"]["samples"][0]["key"] == "1003:ETH:hold"
    assert [s["asset"] for s in rep.checks["custody_total"]["samples"]] == ["ETH"]
    assert [s["key"] for s in rep.checks["materialized_balances"]["samples"]] == ["1003:ETH:hold"]
    # Custody itself may be (and is) negative: it is the outside world.
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT min(balance) FROM ledger_accounts WHERE account_id = 0") < 0


async def test_alerts_close_when_the_condition_clears_and_reopen_on_recurrence(pool: asyncpg.Pool) -> None:
    await book_with_trades(pool)
    async with pool.acquire() as c:
        good = await c.fetchval("SELECT balance FROM ledger_accounts WHERE account_id = 1003 AND asset = 'ETH' "
                                "AND bucket = 'available'")
        await c.execute("UPDATE ledger_accounts SET balance = -1 WHERE account_id = 1003 AND asset = 'ETH' "
                        "AND bucket = 'available'")
    assert not (await run_invariants(pool)).ok
    assert not (await run_invariants(pool)).ok  # the same violation: one open alert, two occurrences
    async with pool.acquire() as c:
        row = await c.fetchrow("SELECT * FROM ledger_alerts WHERE check_name = 'non_negative'")
        assert row["occurrences"] == 2 and row["resolved_at"] is None
        await c.execute("UPDATE ledger_accounts SET balance = $1 WHERE account_id = 1003 AND asset = 'ETH' "
                        "AND bucket = 'available'", good)
    assert (await run_invariants(pool, full=True)).ok
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT resolved_at IS NOT NULL FROM ledger_alerts WHERE id = $1", row["id"])


async def test_checkpoint_disagreeing_with_the_core_is_caught(pool: asyncpg.Pool) -> None:
    eng = await book_with_trades(pool)
    async with pool.acquire() as c:
        seqs = {r["stream"]: r["last_seq"] for r in await c.fetch(
            "SELECT stream, last_seq FROM ledger_consumer_checkpoint")}
    totals = [AssetTotal(t.asset, t.available + (1 if t.asset == "ETH" else 0), t.hold, t.custody)
              for t in eng.totals()]
    seq = seqs["_sys"] + 1
    wm = dict(seqs)
    wm["_sys"] = seq - 1
    ck = EngineCheckpoint(f"_sys:{seq}", "_sys", seq, 0, "c", "cmd", 1, eng.last_seq, "h", wm, totals)
    before = metric("invariant_violation_total", {"check": "engine_checkpoint"})
    out = await Book(pool).settle([Delivery("_sys", 0, [ck])])
    assert [c["status"] for c in out.checkpoints] == ["mismatch"]
    assert out.checkpoints[0]["diffs"] == [{"asset": "ETH", "field": "available",
                                            "core": str(totals[1].available), "ledger": str(totals[1].available - 1)}]
    assert out.new_alert_ids
    assert metric("invariant_violation_total", {"check": "engine_checkpoint"}) == before + 1
    rep = await run_invariants(pool)
    assert rep.checks["engine_checkpoint"]["samples"][0]["assets"] == ["ETH"]


async def test_violation_triggers_withdrawals_halt_and_cancel_only_audited_first(pool: asyncpg.Pool,
                                                                                nats_srv: Any) -> None:
    await book_with_trades(pool)
    async with pool.acquire() as c:
        await c.execute("UPDATE ledger_accounts SET balance = -1 WHERE account_id = 1002 AND asset = 'BTC' "
                        "AND bucket = 'available'")
    rep = await run_invariants(pool)
    assert not rep.ok
    async with Bus(nats_srv.url) as bus:
        sent: list[tuple[Any, float]] = []

        async def on_msg(msg: Any) -> None:
            sent.append((decode_request(msg.data), asyncio.get_running_loop().time()))

        sub = await bus.nc.subscribe("cmd.>", cb=on_msg)
        done = await Responder(pool, CoreAdmin(pool, bus.js)).run_pending()
        assert done >= 1
        for _ in range(50):
            if len(sent) >= 2:
                break
            await asyncio.sleep(0.05)
        await sub.unsubscribe()
        stored = (await bus.js.stream_info("CMD")).state.messages
    kinds = sorted(type(c).__name__ + ":" + str(getattr(c, "symbol", "")) for c, _ in sent)
    # BTC is traded only on BTC-USDT: withdrawals halt, BTC-USDT cancel-only (and latched).
    assert kinds == ["SetSymbolMode:BTC-USDT", "WithdrawalsHalt:"]
    assert stored == 2
    mode = next(c for c, _ in sent if type(c).__name__ == "SetSymbolMode")
    assert mode.mode is SymbolMode.CANCEL_ONLY and mode.ticket.startswith("LEDGER-ALERT-")
    async with pool.acquire() as c:
        audit = await c.fetch("SELECT actor, action, body FROM audit_chain ORDER BY seq")
        latch = await c.fetchrow("SELECT * FROM ledger_latches WHERE symbol = 'BTC-USDT'")
        resp = await c.fetchrow("SELECT response_state, response FROM ledger_alerts WHERE check_name = 'non_negative'")
        states = [r["response_state"] for r in await c.fetch("SELECT response_state FROM ledger_alerts")]
    actions = [(a["actor"], a["action"]) for a in audit]
    assert ("ledger", "WithdrawalsHalt") in actions and ("ledger", "SetSymbolMode") in actions
    assert ("ledger", "LatchEngage") in actions
    assert actions.index(("ledger", "LatchEngage")) < actions.index(("ledger", "SetSymbolMode"))
    assert json.loads(audit[0]["body"])["params"]["on"] is True
    assert latch["engaged"] and latch["mode"] == "CANCEL_ONLY" and latch["cause"] == "invariant:non_negative"
    assert resp["response_state"] == "done" and set(states) == {"done"}  # non_negative and custody_total
    assert msgspec.json.decode(resp["response"])["actions"] == ["WithdrawalsHalt(on)", "BTC-USDT:CANCEL_ONLY"]
    # Responded once: a second pass finds nothing pending.
    async with Bus(nats_srv.url) as bus:
        assert await Responder(pool, CoreAdmin(pool, bus.js)).run_pending() == 0
