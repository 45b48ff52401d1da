"""The e2e bench's CPU accounting: a component's CPU includes its live children (PostgreSQL's backends
are children of the postmaster) and is divided by the orders."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.bench_e2e import _cpu_s, cpu_per_order


def test_cpu_counts_live_children_and_divides_by_orders() -> None:
    # A parent that only sleeps, with a child that burns ~1.5 s of CPU and then stays alive.
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time\\nt=time.process_time()\\n"
            "while time.process_time()-t<1.5: pass\\ntime.sleep(30)']); time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)  # both interpreters are up (start-up CPU is inside `before`)
        before = {"db": _cpu_s(parent.pid)}
        deadline = time.monotonic() + 20
        while _cpu_s(parent.pid) - before["db"] < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        out = cpu_per_order({"db": parent.pid}, before, 100, client_s=0.05)
    finally:
        parent.kill()
        parent.wait()
    # >= 0.3 s of the child's CPU over 100 orders is >= 3 ms per order; the parent alone would be ~0.
    assert out["db"] >= 3.0, out
    assert out["stack"] == out["db"]
    assert out["client"] == 0.5
    assert _cpu_s(parent.pid) == 0.0  # gone: no error, no CPU
