"""WAL benchmarks: durable group commit (real fdatasync) and raw read throughput.

    .venv/bin/python -m benchmarks.bench_wal [--n N] [--batch B] [--payload-bytes P] [--dir DIR]

Prints one JSON line per bench. Work happens in a temporary directory (under /tmp unless --dir
names another parent, e.g. the data volume the core will use), removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from core.wal import WalWriter, iter_records

__all__ = ["run", "run_replay"]


def _payloads(payload_bytes: int, count: int = 64) -> list[bytes]:
    # A few distinct payloads so the checksums are not computed over one cached buffer.
    return [os.urandom(payload_bytes) for _ in range(count)]


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def run(
    n: int = 1_000_000,
    batch: int = 256,
    payload_bytes: int = 100,
    *,
    parent_dir: str | None = None,
    segment_bytes: int = 64 * 1024 * 1024,
    fsync: bool = True,
) -> dict[str, Any]:
    """Append n synthetic commands and group-commit every `batch` of them (write + fdatasync)."""
    payloads = _payloads(payload_bytes)
    mask = len(payloads) - 1
    commits: list[float] = []
    record = commits.append
    directory = tempfile.mkdtemp(prefix="spotex-bench-wal-", dir=parent_dir)
    try:
        w = WalWriter(directory, segment_bytes=segment_bytes, fsync=fsync, on_commit=lambda s, _n: record(s))
        append, commit = w.append, w.commit
        t0 = time.perf_counter()
        seq = 0
        while seq < n:
            upto = min(n, seq + batch)
            while seq < upto:
                seq += 1
                append(seq, payloads[seq & mask])
            commit()
        elapsed = time.perf_counter() - t0
        w.close()
        wal_bytes = sum(p.stat().st_size for p in Path(directory).glob("wal-*.log"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    commits.sort()
    return {
        "bench": "wal",
        "commands": n,
        "commands_per_s": round(n / elapsed),
        "commit_p50_ms": round(_percentile(commits, 0.50) * 1e3, 3),
        "commit_p99_ms": round(_percentile(commits, 0.99) * 1e3, 3),
        "commit_max_ms": round(commits[-1] * 1e3, 3) if commits else 0.0,
        "commits": len(commits),
        "batch": batch,
        "payload_bytes": payload_bytes,
        "fsync": fsync,
        "mb_per_s": round(wal_bytes / elapsed / 1e6, 1),
        "seconds": round(elapsed, 3),
    }


def run_replay(
    n: int = 1_000_000,
    payload_bytes: int = 100,
    *,
    parent_dir: str | None = None,
    segment_bytes: int = 64 * 1024 * 1024,
) -> dict[str, Any]:
    """Write n records (not timed), then time iter_records over all of them (warm page cache)."""
    payloads = _payloads(payload_bytes)
    mask = len(payloads) - 1
    directory = tempfile.mkdtemp(prefix="spotex-bench-wal-read-", dir=parent_dir)
    try:
        with WalWriter(directory, segment_bytes=segment_bytes, fsync=False) as w:
            for seq in range(1, n + 1):
                w.append(seq, payloads[seq & mask])
                if seq % 4096 == 0:
                    w.commit()
        t0 = time.perf_counter()
        count = 0
        total = 0
        for _seq, payload in iter_records(directory):
            count += 1
            total += len(payload)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert count == n, (count, n)
    return {
        "bench": "wal_read",
        "records": count,
        "records_per_s": round(count / elapsed),
        "payload_mb_per_s": round(total / elapsed / 1e6, 1),
        "seconds": round(elapsed, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, action="append", help="repeat for a sweep (default 256)")
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--dir", default=None, help="parent directory for the temporary WAL")
    parser.add_argument("--no-replay", action="store_true")
    args = parser.parse_args(argv)
    for batch in args.batch or [256]:
        print(json.dumps(run(args.n, batch, args.payload_bytes, parent_dir=args.dir)), flush=True)
    if not args.no_replay:
        print(json.dumps(run_replay(args.n, args.payload_bytes, parent_dir=args.dir)), flush=True)


if __name__ == "__main__":
    main()
