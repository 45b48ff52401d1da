"""Order book primitives: resting orders, price levels and book sides.

Shape chosen for speed in pure Python (see docs/engine.md): integer tick prices; per side a sorted
list of level keys with the best level LAST (bids store ``price``, asks ``-price``) so the best level
is ``keys[-1]`` and removing it is ``keys.pop()``; a dict from price to :class:`Level`; per level an
``OrderedDict`` FIFO keyed by order id (O(1) append, O(1) cancel from anywhere, O(1) pop-front).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import OrderedDict

import msgspec

from core.wire import OrderStatus, OrderType, SelfTradePrevention, TimeInForce

__all__ = ["STP_BOTH", "STP_MAKER", "STP_NONE", "STP_TAKER", "BookSide", "Level", "Order"]

# Internal self-trade-prevention codes (ints compare faster than enums in the match loop).
STP_NONE = 0
STP_TAKER = 1
STP_MAKER = 2
STP_BOTH = 3


class Order(msgspec.Struct, gc=False):
    """A live order (mutable). ``qty`` is the total quantity (filled included), ``remaining`` what is
    left to fill. ``price`` is 0 for a market order. gc=False: orders hold no references that can
    form cycles, so the cyclic GC never needs to traverse them."""

    order_id: int
    account_id: int
    symbol: str
    is_buy: bool
    price: int
    qty: int
    remaining: int
    filled: int
    client_order_id: str
    type: OrderType
    tif: TimeInForce
    stp: SelfTradePrevention
    stp_code: int
    post_only: bool
    status: OrderStatus
    quote_amount: int | None = None


class Level:
    __slots__ = ("orders", "total")

    def __init__(self) -> None:
        self.total = 0
        self.orders: OrderedDict[int, Order] = OrderedDict()


class BookSide:
    """One side of a book. ``keys`` ascending, best last; ``levels`` by price."""

    __slots__ = ("is_buy", "keys", "levels")

    def __init__(self, is_buy: bool) -> None:
        self.is_buy = is_buy
        self.keys: list[int] = []
        self.levels: dict[int, Level] = {}

    def best(self) -> int:
        """Best price, or 0 when the side is empty."""
        keys = self.keys
        if not keys:
            return 0
        k = keys[-1]
        return k if self.is_buy else -k

    def add(self, o: Order) -> None:
        price = o.price
        lvl = self.levels.get(price)
        if lvl is None:
            lvl = Level()
            self.levels[price] = lvl
            insort(self.keys, price if self.is_buy else -price)
        lvl.orders[o.order_id] = o
        lvl.total += o.remaining

    def remove(self, o: Order) -> None:
        price = o.price
        lvl = self.levels[price]
        del lvl.orders[o.order_id]
        lvl.total -= o.remaining
        if not lvl.orders:
            self.drop_level(price)

    def drop_level(self, price: int) -> None:
        del self.levels[price]
        keys = self.keys
        key = price if self.is_buy else -price
        if keys[-1] == key:
            keys.pop()
        else:
            del keys[bisect_left(keys, key)]

    def depth(self, n: int) -> list[tuple[int, int]]:
        """Top ``n`` levels best first as (price_ticks, qty_lots)."""
        keys = self.keys
        levels = self.levels
        out: list[tuple[int, int]] = []
        sign = 1 if self.is_buy else -1
        for i in range(len(keys) - 1, max(-1, len(keys) - 1 - n), -1):
            p = keys[i] * sign
            out.append((p, levels[p].total))
        return out

    def prices_best_first(self) -> list[int]:
        sign = 1 if self.is_buy else -1
        return [k * sign for k in reversed(self.keys)]
