"""Settlement exactly once, against the real PostgreSQL (and NATS where the consumer is involved):
replays, forced redelivery, a crash mid-batch, concurrent delivery of one event, fencing-token
refusal, gap stop, the slow path, and the durable consumer resuming from the book."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import nats
import pytest
from prometheus_client import REGISTRY

from core.bus import ensure_streams
from core.engine import Engine
from core.sim import generate, sim_markets
from core.wire import (
    AddMarket,
    Bucket,
    Command,
    Deposited,
    Event,
    Move,
    SequencedCommand,
    TradeExecuted,
    encode_events,
)
from ledger.invariants import run_invariants
from ledger.migrate import migrate
from ledger.settlement import Book, ConsumerOptions, Delivery, SettlementConsumer, resume_stream

T0 = 1_700_000_000_000


# ----------------------------------------------------------------------------------------------
# helpers shared by the ledger tests


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate(pg_dsn)
    p = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=12)
    yield p
    await p.close()


def run_engine(cmds: list[Command], *, checkpoint_every: int = 50, token: int = 1,
               engine: Engine | None = None) -> tuple[Engine, list[Delivery]]:
    """Apply commands to a real engine (markets first when fresh); one delivery per stream per command."""
    eng = engine or Engine(checkpoint_every=checkpoint_every)
    if engine is None:
        cmds = [AddMarket(config=m) for m in sim_markets()] + list(cmds)
    out: list[Delivery] = []
    for c in cmds:
        seq = eng.last_seq + 1
        evs = eng.apply(SequencedCommand(seq=seq, ts_ms=T0 + seq, fencing_token=token, correlation_id=f"c{seq}",
                                         command=c))
        by: dict[str, list[Event]] = {}
        for e in evs:
            by.setdefault(e.symbol, []).append(e)
        out += [Delivery(s, 0, es) for s, es in by.items()]
    return eng, out


def engine_feed(n: int, seed: int = 1, checkpoint_every: int = 50) -> tuple[Engine, list[Delivery]]:
    return run_engine(generate(seed, n), checkpoint_every=checkpoint_every)


async def ledger_balances(pool: asyncpg.Pool) -> dict[tuple[int, str, str], int]:
    async with pool.acquire() as c:
        rows = await c.fetch("SELECT account_id, asset, bucket, balance FROM ledger_accounts")
    return {(r["account_id"], r["asset"], r["bucket"]): int(r["balance"]) for r in rows if r["balance"] != 0}


def engine_balances(eng: Engine, accounts: set[int]) -> dict[tuple[int, str, str], int]:
    out = {}
    for a in accounts:
        for asset, b in eng.balances(a).items():
            if b.available:
                out[(a, asset, "available")] = b.available
            if b.hold:
                out[(a, asset, "hold")] = b.hold
    return out


async def assert_matches_engine(pool: asyncpg.Pool, eng: Engine) -> None:
    ours = await ledger_balances(pool)
    accounts = {k[0] for k in ours if k[0] != 0} | {1}
    theirs = engine_balances(eng, accounts)
    assert {k: v for k, v in ours.items() if k[0] != 0} == theirs
    # Custody mirrors every deposit less every withdrawal.
    for t in eng.totals():
        assert ours.get((0, t.asset, "available"), 0) == t.custody


async def settle_all(book: Book, deliveries: list[Delivery], batch: int = 40) -> list[Any]:
    outs = []
    for i in range(0, len(deliveries), batch):
        outs.append(await book.settle(deliveries[i:i + batch]))
    return outs


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


class Bus:
    """Fresh CMD/EVT streams per test on the session nats-server (as tests/core/test_node.py)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: Any = None
        self.js: Any = None

    async def __aenter__(self) -> Bus:
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        for name in ("CMD", "EVT", "SEQ"):
            with contextlib.suppress(Exception):
                await self.js.delete_stream(name)
        await ensure_streams(self.js, lease_ttl_s=1.5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def publish(self, deliveries: list[Delivery], *, msg_id: str | None = None) -> None:
        for d in deliveries:
            evs = d.events
            headers = {"Nats-Msg-Id": msg_id or f"{d.stream}:{evs[-1].seq}", "Spotex-First-Seq": str(evs[0].seq),
                       "Spotex-Last-Seq": str(evs[-1].seq), "Spotex-Fencing-Token": str(evs[-1].fencing_token)}
            await self.js.publish(f"evt.{d.stream}", encode_events(evs), headers=headers)


async def wait_for(pred: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        v = await pred()
        if v:
            return v
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def caught_up(pool: asyncpg.Pool, want: dict[str, int]) -> bool:
    async with pool.acquire() as c:
        rows = await c.fetch("SELECT stream, last_seq FROM ledger_consumer_checkpoint")
    have = {r["stream"]: r["last_seq"] for r in rows}
    return all(have.get(s, 0) >= v for s, v in want.items())


def last_seqs(deliveries: list[Delivery]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in deliveries:
        out[d.stream] = max(out.get(d.stream, 0), d.last_seq)
    return out


def trade_event(stream: str, seq: int, trade_id: int, *, token: int = 1, buyer: int = 1001, seller: int = 1002,
                amount: int = 100) -> TradeExecuted:
    moves = [Move(buyer, "USDT", Bucket.HOLD, -amount), Move(seller, "USDT", Bucket.AVAILABLE, amount),
             Move(seller, "BTC", Bucket.HOLD, -1), Move(buyer, "BTC", Bucket.AVAILABLE, 1)]
    return TradeExecuted(f"{stream}:{seq}", stream, seq, T0 + seq, f"corr-{seq}", f"cmd:{seq}", token, trade_id, 1,
                         buyer, "BUY", 2, seller, 100, 1, 1, amount, 0, "BTC", 0, "USDT", 0, 0, moves)


def deposit_event(seq: int, account: int, asset: str, amount: int, *, token: int = 1,
                  stream: str = "_sys") -> Deposited:
    moves = [Move(0, asset, Bucket.AVAILABLE, -amount), Move(account, asset, Bucket.AVAILABLE, amount)]
    return Deposited(f"{stream}:{seq}", stream, seq, T0 + seq, f"dep-{seq}", f"cmd:{seq}", token, account, asset,
                     amount, f"ref-{seq}", moves)


# ----------------------------------------------------------------------------------------------
# the Book


async def test_book_matches_engine_and_every_checkpoint(pool: asyncpg.Pool) -> None:
    eng, ds = engine_feed(1500, seed=3)
    outs = await settle_all(Book(pool), ds)
    assert sum(o.trades for o in outs) > 0
    await assert_matches_engine(pool, eng)
    async with pool.acquire() as c:
        statuses = {r["status"]: r["n"] for r in await c.fetch(
            "SELECT status, count(*) AS n FROM ledger_engine_checkpoints GROUP BY 1")}
        trades_evt = sum(1 for d in ds for e in d.events if isinstance(e, TradeExecuted))
        assert await c.fetchval("SELECT count(*) FROM ledger_trades") == trades_evt
    assert statuses == {"match": eng.last_seq // 50}
    assert (await run_invariants(pool, full=True)).ok


async def test_replay_and_forced_redelivery_post_nothing_twice(pool: asyncpg.Pool) -> None:
    eng, ds = engine_feed(800, seed=5)
    book = Book(pool)
    await settle_all(book, ds[: len(ds) // 2])
    # Redeliver everything so far, interleaved and in odd batch sizes, then the rest twice over.
    await settle_all(book, ds[: len(ds) // 2][::-1][::-1], batch=7)
    outs = await settle_all(book, ds, batch=33)
    outs += await settle_all(Book(pool), ds, batch=200)  # a fresh process: no in-memory state
    assert all(not o.alerts for o in outs)
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) - count(DISTINCT (stream, seq)) FROM ledger_journal") == 0
        balance_events = sum(1 for d in ds for e in d.events if getattr(e, "moves", None))
        assert await c.fetchval("SELECT count(*) FROM ledger_journal") == balance_events
    await assert_matches_engine(pool, eng)


async def test_crash_mid_batch_commits_nothing_and_retry_is_exact(pool: asyncpg.Pool, pg_dsn: str) -> None:
    eng, ds = engine_feed(600, seed=9)
    book = Book(pool)
    await settle_all(book, ds[:100])
    # A batch dies half way: the connection is killed after the postings COPY, before the commit.
    conn = await asyncpg.connect(pg_dsn)

    class Dying:
        def __getattr__(self, name: str) -> Any:
            return getattr(conn, name)

        async def copy_records_to_table(self, table: str, **kw: Any) -> Any:
            r = await conn.copy_records_to_table(table, **kw)
            if table == "ledger_postings":
                async with pool.acquire() as admin:
                    await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            return r

    crashing = Book(_OnePool(Dying()))  # type: ignore[arg-type]
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, OSError)):
        await crashing.settle(ds[100:200])
    with contextlib.suppress(Exception):
        await conn.close()
    async with pool.acquire() as c:
        applied = await c.fetchval("SELECT count(*) FROM ledger_journal")
    expected_first = sum(1 for d in ds[:100] for e in d.events if getattr(e, "moves", None))
    assert applied == expected_first
    await settle_all(book, ds[100:])
    await assert_matches_engine(pool, eng)


class _OnePool:
    """A pool of one given connection (to kill it mid-transaction)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def acquire(self) -> Any:
        conn = self.conn

        class _Ctx:
            async def __aenter__(self) -> Any:
                return conn

            async def __aexit__(self, *exc: object) -> None:
                return None

        return _Ctx()


async def test_one_trade_delivered_many_times_concurrently_applies_once(pool: asyncpg.Pool) -> None:
    from core.wire import Deposit, PlaceOrder, Side

    eng, ds = run_engine([
        Deposit(account_id=1001, asset="USDT", amount=10**12), Deposit(account_id=1002, asset="BTC", amount=10**9),
        PlaceOrder(account_id=1002, symbol="BTC-USDT", client_order_id="s", side=Side.SELL, price_ticks=6_500_000,
                   qty_lots=100),
        PlaceOrder(account_id=1001, symbol="BTC-USDT", client_order_id="b", side=Side.BUY, price_ticks=6_500_000,
                   qty_lots=100)])
    last = ds[-1]
    assert any(isinstance(e, TradeExecuted) for e in last.events)
    book = Book(pool)
    await settle_all(book, ds[:-1])
    books = [Book(pool) for _ in range(10)]
    slow = metric("ledger_slow_path_total")
    outs = await asyncio.gather(*(books[i % 10].settle([last]) for i in range(200)))
    assert sum(o.trades for o in outs) == 1
    # The writers queue on the lock and then read the committed checkpoint: no conflict to recover from.
    assert metric("ledger_slow_path_total") == slow
    assert sum(o.duplicates for o in outs) == 199 * len(last.events)
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) FROM ledger_trades") == 1
        assert await c.fetchval("SELECT count(*) - count(DISTINCT (stream, seq)) FROM ledger_journal") == 0
    await assert_matches_engine(pool, eng)


async def test_fencing_token_below_highest_is_refused_counted_alerted(pool: asyncpg.Pool) -> None:
    book = Book(pool)
    before = metric("ledger_fencing_refused_total", {"stream": "_sys"})
    await book.settle([Delivery("_sys", 0, [deposit_event(1, 1001, "USDT", 500, token=5),
                                            deposit_event(2, 1001, "USDT", 500, token=7)])])
    # A redelivery of an applied event (its old, lower token) is a duplicate, not a refusal.
    out = await book.settle([Delivery("_sys", 0, [deposit_event(1, 1001, "USDT", 500, token=5)])])
    assert out.duplicates == 1 and not out.alerts
    out = await book.settle([Delivery("_sys", 0, [deposit_event(3, 1001, "USDT", 999, token=6),
                                                  deposit_event(4, 1001, "USDT", 1, token=7)])])
    assert out.applied_events == 0 and out.held
    assert metric("ledger_fencing_refused_total", {"stream": "_sys"}) == before + 1
    async with pool.acquire() as c:
        cp = await c.fetchrow("SELECT * FROM ledger_consumer_checkpoint WHERE stream = '_sys'")
        alert = await c.fetchrow("SELECT * FROM ledger_alerts WHERE category = 'fencing'")
        bal = await c.fetchval("SELECT balance FROM ledger_accounts WHERE account_id = 1001 AND asset = 'USDT'")
    assert cp["last_seq"] == 2 and cp["state"] == "stopped" and "fencing" in cp["stop_reason"]
    assert cp["max_fencing_token"] == 7
    assert alert is not None and alert["stream"] == "_sys" and alert["key"] == "_sys:3"
    assert bal == 1000


async def test_gap_holds_back_then_stops_the_stream_when_confirmed(pool: asyncpg.Pool) -> None:
    book = Book(pool)
    await book.settle([Delivery("_sys", 0, [deposit_event(1, 1001, "USDT", 5), deposit_event(2, 1001, "USDT", 5)])])
    gap = [Delivery("_sys", 0, [deposit_event(5, 1001, "USDT", 5)])]
    out = await book.settle(gap)
    assert out.suspect_gaps == [("_sys", 3, 5)] and out.applied_events == 0
    out = await book.settle(gap, confirmed_gaps={("_sys", 3)})
    assert out.applied_events == 0
    async with pool.acquire() as c:
        cp = await c.fetchrow("SELECT * FROM ledger_consumer_checkpoint WHERE stream = '_sys'")
        assert cp["state"] == "stopped" and cp["last_seq"] == 2 and cp["stopped_at_seq"] == 3
        assert await c.fetchval("SELECT count(*) FROM ledger_alerts WHERE category = 'gap'") == 1
    # Stopped means stopped: even the missing event is not applied until an audited resume.
    out = await book.settle([Delivery("_sys", 0, [deposit_event(3, 1001, "USDT", 5)])])
    assert out.applied_events == 0 and out.held
    assert await resume_stream(pool, "_sys", "alice", "missing events republished", "INC-1")
    out = await book.settle([Delivery("_sys", 0, [deposit_event(3, 1001, "USDT", 5), deposit_event(4, 1001, "USDT", 5),
                                                  deposit_event(5, 1001, "USDT", 5)])])
    assert out.applied_events == 3
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) FROM audit_chain WHERE action = 'LedgerStreamResume'") == 1


async def test_unbalanced_event_is_refused_and_stops_its_stream(pool: asyncpg.Pool) -> None:
    book = Book(pool)
    bad = deposit_event(1, 1001, "USDT", 10)
    bad = Deposited(bad.event_id, bad.symbol, bad.seq, bad.occurred_at, bad.correlation_id, bad.causation_id, 1,
                    1001, "USDT", 10, "x", [Move(0, "USDT", Bucket.AVAILABLE, -10),
                                            Move(1001, "USDT", Bucket.AVAILABLE, 11)])
    before = metric("invariant_violation_total", {"check": "transaction_balanced"})
    out = await book.settle([Delivery("_sys", 0, [bad])])
    assert out.applied_events == 0 and out.new_alert_ids
    assert metric("invariant_violation_total", {"check": "transaction_balanced"}) == before + 1
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) FROM ledger_journal") == 0
        assert await c.fetchval("SELECT state FROM ledger_consumer_checkpoint WHERE stream = '_sys'") == "stopped"


async def test_slow_path_when_the_journal_already_has_part_of_a_batch(pool: asyncpg.Pool) -> None:
    eng, ds = engine_feed(300, seed=11)
    book = Book(pool)
    await settle_all(book, ds[:50])
    # Another writer posted ds[50:80] (journal, postings, balances) but not our checkpoint: wind the
    # checkpoint back to before that span.
    await settle_all(book, ds[50:80])
    first: dict[str, int] = {}
    for d in ds[50:80]:
        first.setdefault(d.stream, d.first_seq)
    async with pool.acquire() as c:
        for st, seq in first.items():
            await c.execute("UPDATE ledger_consumer_checkpoint SET last_seq = $2 WHERE stream = $1", st, seq - 1)
    slow_before = metric("ledger_slow_path_total")
    outs = await settle_all(Book(pool), ds[50:], batch=1000)
    assert metric("ledger_slow_path_total") >= slow_before + 1 and outs[0].slow_path
    await assert_matches_engine(pool, eng)
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) - count(DISTINCT (stream, seq)) FROM ledger_journal") == 0


# ----------------------------------------------------------------------------------------------
# the JetStream consumer


async def test_consumer_settles_evt_and_resumes_after_a_crash_without_acks(pool: asyncpg.Pool, nats_srv: Any) -> None:
    eng, ds = engine_feed(1200, seed=13)
    want = last_seqs(ds)
    async with Bus(nats_srv.url) as bus:
        await bus.publish(ds[: len(ds) // 2])
        c1 = SettlementConsumer(Book(pool), bus.js, ConsumerOptions(fetch_max_msgs=20, batch_max_events=50))
        # Crash: settle but never ack (as a process killed between commit and ack).
        c1._ack = _no_ack  # type: ignore[method-assign]
        t1 = asyncio.create_task(c1.run())
        half = last_seqs(ds[: len(ds) // 2])
        await wait_for(lambda: caught_up(pool, half), what="first half settled")
        c1.stop.set()
        await t1
        info = await bus.js.consumer_info("EVT", "ledger")
        assert info.num_ack_pending > 0  # the dead consumer left deliveries in flight
        await bus.publish(ds[len(ds) // 2:])
        c2 = SettlementConsumer(Book(pool), bus.js, ConsumerOptions(fetch_max_msgs=64))
        t2 = asyncio.create_task(c2.run())
        await wait_for(lambda: caught_up(pool, want), what="everything settled")
        c2.stop.set()
        await t2
        info = await bus.js.consumer_info("EVT", "ledger")
        assert info.name == "ledger" and info.config.filter_subject == "evt.>"
    await assert_matches_engine(pool, eng)
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) - count(DISTINCT (stream, seq)) FROM ledger_journal") == 0
        assert await c.fetchval("SELECT count(*) FROM ledger_alerts") == 0


async def test_consumer_waits_after_a_short_fetch_so_one_transaction_settles_many_messages(
        pool: asyncpg.Pool, nats_srv: Any) -> None:
    """At a live rate each fetch finds the one message the core just published; with batch_wait_s the
    consumer waits after a short fetch, and what arrived meanwhile settles in one transaction."""
    eng, ds = engine_feed(60, seed=21)
    assert len(ds) >= 12
    async with Bus(nats_srv.url) as bus:
        c = SettlementConsumer(Book(pool), bus.js, ConsumerOptions(fetch_max_msgs=64, batch_wait_s=1.0))
        task = asyncio.create_task(c.run())
        await bus.publish(ds[:1])

        async def first_settled() -> bool:
            return c.batches >= 1

        await wait_for(first_settled, what="the first message settled")
        for d in ds[1:]:  # one at a time, as a core publishes them, inside the consumer's wait
            await bus.publish([d])
            await asyncio.sleep(0.01)
        await wait_for(lambda: caught_up(pool, last_seqs(ds)), what="everything settled")
        c.stop.set()
        await task
    assert c.batches <= 3, f"{len(ds)} messages published one at a time took {c.batches} transactions"
    await assert_matches_engine(pool, eng)


async def _no_ack(msgs: Any) -> None:
    for _ in msgs:
        pass


async def test_consumer_with_dropped_acks_and_duplicate_messages(pool: asyncpg.Pool, nats_srv: Any) -> None:
    eng, ds = engine_feed(600, seed=17)
    async with Bus(nats_srv.url) as bus:
        await bus.publish(ds)
        # The same messages again under fresh ids: JetStream stores them twice.
        for i, d in enumerate(ds[::3]):
            await bus.publish([d], msg_id=f"again-{i}")
        c = SettlementConsumer(Book(pool), bus.js, ConsumerOptions(fetch_max_msgs=16, ack_wait_s=1.0,
                                                                    chaos_drop_ack_ratio=0.3))
        t = asyncio.create_task(c.run())
        await wait_for(lambda: caught_up(pool, last_seqs(ds)), what="settled")
        await asyncio.sleep(2.5)  # let JetStream redeliver what was not acked
        c.stop.set()
        await t
    await assert_matches_engine(pool, eng)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM ledger_alerts") == 0


async def test_consumer_stops_a_stream_at_a_real_gap_and_alerts(pool: asyncpg.Pool, nats_srv: Any) -> None:
    evs = [deposit_event(i, 1001, "USDT", 10) for i in range(1, 11)]
    async with Bus(nats_srv.url) as bus:
        await bus.publish([Delivery("_sys", 0, evs[:4]), Delivery("_sys", 0, evs[6:])])  # 5 and 6 never published
        c = SettlementConsumer(Book(pool), bus.js, ConsumerOptions(fetch_max_msgs=4))
        t = asyncio.create_task(c.run())

        async def stopped() -> bool:
            async with pool.acquire() as conn:
                return await conn.fetchval(
                    "SELECT state = 'stopped' FROM ledger_consumer_checkpoint WHERE stream = '_sys'") or False

        await wait_for(stopped, what="the stream to stop")
        c.stop.set()
        await t
    async with pool.acquire() as conn:
        cp = await conn.fetchrow("SELECT * FROM ledger_consumer_checkpoint WHERE stream = '_sys'")
        alert = await conn.fetchrow("SELECT * FROM ledger_alerts WHERE category = 'gap'")
    assert cp["last_seq"] == 4 and cp["stopped_at_seq"] == 5
    assert alert["key"] == "_sys:5" and alert["response_state"] == "pending"
    assert metric("ledger_consumer_repositions_total", {"reason": "gap"}) >= 1


async def test_consumer_recreated_position_matches_book(pool: asyncpg.Pool, nats_srv: Any) -> None:
    _eng, ds = engine_feed(300, seed=19)
    async with Bus(nats_srv.url) as bus:
        await bus.publish(ds)
        c = SettlementConsumer(Book(pool), bus.js)
        t = asyncio.create_task(c.run())
        await wait_for(lambda: caught_up(pool, last_seqs(ds)), what="settled")
        c.stop.set()
        await t
        info = await bus.js.stream_info("EVT")
        c2 = SettlementConsumer(Book(pool), bus.js)
        # Caught up on every stream: resume after EVT's end, and the consumer is kept as it is.
        assert await c2.restart_point() == info.state.last_seq + 1


async def test_pipelined_batches_write_ahead_wait_for_their_gate_and_replan_when_mispredicted(
        pool: asyncpg.Pool) -> None:
    """The consumer's overlap (Book.settle with a gate): a batch planned on the predicted outcome of
    the batch before writes its rows while that one commits and takes the writer lock only once its
    gate opens; a prediction the committed book does not match (here another writer took tx ids)
    rolls the written-ahead rows back and the batch is planned afresh; a closed gate commits nothing."""
    from ledger.settlement import _Abandoned, prepare

    eng, ds = engine_feed(700, seed=11)
    book = Book(pool)
    await settle_all(book, ds[:100])

    async def journal_rows() -> int:
        async with pool.acquire() as c:
            return int(await c.fetchval("SELECT count(*) FROM ledger_journal"))

    async def plan_pair(a: list[Delivery], b: list[Delivery]) -> tuple[Any, Any]:
        states, next_tx = await book.load_states()
        pa = prepare(a, states, next_tx)
        pb = prepare(b, {**states, **pa.states}, pa.plan.next_tx)
        return pa, pb

    # B writes ahead and waits on its gate while A commits; then B commits on top, as predicted.
    pa, pb = await plan_pair(ds[100:200], ds[200:300])
    gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    b_task = asyncio.create_task(book.settle(pb.deliveries, prepared=pb, gate=gate))
    await asyncio.sleep(0.3)
    assert not b_task.done()  # held at its gate, its rows uncommitted
    out_a = await book.settle(pa.deliveries, prepared=pa)
    gate.set_result(True)
    out_b = await b_task
    assert not out_a.replanned and not out_b.replanned and out_b.journal_rows > 0

    # Another writer takes tx ids between C's commit and D's lock: D's rows are rolled back and it is
    # planned again under the lock, with tx ids after the other writer's.
    pc, pd = await plan_pair(ds[300:400], ds[400:500])
    replans = metric("ledger_replans_total")
    gate = asyncio.get_running_loop().create_future()
    d_task = asyncio.create_task(book.settle(pd.deliveries, prepared=pd, gate=gate))
    await book.settle(pc.deliveries, prepared=pc)
    async with pool.acquire() as c:
        taken = int(await c.fetchval("UPDATE ledger_writer SET next_tx_id = next_tx_id + 7 WHERE id = 1 "
                                     "RETURNING next_tx_id"))
    gate.set_result(True)
    out_d = await d_task
    assert out_d.replanned and metric("ledger_replans_total") == replans + 1
    d_keys = [(d.stream, e.seq) for d in ds[400:500] for e in d.events if getattr(e, "moves", None)]
    async with pool.acquire() as c:
        d_txs = await c.fetchval("SELECT array_agg(j.tx_id) FROM unnest($1::text[], $2::bigint[]) AS k(stream, seq) "
                                 "JOIN ledger_journal j ON j.stream = k.stream AND j.seq = k.seq",
                                 [k[0] for k in d_keys], [k[1] for k in d_keys])
        assert await c.fetchval("SELECT count(*) FROM ledger_journal WHERE tx_id >= $1 AND tx_id < $2",
                                taken - 7, taken) == 0  # nothing landed on the ids the other writer took
    assert d_keys and len(d_txs) == len(d_keys) and min(d_txs) >= taken

    # A closed gate (the batch before did not commit cleanly): nothing of E is written.
    before = await journal_rows()
    states, next_tx = await book.load_states()
    pe = prepare(ds[500:600], states, next_tx)
    closed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    closed.set_result(False)
    with pytest.raises(_Abandoned):
        await book.settle(pe.deliveries, prepared=pe, gate=closed)
    assert await journal_rows() == before

    await settle_all(book, ds[500:])
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) - count(DISTINCT (stream, seq)) FROM ledger_journal") == 0
        balance_events = sum(1 for d in ds for e in d.events if getattr(e, "moves", None))
        assert await c.fetchval("SELECT count(*) FROM ledger_journal") == balance_events
    await assert_matches_engine(pool, eng)
    assert (await run_invariants(pool, full=True)).ok
