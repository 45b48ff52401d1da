"""Replay benchmark: a core node's recovery from the WAL with no snapshot covering it.

Builds a WAL of N journal records (a realistic mixed command stream: deposits, resting and
crossing limits, market orders, cancels, amends) and then times what a restarted core node does
before it connects, with the service's options: ``CoreNode.recover_local`` (snapshot, opening the
WAL writer, reading, decoding and applying every record, events rebuilt for the last
``replay_events`` records and kept for republishing, the state hash) and then the heap freeze the
service makes before it serves (``core.obs.freeze_heap``). Targets from the brief: >= 300,000
records/s and serving again <= 4 s after 1,000,000 records since the last snapshot.
``records_per_s`` is the replay loop's rate, ``recovery_s`` the whole local recovery with the
freeze (``freeze_s`` the freeze alone). ``cpu_records_per_s`` and ``recovery_cpu_s`` use the
process CPU time (robust to other processes taking the cores); ``engine_impl`` says whether the
compiled engine was in use (``SPOTEX_ENGINE=native``, see core/engine/native.py); ``state_hash``
lets runs be compared.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from core.engine import ENGINE_IMPL
from core.node import CoreNode, CoreOptions
from core.obs import freeze_heap
from core.recovery import JournalRecord, encode_record
from core.sim import generate, sim_markets
from core.wal import WalWriter
from core.wire import AddMarket, SequencedCommand

__all__ = ["build_wal", "run"]

log = logging.getLogger("bench.replay")


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


def run(records: int = 1_000_000, seed: int = 1, workdir: str | None = None,
        replay_events: int | None = None) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="spotex-bench-replay-", dir=workdir))
    try:
        build_wal(base, records, seed)
        # freeze_heap as `spotex serve core` sets it (spotex/runners.py)
        opts = CoreOptions(node_id="bench", nats_url="", core_dir=str(base), freeze_heap=True)
        if replay_events is not None:
            opts = msgspec.structs.replace(opts, replay_events=replay_events)
        node = CoreNode(opts)
        gc.collect()
        gc.freeze()
        c0 = time.process_time()
        t0 = time.perf_counter()
        node.recover_local()
        tf = time.perf_counter()
        freeze_heap(log, "recovered")  # as CoreNode.run does before it connects
        t1 = time.perf_counter()
        c1 = time.process_time()
        assert node.wal is not None
        node.wal.close()
        gc.unfreeze()
        got = node.recovered
        replayed = got["replayed"]
        replay_s = got["replay_seconds"]
        return {
            "bench": "replay",
            "engine_impl": ENGINE_IMPL,
            "records": replayed,
            "records_per_s": round(replayed / replay_s),
            "cpu_records_per_s": round(replayed / got["replay_cpu_seconds"]),
            "replay_s": replay_s,
            "recovery_s": round(t1 - t0, 3),
            "freeze_s": round(t1 - tf, 3),
            "recovery_cpu_s": round(c1 - c0, 3),
            "replay_events": opts.replay_events,
            "events_from": got["events_from"],
            "events_kept": sum(len(q) for q in node.recent.values()),
            "last_seq": got["last_seq"],
            "state_hash": got["state_hash"],
            "open_orders": node.engine.open_order_count(),
            "load_avg_1m": _loadavg(),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replay-events", type=int, default=None)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.records, args.seed, replay_events=args.replay_events)))


if __name__ == "__main__":
    main()
