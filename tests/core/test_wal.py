"""Write-ahead log: format, group commit, recovery rules, retirement, crash behaviour."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from core import wal
from core.wal import (
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    WalCorruption,
    WalError,
    WalSequenceError,
    WalWriter,
    WalWriterFailed,
    encode_record,
    iter_records,
    list_segments,
    retire_segments,
    scan,
    truncate_tail,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def payload_for(seq: int) -> bytes:
    # Varying sizes (including empty) so record boundaries land everywhere.
    return (f"cmd-{seq}:".encode() * (seq % 13))[: (seq * 7) % 97]


def write_log(directory: Path, n: int, *, batch: int = 10, segment_bytes: int = 1 << 20) -> None:
    with WalWriter(directory, segment_bytes=segment_bytes) as w:
        for seq in range(1, n + 1):
            w.append(seq, payload_for(seq))
            if seq % batch == 0:
                w.commit()
        w.commit()


def read_all(directory: Path, from_seq: int = 1) -> list[tuple[int, bytes]]:
    return list(iter_records(directory, from_seq))


def expected(first: int, last: int) -> list[tuple[int, bytes]]:
    return [(s, payload_for(s)) for s in range(first, last + 1)]


def record_offsets(path: Path) -> list[tuple[int, int]]:
    """(offset, total length) of each record in a well-formed segment."""
    data = path.read_bytes()
    out = []
    off = SEGMENT_HEADER_SIZE
    while off < len(data):
        length = int.from_bytes(data[off + 4 : off + 8], "little")
        out.append((off, RECORD_HEADER_SIZE + length))
        off += RECORD_HEADER_SIZE + length
    return out


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


# --------------------------------------------------------------------------------------------
# round trip, resume, sequencing


def test_round_trip_across_segment_rollover(tmp_path: Path) -> None:
    write_log(tmp_path, 2000, batch=17, segment_bytes=4096)
    segments = list_segments(tmp_path)
    assert len(segments) > 10
    assert segments[0][1].name == "wal-00000000000000000001.log"
    for _, path in segments:
        assert path.stat().st_size <= 4096  # no batch here is larger than a segment
    assert read_all(tmp_path) == expected(1, 2000)
    # from_seq in the middle of a segment, at a segment start, and past the end
    assert read_all(tmp_path, 1234) == expected(1234, 2000)
    second_first = segments[1][0]
    assert read_all(tmp_path, second_first) == expected(second_first, 2000)
    assert read_all(tmp_path, 2001) == []
    info = scan(tmp_path)
    assert (info.first_seq, info.last_seq, info.segments, info.records) == (1, 2000, len(segments), 2000)
    assert info.bytes == sum(p.stat().st_size for _, p in segments)
    assert info.torn_tail_bytes == 0


def test_segment_header_and_record_layout(tmp_path: Path) -> None:
    with WalWriter(tmp_path) as w:
        w.append(1, b"hello")
        w.commit()
    data = (tmp_path / "wal-00000000000000000001.log").read_bytes()
    assert data[:8] == wal.SEGMENT_MAGIC
    assert data[SEGMENT_HEADER_SIZE:] == encode_record(1, b"hello")
    assert len(data) == SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 5


def test_resume_appending_after_reopen(tmp_path: Path) -> None:
    write_log(tmp_path, 300, segment_bytes=2048)
    with WalWriter(tmp_path, segment_bytes=2048) as w:
        assert w.last_seq == 300
        assert w.next_seq == 301
        for seq in range(301, 451):
            w.append(seq, payload_for(seq))
        w.commit()
    with WalWriter(tmp_path, segment_bytes=2048) as w:
        assert w.last_seq == 450
    assert read_all(tmp_path) == expected(1, 450)


def test_append_rejects_seq_discontinuity(tmp_path: Path) -> None:
    with WalWriter(tmp_path) as w:
        with pytest.raises(WalSequenceError):
            w.append(2, b"x")  # the log starts at 1
        w.append(1, b"a")
        with pytest.raises(WalSequenceError):
            w.append(1, b"dup")
        with pytest.raises(WalSequenceError):
            w.append(3, b"gap")
        w.append(2, b"b")  # the writer is still usable after a rejected append
        w.commit()
    with WalWriter(tmp_path) as w, pytest.raises(ValueError):  # WalSequenceError is a ValueError
        w.append(5, b"x")
    assert read_all(tmp_path) == [(1, b"a"), (2, b"b")]


def test_start_seq_for_an_empty_directory(tmp_path: Path) -> None:
    with WalWriter(tmp_path, start_seq=1001) as w:
        assert w.last_seq == 1000
        w.append(1001, b"first after snapshot")
        w.commit()
    assert read_all(tmp_path, 1001) == [(1001, b"first after snapshot")]
    assert scan(tmp_path).first_seq == 1001
    with pytest.raises(WalError, match="before seq 1001"):
        read_all(tmp_path, 1)
    # start_seq is ignored once the directory has a log
    with WalWriter(tmp_path, start_seq=5) as w:
        assert w.next_seq == 1002


def test_group_commit_counts_and_hook(tmp_path: Path) -> None:
    calls: list[tuple[float, int]] = []
    with WalWriter(tmp_path, on_commit=lambda s, n: calls.append((s, n))) as w:
        w.commit()  # nothing buffered: no write, no hook
        assert calls == []
        for seq in range(1, 101):
            w.append(seq, b"p")
        assert w.buffered_records == 100 and w.appended_seq == 100 and w.last_seq == 0
        size_before = w.active_segment.stat().st_size
        assert size_before == SEGMENT_HEADER_SIZE  # append only buffers
        w.commit()
        assert w.last_seq == 100 and w.buffered_records == 0
        assert w.last_commit_records == 100
        assert w.last_commit_seconds >= w.last_sync_seconds >= 0.0
    assert len(calls) == 1
    assert calls[0][1] == 100 and calls[0][0] > 0


def test_one_write_and_one_fdatasync_per_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with WalWriter(tmp_path) as w:
        writes: list[int] = []
        syncs: list[int] = []
        real_write, real_sync = os.write, wal._fdatasync

        def counting_write(fd: int, data: bytes) -> int:
            writes.append(len(data))
            return real_write(fd, data)

        def counting_sync(fd: int) -> None:
            syncs.append(fd)
            real_sync(fd)

        monkeypatch.setattr("core.wal.os.write", counting_write)
        monkeypatch.setattr(wal, "_fdatasync", counting_sync)
        for seq in range(1, 257):
            w.append(seq, b"x" * 100)
        w.commit()
        assert len(writes) == 1 and writes[0] == 256 * (RECORD_HEADER_SIZE + 100)
        assert len(syncs) == 1


def test_close_commits_buffer_and_exception_abandons_it(tmp_path: Path) -> None:
    w = WalWriter(tmp_path)
    w.append(1, b"a")
    w.close()
    w.close()  # idempotent
    with pytest.raises(WalError):
        w.append(2, b"b")
    with pytest.raises(RuntimeError), WalWriter(tmp_path) as w2:
        w2.append(2, b"b")
        raise RuntimeError("engine blew up mid-batch")
    assert read_all(tmp_path) == [(1, b"a")]


def test_second_writer_is_locked_out(tmp_path: Path) -> None:
    with WalWriter(tmp_path) as w:
        w.append(1, b"a")
        w.commit()
        with pytest.raises(WalError, match="locked"):
            WalWriter(tmp_path)
        with pytest.raises(WalError, match="locked"):
            list(iter_records(tmp_path, repair=True))
        assert read_all(tmp_path) == [(1, b"a")]  # plain readers need no lock
    with WalWriter(tmp_path) as w:
        assert w.last_seq == 1


def test_leftover_segment_temp_file_is_ignored_and_cleaned(tmp_path: Path) -> None:
    write_log(tmp_path, 20)
    tmp = tmp_path / ("wal-00000000000000000021.log" + ".tmp")
    tmp.write_bytes(b"SPXW")  # crash while creating the next segment
    assert read_all(tmp_path) == expected(1, 20)
    with WalWriter(tmp_path) as w:
        assert w.last_seq == 20
    assert not tmp.exists()


# --------------------------------------------------------------------------------------------
# torn tails


@pytest.mark.parametrize("segment_bytes", [1 << 20, 700])
def test_torn_tail_at_every_byte_offset_of_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, segment_bytes: int
) -> None:
    """Every truncation length of the last record: the reader stops before it, the writer
    truncates it, earlier records survive and appending continues at the same seq."""
    n = 60
    pristine = tmp_path / "pristine"
    write_log(pristine, n, batch=7, segment_bytes=segment_bytes)
    last_path = list_segments(pristine)[-1][1]
    last_off, last_len = record_offsets(last_path)[-1]
    assert last_len > RECORD_HEADER_SIZE + 10
    for cut in range(1, last_len + 1):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(pristine, d)
        seg = d / last_path.name
        assert truncate_tail(d, cut) == cut
        torn_size = seg.stat().st_size
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="core.wal"):
            assert read_all(d) == expected(1, n - 1)
        assert seg.stat().st_size == torn_size  # a plain reader never modifies the log
        if cut < last_len:
            assert any(seg.name in r.getMessage() and f"offset={last_off}" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="core.wal"), WalWriter(d, segment_bytes=segment_bytes) as w:
            assert w.last_seq == n - 1
            assert seg.stat().st_size == last_off
            w.append(n, b"rewritten")
            w.append(n + 1, payload_for(n + 1))
            w.commit()
        if cut < last_len:
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1
            assert str(seg) in warnings[0] and f"offset={last_off}" in warnings[0]
        assert read_all(d) == [*expected(1, n - 1), (n, b"rewritten"), (n + 1, payload_for(n + 1))]
        shutil.rmtree(d)


def test_checksum_mismatch_in_the_very_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    write_log(tmp_path, 30)
    seg = list_segments(tmp_path)[-1][1]
    last_off, last_len = record_offsets(seg)[-1]
    flip_byte(seg, last_off + last_len - 1)  # payload byte
    assert read_all(tmp_path) == expected(1, 29)
    assert scan(tmp_path).torn_tail_bytes == last_len
    with WalWriter(tmp_path) as w:
        assert w.last_seq == 29
    assert seg.stat().st_size == last_off
    # damage to the last record's header is bit rot, not a tear: its length cannot be trusted
    # to say the record ends at EOF, so it is reported rather than truncated
    write_log(tmp_path / "b", 30)
    seg = list_segments(tmp_path / "b")[-1][1]
    flip_byte(seg, last_off + 12)
    with pytest.raises(WalCorruption, match="header checksum") as exc_info:
        read_all(tmp_path / "b")
    assert exc_info.value.offset == last_off


def test_length_flip_pointing_exactly_at_eof_is_not_a_tear(tmp_path: Path) -> None:
    """Records of a power-of-two size: one flipped length bit in the second-to-last record makes
    it end exactly at EOF. Truncating there would drop an acknowledged record."""
    with WalWriter(tmp_path) as w:
        for seq in range(1, 11):
            w.append(seq, b"p" * (128 - RECORD_HEADER_SIZE))
        w.commit()
    seg = list_segments(tmp_path)[-1][1]
    off, _ = record_offsets(seg)[-2]
    with open(seg, "r+b") as f:
        f.seek(off + 4)
        f.write((128 - RECORD_HEADER_SIZE + 128).to_bytes(4, "little"))
    with pytest.raises(WalCorruption) as exc_info:
        WalWriter(tmp_path)
    assert exc_info.value.offset == off
    assert seg.stat().st_size == SEGMENT_HEADER_SIZE + 10 * 128


def test_zero_filled_tail_is_a_torn_tail(tmp_path: Path) -> None:
    """After a power loss the file size can be persisted before the data: zeros at the end."""
    write_log(tmp_path, 30)
    seg = list_segments(tmp_path)[-1][1]
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"\0" * 1000)
    assert read_all(tmp_path) == expected(1, 30)
    with WalWriter(tmp_path) as w:
        assert w.last_seq == 30
    assert seg.stat().st_size == size
    # zeros over the last record's payload and beyond
    last_off, last_len = record_offsets(seg)[-1]
    with open(seg, "r+b") as f:
        f.seek(last_off + RECORD_HEADER_SIZE)
        f.write(b"\0" * (last_len - RECORD_HEADER_SIZE + 500))
    assert read_all(tmp_path) == expected(1, 29)
    # zeros from the middle of the last record's header on (a page boundary inside the header)
    with open(seg, "r+b") as f:
        f.seek(last_off + 5)
        f.write(b"\0" * (RECORD_HEADER_SIZE - 5))
    assert read_all(tmp_path) == expected(1, 29)
    with WalWriter(tmp_path) as w:
        assert w.last_seq == 29
    assert seg.stat().st_size == last_off


def test_torn_first_record_of_a_fresh_segment(tmp_path: Path) -> None:
    with WalWriter(tmp_path, segment_bytes=200) as w:
        for seq in range(1, 6):
            w.append(seq, b"x" * 90)
            w.commit()
    segments = list_segments(tmp_path)
    assert len(segments) == 5
    truncate_tail(tmp_path, 5)
    assert read_all(tmp_path) == [(s, b"x" * 90) for s in range(1, 5)]
    with WalWriter(tmp_path, segment_bytes=200) as w:
        assert w.last_seq == 4
        assert w.active_segment == segments[-1][1]  # reuses the now empty segment
        w.append(5, b"again")
        w.commit()
    assert read_all(tmp_path)[-1] == (5, b"again")


# --------------------------------------------------------------------------------------------
# corruption


def test_corrupt_payload_in_the_middle_raises_naming_file_and_offset(tmp_path: Path) -> None:
    write_log(tmp_path, 50)
    seg = list_segments(tmp_path)[-1][1]
    off, length = record_offsets(seg)[20]
    flip_byte(seg, off + length - 1)
    size = seg.stat().st_size
    for attempt in (lambda: read_all(tmp_path), lambda: scan(tmp_path), lambda: WalWriter(tmp_path)):
        with pytest.raises(WalCorruption) as exc_info:
            attempt()
        err = exc_info.value
        assert err.path == seg and err.offset == off
        assert seg.name in str(err) and f"offset {off}" in str(err)
    assert seg.stat().st_size == size  # corruption is never "repaired" by truncation
    # records before the damage can still be read up to the point of failure
    got = []
    with pytest.raises(WalCorruption):
        for rec in iter_records(tmp_path):
            got.append(rec)
    assert got == expected(1, 20)


def test_corrupt_length_in_the_middle_is_not_mistaken_for_a_torn_tail(tmp_path: Path) -> None:
    """A damaged length could point past EOF and look like a short last record; the header
    checksum tells them apart so acknowledged records are not truncated away."""
    write_log(tmp_path, 50)
    seg = list_segments(tmp_path)[-1][1]
    off, _ = record_offsets(seg)[10]
    with open(seg, "r+b") as f:
        f.seek(off + 4)
        f.write((10_000_000).to_bytes(4, "little"))
    with pytest.raises(WalCorruption, match="header checksum") as exc_info:
        read_all(tmp_path)
    assert exc_info.value.offset == off
    with pytest.raises(WalCorruption):
        WalWriter(tmp_path)


def test_every_single_byte_flip_before_the_last_record_is_detected(tmp_path: Path) -> None:
    pristine = tmp_path / "p"
    write_log(pristine, 8)
    seg_name = list_segments(pristine)[-1][1].name
    offsets = record_offsets(pristine / seg_name)
    last_off = offsets[-1][0]
    d = tmp_path / "d"
    header_crc_bytes = {o + i for o, _ in offsets for i in range(4)}
    for pos in range(0, last_off):
        shutil.copytree(pristine, d)
        flip_byte(d / seg_name, pos)
        if pos in header_crc_bytes:
            # the record itself is intact; readers skip this check, the audit (scan) does not
            assert read_all(d) == expected(1, 8)
            with pytest.raises(WalCorruption, match="header checksum") as exc_info:
                scan(d)
        else:
            with pytest.raises(WalCorruption) as exc_info:
                read_all(d)
        # the offset names the segment header or the start of the damaged record
        assert exc_info.value.offset in {0} | {o for o, _ in offsets}
        assert exc_info.value.offset <= pos
        shutil.rmtree(d)


def test_corruption_in_a_non_last_segment(tmp_path: Path) -> None:
    write_log(tmp_path, 400, segment_bytes=2048)
    segments = list_segments(tmp_path)
    assert len(segments) >= 3
    first_seg = segments[0][1]
    # a checksum mismatch in the very last record of a segment that is not the last one
    last_off, last_len = record_offsets(first_seg)[-1]
    flip_byte(first_seg, last_off + last_len - 1)
    with pytest.raises(WalCorruption, match="not the last") as exc_info:
        read_all(tmp_path)
    assert exc_info.value.path == first_seg and exc_info.value.offset == last_off
    flip_byte(first_seg, last_off + last_len - 1)  # undo
    assert read_all(tmp_path) == expected(1, 400)
    # a short (torn-looking) tail in a non-last segment is corruption too
    os.truncate(first_seg, first_seg.stat().st_size - 3)
    with pytest.raises(WalCorruption, match="not the last") as exc_info:
        read_all(tmp_path)
    assert exc_info.value.path == first_seg
    assert scan_raises(tmp_path)


def scan_raises(directory: Path) -> bool:
    try:
        scan(directory)
    except WalCorruption:
        return True
    return False


def test_seq_discontinuity_on_disk(tmp_path: Path) -> None:
    # a missing middle segment
    write_log(tmp_path / "a", 400, segment_bytes=2048)
    segments = list_segments(tmp_path / "a")
    os.unlink(segments[1][1])
    with pytest.raises(WalCorruption, match="discontinuity") as exc_info:
        read_all(tmp_path / "a")
    assert exc_info.value.path == segments[2][1] and exc_info.value.offset == 0
    # a well-formed record carrying the wrong seq
    write_log(tmp_path / "b", 10)
    seg = list_segments(tmp_path / "b")[-1][1]
    with open(seg, "ab") as f:
        f.write(encode_record(12, b"skips 11"))
        f.write(encode_record(13, b"more"))
    size_before = seg.stat().st_size
    with pytest.raises(WalCorruption, match="expected 11, found 12"):
        read_all(tmp_path / "b")
    with pytest.raises(WalCorruption):
        WalWriter(tmp_path / "b")
    assert seg.stat().st_size == size_before
    # even as the very last record: a valid record with a wrong seq is not a tear
    write_log(tmp_path / "c", 10)
    with open(list_segments(tmp_path / "c")[-1][1], "ab") as f:
        f.write(encode_record(12, b"skips 11"))
    with pytest.raises(WalCorruption, match="expected 11, found 12"):
        read_all(tmp_path / "c")


def test_bad_segment_header(tmp_path: Path) -> None:
    write_log(tmp_path, 10)
    seg = list_segments(tmp_path)[-1][1]
    flip_byte(seg, 2)
    with pytest.raises(WalCorruption, match="magic") as exc_info:
        read_all(tmp_path)
    assert exc_info.value.offset == 0
    flip_byte(seg, 2)
    renamed = tmp_path / "wal-00000000000000000005.log"
    seg.rename(renamed)  # header says 1, name says 5
    with pytest.raises(WalCorruption, match="file name"):
        read_all(tmp_path, 5)


# --------------------------------------------------------------------------------------------
# retirement


def test_retire_segments_respects_covered_seq(tmp_path: Path) -> None:
    write_log(tmp_path, 500, segment_bytes=2048)
    segments = list_segments(tmp_path)
    firsts = [f for f, _ in segments]
    assert len(firsts) >= 4
    # covered_seq one short of the end of the first segment: nothing goes
    assert retire_segments(tmp_path, firsts[1] - 2) == []
    # exactly the end of the second segment: the first two go
    removed = retire_segments(tmp_path, firsts[2] - 1)
    assert removed == [segments[0][1], segments[1][1]]
    assert list_segments(tmp_path) == segments[2:]
    assert read_all(tmp_path, firsts[2]) == expected(firsts[2], 500)
    with pytest.raises(WalError, match="not in the log"):
        read_all(tmp_path, firsts[2] - 1)
    assert scan(tmp_path).first_seq == firsts[2]
    # everything covered: the active (last) segment stays, and appending continues
    retire_segments(tmp_path, 10_000)
    assert list_segments(tmp_path) == segments[-1:]
    with WalWriter(tmp_path, segment_bytes=2048) as w:
        assert w.last_seq == 500
        w.append(501, payload_for(501))
        w.commit()
    assert read_all(tmp_path, firsts[-1]) == expected(firsts[-1], 501)


def test_retire_keeps_an_empty_active_segment(tmp_path: Path) -> None:
    with WalWriter(tmp_path, segment_bytes=200) as w:
        for seq in range(1, 4):
            w.append(seq, b"x" * 150)
            w.commit()
    truncate_tail(tmp_path, 170)  # last segment now holds only its header
    retire_segments(tmp_path, 3)
    segments = list_segments(tmp_path)
    assert len(segments) == 1 and segments[0][0] == 3
    with WalWriter(tmp_path, segment_bytes=200) as w:
        assert w.last_seq == 2 and w.next_seq == 3


# --------------------------------------------------------------------------------------------
# crash injection hooks (deterministic simulation)


def test_crash_before_write_loses_only_unacknowledged_records(tmp_path: Path) -> None:
    w = WalWriter(tmp_path)
    for seq in range(1, 11):
        w.append(seq, b"c")
    w.commit()
    for seq in range(11, 21):
        w.append(seq, b"u")
    w.abandon()  # crash before write
    assert [s for s, _ in read_all(tmp_path)] == list(range(1, 11))
    with WalWriter(tmp_path) as w2:
        assert w2.last_seq == 10


def test_crash_after_write_before_fsync(tmp_path: Path) -> None:
    # process crash: the page cache survives, the records are there and become durable on reopen
    w = WalWriter(tmp_path)
    for seq in range(1, 11):
        w.append(seq, b"c")
    w.commit()
    synced = w.synced_bytes
    for seq in range(11, 21):
        w.append(seq, b"w")
    w.write_buffer()
    assert w.last_seq == 10 and w.buffered_records == 0
    w.abandon()
    assert [s for s, _ in read_all(tmp_path)] == list(range(1, 21))
    # power loss instead: whatever was not fdatasync'ed may vanish, wholly or in part
    for lost in (w.active_segment.stat().st_size - synced, 7):
        d = tmp_path / f"power{lost}"
        shutil.copytree(tmp_path, d, ignore=shutil.ignore_patterns("power*", "wal.lock"))
        truncate_tail(d, lost)
        with WalWriter(d) as w2:
            assert w2.last_seq >= 10
            assert w2.last_seq == (10 if lost > 7 else 19)


def test_fault_hook_simulates_crash_at_each_point(tmp_path: Path) -> None:
    for point, survivors in (("before_write", 10), ("after_write", 20), ("after_sync", 20)):
        d = tmp_path / point

        def fault(p: str, point: str = point) -> None:
            if p == point:
                raise RuntimeError(f"crash at {p}")

        w = WalWriter(d, fault=fault)
        w._fault = None  # let the first batch through
        for seq in range(1, 11):
            w.append(seq, b"a")
        w.commit()
        w._fault = fault
        for seq in range(11, 21):
            w.append(seq, b"b")
        with pytest.raises(RuntimeError, match=f"crash at {point}"):
            w.commit()
        assert w.failed
        with pytest.raises(WalWriterFailed):
            w.append(21, b"c")
        w.abandon()
        assert scan(d).last_seq == survivors


def test_crash_right_after_segment_roll(tmp_path: Path) -> None:
    def fault(p: str) -> None:
        if p == "after_roll":
            raise RuntimeError("crash after roll")

    w = WalWriter(tmp_path, segment_bytes=300, fault=fault)
    w.append(1, b"x" * 200)
    w.commit()
    w.append(2, b"y" * 200)
    with pytest.raises(RuntimeError):
        w.commit()
    w.abandon()
    assert [f for f, _ in list_segments(tmp_path)] == [1, 2]
    assert read_all(tmp_path) == [(1, b"x" * 200)]
    with WalWriter(tmp_path, segment_bytes=300) as w2:
        assert w2.last_seq == 1
        w2.append(2, b"z")
        w2.commit()
    assert read_all(tmp_path) == [(1, b"x" * 200), (2, b"z")]


def test_fdatasync_failure_poisons_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = WalWriter(tmp_path)
    w.append(1, b"a")

    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(wal, "_fdatasync", eio)
    with pytest.raises(OSError):
        w.commit()
    assert w.last_seq == 0  # never reported durable
    monkeypatch.undo()
    # retrying fdatasync after a failure can lie (the kernel may have dropped the pages): refuse
    with pytest.raises(WalWriterFailed):
        w.commit()
    w.close()  # releases the lock without writing
    with WalWriter(tmp_path) as w2:
        assert w2.last_seq in (0, 1)


# --------------------------------------------------------------------------------------------
# real crash


CHILD = r"""
import sys
from core.wal import WalWriter

directory, start_seed = sys.argv[1], int(sys.argv[2])
import random
rng = random.Random(start_seed)
w = WalWriter(directory, segment_bytes=64 * 1024)
seq = w.last_seq
print(f"start {seq}", flush=True)
while True:
    for _ in range(rng.randint(1, 50)):
        seq += 1
        w.append(seq, (b"%d|" % seq) * (seq % 11 + 1))
    w.commit()
    print(seq, flush=True)
"""


def test_kill_9_loses_no_acknowledged_record(tmp_path: Path) -> None:
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    acknowledged = 0
    for round_no in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(round_no)],
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=env,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert first.startswith("start "), first
        # the child resumes exactly where the acknowledged (and possibly more) records end
        assert int(first.split()[1]) >= acknowledged
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        lines = out.decode().split("\n")
        complete = [int(x) for x in lines[:-1] if x]  # the last piece may be a partial line
        if complete:
            acknowledged = max(acknowledged, complete[-1])
        records = list(iter_records(tmp_path))
        seqs = [s for s, _ in records]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) >= acknowledged, f"round {round_no}: acknowledged {acknowledged}, found {len(seqs)}"
        for s, p in records:
            assert p == (b"%d|" % s) * (s % 11 + 1)
    assert acknowledged > 0
    info = scan(tmp_path)
    assert info.segments > 1
    with WalWriter(tmp_path, segment_bytes=64 * 1024) as w:
        w.append(w.next_seq, b"after the crashes")
        w.commit()
    assert scan(tmp_path).last_seq == info.last_seq + 1


# --------------------------------------------------------------------------------------------
# the bulk consumer path (recovery's replay loop) reads segments a chunk at a time


def _collecting_consumer(taken: list[tuple[int, bytes]]) -> wal.Consumer:
    """A consumer with the replay loop's check: takes records while seq, bounds and payload
    checksum hold, from ``yield_from`` on."""

    def consume(data: bytes, off: int, expected: int, yield_from: int) -> tuple[int, int]:
        hs = RECORD_HEADER_SIZE
        while len(data) - off >= hs:
            _hcrc, length, pcrc, seq = wal.RECORD_HEADER.unpack_from(data, off)
            end = off + hs + length
            if seq != expected or end > len(data) or zlib.crc32(data[off + 12 : end]) != pcrc:
                break
            if seq >= yield_from:
                taken.append((seq, data[off + hs : end]))
            expected, off = seq + 1, end
        return off, expected

    return consume


def _outcome(d: Path, from_seq: int, consume: bool, caplog: pytest.LogCaptureFixture) -> tuple[object, ...]:
    taken: list[tuple[int, bytes]] = []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="core.wal"):
        try:
            if consume:
                left = list(iter_records(d, from_seq, consume=_collecting_consumer(taken)))
                assert left == []  # the consumer takes every record the reader's check accepts
            else:
                for rec in iter_records(d, from_seq):  # what was yielded before an error counts too
                    taken.append(rec)
            err: tuple[object, ...] | None = None
        except WalCorruption as exc:
            err = (type(exc).__name__, str(exc), exc.offset)
    return taken, err, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("chunk", [1, 50, 333, 1 << 20])
def test_the_chunked_consumer_path_reads_what_the_reader_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture, chunk: int) -> None:
    """Whatever the damage, handing segments to a consumer a chunk at a time (records spanning
    chunks, chunks smaller than a record or a header) takes exactly the records the plain reader
    yields, and stops with the same torn-tail warning or the same corruption (file, offset,
    message)."""
    monkeypatch.setattr(wal, "_CHUNK", chunk)
    pristine = tmp_path / "p"
    write_log(pristine, 90, batch=4, segment_bytes=1_500)
    segments = [p for _, p in list_segments(pristine)]
    assert len(segments) >= 4
    last = segments[-1]
    damages: list[tuple[str, Path, int]] = [("none", last, 0)]
    for p in (segments[1], last):
        size = p.stat().st_size
        damages += [("flip", p, pos) for pos in range(0, size, 7 if p is last else 23)]
    damages += [("cut", last, n) for n in range(1, last.stat().st_size - SEGMENT_HEADER_SIZE + 1, 5)]
    damages += [("zero", last, n) for n in (1, 19, 20, 21, 60)]
    d = tmp_path / "d"
    for kind, p, n in damages:
        shutil.copytree(pristine, d)
        seg = d / p.name
        if kind == "flip":
            flip_byte(seg, n)
        elif kind == "cut":
            truncate_tail(d, n)
        elif kind == "zero":
            with open(seg, "r+b") as f:
                f.seek(-n, os.SEEK_END)
                f.write(bytes(n))
        for from_seq in (1, 40):
            want = _outcome(d, from_seq, False, caplog)
            assert _outcome(d, from_seq, True, caplog) == want, (kind, p.name, n, from_seq)
        shutil.rmtree(d)
