"""Forensic bundle of a stack's trading core: what an investigator needs after an incident.

``spotex core forensics --out DIR`` (seed RUNBOOK §3.1 "Create forensic bundle"). Works on a stopped
stack (everything read from the data directory) and on a running one (then also the live status of
every component and both core nodes, and the JetStream positions). Reading is read-only: the WAL is
read without the writer lock and a torn tail is reported, never truncated, so it is safe next to a
live node. Anything that cannot be collected is recorded in ``summary.json`` under ``errors`` and
the bundle is still written: a damaged WAL is evidence, not a reason to give up.

Bundle ``spotex-forensics-<UTC time>.tar.gz`` holds one folder with:

- ``summary.json``: per node last seq, state hash at that seq (offline replay of snapshot + WAL),
  last snapshot, WAL range and tail checksum; EVT positions against the WAL; errors;
- ``nodes/<node>/wal.json``: every WAL segment (first seq, bytes, sha256), the scan (first/last seq,
  torn tail bytes) and the tail: last record's seq, payload CRC, sha256 of the last 64 KiB and the
  last command decoded;
- ``nodes/<node>/snapshots.json``: every snapshot with its checksum verification;
- ``nodes/<node>/replay.json``: state hash, last seq, per-stream event seqs and asset totals;
- ``nodes/<node>/wal/*``, ``nodes/<node>/snapshots/*``: copies of the files (unless ``include_data``
  is off);
- ``live/``: ``status.json`` (``spotex status``), ``<node>-status.json`` (each node's ``/status``),
  ``jetstream.json`` (CMD, SEQ and EVT stream state, the core's CMD consumer, the journal's last
  command seq, the last event seq per EVT subject) — only when the stack runs;
- ``run/state.json``, ``run/ports.json``: what the supervisor recorded;
- ``logs/<file>.tail``: the last lines of each log, with configured secret values blanked;
- ``config.json``: the effective config with secrets masked (the raw TOML is not copied);
- ``environment.json``: versions, host, time;
- ``manifest.json``: path, size and sha256 of every other file in the bundle.

A ``<bundle>.sha256`` file is written next to the tarball.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["NODES", "ForensicsResult", "collect", "read_bundle", "wal_tail"]

NODES = ("core", "core-standby")
TAIL_BYTES = 64 * 1024
_STEP_TIMEOUT_S = 5.0


@dataclass
class ForensicsResult:
    bundle: Path
    sha256: str
    files: int
    bytes: int
    summary: dict[str, Any] = field(default_factory=dict)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


def wal_tail(wal_dir: Path) -> dict[str, Any]:
    """The last record of the log (seq, payload CRC, the command) and a sha256 of the last segment's
    final 64 KiB: enough to tell later whether the tail an investigator saw is the tail on disk."""
    from core.recovery import decode_record
    from core.wal import RECORD_HEADER_SIZE, iter_records, list_segments

    segments = list_segments(wal_dir)
    if not segments:
        return {"segments": 0}
    _, last_path = segments[-1]
    size = last_path.stat().st_size
    with open(last_path, "rb") as f:
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read()
    out: dict[str, Any] = {"segment": last_path.name, "segment_bytes": size, "tail_bytes": len(tail),
                           "tail_sha256": hashlib.sha256(tail).hexdigest()}
    last: tuple[int, bytes] | None = None
    for rec in iter_records(wal_dir, segments[-1][0]):
        last = rec
    if last is not None:
        seq, payload = last
        out["last_seq"] = seq
        out["last_payload_crc32"] = zlib.crc32(payload, zlib.crc32(seq.to_bytes(8, "little")))
        out["last_record_bytes"] = RECORD_HEADER_SIZE + len(payload)
        try:
            out["last_record"] = msgspec.to_builtins(decode_record(payload))
        except msgspec.DecodeError as exc:
            out["last_record_error"] = str(exc)
    return out


def _collect_node(node_dir: Path, dest: Path, include_data: bool, errors: list[str]) -> dict[str, Any]:
    from core.recovery import recover
    from core.snapshot import list_snapshots, verify_snapshot
    from core.wal import list_segments, scan

    name = node_dir.name
    summary: dict[str, Any] = {"dir": str(node_dir)}
    wal_dir, snap_dir = node_dir / "wal", node_dir / "snapshots"

    segs = [{"name": p.name, "first_seq": first, "bytes": p.stat().st_size, "sha256": _sha256_file(p)}
            for first, p in list_segments(wal_dir)]
    wal: dict[str, Any] = {"segments": segs}
    try:
        info = scan(wal_dir)
        wal["scan"] = {"first_seq": info.first_seq, "last_seq": info.last_seq, "segments": info.segments,
                       "bytes": info.bytes, "torn_tail_bytes": info.torn_tail_bytes}
        summary["wal_first_seq"], summary["wal_last_seq"] = info.first_seq, info.last_seq
        summary["wal_torn_tail_bytes"] = info.torn_tail_bytes
    except Exception as exc:
        wal["scan_error"] = f"{type(exc).__name__}: {exc}"
        errors.append(f"{name}: WAL scan: {wal['scan_error']}")
    try:
        wal["tail"] = wal_tail(wal_dir)
        summary["wal_tail_sha256"] = wal["tail"].get("tail_sha256")
        summary["wal_last_payload_crc32"] = wal["tail"].get("last_payload_crc32")
    except Exception as exc:
        wal["tail_error"] = f"{type(exc).__name__}: {exc}"
        errors.append(f"{name}: WAL tail: {wal['tail_error']}")
    _write_json(dest / "wal.json", wal)

    snaps: list[dict[str, Any]] = []
    for seq, path in list_snapshots(snap_dir):
        v = verify_snapshot(path)
        snaps.append({"name": path.name, "seq": seq, "bytes": path.stat().st_size, "sha256": v.sha256,
                      "checksum_ok": v.ok, "reason": v.reason})
    _write_json(dest / "snapshots.json", snaps)
    summary["snapshots"] = len(snaps)
    summary["last_snapshot"] = snaps[-1] if snaps else None

    if segs or snaps:
        try:
            rec = recover(node_dir, keep_events=False)
            e = rec.engine
            replay = {"collected_at_ms": int(time.time() * 1000),
                      "last_seq": e.last_seq, "state_hash": e.state_hash(), "snapshot_seq": rec.snapshot_seq,
                      "replayed": rec.replayed, "seconds": round(rec.seconds, 3),
                      "fencing_token": e.fencing_token, "stream_seqs": e.stream_seqs(),
                      "open_orders": e.open_order_count(), "withdrawals_halted": e.withdrawals_halted,
                      "totals": msgspec.to_builtins(e.totals())}
            _write_json(dest / "replay.json", replay)
            summary.update(last_seq=e.last_seq, state_hash=replay["state_hash"], snapshot_seq=rec.snapshot_seq,
                           stream_seqs=replay["stream_seqs"])
        except Exception as exc:
            summary["replay_error"] = f"{type(exc).__name__}: {exc}"
            errors.append(f"{name}: replay: {summary['replay_error']}")

    if include_data:
        for sub, keep in (("wal", lambda n: n.startswith("wal-") and n.endswith(".log")),
                          ("snapshots", lambda n: not n.startswith(".") and not n.endswith(".tmp"))):
            src = node_dir / sub
            if src.is_dir():
                for p in sorted(src.iterdir()):
                    if p.is_file() and keep(p.name):
                        (dest / sub).mkdir(parents=True, exist_ok=True)
                        shutil.copy2(p, dest / sub / p.name)
    return summary


def _tail_lines(path: Path, n: int) -> bytes:
    """The last ``n`` lines of a file, reading only its end."""
    size = path.stat().st_size
    block = 64 * 1024
    data = b""
    with open(path, "rb") as f:
        pos = size
        while pos > 0 and data.count(b"\n") <= n:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-n:]) if n > 0 else b""


def _secret_values(cfg_plain: Any, key: str = "") -> list[str]:
    from spotex.config import _SECRET_KEYS

    if isinstance(cfg_plain, dict):
        return [s for k, v in cfg_plain.items() for s in _secret_values(v, k)]
    if isinstance(cfg_plain, list):
        return [s for v in cfg_plain for s in _secret_values(v, key)]
    if isinstance(cfg_plain, str) and len(cfg_plain) >= 4 and any(s in key for s in _SECRET_KEYS):
        return [cfg_plain]
    return []


async def _live(env: Any, dest: Path, summary: dict[str, Any], errors: list[str]) -> None:
    """Status of the stack and both nodes, JetStream positions. Each step has its own timeout."""
    from spotex.supervisor import resolve_endpoints

    async def step(label: str, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, _STEP_TIMEOUT_S)
        except TimeoutError:
            errors.append(f"live {label}: no answer within {_STEP_TIMEOUT_S:.0f} s")
            return None
        except Exception as exc:
            errors.append(f"live {label}: {type(exc).__name__}: {exc}")
            return None

    from spotex.cli import _collect_status

    status = await step("status", _collect_status(env))
    if status is not None:
        _write_json(dest / "status.json", status)
        summary["stack_healthy"] = status.get("healthy")
    comps = (env.data.read_state() or {}).get("components", {})
    for node in NODES:
        endpoint = (comps.get(node) or {}).get("endpoint")
        if endpoint:
            got = await step(f"{node} /status", _http_json(f"{endpoint}/status"))
            if got is not None:
                _write_json(dest / f"{node}-status.json", got)
                summary.setdefault("node_status", {})[node] = {
                    k: got.get(k) for k in ("role", "fencing_token", "last_seq", "state_hash", "divergence")
                    if k in got}
    ep = resolve_endpoints(env.cfg, env.data)
    js_info = await step("jetstream", _jetstream(ep.nats_url, summary))
    if js_info is not None:
        _write_json(dest / "jetstream.json", js_info)


async def _http_json(url: str) -> Any:
    import httpx

    async with httpx.AsyncClient(timeout=_STEP_TIMEOUT_S) as client:
        r = await client.get(url)
        r.raise_for_status()
        return r.json()


async def _jetstream(nats_url: str, summary: dict[str, Any]) -> dict[str, Any]:
    import nats
    from nats.js.errors import NotFoundError

    from core.bus import H_LAST, evt_subject
    from core.node import JOURNAL_STREAM, JOURNAL_SUBJECT

    async def quiet(exc: Exception) -> None:  # the failure is reported once, by the caller
        return None

    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
                            error_cb=quiet)
    out: dict[str, Any] = {"streams": {}}
    try:
        js = nc.jetstream()
        for name in ("CMD", JOURNAL_STREAM, "EVT"):
            try:
                info = await js.stream_info(name)
                st = info.state
                out["streams"][name] = {"messages": st.messages, "bytes": st.bytes, "first_seq": st.first_seq,
                                        "last_seq": st.last_seq, "consumer_count": st.consumer_count}
            except NotFoundError:
                out["streams"][name] = None
        try:
            ci = await js.consumer_info("CMD", "core")
            out["cmd_consumer"] = {"num_pending": ci.num_pending, "num_ack_pending": ci.num_ack_pending,
                                   "num_redelivered": ci.num_redelivered,
                                   "delivered_stream_seq": ci.delivered.stream_seq if ci.delivered else None,
                                   "ack_floor_stream_seq": ci.ack_floor.stream_seq if ci.ack_floor else None}
        except NotFoundError:
            out["cmd_consumer"] = None
        try:
            msg = await js.get_last_msg(JOURNAL_STREAM, JOURNAL_SUBJECT)
            out["journal_last_cmd_seq"] = int((msg.headers or {}).get(H_LAST, 0))
        except NotFoundError:
            out["journal_last_cmd_seq"] = 0
        # Last event seq on EVT per stream the core knows, against the core's own WAL replay.
        wal_seqs: dict[str, int] = (summary.get("nodes", {}).get("core") or {}).get("stream_seqs") or {}
        evt: dict[str, Any] = {}
        for stream in sorted(wal_seqs):
            try:
                msg = await js.get_last_msg("EVT", evt_subject(stream))
                published = int((msg.headers or {}).get(H_LAST, 0))
            except NotFoundError:
                published = 0
            # > 0: the WAL has events EVT lacks (a leader died before publishing them). On a
            # running stack the replay is older than this query, so < 0 just means it moved on.
            evt[stream] = {"evt_last_seq": published, "wal_seq": wal_seqs[stream],
                           "evt_behind_wal": wal_seqs[stream] - published}
        out["collected_at_ms"] = int(time.time() * 1000)
        out["evt_positions"] = evt
    finally:
        await nc.close()
    summary["journal_last_cmd_seq"] = out.get("journal_last_cmd_seq")
    summary["evt_positions"] = out.get("evt_positions")
    return out


def collect(
    env: Any,
    out_dir: Path,
    *,
    log_lines: int = 2_000,
    include_data: bool = True,
    live: bool | None = None,
    clock: Callable[[], float] = time.time,
) -> ForensicsResult:
    """Write the bundle into ``out_dir`` and return where it is. ``env`` is the CLI's Env (config +
    data dir). ``live``: None = collect live data when the stack's supervisor is running."""
    from spotex.config import masked
    from spotex.supervisor import pid_alive

    data = env.data
    now = clock()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    name = f"spotex-forensics-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = out_dir / f".{name}.staging"
    shutil.rmtree(stage, ignore_errors=True)
    root = stage / name
    root.mkdir(parents=True)
    errors: list[str] = []
    summary: dict[str, Any] = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                               "data_dir": str(data.root), "nodes": {}, "errors": errors}
    try:
        for node in NODES:
            node_dir = data.root / node
            if node_dir.is_dir():
                summary["nodes"][node] = _collect_node(node_dir, root / "nodes" / node, include_data, errors)
        if not summary["nodes"]:
            errors.append(f"no core node directory under {data.root} ({', '.join(NODES)})")

        state = data.read_state() or {}
        for src, dst in ((data.state_file, "run/state.json"), (data.ports_file, "run/ports.json")):
            if src.exists():
                (root / dst).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, root / dst)
        running = bool(pid_alive(state.get("supervisor_pid")) and state.get("phase") in ("starting", "running"))
        summary["stack_running"] = running
        if live if live is not None else running:
            asyncio.run(_live(env, root / "live", summary, errors))

        cfg_plain = masked(env.cfg)
        cfg_plain["data_dir"] = str(data.root)
        _write_json(root / "config.json", cfg_plain)
        secrets = _secret_values(msgspec.to_builtins(env.cfg))
        if data.logs.is_dir():
            for p in sorted(data.logs.iterdir()):
                if p.is_file():
                    text = _tail_lines(p, log_lines)
                    for s in secrets:
                        text = text.replace(s.encode(), b"***")
                    (root / "logs").mkdir(exist_ok=True)
                    (root / "logs" / (p.name + ".tail")).write_bytes(text)

        from importlib.metadata import PackageNotFoundError, version

        try:
            spotex_version = version("spotex")
        except PackageNotFoundError:
            spotex_version = None
        _write_json(root / "environment.json", {
            "host": socket.gethostname(), "platform": platform.platform(), "python": sys.version,
            "spotex": spotex_version, "msgspec": msgspec.__version__, "pid": os.getpid(),
            "argv": sys.argv, "created_at": summary["created_at"],
        })
        _write_json(root / "summary.json", summary)

        manifest = []
        for p in sorted(root.rglob("*")):
            if p.is_file():
                manifest.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size,
                                 "sha256": _sha256_file(p)})
        _write_json(root / "manifest.json", {"bundle": name, "files": manifest})

        bundle = out_dir / f"{name}.tar.gz"
        tmp = bundle.with_name(bundle.name + ".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(root, arcname=name)
        os.replace(tmp, bundle)
        digest = _sha256_file(bundle)
        (out_dir / f"{name}.tar.gz.sha256").write_text(f"{digest}  {bundle.name}\n")
        return ForensicsResult(bundle, digest, len(manifest) + 1, bundle.stat().st_size, summary)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def read_bundle(bundle: Path) -> dict[str, bytes]:
    """Every file of a bundle by its path inside the bundle folder (for tests and tools)."""
    out: dict[str, bytes] = {}
    with tarfile.open(bundle, "r:gz") as tar:
        for m in tar.getmembers():
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                out[m.name.split("/", 1)[1]] = f.read()
    return out

