"""Projections (book, trades, candles, ticker) and their REST routes."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import httpx
import msgspec
import websockets
from litestar import Litestar
from litestar.testing import TestClient

from core.sim import generate, sim_markets
from core.wire import Side, lots_to_qty, minor_to_amount, ticks_to_price
from edge.checksum import book_checksum_from_strings
from edge.marketdata import Formatter, MarketData, marketdata_routes
from tests.edge.wsutil import CoreStack, SyntheticFeed, delta, trade

T0 = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000  # a UTC midnight


def _md() -> MarketData:
    md = MarketData(sim_markets())
    md.ready.set()
    return md


def test_formatter_equals_wire_helpers() -> None:
    rng = random.Random(3)
    for cfg in sim_markets():
        f = Formatter(cfg)
        for _ in range(500):
            n = rng.randint(0, 10**12)
            assert f.price(n) == ticks_to_price(n, cfg)
            assert f.qty(n) == lots_to_qty(n, cfg)
            assert f.quote(n) == minor_to_amount(n, cfg.quote_scale)


def test_book_levels_and_republished_messages_are_ignored() -> None:
    md = _md()
    s = "BTC-USDT"
    md.apply_message([delta(s, 1, T0, [(Side.BUY, 100, 5), (Side.BUY, 101, 6), (Side.SELL, 103, 7)])])
    md.apply_message([delta(s, 2, T0, [(Side.BUY, 101, 0), (Side.SELL, 102, 1)])])
    assert md.apply_message([delta(s, 2, T0, [(Side.BUY, 100, 0)])]) is None  # duplicate seq
    snap = md.book(s, 20)
    assert snap.seq == 2 and snap.bids == [(100, 5)] and snap.asks == [(102, 1), (103, 7)]
    f = md.formatter(s)
    assert snap.checksum == book_checksum_from_strings([(f.price(100), f.qty(5))],
                                                       [(f.price(102), f.qty(1)), (f.price(103), f.qty(7))])
    assert md.book(s, 20).bids == md.book(s, 200).bids


def test_candles_close_on_event_time_and_ticker() -> None:
    md = _md()
    s = "BTC-USDT"
    md.apply_message([trade(s, 1, T0 + 1_000, 100, 2), trade(s, 2, T0 + 2_000, 110, 3)])
    c = md.candles(s, "1m", 10)
    assert len(c) == 1 and (c[0].open, c[0].high, c[0].low, c[0].close, c[0].volume_lots, c[0].trades) == (
        100, 110, 100, 110, 5, 2)
    assert not c[0].is_final
    # Any event of the market at or after the close time makes the candle final.
    upd = md.apply_message([delta(s, 3, T0 + 60_000, [(Side.BUY, 90, 1)])])
    assert upd is not None and ("1m", md.candles(s, "1m", 10)[0]) in upd.candles
    assert md.candles(s, "1m", 10)[0].is_final
    assert not md.candles(s, "5m", 10)[0].is_final
    md.apply_message([trade(s, 4, T0 + 61_000, 95, 1)])
    one = md.candles(s, "1m", 10)
    assert [x.open_ms for x in one] == [T0, T0 + 60_000] and one[1].open == 95
    assert md.candles(s, "1m", 1) == one[-1:]
    assert md.candles(s, "1m", 10, start_ms=T0 + 60_000) == one[1:]
    assert md.candles(s, "5m", 10)[0].trades == 3
    t = md.ticker(s)
    assert (t.last, t.open_24h, t.high_24h, t.low_24h, t.volume_24h_lots, t.best_bid) == (95, 100, 110, 95, 6, 90)
    assert t.seq == 4 and t.quote_volume_24h == 100 * 2 + 110 * 3 + 95
    # 24 h later the old trades leave the window.
    md.apply_message([trade(s, 5, T0 + 86_400_000 + 125_000, 120, 1)])
    t = md.ticker(s)
    assert (t.open_24h, t.low_24h, t.volume_24h_lots) == (120, 120, 1)
    assert md.candles(s, "1d", 10)[0].is_final


def test_trades_newest_first() -> None:
    md = _md()
    SyntheticFeed(md).trades(30)
    rows = md.trades("BTC-USDT", 5)
    assert [r.seq for r in rows] == [30, 29, 28, 27, 26]


def _client(md: MarketData) -> TestClient[Any]:
    return TestClient(Litestar(route_handlers=marketdata_routes(md)))


def test_rest_routes_decimal_strings_and_problems() -> None:
    md = _md()
    feed = SyntheticFeed(md)
    feed.book([(Side.BUY, 6_500_010, 100), (Side.SELL, 6_500_020, 5)])
    feed.trades(3)
    with _client(md) as c:
        r = c.get("/v1/markets/BTC-USDT/orderbook", params={"depth": 50})
        assert r.status_code == 200
        b = r.json()
        assert b["bids"] == [["65000.10", "0.00100"]] and b["asks"] == [["65000.20", "0.00005"]]
        assert b["seq"] == 1 and isinstance(b["checksum"], int)
        assert b["checksum"] == book_checksum_from_strings([("65000.10", "0.00100")], [("65000.20", "0.00005")])
        t = c.get("/v1/markets/BTC-USDT/trades", params={"limit": 2}).json()
        assert t["seq"] == 4 and [x["seq"] for x in t["trades"]] == [4, 3]
        assert t["trades"][0]["price"] == "65000.02" and t["trades"][0]["takerSide"] == "BUY"
        k = c.get("/v1/markets/BTC-USDT/candles", params={"interval": "1h"}).json()
        assert k["interval"] == "1h" and k["candles"][0]["trades"] == 3 and k["candles"][0]["isFinal"] is False
        tk = c.get("/v1/markets/BTC-USDT/ticker").json()
        assert tk["bestBid"] == "65000.10" and tk["last"] == "65000.02" and tk["seq"] == 4
        for path, code, status in [("/v1/markets/NOPE-USDT/orderbook", "UNKNOWN_SYMBOL", 404),
                                   ("/v1/markets/NOPE-USDT/ticker", "UNKNOWN_SYMBOL", 404),
                                   ("/v1/markets/BTC-USDT/orderbook?depth=7", "VALIDATION", 400),
                                   ("/v1/markets/BTC-USDT/candles?interval=2m", "VALIDATION", 400)]:
            r = c.get(path)
            assert r.status_code == status, path
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == code


async def test_rest_over_a_real_socket() -> None:
    from tests.edge.wsutil import Edge

    async with Edge() as e:
        SyntheticFeed(e.md).trades(2)
        async with httpx.AsyncClient(base_url=e.edge.http_url) as http:
            r = await http.get("/v1/markets/ETH-USDT/orderbook")
            assert r.status_code == 200 and r.json()["bids"] == []
            assert (await http.get("/v1/markets/BTC-USDT/trades")).json()["seq"] == 2


def _state(md: MarketData) -> tuple[Any, ...]:
    """Everything a client can observe of the projections, per market, plus the account projections."""
    per = []
    for s in sorted(md.symbols()):
        per.append((md.book(s, 200), md.trades(s, 1000), *(md.candles(s, iv, 1500) for iv in ("1m", "5m", "1h", "1d")),
                    md.ticker(s), md.seq(s), md.mode(s)))
    accounts = sorted(set(md.balances) | set(md.open_orders))
    return (tuple(per), dict(md.stream_seq), {a: md.balances_of(a) for a in accounts},
            {a: [msgspec.to_builtins(o) for o in md.open_orders_of(a)] for a in accounts})


async def test_restart_loads_the_snapshot_and_replays_only_the_tail(nats_srv: Any, tmp_path: Path) -> None:
    snap = tmp_path / "md.snapshot"
    async with CoreStack(nats_srv.url, tmp_path) as st:
        st.snapshot_path = snap
        await st.stop_edge(save=False)
        await st.start_edge()
        assert st.md is not None
        cmds = generate(23, 2400)
        await st.send(cmds[:1200], "s1", chunk=40)
        await st.settle(1202)
        await st.md.save_snapshot()  # the periodic snapshot
        at = st.md.snapshot().evt_seq
        assert at > 0
        await st.send(cmds[1200:], "s2", chunk=40)
        await st.settle(2402)
        live = _state(st.md)
        live_book = st.md.book("BTC-USDT", 20)
        evt = await st.js.stream_info("EVT")
        tail = int(evt.state.last_seq) - at
        assert tail > 10
        await st.stop_edge(save=False)  # as if killed: the snapshot on disk is the periodic one

        await st.start_edge()
        md = st.md
        assert md is not None and md.errors == 0, md.last_error
        assert md.restored_evt_seq == at
        assert md.replayed_messages == tail  # only the tail, not all of EVT
        rebuilt = md.book("BTC-USDT", 20)
        assert (rebuilt.seq, rebuilt.checksum) == (live_book.seq, live_book.checksum)
        assert _state(md) == live
        # A clean stop writes a final snapshot: the next start replays nothing.
        await st.stop_edge()
        await st.start_edge()
        assert st.md is not None and st.md.replayed_messages == 0 and _state(st.md) == live

        # A damaged snapshot is refused (checksum) and the projections are rebuilt from all of EVT.
        data = bytearray(snap.read_bytes())
        data[-5] ^= 0xFF
        snap.write_bytes(bytes(data))
        await st.stop_edge(save=False)
        await st.start_edge()
        assert st.md is not None and st.md.restored_evt_seq == 0
        assert st.md.replayed_messages == int(evt.state.last_seq)
        assert _state(st.md) == live
        # The live hub keeps working on restored projections: a new subscriber's book verifies.
        assert st.edge is not None
        async with websockets.connect(st.edge.ws_url) as ws:
            await ws.send(json.dumps({"op": "SUB", "channel": "book", "symbol": "BTC-USDT", "depth": 20}))
            f = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert f["type"] == "Snapshot" and f["seq"] == live_book.seq
            assert f["data"]["checksum"] == live_book.checksum
