"""The WebSocket API over real sockets (uvicorn + websockets client)."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import websockets

from core.sim import generate
from core.wire import Side
from edge.checksum import book_checksum_from_strings
from tests.edge.wsutil import BookClient, CoreStack, Edge, SyntheticFeed, read_frames


async def _until(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _recv_json(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def test_book_from_snapshot_and_deltas_matches_rest_under_a_busy_market(nats_srv: Any, tmp_path: Path) -> None:
    async with CoreStack(nats_srv.url, tmp_path) as st:
        assert st.edge is not None and st.md is not None
        cmds = generate(21, 4000)
        clients: dict[int, BookClient] = {d: BookClient() for d in (20, 50, 200)}
        trades: list[dict[str, Any]] = []
        conns = []
        tasks = []
        for depth, bc in clients.items():
            ws = await websockets.connect(st.edge.ws_url, max_size=None)
            await ws.send(json.dumps({"op": "SUB", "channel": "book", "symbol": "BTC-USDT", "depth": depth}))
            if depth == 50:
                await ws.send(json.dumps({"op": "SUB", "channel": "trades", "symbol": "BTC-USDT"}))
                await ws.send(json.dumps({"op": "SUB", "channel": "candles", "symbol": "BTC-USDT", "interval": "1m"}))
                await ws.send(json.dumps({"op": "SUB", "channel": "ticker", "symbol": "BTC-USDT"}))

            def sink(f: dict[str, Any], bc: BookClient = bc) -> None:
                bc.on_frame(f)
                if f["type"] == "TradeExecuted":
                    trades.append(f)

            conns.append(ws)
            tasks.append(asyncio.create_task(read_frames(ws, sink)))
        await st.send(cmds[:2000], "a", chunk=10)
        # A subscriber that joins in the middle of the load.
        late = BookClient()
        ws = await websockets.connect(st.edge.ws_url, max_size=None)
        await ws.send(json.dumps({"op": "SUB", "channel": "book", "symbol": "BTC-USDT", "depth": 50}))
        conns.append(ws)
        tasks.append(asyncio.create_task(read_frames(ws, late.on_frame)))
        await st.send(cmds[2000:], "b", chunk=10)
        await st.settle(2 + len(cmds))
        await asyncio.sleep(0.5)  # last flush
        async with httpx.AsyncClient(base_url=st.edge.http_url) as http:
            for depth, bc in [*clients.items(), (50, late)]:
                r = await http.get("/v1/markets/BTC-USDT/orderbook", params={"depth": depth})
                assert r.status_code == 200
                rest = r.json()
                bids, asks = bc.sorted_levels()
                assert bc.errors == [], bc.errors[:5]
                assert bc.checked > 50, (depth, bc.checked, len(bc.frames))
                assert [list(x) for x in bids] == rest["bids"] and [list(x) for x in asks] == rest["asks"]
                assert book_checksum_from_strings(bids, asks) == rest["checksum"]
                assert bc.seq is not None and bc.seq <= rest["seq"]
            r = await http.get("/v1/markets/BTC-USDT/trades", params={"limit": 1000})
            rest_trades = r.json()["trades"]
        # Every trade, once, in order, chained by prevSeq.
        seqs = [t["seq"] for t in trades]
        assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
        assert all(t["prevSeq"] == p["seq"] for p, t in itertools.pairwise(trades))
        assert st.hub is not None
        ring = st.hub.channels[("trades", "BTC-USDT", None)].ring
        assert ring[0][1] == 0, "the ring holds every trade of this test"
        assert seqs == [s for s, _prev, _p in ring] and len(seqs) > 100
        assert {t["seq"] for t in rest_trades} <= set(seqs)
        types = {f["type"] for f in clients[50].frames}
        assert {"Snapshot", "OrderbookUpdated", "TradeExecuted", "CandleUpdated", "TickerUpdated"} <= types
        for t in tasks:
            t.cancel()
        for c in conns:
            await c.close()


async def test_projections_rebuild_from_evt_history(nats_srv: Any, tmp_path: Path) -> None:
    async with CoreStack(nats_srv.url, tmp_path) as st:
        assert st.md is not None
        await st.send(generate(5, 1500), "h")
        await st.settle(1502)
        before = (st.md.book("BTC-USDT", 200), st.md.trades("BTC-USDT", 1000), st.md.candles("BTC-USDT", "1m", 100),
                  st.md.ticker("BTC-USDT"), st.md.book("ETH-USDT", 200))
        await st.stop_edge()
        await st.start_edge()
        after = (st.md.book("BTC-USDT", 200), st.md.trades("BTC-USDT", 1000), st.md.candles("BTC-USDT", "1m", 100),
                 st.md.ticker("BTC-USDT"), st.md.book("ETH-USDT", 200))
        assert st.md.errors == 0, st.md.last_error
        assert after == before
        assert before[0].bids and before[1]


async def test_slow_consumer_is_closed_with_4001_after_shutdown_frame() -> None:
    async with Edge(lag_bytes=32 << 10, resume_bytes=8 << 10, slow_close_s=0.3, slow_episodes=100) as e:
        feed = SyntheticFeed(e.md)
        ws = await websockets.connect(e.edge.ws_url, max_queue=1, max_size=None)
        await ws.send(json.dumps({"op": "SUB", "channel": "trades", "symbol": "BTC-USDT"}))
        await _until(lambda: len(e.hub.conns) == 1 and any(c.subs for c in e.hub.conns), what="subscription")
        for _ in range(60):  # the client never reads: its backlog only grows
            feed.trades(1000, per_msg=100)
            await asyncio.sleep(0.02)
            if e.hub.closes.get("SLOW_CONSUMER"):
                break
        await _until(lambda: e.hub.closes.get("SLOW_CONSUMER", 0) == 1, what="SLOW_CONSUMER close")
        assert e.hub.stats["dropped"] > 0
        # Reading now: the backlog, then Shutdown, then the close code.
        frames = []
        try:
            while True:
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 4001 and exc.rcvd.reason == "SLOW_CONSUMER"
        assert frames[-1]["type"] == "Shutdown" and frames[-1]["data"]["reason"] == "SLOW_CONSUMER"
        assert len(e.hub.conns) == 0


def _lagging_edge() -> Edge:
    return Edge(lag_bytes=32 << 10, resume_bytes=4 << 10, slow_close_s=30, slow_episodes=100, ring_frames=100_000)


async def _lag(e: Edge, feed: SyntheticFeed) -> None:
    """Trades until the (only) connection, which is not reading, is LAGGING."""
    for _ in range(100):
        feed.trades(1000, per_msg=200)
        await asyncio.sleep(0.02)
        if any(c.lagging for c in e.hub.conns):
            break
    assert any(c.lagging for c in e.hub.conns)


async def test_lagging_client_gets_missed_then_resumes_from_buffer() -> None:
    async with _lagging_edge() as e:
        feed = SyntheticFeed(e.md)
        ws = await websockets.connect(e.edge.ws_url, max_queue=1, max_size=None)
        await ws.send(json.dumps({"op": "SUB", "channel": "trades", "symbol": "BTC-USDT"}))
        snap = await _recv_json(ws)
        assert snap["type"] == "Snapshot" and snap["seq"] == 0
        await _lag(e, feed)
        feed.trades(500)
        await asyncio.sleep(0.1)
        frames: list[dict[str, Any]] = []
        missed: dict[str, Any] | None = None

        async def drain() -> None:
            nonlocal missed
            while missed is None:  # the flush loop notices the recovery by itself
                f = await _recv_json(ws)
                frames.append(f)
                if f["type"] == "Missed":
                    missed = f

        await asyncio.wait_for(drain(), 30)
        assert missed is not None and missed["data"]["reason"] == "LAGGING"
        got = [f for f in frames if f["type"] == "TradeExecuted"]
        last = got[-1]["seq"]
        assert missed["data"]["fromSeq"] == last + 1
        # RESUME from the last trade seen: everything after it comes from the ring, in order.
        await ws.send(json.dumps({"op": "RESUME", "channel": "trades", "symbol": "BTC-USDT", "lastSeq": last}))
        replay: list[dict[str, Any]] = []
        while not replay or replay[-1]["seq"] < feed.seq:
            f = await _recv_json(ws, 15)
            if f["type"] == "TradeExecuted":
                replay.append(f)
        seqs = [f["seq"] for f in replay]
        assert seqs[0] == last + 1
        assert sorted(set(seqs)) == list(range(last + 1, feed.seq + 1))
        assert e.hub.stats["resume_gaps"] == 0
        await ws.close()


async def test_sub_and_resume_are_refused_while_the_backlog_is_full() -> None:
    # A client that stops reading and keeps asking for replays must not make the server buffer them.
    async with _lagging_edge() as e:
        feed = SyntheticFeed(e.md)
        ws = await websockets.connect(e.edge.ws_url, max_queue=1, max_size=None)
        await ws.send(json.dumps({"op": "SUB", "channel": "trades", "symbol": "BTC-USDT"}))
        await _until(lambda: len(e.hub.conns) == 1 and any(c.subs for c in e.hub.conns), what="subscription")
        await _lag(e, feed)
        conn = next(iter(e.hub.conns))
        before = conn.backlog()
        refused = e.hub.stats.get("frames_out", 0)
        for op in ({"op": "RESUME", "channel": "trades", "symbol": "BTC-USDT", "lastSeq": 0},
                   {"op": "SUB", "channel": "book", "symbol": "BTC-USDT", "depth": 200}):
            await ws.send(json.dumps(op))
        await asyncio.sleep(0.3)
        # Two Error frames (~200 bytes each) were added, not a replay of thousands of trades or a book.
        assert conn.backlog() - before < 2_000, (before, conn.backlog())
        assert e.hub.stats["frames_out"] - refused == 2
        assert ("book", "BTC-USDT", 200) not in conn.subs
        errors: list[dict[str, Any]] = []

        async def drain() -> None:
            while len(errors) < 2:
                f = await _recv_json(ws)
                if f["type"] == "Error":
                    errors.append(f["data"])

        await asyncio.wait_for(drain(), 30)
        assert [(x["code"], x["op"]) for x in errors] == [("BACKLOG_FULL", "RESUME"), ("BACKLOG_FULL", "SUB")]
        # Once read (the flush recovers it), the same RESUME is answered from the ring.
        await _until(lambda: not conn.lagging, what="recovery")
        await ws.send(json.dumps({"op": "RESUME", "channel": "trades", "symbol": "BTC-USDT", "lastSeq": feed.seq - 5}))
        got: list[int] = []
        while len(got) < 5:
            f = await _recv_json(ws, 15)
            if f["type"] == "TradeExecuted" and f["seq"] > feed.seq - 5:
                got.append(f["seq"])
        assert got == list(range(feed.seq - 4, feed.seq + 1))
        await ws.close()


async def test_resume_gap_sends_missed_then_snapshot_and_counts() -> None:
    from prometheus_client import REGISTRY

    async with Edge(ring_frames=100) as e:
        feed = SyntheticFeed(e.md)
        before = REGISTRY.get_sample_value("ws_resume_gaps_total") or 0.0
        feed.trades(300)
        ws = await websockets.connect(e.edge.ws_url)
        await ws.send(json.dumps({"op": "RESUME", "channel": "trades", "symbol": "BTC-USDT", "lastSeq": 10}))
        m = await _recv_json(ws)
        assert m["type"] == "Missed" and m["data"]["reason"] == "HISTORY_GAP" and m["data"]["lastSeq"] == 10
        s = await _recv_json(ws)
        assert s["type"] == "Snapshot" and s["seq"] == 300 and s["data"]["trades"][0]["seq"] == 300
        assert e.hub.stats["resume_gaps"] == 1
        assert (REGISTRY.get_sample_value("ws_resume_gaps_total") or 0.0) == before + 1
        # Inside the ring: only the frames after lastSeq, no Missed.
        ws2 = await websockets.connect(e.edge.ws_url)
        await ws2.send(json.dumps({"op": "RESUME", "channel": "trades", "symbol": "BTC-USDT", "lastSeq": 290}))
        got = [await _recv_json(ws2) for _ in range(10)]
        assert [f["seq"] for f in got] == list(range(291, 301))
        assert all(f["type"] == "TradeExecuted" for f in got)
        feed.trades(3)
        nxt = await _recv_json(ws2)
        assert nxt["seq"] == 301 and nxt["prevSeq"] == 300
        assert e.hub.stats["resume_gaps"] == 1
        await ws.close()
        await ws2.close()


async def test_overload_conflates_book_and_ticker_and_lowers_default_depth() -> None:
    async with Edge(conflate_ms=300) as e:
        feed = SyntheticFeed(e.md)
        for i in range(30):
            feed.book([(Side.BUY, 6_500_000 - i, 100), (Side.SELL, 6_500_100 + i, 100)])
        e.hub.set_overload(True)
        ws = await websockets.connect(e.edge.ws_url, max_size=None)
        await ws.send(json.dumps({"op": "SUB", "channel": "book", "symbol": "BTC-USDT"}))
        await ws.send(json.dumps({"op": "SUB", "channel": "ticker", "symbol": "BTC-USDT"}))
        await ws.send(json.dumps({"op": "SUB", "channel": "trades", "symbol": "BTC-USDT"}))
        bc = BookClient()
        task = asyncio.create_task(read_frames(ws, bc.on_frame))
        await _until(lambda: len([f for f in bc.frames if f["type"] == "Snapshot"]) == 3, what="snapshots")
        snap = next(f for f in bc.frames if f["channel"] == "book")
        assert snap["data"]["depth"] == 20 and len(snap["data"]["bids"]) == 20
        for i in range(600):
            feed.book([(Side.BUY, 6_500_000 - (i % 25), 100 + i)])
            if i % 10 == 0:
                feed.trades(1)
            if i % 100 == 0:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.8)
        upd = [f for f in bc.frames if f["type"] == "OrderbookUpdated"]
        tick = [f for f in bc.frames if f["type"] == "TickerUpdated"]
        trades = [f for f in bc.frames if f["type"] == "TradeExecuted"]
        assert 1 <= len(upd) <= 10, len(upd)
        assert all(f["data"].get("conflated") for f in upd)
        assert 1 <= len(tick) <= 10
        assert len(trades) == 60  # trades are never conflated
        assert bc.errors == []
        snap20 = e.md.book("BTC-USDT", 20)
        bids, _ = bc.sorted_levels()
        f = e.md.formatter("BTC-USDT")
        assert bids == [(f.price(p), f.qty(q)) for p, q in snap20.bids]
        e.hub.set_overload(False)
        n = len(bc.frames)
        feed.book([(Side.BUY, 6_500_000, 7)])
        await _until(lambda: len(bc.frames) > n, what="unconflated delta")
        assert "conflated" not in bc.frames[-1]["data"] and bc.errors == []
        task.cancel()
        await ws.close()


async def test_limits_errors_heartbeat_and_shutdown() -> None:
    async with Edge(max_subscriptions=2, commands_per_s=1, commands_burst=7, max_connections_per_ip=2,
                    heartbeat_s=0.2) as e:
        ws = await websockets.connect(e.edge.ws_url)
        await ws.send(json.dumps({"op": "PING", "id": 7}))
        pong = await _recv_json(ws)
        assert pong["type"] == "Pong" and pong["data"]["id"] == 7
        await ws.send(json.dumps({"op": "SUB", "channel": "book", "symbol": "BTC-USDT", "depth": 7}))
        assert (await _recv_json(ws))["data"]["code"] == "INVALID_DEPTH"
        await ws.send(json.dumps({"op": "SUB", "channel": "trades", "symbol": "NOPE-USDT"}))
        assert (await _recv_json(ws))["data"]["code"] == "UNKNOWN_SYMBOL"
        await ws.send(json.dumps({"op": "SUB", "channel": "orders"}))
        assert (await _recv_json(ws))["data"]["code"] == "AUTH_REQUIRED"
        await ws.send(json.dumps({"op": "SUB", "channel": "trades", "symbol": "BTC-USDT"}))
        await ws.send(json.dumps({"op": "SUB", "channel": "trades", "symbol": "ETH-USDT"}))
        await ws.send(json.dumps({"op": "SUB", "channel": "ticker", "symbol": "ETH-USDT"}))
        seen: list[dict[str, Any]] = []
        while not any(f["type"] == "Error" for f in seen):
            seen.append(await _recv_json(ws))
        err = next(f for f in seen if f["type"] == "Error")
        assert err["data"]["code"] == "TOO_MANY_SUBSCRIPTIONS"
        for _ in range(5):
            await ws.send(json.dumps({"op": "PING"}))
        codes = []
        for _ in range(10):
            f = await _recv_json(ws)
            if f["type"] == "Error":
                codes.append(f["data"]["code"])
            if "RATE_LIMITED" in codes:
                break
        assert "RATE_LIMITED" in codes
        hb = None
        for _ in range(20):
            f = await _recv_json(ws)
            if f["type"] == "Heartbeat":
                hb = f
                break
        assert hb is not None
        # Connections per IP.
        ws2 = await websockets.connect(e.edge.ws_url)
        ws3 = await websockets.connect(e.edge.ws_url)
        f = await _recv_json(ws3)
        assert f["type"] == "Error" and f["data"]["code"] == "TOO_MANY_CONNECTIONS"
        assert (await _recv_json(ws3))["type"] == "Shutdown"
        try:
            await asyncio.wait_for(ws3.recv(), 5)
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 1008
        # Shutdown before the server closes.
        await e.hub.stop()
        frames = []
        try:
            while True:
                frames.append(json.loads(await asyncio.wait_for(ws2.recv(), 5)))
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 1001
        assert frames and frames[-1]["type"] == "Shutdown"
        assert e.hub.closes.get("SHUTDOWN", 0) >= 2


async def test_logon_and_private_channels() -> None:
    import time

    from edge.auth import ApiKeyInfo, RequestVerifier, ResolvedKey, hmac_signature, signing_string
    from tests.edge.wsutil import trade

    class Keys:
        async def get(self, api_key: str) -> ResolvedKey | None:
            if api_key != "k1":
                return None
            return ResolvedKey(ApiKeyInfo("k1", 1000, "hmac", frozenset({"read"}), "", 0), hmac_secret=b"s3cret")

    async with Edge() as e:
        e.hub.verifier = RequestVerifier(Keys())
        ws = await websockets.connect(e.edge.ws_url)
        ts = str(int(time.time() * 1000))
        await ws.send(json.dumps({"op": "LOGON", "apiKey": "k1", "ts": ts, "signature": "00" * 32}))
        assert (await _recv_json(ws))["data"]["code"] == "AUTH_BAD_SIGNATURE"
        sig = hmac_signature(b"s3cret", signing_string("GET", "/v1/ws", ts, b""))
        await ws.send(json.dumps({"op": "LOGON", "apiKey": "k1", "ts": ts, "signature": sig}))
        ok = await _recv_json(ws)
        assert ok["type"] == "Snapshot" and ok["data"]["accountId"] == 1000
        await ws.send(json.dumps({"op": "LOGON", "apiKey": "k1", "ts": ts, "signature": sig}))
        assert (await _recv_json(ws))["data"]["code"] == "AUTH_REPLAY"
        await ws.send(json.dumps({"op": "SUB", "channel": "fills"}))
        assert (await _recv_json(ws))["type"] == "Snapshot"
        e.md.apply_message([trade("BTC-USDT", 1, 1_700_000_000_000, 6_500_000, 10)])  # taker account 1000
        fill = await _recv_json(ws)
        assert fill["type"] == "TradeExecuted" and fill["channel"] == "fills" and fill["data"]["role"] == "TAKER"
        await ws.close()
