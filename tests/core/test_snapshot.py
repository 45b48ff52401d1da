"""Snapshots: atomic write, verification, fallback to an older valid snapshot, pruning."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from core.snapshot import (
    SNAPSHOT_HEADER_SIZE,
    SNAPSHOT_MAGIC,
    latest_valid_snapshot,
    list_snapshots,
    load_snapshot,
    prune_snapshots,
    snapshot_name,
    verify_snapshot,
    write_snapshot,
)


def state(seq: int) -> bytes:
    return (b"engine-state-%d;" % seq) * 50


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 42, state(42))
    assert path == tmp_path / "snapshot-00000000000000000042.bin"
    assert path.name == snapshot_name(42)
    data = path.read_bytes()
    assert data[:8] == SNAPSHOT_MAGIC
    assert len(data) == SNAPSHOT_HEADER_SIZE + len(state(42))
    loaded = latest_valid_snapshot(tmp_path)
    assert loaded is not None
    seq, payload, where = loaded  # a plain (seq, payload, path) tuple as well
    assert (seq, payload, where) == (42, state(42), path)
    v = verify_snapshot(path)
    assert v.ok and v.seq == 42 and v.reason == "ok" and v.sidecar_checked
    assert v.sha256 == hashlib.sha256(data).hexdigest()
    assert load_snapshot(path).payload == state(42)
    # only the two final files remain: no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".sha256"]


def test_sidecar_is_sha256sum_compatible(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 7, b"payload")
    sidecar = Path(str(path) + ".sha256")
    assert sidecar.read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
    if shutil.which("sha256sum"):
        out = subprocess.run(
            ["sha256sum", "-c", sidecar.name], cwd=tmp_path, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == f"{path.name}: OK"


def test_empty_payload_and_empty_directory(tmp_path: Path) -> None:
    assert latest_valid_snapshot(tmp_path) is None
    assert latest_valid_snapshot(tmp_path / "missing") is None
    write_snapshot(tmp_path, 0, b"")
    loaded = latest_valid_snapshot(tmp_path)
    assert loaded is not None and loaded.seq == 0 and loaded.payload == b""


def test_leftover_temp_files_are_ignored(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 10, state(10))
    # a crash mid-write leaves temporaries behind: never mistaken for a snapshot
    (tmp_path / ".tmp-snapshot-00000000000000000020.bin.123-abcd").write_bytes(b"SPXSNAP\npartial")
    (tmp_path / ".tmp-snapshot-00000000000000000020.bin.sha256.123-abcd").write_text("x")
    assert [s for s, _ in list_snapshots(tmp_path)] == [10]
    loaded = latest_valid_snapshot(tmp_path)
    assert loaded is not None and loaded.seq == 10
    removed = prune_snapshots(tmp_path, keep=1, remove_temp_files=True)
    assert len(removed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot_name(10), snapshot_name(10) + ".sha256"]


def test_failed_write_leaves_no_partial_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_snapshot(tmp_path, 10, state(10))

    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_snapshot(tmp_path, 20, state(20))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot_name(10), snapshot_name(10) + ".sha256"]
    loaded = latest_valid_snapshot(tmp_path)
    assert loaded is not None and loaded.seq == 10


def test_sha_mismatch_falls_back_to_older_valid_snapshot(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_snapshot(tmp_path, 100, state(100))
    newer = write_snapshot(tmp_path, 200, state(200))
    sidecar = Path(str(newer) + ".sha256")
    sidecar.write_text("0" * 64 + "  " + newer.name + "\n")
    v = verify_snapshot(newer)
    assert not v.ok and "sha256 mismatch" in v.reason and v.seq == 200
    with caplog.at_level(logging.WARNING, logger="core.snapshot"):
        loaded = latest_valid_snapshot(tmp_path)
    assert loaded is not None and loaded.seq == 100 and loaded.payload == state(100)
    assert any(newer.name in r.getMessage() and "sha256 mismatch" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_snapshot(newer)


def test_payload_damage_detected_even_with_a_matching_sidecar(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 5, state(5))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    Path(str(path) + ".sha256").write_text(f"{hashlib.sha256(bytes(data)).hexdigest()}  {path.name}\n")
    v = verify_snapshot(path)
    assert not v.ok and v.reason == "payload checksum mismatch"


def test_truncated_snapshot_rejected(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 100, state(100))
    newer = write_snapshot(tmp_path, 200, state(200))
    size = newer.stat().st_size
    for cut in (1, size // 2, size - SNAPSHOT_HEADER_SIZE, size - 10, size):
        os.truncate(newer, size - cut)
        v = verify_snapshot(newer, require_sidecar=False)
        assert not v.ok, cut
        assert "truncated" in v.reason, v.reason
        loaded = latest_valid_snapshot(tmp_path)
        assert loaded is not None and loaded.seq == 100
        # restore for the next cut
        write_snapshot(tmp_path, 200, state(200))
    with open(newer, "ab") as f:
        f.write(b"extra")
    assert "trailing bytes" in verify_snapshot(newer, require_sidecar=False).reason


def test_missing_sidecar(tmp_path: Path) -> None:
    older = write_snapshot(tmp_path, 1, state(1))
    newer = write_snapshot(tmp_path, 2, state(2))
    Path(str(newer) + ".sha256").unlink()
    v = verify_snapshot(newer)
    assert not v.ok and "sidecar" in v.reason and "missing" in v.reason
    relaxed = verify_snapshot(newer, require_sidecar=False)
    assert relaxed.ok and not relaxed.sidecar_checked
    loaded = latest_valid_snapshot(tmp_path)
    assert loaded is not None and loaded.path == older


def test_explicit_sha256_file(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path / "a", 3, state(3))
    copy = tmp_path / "fetched.bin"
    shutil.copy(path, copy)
    elsewhere = tmp_path / "checksums.txt"
    shutil.copy(str(path) + ".sha256", elsewhere)
    v = verify_snapshot(copy, elsewhere)
    assert v.ok and v.seq == 3 and v.sidecar_checked
    elsewhere.write_text("f" * 64 + "  fetched.bin\n")
    assert not verify_snapshot(copy, elsewhere).ok


def test_header_damage_and_name_mismatch(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 9, state(9))
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    assert "magic" in verify_snapshot(path, require_sidecar=False).reason
    data[0] ^= 1
    data[16] ^= 1  # seq field
    path.write_bytes(bytes(data))
    assert verify_snapshot(path, require_sidecar=False).reason == "header checksum mismatch"
    data[16] ^= 1
    path.write_bytes(bytes(data))
    renamed = path.rename(tmp_path / snapshot_name(10))
    assert "file name" in verify_snapshot(renamed, require_sidecar=False).reason


def test_prune_keeps_newest_valid(tmp_path: Path) -> None:
    for seq in (10, 20, 30, 40, 50):
        write_snapshot(tmp_path, seq, state(seq))
    removed = prune_snapshots(tmp_path, keep=2)
    assert [s for s, _ in list_snapshots(tmp_path)] == [40, 50]
    assert {p.name for p in removed} == {snapshot_name(s) for s in (10, 20, 30)} | {
        snapshot_name(s) + ".sha256" for s in (10, 20, 30)
    }
    assert prune_snapshots(tmp_path, keep=2) == []


def test_prune_never_deletes_the_last_good_snapshots(tmp_path: Path) -> None:
    for seq in (10, 20, 30, 40):
        write_snapshot(tmp_path, seq, state(seq))
    for seq in (30, 40):  # the two newest are damaged
        p = tmp_path / snapshot_name(seq)
        os.truncate(p, p.stat().st_size - 1)
    prune_snapshots(tmp_path, keep=2)
    # 10 and 20 are the valid ones to keep; the damaged newer ones stay for inspection
    assert [s for s, _ in list_snapshots(tmp_path)] == [10, 20, 30, 40]
    prune_snapshots(tmp_path, keep=1)
    assert [s for s, _ in list_snapshots(tmp_path)] == [20, 30, 40]
    loaded = latest_valid_snapshot(tmp_path)
    assert loaded is not None and loaded.seq == 20
    with pytest.raises(ValueError):
        prune_snapshots(tmp_path, keep=0)


def test_overwrite_same_seq_is_atomic(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 5, b"first")
    write_snapshot(tmp_path, 5, b"second")
    loaded = latest_valid_snapshot(tmp_path)
    assert loaded is not None and loaded.payload == b"second"
