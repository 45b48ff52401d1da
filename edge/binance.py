"""A Binance-compatible facade (``/api/v3``) over the same engine, keys and limits.

Enough of Binance's spot REST API for the unmodified CCXT ``binance`` class and python-binance with
only their URLs changed: ping, time, exchangeInfo, depth, trades, klines, ticker/24hr, order
(POST/GET/DELETE), openOrders (GET/DELETE), account, myTrades. SIGNED endpoints use Binance's
query-string HMAC (``edge.auth.RequestVerifier.verify_binance``); errors are ``{"code": -NNNN,
"msg": ...}``. Binance symbols are ours without the dash (``BTCUSDT`` <-> ``BTC-USDT``); both are
accepted. Amounts are decimal strings at each market's precision.
"""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

from litestar import Request, Response, delete, get, post

from core.wire import (
    MarketConfig,
    OrderType,
    SelfTradePrevention,
    Side,
    TimeInForce,
    lots_to_qty,
    minor_to_amount,
    ticks_to_price,
)
from edge.account import balances_of
from edge.app import EdgeState, edge_state, json_response
from edge.core_client import correlation_for
from edge.errors import BinanceError, SpotexError
from edge.fills import FillQuery, fills_history, forward
from edge.orders import OrderOut, PlaceOrderIn, cancel_order, find_order, order_from_view, place_order

__all__ = ["ROUTES", "binance_symbol"]

_KLINE_INTERVALS = {"1m", "5m", "1h", "1d"}


def binance_symbol(m: MarketConfig) -> str:
    return f"{m.base}{m.quote}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Params:
    def __init__(self, request: Request[Any, Any, Any], body: bytes) -> None:
        self.qs = request.scope.get("query_string", b"").decode("utf-8", "surrogateescape")
        self.body = body
        self.p: dict[str, str] = {}
        for raw in (self.qs, body.decode("utf-8", "surrogateescape")):
            for k, v in urllib.parse.parse_qsl(raw, keep_blank_values=True):
                self.p.setdefault(k, v)

    def get(self, name: str) -> str | None:
        v = self.p.get(name)
        return v if v not in (None, "") else None

    def req(self, name: str) -> str:
        v = self.get(name)
        if v is None:
            raise BinanceError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.",
                               "VALIDATION")
        return v

    def int(self, name: str, default: int | None = None, lo: int = 0, hi: int = 2**62) -> int | None:
        v = self.get(name)
        if v is None:
            return default
        if not v.isdigit() or not lo <= int(v) <= hi:
            raise BinanceError(-1100, f"Illegal characters found in parameter '{name}'; legal range is '{lo}-{hi}'.",
                               "VALIDATION")
        return int(v)


def _market(st: EdgeState, sym: str | None) -> MarketConfig:
    if sym:
        m = st.markets.get(sym)
        if m is None:
            for mm in st.markets.values():
                if binance_symbol(mm) == sym.upper():
                    return mm
        else:
            return m
    raise BinanceError(-1121, "Invalid symbol.", "UNKNOWN_SYMBOL")


async def _signed(st: EdgeState, request: Request[Any, Any, Any], scope: str) -> tuple[Any, _Params]:
    assert st.verifier is not None and st.limiter is not None
    ip, body, _ = await st.signed_parts(request)
    params = _Params(request, body)
    try:
        p = await st.verifier.verify_binance(request.headers.get("x-mbx-apikey"), params.qs, body,
                                             required_scope=scope)
    except SpotexError:
        st.limiter.check(ip=ip).raise_if_denied()
        raise
    st.limiter.check(ip=ip, api_key=p.api_key).raise_if_denied()
    return p, params


def _public(st: EdgeState, request: Request[Any, Any, Any]) -> _Params:
    st.public_rate(request)
    return _Params(request, b"")


# --- public ---------------------------------------------------------------------------------------


@get("/api/v3/ping", include_in_schema=False)
async def ping(request: Request[Any, Any, Any]) -> Response[Any]:
    _public(edge_state(request), request)
    return json_response({})


@get("/api/v3/time", include_in_schema=False)
async def server_time(request: Request[Any, Any, Any]) -> Response[Any]:
    _public(edge_state(request), request)
    return json_response({"serverTime": _now_ms()})


def _symbol_info(m: MarketConfig, mode: str | None) -> dict[str, Any]:
    status = {"NORMAL": "TRADING", None: "TRADING", "CANCEL_ONLY": "BREAK"}.get(mode, "HALT")
    big_qty = lots_to_qty(10**12, m)
    return {
        "symbol": binance_symbol(m), "status": status, "baseAsset": m.base, "baseAssetPrecision": m.base_scale,
        "quoteAsset": m.quote, "quotePrecision": m.quote_scale, "quoteAssetPrecision": m.quote_scale,
        "baseCommissionPrecision": m.base_scale, "quoteCommissionPrecision": m.quote_scale,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET"], "icebergAllowed": False, "ocoAllowed": False,
        "otoAllowed": False, "quoteOrderQtyMarketAllowed": True, "allowTrailingStop": False,
        "cancelReplaceAllowed": False, "isSpotTradingAllowed": True, "isMarginTradingAllowed": False,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": m.tick_size, "maxPrice": ticks_to_price(10**12, m),
             "tickSize": m.tick_size},
            {"filterType": "LOT_SIZE", "minQty": m.lot_size, "maxQty": big_qty, "stepSize": m.lot_size},
            {"filterType": "MARKET_LOT_SIZE", "minQty": m.lot_size, "maxQty": big_qty, "stepSize": m.lot_size},
            {"filterType": "MIN_NOTIONAL", "minNotional": minor_to_amount(m.min_notional, m.quote_scale),
             "applyToMarket": True, "avgPriceMins": 5},
            {"filterType": "NOTIONAL", "minNotional": minor_to_amount(m.min_notional, m.quote_scale),
             "applyMinToMarket": True, "maxNotional": "9000000000.00", "applyMaxToMarket": False,
             "avgPriceMins": 5},
        ],
        "permissions": ["SPOT"], "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_TAKER",
        "allowedSelfTradePreventionModes": ["NONE", "EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }


@get("/api/v3/exchangeInfo", include_in_schema=False)
async def exchange_info(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    _public(st, request)
    modes = await st.symbol_modes()
    rl = [{"rateLimitType": "REQUEST_WEIGHT", "interval": "SECOND", "intervalNum": 1,
           "limit": st.cfg.edge.rate_limit_per_s}]
    return json_response({"timezone": "UTC", "serverTime": _now_ms(), "rateLimits": rl, "exchangeFilters": [],
                          "symbols": [_symbol_info(m, modes.get(s)) for s, m in sorted(st.markets.items())]})


@get("/api/v3/depth", include_in_schema=False)
async def depth(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    q = _public(st, request)
    m = _market(st, q.req("symbol"))
    limit = q.int("limit", 100, 1, 5000) or 100
    if st.md is not None:
        snap = st.md.book(m.symbol, limit)
        seq, bids, asks = snap.seq, snap.bids, snap.asks
    else:
        assert st.core is not None
        bv = await st.core.query("book", symbol=m.symbol, depth=limit)
        if not isinstance(bv, dict):
            raise BinanceError(-1121, "Invalid symbol.", "UNKNOWN_SYMBOL")
        seq, bids, asks = bv["seq"], bv["bids"], bv["asks"]

    def lv(levels: Any) -> list[list[str]]:
        return [[ticks_to_price(p, m), lots_to_qty(qty, m)] for p, qty in levels]

    return json_response({"lastUpdateId": seq, "bids": lv(bids), "asks": lv(asks)})


def _need_md(st: EdgeState) -> Any:
    if st.md is None:
        raise SpotexError("UNAVAILABLE", detail="market data is not available on this edge")
    return st.md


@get("/api/v3/trades", include_in_schema=False)
async def trades(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    q = _public(st, request)
    m = _market(st, q.req("symbol"))
    limit = q.int("limit", 500, 1, 1000) or 500
    rows = _need_md(st).trades(m.symbol, limit)
    out = [{"id": t.trade_id, "price": ticks_to_price(t.price_ticks, m), "qty": lots_to_qty(t.qty_lots, m),
            "quoteQty": minor_to_amount(t.quote_amount, m.quote_scale), "time": t.ts_ms,
            "isBuyerMaker": str(t.taker_side) == "SELL", "isBestMatch": True} for t in rows]
    out.sort(key=lambda r: r["id"])
    return json_response(out)


@get("/api/v3/aggTrades", include_in_schema=False)
async def agg_trades(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    q = _public(st, request)
    m = _market(st, q.req("symbol"))
    limit = q.int("limit", 500, 1, 1000) or 500
    rows = sorted(_need_md(st).trades(m.symbol, limit), key=lambda t: t.trade_id)
    return json_response([{"a": t.trade_id, "p": ticks_to_price(t.price_ticks, m), "q": lots_to_qty(t.qty_lots, m),
                           "f": t.trade_id, "l": t.trade_id, "T": t.ts_ms, "m": str(t.taker_side) == "SELL",
                           "M": True} for t in rows])


@get("/api/v3/klines", include_in_schema=False)
async def klines(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    q = _public(st, request)
    m = _market(st, q.req("symbol"))
    interval = q.req("interval")
    if interval not in _KLINE_INTERVALS:
        raise BinanceError(-1120, "Invalid interval.", "VALIDATION")
    limit = q.int("limit", 500, 1, 1000) or 500
    rows = _need_md(st).candles(m.symbol, interval, limit, start_ms=q.int("startTime"), end_ms=q.int("endTime"))
    out = []
    for c in rows:
        out.append([c.open_ms, ticks_to_price(c.open, m), ticks_to_price(c.high, m), ticks_to_price(c.low, m),
                    ticks_to_price(c.close, m), lots_to_qty(c.volume_lots, m), c.close_ms,
                    minor_to_amount(c.quote_volume, m.quote_scale), c.trades, "0", "0", "0"])
    return json_response(out)


def _ticker(st: EdgeState, m: MarketConfig) -> dict[str, Any]:
    t = _need_md(st).ticker(m.symbol)

    def px(v: int | None) -> str:
        return ticks_to_price(v, m) if v else ticks_to_price(0, m)

    last, open_ = t.last or 0, t.open_24h or 0
    change = last - open_ if last and open_ else 0
    pct = f"{(change * 100 / open_):.3f}" if open_ else "0.000"
    now = _now_ms()
    bid = t.best_bid[0] if isinstance(t.best_bid, (tuple, list)) else t.best_bid
    ask = t.best_ask[0] if isinstance(t.best_ask, (tuple, list)) else t.best_ask
    bidq = t.best_bid[1] if isinstance(t.best_bid, (tuple, list)) else 0
    askq = t.best_ask[1] if isinstance(t.best_ask, (tuple, list)) else 0
    return {
        "symbol": binance_symbol(m), "priceChange": ticks_to_price(abs(change), m) if change >= 0
        else "-" + ticks_to_price(-change, m), "priceChangePercent": pct, "weightedAvgPrice": px(last),
        "prevClosePrice": px(open_), "lastPrice": px(last), "lastQty": lots_to_qty(0, m),
        "bidPrice": px(bid), "bidQty": lots_to_qty(bidq or 0, m),
        "askPrice": px(ask), "askQty": lots_to_qty(askq or 0, m),
        "openPrice": px(open_), "highPrice": px(t.high_24h), "lowPrice": px(t.low_24h),
        "volume": lots_to_qty(t.volume_24h_lots, m), "quoteVolume": minor_to_amount(t.quote_volume_24h, m.quote_scale),
        "openTime": now - 86_400_000, "closeTime": t.ts_ms or now, "firstId": -1, "lastId": -1, "count": 0,
    }


@get("/api/v3/ticker/24hr", include_in_schema=False)
async def ticker_24hr(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    q = _public(st, request)
    sym = q.get("symbol")
    if sym is not None:
        return json_response(_ticker(st, _market(st, sym)))
    return json_response([_ticker(st, m) for _, m in sorted(st.markets.items())])


# --- signed ---------------------------------------------------------------------------------------

_STATUS = {"NEW": "NEW", "ACCEPTED": "NEW", "PARTIALLY_FILLED": "PARTIALLY_FILLED", "FILLED": "FILLED",
           "CANCELED": "CANCELED", "REJECTED": "REJECTED"}


def _border(o: OrderOut, m: MarketConfig, *, now: int | None = None) -> dict[str, Any]:
    status = _STATUS.get(o.status, o.status)
    if status == "CANCELED" and o.cancelReason in ("EXPIRED_IOC", "STP"):
        status = "EXPIRED"
    t = o.transactTime or now or _now_ms()
    typ = "LIMIT_MAKER" if o.postOnly and o.type == "LIMIT" else o.type
    return {
        "symbol": binance_symbol(m), "orderId": o.orderId, "orderListId": -1, "clientOrderId": o.clientOrderId,
        "price": o.price or ticks_to_price(0, m), "origQty": o.quantity or lots_to_qty(0, m),
        "executedQty": o.executedQuantity, "cummulativeQuoteQty": o.cumulativeQuoteQuantity or "0",
        "status": status, "timeInForce": o.timeInForce, "type": typ, "side": o.side,
        "stopPrice": "0", "icebergQty": "0", "time": t, "updateTime": t, "transactTime": t, "workingTime": t,
        "isWorking": status in ("NEW", "PARTIALLY_FILLED"), "origQuoteOrderQty": o.quoteQuantity or "0",
        "selfTradePreventionMode": o.selfTradePrevention,
    }


@post("/api/v3/order", include_in_schema=False, status_code=200)
async def new_order(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    p, q = await _signed(st, request, "trade")
    m = _market(st, q.req("symbol"))
    typ = q.req("type").upper()
    side = q.req("side").upper()
    if side not in ("BUY", "SELL"):
        raise BinanceError(-1117, "Invalid side.", "VALIDATION")
    if typ not in ("LIMIT", "LIMIT_MAKER", "MARKET"):
        raise BinanceError(-1116, "Invalid orderType.", "VALIDATION")
    tif = (q.get("timeInForce") or "GTC").upper()
    if typ == "LIMIT" and q.get("timeInForce") is None:
        raise BinanceError(-1102, "Mandatory parameter 'timeInForce' was not sent, was empty/null, or malformed.",
                           "VALIDATION")
    if tif not in ("GTC", "IOC", "FOK"):
        raise BinanceError(-1115, "Invalid timeInForce.", "VALIDATION")
    stp = (q.get("selfTradePreventionMode") or "EXPIRE_TAKER").upper()
    if stp not in SelfTradePrevention.__members__:
        raise BinanceError(-1100, "Illegal characters found in parameter 'selfTradePreventionMode'.", "VALIDATION")
    coid = q.get("newClientOrderId")
    if coid is not None and (len(coid) > 36 or not all(c.isalnum() or c in "._:/-" for c in coid)):
        raise BinanceError(-1100, "Illegal characters found in parameter 'newClientOrderId'.", "VALIDATION")

    def dec(name: str) -> str | None:
        v = q.get(name)
        if v is None:
            return None
        v = v.strip()
        if "." in v:
            v = v.rstrip("0").rstrip(".") or "0"
        if not v.replace(".", "", 1).isdigit():
            raise BinanceError(-1100, f"Illegal characters found in parameter '{name}'.", "VALIDATION")
        return v

    body = PlaceOrderIn(
        symbol=m.symbol, side=Side(side), type=OrderType.MARKET if typ == "MARKET" else OrderType.LIMIT,
        timeInForce=TimeInForce(tif) if typ != "LIMIT_MAKER" else TimeInForce.GTC,
        price=dec("price") if typ != "MARKET" else None, quantity=dec("quantity"),
        quoteQuantity=dec("quoteOrderQty") if typ == "MARKET" else None, postOnly=typ == "LIMIT_MAKER",
        selfTradePrevention=SelfTradePrevention(stp), clientOrderId=coid)
    if typ != "MARKET" and (body.price is None or body.quantity is None):
        raise BinanceError(-1102, "Mandatory parameter 'price' or 'quantity' was not sent, was empty/null, or "
                                  "malformed.", "VALIDATION")
    try:
        o = await place_order(st, p.account_id, body, correlation_for(p.api_key, None))
    except SpotexError as exc:
        if exc.code == "SYMBOL_THROTTLED":  # Binance's TOO_MANY_ORDERS, 429 with Retry-After
            raise BinanceError(-1015, f"Too many new orders; {exc.detail}", exc.code, status=429,
                               headers=exc.headers) from None
        if exc.code in ("TICK_SIZE", "LOT_SIZE", "INVALID_PRICE", "INVALID_QTY", "INVALID_AMOUNT"):
            raise BinanceError(-1013, f"Filter failure: {exc.code}: {exc.detail}", exc.code) from None
        if exc.code == "MIN_NOTIONAL":
            raise BinanceError(-1013, "Filter failure: NOTIONAL", exc.code) from None
        if exc.code == "INSUFFICIENT_FUNDS":
            raise BinanceError(-2010, "Account has insufficient balance for requested action.", exc.code) from None
        if exc.status < 500 and exc.code not in ("VALIDATION",) and not exc.code.startswith("AUTH_"):
            raise BinanceError(-2010, exc.detail, exc.code) from None
        raise
    resp_type = (q.get("newOrderRespType") or "FULL").upper()
    out = _border(o, m)
    if resp_type == "ACK":
        return json_response({k: out[k] for k in ("symbol", "orderId", "orderListId", "clientOrderId",
                                                  "transactTime")})
    for k in ("time", "updateTime", "isWorking", "stopPrice", "icebergQty"):
        out.pop(k, None)
    if resp_type == "FULL":
        out["fills"] = [{"price": f.price, "qty": f.quantity, "commission": f.fee, "commissionAsset": f.feeAsset,
                         "tradeId": f.tradeId} for f in o.fills or []]
    return json_response(out)


async def _lookup(st: EdgeState, p: Any, q: _Params, m: MarketConfig) -> dict[str, Any]:
    oid = q.int("orderId")
    coid = q.get("origClientOrderId")
    if oid is None and coid is None:
        raise BinanceError(-1102, "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!",
                           "VALIDATION")
    try:
        v = await find_order(st, p.account_id, order_id=oid, client_order_id=coid)
    except SpotexError as exc:
        if exc.code == "ORDER_NOT_FOUND":
            raise BinanceError(-2013, "Order does not exist.", "ORDER_NOT_FOUND") from None
        raise
    if v["symbol"] != m.symbol:
        raise BinanceError(-2013, "Order does not exist.", "ORDER_NOT_FOUND")
    return v


@get("/api/v3/order", include_in_schema=False)
async def query_order(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    p, q = await _signed(st, request, "read")
    m = _market(st, q.req("symbol"))
    v = await _lookup(st, p, q, m)
    out = _border(order_from_view(v, m, st), m)
    out.pop("transactTime", None)
    return json_response(out)


@delete("/api/v3/order", include_in_schema=False, status_code=200)
async def cancel(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    p, q = await _signed(st, request, "trade")
    m = _market(st, q.req("symbol"))
    try:
        v = await _lookup(st, p, q, m)
        o = await cancel_order(st, p.account_id, v, correlation_for(p.api_key, None))
    except SpotexError as exc:
        if exc.code in ("ORDER_NOT_FOUND", "ORDER_ALREADY_CLOSED") or (isinstance(exc, BinanceError)
                                                                      and exc.binance_code == -2013):
            raise BinanceError(-2011, "Unknown order sent.", "ORDER_NOT_FOUND") from None
        raise
    out = _border(o, m)
    out["origClientOrderId"] = o.clientOrderId
    for k in ("time", "updateTime", "isWorking", "stopPrice", "icebergQty", "workingTime"):
        out.pop(k, None)
    return json_response(out)


@get("/api/v3/openOrders", include_in_schema=False)
async def open_orders(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    p, q = await _signed(st, request, "read")
    sym = q.get("symbol")
    m = _market(st, sym) if sym is not None else None
    assert st.core is not None
    rows = await st.core.query("open_orders", account_id=p.account_id, symbol=m.symbol if m else None)
    out = []
    for v in rows or []:
        mm = st.markets.get(v["symbol"])
        if mm is not None:
            b = _border(order_from_view(v, mm, st), mm)
            b.pop("transactTime", None)
            out.append(b)
    return json_response(out)


@delete("/api/v3/openOrders", include_in_schema=False, status_code=200)
async def cancel_open_orders(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    p, q = await _signed(st, request, "trade")
    m = _market(st, q.req("symbol"))
    assert st.core is not None
    before = await st.core.query("open_orders", account_id=p.account_id, symbol=m.symbol)
    await st.core.cancel_all_account(p.account_id, m.symbol, correlation_for(p.api_key, None))
    out = []
    for v in before or []:
        b = _border(order_from_view(v, m, st), m)
        b["status"] = "CANCELED"
        b["origClientOrderId"] = b["clientOrderId"]
        out.append(b)
    return json_response(out)


@get("/api/v3/account", include_in_schema=False)
async def account(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    p, _q = await _signed(st, request, "read")
    bals = await balances_of(st, p.account_id)
    m0 = next(iter(st.markets.values()), None)
    mk = m0.maker_fee_bps if m0 else 0
    tk = m0.taker_fee_bps if m0 else 0
    return json_response({
        "makerCommission": mk, "takerCommission": tk, "buyerCommission": 0, "sellerCommission": 0,
        "commissionRates": {"maker": f"{mk / 10_000:.8f}", "taker": f"{tk / 10_000:.8f}", "buyer": "0.00000000",
                            "seller": "0.00000000"},
        "canTrade": "trade" in p.scopes, "canWithdraw": False, "canDeposit": False, "brokered": False,
        "requireSelfTradePrevention": False, "preventSor": False, "updateTime": _now_ms(), "accountType": "SPOT",
        "balances": [{"asset": b.asset, "free": b.available, "locked": b.hold} for b in bals],
        "permissions": ["SPOT"], "uid": p.account_id,
    })


@get("/api/v3/myTrades", include_in_schema=False)
async def my_trades(request: Request[Any, Any, Any]) -> Response[Any]:
    st = edge_state(request)
    p, q = await _signed(st, request, "read")
    m = _market(st, q.req("symbol"))
    limit = q.int("limit", 500, 1, 1000) or 500
    fq = FillQuery(p.account_id, m.symbol, q.int("orderId"), q.int("startTime"), q.int("endTime"), q.int("fromId"),
                   limit)
    if fq.start_ms is not None and fq.end_ms is not None and fq.start_ms > fq.end_ms:
        raise BinanceError(-1128, "Combination of optional parameters invalid: startTime is after endTime.",
                           "VALIDATION")
    rows = await fills_history(st, fq)
    if not forward(fq):
        rows.reverse()  # Binance answers oldest first
    out = []
    for f in rows:
        fee_scale = m.base_scale if f.fee_asset == m.base else m.quote_scale
        out.append({"symbol": binance_symbol(m), "id": f.trade_id, "orderId": f.order_id, "orderListId": -1,
                    "price": ticks_to_price(f.price_ticks, m), "qty": lots_to_qty(f.qty_lots, m),
                    "quoteQty": minor_to_amount(f.quote_amount, m.quote_scale),
                    "commission": minor_to_amount(f.fee, fee_scale), "commissionAsset": f.fee_asset,
                    "time": f.ts_ms, "isBuyer": f.side == "BUY", "isMaker": f.maker, "isBestMatch": True})
    return json_response(out)


ROUTES = [ping, server_time, exchange_info, depth, trades, agg_trades, klines, ticker_24hr, new_order, query_order,
          cancel,
          open_orders, cancel_open_orders, account, my_trades]
