"""Account and reference routes: ``GET /v1/account/balances``, ``GET /v1/markets``, ``GET /v1/time``."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, get

from core.wire import MarketConfig, minor_to_amount
from edge.app import edge_state, json_response
from edge.orders import READ_ERRORS, _problem_responses

__all__ = ["ROUTES", "BalanceOut", "BalancesOut", "MarketOut", "balances_of", "market_out"]


class BalanceOut(msgspec.Struct, kw_only=True):
    asset: str
    available: str
    hold: str
    total: str


class BalancesOut(msgspec.Struct, kw_only=True):
    accountId: int
    balances: list[BalanceOut]


class MarketOut(msgspec.Struct, kw_only=True):
    symbol: str
    base: str
    quote: str
    tickSize: str
    lotSize: str
    minNotional: str
    priceBandBps: int
    makerFeeBps: int
    takerFeeBps: int
    baseScale: int
    quoteScale: int
    mode: str | None


def market_out(m: MarketConfig, mode: str | None) -> MarketOut:
    return MarketOut(symbol=m.symbol, base=m.base, quote=m.quote, tickSize=m.tick_size, lotSize=m.lot_size,
                     minNotional=minor_to_amount(m.min_notional, m.quote_scale), priceBandBps=m.price_band_bps,
                     makerFeeBps=m.maker_fee_bps, takerFeeBps=m.taker_fee_bps, baseScale=m.base_scale,
                     quoteScale=m.quote_scale, mode=mode)


async def balances_of(st: Any, account_id: int) -> list[BalanceOut]:
    raw = await st.core.query("balances", account_id=account_id)
    out = []
    for asset, b in sorted((raw or {}).items()):
        # BalanceView is a positional struct in msgpack (array) or a map, depending on its definition.
        av, ho = (b[1], b[2]) if isinstance(b, list) else (b["available"], b["hold"])
        scale = st.asset_scales.get(asset, 0)
        out.append(BalanceOut(asset=asset, available=minor_to_amount(av, scale), hold=minor_to_amount(ho, scale),
                              total=minor_to_amount(av + ho, scale)))
    return out


@get("/v1/account/balances", responses=READ_ERRORS, security=[{"apiKey": []}], tags=["account"],
     summary="Balances of the key's account (available, on hold, total)")
async def balances(request: Request[Any, Any, Any]) -> Response[BalancesOut]:
    st = edge_state(request)
    p = await st.authenticate(request, "read")
    return json_response(BalancesOut(accountId=p.account_id, balances=await balances_of(st, p.account_id)))


@get("/v1/markets", responses=_problem_responses(429, 503), tags=["market data"], summary="Listed markets")
async def markets(request: Request[Any, Any, Any]) -> Response[list[MarketOut]]:
    st = edge_state(request)
    st.public_rate(request)
    modes = await st.symbol_modes()
    return json_response([market_out(m, modes.get(s)) for s, m in sorted(st.markets.items())])


class TimeOut(msgspec.Struct):
    serverTime: int


@get("/v1/time", tags=["market data"], summary="Server time (ms)", sync_to_thread=False)
def server_time() -> TimeOut:
    return TimeOut(time.time_ns() // 1_000_000)


ROUTES = [balances, markets, server_time]
