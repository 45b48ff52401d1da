"""`spotex core hash|snapshot|verify-snapshot`, `spotex sim` and the core benches, run as an operator would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.bench_replay import build_wal
from spotex.testing import spotex_cli


def _kv(out: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)


def test_hash_snapshot_and_verify(tmp_path: Path) -> None:
    data = tmp_path / "d"
    build_wal(data / "core", 3000)
    h1 = spotex_cli("core", "hash", "--data-dir", str(data), "--json")
    assert h1.returncode == 0, h1.stderr
    first = json.loads(h1.stdout)
    assert first["last_seq"] == 3000 and first["snapshot_seq"] == 0

    snap = spotex_cli("core", "snapshot", "--data-dir", str(data))
    assert snap.returncode == 0, snap.stderr
    assert _kv(snap.stdout)["state_hash"] == first["state_hash"]

    # Replay from the snapshot gives the same hash as the full replay.
    h2 = json.loads(spotex_cli("core", "hash", "--data-dir", str(data), "--json").stdout)
    assert h2["state_hash"] == first["state_hash"] and h2["snapshot_seq"] == 3000

    out = tmp_path / "verify.json"
    v = spotex_cli("core", "verify-snapshot", "--data-dir", str(data), "--out", str(out))
    assert v.returncode == 0, v.stdout + v.stderr
    assert "snapshot_verify_ok=true" in v.stdout
    report = json.loads(out.read_text())
    assert report["restored_state_hash"] == first["state_hash"]

    # A snapshot fetched by URI with a wrong checksum is refused.
    snap_file = next((data / "core" / "snapshots").glob("snapshot-*.bin"))
    copy = tmp_path / snap_file.name
    shutil.copy2(snap_file, copy)
    (tmp_path / (snap_file.name + ".sha256")).write_text("0" * 64 + "  " + snap_file.name + "\n")
    bad = spotex_cli("core", "verify-snapshot", "--data-dir", str(data), "--snapshot-uri", f"file://{copy}",
                     "--out", str(tmp_path / "bad.json"))
    assert bad.returncode == 1
    assert "snapshot_verify_ok=false" in bad.stdout


def test_hash_without_wal_is_one_line_error(tmp_path: Path) -> None:
    res = spotex_cli("core", "hash", "--data-dir", str(tmp_path))
    assert res.returncode == 1
    assert res.stderr.strip().startswith("spotex: no WAL at")
    assert len(res.stderr.strip().splitlines()) == 1


def test_sim_cli_reports_seeds() -> None:
    res = spotex_cli("sim", "--seeds", "3", "--start", "500", "--commands", "150")
    assert res.returncode == 0, res.stdout + res.stderr
    kv = _kv(res.stdout.splitlines()[-1])
    assert kv["sim_ok"] == "true"


def test_bench_verbs_print_one_json_line() -> None:
    for args, keys in (
        (("bench", "engine", "--commands", "20000", "--json"), {"commands_per_s", "p99_us", "chunk"}),
        (("bench", "engine", "--commands", "20000", "--chunk", "5000", "--batch", "64", "--json"),
         {"commands_per_s", "chunk", "batch", "decode_us"}),
        (("bench", "wal", "--commands", "20000", "--json"), {"commands_per_s", "commit_p99_ms"}),
        (("bench", "replay", "--records", "20000", "--json"), {"records_per_s", "recovery_s"}),
    ):
        res = spotex_cli(*args, timeout=300)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.strip().splitlines()
        assert len(lines) == 1
        out = json.loads(lines[0])
        assert keys <= set(out)
        if "--chunk" in args:
            assert out["chunk"] == 5000 and out["batch"] == 64
        elif args[1] == "engine":
            assert out["chunk"] == 20000  # every command generated before the first is measured
