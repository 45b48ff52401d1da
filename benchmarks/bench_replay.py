"""Replay benchmark: a core node's recovery from the WAL with no snapshot covering it.

Builds a WAL of N journal records (a realistic mixed command stream: deposits, resting and
crossing limits, market orders, cancels, amends) and then times what a restarted node does:
``recover`` (read + decode + apply every record) and opening the WAL writer. Targets from the
brief: >= 300,000 records/s and serving again <= 4 s after 1,000,000 records since the last
snapshot. ``cpu_records_per_s`` and ``recovery_cpu_s`` use the process CPU time (robust to other
processes taking the cores); ``engine_impl`` says whether the compiled engine was in use
(``SPOTEX_ENGINE=native``, see core/engine/native.py); ``state_hash`` lets runs be compared.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from core.engine import ENGINE_IMPL
from core.recovery import JournalRecord, encode_record, recover
from core.sim import generate, sim_markets
from core.wal import WalWriter
from core.wire import AddMarket, SequencedCommand

__all__ = ["build_wal", "run"]


def build_wal(core_dir: Path, n: int, seed: int = 1) -> None:
    cmds: list[Any] = [AddMarket(config=m) for m in sim_markets()]
    cmds += generate(seed, n - len(cmds))
    with WalWriter(core_dir / "wal", fsync=False) as wal:
        for i, cmd in enumerate(cmds, 1):
            sc = SequencedCommand(seq=i, ts_ms=1_700_000_000_000 + i, fencing_token=1, correlation_id=f"c{i}",
                                  command=cmd)
            wal.append(i, encode_record(JournalRecord(i, sc)))
            if i % 4096 == 0:
                wal.commit()
        wal.commit()


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def run(records: int = 1_000_000, seed: int = 1, workdir: str | None = None) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="spotex-bench-replay-", dir=workdir))
    try:
        build_wal(base, records, seed)
        gc.collect()
        gc.freeze()
        c0 = time.process_time()
        t0 = time.perf_counter()
        rec = recover(base, keep_events=False)
        t1 = time.perf_counter()
        c1 = time.process_time()
        wal = WalWriter(base / "wal", start_seq=rec.snapshot_seq + 1)
        t2 = time.perf_counter()
        c2 = time.process_time()
        wal.close()
        gc.unfreeze()
        return {
            "bench": "replay",
            "engine_impl": ENGINE_IMPL,
            "records": rec.replayed,
            "records_per_s": round(rec.replayed / (t1 - t0)),
            "cpu_records_per_s": round(rec.replayed / (c1 - c0)),
            "replay_s": round(t1 - t0, 3),
            "writer_open_s": round(t2 - t1, 3),
            "recovery_s": round(t2 - t0, 3),
            "recovery_cpu_s": round(c2 - c0, 3),
            "last_seq": rec.engine.last_seq,
            "state_hash": rec.engine.state_hash(),
            "open_orders": rec.engine.open_order_count(),
            "load_avg_1m": _loadavg(),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.records, args.seed)))


if __name__ == "__main__":
    main()
