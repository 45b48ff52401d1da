"""The book is append-only in the database itself, double entry is enforced there too, and the
migrations are safe to re-run."""

from __future__ import annotations

import asyncpg
import pytest

from ledger.migrate import migrate
from ledger.settlement import Book
from tests.ledger.test_settlement import engine_feed, pool, settle_all

__all__ = ["pool"]

TABLES = ("ledger_journal", "ledger_postings", "ledger_trades")


async def filled(p: asyncpg.Pool) -> None:
    _eng, ds = engine_feed(300, seed=41)
    await settle_all(Book(p), ds)
    async with p.acquire() as c:
        for t in TABLES:
            assert await c.fetchval(f"SELECT count(*) FROM {t}") > 0


@pytest.mark.parametrize("table", TABLES)
async def test_update_delete_truncate_are_refused(pool: asyncpg.Pool, table: str) -> None:
    await filled(pool)
    col = {"ledger_journal": "kind", "ledger_postings": "asset", "ledger_trades": "taker_side"}[table]
    async with pool.acquire() as c:
        n = await c.fetchval(f"SELECT count(*) FROM {table}")
        for sql in (f"UPDATE {table} SET {col} = {col}", f"DELETE FROM {table}", f"TRUNCATE {table}"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await c.execute(sql)
        assert await c.fetchval(f"SELECT count(*) FROM {table}") == n


async def test_unbalanced_postings_are_refused_by_the_database(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as c:
        with pytest.raises(asyncpg.CheckViolationError, match="unbalanced journal transaction 5"):
            await c.execute("INSERT INTO ledger_postings VALUES (5, 0, 1001, 'USDT', 'available', 10), "
                            "(5, 1, 0, 'USDT', 'available', -9)")
        # A balanced transaction in one statement is fine; its legs may not arrive one by one.
        await c.execute("INSERT INTO ledger_postings VALUES (6, 0, 1001, 'USDT', 'available', 10), "
                        "(6, 1, 0, 'USDT', 'available', -10)")
        with pytest.raises(asyncpg.CheckViolationError):
            await c.execute("INSERT INTO ledger_postings VALUES (7, 0, 1001, 'USDT', 'available', 10)")
        with pytest.raises(asyncpg.CheckViolationError):
            await c.execute("INSERT INTO ledger_postings VALUES (8, 0, 1001, 'USDT', 'cash', 0)")


async def test_a_source_posts_once(pool: asyncpg.Pool) -> None:
    await filled(pool)
    async with pool.acquire() as c:
        j = await c.fetchrow("SELECT * FROM ledger_journal LIMIT 1")
        with pytest.raises(asyncpg.UniqueViolationError, match="ledger_journal_source_key"):
            await c.execute("INSERT INTO ledger_journal (tx_id, stream, seq, kind, reference_type, reference_id, "
                            "occurred_at_ms, fencing_token, correlation_id, legs) "
                            "VALUES (99999999, $1, $2, 'X', 'x', 'x', 0, 1, 'x', 1)", j["stream"], j["seq"])
        t = await c.fetchrow("SELECT * FROM ledger_trades LIMIT 1")
        with pytest.raises(asyncpg.UniqueViolationError):
            await c.execute("INSERT INTO ledger_trades SELECT * FROM ledger_trades WHERE symbol = $1 AND trade_id = $2",
                            t["symbol"], t["trade_id"])


async def test_migrations_are_safe_to_rerun(pool: asyncpg.Pool, pg_dsn: str) -> None:
    await filled(pool)
    assert await migrate(pg_dsn) == []
    async with pool.acquire() as c:
        # Re-applying the ledger migration's SQL by hand (as a restore script might) changes nothing.
        from ledger.migrate import MIGRATIONS_DIR

        before = await c.fetchval("SELECT count(*) FROM ledger_postings")
        await c.execute((MIGRATIONS_DIR / "0003_ledger.sql").read_text())
        assert await c.fetchval("SELECT count(*) FROM ledger_postings") == before
        assert await c.fetchval("SELECT next_tx_id FROM ledger_writer") > 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await c.execute("DELETE FROM ledger_postings")
