"""The fan-out write paths over real sockets: subscription groups sharing one buffer, direct socket
writes split between the event-loop thread and a helper thread, and the transport fallback. Every
client must get every trade exactly once, in order, with an unbroken prevSeq chain, and book frames
whose checksums verify."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
import websockets

from core.wire import Side
from tests.edge.wsutil import BookClient, Edge, SyntheticFeed, read_frames


@pytest.mark.parametrize("threads, direct_min", [(1, 2), (0, 2)], ids=["helper-thread", "loop-thread-only"])
async def test_every_client_gets_every_frame_in_order(threads: int, direct_min: int) -> None:
    async with Edge(write_threads=threads, direct_min=direct_min, flush_ms=1) as e:
        feed = SyntheticFeed(e.md)
        feed.book([(Side.BUY, 6_500_000 - k, 100) for k in range(30)] + [(Side.SELL, 6_500_100 + k, 100)
                                                                         for k in range(30)])
        clients: list[tuple[Any, BookClient, list[dict[str, Any]]]] = []
        tasks = []
        for i in range(24):
            ws = await websockets.connect(e.edge.ws_url, max_size=None)
            bc = BookClient()
            trades: list[dict[str, Any]] = []

            def sink(f: dict[str, Any], bc: BookClient = bc, trades: list[dict[str, Any]] = trades) -> None:
                bc.on_frame(f)
                if f.get("type") == "TradeExecuted":
                    trades.append(f)

            await ws.send(json.dumps({"op": "SUB", "channel": "trades", "symbol": "BTC-USDT"}))
            if i % 2:  # two subscription groups: trades only, trades + book
                await ws.send(json.dumps({"op": "SUB", "channel": "book", "symbol": "BTC-USDT", "depth": 20}))
            tasks.append(asyncio.create_task(read_frames(ws, sink)))
            clients.append((ws, bc, trades))
        for _ in range(500):
            if sum(len(c.subs) for c in e.hub.conns) == 36:
                break
            await asyncio.sleep(0.01)
        assert len(e.hub.groups) == 2
        for k in range(40):
            feed.trades(25, per_msg=5)
            feed.book([(Side.BUY, 6_500_000 - (k % 7), 100 + k), (Side.SELL, 6_500_100 + (k % 5), 0)])
            await asyncio.sleep(0.003)
        expected_trades = [t.seq for t in e.md.trades("BTC-USDT", 1000)][::-1]
        assert len(expected_trades) == 1000
        for _ in range(1000):
            if all(len(tr) >= 1000 for _ws, _bc, tr in clients):
                break
            await asyncio.sleep(0.01)
        for _ws, bc, trades in clients:
            assert [f["seq"] for f in trades] == expected_trades
            assert all(f["prevSeq"] == p["seq"] for p, f in itertools.pairwise(trades))
            assert bc.errors == []
        assert sum(bc.checked for _ws, bc, _tr in clients) > 12 * 20  # book frames verified
        assert e.hub.stats["dropped"] == 0
        assert e.hub.stats["direct_writes"] > 0
        assert (e.hub.stats["helper_flushes"] > 0) == (threads > 0)
        for t in tasks:
            t.cancel()
        for ws, _bc, _tr in clients:
            await ws.close()
