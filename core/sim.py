"""Deterministic simulation of a core node with crashes injected at random points.

The real ``CoreNode`` (sequencer, engine, WAL, snapshots, recovery, republish) runs over an
in-memory bus. A seeded random command stream is fed in batches; at random moments the node
"crashes" (before the journal, after the journal, after the WAL write but before fdatasync with
or without losing the unsynced bytes, with a torn WAL tail, after the WAL commit, half way
through publishing, after publishing but before the ack, or while writing a snapshot). A new
node then recovers from the same directory and the same bus, the unacked commands are
redelivered, and at the end the state hash and the published event streams must equal those of
an uninterrupted run of the same stream.

``spotex sim --seeds N`` runs many seeds and prints any failing seed so it can be replayed with
``spotex sim --seed S --verbose``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from core.engine import Engine
from core.node import Bus, CoreNode, CoreOptions, _Staged
from core.recovery import JournalRecord
from core.wal import truncate_tail
from core.wire import (
    AmendOrder,
    CancelAllAccount,
    CancelOrder,
    Command,
    Deposit,
    Event,
    MarketConfig,
    OrderType,
    PlaceOrder,
    SelfTradePrevention,
    Side,
    TimeInForce,
    Withdraw,
    market_config,
)

__all__ = ["CRASH_POINTS", "MemoryBus", "SimResult", "generate", "run_seed", "sim_markets"]

CRASH_POINTS = (
    "before_journal",
    "after_journal",
    "after_wal_write_keep",  # written, not synced, the page cache survives (process crash)
    "after_wal_write_lose",  # written, not synced, power loss: unsynced bytes vanish
    "torn_tail",  # power loss in the middle of the last record
    "after_wal_commit",
    "mid_publish",
    "after_publish",
    "during_snapshot",
)


class SimCrash(Exception):
    pass


class MemoryBus(Bus):
    """The durable outside world of the simulation: the journal and the event streams."""

    def __init__(self) -> None:
        self.journal: list[list[JournalRecord]] = []
        self.events: dict[str, list[Event]] = {}
        self.crash_mid_publish = False

    async def journal_last_seq(self) -> int:
        return self.journal[-1][-1].cmd.seq if self.journal else 0

    async def journal_after(self, seq: int) -> AsyncIterator[list[JournalRecord]]:
        for batch in self.journal:
            if batch[-1].cmd.seq > seq:
                yield batch

    async def prepare_leader(self, streams: list[str]) -> dict[str, int]:
        return {s: (self.events[s][-1].seq if self.events.get(s) else 0) for s in streams}

    async def seal(self, token: int, node: str) -> bool:
        return True

    async def append_journal(self, recs: list[JournalRecord], token: int, node: str) -> None:
        last = await self.journal_last_seq()
        if recs[0].cmd.seq != last + 1:
            raise AssertionError(f"journal would get a gap or duplicate: {last} then {recs[0].cmd.seq}")
        self.journal.append(list(recs))

    async def publish_events(self, by_stream: dict[str, list[Event]], node: str, *, reconcile: bool = False) -> None:
        for i, (stream, evs) in enumerate(sorted(by_stream.items())):
            if self.crash_mid_publish and i == len(by_stream) // 2 and len(by_stream) > 1:
                self.crash_mid_publish = False
                raise SimCrash("mid_publish")
            have = self.events.setdefault(stream, [])
            expected = (have[-1].seq if have else 0) + 1
            if evs[0].seq != expected:
                raise AssertionError(f"{stream}: publishing {evs[0].seq} after {expected - 1}")
            have.extend(evs)


class SimNode(CoreNode):
    """CoreNode with crash hooks around its durable steps."""

    crash_at: str | None = None

    def _maybe(self, point: str) -> None:
        if self.crash_at == point:
            self.crash_at = None
            raise SimCrash(point)

    async def journal(self, recs: list[JournalRecord], token: int) -> None:
        self._maybe("before_journal")
        await super().journal(recs, token)
        self._maybe("after_journal")

    async def commit_wal(self, recs: list[JournalRecord]) -> None:
        assert self.wal is not None
        if self.crash_at in ("after_wal_write_keep", "after_wal_write_lose", "torn_tail"):
            point = self.crash_at
            self.wal_append(recs)
            synced = self.wal.synced_bytes
            segment = self.wal.active_segment
            self.wal.write_buffer()
            self.crash_at = None
            if point == "after_wal_write_lose":
                os.truncate(segment, synced)
            elif point == "torn_tail":
                size = segment.stat().st_size
                cut = random.Random(size).randint(1, max(1, size - synced))
                truncate_tail(segment.parent, cut)
            raise SimCrash(point)
        await super().commit_wal(recs)
        self._maybe("after_wal_commit")

    async def _publish(self, by_stream: dict[str, list[Event]], *, reconcile: bool = False) -> None:
        if self.crash_at == "mid_publish":
            self.crash_at = None
            assert isinstance(self.bus, MemoryBus)
            self.bus.crash_mid_publish = True
        await super()._publish(by_stream, reconcile=reconcile)

    async def snapshot(self) -> Path:
        if self.crash_at == "during_snapshot":
            self.crash_at = None
            snap_dir = self.core_dir / "snapshots"
            snap_dir.mkdir(parents=True, exist_ok=True)
            # A half-written temp file, as a crash inside write_snapshot leaves it.
            (snap_dir / f".snapshot-{self.engine.last_seq:020d}.bin.tmp").write_bytes(b"partial")
            raise SimCrash("during_snapshot")
        return await super().snapshot()


def sim_markets() -> list[MarketConfig]:
    return [
        market_config("BTC-USDT", "BTC", "USDT", base_scale=8, quote_scale=8, tick_size="0.01",
                      lot_size="0.00001", min_notional=10**8, price_band_bps=2_000, maker_fee_bps=10,
                      taker_fee_bps=20),
        market_config("ETH-USDT", "ETH", "USDT", base_scale=8, quote_scale=8, tick_size="0.01",
                      lot_size="0.0001", min_notional=10**8, price_band_bps=0, maker_fee_bps=0,
                      taker_fee_bps=25),
    ]


def generate(seed: int, n: int, markets: list[MarketConfig] | None = None) -> list[Command]:
    """A seeded, valid-looking mix: deposits, resting and crossing limits, markets, IOC/FOK,
    post-only, STP, cancels, amends, cancel-all, withdrawals. Some are meant to be rejected."""
    rng = random.Random(seed)
    mkts = markets or sim_markets()
    accounts = [1000 + i for i in range(6)]
    cmds: list[Command] = []
    for a in accounts:
        cmds.append(Deposit(account_id=a, asset="USDT", amount=10**15))
        cmds.append(Deposit(account_id=a, asset="BTC", amount=10**11))
        cmds.append(Deposit(account_id=a, asset="ETH", amount=10**12))
    mids = {"BTC-USDT": 6_500_000, "ETH-USDT": 300_000}
    placed: list[tuple[int, str, str]] = []
    next_oid = 1  # order ids are assigned by the engine in order; amends use a guess that may miss
    while len(cmds) < n:
        r = rng.random()
        m = rng.choice(mkts)
        acct = rng.choice(accounts)
        mid = mids[m.symbol]
        if r < 0.55:
            side = rng.choice((Side.BUY, Side.SELL))
            off = rng.randint(-40, 40)
            price = max(1, mid + (off if side is Side.BUY else -off))
            tif = rng.choices((TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK), (8, 1, 1))[0]
            coid = f"c{len(cmds)}"
            cmds.append(PlaceOrder(account_id=acct, symbol=m.symbol, client_order_id=coid, side=side,
                                   price_ticks=price, qty_lots=rng.randint(1, 400) * 10, tif=tif,
                                   post_only=rng.random() < 0.1,
                                   stp=rng.choice(list(SelfTradePrevention))))
            placed.append((acct, m.symbol, coid))
            next_oid += 1
            mids[m.symbol] = max(100, mid + rng.randint(-3, 3))
        elif r < 0.62:
            side = rng.choice((Side.BUY, Side.SELL))
            if side is Side.BUY and rng.random() < 0.5:
                cmds.append(PlaceOrder(account_id=acct, symbol=m.symbol, client_order_id="", side=side,
                                       type=OrderType.MARKET, quote_amount=rng.randint(1, 50) * 10**9))
            else:
                cmds.append(PlaceOrder(account_id=acct, symbol=m.symbol, client_order_id="", side=side,
                                       type=OrderType.MARKET, qty_lots=rng.randint(1, 200) * 10))
            next_oid += 1
        elif r < 0.82 and placed:
            a, sym, coid = rng.choice(placed)
            cmds.append(CancelOrder(account_id=a, symbol=sym, client_order_id=coid))
        elif r < 0.93:
            cmds.append(AmendOrder(account_id=acct, symbol=m.symbol, order_id=rng.randint(1, max(1, next_oid)),
                                   new_qty_lots=rng.randint(1, 300) * 10 if rng.random() < 0.7 else None,
                                   new_price_ticks=mid + rng.randint(-20, 20) if rng.random() < 0.4 else None))
        elif r < 0.96:
            cmds.append(CancelAllAccount(account_id=acct, symbol=m.symbol if rng.random() < 0.7 else None))
        else:
            cmds.append(Withdraw(account_id=acct, asset=rng.choice(("USDT", "BTC")), amount=rng.randint(1, 10**9)))
    return cmds[:n]


@dataclass
class SimResult:
    seed: int
    ok: bool
    crashes: list[str] = field(default_factory=list)
    state_hash: str = ""
    reference_hash: str = ""
    last_seq: int = 0
    events: int = 0
    problems: list[str] = field(default_factory=list)


def _batches(rng: random.Random, n: int) -> list[tuple[int, int]]:
    out, i = [], 0
    while i < n:
        size = rng.randint(1, 24)
        out.append((i, min(n, i + size)))
        i += size
    return out


async def _drive(core_dir: Path, cmds: list[Command], batches: list[tuple[int, int]],
                 crashes: dict[int, str], opts_kw: dict[str, object],
                 pipelined: bool = False) -> tuple[SimNode, MemoryBus, list[str]]:
    """Feed ``batches`` through a node, crashing where ``crashes`` says. ``pipelined`` drives the
    leader's real schedule (``CoreNode._consume``): batch k+1 is sequenced, journaled and in the WAL
    before batch k's events are published and its commands acked, so up to two batches can be
    unpublished at a crash."""
    bus = MemoryBus()
    done_crashes: list[str] = []
    opts = CoreOptions(node_id="sim", nats_url="", core_dir=str(core_dir), **opts_kw)  # type: ignore[arg-type]

    def fresh() -> SimNode:
        node = SimNode(opts, bus)
        node.clock = lambda: 1_700_000_000_000
        node.recover_local()
        return node

    node = fresh()
    await node.become_leader(1)
    await node.ensure_markets()
    acked = 0  # batches acknowledged to the source
    next_batch = 0  # next batch to sequence
    pending: tuple[_Staged | None, int] | None = None  # sequenced, not yet published/acked
    attempt = 0
    while acked < len(batches):
        point = crashes.pop(attempt, None)
        attempt += 1
        node.crash_at = point
        try:
            staged_now: tuple[_Staged | None, int] | None = None
            if next_batch < len(batches) and (pipelined or pending is None):
                lo, hi = batches[next_batch]
                # Redelivery: the source hands out every unacked command again, in order.
                items = [(i + 1, f"c-{i + 1}", cmds[i]) for i in range(lo, hi) if not node.state.seen(i + 1)]
                if point == "during_snapshot":
                    node.snapshot_due_at = node.engine.last_seq  # make this batch take a snapshot
                # The clock is a pure function of the batch, so retries sequence identically.
                node.clock = functools.partial(int, 1_700_000_000_000 + lo * 7)
                staged_now = (await node.sequence(items), next_batch)
                next_batch += 1
            if pending is None:
                pending, staged_now = staged_now, None
                if pipelined and next_batch < len(batches):
                    continue  # fill the pipeline first
            assert pending is not None
            staged, idx = pending
            if staged is not None:
                await node.publish_staged(staged)
            acked = idx + 1
            pending = staged_now
            if node.snapshot_due() and pending is not None:  # the leader drains its pipeline first
                staged, idx = pending
                if staged is not None:
                    await node.publish_staged(staged)
                acked, pending = idx + 1, None
            await node.maybe_snapshot()
            if point == "after_publish":
                raise SimCrash(point)
        except SimCrash as crash:
            done_crashes.append(str(crash))
            if node.wal is not None:
                node.wal.abandon()
            node = fresh()
            await node.become_leader(1)
            next_batch, pending = acked, None
            continue
    return node, bus, done_crashes


async def run_seed_async(seed: int, n: int = 300, workdir: Path | None = None, crashes: int | None = None,
                         keep: bool = False, pipelined: bool | None = None) -> SimResult:
    """One seeded run against an uninterrupted reference. Odd seeds drive the pipelined schedule
    unless ``pipelined`` says otherwise."""
    rng = random.Random(seed * 7919 + 1)
    if pipelined is None:
        pipelined = seed % 2 == 1
    cmds = generate(seed, n)
    batches = _batches(rng, len(cmds))
    k = crashes if crashes is not None else rng.randint(1, 3)
    plan = {rng.randrange(len(batches)): rng.choice(CRASH_POINTS) for _ in range(k)}
    opts_kw: dict[str, object] = {"snapshot_every": rng.choice((40, 97, 10_000)), "checkpoint_every": 50,
                                  "wal_segment_bytes": rng.choice((4096, 64 * 1024)), "wal_fsync": False,
                                  "markets": sim_markets(),
                                  # The tightest safe bound: two pipelined batches of at most 24 commands
                                  # can be unpublished at a crash. Most of each restart's replay runs
                                  # with the engine's events off, and republishing must still succeed.
                                  "replay_events": 48}
    base = Path(workdir or tempfile.mkdtemp(prefix=f"spotex-sim-{seed}-"))
    try:
        ref_node, ref_bus, _ = await _drive(base / "ref", cmds, batches, {}, opts_kw)
        node, bus, done = await _drive(base / "crash", cmds, batches, dict(plan), opts_kw, pipelined)
        res = SimResult(seed, True, done, node.engine.state_hash(), ref_node.engine.state_hash(),
                        node.engine.last_seq, sum(len(v) for v in bus.events.values()))
        if res.state_hash != res.reference_hash:
            res.problems.append("state hash differs from the uninterrupted run")
        if node.engine.last_seq != ref_node.engine.last_seq:
            res.problems.append(f"last seq {node.engine.last_seq} != {ref_node.engine.last_seq}")
        for stream in sorted(set(bus.events) | set(ref_bus.events)):
            got, want = bus.events.get(stream, []), ref_bus.events.get(stream, [])
            if got != want:
                seqs = [e.seq for e in got]
                res.problems.append(f"{stream}: events differ ({len(got)} vs {len(want)}; "
                                    f"contiguous={seqs == list(range(1, len(seqs) + 1))})")
        journal = [r.cmd.seq for b in bus.journal for r in b]
        if journal != list(range(1, len(journal) + 1)):
            res.problems.append("journal has a gap or duplicate")
        replay = Engine(checkpoint_every=50)
        for b in bus.journal:
            for r in b:
                replay.apply(r.cmd)
        if replay.state_hash() != res.state_hash:
            res.problems.append("replaying the journal does not give the node's state hash")
        res.ok = not res.problems
        if node.wal is not None:
            node.wal.close()
        if ref_node.wal is not None:
            ref_node.wal.close()
        return res
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def run_seed(seed: int, n: int = 300, crashes: int | None = None, pipelined: bool | None = None) -> SimResult:
    return asyncio.run(run_seed_async(seed, n, crashes=crashes, pipelined=pipelined))

