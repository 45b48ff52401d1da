"""Merging the ledger's fills with the edge's not-yet-settled ones (edge/fills.py); the end-to-end test,
fills served from PostgreSQL across an edge restart, is in test_app_trading.py."""

from __future__ import annotations

from edge.core_client import Fill
from edge.fills import FillQuery, forward, merge


def fill(tid: int, ts: int, *, maker: bool = False, coid: str = "", sym: str = "BTC-USDT", oid: int = 7) -> Fill:
    return Fill(tid, sym, oid, coid, "SELL" if maker else "BUY", maker, 100, 1, 100, 1, "BTC", ts, tid)


def ids(fs: list[Fill]) -> list[tuple[int, bool]]:
    return [(f.trade_id, f.maker) for f in fs]


def test_union_deduped_by_trade_and_side_newest_first() -> None:
    settled = [fill(1, 10), fill(2, 20), fill(3, 30)]
    recent = [fill(3, 30, coid="c7"), fill(4, 40, coid="c7")]  # 3 is in both, 4 not settled yet
    out = merge(settled, recent, FillQuery(1))
    assert ids(out) == [(4, False), (3, False), (2, False), (1, False)]
    # The memory copy wins, and its client order id is lent to settled fills of the same order.
    assert [f.client_order_id for f in out] == ["c7"] * 4


def test_self_trade_is_two_fills_and_limit_applies_after_the_merge() -> None:
    settled = [fill(5, 50), fill(5, 50, maker=True), fill(6, 60)]
    out = merge(settled, [fill(6, 60)], FillQuery(1, limit=2))
    assert ids(out) == [(6, False), (5, True)]


def test_forward_paging_and_filters_apply_to_memory_too() -> None:
    q = FillQuery(1, symbol="BTC-USDT", from_id=2, limit=2)
    assert forward(q) and not forward(FillQuery(1)) and forward(FillQuery(1, start_ms=1))
    assert not forward(FillQuery(1, start_ms=1, end_ms=2))
    recent = [fill(1, 10), fill(2, 20), fill(3, 30), fill(9, 90, sym="ETH-USDT")]
    assert ids(merge([], recent, q)) == [(2, False), (3, False)]
    assert ids(merge([], recent, FillQuery(1, start_ms=15, end_ms=30))) == [(3, False), (2, False)]
    assert ids(merge([], recent, FillQuery(1, order_id=8))) == []
