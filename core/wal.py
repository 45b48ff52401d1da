"""Write-ahead log of sequenced commands.

The log is a directory of segment files ``wal-<first_seq:020d>.log``. Each segment starts with a
24-byte header and holds records with contiguous sequence numbers; the sequence is global and
contiguous across segments. Payloads are opaque bytes (the core stores msgpack commands).

Group commit: the core ``append``s every command of a batch (buffered in memory), then calls
``commit()`` once, which writes the batch with one ``os.write`` and makes it durable with one
``os.fdatasync``. Effects of the batch may be published only after ``commit()`` returns.

Recovery rules (see docs/durability.md for the rationale):

* a torn tail of the *last* segment (short header, short payload, checksum mismatch of the very last
  record, or a zero-filled tail) is what a crash during the in-flight write leaves behind: readers
  stop cleanly before it, and the writer (or ``iter_records(repair=True)``) truncates it and logs one
  warning naming the file and offset;
* anything else (a bad record followed by more data, a sequence discontinuity, a bad record in a
  non-last segment, a bad segment header) raises :class:`WalCorruption` naming file and offset.
  Acknowledged commands are never silently dropped.

Record layout (little endian, 20-byte header)::

    0   u32  header_crc   CRC-32 (zlib's) of bytes [4:20] (length, payload_crc, seq)
    4   u32  length       payload length in bytes
    8   u32  payload_crc  CRC-32 (zlib's) of bytes [12:20+length] (seq followed by the payload)
    12  u64  seq
    20  ...  payload

The header has its own checksum so a damaged ``length`` in the middle of the log is reported as
corruption instead of being mistaken for a short (torn) last record, which would truncate
acknowledged records.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
import struct
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from core.crc import crc32

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "FORMAT_VERSION",
    "MAX_PAYLOAD_BYTES",
    "RECORD_HEADER",
    "RECORD_HEADER_SIZE",
    "SEGMENT_HEADER_SIZE",
    "SEGMENT_MAGIC",
    "CommitHook",
    "Consumer",
    "FaultHook",
    "WalCorruption",
    "WalError",
    "WalInfo",
    "WalSequenceError",
    "WalWriter",
    "WalWriterFailed",
    "encode_record",
    "iter_records",
    "list_segments",
    "retire_segments",
    "scan",
    "segment_name",
    "truncate_tail",
]

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"SPXWAL\r\n"
FORMAT_VERSION = 1
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
MAX_PAYLOAD_BYTES = 1 << 30

# magic, version, first_seq, CRC-32 of the first 20 bytes
_SEG_HDR = struct.Struct("<8sIQI")
SEGMENT_HEADER_SIZE = _SEG_HDR.size
# header_crc, length, payload_crc, seq
_REC_HDR = struct.Struct("<IIIQ")
RECORD_HEADER = _REC_HDR
RECORD_HEADER_SIZE = _REC_HDR.size
_REC_TAIL = struct.Struct("<IIQ")  # length, payload_crc, seq: the bytes header_crc covers
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_SEGMENT_RE = re.compile(r"^wal-(\d{20})\.log$")
_TEMP_SUFFIX = ".tmp"
_LOCK_NAME = "wal.lock"

_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)

CommitHook = Callable[[float, int], None]
"""``on_commit(seconds, records)``: called after each durable commit (write + fdatasync time)."""

FaultHook = Callable[[str], None]
"""Called at named points of the write path; raise from it to simulate a crash there.

Points: ``before_write``, ``after_write`` (written, not yet synced), ``after_sync``,
``after_roll`` (a new segment exists and is durable, nothing written to it yet).
"""


class WalError(Exception):
    """Root of the WAL errors."""


class WalCorruption(WalError):
    """The log is damaged somewhere other than a torn tail; the message names file and offset."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(f"WAL corruption in {path} at byte offset {offset}: {reason}")


class WalSequenceError(WalError, ValueError):
    """An append whose seq is not the previous seq + 1."""


class WalWriterFailed(WalError):
    """A write, sync or segment roll failed; the writer refuses further use.

    After a failed write or fdatasync the state of the file (and of the page cache) is unknown,
    and retrying fdatasync can report success for data that was dropped. The only safe move is
    to stop, reopen the directory (which runs tail recovery) and replay.
    """


@dataclass(frozen=True, slots=True)
class WalInfo:
    """Summary of a log directory. An empty log has ``last_seq == first_seq - 1``."""

    first_seq: int
    last_seq: int
    segments: int
    bytes: int
    torn_tail_bytes: int = 0

    @property
    def records(self) -> int:
        return self.last_seq - self.first_seq + 1


def segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:020d}.log"


def list_segments(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(first_seq, path)`` of every segment file, oldest first."""
    d = Path(directory)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out: list[tuple[int, Path]] = []
    for name in names:
        m = _SEGMENT_RE.match(name)
        if m is not None:
            out.append((int(m.group(1)), d / name))
    out.sort()
    return out


def encode_record(seq: int, payload: bytes) -> bytes:
    """One record exactly as the writer lays it out (for tests and tools)."""
    pcrc = crc32(payload, crc32(_U64.pack(seq)))
    tail = _REC_TAIL.pack(len(payload), pcrc, seq)
    return _U32.pack(crc32(tail)) + tail + payload


def _encode_segment_header(first_seq: int) -> bytes:
    head = _SEG_HDR.pack(SEGMENT_MAGIC, FORMAT_VERSION, first_seq, 0)[:-4]
    return head + _U32.pack(crc32(head))


def _check_segment_header(path: Path, data: bytes, first_seq: int) -> None:
    if len(data) < SEGMENT_HEADER_SIZE:
        # Segments are created complete (temp file + rename), so this is damage, not a tear.
        raise WalCorruption(path, 0, f"short segment header ({len(data)} of {SEGMENT_HEADER_SIZE} bytes)")
    magic, version, hdr_first, crc = _SEG_HDR.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        raise WalCorruption(path, 0, f"bad segment magic {magic!r}")
    if crc32(data[: SEGMENT_HEADER_SIZE - 4]) != crc:
        raise WalCorruption(path, 0, "segment header checksum mismatch")
    if version != FORMAT_VERSION:
        raise WalCorruption(path, 0, f"unsupported segment format version {version}")
    if hdr_first != first_seq:
        raise WalCorruption(path, 0, f"segment header says first seq {hdr_first}, file name says {first_seq}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _create_segment(directory: Path, first_seq: int) -> Path:
    """Create a segment holding only its header, atomically and durably."""
    path = directory / segment_name(first_seq)
    tmp = directory / (segment_name(first_seq) + _TEMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, _encode_segment_header(first_seq))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    _fsync_dir(directory)
    return path


def _remove_temp_segments(directory: Path) -> None:
    for name in os.listdir(directory):
        if name.startswith("wal-") and name.endswith(".log" + _TEMP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)


def _acquire_lock(directory: Path) -> int:
    fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WalError(f"{directory} is locked by another WAL writer") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release_lock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# reading


@dataclass(slots=True)
class _SegmentEnd:
    valid_end: int
    last_seq: int
    torn_reason: str | None = None


def _zero_from(data: bytes, offset: int) -> bool:
    # A power loss can persist the file size before the data: the unwritten tail reads as zeros.
    return data.count(0, offset) == len(data) - offset


def _zero_tail_start(data: bytes) -> int:
    return len(data.rstrip(b"\x00"))


def _where(is_last: bool) -> str:
    return " followed by more data" if is_last else " in a segment that is not the last one"


def _classify(path: Path, data: bytes, off: int, expected: int, is_last: bool) -> str:
    """Explain why the record at ``off`` did not verify: return the torn-tail reason, or raise.

    Only reached off the fast path, so it can afford to check the header checksum first: once
    the header verifies, its length can be trusted to tell a short (torn) payload from damage.
    """
    size = len(data)
    hs = RECORD_HEADER_SIZE
    remaining = size - off
    if remaining < hs:
        reason = f"short record header ({remaining} of {hs} bytes)"
    else:
        hcrc, length, pcrc, seq = _REC_HDR.unpack_from(data, off)
        end = off + hs + length
        if crc32(data[off + 4 : off + hs]) != hcrc:
            # The length is untrusted, so "does this record end at EOF" cannot be answered: a
            # flipped length bit can point exactly at EOF and swallow acknowledged records. Only
            # a zero-filled tail that starts inside this header (unwritten blocks after a power
            # loss) counts as a tear; any other damage here is corruption, even at the very end.
            if not (is_last and _zero_tail_start(data) <= off + hs):
                raise WalCorruption(path, off, "record header checksum mismatch" + _where(is_last))
            reason = "zero-filled tail from the last record header on"
        elif seq != expected:
            raise WalCorruption(path, off, f"seq discontinuity: expected {expected}, found {seq}")
        elif end > size:
            reason = f"short payload ({remaining - hs} of {length} bytes)"
        elif crc32(data[off + 12 : end]) != pcrc:
            if not (is_last and (end == size or _zero_from(data, end))):
                raise WalCorruption(path, off, f"payload checksum mismatch (seq {seq})" + _where(is_last))
            reason = "payload checksum mismatch in the last record"
        else:  # pragma: no cover - the fast path accepts every record that verifies
            raise AssertionError(f"{path} at {off}: record verifies on the slow path only")
    if not is_last:
        raise WalCorruption(path, off, f"{reason} in a segment that is not the last one")
    return reason


def _records(
    path: Path,
    data: bytes,
    first_seq: int,
    is_last: bool,
    yield_from: int,
    strict: bool = False,
    resume: tuple[int, int] | None = None,
) -> Generator[tuple[int, bytes], None, _SegmentEnd]:
    """Yield the segment's records with seq >= yield_from; return where the valid data ends.

    The segment header must already be checked. Raises WalCorruption for anything that is not
    a torn tail of the last segment. ``strict`` also verifies every header checksum (scan):
    otherwise a flipped bit in a header_crc field of an intact record goes unnoticed, which
    costs nothing, as every byte that matters is covered by the payload checksum.

    ``resume`` (offset, seq): a consumer (_consume_chunked) already took the records before that
    offset; the loop goes on from there, classifying the record the consumer stopped at.
    """
    size = len(data)
    mv = memoryview(data)
    unpack = _REC_HDR.unpack_from
    crc = crc32
    hs = RECORD_HEADER_SIZE
    off, expected = (SEGMENT_HEADER_SIZE, first_seq) if resume is None else resume
    torn: str | None = None
    while off < size:
        # Fast path, one checksum per record: the payload checksum covers seq and payload, and
        # a damaged length would make it run over the wrong bytes and fail. The header checksum
        # is only consulted to classify a failure (see _classify).
        if size - off >= hs:
            hcrc, length, pcrc, seq = unpack(data, off)
            end = off + hs + length
            if (
                seq == expected
                and end <= size
                and crc(mv[off + 12 : end]) == pcrc
                and (not strict or crc(mv[off + 4 : off + hs]) == hcrc)
            ):
                if seq >= yield_from:
                    yield seq, data[off + hs : end]
                expected = seq + 1
                off = end
                continue
        torn = _classify(path, data, off, expected, is_last)
        break
    return _SegmentEnd(off, expected - 1, torn)


# A segment's records handed over in bulk instead of yielded one by one (recovery's replay loop):
# called with (segment bytes, offset of the first record, its seq, yield_from), it processes the
# records with seq >= yield_from that pass the reader's check, from the first on, and returns the
# offset and seq of the first record it did not take.
Consumer = Callable[[bytes, int, int, int], tuple[int, int]]


# How much of a segment _consume_chunked reads at a time. Reading a 64 MiB segment whole costs
# ~40 ms, most of it faulting in the fresh pages of a new 64 MiB buffer; in 1 MiB pieces, whose
# buffers the allocator hands back and reuses, ~10-14 ms.
_CHUNK = 1 << 20


def _consume_chunked(path: Path, first_seq: int, yield_from: int, consume: Consumer) -> tuple[int, int, int]:
    """Hand a segment's records to ``consume`` a chunk at a time, each chunk starting at the first
    record not yet taken. Returns the file offset and seq of the first record not taken, and the
    file's size when it was opened. The offset is that size when every record was taken; else it
    is a record incomplete at the end of the file or one the consumer refused, which the caller
    classifies from the whole segment (_records with ``resume``)."""
    hs = RECORD_HEADER_SIZE
    with open(path, "rb", buffering=0) as f:
        size = left = os.fstat(f.fileno()).st_size  # left: bytes not read yet
        buf = f.read(max(_CHUNK, SEGMENT_HEADER_SIZE))
        left -= len(buf)
        _check_segment_header(path, buf, first_seq)
        base = 0  # file offset of buf[0]
        off, expected = SEGMENT_HEADER_SIZE, first_seq
        while True:
            off, expected = consume(buf, off, expected, yield_from)
            rest = len(buf) - off
            need = _CHUNK
            if rest >= hs:
                length = _U32.unpack_from(buf, off + 4)[0]
                if hs + length <= rest or length > MAX_PAYLOAD_BYTES:
                    return base + off, expected, size  # whole and refused, or a damaged length
                need = max(_CHUNK, hs + length - rest)
            more = f.read(min(need, left)) if left > 0 else b""
            if not more:
                return base + off, expected, size  # the end of the file
            left -= len(more)
            buf = buf[off:] + more
            base += off
            off = 0


def _drain(gen: Generator[tuple[int, bytes], None, _SegmentEnd]) -> _SegmentEnd:
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            result: _SegmentEnd = stop.value
            return result


def _handle_torn(path: Path, end: _SegmentEnd, size: int, repair: bool) -> None:
    assert end.torn_reason is not None
    dropped = size - end.valid_end
    if repair:
        with open(path, "r+b") as f:
            f.truncate(end.valid_end)
            f.flush()
            os.fsync(f.fileno())
        log.warning(
            "WAL torn tail truncated: file=%s offset=%d dropped_bytes=%d reason=%s",
            path,
            end.valid_end,
            dropped,
            end.torn_reason,
        )
    else:
        log.warning(
            "WAL torn tail ignored (read-only): file=%s offset=%d bytes=%d reason=%s",
            path,
            end.valid_end,
            dropped,
            end.torn_reason,
        )


@dataclass(slots=True)
class _WalkStats:
    segments: int = 0
    bytes: int = 0
    last_seq: int = 0
    torn_tail_bytes: int = 0


def _walk(
    directory: Path,
    from_seq: int,
    yield_from: int,
    repair: bool,
    stats: _WalkStats | None,
    strict: bool = False,
    consume: Consumer | None = None,
) -> Iterator[tuple[int, bytes]]:
    segments = list_segments(directory)
    if not segments:
        return
    if from_seq < segments[0][0]:
        raise WalError(
            f"{directory}: records before seq {segments[0][0]} are not in the log (retired or never "
            f"written); asked to read from seq {from_seq}"
        )
    start = 0
    for i, (first, _) in enumerate(segments):
        if first <= from_seq:
            start = i
        else:
            break
    lock_fd = _acquire_lock(directory) if repair else None
    try:
        prev_last: int | None = None
        for i in range(start, len(segments)):
            first, path = segments[i]
            is_last = i == len(segments) - 1
            if prev_last is not None and first != prev_last + 1:
                raise WalCorruption(
                    path,
                    0,
                    f"seq discontinuity: previous segment ends at {prev_last}, this one starts at {first}",
                )
            end: _SegmentEnd | None = None
            resume: tuple[int, int] | None = None
            if consume is not None:
                taken_to, next_seq, size = _consume_chunked(path, first, yield_from, consume)
                if taken_to == size:  # every record taken: nothing to classify
                    end = _SegmentEnd(size, next_seq - 1)
                else:  # the whole segment, classified from the record the consumer stopped at
                    resume = (taken_to, next_seq)
            if end is None:
                data = path.read_bytes()
                if resume is None:
                    _check_segment_header(path, data, first)
                end = yield from _records(path, data, first, is_last, yield_from, strict, resume=resume)
                size = len(data)
                if end.torn_reason is not None:
                    _handle_torn(path, end, size, repair)
            prev_last = end.last_seq
            if stats is not None:
                stats.segments += 1
                stats.bytes += end.valid_end if repair else size
                stats.last_seq = end.last_seq
                stats.torn_tail_bytes = 0 if repair else size - end.valid_end
    finally:
        if lock_fd is not None:
            _release_lock(lock_fd)


def iter_records(
    directory: str | os.PathLike[str], from_seq: int = 1, *, repair: bool = False, consume: Consumer | None = None
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(seq, payload)`` for every record with seq >= from_seq, in order, across segments.

    Reading is read-only by default: a torn tail is logged and reading stops cleanly before it,
    but the file is left alone, because a reader must never cut a file a live writer is appending
    to. ``repair=True`` takes the writer lock (fails if a writer holds it) and truncates the torn
    tail. Raises WalError if from_seq precedes the oldest record still in the log, and
    WalCorruption for damage other than a torn tail. With ``consume`` (see :data:`Consumer`) each
    segment's records go to it in bulk; only what it leaves is yielded (normally nothing).
    """
    if from_seq < 1:
        raise ValueError(f"from_seq must be >= 1, got {from_seq}")
    return _walk(Path(directory), from_seq, from_seq, repair, None, consume=consume)


def scan(directory: str | os.PathLike[str]) -> WalInfo:
    """Verify every record of every segment, header checksums included (read-only), and
    summarise the log. A torn tail is reported in ``torn_tail_bytes``, not repaired."""
    d = Path(directory)
    segments = list_segments(d)
    if not segments:
        return WalInfo(first_seq=1, last_seq=0, segments=0, bytes=0)
    first_seq = segments[0][0]
    stats = _WalkStats()
    for _ in _walk(d, first_seq, 1 << 64, False, stats, strict=True):
        pass
    return WalInfo(
        first_seq=first_seq,
        last_seq=stats.last_seq,
        segments=stats.segments,
        bytes=stats.bytes,
        torn_tail_bytes=stats.torn_tail_bytes,
    )


def retire_segments(directory: str | os.PathLike[str], covered_seq: int) -> list[Path]:
    """Delete the oldest segments whose every record has seq <= covered_seq; never the last one.

    A segment's last seq is one less than the next segment's first seq, so this needs only the
    file names. Pass the seq of the *oldest snapshot you keep*, so that falling back to it still
    finds its WAL suffix.
    """
    d = Path(directory)
    segments = list_segments(d)
    removed: list[Path] = []
    for (_, path), (next_first, _) in itertools.pairwise(segments):
        if next_first - 1 > covered_seq:
            break
        os.unlink(path)
        removed.append(path)
    if removed:
        _fsync_dir(d)
        log.info("WAL retired %d segment(s) covered by seq %d", len(removed), covered_seq)
    return removed


def truncate_tail(directory: str | os.PathLike[str], nbytes: int) -> int:
    """Test helper: cut ``nbytes`` off the end of the last segment (never into its header).

    Simulates a torn write of k bytes or, with ``WalWriter.synced_bytes``, the loss of everything
    not yet fdatasync'ed. Returns the number of bytes removed.
    """
    segments = list_segments(directory)
    if not segments:
        return 0
    path = segments[-1][1]
    size = path.stat().st_size
    new_size = max(SEGMENT_HEADER_SIZE, size - nbytes)
    os.truncate(path, new_size)
    return size - new_size


# --------------------------------------------------------------------------------------------
# writing


class WalWriter:
    """Single-threaded appender with group commit. Not thread-safe: one owner (the core loop).

    Opening an existing directory recovers its tail first (truncating a torn last record) and
    resumes after the last valid record; ``start_seq`` only matters for an empty directory (a
    node restored from a snapshot at seq S starts its log at S + 1). An exclusive flock on
    ``wal.lock`` keeps a second writer out of the same directory.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = True,
        on_commit: CommitHook | None = None,
        start_seq: int = 1,
        fault: FaultHook | None = None,
    ) -> None:
        if segment_bytes <= SEGMENT_HEADER_SIZE:
            raise ValueError(f"segment_bytes must exceed the {SEGMENT_HEADER_SIZE}-byte segment header")
        if start_seq < 1:
            raise ValueError(f"start_seq must be >= 1, got {start_seq}")
        self._dir = Path(directory)
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._on_commit = on_commit
        self._fault = fault
        self._buf = bytearray()
        self._failed: BaseException | None = None
        self._closed = False
        self.last_commit_seconds = 0.0
        """Duration of the last commit (roll + write + fdatasync)."""
        self.last_sync_seconds = 0.0
        """Duration of the last fdatasync alone."""
        self.last_commit_records = 0

        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _acquire_lock(self._dir)
        try:
            _remove_temp_segments(self._dir)
            segments = list_segments(self._dir)
            if not segments:
                path = _create_segment(self._dir, start_seq)
                first, size, last = start_seq, SEGMENT_HEADER_SIZE, start_seq - 1
            else:
                first, path = segments[-1]
                size, last = self._recover_tail(path, first)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            if fsync:
                # A predecessor killed between write and fdatasync leaves valid records in the page
                # cache only. They are part of the log from now on, so make them durable first.
                _fdatasync(self._fd)
        except BaseException:
            _release_lock(self._lock_fd)
            raise
        self._path = path
        self._seg_first = first
        self._seg_size = size
        self._synced_size = size
        self._last_seq = last  # durable
        self._written_seq = last  # handed to the kernel
        self._next_seq = last + 1  # next append

    @staticmethod
    def _recover_tail(path: Path, first: int) -> tuple[int, int]:
        data = path.read_bytes()
        _check_segment_header(path, data, first)
        end = _drain(_records(path, data, first, True, 1 << 64))
        if end.torn_reason is not None:
            _handle_torn(path, end, len(data), repair=True)
        return end.valid_end, end.last_seq

    # -- state --------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def last_seq(self) -> int:
        """Last seq known durable (written and fdatasync'ed; with fsync=False: written)."""
        return self._last_seq

    @property
    def appended_seq(self) -> int:
        """Last seq appended, buffered or not."""
        return self._next_seq - 1

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def buffered_records(self) -> int:
        return self._next_seq - 1 - self._written_seq

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    @property
    def active_segment(self) -> Path:
        return self._path

    @property
    def synced_bytes(self) -> int:
        """Size of the active segment known to be durable (for power-loss simulation)."""
        return self._synced_size

    @property
    def failed(self) -> bool:
        return self._failed is not None

    # -- write path -----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise WalWriterFailed(f"WAL writer for {self._dir} failed earlier: {self._failed!r}") from self._failed
        if self._closed:
            raise WalError(f"WAL writer for {self._dir} is closed")

    def append(self, seq: int, payload: bytes) -> None:
        """Buffer one record. Nothing reaches the file until write_buffer()/commit()."""
        if self._failed is not None or self._closed:
            self._check_usable()
        if seq != self._next_seq:
            raise WalSequenceError(f"append seq {seq} but the next seq is {self._next_seq}")
        n = len(payload)
        if n > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload of {n} bytes exceeds {MAX_PAYLOAD_BYTES}")
        crc = crc32
        tail = _REC_TAIL.pack(n, crc(payload, crc(_U64.pack(seq))), seq)
        buf = self._buf
        buf += _U32.pack(crc(tail))
        buf += tail
        buf += payload
        self._next_seq = seq + 1

    def write_buffer(self) -> None:
        """Hand the buffered records to the kernel with one write (rolling the segment first if
        the batch would overflow it). Not durable until sync()."""
        self._check_usable()
        if not self._buf:
            return
        try:
            if self._seg_size > SEGMENT_HEADER_SIZE and self._seg_size + len(self._buf) > self._segment_bytes:
                self._roll(self._written_seq + 1)
            if self._fault is not None:
                self._fault("before_write")
            _write_all(self._fd, self._buf)
            self._seg_size += len(self._buf)
            self._written_seq = self._next_seq - 1
            self._buf = bytearray()
            if self._fault is not None:
                self._fault("after_write")
        except BaseException as exc:
            self._failed = exc
            raise

    def sync(self) -> None:
        """fdatasync what was written; afterwards ``last_seq`` covers it."""
        self._check_usable()
        if self._synced_size == self._seg_size and self._last_seq == self._written_seq:
            return
        try:
            t0 = time.perf_counter()
            if self._fsync:
                _fdatasync(self._fd)
            self.last_sync_seconds = time.perf_counter() - t0
            self._synced_size = self._seg_size
            self._last_seq = self._written_seq
            if self._fault is not None:
                self._fault("after_sync")
        except BaseException as exc:
            self._failed = exc
            raise

    def commit(self) -> None:
        """Group commit: write the whole buffer once, fdatasync once, then report to on_commit."""
        self._check_usable()
        records = self._next_seq - 1 - self._last_seq
        if records == 0:
            return
        t0 = time.perf_counter()
        self.write_buffer()
        self.sync()
        seconds = time.perf_counter() - t0
        self.last_commit_seconds = seconds
        self.last_commit_records = records
        if self._on_commit is not None:
            self._on_commit(seconds, records)

    def _roll(self, first_seq: int) -> None:
        if self._fsync and self._synced_size != self._seg_size:
            _fdatasync(self._fd)
        os.close(self._fd)
        self._fd = -1
        path = _create_segment(self._dir, first_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._path = path
        self._seg_first = first_seq
        self._seg_size = SEGMENT_HEADER_SIZE
        self._synced_size = SEGMENT_HEADER_SIZE
        self._last_seq = self._written_seq
        if self._fault is not None:
            self._fault("after_roll")

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Commit anything buffered, then release the file and the lock. Idempotent."""
        if self._closed:
            return
        try:
            if self._failed is None:
                self.commit()
        finally:
            self._release()

    def abandon(self) -> None:
        """Drop the buffer and close without writing: what a crash at this point leaves behind."""
        if not self._closed:
            self._release()

    def _release(self) -> None:
        self._closed = True
        self._buf = bytearray()
        try:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        finally:
            _release_lock(self._lock_fd)

    def __enter__(self) -> WalWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # On an exception the batch in the buffer is of unknown standing: leave it unwritten,
        # exactly as a crash would, rather than make it durable.
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    def __repr__(self) -> str:
        return f"WalWriter({str(self._dir)!r}, last_seq={self._last_seq}, next_seq={self._next_seq})"
