"""The edge's CoreClient against a real nats-server: answered by a real core node, timed out when no
core answers, refused when the bus has no CMD stream."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from core.node import CoreNode
from core.sim import sim_markets
from core.wire import Deposit, OrderAccepted, PlaceOrder, Side
from edge.core_client import CoreClient
from edge.errors import SpotexError
from tests.core.test_node import Env, _opts, _start


async def _client(env: Env, timeout_ms: int) -> CoreClient:
    client = CoreClient(env.nc, env.js, markets=sim_markets(), order_timeout_ms=timeout_ms)
    await client.start()
    return client


async def test_submit_resolves_on_the_commands_events(nats_srv: Any, tmp_path: Path) -> None:
    async with Env(nats_srv.url) as env:
        node = CoreNode(_opts(env.url, tmp_path, "a"))
        task = await _start(node)
        client = await _client(env, 5_000)
        try:
            sym = sim_markets()[0]
            await client.submit(Deposit(account_id=7, asset=sym.quote, amount=10**12), "dep-1")
            res = await client.submit(PlaceOrder(symbol=sym.symbol, account_id=7, side=Side.BUY,
                                                 price_ticks=6_500_000, qty_lots=100, client_order_id="c1"),
                                      "order-1", symbol=sym.symbol)
            accepted = [e for e in res.events if isinstance(e, OrderAccepted)]
            assert len(accepted) == 1 and accepted[0].client_order_id == "c1"
            assert {e.correlation_id for e in res.events} == {"order-1"}
            assert client._waiters == {}
            # The same correlation id while one is in flight is refused, not merged.
            first = asyncio.create_task(client.submit(Deposit(account_id=8, asset=sym.quote, amount=1), "dep-2"))
            await asyncio.sleep(0)
            with pytest.raises(SpotexError) as err:
                await client.submit(Deposit(account_id=8, asset=sym.quote, amount=1), "dep-2")
            assert err.value.code == "IDEMPOTENCY_IN_PROGRESS"
            await first
        finally:
            await client.stop()
            node.stopping.set()
            await task


async def test_no_core_answers_in_time_gives_unknown(nats_srv: Any) -> None:
    """The command is on CMD (its PubAck came back) but no core applies it: UPSTREAM_TIMEOUT with
    executionStatus UNKNOWN once order_timeout_ms has passed, and nothing is left waiting."""
    async with Env(nats_srv.url) as env:
        client = await _client(env, 300)
        try:
            t0 = time.monotonic()
            with pytest.raises(SpotexError) as err:
                # bounded here so that a timer that never fires fails the test instead of hanging it
                await asyncio.wait_for(client.submit(Deposit(account_id=7, asset="USDT", amount=1), "lost-1"), 10)
            waited = time.monotonic() - t0
            assert err.value.code == "UPSTREAM_TIMEOUT" and err.value.execution_status == "UNKNOWN"
            assert 0.25 <= waited < 3.0
            assert client._waiters == {}
            info = await env.js.stream_info("CMD")
            assert info.state.messages == 1  # it did reach the bus
        finally:
            await client.stop()


async def test_a_bus_without_cmd_refuses_with_not_executed(nats_srv: Any) -> None:
    async with Env(nats_srv.url) as env:
        await env.js.delete_stream("CMD")
        client = await _client(env, 300)
        try:
            with pytest.raises(SpotexError) as err:
                await client.submit(Deposit(account_id=7, asset="USDT", amount=1), "nowhere-1")
            assert err.value.code == "UNAVAILABLE" and err.value.execution_status == "NOT_EXECUTED"
            assert client._waiters == {}
        finally:
            await client.stop()
