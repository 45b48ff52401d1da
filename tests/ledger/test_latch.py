"""Reconciliation against EVT and the safety latch: engage on a T2 breach (CANCEL_ONLY), escalate
above T3 (SOFT_HALT), never release by itself; release only with approval(s), reason and ticket,
lag 0 and passing invariants, then NORMAL through the core's admin command, all audited."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from core.wire import SetSymbolMode, SymbolMode, WithdrawalsHalt, decode_request
from ledger.reconcile import (
    CoreAdmin,
    Reconciler,
    ReconcilerOptions,
    engine_seqs,
    release_latch,
    second_approver_required,
)
from ledger.settlement import Book
from spotex.config import load_config
from tests.ledger.test_settlement import Bus, engine_feed, last_seqs, pool, settle_all

__all__ = ["pool"]

OPTS = ReconcilerOptions(warn_seq=2, throttle_seq=10, halt_seq=60, breach_s=0.0)


class Cmds:
    """Commands published to CMD, in order."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.got: list[Any] = []
        self.sub: Any = None

    async def __aenter__(self) -> Cmds:
        async def on(msg: Any) -> None:
            self.got.append(decode_request(msg.data))

        self.sub = await self.bus.nc.subscribe("cmd.>", cb=on)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    async def settle(self, n: int) -> list[Any]:
        for _ in range(100):
            if len(self.got) >= n:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        return self.got


async def lagging_book(p: asyncpg.Pool, bus: Bus, settled_fraction: float) -> tuple[Any, list[Any]]:
    eng, ds = engine_feed(500, seed=51)
    await bus.publish(ds)
    await settle_all(Book(p), ds[: int(len(ds) * settled_fraction)])
    return eng, ds


async def test_lag_engages_escalates_and_never_releases_itself(pool: asyncpg.Pool, nats_srv: Any) -> None:
    async with Bus(nats_srv.url) as bus, Cmds(bus) as cmds:
        _eng, ds = await lagging_book(pool, bus, 0.95)
        rec = Reconciler(pool, bus.js, CoreAdmin(pool, bus.js), OPTS)
        report = await rec.tick()
        eng_seqs = await engine_seqs(bus.js)
        assert eng_seqs == last_seqs(ds)
        lagging = {s: r for s, r in report.items() if r["lag"] >= OPTS.throttle_seq}
        assert lagging, report
        sym, r = next(iter(sorted(lagging.items())))
        assert r["level"] in ("throttle", "halt")
        async with pool.acquire() as c:
            latch = await c.fetchrow("SELECT * FROM ledger_latches WHERE symbol = $1", sym)
            hist = await c.fetch("SELECT level FROM ledger_reconciliation_history WHERE stream = $1", sym)
        assert latch["engaged"] and latch["cause"].startswith("lag:")
        assert [h["level"] for h in hist] == [r["level"]]
        sent = await cmds.settle(1)
        mine = [c for c in sent if isinstance(c, SetSymbolMode) and c.symbol == sym]
        want = SymbolMode.SOFT_HALT if r["level"] == "halt" else SymbolMode.CANCEL_ONLY
        assert mine and mine[-1].mode is want and mine[-1].ticket.startswith(f"LEDGER-LAG-{sym}")
        # Catch up fully: the lag is gone, the latch stays.
        await settle_all(Book(pool), ds)
        report = await rec.tick()
        assert all(v["lag"] == 0 for v in report.values())
        async with pool.acquire() as c:
            assert await c.fetchval("SELECT engaged FROM ledger_latches WHERE symbol = $1", sym)
            actions = [a["action"] for a in await c.fetch("SELECT action FROM audit_chain WHERE actor = 'ledger'")]
        assert "LatchEngage" in actions and "SetSymbolMode" in actions


async def test_t3_escalates_to_soft_halt_and_sys_latches_withdrawals(pool: asyncpg.Pool, nats_srv: Any) -> None:
    async with Bus(nats_srv.url) as bus, Cmds(bus) as cmds:
        _eng, _ds = await lagging_book(pool, bus, 0.0)  # nothing settled: every stream is far behind
        rec = Reconciler(pool, bus.js, CoreAdmin(pool, bus.js), OPTS)
        report = await rec.tick()
        assert report["BTC-USDT"]["level"] == "halt" and report["_sys"]["lag"] >= OPTS.throttle_seq
        sent = await cmds.settle(3)
        async with pool.acquire() as c:
            latches = {r["symbol"]: r["mode"] for r in await c.fetch("SELECT * FROM ledger_latches WHERE engaged")}
        assert latches["BTC-USDT"] == "SOFT_HALT" and "_sys" in latches
        assert any(isinstance(c, WithdrawalsHalt) and c.on for c in sent)
        assert any(isinstance(c, SetSymbolMode) and c.symbol == "BTC-USDT" and c.mode is SymbolMode.SOFT_HALT
                   for c in sent)


async def test_breach_must_last_before_the_latch_engages(pool: asyncpg.Pool, nats_srv: Any) -> None:
    async with Bus(nats_srv.url) as bus:
        await lagging_book(pool, bus, 0.0)
        rec = Reconciler(pool, bus.js, None, ReconcilerOptions(warn_seq=2, throttle_seq=10, halt_seq=60,
                                                               breach_s=5.0))
        await rec.tick(now=100.0)
        async with pool.acquire() as c:
            assert await c.fetchval("SELECT count(*) FROM ledger_latches") == 0
        await rec.tick(now=106.0)
        async with pool.acquire() as c:
            assert await c.fetchval("SELECT count(*) FROM ledger_latches WHERE engaged") >= 1


async def engaged_and_caught_up(p: asyncpg.Pool, bus: Bus) -> str:
    _eng, ds = await lagging_book(p, bus, 0.95)
    await Reconciler(p, bus.js, CoreAdmin(p, bus.js), OPTS).tick()
    async with p.acquire() as c:
        sym = await c.fetchval("SELECT symbol FROM ledger_latches WHERE engaged AND symbol <> '_sys' LIMIT 1")
    assert sym is not None
    await settle_all(Book(p), ds)
    return str(sym)


async def test_release_rules(pool: asyncpg.Pool, nats_srv: Any) -> None:
    async with Bus(nats_srv.url) as bus:
        _eng, ds = await lagging_book(pool, bus, 0.95)
        await Reconciler(pool, bus.js, CoreAdmin(pool, bus.js), OPTS).tick()
        async with pool.acquire() as c:
            sym = await c.fetchval("SELECT symbol FROM ledger_latches WHERE engaged AND symbol <> '_sys' LIMIT 1")

        async def rel(approvers: list[str], reason: str = "reconciled, lag 0", ticket: str = "INC-7",
                      second: bool = False) -> Any:
            return await release_latch(pool, sym, approvers, reason, ticket, js=bus.js,
                                       requires_second_approver=second)

        r = await rel(["alice"])
        assert (r.ok, r.code, r.status) == (False, "LAG_NOT_ZERO", 409) and r.lag and r.lag > 0
        await settle_all(Book(pool), ds)
        assert (await rel(["alice"], reason=" ")).code == "AUDIT_REASON_REQUIRED"
        assert (await rel(["alice"], ticket="")).code == "AUDIT_TICKET_REQUIRED"
        assert (await rel([])).code == "APPROVER_REQUIRED"
        assert (await rel(["alice"], second=True)).code == "SECOND_APPROVER_REQUIRED"
        assert (await rel(["alice", " alice "], second=True)).code == "SECOND_APPROVER_REQUIRED"
        # Invariants failing: no release.
        async with pool.acquire() as c:
            good = await c.fetchval("SELECT balance FROM ledger_accounts WHERE account_id = 1004 AND asset = 'USDT' "
                                    "AND bucket = 'available'")
            await c.execute("UPDATE ledger_accounts SET balance = -1 WHERE account_id = 1004 AND asset = 'USDT' "
                            "AND bucket = 'available'")
        r = await rel(["alice", "bob"], second=True)
        assert r.code == "INVARIANTS_FAILING" and "non_negative" in r.invariants
        async with pool.acquire() as c:
            await c.execute("UPDATE ledger_accounts SET balance = $1 WHERE account_id = 1004 AND asset = 'USDT' "
                            "AND bucket = 'available'", good)
            assert await c.fetchval("SELECT engaged FROM ledger_latches WHERE symbol = $1", sym)
        async with Cmds(bus) as cmds:
            r = await rel(["alice", "bob"], second=True)
            assert (r.ok, r.code, r.status, r.mode_set) == (True, "RELEASED", 200, "NORMAL")
            sent = await cmds.settle(1)
        assert [(type(c).__name__, c.symbol, c.mode) for c in sent] == [("SetSymbolMode", sym, SymbolMode.NORMAL)]
        assert sent[0].reason == "reconciled, lag 0" and sent[0].ticket == "INC-7"
        async with pool.acquire() as c:
            latch = await c.fetchrow("SELECT * FROM ledger_latches WHERE symbol = $1", sym)
            entry = await c.fetchrow("SELECT * FROM audit_chain WHERE action = 'LatchRelease'")
            refusals = await c.fetchval("SELECT count(*) FROM ledger_latch_history WHERE action = 'release_refused'")
        assert not latch["engaged"] and list(latch["released_by"]) == ["alice", "bob"]
        assert latch["release_audit_seq"] == entry["seq"] and entry["actor"] == "alice"
        assert '"approvers":["alice","bob"]' in entry["body"]
        assert refusals == 2  # lag, invariants (validation errors are not latch history)
        r = await rel(["alice"])
        assert (r.code, r.status) == ("LATCH_NOT_ENGAGED", 409)
        r = await release_latch(pool, "NOPE-USDT", ["alice"], "x", "y", js=bus.js)
        assert (r.code, r.status) == ("LATCH_NOT_ENGAGED", 404)


async def test_release_keeps_an_operators_stricter_mode(pool: asyncpg.Pool, nats_srv: Any) -> None:
    async with Bus(nats_srv.url) as bus:
        sym = await engaged_and_caught_up(pool, bus)
        async with pool.acquire() as c:  # the core reported an operator's HARD_HALT meanwhile
            await c.execute("UPDATE ledger_markets SET mode = 'HARD_HALT', mode_seq = mode_seq + 100000 "
                            "WHERE symbol = $1", sym)
        async with Cmds(bus) as cmds:
            r = await release_latch(pool, sym, ["alice"], "ok", "INC-8", js=bus.js)
            assert r.ok and r.mode_set is None
            assert await cmds.settle(0) == []


def test_second_approver_policy() -> None:
    assert not second_approver_required(load_config(None, environ={}))
    assert second_approver_required(load_config(None, environ={"SPOTEX_LEDGER__LATCH_REQUIRES_SECOND_APPROVER": "1"}))
    prod = load_config(None, environ={"SPOTEX_ENV": "production"})
    assert second_approver_required(prod)


@pytest.mark.parametrize("mode", ["CANCEL_ONLY"])
async def test_latch_reasserts_its_mode_when_the_core_is_looser(pool: asyncpg.Pool, nats_srv: Any,
                                                                mode: str) -> None:
    async with Bus(nats_srv.url) as bus:
        sym = await engaged_and_caught_up(pool, bus)
        async with pool.acquire() as c:  # someone set NORMAL behind the latch's back
            await c.execute("INSERT INTO ledger_markets (symbol, base, quote, mode, mode_seq) VALUES ($1, '', '', "
                            "'NORMAL', 1) ON CONFLICT (symbol) DO UPDATE SET mode = 'NORMAL'", sym)
        rec = Reconciler(pool, bus.js, CoreAdmin(pool, bus.js), OPTS)
        async with Cmds(bus) as cmds:
            await rec.tick()
            sent = await cmds.settle(1)
        assert any(isinstance(c, SetSymbolMode) and c.symbol == sym and c.mode is SymbolMode(mode) for c in sent)


async def test_latch_answers_each_loosening_and_waits_for_its_own_command(pool: asyncpg.Pool,
                                                                          nats_srv: Any) -> None:
    """The rate limit holds while the core stays loose, not across episodes: once the core is seen
    in the latch's mode, the next loosening is answered on the next tick. A latch engaged after a
    tick's snapshot is not judged by that tick (its own command cannot show yet)."""
    async with Bus(nats_srv.url) as bus:
        sym = await engaged_and_caught_up(pool, bus)
        rec = Reconciler(pool, bus.js, CoreAdmin(pool, bus.js), OPTS)

        async def core_mode(m: str) -> None:  # what the ledger last saw of the core's mode
            async with pool.acquire() as c:
                await c.execute("INSERT INTO ledger_markets (symbol, base, quote, mode, mode_seq) VALUES ($1, '', '', "
                                "$2, 1) ON CONFLICT (symbol) DO UPDATE SET mode = $2", sym, m)

        def reasserts(cmds: list[Any]) -> int:
            return sum(isinstance(c, SetSymbolMode) and c.symbol == sym and c.mode is SymbolMode.CANCEL_ONLY
                       for c in cmds)

        async with Cmds(bus) as cmds:
            await core_mode("NORMAL")
            await rec.tick(now=1000.0)
            assert reasserts(await cmds.settle(1)) == 1
            await rec.tick(now=1001.0)  # still loose, inside reassert_s: not sent again
            await core_mode("CANCEL_ONLY")
            await rec.tick(now=1002.0)  # the core holds the mode
            await core_mode("NORMAL")  # an operator loosens it again
            await rec.tick(now=1003.0)
            assert reasserts(await cmds.settle(2)) == 2

        async with pool.acquire() as c:  # the latch changed after the next tick's snapshot
            await c.execute("UPDATE ledger_latches SET updated_at = clock_timestamp() + interval '1 hour' "
                            "WHERE symbol = $1", sym)
        rec2 = Reconciler(pool, bus.js, CoreAdmin(pool, bus.js), OPTS)
        async with Cmds(bus) as cmds:
            await rec2.tick(now=2000.0)
            assert reasserts(await cmds.settle(1)) == 0
