"""Composition root of the service processes: config in, each package's own options out.

``core`` depends on nothing of ours, so it cannot read spotex's config; this module maps the
config to ``core.node.CoreOptions`` and runs the node with the shared probe server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING, Any

from spotex.config import market_configs

if TYPE_CHECKING:
    from spotex.cli import ServiceContext

__all__ = ["market_configs", "run_core", "run_core_standby"]

log = logging.getLogger("spotex.runners")


def _stop_on_signals(stop: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


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
    try:
        await node.run()
    finally:
        with contextlib.suppress(Exception):
            await probe.stop()
    if node.fenced or node.last_error:
        # A fenced or deposed node exits non-zero; the supervisor restarts it as a standby.
        raise SystemExit(4)


async def run_core_standby(ctx: ServiceContext) -> None:
    await run_core(ctx)
