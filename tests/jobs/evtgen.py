"""Synthetic EVT traffic in the core's format: one message = a msgpack list of events of one stream
with contiguous seq, subject evt.<stream>, headers Spotex-First-Seq/Spotex-Last-Seq."""

from __future__ import annotations

import time
from typing import Any

from core.bus import ensure_streams, evt_subject
from core.wire import Bucket, Deposited, Move, Side, TradeExecuted, encode_events


def make_events(stream: str, first: int, n: int) -> list[Any]:
    out: list[Any] = []
    now = int(time.time() * 1000)
    for seq in range(first, first + n):
        common = dict(event_id=f"{stream}:{seq}", symbol=stream, seq=seq, occurred_at=now,
                      correlation_id=f"c{seq}", causation_id=f"c{seq}", fencing_token=1)
        if seq % 2:
            out.append(TradeExecuted(**common, trade_id=seq, taker_order_id=1, taker_account_id=1,
                                     taker_side=Side.BUY, maker_order_id=2, maker_account_id=2, price_ticks=100,
                                     qty_lots=1, base_amount=1, quote_amount=100, taker_fee=0,
                                     taker_fee_asset="BTC", maker_fee=0, maker_fee_asset="USDT",
                                     taker_remaining_lots=0, maker_remaining_lots=0, moves=[]))
        else:
            out.append(Deposited(**common, account_id=1, asset="USDT", amount=10, reference=f"r{seq}",
                                 moves=[Move(1, "USDT", Bucket.AVAILABLE, 10)]))
    return out


class EvtWriter:
    def __init__(self, js: Any) -> None:
        self.js = js
        self.next: dict[str, int] = {}

    async def setup(self) -> None:
        await ensure_streams(self.js)

    async def publish(self, stream: str, n: int, per_msg: int = 10) -> int:
        sent = 0
        while sent < n:
            k = min(per_msg, n - sent)
            first = self.next.get(stream, 1)
            evs = make_events(stream, first, k)
            await self.js.publish(evt_subject(stream), encode_events(evs), headers={
                "Nats-Msg-Id": f"{stream}:{first + k - 1}", "Spotex-First-Seq": str(first),
                "Spotex-Last-Seq": str(first + k - 1)})
            self.next[stream] = first + k
            sent += k
        return sent
