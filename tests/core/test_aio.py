"""core.aio.stop_tasks (every service stops its tasks with it): stopping tasks is bounded even when a
task loses its cancellation (the hang seen in the split-brain drill: a fenced leader awaiting a task
that never ended)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from core.aio import stop_tasks


async def test_a_task_that_swallows_its_cancellation_does_not_hang_the_stop(caplog: pytest.LogCaptureFixture) -> None:
    stop = asyncio.Event()

    async def deaf() -> None:  # what a loop does once a cancellation turned into a suppressed error
        while not stop.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue

    async def fails() -> None:
        raise RuntimeError("a stage failed")

    async def polite() -> None:
        await asyncio.sleep(60)

    tasks = [asyncio.create_task(deaf(), name="deaf"), asyncio.create_task(fails(), name="fails"),
             asyncio.create_task(polite(), name="polite")]
    await asyncio.sleep(0)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="core.aio"):
        await stop_tasks(tasks, timeout=0.5)
    assert time.monotonic() - t0 < 2.0
    assert tasks[2].cancelled() and tasks[1].done() and not tasks[0].done()
    assert [r.tasks for r in caplog.records if r.msg == "tasks did not stop when cancelled"] == [["deaf"]]
    stop.set()  # the only way out for it (the node's loops check `stopping` for the same reason)
    await asyncio.wait_for(tasks[0], 2)
