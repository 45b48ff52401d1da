"""Private WebSocket channels over a real core: the `orders` channel's Snapshot of open orders and its
seq/prevSeq chain, kept by a client from Snapshot + updates until it equals the engine's open orders.
LOGON goes through the real KeyStore in PostgreSQL and the edge's RequestVerifier."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import websockets

from core.sim import generate
from edge.auth import KeyStore, RequestVerifier, SecretBox, hmac_signature, signing_string
from ledger.migrate import migrate
from tests.edge.wsutil import CoreStack, read_frames

ACCOUNT = 1000  # one of core.sim.generate's traders


def _engine_open(st: CoreStack, account: int) -> dict[int, tuple[str, int, int, int]]:
    assert st.node is not None
    return {v.order_id: (v.symbol, v.price_ticks or 0, v.qty_lots, v.remaining_qty_lots)
            for v in st.node.engine.open_orders(account)}


class OrdersClient:
    """Open orders from the `orders` Snapshot + OrderAccepted/OrderFilled/OrderAmended/OrderCanceled."""

    def __init__(self) -> None:
        self.orders: dict[int, tuple[str, int, int, int]] = {}
        self.seq: int | None = None
        self.errors: list[str] = []
        self.updates = 0
        self.types: set[str] = set()

    def on_frame(self, f: dict[str, Any]) -> None:
        if f.get("channel") != "orders":
            return
        d = f["data"]
        if f["type"] == "Snapshot":
            self.orders = {o["order_id"]: (o["symbol"], o["price_ticks"], o["qty_lots"], o["remaining_qty_lots"])
                           for o in d["orders"]}
            self.seq = f["seq"]
            return
        if self.seq is None:
            self.errors.append(f"{f['type']} before the Snapshot")
            return
        if f["prevSeq"] != self.seq or f["seq"] != self.seq + 1:
            self.errors.append(f"chain: seq {f['seq']} prevSeq {f['prevSeq']} after {self.seq}")
        self.seq = f["seq"]
        self.updates += 1
        self.types.add(f["type"])
        oid = d.get("order_id")
        if f["type"] == "OrderAccepted":
            if d["type"] == "LIMIT" and d["tif"] == "GTC":
                self.orders[oid] = (d["symbol"], d["price_ticks"], d["qty_lots"], d["qty_lots"])
        elif f["type"] == "OrderFilled":
            if oid in self.orders:
                sym, px, qty, _ = self.orders[oid]
                if d["remaining_qty_lots"] > 0:
                    self.orders[oid] = (sym, px, qty, d["remaining_qty_lots"])
                else:
                    del self.orders[oid]
        elif f["type"] == "OrderAmended":
            if oid in self.orders:
                if d["remaining_qty_lots"] > 0:
                    self.orders[oid] = (d["symbol"], d["price_ticks"], d["qty_lots"], d["remaining_qty_lots"])
                else:
                    del self.orders[oid]
        elif f["type"] == "OrderCanceled":
            self.orders.pop(oid, None)


async def _logon(ws: Any, key: Any) -> None:
    ts = str(int(time.time() * 1000))
    sig = hmac_signature(key.secret.encode(), signing_string("GET", "/v1/ws", ts, b""))
    await ws.send(json.dumps({"op": "LOGON", "apiKey": key.api_key, "ts": ts, "signature": sig}))


async def test_orders_channel_snapshot_then_chained_updates_equal_the_engine(nats_srv: Any, pg_dsn: str,
                                                                            tmp_path: Path) -> None:
    await migrate(pg_dsn)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        store = KeyStore(pool, SecretBox.from_file(tmp_path / "master.key", create=True))
        key = await store.create(ACCOUNT, ["read"])
        cmds = generate(11, 1600)
        async with CoreStack(nats_srv.url, tmp_path) as st:
            assert st.md is not None and st.hub is not None and st.edge is not None
            st.hub.verifier = RequestVerifier(store)
            await st.send(cmds[:800], "p1", chunk=50)
            await st.settle(802)
            # The projection's open orders are the engine's, for every trader.
            for acct in range(1000, 1006):
                mine = {o.order_id: (o.symbol, o.price_ticks, o.qty_lots, o.remaining_lots)
                        for o in st.md.open_orders_of(acct)}
                assert mine == _engine_open(st, acct), acct
            assert _engine_open(st, ACCOUNT), "the scenario must leave resting orders"

            ws = await websockets.connect(st.edge.ws_url, max_size=None)
            client = OrdersClient()
            frames: list[dict[str, Any]] = []

            def sink(f: dict[str, Any]) -> None:
                frames.append(f)
                client.on_frame(f)

            reader = asyncio.create_task(read_frames(ws, sink))
            await _logon(ws, key)
            await ws.send(json.dumps({"op": "SUB", "channel": "orders"}))
            for _ in range(500):
                if client.seq is not None:
                    break
                await asyncio.sleep(0.01)
            assert frames[0]["type"] == "Snapshot" and frames[0]["data"]["accountId"] == ACCOUNT
            snap = next(f for f in frames if f["type"] == "Snapshot" and f["channel"] == "orders")
            assert client.orders == _engine_open(st, ACCOUNT)
            assert set(snap["data"]["engineSeqs"]) >= {"BTC-USDT", "ETH-USDT"}

            await st.send(cmds[800:], "p2", chunk=50)
            await st.settle(1602)
            expected = _engine_open(st, ACCOUNT)
            for _ in range(500):  # the last flush
                if client.orders == expected:
                    break
                await asyncio.sleep(0.02)
            assert client.errors == []
            assert client.orders == expected
            assert client.updates > 20 and {"OrderAccepted", "OrderFilled", "OrderCanceled"} <= client.types

            # RESUME of a private channel: a fresh Snapshot (Missed HISTORY_GAP first when lastSeq is stale).
            n = len(frames)
            await ws.send(json.dumps({"op": "RESUME", "channel": "orders", "lastSeq": 1}))
            for _ in range(500):
                if any(f["type"] == "Snapshot" for f in frames[n:]):
                    break
                await asyncio.sleep(0.01)
            tail = [f["type"] for f in frames[n:]]
            assert tail[:2] == ["Missed", "Snapshot"] and frames[n]["data"]["reason"] == "HISTORY_GAP"
            assert client.orders == expected
            reader.cancel()
            await ws.close()
    finally:
        await pool.close()
