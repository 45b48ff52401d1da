"""Replay fast paths: they must give exactly what the one-record-at-a-time definitions give.

- the engine's deferred lookup cache of terminal orders (indexed at the first lookup, trimmed while
  nobody looks) answers every lookup as an engine that indexed each order as it went terminal;
- ``recover`` folds the sequencer's dedupe window in after the loop, which must equal
  ``NodeState.record`` applied record by record (trimming and repeated source seqs included);
- the engine with its events off (how recovery replays the older part of a WAL tail) leaves exactly
  the state, stream seqs and later events that the engine building every event leaves.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import msgspec
import pytest

from core import recovery
from core.engine import Engine
from core.recovery import JournalRecord, NodeState, encode_record, recover, take_snapshot
from core.sim import generate, sim_markets
from core.wal import WalCorruption, WalWriter
from core.wire import AddMarket, Command, PlaceOrder, SequencedCommand


def _stream(seed: int, n: int) -> list[SequencedCommand]:
    cmds: list[Command] = [AddMarket(config=m) for m in sim_markets()]
    cmds += generate(seed, n)
    return [SequencedCommand(seq=i, ts_ms=1_700_000_000_000 + i, fencing_token=1, correlation_id=f"c{i}",
                             command=c) for i, c in enumerate(cmds, 1)]


@pytest.mark.parametrize("cap", [0, 1, 7, 64, 10_000])
def test_deferred_recent_orders_answer_as_eager_indexing(cap: int) -> None:
    stream = _stream(3, 1_500)
    eager = Engine(recent_orders=cap)
    lazy = Engine(recent_orders=cap)
    coids: set[tuple[int, str]] = set()
    for i, sc in enumerate(stream):
        eager.apply(sc)
        eager.order(0)  # a lookup after every command indexes each terminal order at once
        lazy.apply(sc)
        c = sc.command
        if isinstance(c, PlaceOrder) and c.client_order_id:
            coids.add((c.account_id, c.client_order_id))
        if i % 500 == 250:  # and an occasional lookup mid-stream on the lazy one
            lazy.order(1)
    assert len(lazy._retired) <= lazy._retired_max
    last = stream[-1].seq
    found = 0
    for oid in range(1, last + 1):
        a = eager.order(oid)
        assert a == lazy.order(oid), oid
        found += a is not None and not eager.is_open(oid)
    for aid, coid in sorted(coids):
        assert eager.order_by_client_id(aid, coid) == lazy.order_by_client_id(aid, coid), (aid, coid)
    # The cache holds the last `cap` terminal orders (this stream retires ~800, more than 64).
    assert found == len(eager._recent) <= cap
    if cap <= 64:
        assert found == cap
    assert eager.state_hash() == lazy.state_hash()


def _write_wal(core_dir: Path, recs: list[JournalRecord], segment_bytes: int | None = None) -> None:
    kw = {} if segment_bytes is None else {"segment_bytes": segment_bytes}
    with WalWriter(core_dir / "wal", fsync=False, **kw) as wal:
        for r in recs:
            wal.append(r.cmd.seq, encode_record(r))
            if segment_bytes is not None and r.cmd.seq % 8 == 0:
                wal.commit()  # a segment rolls at a commit
        wal.commit()


@pytest.mark.parametrize("window", [5, 40, 10_000])
@pytest.mark.parametrize("repeat", [False, True])
@pytest.mark.parametrize("fold_every", [3, 50, 1 << 18])
def test_recovered_sources_equal_record_by_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  window: int, repeat: bool, fold_every: int) -> None:
    monkeypatch.setattr(recovery, "SOURCE_WINDOW", window)
    monkeypatch.setattr(recovery, "_FOLD_EVERY", fold_every)
    stream = _stream(5, 120)
    recs = []
    for sc in stream:
        src = 1_000 + sc.seq if sc.seq % 4 else 0  # some commands come from the core itself (0)
        if repeat and sc.seq in (30, 90):
            src = 1_000 + 11  # a source seq seen before: it keeps its place
        recs.append(JournalRecord(src, sc))
    _write_wal(tmp_path, recs)
    got = recover(tmp_path, keep_events=False)
    want = NodeState()
    for r in recs:
        want.record(r)
    assert got.state.last_ts_ms == want.last_ts_ms
    assert list(got.state.sources.items()) == list(want.sources.items())
    assert isinstance(got.state.sources, OrderedDict)


# (seq of a source seq seen before, how far back it was seen, seq from which one key repeats 15 times)
_DISORDER = {
    "rising": (None, 0, None),
    "repeat-in-snapshot": (20, 2, 30),
    "snapshot-key-first": (61, 3, None),  # the tail's first record repeats a key of the snapshot's window
    "repeat-mid": (300, 2, 310),
    "repeat-last": (598, 2, None),
    "repeat-after-run": (598, 20, 580),  # the first sight is followed by fewer new keys than the window
}


@pytest.mark.parametrize("window", [5, 40, 10_000, "tail"])
@pytest.mark.parametrize("case", sorted(_DISORDER))
@pytest.mark.parametrize("fold_every", [3, 50])
def test_recovered_sources_from_a_snapshot_over_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        window: int | str, case: str, fold_every: int) -> None:
    """The window a snapshot holds, then a WAL tail over many segments whose source seqs rise
    (trimmed, built once at the end) until a key seen before comes back: one the window may
    still hold (the first one of the tail: one of the snapshot's window), a key below the others,
    and a run of one key. Same result as record by record. ``window="tail"``: as many as the tail
    has sources, so a repeat at the tail's start is still inside the final window."""
    disorder_at, back, run_from = _DISORDER[case]
    stream = _stream(9, 600)
    cut = 60  # the snapshot covers seqs 1..cut
    recs = []
    for sc in stream:
        src = 5_000 + 3 * sc.seq if sc.seq % 5 else 0
        if sc.seq == disorder_at:  # a key seen before, not the newest in the window
            src = 5_000 + 3 * (sc.seq - back)
        elif disorder_at is not None and sc.seq == disorder_at + 7:
            src = 5_000 + 3 * (sc.seq - 1) + 1  # new, but below the one before it
        elif run_from is not None and run_from <= sc.seq < run_from + 15:
            src = 1_000_000  # one key again and again
        recs.append(JournalRecord(src, sc))
    monkeypatch.setattr(recovery, "SOURCE_WINDOW",
                        window if isinstance(window, int) else sum(1 for r in recs[cut:] if r.source_seq))
    monkeypatch.setattr(recovery, "_FOLD_EVERY", fold_every)
    want = NodeState()
    eng = Engine()
    for r in recs[:cut]:
        eng.apply(r.cmd)
        want.record(r)
    take_snapshot(tmp_path, eng, want)
    _write_wal(tmp_path, recs, segment_bytes=2_048)  # the covered segments are not retired yet
    assert len(list((tmp_path / "wal").glob("*.log"))) > 10
    got = recover(tmp_path, keep_events=False)
    for r in recs[cut:]:
        want.record(r)
    assert got.replayed == len(recs) - cut
    assert list(got.state.sources.items()) == list(want.sources.items())
    assert isinstance(got.state.sources, OrderedDict)


def test_recover_events_are_the_events_of_the_tail(tmp_path: Path) -> None:
    stream = _stream(7, 400)
    _write_wal(tmp_path, [JournalRecord(sc.seq, sc) for sc in stream])
    ref = Engine(checkpoint_every=100)
    want = [e for sc in stream for e in ref.apply(sc)]
    seen: list[int] = []
    got = recover(tmp_path, checkpoint_every=100, on_events=lambda evs: seen.append(len(evs)))
    assert got.events == want
    assert sum(seen) == len(want) and len(seen) == len(stream)
    assert got.engine.state_hash() == ref.state_hash()
    assert recover(tmp_path, checkpoint_every=100, keep_events=False).events == []


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_events_off_leaves_the_same_state_and_later_events(seed: int) -> None:
    stream = _stream(seed, 2_500)
    half = len(stream) // 2
    # The fencing token steps back for a while, so stale-command rejections are replayed silently too.
    stream = [msgspec.structs.replace(sc, fencing_token=0) if half - 200 < sc.seq < half - 150 else sc
              for sc in stream]
    loud, silent = Engine(checkpoint_every=97), Engine(checkpoint_every=97)
    silent.emit_events(False)
    assert not silent.emitting
    for sc in stream[:half]:
        loud.apply(sc)
        assert silent.apply(sc) == []
    assert silent.snapshot() == loud.snapshot()
    silent.emit_events(True)
    enc = msgspec.msgpack.Encoder()
    for sc in stream[half:]:
        assert enc.encode(silent.apply(sc)) == enc.encode(loud.apply(sc)), sc.seq
    assert silent.state_hash() == loud.state_hash()


def test_recover_builds_events_for_the_tail_it_is_asked_for(tmp_path: Path) -> None:
    stream = _stream(8, 600)
    _write_wal(tmp_path, [JournalRecord(sc.seq, sc) for sc in stream])
    ref = Engine(checkpoint_every=100)
    per_cmd = [ref.apply(sc) for sc in stream]
    opened: list[int] = []

    def open_wal(start_seq: int) -> WalWriter:
        opened.append(start_seq)
        return WalWriter(tmp_path / "wal", fsync=False, start_seq=start_seq)

    for tail in (0, 1, 150, 600, 5_000):
        got = recover(tmp_path, checkpoint_every=100, events_tail=tail, open_wal=open_wal)
        assert got.wal is not None and got.wal.last_seq == len(stream)
        got.wal.close()
        first = max(1, len(stream) - tail + 1)
        assert got.events_from == first
        assert got.events == [e for evs in per_cmd[first - 1:] for e in evs], tail
        assert got.engine.state_hash() == ref.state_hash()
        assert got.engine.emitting  # whatever the replay did, the engine handed on builds events
    assert opened == [1] * 5
    with pytest.raises(ValueError, match="open_wal"):
        recover(tmp_path, events_tail=10)
    # After a snapshot, the tail is counted from the WAL's end all the same.
    snap = recover(tmp_path, checkpoint_every=100, keep_events=False)
    take_snapshot(tmp_path, snap.engine, snap.state)
    more = _stream(8, 700)[len(stream):]
    with WalWriter(tmp_path / "wal", fsync=False) as wal:
        for sc in more:
            wal.append(sc.seq, encode_record(JournalRecord(sc.seq, sc)))
        wal.commit()
    per_cmd += [ref.apply(sc) for sc in more]
    got = recover(tmp_path, checkpoint_every=100, events_tail=30, open_wal=open_wal)
    assert opened[-1] == len(stream) + 1 and got.replayed == len(more)
    assert got.wal is not None
    got.wal.close()
    assert got.events == [e for evs in per_cmd[-30:] for e in evs]
    assert got.engine.state_hash() == ref.state_hash()


def test_a_failed_recovery_closes_the_writer_it_opened(tmp_path: Path) -> None:
    stream = _stream(9, 50)
    _write_wal(tmp_path, [JournalRecord(sc.seq, sc) for sc in stream])
    wals: list[WalWriter] = []

    def open_wal(start_seq: int) -> WalWriter:
        wals.append(WalWriter(tmp_path / "wal", fsync=False, start_seq=start_seq))
        return wals[-1]

    with pytest.raises(ValueError, match="events_tail must be >= 0"):
        recover(tmp_path, events_tail=-1, open_wal=open_wal)
    assert len(wals) == 1
    WalWriter(tmp_path / "wal", fsync=False).close()  # the lock is free again


def test_recover_stops_where_the_reader_says(tmp_path: Path) -> None:
    """The replay loop takes the records the WAL reader's check accepts and leaves the rest to the
    reader: a torn last record is left out (read-only recovery), damage before the end stops
    recovery with the file and offset named, and nothing after the damage is applied."""
    stream = _stream(10, 300)
    _write_wal(tmp_path, [JournalRecord(sc.seq, sc) for sc in stream])
    seg = sorted((tmp_path / "wal").glob("wal-*.log"))[-1]
    whole = seg.read_bytes()
    ref = Engine()
    for sc in stream[:-1]:
        ref.apply(sc)
    seg.write_bytes(whole[:-7])  # the last record torn
    got = recover(tmp_path, keep_events=False)
    assert got.replayed == len(stream) - 1
    assert got.engine.state_hash() == ref.state_hash()
    # one flipped payload byte in the middle: corruption, named, not a torn tail
    mid = len(whole) // 2
    seg.write_bytes(whole[:mid] + bytes([whole[mid] ^ 0x55]) + whole[mid + 1:])
    with pytest.raises(WalCorruption) as exc:
        recover(tmp_path, keep_events=False)
    assert str(seg) in str(exc.value) and exc.value.offset <= mid


def test_freeze_moves_the_replayed_heap_out_of_the_collector_only_when_asked(tmp_path: Path) -> None:
    import gc

    stream = _stream(3, 300)
    _write_wal(tmp_path, [JournalRecord(sc.seq, sc) for sc in stream])
    assert gc.get_freeze_count() == 0  # nothing in the test process freezes its heap
    try:
        plain = recover(tmp_path, checkpoint_every=100, keep_events=False)
        assert gc.get_freeze_count() == 0 and gc.isenabled()
        frozen = recover(tmp_path, checkpoint_every=100, keep_events=False, freeze=True)
        # the replayed books and orders are frozen (at least one tracked object per order), the
        # collector is on again, and the state is the same
        assert gc.get_freeze_count() >= frozen.engine.open_order_count() > 0
        assert gc.isenabled()
        assert frozen.engine.state_hash() == plain.engine.state_hash()
    finally:
        gc.unfreeze()
