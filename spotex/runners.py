"""Composition root of the service processes: config in, each package's own options out.

``core`` depends on nothing of ours, so it cannot read spotex's config; this module maps the
config to ``core.node.CoreOptions`` and runs the node with the shared probe server.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from spotex.config import market_configs

if TYPE_CHECKING:
    from spotex.cli import ServiceContext

__all__ = ["market_configs", "run_core", "run_core_standby", "shutdown_watchdog"]

log = logging.getLogger("spotex.runners")


def _stop_on_signals(stop: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


# A stopping core (fenced, lease lost, SIGTERM) that has not exited after this long is stuck.
SHUTDOWN_GRACE_S = 10.0


def shutdown_watchdog(loop: asyncio.AbstractEventLoop, grace_s: float, *, code: int = 4) -> threading.Timer:
    """A timer (start it when the service begins to stop) that ends the process if it is still
    running ``grace_s`` later: a fenced or deposed core must exit so that the supervisor restarts it
    as a standby, and a hung shutdown would keep its WAL lock and leave the exchange without a
    failover candidate. Before exiting it logs the stack of every pending asyncio task (when the
    loop still answers) and of every thread (faulthandler, to stderr: the component's log), so the
    hang can be diagnosed. The WAL needs nothing more: every acknowledged record was fdatasync'ed,
    and a torn tail is what recovery already truncates."""

    def fire() -> None:
        log.error("shutdown still running after the grace period: exiting", extra={"grace_s": grace_s, "code": code})
        answered = threading.Event()

        def dump_tasks() -> None:
            try:
                for t in asyncio.all_tasks(loop):
                    buf = io.StringIO()
                    t.print_stack(limit=12, file=buf)
                    log.error("pending task at shutdown", extra={"task": t.get_name(), "stack": buf.getvalue()})
            finally:
                answered.set()

        with contextlib.suppress(RuntimeError):  # the loop is closed already
            loop.call_soon_threadsafe(dump_tasks)
        answered.wait(2.0)
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(all_threads=True)
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                h.flush()
        os._exit(code)

    timer = threading.Timer(grace_s, fire)
    timer.daemon = True
    return timer


async def run_core(ctx: ServiceContext) -> None:
    from core.node import CoreNode, CoreOptions
    from core.obs import ProbeServer

    cfg = ctx.cfg
    opts = CoreOptions(
        node_id=ctx.name,
        nats_url=ctx.endpoints.nats_url,
        core_dir=str(ctx.data.root / ctx.name),
        cmd_stream=cfg.nats.cmd_stream,
        evt_stream=cfg.nats.evt_stream,
        wal_segment_bytes=cfg.core.wal_segment_bytes,
        snapshot_every=cfg.core.snapshot_every_commands,
        checkpoint_every=cfg.core.checkpoint_every_commands,
        lease_ttl_ms=cfg.core.lease_ttl_ms,
        fetch_batch=cfg.core.fetch_batch,
        replay_events=cfg.core.replay_events,
        duplicate_window_s=cfg.nats.duplicate_window_s,
        cmd_persist=cfg.nats.cmd_persist,
        markets=market_configs(cfg),
        query_subject=cfg.core.query_subject,
        freeze_heap=True,
    )
    node = CoreNode(opts)

    async def ready() -> str | None:
        if node.role in ("leader", "standby"):
            return None
        return f"role {node.role}" + (f" ({node.last_error})" if node.last_error else "")

    async def status() -> dict[str, Any]:
        return node.status()

    probe = ProbeServer("127.0.0.1", ctx.probe_port, service=ctx.name, readiness=[("core", ready)],
                        extra_routes={"/status": status})
    await probe.start()
    _stop_on_signals(node.stopping.set)
    watchdog = shutdown_watchdog(asyncio.get_running_loop(), SHUTDOWN_GRACE_S)

    async def arm() -> None:  # not cancelled on return: it also covers the interpreter's own shutdown
        await node.stopping.wait()
        watchdog.start()

    arming = asyncio.create_task(arm())
    try:
        await node.run()
    finally:
        node.stopping.set()  # also when run() raised
        await arming  # the watchdog runs from here on
        with contextlib.suppress(Exception):
            await probe.stop()
    if node.fenced or node.last_error:
        # A fenced or deposed node exits non-zero; the supervisor restarts it as a standby.
        raise SystemExit(4)


async def run_core_standby(ctx: ServiceContext) -> None:
    await run_core(ctx)
