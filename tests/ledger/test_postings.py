"""Each posting rule, driven by the real engine: the ledger posts exactly the event's moves as one
balanced journal transaction, labelled for people, and the balances follow the core's."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from core.wire import (
    FEE_ACCOUNT,
    AmendOrder,
    Bucket,
    CancelOrder,
    Deposit,
    Deposited,
    Move,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderType,
    PlaceOrder,
    Side,
    TradeExecuted,
    Withdraw,
    Withdrawn,
)
from ledger.postings import entry_kind, net_moves, reference, validate_moves
from ledger.settlement import Book
from tests.ledger.test_settlement import assert_matches_engine, pool, run_engine, settle_all

__all__ = ["pool"]

BTC = "BTC-USDT"


async def posted(p: asyncpg.Pool, stream: str, seq: int) -> tuple[Any, list[Move]]:
    async with p.acquire() as c:
        j = await c.fetchrow("SELECT * FROM ledger_journal WHERE stream = $1 AND seq = $2", stream, seq)
        rows = await c.fetch("SELECT * FROM ledger_postings WHERE tx_id = $1 ORDER BY leg", j["tx_id"])
        entry = await c.fetchrow("SELECT * FROM ledger_entries WHERE symbol = $1 AND engine_seq = $2", stream, seq)
    return (j, entry), [Move(r["account_id"], r["asset"], Bucket(r["bucket"]), r["delta"]) for r in rows]


def first(ds: list[Any], cls: type) -> Any:
    for d in ds:
        for e in d.events:
            if isinstance(e, cls):
                return e
    raise AssertionError(f"no {cls.__name__}")


FUND = [Deposit(account_id=1001, asset="USDT", amount=10**13, reference="chain-tx-1"),
        Deposit(account_id=1002, asset="BTC", amount=10**10)]


async def test_deposit_moves_custody_to_available(pool: asyncpg.Pool) -> None:
    eng, ds = run_engine(FUND)
    await settle_all(Book(pool), ds)
    dep = first(ds, Deposited)
    (j, entry), moves = await posted(pool, "_sys", dep.seq)
    assert moves == dep.moves == [Move(0, "USDT", Bucket.AVAILABLE, -10**13), Move(1001, "USDT", Bucket.AVAILABLE,
                                                                                     10**13)]
    assert (j["kind"], j["reference_type"], j["reference_id"], j["legs"]) == ("Deposited", "deposit", "chain-tx-1", 2)
    assert entry["entry_kind"] == "deposit" and entry["symbol"] == "_sys"
    await assert_matches_engine(pool, eng)


async def test_order_accepted_reserves_and_cancel_releases(pool: asyncpg.Pool) -> None:
    eng, ds = run_engine([*FUND, PlaceOrder(account_id=1001, symbol=BTC, client_order_id="o1", side=Side.BUY,
                                            price_ticks=6_400_000, qty_lots=1000),
                          CancelOrder(account_id=1001, symbol=BTC, client_order_id="o1")])
    await settle_all(Book(pool), ds)
    acc = first(ds, OrderAccepted)
    (_j, entry), moves = await posted(pool, BTC, acc.seq)
    assert moves == acc.moves
    assert {(m.bucket, m.delta > 0) for m in moves} == {(Bucket.AVAILABLE, False), (Bucket.HOLD, True)}
    assert (entry["entry_kind"], entry["reference_type"], entry["reference_id"]) == ("reserve", "order",
                                                                                     str(acc.order_id))
    can = first(ds, OrderCanceled)
    (_j, entry), moves = await posted(pool, BTC, can.seq)
    assert moves == can.moves and entry["entry_kind"] == "release"
    assert sum(m.delta for m in moves if m.bucket is Bucket.HOLD) == -sum(m.delta for m in acc.moves
                                                                           if m.bucket is Bucket.HOLD)
    await assert_matches_engine(pool, eng)


async def test_amend_adjusts_the_hold(pool: asyncpg.Pool) -> None:
    eng, ds = run_engine([*FUND, PlaceOrder(account_id=1001, symbol=BTC, client_order_id="o1", side=Side.BUY,
                                            price_ticks=6_400_000, qty_lots=1000)])
    oid = first(ds, OrderAccepted).order_id
    _, more = run_engine([AmendOrder(account_id=1001, symbol=BTC, order_id=oid, new_qty_lots=400)], engine=eng)
    ds += more
    await settle_all(Book(pool), ds)
    am = first(ds, OrderAmended)
    (_j, entry), moves = await posted(pool, BTC, am.seq)
    assert moves == am.moves and entry["entry_kind"] == "reserve_adjust"
    await assert_matches_engine(pool, eng)


async def test_trade_settles_from_holds_with_fees_to_the_fee_account(pool: asyncpg.Pool) -> None:
    eng, ds = run_engine([*FUND,
                          PlaceOrder(account_id=1002, symbol=BTC, client_order_id="ask", side=Side.SELL,
                                     price_ticks=6_500_000, qty_lots=500),
                          PlaceOrder(account_id=1001, symbol=BTC, client_order_id="bid", side=Side.BUY,
                                     price_ticks=6_500_000, qty_lots=300)])
    await settle_all(Book(pool), ds)
    t = first(ds, TradeExecuted)
    (_j, entry), moves = await posted(pool, BTC, t.seq)
    assert moves == t.moves
    assert (entry["entry_kind"], entry["reference_type"], entry["reference_id"]) == ("settlement", "trade",
                                                                                     str(t.trade_id))
    fee = {m.asset: m.delta for m in moves if m.account_id == FEE_ACCOUNT}
    assert fee == {t.taker_fee_asset: t.taker_fee, t.maker_fee_asset: t.maker_fee}
    assert t.taker_fee > 0 and t.maker_fee > 0  # BTC-USDT has 20/10 bps fees in the sim markets
    # The buyer's quote leaves its hold; the seller's base leaves its hold.
    assert Move(1001, "USDT", Bucket.HOLD, -t.quote_amount) in moves
    assert Move(1002, "BTC", Bucket.HOLD, -t.base_amount) in moves
    async with pool.acquire() as c:
        row = await c.fetchrow("SELECT * FROM ledger_trades WHERE symbol = $1 AND trade_id = $2", BTC, t.trade_id)
    assert (row["seq"], row["taker_account_id"], row["maker_account_id"], row["qty_lots"], row["quote_amount"]) == (
        t.seq, 1001, 1002, 300, t.quote_amount)
    await assert_matches_engine(pool, eng)


async def test_market_buy_by_quote_refunds_the_unused_hold(pool: asyncpg.Pool) -> None:
    eng, ds = run_engine([*FUND,
                          PlaceOrder(account_id=1002, symbol=BTC, client_order_id="ask", side=Side.SELL,
                                     price_ticks=6_500_000, qty_lots=100),
                          PlaceOrder(account_id=1001, symbol=BTC, client_order_id="", side=Side.BUY,
                                     type=OrderType.MARKET, quote_amount=10**11)])
    await settle_all(Book(pool), ds)
    t = first(ds, TradeExecuted)
    _, moves = await posted(pool, BTC, t.seq)
    assert moves == t.moves
    await assert_matches_engine(pool, eng)
    async with pool.acquire() as c:
        hold = await c.fetchval("SELECT balance FROM ledger_accounts WHERE account_id = 1001 AND asset = 'USDT' "
                                "AND bucket = 'hold'")
    assert (hold or 0) == 0


async def test_withdrawal_moves_available_to_custody(pool: asyncpg.Pool) -> None:
    eng, ds = run_engine([*FUND, Withdraw(account_id=1001, asset="USDT", amount=12_345, reference="wd-1")])
    await settle_all(Book(pool), ds)
    w = first(ds, Withdrawn)
    (_j, entry), moves = await posted(pool, "_sys", w.seq)
    assert moves == [Move(1001, "USDT", Bucket.AVAILABLE, -12_345), Move(0, "USDT", Bucket.AVAILABLE, 12_345)]
    assert (entry["entry_kind"], entry["reference_id"]) == ("withdrawal", "wd-1")
    await assert_matches_engine(pool, eng)


def test_validate_moves() -> None:
    ok = [Move(0, "USDT", Bucket.AVAILABLE, -5), Move(7, "USDT", Bucket.AVAILABLE, 5)]
    assert validate_moves(ok) == []
    assert "USDT legs sum to 1, not 0" in validate_moves([*ok, Move(7, "USDT", Bucket.HOLD, 1)])
    assert validate_moves([]) == ["no moves"]
    assert any("custody" in p for p in validate_moves([Move(0, "BTC", Bucket.HOLD, -1),
                                                        Move(3, "BTC", Bucket.AVAILABLE, 1)]))
    assert net_moves(ok + ok) == {(0, "USDT", "available"): -10, (7, "USDT", "available"): 10}


def test_reference_and_entry_kind() -> None:
    _eng, ds = run_engine(FUND)
    dep = first(ds, Deposited)
    assert reference(dep) == ("deposit", "chain-tx-1")
    assert entry_kind("TradeExecuted") == "settlement" and entry_kind("OrderAccepted") == "reserve"


@pytest.mark.parametrize("n", [400])
async def test_seed_5_1_query_shape(pool: asyncpg.Pool, n: int) -> None:
    from core.sim import generate

    _eng, ds = run_engine(generate(21, n))
    await settle_all(Book(pool), ds)
    async with pool.acquire() as c:
        rows = await c.fetch("SELECT reference_type, reference_id, entry_kind, symbol, engine_seq FROM ledger_entries "
                             "ORDER BY created_at DESC LIMIT 20")
        trades = await c.fetchval("SELECT count(*) FROM ledger_entries WHERE entry_kind = 'settlement'")
    assert len(rows) == 20 and trades == sum(1 for d in ds for e in d.events if isinstance(e, TradeExecuted))
