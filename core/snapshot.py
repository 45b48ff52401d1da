"""Engine snapshots: atomic, self-describing files with a sha256sum-compatible sidecar.

A snapshot ``snapshot-<seq:020d>.bin`` holds the engine state after applying every command up
to and including ``seq``. File layout (little endian, 40-byte header)::

    0   8s   magic        b"SPXSNAP\\n"
    8   u32  version      1
    12  u32  flags        0
    16  u64  seq
    24  u64  length       payload length in bytes
    32  u32  payload_crc  CRC-32 (zlib's) of the payload
    36  u32  header_crc   CRC-32 (zlib's) of bytes [0:36]
    40  ...  payload

The sidecar ``snapshot-<seq:020d>.bin.sha256`` holds ``<sha256 hex of the whole file>  <file
name>\\n``, so ``sha256sum -c`` works on it. Both files are written to temporary names, fsync'ed,
renamed (sidecar first, so a visible snapshot always has its sidecar) and the directory is
fsync'ed: a reader sees the old set of snapshots or the new one, never half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from core.crc import crc32

__all__ = [
    "SNAPSHOT_HEADER_SIZE",
    "SNAPSHOT_MAGIC",
    "SNAPSHOT_VERSION",
    "LoadedSnapshot",
    "SnapshotVerification",
    "latest_valid_snapshot",
    "list_snapshots",
    "load_snapshot",
    "prune_snapshots",
    "snapshot_name",
    "verify_snapshot",
    "write_snapshot",
]

log = logging.getLogger(__name__)

SNAPSHOT_MAGIC = b"SPXSNAP\n"
SNAPSHOT_VERSION = 1
_HDR = struct.Struct("<8sIIQQII")
SNAPSHOT_HEADER_SIZE = _HDR.size
_NAME_RE = re.compile(r"^snapshot-(\d{20})\.bin$")
_TEMP_PREFIX = ".tmp-"
_SIDECAR_SUFFIX = ".sha256"


class LoadedSnapshot(NamedTuple):
    seq: int
    payload: bytes
    path: Path


@dataclass(frozen=True, slots=True)
class SnapshotVerification:
    ok: bool
    seq: int | None
    sha256: str | None
    """sha256 hex of the file as read (None if it could not be read)."""
    reason: str
    """"ok" or what failed."""
    path: Path | None = None
    payload_bytes: int | None = None
    sidecar_checked: bool = False


def snapshot_name(seq: int) -> str:
    return f"snapshot-{seq:020d}.bin"


def _sidecar_for(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def list_snapshots(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(seq, path)`` of every file named like a snapshot, oldest first (validity not checked)."""
    d = Path(directory)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _NAME_RE.match(name)
        if m is not None:
            out.append((int(m.group(1)), d / name))
    out.sort()
    return out


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_durably(path: Path, *chunks: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_header(seq: int, payload: bytes) -> bytes:
    head = _HDR.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, 0, seq, len(payload), crc32(payload), 0)[:-4]
    return head + struct.pack("<I", crc32(head))


def write_snapshot(directory: str | os.PathLike[str], seq: int, payload: bytes) -> Path:
    """Write ``snapshot-<seq>.bin`` and its sidecar atomically and durably; return its path."""
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    name = snapshot_name(seq)
    final = d / name
    header = _encode_header(seq, payload)
    digest = hashlib.sha256(header)
    digest.update(payload)
    sidecar_text = f"{digest.hexdigest()}  {name}\n".encode()
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = d / f"{_TEMP_PREFIX}{name}.{token}"
    tmp_sidecar = d / f"{_TEMP_PREFIX}{name}{_SIDECAR_SUFFIX}.{token}"
    try:
        _write_file_durably(tmp, header, payload)
        _write_file_durably(tmp_sidecar, sidecar_text)
        # Sidecar first: once the .bin name is visible, its checksum is already in place.
        os.replace(tmp_sidecar, _sidecar_for(final))
        os.replace(tmp, final)
    except BaseException:
        for leftover in (tmp, tmp_sidecar):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        raise
    _fsync_dir(d)
    log.info("snapshot written: file=%s seq=%d bytes=%d", final, seq, len(payload))
    return final


def _read_sidecar(sidecar: Path) -> str | None:
    """The hex digest in a sha256sum-style line, or None if the file is absent."""
    try:
        text = sidecar.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    first = text.strip().split()
    return first[0].lower() if first else ""


def _check(path: Path, sha256_file: Path | None, require_sidecar: bool) -> tuple[SnapshotVerification, bytes | None]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return SnapshotVerification(False, None, None, f"unreadable: {exc}", path), None
    sha = hashlib.sha256(data).hexdigest()

    def bad(reason: str, seq: int | None = None) -> tuple[SnapshotVerification, None]:
        return SnapshotVerification(False, seq, sha, reason, path), None

    if len(data) < SNAPSHOT_HEADER_SIZE:
        return bad(f"truncated header ({len(data)} of {SNAPSHOT_HEADER_SIZE} bytes)")
    magic, version, _flags, seq, length, payload_crc, header_crc = _HDR.unpack_from(data, 0)
    if magic != SNAPSHOT_MAGIC:
        return bad(f"bad magic {magic!r}")
    if crc32(data[: SNAPSHOT_HEADER_SIZE - 4]) != header_crc:
        return bad("header checksum mismatch")
    if version != SNAPSHOT_VERSION:
        return bad(f"unsupported snapshot version {version}", seq)
    m = _NAME_RE.match(path.name)
    if m is not None and int(m.group(1)) != seq:
        return bad(f"header seq {seq} does not match the file name", seq)
    found = len(data) - SNAPSHOT_HEADER_SIZE
    if found != length:
        what = "truncated" if found < length else "trailing bytes"
        return bad(f"{what}: header says {length} payload bytes, file has {found}", seq)
    payload = data[SNAPSHOT_HEADER_SIZE:]
    if crc32(payload) != payload_crc:
        return bad("payload checksum mismatch", seq)
    sidecar = sha256_file if sha256_file is not None else _sidecar_for(path)
    expected = _read_sidecar(sidecar)
    if expected is None:
        if require_sidecar:
            return bad(f"sha256 sidecar {sidecar.name} missing", seq)
    elif expected != sha:
        return bad(f"sha256 mismatch: {sidecar.name} says {expected}, file is {sha}", seq)
    verdict = SnapshotVerification(
        True, seq, sha, "ok", path, payload_bytes=length, sidecar_checked=expected is not None
    )
    return verdict, payload


def verify_snapshot(
    path: str | os.PathLike[str],
    sha256_file: str | os.PathLike[str] | None = None,
    *,
    require_sidecar: bool = True,
) -> SnapshotVerification:
    """Check header, length, payload checksum and the sha256 sidecar (default ``<path>.sha256``).

    ``require_sidecar=False`` accepts a snapshot whose sidecar is absent (a copy fetched without
    it); the embedded checksums are still verified. A sidecar that is present must match.
    """
    p = Path(path)
    return _check(p, Path(sha256_file) if sha256_file is not None else None, require_sidecar)[0]


def load_snapshot(path: str | os.PathLike[str], sha256_file: str | os.PathLike[str] | None = None) -> LoadedSnapshot:
    """Verify and load one snapshot; raise ValueError naming the reason if it does not verify."""
    p = Path(path)
    verdict, payload = _check(p, Path(sha256_file) if sha256_file is not None else None, True)
    if payload is None or verdict.seq is None:
        raise ValueError(f"snapshot {p} does not verify: {verdict.reason}")
    return LoadedSnapshot(verdict.seq, payload, p)


def latest_valid_snapshot(directory: str | os.PathLike[str]) -> LoadedSnapshot | None:
    """The newest snapshot that verifies completely; invalid newer ones are skipped with a warning."""
    for _, path in reversed(list_snapshots(directory)):
        verdict, payload = _check(path, None, True)
        if payload is not None and verdict.seq is not None:
            return LoadedSnapshot(verdict.seq, payload, path)
        log.warning("snapshot skipped: file=%s reason=%s", path, verdict.reason)
    return None


def prune_snapshots(directory: str | os.PathLike[str], keep: int = 2, *, remove_temp_files: bool = False) -> list[Path]:
    """Keep the ``keep`` newest snapshots that verify; delete every snapshot older than those.

    Snapshots newer than the oldest kept one are never deleted, valid or not (an invalid one is
    left for inspection), so a run of bad snapshots can never cost the last good one. Returns
    the deleted paths (sidecars included). ``remove_temp_files`` also deletes temporaries left
    by an interrupted write; only pass it when no write_snapshot can be in progress.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    d = Path(directory)
    snapshots = list_snapshots(d)
    kept_valid = 0
    cutoff: int | None = None  # seq of the oldest snapshot kept
    for seq, path in reversed(snapshots):
        if verify_snapshot(path).ok:
            kept_valid += 1
            if kept_valid == keep:
                cutoff = seq
                break
        else:
            log.warning("snapshot left in place by prune (does not verify): file=%s", path)
    removed: list[Path] = []
    if cutoff is not None:
        for seq, path in snapshots:
            if seq >= cutoff:
                break
            for victim in (_sidecar_for(path), path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(victim)
                    removed.append(victim)
        # sidecars whose snapshot is already gone
        for name in os.listdir(d):
            if name.endswith(_SIDECAR_SUFFIX):
                m = _NAME_RE.match(name[: -len(_SIDECAR_SUFFIX)])
                if m is not None and int(m.group(1)) < cutoff and not (d / name[: -len(_SIDECAR_SUFFIX)]).exists():
                    os.unlink(d / name)
                    removed.append(d / name)
    if remove_temp_files:
        for name in os.listdir(d):
            if name.startswith(_TEMP_PREFIX + "snapshot-"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(d / name)
                    removed.append(d / name)
    if removed:
        _fsync_dir(d)
        log.info("snapshots pruned: %d file(s) removed, keep=%d", len(removed), keep)
    return removed
