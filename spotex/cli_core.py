"""CLI verbs of the trading core: ``spotex core ...``, ``spotex sim``."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

__all__ = ["register"]


def _core_dir(data_dir: str | None, config: str | None, node: str) -> Path:
    from spotex.cli import _load

    env = _load(data_dir, config)
    return env.data.root / node


def _emit(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, sort_keys=True))
    else:
        for k, v in data.items():
            click.echo(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}")


def register(main: click.Group) -> None:
    from spotex.cli import fail, stack_options

    @main.group("core")
    def core_group() -> None:
        """Trading core: offline replay, snapshots."""

    @core_group.command("hash")
    @stack_options
    @click.option("--node", default="core", show_default=True, help="core or core-standby")
    @click.option("--json", "as_json", is_flag=True)
    def core_hash(data_dir: str | None, config: str | None, node: str, as_json: bool) -> None:
        """Replay snapshot + WAL offline and print the state hash."""
        from core.recovery import recover
        from core.wal import WalError

        d = _core_dir(data_dir, config, node)
        if not (d / "wal").exists():
            fail(f"no WAL at {d / 'wal'}")
        try:
            rec = recover(d, keep_events=False)
        except WalError as exc:
            fail(f"WAL unreadable: {exc}")
        _emit({"state_hash": rec.engine.state_hash(), "last_seq": rec.engine.last_seq,
               "snapshot_seq": rec.snapshot_seq, "replayed": rec.replayed,
               "seconds": round(rec.seconds, 3)}, as_json)

    @core_group.command("snapshot")
    @stack_options
    @click.option("--node", default="core", show_default=True)
    def core_snapshot(data_dir: str | None, config: str | None, node: str) -> None:
        """Take a snapshot now from snapshot + WAL (offline; a running node snapshots on its own)."""
        from core.recovery import recover, take_snapshot

        d = _core_dir(data_dir, config, node)
        rec = recover(d, keep_events=False)
        if rec.engine.last_seq == 0:
            fail("nothing to snapshot: the WAL is empty")
        path = take_snapshot(d, rec.engine, rec.state)
        _emit({"snapshot": str(path), "seq": rec.engine.last_seq, "state_hash": rec.engine.state_hash()}, False)

    @core_group.command("verify-snapshot")
    @stack_options
    @click.option("--node", default="core", show_default=True)
    @click.option("--snapshot", "snapshot_path", type=click.Path(dir_okay=False), default=None,
                  help="Snapshot file (default: the newest in the node's snapshots dir).")
    @click.option("--snapshot-uri", default=None, help="file://, http:// or https:// location of a snapshot.")
    @click.option("--sha256-file", default=None, type=click.Path(dir_okay=False))
    @click.option("--out", default=None, help="Evidence file (default build/snapshot/snapshot-verify-latest.json).")
    def core_verify_snapshot(data_dir: str | None, config: str | None, node: str, snapshot_path: str | None,
                             snapshot_uri: str | None, sha256_file: str | None, out: str | None) -> None:
        """Snapshot restore rehearsal: checksum, restore, replay the WAL tail, compare with a full replay."""
        report = verify_snapshot_rehearsal(_core_dir(data_dir, config, node), snapshot_path, snapshot_uri,
                                           sha256_file)
        path = Path(out) if out else Path("build/snapshot/snapshot-verify-latest.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, sort_keys=True))
        ok = report["snapshot_verify_ok"]
        click.echo(f"snapshot_verify_ok={'true' if ok else 'false'}")
        click.echo(f"snapshot_verify_latest={path}")
        if not ok:
            click.echo(f"spotex: snapshot verify failed: {report['reason']}", err=True)
            sys.exit(1)

    @core_group.command("forensics")
    @stack_options
    @click.option("--out", "out_dir", default="build/forensics", show_default=True,
                  type=click.Path(file_okay=False), help="Directory for the bundle and its .sha256.")
    @click.option("--log-lines", default=2_000, show_default=True, help="Last lines kept of each log.")
    @click.option("--no-data", is_flag=True, help="Leave the WAL segments and snapshot files out (metadata only).")
    @click.option("--live/--no-live", default=None,
                  help="Query the running stack (status, nodes, JetStream). Default: when it runs.")
    @click.option("--json", "as_json", is_flag=True)
    def core_forensics(data_dir: str | None, config: str | None, out_dir: str, log_lines: int, no_data: bool,
                       live: bool | None, as_json: bool) -> None:
        """Forensic bundle (seed §3.1): nodes, snapshots, WAL + tail checksum, state hash, EVT/journal
        positions, logs, masked config, in a tar.gz with a sha256 manifest."""
        from spotex.cli import _load
        from spotex.core_forensics import collect

        if log_lines < 0:
            fail("--log-lines must be >= 0")
        env = _load(data_dir, config)
        if not any((env.data.root / n).is_dir() for n in ("core", "core-standby")):
            fail(f"no core data under {env.data.root} (expected {env.data.root / 'core'})")
        res = collect(env, Path(out_dir), log_lines=log_lines, include_data=not no_data, live=live)
        nodes = res.summary.get("nodes", {})
        _emit({"forensics_bundle": str(res.bundle), "forensics_sha256": res.sha256, "forensics_files": res.files,
               "forensics_bytes": res.bytes,
               "forensics_nodes": {n: {"last_seq": v.get("last_seq"), "state_hash": v.get("state_hash")}
                                   for n, v in nodes.items()},
               "forensics_errors": len(res.summary.get("errors", [])),
               "forensics_ok": "true"}, as_json)

    @core_group.command("build-native")
    @click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
                  help="Build directory (default: SPOTEX_NATIVE_DIR, else build/native in the source tree).")
    @click.option("--verify-commands", default=3_000, show_default=True,
                  help="Commands per seed of the differential check against the pure-Python engine.")
    def core_build_native(out_dir: str | None, verify_commands: int) -> None:
        """Optional: compile the engine with mypyc and verify it against the pure-Python engine.
        Use it with SPOTEX_ENGINE=native (docs/engine.md); pure Python stays the default."""
        import subprocess

        from core.engine.native import build

        try:
            res = build(Path(out_dir).resolve() if out_dir else None, verify_commands=verify_commands)
        except subprocess.CalledProcessError as exc:
            click.echo((exc.stdout or "")[-3000:] + (exc.stderr or "")[-3000:], err=True)
            fail("mypyc build failed (it needs mypy from the dev extras and a C compiler)")
        except AssertionError as exc:
            fail(f"compiled engine differs from the pure-Python engine, not stamped: {exc}")
        _emit({"native_dir": res["native_dir"], "source_sha256": res["source_sha256"],
               "verified_commands": res["verify"]["commands"], "compile_seconds": res["compile_seconds"],
               "native_build_ok": "true"}, False)
        click.echo("use it: SPOTEX_ENGINE=native spotex ...")

    @main.command("sim")
    @click.option("--seeds", default=200, show_default=True, help="How many seeds to run.")
    @click.option("--start", default=0, show_default=True, help="First seed.")
    @click.option("--seed", "one_seed", type=int, default=None, help="Run one seed and show its details.")
    @click.option("--commands", default=300, show_default=True, help="Commands per seed.")
    def sim(seeds: int, start: int, one_seed: int | None, commands: int) -> None:
        """Deterministic simulation: random command streams with crashes injected at random points."""
        import logging

        from core.sim import run_seed

        logging.getLogger().setLevel(logging.CRITICAL)
        chosen = [one_seed] if one_seed is not None else list(range(start, start + seeds))
        failed = []
        t0 = time.perf_counter()
        for s in chosen:
            r = run_seed(s, commands)
            if one_seed is not None:
                click.echo(json.dumps(r.__dict__, indent=2, default=str))
            if not r.ok:
                failed.append(s)
                click.echo(f"sim_failed_seed={s} crashes={','.join(r.crashes)} problem={r.problems[0]}")
                click.echo(f"  replay: spotex sim --seed {s} --commands {commands}")
        click.echo(f"sim_seeds={len(chosen)} sim_failed={len(failed)} seconds={time.perf_counter() - t0:.1f}")
        click.echo(f"sim_ok={'true' if not failed else 'false'}")
        if failed:
            sys.exit(1)


def verify_snapshot_rehearsal(core_dir: Path, snapshot_path: str | None, snapshot_uri: str | None,
                              sha256_file: str | None) -> dict[str, Any]:
    """Verify a snapshot's checksum, restore it, replay the WAL after it, and compare the state hash
    with a full replay of the node's own snapshot + WAL."""
    from core.recovery import recover
    from core.snapshot import latest_valid_snapshot, list_snapshots, verify_snapshot

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="spotex-snapverify-"))
    report: dict[str, Any] = {"snapshot_verify_ok": False, "core_dir": str(core_dir), "ts_ms": int(time.time() * 1000)}
    try:
        sha: Path | None = Path(sha256_file) if sha256_file else None
        if snapshot_uri:
            snap = _fetch(snapshot_uri, tmp)
            if sha is None:
                try:
                    sha = _fetch(snapshot_uri + ".sha256", tmp)
                except Exception:
                    sha = None
        elif snapshot_path:
            snap = Path(snapshot_path)
        else:
            snaps = list_snapshots(core_dir / "snapshots")
            if not snaps:
                report["reason"] = f"no snapshot in {core_dir / 'snapshots'} (take one: spotex core snapshot)"
                return report
            snap = snaps[-1][1]
        report["snapshot"] = str(snap)
        ver = verify_snapshot(snap, sha)
        report.update(checksum_ok=ver.ok, snapshot_seq=ver.seq, sha256=ver.sha256)
        if not ver.ok:
            report["reason"] = f"checksum: {ver.reason}"
            return report
        # Restore into a scratch node dir: the snapshot plus a copy of the WAL.
        scratch = tmp / "node"
        (scratch / "snapshots").mkdir(parents=True)
        shutil.copy2(snap, scratch / "snapshots" / snap.name)
        side = snap.with_name(snap.name + ".sha256")
        if sha is not None:
            shutil.copy2(sha, scratch / "snapshots" / (snap.name + ".sha256"))
        elif side.exists():
            shutil.copy2(side, scratch / "snapshots" / side.name)
        if (core_dir / "wal").exists():
            shutil.copytree(core_dir / "wal", scratch / "wal", ignore=shutil.ignore_patterns("wal.lock"))
        restored = recover(scratch, keep_events=False)
        loaded = latest_valid_snapshot(scratch / "snapshots")
        if loaded is None or loaded.seq != ver.seq:
            report["reason"] = "restore did not use the verified snapshot"
            return report
        full = recover(core_dir, keep_events=False)
        report.update(
            restored_last_seq=restored.engine.last_seq,
            restored_state_hash=restored.engine.state_hash(),
            replayed_after_snapshot=restored.replayed,
            reference_last_seq=full.engine.last_seq,
            reference_state_hash=full.engine.state_hash(),
            restore_seconds=round(restored.seconds, 3),
        )
        same = (restored.engine.last_seq == full.engine.last_seq
                and restored.engine.state_hash() == full.engine.state_hash())
        report["snapshot_verify_ok"] = same
        report["reason"] = None if same else "restored state differs from the node's own replay"
        return report
    except Exception as exc:
        report["reason"] = f"{type(exc).__name__}: {exc}"
        return report
    finally:
        report["seconds"] = round(time.perf_counter() - t0, 3)
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch(uri: str, tmp: Path) -> Path:
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    target = tmp / Path(parts.path).name
    if parts.scheme == "file":
        shutil.copy2(parts.path, target)
    elif parts.scheme in ("http", "https"):
        import httpx

        with httpx.stream("GET", uri, timeout=30) as r:
            r.raise_for_status()
            with open(target, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
    else:
        raise ValueError(f"unsupported snapshot URI scheme {parts.scheme!r}")
    return target
