"""asyncio helpers shared by every service process (``core`` imports nothing of ours, so they live here)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["stop_tasks"]

log = logging.getLogger("core.aio")


async def stop_tasks(tasks: Iterable[asyncio.Task[Any] | None], timeout: float = 2.0) -> None:
    """Cancel ``tasks`` and wait for them, but not forever. A cancellation can be lost: Python 3.11's
    ``asyncio.wait_for`` (inside nats-py's requests, aiokafka, asyncpg) swallows one that races the
    completion of what it waits for, and a loop that suppresses the request's errors then runs on
    with the task marked "cancelling". This was seen as a fenced core leader that never exited (its
    depth poller still sleeping, the node awaiting it). Tasks still running after ``timeout`` are
    logged by name and left behind; their loops should also watch the service's stop flag. Errors of
    the tasks that ended are retrieved (a stopping service does not re-raise them here)."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    if not live:
        return
    done, pending = await asyncio.wait(live, timeout=timeout)
    for t in done:
        if not t.cancelled():
            t.exception()
    if pending:
        log.warning("tasks did not stop when cancelled", extra={"tasks": sorted(t.get_name() for t in pending)})
