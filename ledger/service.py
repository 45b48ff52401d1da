"""The ledger service: settlement consumer, reconciler, invariant checks and alert responses in
one process, behind the shared probe server (/healthz, /readyz, /metrics, /status).

``spotex serve ledger`` runs :func:`run` (the supervisor starts it after the core). For drills and
benchmarks the same service runs standalone against any NATS + PostgreSQL:
``python -m ledger.service --nats-url URL --pg-dsn DSN [--evt-stream EVT] [--probe-port N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from core.aio import stop_tasks
from core.obs import freeze_heap
from ledger.invariants import run_invariants
from ledger.reconcile import CoreAdmin, Reconciler, ReconcilerOptions, Responder, latch_state
from ledger.settlement import BatchOutcome, Book, ConsumerOptions, SettlementConsumer

__all__ = ["LedgerOptions", "LedgerService", "main", "run"]

log = logging.getLogger("ledger.service")


class LedgerOptions(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    pg_dsn: str
    evt_stream: str = "EVT"
    durable: str = "ledger"
    batch_max_events: int = 500
    fetch_max_msgs: int = 64
    batch_wait_ms: int = 20
    ack_wait_s: float = 30.0
    pool_min: int = 2
    pool_max: int = 8
    warn_seq: int = 100
    throttle_seq: int = 1_000
    halt_seq: int = 10_000
    lag_breach_s: float = 5.0
    reconcile_interval_s: float = 1.0
    invariants_interval_s: float = 10.0
    invariants_full_interval_s: float = 3_600.0
    reconcile: bool = True  # lag checks, latch engagement and alert responses
    chaos_drop_ack_ratio: float = 0.0

    @classmethod
    def from_config(cls, cfg: Any, endpoints: Any) -> LedgerOptions:
        lc = cfg.ledger
        return cls(nats_url=endpoints.nats_url, pg_dsn=endpoints.pg_dsn, evt_stream=cfg.nats.evt_stream,
                   durable=lc.consumer_name, batch_max_events=lc.batch_max, fetch_max_msgs=lc.fetch_max_msgs,
                   batch_wait_ms=lc.batch_wait_ms, ack_wait_s=lc.ack_wait_s, pool_min=min(2, cfg.postgres.pool_max),
                   pool_max=max(4, cfg.postgres.pool_max), warn_seq=lc.lag_warn_seq,
                   throttle_seq=lc.lag_throttle_seq, halt_seq=lc.lag_halt_seq, lag_breach_s=lc.lag_breach_s,
                   reconcile_interval_s=lc.reconcile_interval_s, invariants_interval_s=lc.invariants_interval_s,
                   invariants_full_interval_s=lc.invariants_full_interval_s)


@dataclass
class _Health:
    last_invariants: dict[str, Any] | None = None


class LedgerService:
    def __init__(self, opts: LedgerOptions) -> None:
        self.opts = opts
        self.pool: asyncpg.Pool | None = None
        self.nc: Any = None
        self.js: Any = None
        self.book: Book | None = None
        self.consumer: SettlementConsumer | None = None
        self.reconciler: Reconciler | None = None
        self.responder: Responder | None = None
        self.stop = asyncio.Event()
        self.health = _Health()
        self._respond = asyncio.Event()
        self.started_at = time.time()

    # -- readiness -------------------------------------------------------------------------------
    async def pg_ready(self) -> str | None:
        if self.pool is None:
            return "not connected yet"
        async with self.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")
        return None

    async def nats_ready(self) -> str | None:
        if self.nc is None:
            return "not connected yet"
        return None if self.nc.is_connected else "disconnected"

    async def consumer_ready(self) -> str | None:
        c = self.consumer
        if c is None:
            return "starting"
        if c.psub is None:
            return "not bound to the EVT consumer"
        if c.last_error and time.monotonic() - c.last_error_at < 10:
            return c.last_error
        return None

    async def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"service": "ledger", "uptime_s": round(time.time() - self.started_at, 1)}
        if self.consumer is not None:
            out["consumer"] = self.consumer.status()
        if self.reconciler is not None:
            out["streams"] = self.reconciler.last
            out["reconciler_error"] = self.reconciler.last_error
        if self.pool is not None:
            with contextlib.suppress(Exception):
                out["latches"] = await latch_state(self.pool)
        out["invariants"] = self.health.last_invariants
        return out

    # -- lifecycle -------------------------------------------------------------------------------
    async def connect(self) -> None:
        import nats

        from ledger.migrate import migrate

        delay = 0.2
        while not self.stop.is_set():
            try:
                await migrate(self.opts.pg_dsn)
                self.pool = await asyncpg.create_pool(self.opts.pg_dsn, min_size=self.opts.pool_min,
                                                      max_size=self.opts.pool_max, timeout=10)
                break
            except Exception as exc:
                log.warning("postgres not available yet", extra={"error": f"{type(exc).__name__}: {exc}"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        delay = 0.2
        while not self.stop.is_set():
            try:
                self.nc = await nats.connect(self.opts.nats_url, name="ledger", max_reconnect_attempts=-1,
                                             reconnect_time_wait=0.5, connect_timeout=2)
                self.js = self.nc.jetstream(timeout=10)
                return
            except Exception as exc:
                log.warning("nats not available yet", extra={"error": f"{type(exc).__name__}: {exc}"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _on_outcome(self, out: BatchOutcome) -> None:
        if out.new_alert_ids:
            self._respond.set()

    async def _responder_loop(self) -> None:
        assert self.responder is not None
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._respond.wait(), 2.0)
            self._respond.clear()
            try:
                await self.responder.run_pending()
            except Exception:
                log.exception("responder failed")

    async def _invariants_loop(self) -> None:
        assert self.pool is not None
        next_full = time.monotonic() + self.opts.invariants_full_interval_s
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.opts.invariants_interval_s)
            if self.stop.is_set():
                return
            full = time.monotonic() >= next_full
            try:
                report = await run_invariants(self.pool, full=full)
                if full:
                    next_full = time.monotonic() + self.opts.invariants_full_interval_s
                self.health.last_invariants = {"ok": report.ok, "scope": report.scope, "run_id": report.run_id,
                                               "failing": [k for k, v in report.checks.items() if not v["ok"]]}
                if not report.ok:
                    log.error("ledger invariants failing", extra={"failing": self.health.last_invariants["failing"]})
                    self._respond.set()
            except Exception:
                log.exception("invariant run failed")

    async def _resume_watch(self) -> None:
        """A stream an operator resumed (``spotex ledger resume``) is re-read from its checkpoint."""
        assert self.pool is not None and self.consumer is not None
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)
            c = self.consumer
            if not c.stopped_streams:
                continue
            with contextlib.suppress(Exception):
                async with self.pool.acquire() as conn:
                    rows = await conn.fetch("SELECT stream FROM ledger_consumer_checkpoint WHERE state = 'stopped'")
                still = {r["stream"] for r in rows}
                resumed = c.stopped_streams - still
                if resumed:
                    c.stopped_streams &= still
                    c.reposition_requested = True
                    log.warning("streams resumed by an operator", extra={"streams": sorted(resumed)})

    async def run(self) -> None:
        freeze_heap(log, "start-up")  # start-up objects leave the collector's generations: shorter GC pauses
        await self.connect()
        if self.stop.is_set() or self.js is None:
            return
        assert self.pool is not None
        self.book = Book(self.pool)
        self.consumer = SettlementConsumer(self.book, self.js, ConsumerOptions(
            evt_stream=self.opts.evt_stream, durable=self.opts.durable, fetch_max_msgs=self.opts.fetch_max_msgs,
            batch_max_events=self.opts.batch_max_events, ack_wait_s=self.opts.ack_wait_s,
            batch_wait_s=self.opts.batch_wait_ms / 1000,
            chaos_drop_ack_ratio=self.opts.chaos_drop_ack_ratio))
        self.consumer.outcome_hooks.append(self._on_outcome)
        tasks = [asyncio.create_task(self.consumer.run(), name="consumer"),
                 asyncio.create_task(self._invariants_loop(), name="invariants"),
                 asyncio.create_task(self._resume_watch(), name="resume")]
        if self.opts.reconcile:
            admin = CoreAdmin(self.pool, self.js)
            self.responder = Responder(self.pool, admin)
            self.reconciler = Reconciler(self.pool, self.js, admin, ReconcilerOptions(
                evt_stream=self.opts.evt_stream, warn_seq=self.opts.warn_seq, throttle_seq=self.opts.throttle_seq,
                halt_seq=self.opts.halt_seq, breach_s=self.opts.lag_breach_s,
                interval_s=self.opts.reconcile_interval_s))
            tasks += [asyncio.create_task(self.reconciler.run(self.stop), name="reconciler"),
                      asyncio.create_task(self._responder_loop(), name="responder")]
        stopper = asyncio.create_task(self.stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            self.consumer.stop.set()
            self.stop.set()
            await stop_tasks([*tasks, stopper], timeout=5.0)
            await self.close()

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 5)


async def serve(opts: LedgerOptions, probe_port: int, name: str = "ledger") -> None:
    from core.obs import ProbeServer

    svc = LedgerService(opts)
    probe = ProbeServer("127.0.0.1", probe_port, service=name,
                        readiness=[("postgres", svc.pg_ready), ("nats", svc.nats_ready),
                                   ("consumer", svc.consumer_ready)],
                        extra_routes={"/status": svc.status})
    await probe.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, svc.stop.set)
    try:
        await svc.run()
    finally:
        with contextlib.suppress(Exception):
            await probe.stop()


async def run(ctx: Any) -> None:
    """Entry for the supervisor (``spotex serve ledger``)."""
    await serve(LedgerOptions.from_config(ctx.cfg, ctx.endpoints), ctx.probe_port, ctx.name)


def main(argv: list[str] | None = None) -> None:
    from core.obs import configure_logging

    ap = argparse.ArgumentParser(prog="python -m ledger.service", description="the ledger service, standalone")
    ap.add_argument("--nats-url", required=True)
    ap.add_argument("--pg-dsn", required=True)
    ap.add_argument("--evt-stream", default="EVT")
    ap.add_argument("--durable", default="ledger")
    ap.add_argument("--probe-port", type=int, default=0)
    ap.add_argument("--batch-max", type=int, default=500)
    ap.add_argument("--fetch-max", type=int, default=64)
    ap.add_argument("--batch-wait-ms", type=int, default=20)
    ap.add_argument("--ack-wait-s", type=float, default=30.0)
    ap.add_argument("--no-reconcile", action="store_true", help="settle only: no lag latch, no alert responses")
    ap.add_argument("--chaos-drop-ack-ratio", type=float, default=0.0)
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    configure_logging("ledger", a.log_level)
    opts = LedgerOptions(nats_url=a.nats_url, pg_dsn=a.pg_dsn, evt_stream=a.evt_stream, durable=a.durable,
                         batch_max_events=a.batch_max, fetch_max_msgs=a.fetch_max, ack_wait_s=a.ack_wait_s,
                         batch_wait_ms=a.batch_wait_ms,
                         reconcile=not a.no_reconcile, chaos_drop_ack_ratio=a.chaos_drop_ack_ratio)
    try:
        import uvloop

        uvloop.run(serve(opts, a.probe_port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
