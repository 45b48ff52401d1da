"""``spotex bench settlement``: N trades exactly once into PostgreSQL through the real consumer.

Generating a million trades through the real core takes minutes, so the feed is synthetic but
well formed (:class:`SyntheticFeed`): the events the core would publish for a market where every
account rests one large buy and one large sell order and trades against the others — MarketAdded,
Deposited (custody -> available), OrderAccepted (available -> hold), then TradeExecuted with the
core's six moves (buyer's quote hold -> seller, seller's base hold -> buyer, maker and taker fees ->
the fee account), contiguous seqs per stream, and an EngineCheckpoint on ``_sys`` every
``checkpoint_every`` trades whose totals come from the generator's own model of the balances. The
messages go to a scratch EVT exactly as the core publishes them (one message per stream per batch,
``Spotex-First-Seq``/``Spotex-Last-Seq`` headers, ``Nats-Msg-Id = <stream>:<last seq>``).

The timed part is the ledger draining EVT: fetch, decode, settle in PostgreSQL, ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.wire import (
    CUSTODY_ACCOUNT,
    FEE_ACCOUNT,
    AssetTotal,
    Bucket,
    Deposited,
    EngineCheckpoint,
    Event,
    MarketAdded,
    Move,
    OrderAccepted,
    OrderType,
    SelfTradePrevention,
    Side,
    TimeInForce,
    TradeExecuted,
    encode_events,
    fee_for,
    market_config,
)

__all__ = ["SyntheticFeed", "publish_feed", "run", "run_async"]

AV, HO = Bucket.AVAILABLE, Bucket.HOLD
T0 = 1_700_000_000_000


class SyntheticFeed:
    """Well-formed EVT traffic for ``trades`` trades, and the balances the core would hold after it."""

    def __init__(self, trades: int, *, accounts: int = 200, seed: int = 1, checkpoint_every: int = 10_000,
                 events_per_msg: int = 100, fencing_token: int = 1, first_account: int = 10_000,
                 wall_clock: bool = False) -> None:
        self.wall_clock = wall_clock  # occurred_at = now (live runs measure settlement lag with it)
        self.trades = trades
        self.rng = random.Random(seed)
        self.accounts = [first_account + i for i in range(accounts)]
        self.checkpoint_every = checkpoint_every
        self.events_per_msg = events_per_msg
        self.token = fencing_token
        self.markets = [
            market_config("BTC-USDT", "BTC", "USDT", base_scale=8, quote_scale=8, tick_size="0.01",
                          lot_size="0.00001", maker_fee_bps=10, taker_fee_bps=20),
            market_config("ETH-USDT", "ETH", "USDT", base_scale=8, quote_scale=8, tick_size="0.01",
                          lot_size="0.0001", maker_fee_bps=5, taker_fee_bps=25),
        ]
        self.assets = sorted({a for m in self.markets for a in (m.base, m.quote)})
        self.seqs: dict[str, int] = {"_sys": 0, **{m.symbol: 0 for m in self.markets}}
        self.balances: dict[tuple[int, str, str], int] = {}
        self.balance_events: dict[str, int] = {}  # per stream: events with moves (journal rows to expect)
        self.trade_ids: dict[str, int] = {m.symbol: 0 for m in self.markets}
        self.order_ids = 0
        self.ts = T0
        self.emitted_trades = 0

    # -- model -----------------------------------------------------------------------------------
    def _apply(self, moves: list[Move], stream: str) -> None:
        self.balance_events[stream] = self.balance_events.get(stream, 0) + 1
        b = self.balances
        for m in moves:
            k = (m.account_id, m.asset, str(m.bucket))
            b[k] = b.get(k, 0) + m.delta

    def totals(self) -> list[AssetTotal]:
        out = []
        for a in self.assets:
            av = sum(v for (acct, asset, bucket), v in self.balances.items()
                     if asset == a and acct != CUSTODY_ACCOUNT and bucket == "available")
            ho = sum(v for (acct, asset, bucket), v in self.balances.items()
                     if asset == a and acct != CUSTODY_ACCOUNT and bucket == "hold")
            cu = sum(v for (acct, asset, _b), v in self.balances.items() if asset == a and acct == CUSTODY_ACCOUNT)
            out.append(AssetTotal(a, av, ho, cu))
        return out

    def _env(self, stream: str) -> tuple[str, str, int, int, str, str, int]:
        self.seqs[stream] += 1
        seq = self.seqs[stream]
        self.ts = time.time_ns() // 1_000_000 if self.wall_clock else self.ts + 1
        return f"{stream}:{seq}", stream, seq, self.ts, f"syn-{stream}-{seq}", f"cmd:{seq}", self.token

    # -- events ----------------------------------------------------------------------------------
    def setup(self) -> Iterator[Event]:
        for m in self.markets:
            yield MarketAdded(*self._env(m.symbol), m)
        for acct in self.accounts:
            for a in self.assets:
                amt = 10**16 if a == "USDT" else 10**13
                moves = [Move(CUSTODY_ACCOUNT, a, AV, -amt), Move(acct, a, AV, amt)]
                self._apply(moves, "_sys")
                yield Deposited(*self._env("_sys"), acct, a, amt, f"syn-dep-{acct}-{a}", moves)
        for m in self.markets:
            for acct in self.accounts:
                for side, asset, amt in ((Side.BUY, m.quote, 10**15), (Side.SELL, m.base, 10**12)):
                    self.order_ids += 1
                    moves = [Move(acct, asset, AV, -amt), Move(acct, asset, HO, amt)]
                    self._apply(moves, m.symbol)
                    yield OrderAccepted(*self._env(m.symbol), self.order_ids, acct, "", side, OrderType.LIMIT,
                                        TimeInForce.GTC, 6_500_000, 10**9, None, False, SelfTradePrevention.NONE,
                                        moves)

    def trade(self) -> TradeExecuted:
        rng = self.rng
        m = self.markets[rng.randrange(len(self.markets))]
        taker, maker = rng.sample(self.accounts, 2)
        taker_side = Side.BUY if rng.random() < 0.5 else Side.SELL
        qty = rng.randint(1, 100)
        price = 6_500_000 + rng.randint(-500, 500)
        base_amt = qty * m.base_per_lot
        quote_amt = price * qty * m.quote_per_tick_lot
        buyer, seller = (taker, maker) if taker_side is Side.BUY else (maker, taker)
        b_fee = fee_for(base_amt, m.taker_fee_bps if buyer == taker else m.maker_fee_bps)
        q_fee = fee_for(quote_amt, m.taker_fee_bps if seller == taker else m.maker_fee_bps)
        q, b = m.quote, m.base
        moves = [Move(buyer, q, HO, -quote_amt), Move(seller, q, AV, quote_amt - q_fee)]
        if q_fee:
            moves.append(Move(FEE_ACCOUNT, q, AV, q_fee))
        moves += [Move(seller, b, HO, -base_amt), Move(buyer, b, AV, base_amt - b_fee)]
        if b_fee:
            moves.append(Move(FEE_ACCOUNT, b, AV, b_fee))
        self._apply(moves, m.symbol)
        self.trade_ids[m.symbol] += 1
        self.emitted_trades += 1
        t_fee, t_asset = (b_fee, b) if buyer == taker else (q_fee, q)
        m_fee, m_asset = (q_fee, q) if buyer == taker else (b_fee, b)
        return TradeExecuted(*self._env(m.symbol), self.trade_ids[m.symbol], 0, taker, taker_side, 0, maker, price,
                             qty, base_amt, quote_amt, t_fee, t_asset, m_fee, m_asset, 1, 1, moves)

    def checkpoint(self) -> EngineCheckpoint:
        watermark = dict(sorted(self.seqs.items()))
        watermark["_sys"] = self.seqs["_sys"]
        return EngineCheckpoint(*self._env("_sys"), self.emitted_trades, f"syn-{self.emitted_trades}", watermark,
                                self.totals())

    def messages(self) -> Iterator[tuple[str, list[Event]]]:
        """(stream, events) in publish order, at most ``events_per_msg`` events per message."""
        buf: dict[str, list[Event]] = {}

        def flush(stream: str | None = None) -> Iterator[tuple[str, list[Event]]]:
            for s in ([stream] if stream else sorted(buf)):
                if buf.get(s):
                    yield s, buf.pop(s)

        for e in self.setup():
            buf.setdefault(e.symbol, []).append(e)
            if len(buf[e.symbol]) >= self.events_per_msg:
                yield from flush(e.symbol)
        yield from flush()
        for i in range(1, self.trades + 1):
            e = self.trade()
            buf.setdefault(e.symbol, []).append(e)
            if len(buf[e.symbol]) >= self.events_per_msg:
                yield from flush(e.symbol)
            if self.checkpoint_every and i % self.checkpoint_every == 0:
                yield from flush()
                buf["_sys"] = [self.checkpoint()]
                yield from flush()
        yield from flush()
        buf["_sys"] = [self.checkpoint()]
        yield from flush()


async def publish_feed(js: Any, messages: Iterator[tuple[str, list[Event]]], *, prefix: str = "evt",
                       window: int = 512, rate: float | None = None) -> int:
    """Publish (stream, events) messages to EVT as the core does; returns the message count.
    With ``rate`` (events/s) the messages are paced, as a live core would publish them."""
    pending: list[Any] = []
    n = 0
    sent_events = 0
    t0 = time.perf_counter()
    for stream, evs in messages:
        if rate:
            ahead = sent_events / rate - (time.perf_counter() - t0)
            if ahead > 0:
                await asyncio.gather(*pending)
                pending.clear()
                await asyncio.sleep(ahead)
            sent_events += len(evs)
        headers = {"Nats-Msg-Id": f"{stream}:{evs[-1].seq}", "Spotex-First-Seq": str(evs[0].seq),
                   "Spotex-Last-Seq": str(evs[-1].seq), "Spotex-Fencing-Token": str(evs[-1].fencing_token)}
        pending.append(await js.publish_async(f"{prefix}.{stream}", encode_events(evs), headers=headers))
        n += 1
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending.clear()
    if pending:
        await asyncio.gather(*pending)
    return n


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def run_async(trades: int, nats_url: str, pg_dsn: str, *, batch_max: int = 500, fetch_max: int = 64,
                    events_per_msg: int = 100, seed: int = 1, live_rate: float | None = None) -> dict[str, Any]:
    """Drain mode (default): publish everything, then time the consumer draining it. Live mode
    (``live_rate`` events/s): the consumer runs while the feed is published at that pace with
    wall-clock ``occurred_at``, and the settlement lag (occurred_at -> commit) is measured."""
    import gc
    import resource

    import asyncpg
    import nats

    from core.bus import ensure_streams
    from ledger.invariants import run_invariants
    from ledger.migrate import migrate
    from ledger.settlement import BatchOutcome, Book, ConsumerOptions, SettlementConsumer
    from spotex.config import LedgerSection

    await migrate(pg_dsn)
    nc = await nats.connect(nats_url)
    js = nc.jetstream(timeout=30)
    await ensure_streams(js)
    feed = SyntheticFeed(trades, seed=seed, events_per_msg=events_per_msg, wall_clock=live_rate is not None)
    msgs = 0
    publish_s = 0.0
    if live_rate is None:
        t0 = time.perf_counter()
        msgs = await publish_feed(js, feed.messages())
        publish_s = time.perf_counter() - t0
    pool = await asyncpg.create_pool(pg_dsn, min_size=2, max_size=4)
    book = Book(pool)
    # Live: the service's wait after a short fetch (ledger.batch_wait_ms), as `spotex up` runs it. A
    # drain's fetches are full and never wait.
    wait_s = LedgerSection().batch_wait_ms / 1000 if live_rate is not None else 0.0
    consumer = SettlementConsumer(book, js, ConsumerOptions(batch_max_events=batch_max, fetch_max_msgs=fetch_max,
                                                            batch_wait_s=wait_s))
    commits: list[float] = []
    locked: list[float] = []
    replans = [0]
    lags: list[int] = []
    applied: dict[str, int] = {}

    async def hook(out: BatchOutcome) -> None:
        commits.append(out.commit_seconds)
        locked.append(out.locked_seconds)
        replans[0] += out.replanned
        now = time.time_ns() // 1_000_000
        lags.extend(now - occurred for _s, occurred in out.lag_ms)
        for st in out.streams.values():
            applied[st.stream] = st.last_seq

    consumer.outcome_hooks.append(hook)
    gc.collect()
    gc.freeze()  # as the service does at start: the feed's objects are not the consumer's to scan
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t1 = time.perf_counter()
    task = asyncio.create_task(consumer.run())
    publisher = None
    if live_rate is not None:
        publisher = asyncio.create_task(publish_feed(js, feed.messages(), rate=live_rate))
    try:
        if publisher is not None:
            msgs = await publisher
            publish_s = time.perf_counter() - t1
        expected = dict(feed.seqs)
        while any(applied.get(s, 0) < v for s, v in expected.items()):
            if task.done():
                task.result()
                raise RuntimeError("consumer stopped")
            if time.perf_counter() - t1 > max(120.0, trades / 2_000):
                raise RuntimeError(f"not drained: {applied} vs {expected}")
            await asyncio.sleep(0.01)
        drain_s = time.perf_counter() - t1
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    finally:
        consumer.stop.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 10)
    async with pool.acquire() as conn:
        rows = await conn.fetchval("SELECT count(*) FROM ledger_trades")
        distinct = await conn.fetchval("SELECT count(*) FROM (SELECT DISTINCT symbol, trade_id FROM ledger_trades) t")
        journal_dups = await conn.fetchval(
            "SELECT count(*) - count(DISTINCT (stream, seq)) FROM ledger_journal")
        ckpts = {r["status"]: r["n"] for r in await conn.fetch(
            "SELECT status, count(*) AS n FROM ledger_engine_checkpoints GROUP BY 1")}
        postings = await conn.fetchval("SELECT count(*) FROM ledger_postings")
    inv = await run_invariants(pool, full=trades <= 200_000, record=False)
    await pool.close()
    await nc.close()
    out: dict[str, Any] = {
        "bench": "settlement",
        "mode": "drain" if live_rate is None else f"live@{live_rate:g}events/s",
        "trades": trades,
        "trade_rows": rows,
        "duplicates": int(rows - distinct + journal_dups),
        "postings": postings,
        "evt_messages": msgs,
        "publish_seconds": round(publish_s, 2),
        "drain_seconds": round(drain_s, 2),
        "trades_per_s": round(trades / drain_s),
        "transactions": len(commits),
        "consumer_cpu_pct": round(100 * cpu_s / drain_s),
        "commit_p50_ms": round(_pct(commits, 50) * 1000, 1),
        "commit_p99_ms": round(_pct(commits, 99) * 1000, 1),
        "commit_mean_ms": round(statistics.fmean(commits) * 1000, 1) if commits else 0.0,
        # The part under the writer lock (balances, checkpoints, commit): batches cannot overlap it.
        "locked_p50_ms": round(_pct(locked, 50) * 1000, 1),
        "locked_p99_ms": round(_pct(locked, 99) * 1000, 1),
        "replanned_batches": replans[0],
        "checkpoints": ckpts,
        "invariants_ok": inv.ok,
        "targets": {"trades_per_s": 16_700, "commit_p99_ms": 100, "duplicates": 0},
    }
    if live_rate is not None:
        out["settlement_lag_p50_ms"] = _pct([float(x) for x in lags], 50)
        out["settlement_lag_p99_ms"] = _pct([float(x) for x in lags], 99)
        out["targets"]["settlement_lag_p99_ms"] = 200
    return out


def run(trades: int = 1_000_000, *, batch_max: int = 500, fetch_max: int = 64, events_per_msg: int = 100,
        seed: int = 1, nats_url: str | None = None, pg_dsn: str | None = None,
        live_rate: float | None = None) -> dict[str, Any]:
    """Start a scratch nats-server + PostgreSQL (unless given), publish the feed, time the drain."""
    from spotex.testing import nats_server, new_database, postgres_server

    if nats_url and pg_dsn:
        return asyncio.run(run_async(trades, nats_url, pg_dsn, batch_max=batch_max, fetch_max=fetch_max,
                                     events_per_msg=events_per_msg, seed=seed, live_rate=live_rate))
    tmp = Path(tempfile.mkdtemp(prefix="spotex-bench-settlement-"))
    (tmp / "n").mkdir()
    (tmp / "p").mkdir()
    try:
        with nats_server(tmp / "n") as ns, postgres_server(tmp / "p") as ps:
            dsn = new_database(ps.url, "bench")
            res = asyncio.run(run_async(trades, ns.url, dsn, batch_max=batch_max, fetch_max=fetch_max,
                                        events_per_msg=events_per_msg, seed=seed, live_rate=live_rate))
            if live_rate is None:
                res["targets_met"] = (res["trades_per_s"] >= 16_700 and res["commit_p99_ms"] <= 100
                                      and res["duplicates"] == 0 and res["trade_rows"] == trades)
            else:
                res["targets_met"] = (res["settlement_lag_p99_ms"] <= 200 and res["duplicates"] == 0
                                      and res["trade_rows"] == trades)
            return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
