"""``spotex core forensics``: the bundle holds what it promises, checksummed, with secrets masked.

Offline (no stack running): the node directories are real ones (a WAL written by the WAL writer, a
snapshot taken by the recovery code), so the state hash in the bundle must equal an independent
replay. The live part (status, JetStream positions) is exercised by the split-brain and kill drills'
stacks, not here: these tests stay fast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from click.testing import CliRunner

from core.recovery import JournalRecord, encode_record, recover, take_snapshot
from core.sim import generate, sim_markets
from core.wal import WalWriter
from core.wire import AddMarket, Command, SequencedCommand
from spotex.cli import main
from spotex.core_forensics import read_bundle

SECRET = "s3cr3t-admin-token-do-not-leak"


def _node(core_dir: Path, n: int, snapshot_at: int | None, seed: int = 2) -> None:
    cmds: list[Command] = [AddMarket(config=m) for m in sim_markets()]
    cmds += generate(seed, n)
    recs = [JournalRecord(i, SequencedCommand(seq=i, ts_ms=1_700_000_000_000 + i, fencing_token=1,
                                              correlation_id=f"c{i}", command=c)) for i, c in enumerate(cmds, 1)]
    cut = snapshot_at or len(recs)
    # small segments, so the bundle lists several
    with WalWriter(core_dir / "wal", fsync=False, segment_bytes=16 * 1024) as wal:
        for r in recs[:cut]:
            wal.append(r.cmd.seq, encode_record(r))
            if r.cmd.seq % 50 == 0:
                wal.commit()
    if snapshot_at:
        rec = recover(core_dir, keep_events=False)
        take_snapshot(core_dir, rec.engine, rec.state)
        with WalWriter(core_dir / "wal", fsync=False, segment_bytes=16 * 1024, start_seq=cut + 1) as wal:
            for r in recs[cut:]:
                wal.append(r.cmd.seq, encode_record(r))


def _stack(tmp_path: Path) -> Path:
    data = tmp_path / "stack"
    _node(data / "core", 400, snapshot_at=250)
    _node(data / "core-standby", 300, snapshot_at=None)
    (data / "logs").mkdir(parents=True)
    (data / "logs" / "core.log").write_text("".join(f"line {i} token={SECRET if i == 95 else 'x'}\n"
                                                    for i in range(100)))
    (data / "spotex.toml").write_text(f'[security]\nadmin_token = "{SECRET}"\n')
    return data


def _run(*args: str) -> dict[str, object]:
    res = CliRunner().invoke(main, ["core", "forensics", *args, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out: dict[str, object] = json.loads(res.output.strip().splitlines()[-1])
    return out


def test_bundle_contents_manifest_and_state_hash(tmp_path: Path) -> None:
    data = _stack(tmp_path)
    out = _run("--data-dir", str(data), "--out", str(tmp_path / "out"), "--log-lines", "10")
    assert out["forensics_ok"] == "true" and out["forensics_errors"] == 0
    bundle = Path(str(out["forensics_bundle"]))
    raw = bundle.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == out["forensics_sha256"]
    side = bundle.with_name(bundle.name + ".sha256").read_text().split()
    assert side == [out["forensics_sha256"], bundle.name]

    files = read_bundle(bundle)
    manifest = json.loads(files.pop("manifest.json"))
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == set(files)  # every file but the manifest itself, nothing else
    for path, body in files.items():
        assert listed[path]["sha256"] == hashlib.sha256(body).hexdigest(), path
        assert listed[path]["bytes"] == len(body)

    summary = json.loads(files["summary.json"])
    assert summary["errors"] == [] and summary["stack_running"] is False
    for node, n_cmds, snap in (("core", 402, 250), ("core-standby", 302, 0)):
        ref = recover(data / node, keep_events=False)
        s = summary["nodes"][node]
        assert s["last_seq"] == n_cmds == ref.engine.last_seq
        assert s["state_hash"] == ref.engine.state_hash()
        assert s["snapshot_seq"] == snap
        assert s["wal_last_seq"] == n_cmds
        wal = json.loads(files[f"nodes/{node}/wal.json"])
        names = [seg["name"] for seg in wal["segments"]]
        assert len(names) >= 2
        for seg in wal["segments"]:  # the copies are the files on disk
            disk = (data / node / "wal" / seg["name"]).read_bytes()
            assert files[f"nodes/{node}/wal/{seg['name']}"] == disk
            assert seg["sha256"] == hashlib.sha256(disk).hexdigest()
        tail = wal["tail"]
        last_seg = (data / node / "wal" / names[-1]).read_bytes()
        assert tail["tail_sha256"] == hashlib.sha256(last_seg[-64 * 1024:]).hexdigest()
        assert tail["last_seq"] == n_cmds and tail["last_record"][1]["seq"] == n_cmds
        assert s["wal_tail_sha256"] == tail["tail_sha256"]
    snaps = json.loads(files["nodes/core/snapshots.json"])
    assert [(x["seq"], x["checksum_ok"]) for x in snaps] == [(250, True)]
    assert summary["nodes"]["core"]["last_snapshot"]["seq"] == 250
    assert any(p.startswith("nodes/core/snapshots/snapshot-") for p in files)

    log_tail = files["logs/core.log.tail"].decode()
    assert log_tail.splitlines() == [f"line {i} token={'***' if i == 95 else 'x'}" for i in range(90, 100)]
    cfg = json.loads(files["config.json"])
    assert cfg["security"]["admin_token"] == "***"
    assert SECRET.encode() not in b"".join(files.values())
    assert "live/status.json" not in files  # the stack is not running


def test_metadata_only_and_a_corrupt_wal_is_reported_not_fatal(tmp_path: Path) -> None:
    data = _stack(tmp_path)
    seg = sorted((data / "core-standby" / "wal").glob("wal-*.log"))[0]
    b = bytearray(seg.read_bytes())
    b[200] ^= 0xFF  # damage in the middle of the first segment: corruption, not a torn tail
    seg.write_bytes(bytes(b))
    out = _run("--data-dir", str(data), "--out", str(tmp_path / "out"), "--no-data")
    assert isinstance(out["forensics_errors"], int) and out["forensics_errors"] >= 1
    files = read_bundle(Path(str(out["forensics_bundle"])))
    assert not any("/wal/wal-" in p or "/snapshots/snapshot-" in p for p in files)
    summary = json.loads(files["summary.json"])
    standby = summary["nodes"]["core-standby"]
    assert "WalCorruption" in standby["replay_error"] and str(seg.name) in standby["replay_error"]
    assert any("core-standby: WAL scan" in e for e in summary["errors"])
    assert summary["nodes"]["core"]["state_hash"] == recover(data / "core", keep_events=False).engine.state_hash()


def test_no_core_data_is_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["core", "forensics", "--data-dir", str(tmp_path / "empty"),
                                    "--out", str(tmp_path / "out")])
    assert res.exit_code != 0
    assert "no core data under" in res.output
