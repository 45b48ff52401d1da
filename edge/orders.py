"""Trading routes: place, query, amend, cancel, cancel-all, open orders, fills (``/v1/orders``, ``/v1/fills``).

Decimal strings at the API, integers inside: prices become ticks and quantities lots through
``core.wire`` (a price off the tick is ``TICK_SIZE``, a quantity off the lot ``LOT_SIZE``, both 422
NOT_EXECUTED). Every order call's error carries ``executionStatus``. A command whose events do not
arrive in ``edge.order_timeout_ms`` answers 504 ``UPSTREAM_TIMEOUT`` with ``UNKNOWN``: look the
order up by ``clientOrderId`` or retry with the same ``Idempotency-Key``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from core.wire import (
    AmendOrder,
    CancelOrder,
    CommandRejected,
    MarketConfig,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderRejected,
    OrderType,
    PlaceOrder,
    PrecisionError,
    SelfTradePrevention,
    Side,
    TimeInForce,
    TradeExecuted,
    lots_to_qty,
    minor_to_amount,
    price_to_ticks,
    qty_to_lots,
    ticks_to_price,
)
from edge.app import Call, EdgeState, edge_state, json_response, stored_response
from edge.auth import Principal
from edge.core_client import CommandResult, Fill, correlation_for
from edge.errors import PROBLEM_CONTENT_TYPE, SpotexError, order_rejected
from edge.fills import FillQuery, fills_history
from edge.idempotency import StoredResponse, validate_key

__all__ = [
    "ROUTES",
    "AmendIn",
    "CancelAllOut",
    "FillOut",
    "OrderOut",
    "PlaceOrderIn",
    "Problem",
    "cancel_call",
    "fill_out",
    "order_from_events",
    "order_from_view",
    "parse_place",
    "place_call",
    "trade_call",
]

Decimal = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,30}(\.[0-9]{1,30})?$", examples=["65000.10"],
                                      description="Non-negative decimal string")]
ClientOrderId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:/-]{1,36}$", examples=["my-order-1"])]
SymbolStr = Annotated[str, msgspec.Meta(pattern=r"^[A-Z0-9]{1,16}-[A-Z0-9]{1,16}$", examples=["BTC-USDT"])]


class Problem(msgspec.Struct, kw_only=True):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    code: str
    executionStatus: Literal["NOT_EXECUTED", "UNKNOWN", "EXECUTED"] | None = None


class PlaceOrderIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    symbol: SymbolStr
    side: Side
    type: OrderType = OrderType.LIMIT
    timeInForce: TimeInForce = TimeInForce.GTC
    price: Decimal | None = None
    quantity: Decimal | None = None
    quoteQuantity: Decimal | None = msgspec.field(default=None)
    postOnly: bool = False
    selfTradePrevention: SelfTradePrevention = SelfTradePrevention.EXPIRE_TAKER
    clientOrderId: ClientOrderId | None = None


class AmendIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``quantity`` is the new TOTAL quantity (filled included): a decrease keeps queue priority, a
    price change loses it."""

    quantity: Decimal | None = None
    price: Decimal | None = None


class FillOut(msgspec.Struct, kw_only=True):
    tradeId: int
    symbol: str
    orderId: int
    clientOrderId: str
    side: str
    maker: bool
    price: str
    quantity: str
    quoteQuantity: str
    fee: str
    feeAsset: str
    time: int


class OrderOut(msgspec.Struct, kw_only=True):
    orderId: int
    clientOrderId: str
    symbol: str
    side: str
    type: str
    timeInForce: str
    price: str | None
    quantity: str | None
    quoteQuantity: str | None
    executedQuantity: str
    remainingQuantity: str
    cumulativeQuoteQuantity: str | None
    status: str
    postOnly: bool
    selfTradePrevention: str
    cancelReason: str | None = None
    transactTime: int | None = None
    fills: list[FillOut] | None = None


class CancelAllOut(msgspec.Struct, kw_only=True):
    canceled: int
    symbol: str | None


def _problem_responses(*codes: int) -> dict[int, ResponseSpec]:
    out = {}
    for c in codes:
        out[c] = ResponseSpec(data_container=Problem, media_type=PROBLEM_CONTENT_TYPE,
                              description="problem+json with a stable code", generate_examples=False)
    return out


TRADE_ERRORS = _problem_responses(400, 401, 403, 404, 409, 422, 429, 503, 504)
READ_ERRORS = _problem_responses(400, 401, 403, 404, 422, 429, 503)


def _market(st: EdgeState, symbol: str, *, in_path: bool = False) -> MarketConfig:
    m = st.markets.get(symbol)
    if m is None:
        raise SpotexError("NOT_FOUND" if in_path else "UNKNOWN_SYMBOL", detail=f"unknown symbol {symbol!r}")
    return m


def _precision(exc: PrecisionError) -> SpotexError:
    return order_rejected(str(exc.code), str(exc))


def parse_place(st: EdgeState, body: PlaceOrderIn, account_id: int) -> PlaceOrder:
    m = _market(st, body.symbol)
    try:
        price = price_to_ticks(body.price, m) if body.price is not None else None
        qty = qty_to_lots(body.quantity, m) if body.quantity is not None else None
        quote = None
        if body.quoteQuantity is not None:
            from core.wire import amount_to_minor

            quote = amount_to_minor(body.quoteQuantity, m.quote_scale)
    except PrecisionError as exc:
        raise _precision(exc) from None
    if body.type == OrderType.LIMIT:
        if price is None or qty is None:
            raise SpotexError("VALIDATION", detail="a LIMIT order needs price and quantity")
        if quote is not None:
            raise SpotexError("VALIDATION", detail="quoteQuantity is for MARKET buys only")
    else:
        if price is not None:
            raise SpotexError("VALIDATION", detail="a MARKET order has no price")
        if body.postOnly:
            raise SpotexError("VALIDATION", detail="a MARKET order cannot be post-only")
        if (qty is None) == (quote is None):
            raise SpotexError("VALIDATION", detail="a MARKET order needs exactly one of quantity and quoteQuantity")
        if quote is not None and body.side != Side.BUY:
            raise SpotexError("VALIDATION", detail="quoteQuantity is for MARKET buys only")
    return PlaceOrder(account_id=account_id, symbol=m.symbol, client_order_id=body.clientOrderId or "",
                      side=body.side, type=body.type, tif=body.timeInForce, price_ticks=price, qty_lots=qty,
                      quote_amount=quote, post_only=body.postOnly, stp=body.selfTradePrevention)


def fill_out(f: Fill, m: MarketConfig) -> FillOut:
    return FillOut(tradeId=f.trade_id, symbol=f.symbol, orderId=f.order_id, clientOrderId=f.client_order_id,
                   side=f.side, maker=f.maker, price=ticks_to_price(f.price_ticks, m),
                   quantity=lots_to_qty(f.qty_lots, m), quoteQuantity=minor_to_amount(f.quote_amount, m.quote_scale),
                   fee=minor_to_amount(f.fee, m.base_scale if f.fee_asset == m.base else m.quote_scale),
                   feeAsset=f.fee_asset, time=f.ts_ms)


def _raise_reject(events: list[Any]) -> None:
    for ev in events:
        if isinstance(ev, OrderRejected):
            raise order_rejected(str(ev.code), ev.detail or None)
        if isinstance(ev, CommandRejected):
            code = str(ev.code)
            if code == "UNKNOWN_ORDER":
                raise SpotexError("ORDER_NOT_FOUND", detail=ev.detail or None, execution_status="NOT_EXECUTED")
            raise order_rejected(code, ev.detail or None)


def order_from_events(res: CommandResult, m: MarketConfig) -> OrderOut:
    """The POST /v1/orders answer, built from the command's own events (no extra query)."""
    _raise_reject(res.events)
    acc: OrderAccepted | None = None
    fills: list[FillOut] = []
    filled = 0
    quote_filled = 0
    remaining: int | None = None
    canceled: OrderCanceled | None = None
    for ev in res.events:
        if isinstance(ev, OrderAccepted):
            acc = ev
        elif isinstance(ev, TradeExecuted) and acc is not None and ev.taker_order_id == acc.order_id:
            filled += ev.qty_lots
            quote_filled += ev.quote_amount
            remaining = ev.taker_remaining_lots
            fills.append(FillOut(tradeId=ev.trade_id, symbol=ev.symbol, orderId=acc.order_id,
                                 clientOrderId=acc.client_order_id, side=str(ev.taker_side), maker=False,
                                 price=ticks_to_price(ev.price_ticks, m), quantity=lots_to_qty(ev.qty_lots, m),
                                 quoteQuantity=minor_to_amount(ev.quote_amount, m.quote_scale),
                                 fee=minor_to_amount(ev.taker_fee, m.base_scale if ev.taker_fee_asset == m.base
                                                     else m.quote_scale),
                                 feeAsset=ev.taker_fee_asset, time=ev.occurred_at))
        elif isinstance(ev, OrderCanceled) and acc is not None and ev.order_id == acc.order_id:
            canceled = ev
    if acc is None:
        raise SpotexError("UPSTREAM_TIMEOUT", execution_status="UNKNOWN",
                          detail="the core answered without accepting or rejecting the order")
    if canceled is not None:
        status = "CANCELED"
        rem = 0
    elif remaining == 0:
        status, rem = "FILLED", 0
    else:
        status = "PARTIALLY_FILLED" if filled else "NEW"
        rem = remaining if remaining is not None else (acc.qty_lots or 0) - filled
    return OrderOut(
        orderId=acc.order_id, clientOrderId=acc.client_order_id, symbol=acc.symbol, side=str(acc.side),
        type=str(acc.type), timeInForce=str(acc.tif),
        price=ticks_to_price(acc.price_ticks, m) if acc.price_ticks is not None else None,
        quantity=lots_to_qty(acc.qty_lots, m) if acc.qty_lots is not None else None,
        quoteQuantity=minor_to_amount(acc.quote_amount, m.quote_scale) if acc.quote_amount is not None else None,
        executedQuantity=lots_to_qty(filled, m), remainingQuantity=lots_to_qty(max(rem, 0), m),
        cumulativeQuoteQuantity=minor_to_amount(quote_filled, m.quote_scale), status=status,
        postOnly=acc.post_only, selfTradePrevention=str(acc.stp),
        cancelReason=str(canceled.reason) if canceled is not None else None,
        transactTime=acc.occurred_at, fills=fills,
    )


_STATUS = {"ACCEPTED": "NEW"}


def order_from_view(v: dict[str, Any], m: MarketConfig, st: EdgeState | None = None) -> OrderOut:
    """An order as the core's query returned it (msgpack of ``core.engine.views.OrderView``)."""
    quote_filled: int | None = None
    if st is not None and st.core is not None:
        quote_filled = st.core.quote_filled(int(v["order_id"]))
        if quote_filled is None and not v["filled_qty_lots"]:
            quote_filled = 0
    pt = v.get("price_ticks")
    qa = v.get("quote_amount")
    return OrderOut(
        orderId=int(v["order_id"]), clientOrderId=v["client_order_id"], symbol=v["symbol"], side=v["side"],
        type=v["type"], timeInForce=v["tif"], price=ticks_to_price(pt, m) if pt is not None else None,
        quantity=lots_to_qty(v["qty_lots"], m) if v["qty_lots"] else None,
        quoteQuantity=minor_to_amount(qa, m.quote_scale) if qa is not None else None,
        executedQuantity=lots_to_qty(v["filled_qty_lots"], m),
        remainingQuantity=lots_to_qty(v["remaining_qty_lots"], m),
        cumulativeQuoteQuantity=minor_to_amount(quote_filled, m.quote_scale) if quote_filled is not None else None,
        status=_STATUS.get(v["status"], v["status"]), postOnly=bool(v["post_only"]), selfTradePrevention=v["stp"],
    )


_TERMINAL = frozenset({"FILLED", "CANCELED", "REJECTED"})


async def find_order(st: EdgeState, account_id: int, *, order_id: int | None = None,
                     client_order_id: str | None = None) -> dict[str, Any]:
    assert st.core is not None
    if order_id is not None:
        if not 0 < order_id < 2**63:  # order ids are int64; a bigger one cannot even be asked for
            raise SpotexError("ORDER_NOT_FOUND", execution_status="NOT_EXECUTED")
        v = await st.core.query("order", order_id=order_id)
    else:
        v = await st.core.query("order", account_id=account_id, client_order_id=client_order_id)
    if not isinstance(v, dict) or int(v.get("account_id", -1)) != account_id:
        raise SpotexError("ORDER_NOT_FOUND", execution_status="NOT_EXECUTED")
    return v


async def place_order(st: EdgeState, principal_account: int, body: PlaceOrderIn, corr: str) -> OrderOut:
    assert st.core is not None
    st.check_mapping(body.symbol)  # before converting with a definition the engine does not share
    cmd = parse_place(st, body, principal_account)
    if st.throttle is not None:  # per-symbol new-order throttle (edge.throttle): 429 SYMBOL_THROTTLED
        st.throttle.check(cmd.symbol)
    m = st.markets[cmd.symbol]
    res = await st.core.submit(cmd, corr, symbol=cmd.symbol)
    return order_from_events(res, m)


async def cancel_order(st: EdgeState, account_id: int, v: dict[str, Any], corr: str) -> OrderOut:
    assert st.core is not None
    m = st.markets.get(v["symbol"])
    if m is None:
        raise SpotexError("ORDER_NOT_FOUND")
    if v["status"] in _TERMINAL:
        raise SpotexError("ORDER_ALREADY_CLOSED", detail=f"the order is {v['status']}")
    res = await st.core.submit(CancelOrder(account_id=account_id, symbol=v["symbol"], order_id=int(v["order_id"])),
                               corr, symbol=v["symbol"])
    try:
        _raise_reject(res.events)
    except SpotexError as exc:
        if exc.code == "ORDER_NOT_FOUND":  # closed between our look-up and the cancel
            raise SpotexError("ORDER_ALREADY_CLOSED", detail="the order closed before the cancel arrived") from None
        raise
    out = order_from_view(v, m, st)
    for ev in res.events:
        if isinstance(ev, OrderCanceled) and ev.order_id == int(v["order_id"]):
            out.status = "CANCELED"
            out.cancelReason = str(ev.reason)
            out.executedQuantity = lots_to_qty(ev.filled_qty_lots, m)
            out.remainingQuantity = lots_to_qty(0, m)
            out.transactTime = ev.occurred_at
    return out


def _stored(data: Any, status: int = 200) -> StoredResponse:
    return StoredResponse(status, msgspec.json.encode(data), {"content-type": "application/json"})


async def trade_call(st: EdgeState, call: Call) -> tuple[Principal, str | None, str]:
    """The opening of every order call: authenticate with the trade scope, validate the
    Idempotency-Key, derive the command's correlation id (its ``Nats-Msg-Id``)."""
    p = await st.authenticate_call(call, "trade")
    key = validate_key(call.headers.get("idempotency-key"))
    return p, key, correlation_for(p.api_key, key)


async def place_call(st: EdgeState, call: Call, data: PlaceOrderIn) -> StoredResponse:
    """POST /v1/orders once its body is decoded (the Litestar route and ``edge.fastpath``)."""
    p, key, corr = await trade_call(st, call)

    async def handler() -> StoredResponse:
        return _stored(await place_order(st, p.account_id, data, corr), 201)

    return await st.idempotent_call(call, p, handler, order_call=True, key=key)


async def cancel_call(st: EdgeState, call: Call, *, order_id: int | None = None,
                      client_order_id: str | None = None) -> StoredResponse:
    """DELETE /v1/orders/{id} or /v1/orders/by-client-id/{id} (the Litestar routes and ``edge.fastpath``)."""
    p, key, corr = await trade_call(st, call)

    async def handler() -> StoredResponse:
        v = await find_order(st, p.account_id, order_id=order_id, client_order_id=client_order_id)
        return _stored(await cancel_order(st, p.account_id, v, corr))

    return await st.idempotent_call(call, p, handler, order_call=True, key=key)


# --- routes ---------------------------------------------------------------------------------------

_SEC: list[dict[str, list[str]]] = [{"apiKey": []}]
_IDEM = Parameter(header="Idempotency-Key", required=False,
                  description="At most 128 chars of [A-Za-z0-9._:-]; same key + same payload returns the original "
                              "result, a different payload 409 IDEMPOTENCY_CONFLICT.")


@post("/v1/orders", status_code=201, responses=TRADE_ERRORS, security=_SEC, tags=["orders"],
      summary="Place an order")
async def post_order(request: Request[Any, Any, Any], data: PlaceOrderIn,
                     idempotency_key: Annotated[str | None, _IDEM] = None) -> Response[OrderOut]:
    # The Idempotency-Key is read from the headers in ``trade_call``; the parameter documents it.
    st = edge_state(request)
    return stored_response(await place_call(st, await st.call_of(request), data))


@get("/v1/orders/{order_id:int}", responses=READ_ERRORS, security=_SEC, tags=["orders"], summary="Get an order")
async def get_order(request: Request[Any, Any, Any], order_id: int) -> Response[OrderOut]:
    st = edge_state(request)
    p = await st.authenticate(request, "read")
    v = await find_order(st, p.account_id, order_id=order_id)
    return json_response(order_from_view(v, _market(st, v["symbol"]), st))


@get("/v1/orders/by-client-id/{client_order_id:str}", responses=READ_ERRORS, security=_SEC, tags=["orders"],
     summary="Get an order by client order id")
async def get_order_by_coid(request: Request[Any, Any, Any], client_order_id: str) -> Response[OrderOut]:
    st = edge_state(request)
    p = await st.authenticate(request, "read")
    v = await find_order(st, p.account_id, client_order_id=client_order_id)
    return json_response(order_from_view(v, _market(st, v["symbol"]), st))


@delete("/v1/orders/{order_id:int}", status_code=200, responses=TRADE_ERRORS, security=_SEC, tags=["orders"],
        summary="Cancel an order")
async def delete_order(request: Request[Any, Any, Any], order_id: int,
                       idempotency_key: Annotated[str | None, _IDEM] = None) -> Response[OrderOut]:
    st = edge_state(request)
    return stored_response(await cancel_call(st, await st.call_of(request), order_id=order_id))


@delete("/v1/orders/by-client-id/{client_order_id:str}", status_code=200, responses=TRADE_ERRORS, security=_SEC,
        tags=["orders"], summary="Cancel an order by client order id")
async def delete_order_by_coid(request: Request[Any, Any, Any], client_order_id: str,
                               idempotency_key: Annotated[str | None, _IDEM] = None) -> Response[OrderOut]:
    st = edge_state(request)
    return stored_response(await cancel_call(st, await st.call_of(request), client_order_id=client_order_id))


@patch("/v1/orders/{order_id:int}", responses=TRADE_ERRORS, security=_SEC, tags=["orders"],
       summary="Amend an order (quantity and/or price)")
async def amend_order(request: Request[Any, Any, Any], order_id: int, data: AmendIn,
                      idempotency_key: Annotated[str | None, _IDEM] = None) -> Response[OrderOut]:
    st = edge_state(request)
    call = await st.call_of(request)
    p, key, corr = await trade_call(st, call)

    async def handler() -> StoredResponse:
        assert st.core is not None
        if data.quantity is None and data.price is None:
            raise SpotexError("VALIDATION", detail="give quantity and/or price")
        v = await find_order(st, p.account_id, order_id=order_id)
        if v["status"] in _TERMINAL:
            raise SpotexError("ORDER_ALREADY_CLOSED", detail=f"the order is {v['status']}")
        m = _market(st, v["symbol"])
        st.check_mapping(m.symbol)
        try:
            q = qty_to_lots(data.quantity, m) if data.quantity is not None else None
            pr = price_to_ticks(data.price, m) if data.price is not None else None
        except PrecisionError as exc:
            raise _precision(exc) from None
        res = await st.core.submit(AmendOrder(account_id=p.account_id, symbol=m.symbol, order_id=order_id,
                                              new_qty_lots=q, new_price_ticks=pr), corr, symbol=m.symbol)
        _raise_reject(res.events)
        if not any(isinstance(e, (OrderAmended, OrderCanceled)) for e in res.events):
            raise SpotexError("UPSTREAM_TIMEOUT", execution_status="UNKNOWN", detail="no amend result from the core")
        nv = await find_order(st, p.account_id, order_id=order_id)
        return _stored(order_from_view(nv, m, st))

    return stored_response(await st.idempotent_call(call, p, handler, order_call=True, key=key))


@delete("/v1/orders", status_code=200, responses=TRADE_ERRORS, security=_SEC, tags=["orders"],
        summary="Cancel all open orders of the account (optionally one symbol)")
async def cancel_all(request: Request[Any, Any, Any], symbol: Annotated[str | None, Parameter(query="symbol")] = None,
                     idempotency_key: Annotated[str | None, _IDEM] = None) -> Response[CancelAllOut]:
    st = edge_state(request)
    call = await st.call_of(request)
    p, key, corr = await trade_call(st, call)
    if symbol is not None:
        _market(st, symbol)

    async def handler() -> StoredResponse:
        assert st.core is not None
        res = await st.core.cancel_all_account(p.account_id, symbol, corr)
        _raise_reject(res.events)
        from core.wire import CancelAllDone

        n = sum(e.canceled for e in res.events if isinstance(e, CancelAllDone))
        return _stored(CancelAllOut(canceled=n, symbol=symbol))

    return stored_response(await st.idempotent_call(call, p, handler, order_call=True, key=key))


@get("/v1/orders/open", responses=READ_ERRORS, security=_SEC, tags=["orders"], summary="Open orders")
async def open_orders(request: Request[Any, Any, Any],
                      symbol: Annotated[str | None, Parameter(query="symbol")] = None) -> Response[list[OrderOut]]:
    st = edge_state(request)
    p = await st.authenticate(request, "read")
    assert st.core is not None
    if symbol is not None:
        _market(st, symbol)
    rows = await st.core.query("open_orders", account_id=p.account_id, symbol=symbol)
    out = [order_from_view(v, st.markets[v["symbol"]], st) for v in rows or [] if v["symbol"] in st.markets]
    return json_response(out)


@get("/v1/fills", responses=READ_ERRORS, security=_SEC, tags=["orders"],
     summary="Fills of the account from the ledger (survives restarts), newest first or paged forward")
async def fills(request: Request[Any, Any, Any], symbol: Annotated[str | None, Parameter(query="symbol")] = None,
                order_id: Annotated[int | None, Parameter(query="orderId", ge=1, le=2**63 - 1)] = None,
                start_time: Annotated[int | None, Parameter(query="startTime", ge=0, le=2**62)] = None,
                end_time: Annotated[int | None, Parameter(query="endTime", ge=0, le=2**62)] = None,
                from_id: Annotated[int | None, Parameter(query="fromId", ge=0, le=2**62,
                                                         description="trade id to page forward from (needs "
                                                                     "symbol); answers oldest first")] = None,
                limit: Annotated[int, Parameter(query="limit", ge=1, le=1000)] = 100) -> Response[list[FillOut]]:
    st = edge_state(request)
    p = await st.authenticate(request, "read")
    if symbol is not None:
        _market(st, symbol)
    rows = await fills_history(st, FillQuery(p.account_id, symbol, order_id, start_time, end_time, from_id, limit))
    return json_response([fill_out(f, st.markets[f.symbol]) for f in rows if f.symbol in st.markets])


ROUTES = [post_order, get_order, get_order_by_coid, delete_order, delete_order_by_coid, amend_order, cancel_all,
          open_orders, fills]
