"""The replay loop: the WAL records of one segment's bytes, checked, decoded and applied in one pass.

No I/O: recovery (core/recovery.py) hands each segment's bytes here through ``core.wal``'s reader,
which does everything else (segment headers, the seq across segments, and classifying the record
this loop stops at as a torn tail or as corruption). A record is applied only if it passes the
reader's own fast-path check, the same one ``core.wal._records`` makes: its seq is the next one, it
lies inside the data, and its payload checksum (over seq and payload) matches.

Kept next to the engine because ``spotex core build-native`` compiles it together with the engine
(see core/engine/native.py): compiled, the per-record work between the engine and the msgpack
decoder (header, checksum, slicing, the loop itself) runs as C and calls the compiled engine
directly. Uncompiled it is the same loop in Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from core.crc import crc32 as _crc32
from core.engine.engine import Engine
from core.wal import RECORD_HEADER, RECORD_HEADER_SIZE
from core.wire import Event

__all__ = ["OUT_OF_ORDER", "replay_segment"]

# (offset of the first record not taken, its expected seq, newest ts_ms seen, records applied,
#  the last source seq appended, or OUT_OF_ORDER)
Progress = tuple[int, int, int, int, int]

# True only in the compiled copy (core/engine/native.py rewrites this line): compiled, the header's
# fields are read byte by byte as native ints (no tuple, no boxed ints, ~2.5% of a compiled replay);
# interpreted, one struct unpack is far cheaper than sixteen indexing operations.
COMPILED: Final = False

# Sticky: once a source seq is not above the one before it, every later comparison keeps this.
OUT_OF_ORDER: Final = 1 << 62


def replay_segment(
    engine: Engine,
    data: bytes,
    off: int,
    expected: int,
    apply_from: int,
    loud_at: int,
    decode: Callable[[bytes], Any],
    src_keys: list[int],
    src_seqs: list[int],
    keep: list[Event] | None,
    on_events: Callable[[list[Event]], None] | None,
    last_ts: int,
    last_src: int,
) -> Progress:
    """Apply the records of ``data`` from ``off`` (whose seq must be ``expected``) with seq >=
    ``apply_from``, until the end or the first record that fails the check. Events are switched
    on at seq ``loud_at`` (the engine's current setting otherwise), kept in ``keep`` and passed to
    ``on_events`` when given. Each record's (source seq, seq) goes to ``src_keys``/``src_seqs``
    when it has a source (see core.recovery._fold_sources). ``last_src`` is the previous source seq
    (or the highest one already known); it comes back as the last one appended while every source
    seq has been above the one before it, and as ``OUT_OF_ORDER`` from the first that is not."""
    size = len(data)
    mv = memoryview(data)
    unpack = RECORD_HEADER.unpack_from
    crc32 = _crc32
    hs: int = RECORD_HEADER_SIZE
    applied = 0
    native_reads = COMPILED
    while size - off >= hs:
        # RECORD_HEADER: header crc u32, length u32, payload crc u32, seq u64 (little endian)
        if native_reads:
            length = data[off + 4] | data[off + 5] << 8 | data[off + 6] << 16 | data[off + 7] << 24
            pcrc = data[off + 8] | data[off + 9] << 8 | data[off + 10] << 16 | data[off + 11] << 24
            seq = (data[off + 12] | data[off + 13] << 8 | data[off + 14] << 16 | data[off + 15] << 24
                   | data[off + 16] << 32 | data[off + 17] << 40 | data[off + 18] << 48 | data[off + 19] << 56)
        else:
            _hcrc, length, pcrc, seq = unpack(data, off)
        end = off + hs + length
        if seq != expected or end > size or crc32(mv[off + 12 : end]) != pcrc:
            break
        if seq >= apply_from:
            if seq == loud_at:
                engine.emit_events(True)
            rec = decode(data[off + hs : end])
            cmd = rec.cmd
            if cmd.seq != seq:
                raise RuntimeError(f"WAL record {seq} holds command seq {cmd.seq}")
            evs = engine.apply(cmd)
            ts: int = cmd.ts_ms
            if ts > last_ts:
                last_ts = ts
            src: int = rec.source_seq
            if src:
                last_src = src if src > last_src else OUT_OF_ORDER
                src_keys.append(src)
                src_seqs.append(seq)
            if keep is not None:
                keep.extend(evs)
            if on_events is not None:
                on_events(evs)
            applied += 1
        expected = seq + 1
        off = end
    return off, expected, last_ts, applied, last_src
