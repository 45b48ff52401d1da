"""Read-only views returned by the engine's queries (for the edge). Copies, never live objects."""

from __future__ import annotations

import msgspec

from core.wire import OrderStatus, OrderType, SelfTradePrevention, Side, SymbolMode, TimeInForce

__all__ = ["BalanceView", "BookView", "OrderView"]


class BalanceView(msgspec.Struct, frozen=True):
    asset: str
    available: int
    hold: int


class OrderView(msgspec.Struct, frozen=True, kw_only=True):
    order_id: int
    account_id: int
    symbol: str
    client_order_id: str
    side: Side
    type: OrderType
    tif: TimeInForce
    price_ticks: int | None
    qty_lots: int
    filled_qty_lots: int
    remaining_qty_lots: int
    status: OrderStatus
    post_only: bool
    stp: SelfTradePrevention
    quote_amount: int | None = None


class BookView(msgspec.Struct, frozen=True, kw_only=True):
    """L2 book: levels best first as (price_ticks, qty_lots); ``seq`` is the symbol stream's seq the
    view is consistent with (the last event seq applied)."""

    symbol: str
    seq: int
    mode: SymbolMode
    bids: list[tuple[int, int]]
    asks: list[tuple[int, int]]
