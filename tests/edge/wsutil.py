"""Helpers shared by the market-data / WebSocket tests: a real core + EVT + projections + edge stack,
synthetic events, and a WebSocket client that keeps a verified book."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

import nats
import websockets

from core.bus import cmd_subject, ensure_streams
from core.node import JOURNAL_STREAM, CoreNode, CoreOptions
from core.sim import sim_markets
from core.wire import BookDelta, Command, LevelChange, Side, TradeExecuted, encode_request
from edge.checksum import book_checksum_from_strings
from edge.marketdata import MarketData
from edge.ws import LocalEdge, WsHub, WsLimits

_ENV = dict(event_id="", correlation_id="c", causation_id="c", fencing_token=1)


def trade(symbol: str, seq: int, ts: int, price: int, qty: int, tid: int | None = None) -> TradeExecuted:
    return TradeExecuted(event_id=f"{symbol}:{seq}", symbol=symbol, seq=seq, occurred_at=ts, correlation_id="c",
                         causation_id="c", fencing_token=1, trade_id=tid or seq, taker_order_id=1,
                         taker_account_id=1000, taker_side=Side.BUY, maker_order_id=2, maker_account_id=1001,
                         price_ticks=price, qty_lots=qty, base_amount=qty, quote_amount=price * qty, taker_fee=0,
                         taker_fee_asset="BTC", maker_fee=0, maker_fee_asset="USDT", taker_remaining_lots=0,
                         maker_remaining_lots=0, moves=[])


def delta(symbol: str, seq: int, ts: int, levels: list[tuple[Side, int, int]]) -> BookDelta:
    return BookDelta(event_id=f"{symbol}:{seq}", symbol=symbol, seq=seq, occurred_at=ts, correlation_id="c",
                     causation_id="c", fencing_token=1, levels=[LevelChange(s, p, q) for s, p, q in levels])


class SyntheticFeed:
    """Feeds hand-made events for one symbol straight into MarketData (no bus)."""

    def __init__(self, md: MarketData, symbol: str = "BTC-USDT", ts0: int = 1_700_000_000_000) -> None:
        self.md, self.symbol, self.seq, self.ts = md, symbol, 0, ts0

    def _next(self) -> tuple[int, int]:
        self.seq += 1
        self.ts += 1
        return self.seq, self.ts

    def trades(self, n: int, price: int = 6_500_000, per_msg: int = 50) -> None:
        batch: list[Any] = []
        for i in range(n):
            s, t = self._next()
            batch.append(trade(self.symbol, s, t, price + (i % 7), 10 + i % 5))
            if len(batch) >= per_msg:
                self.md.apply_message(batch)
                batch = []
        if batch:
            self.md.apply_message(batch)

    def book(self, levels: list[tuple[Side, int, int]]) -> None:
        s, t = self._next()
        self.md.apply_message([delta(self.symbol, s, t, levels)])


class Edge:
    """MarketData + WsHub + LocalEdge without a core (synthetic feeds)."""

    def __init__(self, **limits: Any) -> None:
        self.md = MarketData(sim_markets())
        self.md.ready.set()
        self.hub = WsHub(self.md, WsLimits(**limits), None)
        self.edge = LocalEdge(self.md, self.hub)

    async def __aenter__(self) -> Edge:
        await self.edge.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.edge.stop()


class CoreStack:
    """A real CoreNode on the session nats-server, MarketData following EVT, and the edge app."""

    def __init__(self, url: str, tmp: Path, **limits: Any) -> None:
        self.url, self.tmp, self.limits = url, tmp, limits
        self.nc: Any = None
        self.js: Any = None
        self.node: CoreNode | None = None
        self.task: asyncio.Task[Any] | None = None
        self.md: MarketData | None = None
        self.hub: WsHub | None = None
        self.edge: LocalEdge | None = None
        self.snapshot_path: Path | None = None  # projection snapshots (saved explicitly by the tests)

    async def __aenter__(self) -> CoreStack:
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        for name in ("CMD", "EVT", JOURNAL_STREAM):
            with contextlib.suppress(Exception):
                await self.js.delete_stream(name)
        with contextlib.suppress(Exception):
            await self.js.delete_key_value("core_lease")
        await ensure_streams(self.js, lease_ttl_s=1.5)
        await self.start_core()
        await self.start_edge()
        return self

    async def start_core(self) -> None:
        opts = CoreOptions(node_id="a", nats_url=self.url, core_dir=str(self.tmp / f"core-{uuid.uuid4().hex[:6]}"),
                           lease_ttl_ms=1500, checkpoint_every=25, snapshot_every=10_000, markets=sim_markets(),
                           ack_wait_s=2.0)
        self.node = CoreNode(opts)
        self.task = asyncio.create_task(self.node.run())
        for _ in range(300):
            if self.node.role == "leader" and self.node.engine.last_seq >= 2:
                break
            await asyncio.sleep(0.02)

    async def start_edge(self) -> None:
        self.md = MarketData(sim_markets(), snapshot_path=self.snapshot_path, snapshot_every_s=0)
        await self.md.start(self.nc, self.js)
        self.hub = WsHub(self.md, WsLimits(**self.limits), None)
        self.edge = await LocalEdge(self.md, self.hub).start()

    async def stop_edge(self, *, save: bool = True) -> None:
        """``save=False``: as if the edge died, no final projection snapshot."""
        assert self.edge is not None and self.md is not None
        await self.edge.stop()
        await self.md.stop(save=save)

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.stop_edge()
        if self.node is not None:
            self.node.stopping.set()
        if self.task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.task, 10)
            if not self.task.done():
                self.task.cancel()
                with contextlib.suppress(BaseException):
                    await self.task
        if self.node is not None:
            with contextlib.suppress(Exception):
                await self.node.close()
        # Leftover tasks of this node (lease renewal, checkpoint watch) must not outlive the test:
        # the next test deletes and recreates the streams and a stray node would write into them.
        for t in asyncio.all_tasks():
            if t is not asyncio.current_task() and "CoreNode" in repr(t.get_coro()):
                t.cancel()
        await self.nc.close()

    async def send(self, cmds: list[Command], prefix: str, chunk: int = 0) -> None:
        """Publish to CMD; with ``chunk``, in acked chunks of that many so the core sequences many
        small batches (many EVT messages) instead of a few large ones."""
        futs = []
        for i, c in enumerate(cmds):
            futs.append(await self.js.publish_async(cmd_subject(getattr(c, "symbol", None)), encode_request(c),
                                                    headers={"Nats-Msg-Id": f"{prefix}-{i}"}))
            if chunk and len(futs) >= chunk:
                await asyncio.gather(*futs)
                futs = []
                await asyncio.sleep(0.003)
        await asyncio.gather(*futs)

    async def settle(self, seq: int, timeout: float = 60.0) -> None:
        """Until the core sequenced ``seq`` commands and the projections applied every event it
        produced (per stream: the engine's last seq, so an event still being published is waited for)."""
        assert self.node is not None and self.md is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            engine = self.node.engine
            streams = engine.stream_seqs().items()
            if engine.last_seq >= seq and all(self.md.stream_seq.get(s, 0) >= n for s, n in streams):
                return
            if loop.time() > deadline:
                raise AssertionError(f"core at {engine.last_seq}/{seq}, streams {engine.stream_seqs()}, "
                                     f"md at {self.md.stream_seq}")
            await asyncio.sleep(0.05)


class BookClient:
    """Keeps a book from Snapshot + OrderbookUpdated frames, checking every checksum and the
    prevSeq chain; records every frame by type."""

    def __init__(self) -> None:
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.seq: int | None = None
        self.checked = 0
        self.errors: list[str] = []
        self.frames: list[dict[str, Any]] = []

    def sorted_levels(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        from decimal import Decimal

        bids = sorted(self.bids.items(), key=lambda kv: Decimal(kv[0]), reverse=True)
        asks = sorted(self.asks.items(), key=lambda kv: Decimal(kv[0]))
        return bids, asks

    def on_frame(self, f: dict[str, Any]) -> None:
        self.frames.append(f)
        if f.get("channel") != "book":
            return
        if f["type"] == "Snapshot":
            self.bids = {p: q for p, q in f["data"]["bids"]}
            self.asks = {p: q for p, q in f["data"]["asks"]}
            self.seq = f["seq"]
        elif f["type"] == "OrderbookUpdated":
            if self.seq is None:
                return
            if f["prevSeq"] != self.seq:
                self.errors.append(f"chain: prevSeq {f['prevSeq']} != {self.seq}")
            for side, book in (("bids", self.bids), ("asks", self.asks)):
                for p, q in f["data"][side]:
                    if q.strip("0.") == "":
                        book.pop(p, None)
                    else:
                        book[p] = q
            self.seq = f["seq"]
        else:
            return
        bids, asks = self.sorted_levels()
        if book_checksum_from_strings(bids, asks) != f["data"]["checksum"]:
            self.errors.append(f"checksum mismatch at seq {f['seq']}")
        self.checked += 1


async def read_frames(ws: Any, sink: Any, stop: asyncio.Event | None = None) -> None:
    with contextlib.suppress(websockets.ConnectionClosed, asyncio.CancelledError):
        async for raw in ws:
            sink(json.loads(raw))
            if stop is not None and stop.is_set():
                return
