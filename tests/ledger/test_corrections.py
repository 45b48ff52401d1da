"""Corrections: requested with balanced postings, approved by two distinct operators (not the
requester), applied once as a new journal transaction; every step audited."""

from __future__ import annotations

import asyncpg
import pytest

from ledger.corrections import (
    CorrectionError,
    approve_correction,
    get_correction,
    list_corrections,
    reject_correction,
    request_correction,
)
from ledger.invariants import run_invariants
from ledger.settlement import Book
from tests.ledger.test_settlement import engine_feed, ledger_balances, pool, settle_all

__all__ = ["pool"]

FIX = [{"account_id": 1001, "asset": "USDT", "bucket": "available", "delta": 250},
       {"account_id": 1, "asset": "USDT", "bucket": "available", "delta": -250}]


async def booked(p: asyncpg.Pool) -> None:
    _eng, ds = engine_feed(300, seed=61)
    await settle_all(Book(p), ds)


async def expect(code: str, coro: object) -> CorrectionError:
    with pytest.raises(CorrectionError) as ei:
        await coro  # type: ignore[misc]
    assert ei.value.code == code, ei.value
    return ei.value


async def test_two_distinct_approvers_then_applied_once(pool: asyncpg.Pool) -> None:
    await booked(pool)
    before = await ledger_balances(pool)
    req = await request_correction(pool, "carol", FIX, "refund fee charged twice (INC-9)", "INC-9")
    assert req.status == "pending"
    await expect("SELF_APPROVAL", approve_correction(pool, req.id, "carol"))
    st = await approve_correction(pool, req.id, "alice")
    assert st.status == "pending" and st.approvers == ["alice"]
    await expect("DUPLICATE_APPROVAL", approve_correction(pool, req.id, "alice"))
    assert await ledger_balances(pool) == before  # nothing moves before the second approval
    st = await approve_correction(pool, req.id, "bob")
    assert st.status == "applied" and st.approvers == ["alice", "bob"] and st.tx_id
    after = await ledger_balances(pool)
    assert after[(1001, "USDT", "available")] == before[(1001, "USDT", "available")] + 250
    assert after[(1, "USDT", "available")] == before[(1, "USDT", "available")] - 250
    await expect("NOT_PENDING", approve_correction(pool, req.id, "dave"))
    async with pool.acquire() as c:
        j = await c.fetchrow("SELECT * FROM ledger_entries WHERE entry_id = $1", st.tx_id)
        legs = await c.fetch("SELECT * FROM ledger_postings WHERE tx_id = $1 ORDER BY leg", st.tx_id)
        actions = [(r["actor"], r["action"]) for r in await c.fetch("SELECT actor, action FROM audit_chain "
                                                                    "ORDER BY seq")]
    assert (j["entry_kind"], j["reference_type"], j["reference_id"], j["symbol"]) == ("correction", "correction",
                                                                                      str(req.id), None)
    assert [(r["account_id"], r["delta"]) for r in legs] == [(1001, 250), (1, -250)]
    assert actions == [("carol", "CorrectionRequest"), ("alice", "CorrectionApprove"), ("bob", "CorrectionApprove"),
                       ("bob", "CorrectionApply")]
    rep = await run_invariants(pool, full=True)
    assert rep.ok, rep.checks


async def test_refusals(pool: asyncpg.Pool) -> None:
    await booked(pool)
    await expect("UNBALANCED", request_correction(pool, "carol", [FIX[0]], "r", "t"))
    await expect("VALIDATION", request_correction(pool, "carol", [{"account_id": 1001}], "r", "t"))
    await expect("VALIDATION", request_correction(pool, "", FIX, "r", "t"))
    await expect("AUDIT_REASON_REQUIRED", request_correction(pool, "carol", FIX, "", "t"))
    await expect("AUDIT_TICKET_REQUIRED", request_correction(pool, "carol", FIX, "r", " "))
    await expect("NOT_FOUND", approve_correction(pool, 424242, "alice"))
    # A correction may not leave a customer balance negative; the whole approval rolls back.
    huge = [{"account_id": 1001, "asset": "USDT", "bucket": "available", "delta": -10**20},
            {"account_id": 0, "asset": "USDT", "bucket": "available", "delta": 10**20}]
    await expect("VALIDATION", request_correction(pool, "carol", huge, "r", "t"))
    drain = [{"account_id": 1001, "asset": "USDT", "bucket": "available", "delta": -10**18},
             {"account_id": 0, "asset": "USDT", "bucket": "available", "delta": 10**18}]
    req = await request_correction(pool, "carol", drain, "bad idea", "INC-10")
    await approve_correction(pool, req.id, "alice")
    await expect("NEGATIVE_BALANCE", approve_correction(pool, req.id, "bob"))
    st = await get_correction(pool, req.id)
    assert st.status == "pending" and st.approvers == ["alice"]
    rej = await reject_correction(pool, req.id, "bob", "would overdraw", "INC-10")
    assert rej.status == "rejected"
    assert [c.id for c in await list_corrections(pool, "rejected")] == [req.id]
    assert (await run_invariants(pool, full=True)).ok
