"""An account's fills history, from the ledger (the book of record) plus what it has not settled yet.

``ledger_trades`` in PostgreSQL holds one row per trade with both sides (taker and maker account,
order, fee and fee asset), so it survives an edge restart and covers every trade the ledger has
settled. The edge's in-memory buffer (``CoreClient.fills``, fed by its EVT subscription) covers the
trades of the last moments that the ledger may not have committed yet. Both are read and merged,
deduplicated by (symbol, trade id, maker side): a self-trade is two fills of one trade, one as
taker and one as maker.

Trade ids are per market, so ``from_id`` needs a symbol. Order: newest first, unless the caller
pages forward (``from_id``, or ``start_ms`` without ``end_ms``: :func:`forward`), then oldest first
from there, as Binance's ``myTrades`` does. The client order id is not in the ledger; it is filled
from the edge's memory of recent orders and is ``""`` for older fills.

Reads use two indexes on ``ledger_trades`` (migration 0005), one per side of the trade.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from core.wire import MarketConfig
from edge.core_client import Fill
from edge.errors import SpotexError

__all__ = ["FillQuery", "fills_history", "forward"]

MAX_LIMIT = 1_000


@dataclass(frozen=True, slots=True)
class FillQuery:
    account_id: int
    symbol: str | None = None
    order_id: int | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    from_id: int | None = None
    limit: int = 100


def forward(q: FillQuery) -> bool:
    """Paging forward (oldest first): from a trade id, or from a start time with no end."""
    return q.from_id is not None or (q.start_ms is not None and q.end_ms is None)


def _key(f: Fill) -> tuple[int, str, int, bool]:
    return (f.ts_ms, f.symbol, f.trade_id, f.maker)


def _matches(f: Fill, q: FillQuery) -> bool:
    return ((q.symbol is None or f.symbol == q.symbol) and (q.order_id is None or f.order_id == q.order_id)
            and (q.start_ms is None or f.ts_ms >= q.start_ms) and (q.end_ms is None or f.ts_ms <= q.end_ms)
            and (q.from_id is None or f.trade_id >= q.from_id))


def _sql(q: FillQuery, symbols: list[str]) -> tuple[str, list[Any]]:
    """One round trip: per symbol and side, an index range scan on (<side>_account_id, symbol,
    trade_id) limited to ``limit`` rows (within a market trade ids and times grow together)."""
    args: list[Any] = [q.account_id, q.limit]
    extra = ""
    if q.start_ms is not None:
        args.append(q.start_ms)
        extra += f" AND occurred_at_ms >= ${len(args)}"
    if q.end_ms is not None:
        args.append(q.end_ms)
        extra += f" AND occurred_at_ms <= ${len(args)}"
    if q.from_id is not None:
        args.append(q.from_id)
        extra += f" AND trade_id >= ${len(args)}"
    order_arg = None
    if q.order_id is not None:
        args.append(q.order_id)
        order_arg = len(args)
    direction = "ASC" if forward(q) else "DESC"
    parts = []
    for sym in symbols:
        args.append(sym)
        s = len(args)
        for side in ("taker", "maker"):
            fill_side = "taker_side" if side == "taker" else \
                "CASE WHEN taker_side = 'BUY' THEN 'SELL' ELSE 'BUY' END"
            by_order = f" AND {side}_order_id = ${order_arg}" if order_arg is not None else ""
            parts.append(
                f"(SELECT symbol, trade_id, seq, {side}_order_id AS order_id, {fill_side} AS side, "
                f"{'true' if side == 'maker' else 'false'} AS maker, price_ticks, qty_lots, quote_amount, "
                f"{side}_fee AS fee, {side}_fee_asset AS fee_asset, taker_side, occurred_at_ms "
                f"FROM ledger_trades WHERE {side}_account_id = $1 AND symbol = ${s}{extra}{by_order} "
                f"ORDER BY trade_id {direction} LIMIT $2)")
    return " UNION ALL ".join(parts), args


def _from_row(r: Any, m: MarketConfig | None, coids: dict[int, str]) -> Fill:
    fee_asset = r["fee_asset"]
    if not fee_asset and m is not None:
        # The buyer pays in base, the seller in quote (core.wire.TradeExecuted).
        fee_asset = m.base if r["side"] == "BUY" else m.quote
    return Fill(int(r["trade_id"]), r["symbol"], int(r["order_id"]), coids.get(int(r["order_id"]), ""), r["side"],
                bool(r["maker"]), int(r["price_ticks"]), int(r["qty_lots"]), int(r["quote_amount"]), int(r["fee"]),
                fee_asset, int(r["occurred_at_ms"]), int(r["seq"]))


def merge(settled: Iterable[Fill], recent: Iterable[Fill], q: FillQuery) -> list[Fill]:
    """The union of the ledger's rows and the in-memory ones, one fill per (symbol, trade, side),
    in the query's order, at most ``limit``. The memory copy wins (it knows the client order id)."""
    recent = [f for f in recent if _matches(f, q)]
    by_key: dict[tuple[str, int, bool], Fill] = {}
    coids = {f.order_id: f.client_order_id for f in recent if f.client_order_id}
    for f in settled:
        if not f.client_order_id and f.order_id in coids:
            f = Fill(f.trade_id, f.symbol, f.order_id, coids[f.order_id], f.side, f.maker, f.price_ticks, f.qty_lots,
                     f.quote_amount, f.fee, f.fee_asset, f.ts_ms, f.seq)
        by_key[(f.symbol, f.trade_id, f.maker)] = f
    for f in recent:
        by_key[(f.symbol, f.trade_id, f.maker)] = f
    out = sorted(by_key.values(), key=_key, reverse=not forward(q))
    return out[:q.limit]


async def fills_history(st: Any, q: FillQuery) -> list[Fill]:
    """``st`` is the app's EdgeState (markets, pool, core)."""
    if not 1 <= q.limit <= MAX_LIMIT:
        raise SpotexError("VALIDATION", detail=f"limit must be in [1, {MAX_LIMIT}]")
    if q.from_id is not None and q.symbol is None:
        raise SpotexError("VALIDATION", detail="fromId needs a symbol: trade ids are per market")
    if q.start_ms is not None and q.end_ms is not None and q.start_ms > q.end_ms:
        raise SpotexError("VALIDATION", detail="startTime is after endTime")
    markets: dict[str, MarketConfig] = st.markets
    symbols = [q.symbol] if q.symbol is not None else sorted(markets)
    recent: list[Fill] = []
    if st.core is not None:
        recent = st.core.fills(q.account_id, q.symbol, MAX_LIMIT, order_id=q.order_id)
    coids = {f.order_id: f.client_order_id for f in recent if f.client_order_id}
    settled: list[Fill] = []
    if symbols:
        if st.pool is None:
            raise SpotexError("UNAVAILABLE", detail="the fills history (PostgreSQL) is not available")
        sql, args = _sql(q, symbols)
        try:
            rows = await st.pool.fetch(sql, *args)
        except Exception as exc:
            raise SpotexError("UNAVAILABLE", detail="the fills history (PostgreSQL) did not answer") from exc
        settled = [_from_row(r, markets.get(r["symbol"]), coids) for r in rows]
    return merge(settled, recent, q)
