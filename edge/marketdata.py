"""Market-data projections fed from the EVT stream: L2 book, trades, candles, 24h ticker.

:class:`MarketData` replays EVT from its first message on start (an ordered push consumer, so
JetStream hands the history and then the live tail through the same subscription, with no gap
between them), applies every message of a market's stream in ``seq`` order and exposes:

- ``book(symbol, depth)``: the L2 book (integer ticks / lots, best first) with the ``seq`` of the
  last event that changed it and its CRC32 checksum (:mod:`edge.checksum`);
- ``trades(symbol, limit)``: the most recent trades (newest first);
- ``candles(symbol, interval, ...)``: 1m/5m/1h/1d OHLCV; a candle becomes ``is_final`` when the
  first event of its market at or after its close time is applied, so finality depends on event time
  only and a rebuild from EVT gives the same candles;
- ``ticker(symbol)``: 24h rolling statistics from the 1m candles (minute granularity).

Every applied message produces one :class:`MarketUpdate` handed to the listeners (the WebSocket
hub) synchronously, so a listener always sees projections and updates in the same order.

:func:`marketdata_routes` gives the public REST handlers (decimal strings, RFC 9457 errors).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from litestar import Response, get
from litestar.params import FromPath, FromQuery, QueryParameter
from prometheus_client import Counter, Gauge

from core.bus import EVT_PREFIX, SYS_STREAM
from core.wire import (
    BookDelta,
    Event,
    MarketAdded,
    MarketConfig,
    Side,
    SymbolModeChanged,
    TradeExecuted,
    decode_events,
)
from edge.checksum import book_checksum, unit_digits
from edge.errors import PROBLEM_CONTENT_TYPE, SpotexError, to_problem

__all__ = [
    "BOOK_DEPTHS",
    "INTERVALS",
    "BookSnapshot",
    "CandleRow",
    "Formatter",
    "MarketData",
    "MarketUpdate",
    "TickerRow",
    "TradeRow",
    "marketdata_routes",
]

log = logging.getLogger("spotex.edge.marketdata")

BOOK_DEPTHS = (20, 50, 200)
INTERVALS: dict[str, int] = {"1m": 60_000, "5m": 300_000, "1h": 3_600_000, "1d": 86_400_000}
DAY_MS = 86_400_000
TRADES_KEPT = 1_000
CANDLES_KEPT = 1_500  # >= 1440 one-minute candles: the ticker's 24 h window

MD_EVENTS = Counter("md_events_applied_total", "Events applied to the market-data projections")
MD_GAPS = Counter("md_stream_gaps_total", "EVT messages whose first seq skipped ahead of the projection")
MD_ERRORS = Counter("md_apply_errors_total", "EVT messages the projections failed to apply")
MD_SEQ = Gauge("md_applied_seq", "Last stream seq applied to the market-data projections", ["symbol"])


class BookSnapshot(msgspec.Struct, frozen=True):
    symbol: str
    seq: int
    bids: list[tuple[int, int]]
    asks: list[tuple[int, int]]
    checksum: int


class TradeRow(msgspec.Struct, frozen=True):
    trade_id: int
    seq: int
    price_ticks: int
    qty_lots: int
    quote_amount: int  # quote minor units
    taker_side: str
    ts_ms: int


class CandleRow(msgspec.Struct, frozen=True):
    open_ms: int
    close_ms: int  # exclusive: open_ms + interval
    open: int
    high: int
    low: int
    close: int
    volume_lots: int
    quote_volume: int  # quote minor units
    trades: int
    is_final: bool


class TickerRow(msgspec.Struct, frozen=True):
    symbol: str
    seq: int
    last: int | None
    open_24h: int | None
    high_24h: int | None
    low_24h: int | None
    volume_24h_lots: int
    quote_volume_24h: int
    best_bid: int | None
    best_ask: int | None
    ts_ms: int


class Formatter:
    """Integer -> decimal string for one market, equal to core.wire's helpers but without parsing
    the unit on every call (the WS hub formats every level it sends)."""

    __slots__ = ("_pd", "_pu", "_qd", "_qs", "_qu")

    def __init__(self, cfg: MarketConfig) -> None:
        self._pu, self._pd = unit_digits(cfg.tick_size), _decimals(cfg.tick_size)
        self._qu, self._qd = unit_digits(cfg.lot_size), _decimals(cfg.lot_size)
        self._qs = cfg.quote_scale

    @staticmethod
    def _fmt(n: int, decimals: int) -> str:
        if decimals == 0:
            return str(n)
        sign = "-" if n < 0 else ""
        s = str(abs(n)).rjust(decimals + 1, "0")
        return f"{sign}{s[:-decimals]}.{s[-decimals:]}"

    def price(self, ticks: int) -> str:
        return self._fmt(ticks * self._pu, self._pd)

    def qty(self, lots: int) -> str:
        return self._fmt(lots * self._qu, self._qd)

    def quote(self, minor: int) -> str:
        return self._fmt(minor, self._qs)

    def opt_price(self, ticks: int | None) -> str | None:
        return None if ticks is None else self.price(ticks)


def _decimals(size: str) -> int:
    return len(size.split(".", 1)[1]) if "." in size else 0


class _Book:
    """One side each: price -> qty and a sorted price list (bisect), bids best = last."""

    __slots__ = ("ask_px", "asks", "bid_px", "bids")

    def __init__(self) -> None:
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.bid_px: list[int] = []
        self.ask_px: list[int] = []

    def set(self, side: Side, price: int, qty: int) -> None:
        levels, px = (self.bids, self.bid_px) if side is Side.BUY else (self.asks, self.ask_px)
        if qty > 0:
            if price not in levels:
                bisect.insort(px, price)
            levels[price] = qty
        elif price in levels:
            del levels[price]
            i = bisect.bisect_left(px, price)
            del px[i]

    def top_bid_prices(self, n: int) -> list[int]:
        return self.bid_px[: -n - 1 : -1] if n else []

    def top_ask_prices(self, n: int) -> list[int]:
        return self.ask_px[:n]

    def top(self, n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        b, a = self.bids, self.asks
        return ([(p, b[p]) for p in self.top_bid_prices(n)], [(p, a[p]) for p in self.top_ask_prices(n)])


class _Candle:
    __slots__ = ("c", "close_ms", "final", "h", "l", "n", "o", "open_ms", "qvol", "vol")

    def __init__(self, open_ms: int, iv: int, price: int) -> None:
        self.open_ms, self.close_ms = open_ms, open_ms + iv
        self.o = self.h = self.l = self.c = price
        self.vol = self.qvol = self.n = 0
        self.final = False

    def row(self) -> CandleRow:
        return CandleRow(self.open_ms, self.close_ms, self.o, self.h, self.l, self.c, self.vol, self.qvol, self.n,
                         self.final)


class MarketUpdate:
    """What one applied EVT message changed on one stream. ``changes`` are the book's net level
    changes ``(side, price_ticks, qty_lots)`` (0 = removed) in first-touched order; ``old_tops`` the
    best prices per tracked depth before the message (``{depth: (bid_prices, ask_prices)}``), so a
    listener can tell which levels entered or left a depth-limited view."""

    __slots__ = (
        "book_seq",
        "candles",
        "changes",
        "checksum",
        "events",
        "old_tops",
        "seq",
        "symbol",
        "ticker_changed",
        "trades",
        "ts_ms",
    )

    def __init__(self, symbol: str, seq: int, ts_ms: int, events: list[Event]) -> None:
        self.symbol = symbol
        self.seq = seq
        self.ts_ms = ts_ms
        self.events = events
        self.book_seq = 0
        self.changes: list[tuple[Side, int, int]] = []
        self.old_tops: dict[int, tuple[list[int], list[int]]] = {}
        self.checksum = 0
        self.trades: list[TradeRow] = []
        self.candles: list[tuple[str, CandleRow]] = []
        self.ticker_changed = False


class _Market:
    def __init__(self, cfg: MarketConfig) -> None:
        self.cfg = cfg
        self.fmt = Formatter(cfg)
        self.units = (unit_digits(cfg.tick_size), unit_digits(cfg.lot_size))
        self.book = _Book()
        self.seq = 0
        self.book_seq = 0
        self.ts_ms = 0
        self.mode = "NORMAL"
        self.trades: deque[TradeRow] = deque(maxlen=TRADES_KEPT)
        self.candles: dict[str, dict[int, _Candle]] = {k: {} for k in INTERVALS}
        self.current: dict[str, _Candle | None] = dict.fromkeys(INTERVALS)
        self.checksum = 0
        self._ticker: TickerRow | None = None

    def checksum_now(self) -> int:
        b = self.book
        return book_checksum(((p, b.bids[p]) for p in reversed(b.bid_px)), ((p, b.asks[p]) for p in b.ask_px),
                             *self.units)


class MarketData:
    """The projections. Not thread-safe: everything runs on the edge's event loop."""

    def __init__(self, markets: list[MarketConfig]) -> None:
        self._markets: dict[str, _Market] = {m.symbol: _Market(m) for m in markets}
        self.listeners: list[Callable[[MarketUpdate], None]] = []
        self.tracked_depths: set[int] = set(BOOK_DEPTHS)
        self.balances: dict[int, dict[str, list[int]]] = {}  # account -> asset -> [available, hold]
        self.stream_seq: dict[str, int] = {}
        self.gaps = 0
        self.errors = 0
        self.last_error = ""
        self.ready = asyncio.Event()
        self.applied_messages = 0
        self._sub: Any = None
        self._js: Any = None
        self._caught_up_at = 0
        self._last_stream_seq = 0

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self, nc: Any, js: Any, evt_stream: str = "EVT") -> None:
        """Replay EVT from its first message, then follow it live. Returns once the history present
        at the call has been applied (``ready`` is set then)."""
        self._js = js
        try:
            info = await js.stream_info(evt_stream)
            self._caught_up_at = int(info.state.last_seq)
        except Exception:  # no stream yet: nothing to replay
            self._caught_up_at = 0
        if self._caught_up_at == 0:
            self.ready.set()
        self._sub = await js.subscribe(f"{EVT_PREFIX}.>", cb=self._on_msg, ordered_consumer=True,
                                       stream=evt_stream)
        await self.ready.wait()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Any) -> None:
        try:
            events = decode_events(msg.data)
            self.apply_message(events)
        except Exception as exc:
            self.errors += 1
            self.last_error = repr(exc)
            MD_ERRORS.inc()
            log.exception("market data: could not apply an EVT message")
        try:
            sseq = int(msg.metadata.sequence.stream)
        except Exception:
            sseq = self._last_stream_seq + 1
        self._last_stream_seq = sseq
        if not self.ready.is_set() and sseq >= self._caught_up_at:
            self.ready.set()

    # ---- applying events ------------------------------------------------------------------------

    def apply_message(self, events: list[Event]) -> MarketUpdate | None:
        """Apply one EVT message (the events of one stream, contiguous seqs). Returns the update
        handed to the listeners, or None when nothing new was in it."""
        if not events:
            return None
        stream = events[0].symbol
        last = self.stream_seq.get(stream, 0)
        if events[-1].seq <= last:
            return None  # a republished message we already have
        if events[0].seq <= last:
            events = [e for e in events if e.seq > last]
        elif events[0].seq != last + 1:
            self.gaps += 1
            MD_GAPS.inc()
            log.warning("market data: %s jumped from seq %d to %d", stream, last, events[0].seq)
        self.stream_seq[stream] = events[-1].seq
        self.applied_messages += 1
        MD_EVENTS.inc(len(events))
        upd = MarketUpdate(stream, events[-1].seq, events[-1].occurred_at, events)
        self._apply_balances(events)
        m = self._markets.get(stream)
        if m is None:
            for e in events:
                if isinstance(e, MarketAdded) and e.config.symbol == stream:
                    m = self._markets[stream] = _Market(e.config)
                    break
        if m is not None and stream != SYS_STREAM:
            self._apply_market(m, events, upd)
            MD_SEQ.labels(stream).set(m.seq)
        for fn in self.listeners:
            try:
                fn(upd)
            except Exception:
                log.exception("market data listener failed")
        return upd

    def _apply_balances(self, events: list[Event]) -> None:
        bal = self.balances
        for e in events:
            moves = getattr(e, "moves", None)
            if not moves:
                continue
            for mv in moves:
                acct = bal.get(mv.account_id)
                if acct is None:
                    acct = bal[mv.account_id] = {}
                row = acct.get(mv.asset)
                if row is None:
                    row = acct[mv.asset] = [0, 0]
                row[0 if mv.bucket == "available" else 1] += mv.delta

    def _apply_market(self, m: _Market, events: list[Event], upd: MarketUpdate) -> None:
        book = m.book
        has_book = False
        for e in events:
            if isinstance(e, BookDelta):
                has_book = True
                break
        if has_book:
            for d in self.tracked_depths:
                upd.old_tops[d] = (book.top_bid_prices(d), book.top_ask_prices(d))
        changes: dict[tuple[Side, int], int] = {}
        for e in events:
            ts = e.occurred_at
            self._close_candles(m, ts, upd)
            if isinstance(e, BookDelta):
                for lc in e.levels:
                    book.set(lc.side, lc.price_ticks, lc.qty_lots)
                    changes[(lc.side, lc.price_ticks)] = lc.qty_lots
                m.book_seq = e.seq
            elif isinstance(e, TradeExecuted):
                row = TradeRow(e.trade_id, e.seq, e.price_ticks, e.qty_lots, e.quote_amount, str(e.taker_side), ts)
                m.trades.append(row)
                upd.trades.append(row)
                self._candle_trade(m, row, upd)
            elif isinstance(e, SymbolModeChanged):
                m.mode = str(e.mode)
            m.seq = e.seq
            m.ts_ms = ts
        if has_book:
            upd.changes = [(s, p, q) for (s, p), q in changes.items()]
            m.checksum = m.checksum_now()
        upd.book_seq = m.book_seq
        upd.checksum = m.checksum
        upd.ticker_changed = bool(upd.trades) or has_book
        if upd.ticker_changed:
            m._ticker = None

    def _close_candles(self, m: _Market, ts: int, upd: MarketUpdate) -> None:
        for name, cur in m.current.items():
            if cur is not None and ts >= cur.close_ms:
                cur.final = True
                m.current[name] = None
                upd.candles.append((name, cur.row()))

    def _candle_trade(self, m: _Market, t: TradeRow, upd: MarketUpdate) -> None:
        for name, iv in INTERVALS.items():
            open_ms = t.ts_ms - t.ts_ms % iv
            book = m.candles[name]
            c = book.get(open_ms)
            if c is None:
                c = book[open_ms] = _Candle(open_ms, iv, t.price_ticks)
                if len(book) > CANDLES_KEPT:
                    del book[next(iter(book))]
            if not c.final:
                m.current[name] = c
            # A trade stamped inside an already final candle (possible only if event time went
            # backwards, which the sequencer forbids) still updates it, and it is re-sent as final.
            if t.price_ticks > c.h:
                c.h = t.price_ticks
            if t.price_ticks < c.l:
                c.l = t.price_ticks
            c.c = t.price_ticks
            c.vol += t.qty_lots
            c.qvol += t.quote_amount
            c.n += 1
            upd.candles.append((name, c.row()))

    # ---- queries --------------------------------------------------------------------------------

    def symbols(self) -> list[str]:
        return list(self._markets)

    def has(self, symbol: str) -> bool:
        return symbol in self._markets

    def market(self, symbol: str) -> MarketConfig:
        return self._market(symbol).cfg

    def formatter(self, symbol: str) -> Formatter:
        return self._market(symbol).fmt

    def mode(self, symbol: str) -> str:
        return self._market(symbol).mode

    def seq(self, symbol: str) -> int:
        return self._market(symbol).seq

    def _market(self, symbol: str) -> _Market:
        m = self._markets.get(symbol)
        if m is None:
            raise KeyError(symbol)
        return m

    def book(self, symbol: str, depth: int) -> BookSnapshot:
        m = self._market(symbol)
        bids, asks = m.book.top(depth)
        return BookSnapshot(symbol, m.book_seq, bids, asks, m.checksum)

    def trades(self, symbol: str, limit: int) -> list[TradeRow]:
        m = self._market(symbol)
        n = min(limit, len(m.trades))
        return [m.trades[-1 - i] for i in range(n)]

    def candles(self, symbol: str, interval: str, limit: int, start_ms: int | None = None,
                end_ms: int | None = None) -> list[CandleRow]:
        """Oldest first, at most ``limit`` (the newest ones when more match)."""
        m = self._market(symbol)
        if interval not in INTERVALS:
            raise ValueError(f"interval must be one of {list(INTERVALS)}")
        rows = [c for c in m.candles[interval].values()
                if (start_ms is None or c.open_ms >= start_ms) and (end_ms is None or c.open_ms <= end_ms)]
        rows.sort(key=lambda c: c.open_ms)
        return [c.row() for c in rows[-limit:]] if limit > 0 else []

    def ticker(self, symbol: str) -> TickerRow:
        m = self._market(symbol)
        if m._ticker is not None and m._ticker.seq == m.seq:
            return m._ticker
        since = m.ts_ms - DAY_MS
        mins = sorted((c for c in m.candles["1m"].values() if c.close_ms > since), key=lambda c: c.open_ms)
        last = m.trades[-1].price_ticks if m.trades else None
        b = m.book
        t = TickerRow(
            symbol=symbol, seq=m.seq, last=last,
            open_24h=mins[0].o if mins else None,
            high_24h=max(c.h for c in mins) if mins else None,
            low_24h=min(c.l for c in mins) if mins else None,
            volume_24h_lots=sum(c.vol for c in mins), quote_volume_24h=sum(c.qvol for c in mins),
            best_bid=b.bid_px[-1] if b.bid_px else None, best_ask=b.ask_px[0] if b.ask_px else None,
            ts_ms=m.ts_ms,
        )
        m._ticker = t
        return t

    def balances_of(self, account_id: int) -> dict[str, tuple[int, int]]:
        return {a: (v[0], v[1]) for a, v in self.balances.get(account_id, {}).items()}


# ---- JSON shapes (decimal strings) ---------------------------------------------------------------


def book_json(md: MarketData, snap: BookSnapshot) -> dict[str, Any]:
    f = md.formatter(snap.symbol)
    return {"symbol": snap.symbol, "seq": snap.seq, "checksum": snap.checksum,
            "bids": [[f.price(p), f.qty(q)] for p, q in snap.bids],
            "asks": [[f.price(p), f.qty(q)] for p, q in snap.asks]}


def trade_json(f: Formatter, t: TradeRow) -> dict[str, Any]:
    return {"tradeId": t.trade_id, "seq": t.seq, "price": f.price(t.price_ticks), "qty": f.qty(t.qty_lots),
            "quoteQty": f.quote(t.quote_amount), "takerSide": t.taker_side, "ts": t.ts_ms}


def candle_json(f: Formatter, c: CandleRow) -> dict[str, Any]:
    return {"openTime": c.open_ms, "closeTime": c.close_ms, "open": f.price(c.open), "high": f.price(c.high),
            "low": f.price(c.low), "close": f.price(c.close), "volume": f.qty(c.volume_lots),
            "quoteVolume": f.quote(c.quote_volume), "trades": c.trades, "isFinal": c.is_final}


def ticker_json(f: Formatter, t: TickerRow) -> dict[str, Any]:
    return {"symbol": t.symbol, "seq": t.seq, "last": f.opt_price(t.last), "open24h": f.opt_price(t.open_24h),
            "high24h": f.opt_price(t.high_24h), "low24h": f.opt_price(t.low_24h),
            "volume24h": f.qty(t.volume_24h_lots), "quoteVolume24h": f.quote(t.quote_volume_24h),
            "bestBid": f.opt_price(t.best_bid), "bestAsk": f.opt_price(t.best_ask), "ts": t.ts_ms}


# ---- REST ----------------------------------------------------------------------------------------


def _problem(exc: SpotexError, path: str) -> Response[Any]:
    return Response(to_problem(exc, path), status_code=exc.status, media_type=PROBLEM_CONTENT_TYPE,
                    headers=exc.headers or None)


def _unknown(symbol: str, path: str) -> Response[Any]:
    return _problem(SpotexError("UNKNOWN_SYMBOL", status=404, title="Unknown symbol",
                                detail=f"{symbol!r} is not a listed market"), path)


def _invalid(detail: str, path: str) -> Response[Any]:
    return _problem(SpotexError("VALIDATION", detail=detail), path)


def _int(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SpotexError("VALIDATION", detail=f"{name} must be an integer") from None


def marketdata_routes(md: MarketData) -> list[Any]:
    """GET /v1/markets/{symbol}/orderbook|trades|candles|ticker. Errors are problem+json responses
    (returned, not raised, so they do not depend on the app's exception handlers)."""

    @get("/v1/markets/{symbol:str}/orderbook", sync_to_thread=False)
    def orderbook(symbol: FromPath[str], depth: FromQuery[str | None] = None) -> Response[Any]:
        path = f"/v1/markets/{symbol}/orderbook"
        if not md.has(symbol):
            return _unknown(symbol, path)
        try:
            d = _int(depth, "depth", 20)
        except SpotexError as exc:
            return _problem(exc, path)
        if d not in BOOK_DEPTHS:
            return _invalid(f"depth must be one of {list(BOOK_DEPTHS)}", path)
        return Response(book_json(md, md.book(symbol, d)))

    @get("/v1/markets/{symbol:str}/trades", sync_to_thread=False)
    def trades(symbol: FromPath[str], limit: FromQuery[str | None] = None) -> Response[Any]:
        path = f"/v1/markets/{symbol}/trades"
        if not md.has(symbol):
            return _unknown(symbol, path)
        try:
            n = _int(limit, "limit", 100)
        except SpotexError as exc:
            return _problem(exc, path)
        if not 1 <= n <= TRADES_KEPT:
            return _invalid(f"limit must be in [1, {TRADES_KEPT}]", path)
        f = md.formatter(symbol)
        return Response({"symbol": symbol, "seq": md.seq(symbol),
                         "trades": [trade_json(f, t) for t in md.trades(symbol, n)]})

    @get("/v1/markets/{symbol:str}/candles", sync_to_thread=False)
    def candles(symbol: FromPath[str], interval: FromQuery[str | None] = None, limit: FromQuery[str | None] = None,
                start: Annotated[str | None, QueryParameter(name="startTime")] = None,
                end: Annotated[str | None, QueryParameter(name="endTime")] = None) -> Response[Any]:
        path = f"/v1/markets/{symbol}/candles"
        if not md.has(symbol):
            return _unknown(symbol, path)
        interval = interval or "1m"
        if interval not in INTERVALS:
            return _invalid(f"interval must be one of {list(INTERVALS)}", path)
        try:
            n = _int(limit, "limit", 500)
            start_ms = None if start is None else _int(start, "startTime", 0)
            end_ms = None if end is None else _int(end, "endTime", 0)
        except SpotexError as exc:
            return _problem(exc, path)
        if not 1 <= n <= CANDLES_KEPT:
            return _invalid(f"limit must be in [1, {CANDLES_KEPT}]", path)
        f = md.formatter(symbol)
        rows = md.candles(symbol, interval, n, start_ms, end_ms)
        return Response({"symbol": symbol, "interval": interval, "seq": md.seq(symbol),
                         "candles": [candle_json(f, c) for c in rows]})

    @get("/v1/markets/{symbol:str}/ticker", sync_to_thread=False)
    def ticker(symbol: FromPath[str]) -> Response[Any]:
        path = f"/v1/markets/{symbol}/ticker"
        if not md.has(symbol):
            return _unknown(symbol, path)
        return Response(ticker_json(md.formatter(symbol), md.ticker(symbol)))

    return [orderbook, trades, candles, ticker]
