"""A core node: the sequencer + engine behind JetStream, as leader or warm standby.

Leader pipeline (group commit on every hop):

    fetch CMD batch -> sequence (seq, ts, fencing token) -> engine.apply -> journal to SEQ
    (fenced) -> WAL append + fdatasync -> events to EVT, one message per stream per batch
    (fenced) -> ack the CMD batch

Three stages overlap (``_consume``): a fetcher pulls the next CMD batches while the sequencer
journals and commits batch k+1 and the publisher puts batch k's events on EVT and acks it. Events
still go out strictly in order, and a snapshot waits for the pipeline to drain.

- The SEQ stream is the replicated copy of the command log: a standby tails it and applies the
  same commands to its own engine, so its state hash must equal the leader's at every
  EngineCheckpoint; a difference is reported as divergence (seed §3.3).
- Fencing: every publish to SEQ and EVT carries ``Nats-Expected-Last-Subject-Sequence``. Only the
  node that has seen the true end of a subject can extend it, so a stale leader's write is refused
  by the server (counted and logged as ``FENCING_TOKEN``) and the node stops: a node that was
  refused a write exits, and restarts as a standby that resyncs from snapshot + WAL + SEQ.
- Crash safety: CMD is acked only after the events are on EVT; a recovered leader republishes the
  events EVT lacks (from its replay) before taking new commands, with no gap and no duplicate.
  Redelivered commands (same CMD stream sequence) are recognised and not applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import Counter, Gauge, Histogram

from core.aio import stop_tasks
from core.bus import H_FIRST, H_LAST, H_NODE, H_TOKEN, LEASE_BUCKET, SYS_STREAM, ensure_streams, evt_subject
from core.engine import ENGINE_IMPL, Engine
from core.lease import Lease, LeaseLost
from core.obs import freeze_heap
from core.recovery import (
    JournalRecord,
    NodeState,
    apply_record,
    decode_journal,
    encode_journal,
    encode_record,
    recover,
    take_snapshot,
)
from core.wal import WalWriter
from core.wire import (
    AddMarket,
    Command,
    EngineCheckpoint,
    Event,
    MarketConfig,
    SequencedCommand,
    TradeExecuted,
    decode_request,
    encode_events,
    market_config_diff,
)

__all__ = ["JOURNAL_SUBJECT", "CoreNode", "CoreOptions", "FencingError"]

log = logging.getLogger("core.node")

JOURNAL_STREAM = "SEQ"
JOURNAL_SUBJECT = "seq.journal"
WRONG_LAST_SEQUENCE = 10071  # JetStream API error: Nats-Expected-Last-Subject-Sequence mismatch

M_CMD_WAIT = Histogram("core_cmd_wait_seconds", "A command's time in CMD: stored by JetStream to sequenced",
                       buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0))
M_QUEUE = Gauge("core_queue_depth", "Commands waiting in the CMD consumer")
M_LOOP = Histogram("core_loop_seconds", "One batch through sequence, apply, journal, WAL, publish, ack",
                   buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
M_APPLY = Histogram("core_apply_seconds", "Engine time per batch",
                    buckets=(0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05))
M_FSYNC = Histogram("core_wal_fsync_seconds", "WAL group commit (write + fdatasync)",
                    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1))
M_BATCH = Histogram("core_batch_commands", "Commands per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
M_COMMANDS = Counter("core_commands_total", "Commands sequenced", ["symbol"])
M_EVENTS = Counter("core_events_total", "Events published", ["stream"])
M_TRADES = Counter("core_trades_total", "Trades executed", ["symbol"])
M_STREAM_SEQ = Gauge("core_stream_seq", "Last event seq per stream", ["stream"])
M_LAST_SEQ = Gauge("core_last_seq", "Last sequenced command")
M_LEADER = Gauge("core_is_leader", "1 while this node holds the lease")
M_TOKEN = Gauge("core_fencing_token", "Fencing token of this node's lease (0 when standby)")
M_FENCED = Counter("core_fencing_rejections_total", "Writes refused because another node extended the log")
M_DIVERGE = Counter("core_standby_divergence_total", "Checkpoint state hashes that differ from the leader's")
M_DUP_SEQ = Counter("core_duplicate_seq_total", "Journal entries whose seq was already applied")
M_REDELIVERED = Counter("core_redelivered_commands_total", "CMD messages skipped as already sequenced")
M_CHECKPOINTS = Counter("core_checkpoints_total", "EngineCheckpoint events")
M_STANDBY_LAG = Gauge("core_standby_lag_commands", "Commands the standby is behind the journal")


_PREFETCH = 4  # CMD batches the fetcher may hold ahead of the sequencer


class _Staged:
    """A batch that is journaled and in the WAL, with its events still to publish."""

    __slots__ = ("events", "t0")

    def __init__(self, events: list[Event], t0: float) -> None:
        self.events = events
        self.t0 = t0


class FencingError(Exception):
    """Another node has extended a subject this node was writing to: this node is stale."""


class CoreOptions(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    nats_url: str
    core_dir: str
    cmd_stream: str = "CMD"
    evt_stream: str = "EVT"
    wal_segment_bytes: int = 64 * 1024 * 1024
    snapshot_every: int = 100_000
    checkpoint_every: int = 10_000
    lease_ttl_ms: int = 3_000
    fetch_batch: int = 256
    ack_wait_s: float = 5.0
    duplicate_window_s: int = 120
    cmd_persist: str = "async"
    markets: list[MarketConfig] = []
    query_subject: str = "core.query"
    wal_fsync: bool = True
    # Recovery builds events for the last this-many WAL records only (the rest replay with the
    # engine's events off). A leader has at most two fetch batches journaled but not yet on EVT,
    # so this is far more than a restart can need; if EVT ever lacks more, taking the lease stops
    # with "cannot republish" and says to raise it.
    replay_events: int = 50_000
    # Freeze the heap (gc.freeze) after recovery and on taking the lease: the service process sets
    # it; in-process users (tests, the simulator) leave it off so as not to freeze their own heap.
    freeze_heap: bool = False


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Bus:
    """Where a node's journal and events go. ``NatsBus`` is the real one (JetStream, fenced by
    expected-last-subject-sequence); ``core.sim.MemoryBus`` is the deterministic simulation's."""

    async def journal_last_seq(self) -> int:
        raise NotImplementedError

    def journal_after(self, seq: int) -> AsyncIterator[list[JournalRecord]]:
        raise NotImplementedError

    async def prepare_leader(self, streams: list[str]) -> dict[str, int]:
        """Learn where the journal and each event stream end; returns stream -> last event seq."""
        raise NotImplementedError

    async def seal(self, token: int, node: str) -> bool:
        """Append a term marker to the journal at its current end. After it, a stale leader's next
        journal write is refused. False when someone extended the journal meanwhile (catch up, retry)."""
        raise NotImplementedError

    async def append_journal(self, recs: list[JournalRecord], token: int, node: str) -> None:
        raise NotImplementedError

    async def publish_events(self, by_stream: dict[str, list[Event]], node: str, *, reconcile: bool = False) -> None:
        """Publish fenced. With ``reconcile`` (a new leader republishing), a subject that grew meanwhile
        is re-read and only the events it still lacks are sent: the same journal gives the same events."""
        raise NotImplementedError


class NatsBus(Bus):
    def __init__(self, js: Any, evt_stream: str) -> None:
        self.js = js
        self.evt_stream = evt_stream
        self.subject_last: dict[str, int] = {}  # EVT subject -> JetStream stream seq of its last message
        self.journal_last = 0  # SEQ stream seq of the last journal message

    async def ensure(self, duplicate_window_s: int) -> None:
        from nats.js.api import StorageType, StreamConfig

        cfg = StreamConfig(name=JOURNAL_STREAM, subjects=[JOURNAL_SUBJECT], storage=StorageType.FILE,
                           duplicate_window=float(duplicate_window_s), allow_direct=True)
        try:
            await self.js.add_stream(cfg)
        except Exception as exc:
            if "already in use" not in str(exc) and "exists" not in str(exc):
                raise

    async def _journal_last_msg(self) -> tuple[int, int]:
        from nats.js.errors import NotFoundError

        try:
            msg = await self.js.get_last_msg(JOURNAL_STREAM, JOURNAL_SUBJECT)
        except NotFoundError:
            return 0, 0
        return int(msg.seq), int((msg.headers or {}).get(H_LAST, 0))

    async def journal_last_seq(self) -> int:
        stream_seq, last = await self._journal_last_msg()
        self.journal_last = stream_seq
        return last

    async def _find_journal_pos(self, after_seq: int) -> tuple[int, int]:
        """Stream seq of the first journal message holding a command > after_seq (binary search)."""
        info = await self.js.stream_info(JOURNAL_STREAM)
        lo, hi = int(info.state.first_seq), int(info.state.last_seq)
        last = hi
        ans = hi + 1
        while lo <= hi:
            mid = (lo + hi) // 2
            msg = await self.js.get_msg(JOURNAL_STREAM, mid)
            if int((msg.headers or {}).get(H_LAST, 0)) > after_seq:
                ans, hi = mid, mid - 1
            else:
                lo = mid + 1
        return ans, last

    async def journal_after(self, seq: int) -> AsyncIterator[list[JournalRecord]]:
        pos, last = await self._find_journal_pos(seq)
        while pos <= last:
            msg = await self.js.get_msg(JOURNAL_STREAM, pos)
            yield decode_journal(msg.data)
            pos += 1

    async def prepare_leader(self, streams: list[str]) -> dict[str, int]:
        from nats.js.errors import NotFoundError

        await self.journal_last_seq()
        published: dict[str, int] = {}
        for stream in streams:
            subject = evt_subject(stream)
            try:
                msg = await self.js.get_last_msg(self.evt_stream, subject)
                self.subject_last[subject] = int(msg.seq)
                published[stream] = int((msg.headers or {}).get(H_LAST, 0))
            except NotFoundError:
                self.subject_last[subject] = 0
                published[stream] = 0
        return published

    async def seal(self, token: int, node: str) -> bool:
        _, last_cmd = await self._journal_last_msg()
        headers = {
            "Nats-Msg-Id": f"term:{token}",
            "Nats-Expected-Last-Subject-Sequence": str(self.journal_last),
            H_FIRST: str(last_cmd + 1), H_LAST: str(last_cmd), H_TOKEN: str(token), H_NODE: node,
            "Spotex-Term": str(token),
        }
        try:
            ack = await self._fenced_publish(JOURNAL_SUBJECT, encode_journal([]), headers)
        except FencingError:
            return False
        self.journal_last = int(ack.seq)
        return True

    async def append_journal(self, recs: list[JournalRecord], token: int, node: str) -> None:
        first, last = recs[0].cmd.seq, recs[-1].cmd.seq
        headers = {
            "Nats-Msg-Id": f"seq:{first}-{last}",
            "Nats-Expected-Last-Subject-Sequence": str(self.journal_last),
            H_FIRST: str(first), H_LAST: str(last), H_TOKEN: str(token), H_NODE: node,
        }
        ack = await self._fenced_publish(JOURNAL_SUBJECT, encode_journal(recs), headers)
        self.journal_last = int(ack.seq)

    async def publish_events(self, by_stream: dict[str, list[Event]], node: str, *, reconcile: bool = False) -> None:
        async def one(stream: str, evs: list[Event]) -> None:
            subject = evt_subject(stream)
            while evs:
                first, last = evs[0].seq, evs[-1].seq
                headers = {
                    "Nats-Msg-Id": f"{stream}:{last}",
                    "Nats-Expected-Last-Subject-Sequence": str(self.subject_last.get(subject, 0)),
                    H_FIRST: str(first), H_LAST: str(last), H_TOKEN: str(evs[-1].fencing_token), H_NODE: node,
                }
                try:
                    ack = await self._fenced_publish(subject, encode_events(evs), headers)
                except FencingError:
                    if not reconcile:
                        raise
                    msg = await self.js.get_last_msg(self.evt_stream, subject)
                    self.subject_last[subject] = int(msg.seq)
                    done = int((msg.headers or {}).get(H_LAST, 0))
                    if done >= first and done < last and not any(e.seq == done + 1 for e in evs):
                        raise
                    evs = [e for e in evs if e.seq > done]
                    continue
                self.subject_last[subject] = int(ack.seq)
                return

        await asyncio.gather(*(one(s, evs) for s, evs in by_stream.items()))

    async def _fenced_publish(self, subject: str, data: bytes, headers: dict[str, str]) -> Any:
        from nats.js.errors import APIError

        try:
            return await self.js.publish(subject, data, headers=headers, timeout=5.0)
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise FencingError(f"FENCING_TOKEN: {subject}: {exc.description}") from exc
            raise


class CoreNode:
    """Leader or standby. Transport-free except through ``bus`` and the command source, so the
    deterministic simulation drives this very class."""

    def __init__(self, opts: CoreOptions, bus: Bus | None = None) -> None:
        self.opts = opts
        self.core_dir = Path(opts.core_dir)
        self.role = "starting"
        self.nc: Any = None
        self.js: Any = None
        self.bus: Bus | None = bus
        self.lease: Lease | None = None
        self.token: int | None = None  # fencing token while leading
        self.engine: Engine = Engine(checkpoint_every=opts.checkpoint_every)
        self.state = NodeState()
        self.wal: WalWriter | None = None
        # Events produced locally, maybe not yet on EVT, per stream (bounded).
        self.recent: dict[str, deque[Event]] = {}
        self.leader_checkpoints: dict[int, str] = {}  # last_seq -> state hash seen on EVT
        self.own_checkpoints: dict[int, str] = {}
        self.divergence: list[dict[str, Any]] = []
        self.market_mismatch: dict[str, dict[str, tuple[Any, Any]]] = {}  # symbol -> field -> (engine, configured)
        self.fenced = 0
        self.snapshot_due_at = 0
        self.stopping = asyncio.Event()
        self.last_error: str | None = None
        self.on_role: Callable[[str], None] | None = None
        self.clock: Callable[[], int] = _now_ms
        self.recovered: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------
    # start-up

    def recover_local(self) -> None:
        def open_wal(start_seq: int) -> WalWriter:
            return WalWriter(self.core_dir / "wal", segment_bytes=self.opts.wal_segment_bytes,
                             fsync=self.opts.wal_fsync, start_seq=start_seq,
                             on_commit=lambda s, n: M_FSYNC.observe(s))

        rec = recover(self.core_dir, checkpoint_every=self.opts.checkpoint_every,
                      events_tail=self.opts.replay_events, open_wal=open_wal, freeze=self.opts.freeze_heap)
        self.engine, self.state = rec.engine, rec.state
        self.recovered = {"last_seq": rec.engine.last_seq, "state_hash": rec.engine.state_hash(),
                          "snapshot_seq": rec.snapshot_seq, "replayed": rec.replayed,
                          "events_from": rec.events_from,
                          "seconds": round(rec.seconds, 3), "replay_seconds": round(rec.replay_seconds, 3),
                          "replay_cpu_seconds": round(rec.replay_cpu_seconds, 3),
                          "engine_impl": ENGINE_IMPL}
        log.info("recovered from snapshot + WAL", extra=self.recovered)
        self._remember(rec.events)
        assert rec.wal is not None
        self.wal = rec.wal
        if self.wal.last_seq != self.engine.last_seq:
            raise RuntimeError(f"WAL ends at {self.wal.last_seq} but recovery reached {self.engine.last_seq}")
        self.snapshot_due_at = self.engine.last_seq + self.opts.snapshot_every
        M_LAST_SEQ.set(self.engine.last_seq)

    async def connect(self) -> None:
        import nats

        self.nc = await nats.connect(self.opts.nats_url, name=f"core-{self.opts.node_id}",
                                     max_reconnect_attempts=-1)
        self.js = self.nc.jetstream()
        await ensure_streams(self.js, cmd_stream=self.opts.cmd_stream, evt_stream=self.opts.evt_stream,
                             duplicate_window_s=self.opts.duplicate_window_s,
                             lease_ttl_s=self.opts.lease_ttl_ms / 1000, cmd_persist=self.opts.cmd_persist)
        bus = NatsBus(self.js, self.opts.evt_stream)
        await bus.ensure(self.opts.duplicate_window_s)
        self.bus = bus
        kv = await self.js.key_value(LEASE_BUCKET)
        self.lease = Lease(kv, self.opts.node_id)

    def _remember(self, events: list[Event]) -> None:
        for e in events:
            dq = self.recent.get(e.symbol)
            if dq is None:
                dq = self.recent[e.symbol] = deque(maxlen=200_000)
            dq.append(e)
            if isinstance(e, EngineCheckpoint):
                self.own_checkpoints[e.last_seq] = e.state_hash
                self._compare_checkpoint(e.last_seq)
                if len(self.own_checkpoints) > 1000:
                    self.own_checkpoints.pop(next(iter(self.own_checkpoints)))

    def _compare_checkpoint(self, last_seq: int) -> None:
        mine, theirs = self.own_checkpoints.get(last_seq), self.leader_checkpoints.get(last_seq)
        if mine is None or theirs is None:
            return
        if mine != theirs:
            M_DIVERGE.inc()
            info = {"last_seq": last_seq, "own": mine, "leader": theirs}
            self.divergence.append(info)
            log.error("state hash diverges from the leader's checkpoint", extra=info)

    def note_leader_checkpoint(self, last_seq: int, state_hash: str) -> None:
        self.leader_checkpoints[last_seq] = state_hash
        if len(self.leader_checkpoints) > 1000:
            self.leader_checkpoints.pop(next(iter(self.leader_checkpoints)))
        self._compare_checkpoint(last_seq)

    # ------------------------------------------------------------------------------------------
    # journal: tailing as standby, catching up before leading

    async def catch_up(self) -> int:
        """Apply every journal entry after our last seq (durably: WAL first). Returns commands applied."""
        assert self.bus is not None
        last = await self.bus.journal_last_seq()
        M_STANDBY_LAG.set(max(0, last - self.engine.last_seq))
        if last <= self.engine.last_seq:
            return 0
        applied = 0
        async for recs in self.bus.journal_after(self.engine.last_seq):
            applied += self._apply_journal(recs)
        M_STANDBY_LAG.set(0)
        return applied

    def _apply_journal(self, recs: list[JournalRecord]) -> int:
        assert self.wal is not None
        applied = 0
        batch_events: list[Event] = []
        for rec in recs:
            if rec.cmd.seq <= self.engine.last_seq:
                M_DUP_SEQ.inc()
                continue
            if rec.cmd.seq != self.engine.last_seq + 1:
                raise RuntimeError(f"journal gap: have {self.engine.last_seq}, next entry is {rec.cmd.seq}")
            batch_events.extend(apply_record(self.engine, self.state, rec))
            self.wal.append(rec.cmd.seq, encode_record(rec))
            applied += 1
        if applied:
            self.wal.commit()
            self._remember(batch_events)
            M_LAST_SEQ.set(self.engine.last_seq)
        return applied

    async def _watch_leader_checkpoints(self) -> None:
        from core.wire import decode_events

        async def on_msg(msg: Any) -> None:
            try:
                for e in decode_events(msg.data):
                    if isinstance(e, EngineCheckpoint):
                        self.note_leader_checkpoint(e.last_seq, e.state_hash)
            except Exception:
                log.exception("bad checkpoint message")

        await self.nc.subscribe(evt_subject(SYS_STREAM), cb=on_msg)

    async def run_standby(self) -> None:
        """Tail the journal until the lease is free, then take over."""
        assert self.lease is not None
        self._set_role("standby")
        interval = self.opts.lease_ttl_ms / 3000
        while not self.stopping.is_set():
            await self.catch_up()
            if await self.lease.try_acquire():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    # ------------------------------------------------------------------------------------------
    # leading

    async def become_leader(self, token: int) -> None:
        """Catch up, then republish what our replay has that EVT lacks: no gap, no duplicate."""
        assert self.bus is not None
        self.token = token
        M_TOKEN.set(token)
        # Term barrier: whatever a stale leader journaled before our seal is committed and we apply
        # it; after the seal, its next write is refused.
        for _ in range(1000):
            await self.catch_up()
            if await self.bus.seal(token, self.opts.node_id):
                break
        else:
            raise RuntimeError("could not seal the journal: it keeps growing under another writer")
        await self.catch_up()
        streams = sorted(set(self.engine.stream_seqs()) | set(self.recent))
        published = await self.bus.prepare_leader(streams)
        missing: dict[str, list[Event]] = {}
        for stream in streams:
            have = int(self.engine.stream_seqs().get(stream, 0))
            done = published.get(stream, 0)
            if have <= done:
                continue
            evs = [e for e in self.recent.get(stream, ()) if e.seq > done]
            if not evs or evs[0].seq != done + 1 or evs[-1].seq != have:
                held = f"{evs[0].seq}..{evs[-1].seq}" if evs else "none"
                raise RuntimeError(f"cannot republish {stream}: EVT ends at {done}, the engine at {have}, this node "
                                   f"holds events {held} (restart with replay_events above "
                                   f"{self.opts.replay_events} to rebuild more of them)")
            missing[stream] = evs
        if missing:
            log.warning("republishing events EVT lacks",
                        extra={"streams": {k: [v[0].seq, v[-1].seq] for k, v in missing.items()}})
            await self._publish(missing, reconcile=True)
        if self.opts.freeze_heap:
            freeze_heap(log, "leader")  # what the standby applied meanwhile, before serving
        self._set_role("leader")

    async def run_leader(self) -> None:
        assert self.lease is not None and self.lease.token is not None
        await self.become_leader(self.lease.token)
        renew = asyncio.create_task(self._renew_loop(), name="core-renew")
        query_sub = await self.nc.subscribe(self.opts.query_subject, queue="core-query", cb=self._on_query)
        try:
            await self.ensure_markets()
            await self._consume()
        finally:
            await stop_tasks([renew])
            with contextlib.suppress(Exception):
                await query_sub.unsubscribe()

    async def _renew_loop(self) -> None:
        assert self.lease is not None
        interval = self.opts.lease_ttl_ms / 3000
        while not self.stopping.is_set():  # not only cancel(): see core.aio.stop_tasks
            await asyncio.sleep(interval)
            try:
                await self.lease.renew()
            except LeaseLost as exc:
                log.error("lease lost; stepping down", extra={"reason": str(exc)})
                self.last_error = str(exc)
                self.stopping.set()
                return
            except Exception as exc:  # NATS hiccup: keep trying until the TTL decides
                log.warning("lease renew failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    async def ensure_markets(self) -> None:
        have = {m.symbol: m for m in self.engine.markets()}
        missing = [m for m in self.opts.markets if m.symbol not in have]
        # A configured market the engine already has (from its WAL) with another definition: the
        # engine keeps its own (a market is defined once); say so loudly, a service mapping decimals
        # with the configured one would mis-scale orders (`spotex mapping check`, docs/architecture.md).
        diffs = {m.symbol: market_config_diff(have[m.symbol], m) for m in self.opts.markets if m.symbol in have}
        self.market_mismatch = {sym: d for sym, d in diffs.items() if d}
        for sym, diff in self.market_mismatch.items():
            log.error("configured market differs from the engine's definition; the engine keeps its own",
                      extra={"symbol": sym, "fields": diff})
        if missing:
            await self.process([(0, "bootstrap", AddMarket(config=m, reason="configured market", ticket="bootstrap"))
                                for m in missing])

    async def _consume(self) -> None:
        """Two overlapping stages plus a prefetcher, so no hop waits for another batch's round trip:

        - a fetcher keeps pulling CMD batches into a small queue (at most ``_PREFETCH`` batches ahead);
        - stage 1 takes everything queued (up to ``fetch_batch`` commands), sequences and applies it,
          journals it to SEQ and commits the WAL;
        - stage 2 publishes that batch's events to EVT and then acks its CMD messages, while stage 1
          already works on the next batch. Stage 2 runs one batch at a time in order, so EVT order and
          fencing are those of the sequential loop; a journaled batch whose events are not yet on EVT
          is exactly the state a crash can leave, which a new leader already repairs (republish).
        """
        from nats.js.api import AckPolicy, ConsumerConfig

        # Explicit acks, not AckAll: after a failover the new leader's ack of a later message must not
        # implicitly ack commands that were delivered to the stale leader and never sequenced.
        cfg = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.opts.ack_wait_s,
                             max_ack_pending=20_000, max_deliver=-1)
        psub = await self.js.pull_subscribe(">", durable="core", stream=self.opts.cmd_stream, config=cfg)
        queue: asyncio.Queue[list[Any]] = asyncio.Queue(maxsize=_PREFETCH)
        depth_task = asyncio.create_task(self._poll_depth(psub), name="core-depth")
        fetch_task = asyncio.create_task(self._fetch_loop(psub, queue), name="core-fetch")
        publishing: asyncio.Task[None] | None = None
        try:
            while not self.stopping.is_set():
                if fetch_task.done():
                    fetch_task.result()  # a fetcher that died raises here
                    break
                try:
                    msgs = await asyncio.wait_for(queue.get(), 0.1)
                except TimeoutError:
                    continue
                while len(msgs) < self.opts.fetch_batch and not queue.empty():
                    msgs.extend(queue.get_nowait())
                staged = await self.sequence(self.decode_batch(msgs))
                if publishing is not None:
                    await publishing  # the previous batch's events go first; a fencing error stops us here
                    publishing = None
                if self.snapshot_due():  # drain the pipeline first: see maybe_snapshot
                    await self._publish_and_ack(staged, msgs)
                    await self.maybe_snapshot()
                else:
                    publishing = asyncio.create_task(self._publish_and_ack(staged, msgs), name="core-publish")
            if publishing is not None:
                await publishing
        finally:
            await stop_tasks([t for t in (fetch_task, depth_task, publishing) if t is not None])

    async def _fetch_loop(self, psub: Any, queue: asyncio.Queue[list[Any]]) -> None:
        while not self.stopping.is_set():
            try:
                msgs = await psub.fetch(self.opts.fetch_batch, timeout=0.05)
            except TimeoutError:
                continue
            except Exception as exc:
                if self.stopping.is_set():
                    return
                log.warning("fetch failed", extra={"error": f"{type(exc).__name__}: {exc}"})
                await asyncio.sleep(0.1)
                continue
            if msgs:
                await queue.put(msgs)

    async def _publish_and_ack(self, staged: _Staged | None, msgs: list[Any]) -> None:
        if staged is not None:
            await self.publish_staged(staged)
        for m in msgs:  # only now are the commands done (a plain publish each, not awaited)
            await m.ack()

    async def _poll_depth(self, psub: Any) -> None:
        while not self.stopping.is_set():  # not only cancel(): see core.aio.stop_tasks
            with contextlib.suppress(Exception):
                info = await psub.consumer_info()
                M_QUEUE.set(info.num_pending + info.num_ack_pending)
            await asyncio.sleep(1.0)

    def decode_batch(self, msgs: list[Any]) -> list[tuple[int, str, Command]]:
        items: list[tuple[int, str, Command]] = []
        now = time.time()
        for m in msgs:
            md = m.metadata
            M_CMD_WAIT.observe(now - md.timestamp.timestamp())
            src = int(md.sequence.stream)
            if self.state.seen(src):
                M_REDELIVERED.inc()
                continue
            try:
                cmd = decode_request(m.data)
            except msgspec.DecodeError as exc:
                log.error("undecodable command dropped", extra={"source_seq": src, "error": str(exc)})
                continue
            headers = m.headers or {}
            corr = headers.get("Nats-Msg-Id") or headers.get("Spotex-Correlation-Id") or f"cmd-src:{src}"
            items.append((src, corr, cmd))
        return items

    async def process(self, items: list[tuple[int, str, Command]]) -> list[Event]:
        """Sequence, apply, journal, WAL, publish — one batch. The caller acks the source after."""
        staged = await self.sequence(items)
        if staged is None:
            return []
        await self.publish_staged(staged)
        await self.maybe_snapshot()
        return staged.events

    async def sequence(self, items: list[tuple[int, str, Command]]) -> _Staged | None:
        """Stage 1: sequence and apply the batch, journal it (fenced) and commit it to the WAL."""
        if not items:
            return None
        assert self.wal is not None and self.token is not None
        t0 = time.perf_counter()
        token = self.token
        recs: list[JournalRecord] = []
        events: list[Event] = []
        ts = self.state.next_ts(self.clock())
        for src, corr, cmd in items:
            sc = SequencedCommand(seq=self.engine.last_seq + 1, ts_ms=ts, fencing_token=token,
                                  correlation_id=corr, command=cmd)
            rec = JournalRecord(src, sc)
            events.extend(apply_record(self.engine, self.state, rec))
            recs.append(rec)
            M_COMMANDS.labels(getattr(cmd, "symbol", None) or SYS_STREAM).inc()
        M_APPLY.observe(time.perf_counter() - t0)
        await self.journal(recs, token)  # 1. the replicated journal: fenced, a stale leader stops here
        await self.commit_wal(recs)  # 2. the local WAL, group commit
        self._remember(events)
        M_LAST_SEQ.set(self.engine.last_seq)
        M_BATCH.observe(len(recs))
        return _Staged(events, t0)

    def snapshot_due(self) -> bool:
        return self.engine.last_seq >= self.snapshot_due_at

    async def maybe_snapshot(self) -> None:
        """Snapshot when due. Only with every sequenced event on EVT: a recovery from this snapshot
        cannot regenerate the events inside it, so none of them may still need publishing."""
        if self.snapshot_due():
            await self.snapshot()

    async def publish_staged(self, staged: _Staged) -> None:
        """Stage 2: the batch's events to EVT, one message per stream (fenced)."""
        by_stream: dict[str, list[Event]] = {}
        for e in staged.events:
            by_stream.setdefault(e.symbol, []).append(e)
        await self._publish(by_stream)
        M_LOOP.observe(time.perf_counter() - staged.t0)

    async def journal(self, recs: list[JournalRecord], token: int) -> None:
        assert self.bus is not None
        try:
            await self.bus.append_journal(recs, token, self.opts.node_id)
        except FencingError as exc:
            self._fenced(exc, "journal")
            raise

    def wal_append(self, recs: list[JournalRecord]) -> None:
        assert self.wal is not None
        for rec in recs:
            self.wal.append(rec.cmd.seq, encode_record(rec))

    async def commit_wal(self, recs: list[JournalRecord]) -> None:
        assert self.wal is not None
        self.wal_append(recs)
        await asyncio.to_thread(self.wal.commit)

    async def _publish(self, by_stream: dict[str, list[Event]], *, reconcile: bool = False) -> None:
        assert self.bus is not None
        try:
            await self.bus.publish_events(by_stream, self.opts.node_id, reconcile=reconcile)
        except FencingError as exc:
            self._fenced(exc, "events")
            raise
        for stream, evs in by_stream.items():
            M_EVENTS.labels(stream).inc(len(evs))
            M_STREAM_SEQ.labels(stream).set(evs[-1].seq)
            trades = sum(1 for e in evs if isinstance(e, TradeExecuted))
            if trades:
                M_TRADES.labels(stream).inc(trades)
            M_CHECKPOINTS.inc(sum(1 for e in evs if isinstance(e, EngineCheckpoint)))

    def _fenced(self, exc: FencingError, what: str) -> None:
        self.fenced += 1
        M_FENCED.inc()
        self.last_error = str(exc)
        log.error("write refused: FENCING_TOKEN", extra={
            "code": "FENCING_TOKEN", "what": what, "node": self.opts.node_id, "fencing_token": self.token,
            "detail": str(exc)})
        self.stopping.set()

    async def snapshot(self) -> Path:
        from core.snapshot import list_snapshots, prune_snapshots
        from core.wal import retire_segments

        path = await asyncio.to_thread(take_snapshot, self.core_dir, self.engine, self.state)
        self.snapshot_due_at = self.engine.last_seq + self.opts.snapshot_every
        # Keep two snapshots; WAL segments go only once the older kept snapshot covers them.
        await asyncio.to_thread(prune_snapshots, self.core_dir / "snapshots", 2)
        snaps = list_snapshots(self.core_dir / "snapshots")
        if snaps:
            await asyncio.to_thread(retire_segments, self.core_dir / "wal", snaps[0][0])
        log.info("snapshot written", extra={"path": str(path), "seq": self.engine.last_seq})
        return path

    # ------------------------------------------------------------------------------------------
    # queries for the edge (request/reply, msgpack)

    async def _on_query(self, msg: Any) -> None:
        try:
            req = msgspec.msgpack.decode(msg.data)
            resp = self.answer(req)
        except Exception as exc:
            resp = {"error": f"{type(exc).__name__}: {exc}"}
        await msg.respond(msgspec.msgpack.encode(resp))

    def answer(self, req: dict[str, Any]) -> Any:
        op = req.get("op")
        e = self.engine
        if op == "status":
            return self.status()
        if op == "balances":
            return e.balances(int(req["account_id"]))
        if op == "open_orders":
            return e.open_orders(int(req["account_id"]), req.get("symbol"))
        if op == "order":
            if req.get("order_id") is not None:
                return e.order(int(req["order_id"]))
            return e.order_by_client_id(int(req["account_id"]), str(req["client_order_id"]))
        if op == "book":
            return e.book(str(req["symbol"]), int(req.get("depth", 20)))
        if op == "markets":
            return e.markets()
        raise ValueError(f"unknown op {op!r}")

    def status(self) -> dict[str, Any]:
        return {
            "node": self.opts.node_id,
            "role": self.role,
            "engine_impl": ENGINE_IMPL,  # "python", or "native" for the verified compiled build
            "last_seq": self.engine.last_seq,
            "fencing_token": self.token,
            "withdrawals_halted": self.engine.withdrawals_halted,
            "stream_seqs": dict(self.engine.stream_seqs()),
            "fenced": self.fenced,
            "divergence": self.divergence[-10:],
            "last_error": self.last_error,
            "recovered": self.recovered,
            "last_checkpoint": (list(self.own_checkpoints.items())[-1] if self.own_checkpoints else None),
            "market_mismatch": self.market_mismatch,
        }

    def _set_role(self, role: str) -> None:
        self.role = role
        M_LEADER.set(1 if role == "leader" else 0)
        if role != "leader":
            M_TOKEN.set(0)
        log.info("role", extra={"role": role, "node": self.opts.node_id, "last_seq": self.engine.last_seq})
        if self.on_role is not None:
            self.on_role(role)

    # ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Recover, then standby until the lease is ours, then lead until stopped or fenced."""
        await asyncio.to_thread(self.recover_local)
        if self.opts.freeze_heap:
            freeze_heap(log, "recovered")
        await self.connect()
        await self._watch_leader_checkpoints()
        try:
            await self.run_standby()
            if not self.stopping.is_set():
                await self.run_leader()
        except FencingError:
            pass  # already logged and counted; the process exits non-zero and restarts as standby
        finally:
            await self.close()

    async def close(self) -> None:
        if self.lease is not None and self.lease.held and self.last_error is None and not self.fenced:
            with contextlib.suppress(Exception):
                await self.lease.release()
        if self.wal is not None:
            with contextlib.suppress(Exception):
                self.wal.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):  # TimeoutError included: a stopping node does not wait on NATS
                await asyncio.wait_for(self.nc.close(), 5.0)
        self._set_role("stopped")
