"""The core's shutdown watchdog: a service that began to stop and is stuck must still exit (so the
supervisor restarts it as a standby), leaving the stacks of what it was stuck in."""

from __future__ import annotations

import json
import subprocess
import sys
import time

_STUCK = """
import asyncio
from core.obs import configure_logging
from spotex.runners import shutdown_watchdog

configure_logging("core-test")

async def close_forever() -> None:
    await asyncio.Event().wait()  # a close() that never returns

async def main() -> None:
    shutdown_watchdog(asyncio.get_running_loop(), 0.5).start()
    await asyncio.create_task(close_forever(), name="stuck-close")

asyncio.run(main())
"""


def test_a_stuck_shutdown_exits_4_with_the_stacks() -> None:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", _STUCK], capture_output=True, text=True, timeout=30)
    assert res.returncode == 4, res.stderr
    assert time.monotonic() - t0 < 15
    logs = [json.loads(ln) for ln in res.stderr.splitlines() if ln.startswith("{")]
    assert logs[0]["msg"] == "shutdown still running after the grace period: exiting" and logs[0]["grace_s"] == 0.5
    stuck = [ln for ln in logs if ln["msg"] == "pending task at shutdown" and ln["task"] == "stuck-close"]
    assert stuck and "close_forever" in stuck[0]["stack"]
    assert "most recent call first" in res.stderr  # faulthandler's dump of every thread


def test_a_timely_exit_is_not_touched() -> None:
    code = _STUCK.replace("await asyncio.create_task(close_forever(), name=\"stuck-close\")",
                          "await asyncio.sleep(0.1)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "shutdown still running" not in res.stderr
