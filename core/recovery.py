"""Recovery of a core node's state: the newest valid snapshot plus the WAL tail.

The WAL and the snapshots hold ``JournalRecord``s (a sequenced command plus the CMD stream
sequence it came from) and ``NodeSnapshot``s (the engine snapshot plus the sequencer's own small
state), so that a recovered node knows which CMD messages it already sequenced and never applies a
redelivered command twice.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from core.engine import Engine, replay_segment
from core.engine.replay import OUT_OF_ORDER
from core.snapshot import latest_valid_snapshot, write_snapshot
from core.wal import WalWriter, iter_records
from core.wire import Event, SequencedCommand

__all__ = [
    "JournalRecord",
    "NodeSnapshot",
    "NodeState",
    "Recovered",
    "decode_journal",
    "decode_record",
    "encode_journal",
    "encode_record",
    "recover",
    "take_snapshot",
]

log = logging.getLogger("core.recovery")

# How many CMD stream sequences a node remembers for de-duplicating redeliveries. A redelivery
# happens within the consumer's AckWait of the original delivery, far inside this window.
SOURCE_WINDOW = 500_000
# recover() keeps at most SOURCE_WINDOW + this many replayed (source seq, seq) pairs before it trims
# or folds them (memory bound); see _Replayer.
_FOLD_EVERY = 1 << 18


class JournalRecord(msgspec.Struct, frozen=True, array_like=True):
    source_seq: int  # CMD stream sequence; 0 for commands the core generated itself
    cmd: SequencedCommand


class NodeSnapshot(msgspec.Struct, frozen=True):
    engine: bytes
    last_ts_ms: int
    sources: list[tuple[int, int]]  # (source_seq, seq), oldest first


_enc = msgspec.msgpack.Encoder()
_rec_dec = msgspec.msgpack.Decoder(JournalRecord)
_journal_dec = msgspec.msgpack.Decoder(list[JournalRecord])
_snap_dec = msgspec.msgpack.Decoder(NodeSnapshot)


def encode_record(rec: JournalRecord) -> bytes:
    return _enc.encode(rec)


def decode_record(data: bytes) -> JournalRecord:
    return _rec_dec.decode(data)


def encode_journal(recs: list[JournalRecord]) -> bytes:
    return _enc.encode(recs)


def decode_journal(data: bytes) -> list[JournalRecord]:
    return _journal_dec.decode(data)


@dataclass
class NodeState:
    """Everything a node needs besides the engine: the sequencer's clock and dedupe window."""

    last_ts_ms: int = 0
    sources: OrderedDict[int, int] = field(default_factory=OrderedDict)

    def seen(self, source_seq: int) -> bool:
        return source_seq != 0 and source_seq in self.sources

    def record(self, rec: JournalRecord) -> None:
        if rec.cmd.ts_ms > self.last_ts_ms:
            self.last_ts_ms = rec.cmd.ts_ms
        if rec.source_seq:
            self.sources[rec.source_seq] = rec.cmd.seq
            if len(self.sources) > SOURCE_WINDOW:
                self.sources.popitem(last=False)

    def next_ts(self, now_ms: int) -> int:
        # Never goes backwards, whatever the wall clock does.
        return now_ms if now_ms > self.last_ts_ms else self.last_ts_ms


@dataclass
class Recovered:
    engine: Engine
    state: NodeState
    snapshot_seq: int
    replayed: int
    seconds: float  # the whole recovery: snapshot, writer (when asked for) and replay
    events: list[Event]  # events of the replayed records from ``events_from`` on
    replay_seconds: float = 0.0  # the replay loop alone
    replay_cpu_seconds: float = 0.0  # its process CPU time
    events_from: int = 0  # first seq whose events were built (last_seq + 1: none were)
    wal: WalWriter | None = None  # the writer ``open_wal`` opened, positioned after the last record


def apply_record(engine: Engine, state: NodeState, rec: JournalRecord) -> list[Event]:
    events = engine.apply(rec.cmd)
    state.record(rec)
    return events


def recover(
    core_dir: Path,
    *,
    checkpoint_every: int = 10_000,
    keep_events: bool = True,
    events_tail: int | None = None,
    open_wal: Callable[[int], WalWriter] | None = None,
    on_events: Callable[[list[Event]], None] | None = None,
    freeze: bool = False,
) -> Recovered:
    """Load the newest valid snapshot and replay the WAL after it.

    Events: with ``keep_events`` they are built and returned for every replayed record, or, with
    ``events_tail=N``, for the last N records only; the records before those are replayed with the
    engine's events off (same state, about a quarter cheaper per record). That is what a node
    needs: only the newest few batches can still be missing from EVT. Placing the boundary needs
    the WAL's end, which ``open_wal`` finds: it is called with the seq an empty log must start at
    (snapshot seq + 1) before the replay, and the writer it returns (which truncates a torn tail,
    as any writer does on opening) is handed back in ``Recovered.wal``, closed if recovery fails.
    Without ``keep_events`` and ``on_events`` nothing is built.

    ``freeze`` (a service process that freezes its heap after recovery anyway: core.obs.freeze_heap)
    moves everything the collector tracks, the replay's allocations included, out of its generations
    (``gc.freeze``, a list splice) before it is switched back on. Otherwise the first young
    collection after the replay walks every object it made (~60 ms after 1M records) and the
    service's full collection walks them again (~85 ms; with the freeze ~14 ms). Cyclic garbage
    that exists at that moment is then never collected (the replay makes none; the service's own
    start-up leaves little). Process-wide, so off for in-process callers.
    """
    t0 = time.perf_counter()
    snap_dir, wal_dir = core_dir / "snapshots", core_dir / "wal"
    snap_dir.mkdir(parents=True, exist_ok=True)
    wal_dir.mkdir(parents=True, exist_ok=True)
    loaded = latest_valid_snapshot(snap_dir)
    state = NodeState()
    if loaded is not None:
        snap = _snap_dec.decode(loaded.payload)
        engine = Engine.from_snapshot(snap.engine, checkpoint_every=checkpoint_every)
        state.last_ts_ms = snap.last_ts_ms
        state.sources = OrderedDict(snap.sources)
        snapshot_seq = loaded.seq
    else:
        engine = Engine(checkpoint_every=checkpoint_every)
        snapshot_seq = 0
    wal = open_wal(snapshot_seq + 1) if open_wal is not None else None
    # The replay allocates millions of objects and makes no reference cycles: the cyclic GC would
    # only walk the growing heap again and again (~7% of a compiled replay). Off for the loop.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        t_replay, c_replay = time.perf_counter(), time.process_time()
        replayed, events_from, events = _replay(engine, state, wal_dir, snapshot_seq,
                                                _events_from(keep_events or on_events is not None, events_tail, wal),
                                                keep_events, on_events)
        replay_seconds = time.perf_counter() - t_replay
        replay_cpu = time.process_time() - c_replay
    except BaseException:
        if wal is not None:
            wal.close()
        raise
    finally:
        if freeze:
            gc.freeze()
        if gc_was_on:
            gc.enable()
    seconds = time.perf_counter() - t0
    log.info(
        "recovered",
        extra={
            "snapshot_seq": snapshot_seq,
            "replayed": replayed,
            "seconds": round(seconds, 3),
            "last_seq": engine.last_seq,
            "events_from": events_from,
        },
    )
    return Recovered(engine, state, snapshot_seq, replayed, seconds, events, replay_seconds, replay_cpu, events_from,
                     wal)


def _events_from(wanted: bool, tail: int | None, wal: WalWriter | None) -> int:
    """The first seq whose events the replay builds."""
    if not wanted:
        return 1 << 62
    if tail is None:
        return 0
    if tail < 0:
        raise ValueError(f"events_tail must be >= 0, got {tail}")
    if wal is None:
        raise ValueError("events_tail needs open_wal: the writer finds where the WAL ends")
    return wal.last_seq - tail + 1


def _replay(
    engine: Engine,
    state: NodeState,
    wal_dir: Path,
    snapshot_seq: int,
    events_from: int,
    keep_events: bool,
    on_events: Callable[[list[Event]], None] | None,
) -> tuple[int, int, list[Event]]:
    r = _Replayer(engine, state, events_from if events_from > snapshot_seq + 1 else 0,
                  [] if keep_events else None, on_events)
    for seq, _payload in iter_records(wal_dir, snapshot_seq + 1, consume=r):
        # replay_segment takes every record the reader's check accepts; nothing is left to yield
        raise RuntimeError(f"WAL record {seq}: left over by the replay loop")
    engine.emit_events(True)  # the engine handed on always emits
    state.last_ts_ms = r.last_ts
    r.fold()
    return r.replayed, min(max(events_from, snapshot_seq + 1), engine.last_seq + 1), r.events or []


class _Replayer:
    """The WAL reader's consumer during recovery: each segment's records go to the engine's replay
    loop (core/engine/replay.py, compiled with the engine when it is), one call per segment.

    The sequencer's window is built from the replayed (source seq, seq) pairs afterwards, which gives
    exactly what NodeState.record would have built one record at a time. Source seqs normally rise
    (one leader sequences CMD in stream order); the loop says whether they all did, above every key
    already in the window. While they do, every key is new, so the window ends as the newest
    SOURCE_WINDOW pairs: the lists are only trimmed to that (a C-level slice delete) and the window
    is built once at the end, instead of inserting every pair into the OrderedDict and evicting the
    older half (~0.3 s of a million-record replay). From the first source seq that does not rise
    (redeliveries after a failover) the pairs are folded in order by _fold_sources."""

    def __init__(self, engine: Engine, state: NodeState, loud_at: int, events: list[Event] | None,
                 on_events: Callable[[list[Event]], None] | None) -> None:
        self.engine = engine
        self.state = state
        self.loud_at = loud_at  # the seq from which events are built; 0: from the start
        self.events = events
        self.on_events = on_events
        self.last_ts = state.last_ts_ms
        self.replayed = 0
        self.src_keys: list[int] = []  # (source_seq, seq) pairs of the replayed records, as two lists
        self.src_seqs: list[int] = []
        # the last source seq while they rise above the window's keys, else OUT_OF_ORDER
        self.last_src = max(state.sources, default=0)
        engine.emit_events(loud_at == 0)

    def __call__(self, data: bytes, off: int, expected: int, apply_from: int) -> tuple[int, int]:
        off, expected, self.last_ts, n, self.last_src = replay_segment(
            self.engine, data, off, expected, apply_from, self.loud_at, _rec_dec.decode, self.src_keys,
            self.src_seqs, self.events, self.on_events, self.last_ts, self.last_src,
        )
        self.replayed += n
        excess = len(self.src_keys) - SOURCE_WINDOW
        if self.last_src != OUT_OF_ORDER:
            if excess >= _FOLD_EVERY:  # bounded memory: the older pairs can no longer be in the window
                del self.src_keys[:excess]
                del self.src_seqs[:excess]
        elif len(self.src_keys) >= _FOLD_EVERY:
            self.fold()
        return off, expected

    def fold(self) -> None:
        """Fold the pairs replayed so far into ``state.sources`` and clear them."""
        keys, seqs, state = self.src_keys, self.src_seqs, self.state
        # After a trim the lists still start with SOURCE_WINDOW new rising keys, which evict
        # whatever state.sources holds before any later pair is folded: trimming changes nothing.
        if self.last_src != OUT_OF_ORDER and len(keys) >= SOURCE_WINDOW:
            state.sources = OrderedDict(zip(keys[-SOURCE_WINDOW:], seqs[-SOURCE_WINDOW:], strict=True))
        else:
            _fold_sources(state, keys, seqs)
        keys.clear()
        seqs.clear()


def _fold_sources(state: NodeState, keys: list[int], seqs: list[int]) -> None:
    """Add replayed (source_seq, seq) pairs to ``state.sources`` as NodeState.record would, one by
    one: a new key goes last and the oldest beyond SOURCE_WINDOW is dropped; a key seen again
    keeps its place. With unique keys that is simply the newest SOURCE_WINDOW pairs (checked and
    built with C-level set/dict operations only)."""
    if not keys:
        return
    have = state.sources
    if len(set(keys)) == len(keys) and have.keys().isdisjoint(keys):
        if len(keys) >= SOURCE_WINDOW:
            state.sources = OrderedDict(zip(keys[-SOURCE_WINDOW:], seqs[-SOURCE_WINDOW:], strict=True))
            return
        have.update(zip(keys, seqs, strict=True))
        while len(have) > SOURCE_WINDOW:
            have.popitem(last=False)
        return
    for k, v in zip(keys, seqs, strict=True):  # a repeated source_seq: the slow path is the definition
        have[k] = v
        if len(have) > SOURCE_WINDOW:
            have.popitem(last=False)


def take_snapshot(core_dir: Path, engine: Engine, state: NodeState) -> Path:
    payload = _enc.encode(
        NodeSnapshot(engine=engine.snapshot(), last_ts_ms=state.last_ts_ms, sources=list(state.sources.items()))
    )
    return write_snapshot(core_dir / "snapshots", engine.last_seq, payload)
