"""The ledger service against a real CoreNode in-process (as tests/core/test_node.py runs it): it
settles the core's EVT, agrees with the core at every checkpoint, answers the probes, and carries
the seed §3.1 response all the way to the core's symbol modes."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from core.node import CoreNode, CoreOptions
from core.sim import generate, sim_markets
from ledger.invariants import run_invariants
from ledger.service import LedgerOptions, LedgerService, serve
from spotex.paths import free_port
from spotex.testing import nats_server
from tests.ledger.test_settlement import Bus, assert_matches_engine, pool, wait_for

__all__ = ["pool"]


def core_opts(url: str, d: Path) -> CoreOptions:
    return CoreOptions(node_id="a", nats_url=url, core_dir=str(d / "core"), lease_ttl_ms=1500, checkpoint_every=25,
                       snapshot_every=10_000, markets=sim_markets(), ack_wait_s=2.0)


async def start_core(node: CoreNode) -> asyncio.Task[None]:
    task = asyncio.create_task(node.run())
    for _ in range(200):
        if node.role == "leader":
            break
        await asyncio.sleep(0.02)
    assert node.role == "leader"
    return task


async def send(bus: Bus, cmds: list[Any], prefix: str) -> None:
    from core.bus import cmd_subject
    from core.wire import encode_request

    futs = [await bus.js.publish_async(cmd_subject(getattr(c, "symbol", None)), encode_request(c),
                                       headers={"Nats-Msg-Id": f"{prefix}-{i}"}) for i, c in enumerate(cmds)]
    await asyncio.gather(*futs)


async def ledger_caught_up(p: asyncpg.Pool, node: CoreNode) -> bool:
    want = node.engine.stream_seqs()
    async with p.acquire() as c:
        have = {r["stream"]: r["last_seq"] for r in await c.fetch(
            "SELECT stream, last_seq FROM ledger_consumer_checkpoint")}
    return all(have.get(s, 0) >= v for s, v in want.items() if v)


async def probe(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


async def test_service_settles_the_core_and_carries_the_3_1_response(pool: asyncpg.Pool, pg_dsn: str,
                                                                    nats_srv: Any, tmp_path: Path) -> None:
    async with Bus(nats_srv.url) as bus:
        node = CoreNode(core_opts(bus.url, tmp_path))
        core_task = await start_core(node)
        port = free_port()
        opts = LedgerOptions(nats_url=bus.url, pg_dsn=pg_dsn, invariants_interval_s=0.5, reconcile_interval_s=0.2,
                             lag_breach_s=30.0)
        svc_task = asyncio.create_task(serve(opts, port))
        try:
            await send(bus, generate(7, 600), "svc")
            await wait_for(lambda: _at(node, 602), what="core to sequence")
            await wait_for(lambda: ledger_caught_up(pool, node), what="ledger to catch up")
            await assert_matches_engine(pool, node.engine)
            async with pool.acquire() as c:
                ck = {r["status"]: r["n"] for r in await c.fetch(
                    "SELECT status, count(*) AS n FROM ledger_engine_checkpoints GROUP BY 1")}
            assert set(ck) == {"match"} and ck["match"] >= 600 // 25
            assert (await probe(port, "/readyz")).status_code == 200
            metrics = (await probe(port, "/metrics")).text
            for name in ("ledger_settlement_lag_seq", "ledger_settlement_lag_ms", "ledger_consumer_lag_messages",
                         "ledger_db_tx_errors_total", "ledger_invariant_checks_total", "ledger_latch_engaged",
                         "ledger_events_applied_total"):
                assert name in metrics, name
            async def reconciled() -> bool:
                st = (await probe(port, "/status")).json()
                return bool(st.get("streams")) and all(v.get("lag") == 0 for v in st["streams"].values())

            await wait_for(reconciled, what="the reconciler to see lag 0")

            # Seed §3.1: a violation halts withdrawals and sets the affected symbol CANCEL_ONLY in the core.
            async with pool.acquire() as c:
                await c.execute("UPDATE ledger_accounts SET balance = balance + 1 WHERE account_id = 1001 AND "
                                "asset = 'ETH' AND bucket = 'available'")
            assert not (await run_invariants(pool)).ok

            async def core_reacted() -> bool:
                return bool(node.engine.withdrawals_halted) and str(_mode(node, "ETH-USDT")) == "CANCEL_ONLY"

            await wait_for(core_reacted, what="the core to halt withdrawals and set ETH-USDT cancel-only")
            assert str(_mode(node, "BTC-USDT")) == "NORMAL"

            async def ledger_saw_it() -> bool:
                async with pool.acquire() as c:
                    return await c.fetchval("SELECT mode FROM ledger_markets WHERE symbol = 'ETH-USDT'") == \
                        "CANCEL_ONLY"

            await wait_for(ledger_saw_it, what="the ledger to settle the mode change")
        finally:
            node.stopping.set()
            svc_task.cancel()
            with contextlib.suppress(BaseException):
                await svc_task
            await asyncio.gather(core_task, return_exceptions=True)


async def _at(node: CoreNode, seq: int) -> bool:
    return node.engine.last_seq >= seq


def _mode(node: CoreNode, symbol: str) -> Any:
    return node.engine.mode(symbol)


async def test_readyz_503_while_postgres_or_nats_are_down(pool: asyncpg.Pool, pg_dsn: str, nats_srv: Any,
                                                          tmp_path: Path) -> None:
    dbname = pg_dsn.rsplit("/", 1)[1]
    admin_dsn = pg_dsn.rsplit("/", 1)[0] + "/postgres"
    (tmp_path / "n").mkdir()
    cm = nats_server(tmp_path / "n")  # a private server this test may stop
    ns = await asyncio.to_thread(cm.__enter__)
    try:
        async with Bus(ns.url):
            pass
        port = free_port()
        svc = LedgerService(LedgerOptions(nats_url=ns.url, pg_dsn=pg_dsn, reconcile=False))
        from core.obs import ProbeServer

        server = ProbeServer("127.0.0.1", port, service="ledger",
                             readiness=[("postgres", svc.pg_ready), ("nats", svc.nats_ready),
                                        ("consumer", svc.consumer_ready)])
        await server.start()
        task = asyncio.create_task(svc.run())
        try:
            async def ready() -> bool:
                return (await probe(port, "/readyz")).status_code == 200

            await wait_for(ready, what="ready")
            admin = await asyncpg.connect(admin_dsn)
            try:
                await admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
                await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 "
                                    "AND pid <> pg_backend_pid()", dbname)

                async def pg_down() -> Any:
                    r = await probe(port, "/readyz")
                    return r if r.status_code == 503 else None

                r = await wait_for(pg_down, what="503 for postgres")
                assert r.json()["reason"].startswith("postgres:")
            finally:
                await admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
                await admin.close()
            await wait_for(ready, what="ready again")
            ns.stop()

            async def nats_down() -> Any:
                r = await probe(port, "/readyz")
                return r if r.status_code == 503 and r.json()["reason"].startswith("nats:") else None

            await wait_for(nats_down, what="503 for nats")
        finally:
            svc.stop.set()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 10)
            await server.stop()
    finally:
        await asyncio.to_thread(cm.__exit__, None, None, None)


@pytest.mark.parametrize("argv", [["--help"]])
def test_standalone_entry_parses(argv: list[str]) -> None:
    from ledger.service import main

    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 0
