"""Golden scenarios: exact expected events for the engine's semantics (docs/engine.md).

Test market BTC-USDT: tick 1, lot 0.1 BTC, BTC scale 2, USDT scale 1, so base_per_lot = 10 BTC minor
units and quote_per_tick_lot = 1 (notional = price * qty in USDT minor units). Fees: maker 10 bps,
taker 20 bps, rounded up (ceil), taken from the asset received.

After every command the harness checks invariants: moves sum to zero per event and asset, a shadow
ledger built only from the events' moves equals the engine's balances, no balance is negative (but
custody's), holds equal what open orders can spend, level totals equal their orders, the book is not
crossed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import msgspec
import pytest

from core.engine import Engine, SequenceError
from core.wire import (
    CUSTODY_ACCOUNT,
    FEE_ACCOUNT,
    AddMarket,
    AdminCancelAll,
    AmendOrder,
    AssetTotal,
    BookDelta,
    Bucket,
    CancelAllAccount,
    CancelAllDone,
    CancelOrder,
    CancelReason,
    Command,
    CommandRejected,
    Deposit,
    Deposited,
    EngineCheckpoint,
    Event,
    LevelChange,
    MarketAdded,
    MarketConfig,
    Move,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderRejected,
    OrderStatus,
    OrderType,
    PlaceOrder,
    RejectCode,
    SelfTradePrevention,
    SequencedCommand,
    SetSymbolMode,
    Side,
    SymbolMode,
    SymbolModeChanged,
    TimeInForce,
    TradeExecuted,
    Withdraw,
    WithdrawalsHalt,
    WithdrawalsHaltChanged,
    Withdrawn,
    market_config,
)

SYM = "BTC-USDT"
A, B, C = 1000, 1001, 1002
BUY, SELL = Side.BUY, Side.SELL
GTC, IOC, FOK = TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK
TAKER = SelfTradePrevention.EXPIRE_TAKER
USDT0, BTC0 = 1_000_000, 10_000


def make_cfg(symbol: str = SYM, base: str = "BTC", **kw: Any) -> MarketConfig:
    args: dict[str, Any] = {"maker_fee_bps": 10, "taker_fee_bps": 20} | kw
    return market_config(symbol, base, "USDT", base_scale=2, quote_scale=1, tick_size="1", lot_size="0.1", **args)


def av(acct: int, asset: str, delta: int) -> Move:
    return Move(acct, asset, Bucket.AVAILABLE, delta)


def ho(acct: int, asset: str, delta: int) -> Move:
    return Move(acct, asset, Bucket.HOLD, delta)


# ---------------------------------------------------------------------------------------- invariants


class Shadow:
    """A ledger fed only with the events' moves: must always equal the engine's balances."""

    def __init__(self) -> None:
        self.bal: dict[tuple[int, str, str], int] = defaultdict(int)

    def post(self, events: list[Event]) -> None:
        for ev in events:
            moves = getattr(ev, "moves", None)
            if not moves:
                continue
            per_asset: dict[str, int] = defaultdict(int)
            for mv in moves:
                assert mv.delta != 0, f"zero move in {ev}"
                per_asset[mv.asset] += mv.delta
                self.bal[(mv.account_id, mv.asset, str(mv.bucket))] += mv.delta
            assert all(v == 0 for v in per_asset.values()), f"moves do not balance: {ev}"


def check_invariants(e: Engine, shadow: Shadow | None = None) -> None:
    for aid in e.accounts():
        for asset, b in e.balances(aid).items():
            if aid != CUSTODY_ACCOUNT:
                assert b.available >= 0 and b.hold >= 0, (aid, b)
            if shadow is not None:
                assert shadow.bal[(aid, asset, "available")] == b.available, (aid, asset)
                assert shadow.bal[(aid, asset, "hold")] == b.hold, (aid, asset)
    if shadow is not None:
        for (aid, asset, bucket), v in shadow.bal.items():
            b = e.balance(aid, asset)
            assert v == (b.available if bucket == "available" else b.hold), (aid, asset, bucket)
    totals = {t.asset: t for t in e.totals()}
    for t in totals.values():
        assert t.available + t.hold + t.custody == 0
    holds: dict[tuple[int, str], int] = defaultdict(int)
    for cfg in e.markets():
        book = e.book(cfg.symbol, depth=10**9)
        assert book is not None
        if book.bids and book.asks:
            assert book.bids[0][0] < book.asks[0][0], "crossed book"
        level_sum: dict[tuple[bool, int], int] = defaultdict(int)
        for aid in e.accounts():
            for o in e.open_orders(aid, cfg.symbol):
                assert o.remaining_qty_lots > 0
                assert o.filled_qty_lots + o.remaining_qty_lots == o.qty_lots
                assert o.status in (OrderStatus.ACCEPTED, OrderStatus.PARTIALLY_FILLED)
                assert o.price_ticks is not None
                level_sum[(o.side is Side.BUY, o.price_ticks)] += o.remaining_qty_lots
                if o.side is Side.BUY:
                    holds[(aid, cfg.quote)] += o.remaining_qty_lots * o.price_ticks * cfg.quote_per_tick_lot
                else:
                    holds[(aid, cfg.base)] += o.remaining_qty_lots * cfg.base_per_lot
        assert dict(level_sum) == {(True, p): q for p, q in book.bids} | {(False, p): q for p, q in book.asks}
    for aid in e.accounts():
        for asset, b in e.balances(aid).items():
            assert b.hold == holds.get((aid, asset), 0), (aid, asset, b.hold, holds.get((aid, asset), 0))


class Harness:
    """Drives an engine with contiguous seqs and builds expected events with the right envelope."""

    def __init__(self, *, fund: bool = True, checkpoint_every: int = 0, **cfg: Any) -> None:
        self.e = Engine(checkpoint_every=checkpoint_every)
        # A twin fed the same commands with events off (the replay of an old WAL tail): after
        # every command it must hold exactly the same state, stream seqs included.
        self.silent = Engine(checkpoint_every=checkpoint_every)
        self.silent.emit_events(False)
        self.shadow = Shadow()
        self.seq = 0
        self.fence = 1
        self._used_fence = 1
        self._base: dict[str, int] = {}
        self._next: dict[str, int] = {}
        self.trades_seen = 0
        self._tid = 0
        self.do(AddMarket(config=make_cfg(**cfg)))
        if fund:
            for acct in (A, B, C):
                self.do(Deposit(account_id=acct, asset="USDT", amount=USDT0))
                self.do(Deposit(account_id=acct, asset="BTC", amount=BTC0))

    def do(self, cmd: Command, fence: int | None = None) -> list[Event]:
        self.seq += 1
        self._used_fence = self.fence if fence is None else fence
        self._base = {s.symbol: self.e.stream_seq(s.symbol) for s in self.e.markets()}
        self._base["_sys"] = self.e.stream_seq("_sys")
        self._next = {}
        self._tid = self.trades_seen
        sc = SequencedCommand(
            seq=self.seq, ts_ms=1_000_000 + self.seq, fencing_token=self._used_fence,
            correlation_id=f"c{self.seq}", command=cmd,
        )
        evs = self.e.apply(sc)
        assert self.silent.apply(sc) == []
        assert self.silent.snapshot() == self.e.snapshot()
        self.trades_seen += sum(isinstance(x, TradeExecuted) for x in evs)
        self.shadow.post(evs)
        check_invariants(self.e, self.shadow)
        return evs

    def next_trade_id(self) -> int:
        """Trade ids count per market; the tests trade on one market."""
        self._tid += 1
        return self._tid

    def ev(self, cls: type[Any], stream: str = SYM, **kw: Any) -> Any:
        n = self._next.get(stream, self._base.get(stream, 0)) + 1
        self._next[stream] = n
        return cls(
            event_id=f"{stream}:{n}", symbol=stream, seq=n, occurred_at=1_000_000 + self.seq,
            correlation_id=f"c{self.seq}", causation_id=f"cmd:{self.seq}", fencing_token=self._used_fence, **kw,
        )

    # shorthands ---------------------------------------------------------------------------
    def limit(self, acct: int, side: Side, price: int, qty: int, **kw: Any) -> list[Event]:
        kw.setdefault("client_order_id", "")
        return self.do(PlaceOrder(account_id=acct, symbol=SYM, side=side, price_ticks=price, qty_lots=qty, **kw))

    def market(self, acct: int, side: Side, **kw: Any) -> list[Event]:
        kw.setdefault("client_order_id", "")
        return self.do(PlaceOrder(account_id=acct, symbol=SYM, side=side, type=OrderType.MARKET, **kw))

    def accepted(self, acct: int, side: Side, price: int | None, qty: int | None, moves: list[Move], *,
                 coid: str = "", tif: TimeInForce = GTC, type: OrderType = OrderType.LIMIT,
                 quote: int | None = None, post_only: bool = False,
                 stp: SelfTradePrevention = TAKER) -> OrderAccepted:
        return self.ev(
            OrderAccepted, order_id=self.seq, account_id=acct, client_order_id=coid, side=side, type=type,
            tif=tif, price_ticks=price, qty_lots=qty, quote_amount=quote, post_only=post_only, stp=stp,
            moves=moves,
        )

    def rejected(self, acct: int, code: RejectCode, detail: str, coid: str = "", stream: str = SYM) -> OrderRejected:
        return self.ev(OrderRejected, stream=stream, account_id=acct, client_order_id=coid, code=code, detail=detail)

    def delta(self, *levels: tuple[Side, int, int]) -> BookDelta:
        return self.ev(BookDelta, levels=[LevelChange(*lv) for lv in levels])

    def trade(self, **kw: Any) -> TradeExecuted:
        return self.ev(TradeExecuted, **kw)

    def canceled(self, oid: int, acct: int, reason: CancelReason, canceled: int, filled: int,
                 moves: list[Move], coid: str = "") -> OrderCanceled:
        return self.ev(
            OrderCanceled, order_id=oid, account_id=acct, client_order_id=coid, reason=reason,
            canceled_qty_lots=canceled, filled_qty_lots=filled, moves=moves,
        )

    def cmd_rejected(self, command: str, code: RejectCode, detail: str, stream: str = SYM, **kw: Any) -> Any:
        base = {"account_id": None, "order_id": None, "client_order_id": None} | kw
        return self.ev(CommandRejected, stream=stream, command=command, code=code, detail=detail, **base)

    def bal(self, acct: int, asset: str) -> tuple[int, int]:
        b = self.e.balance(acct, asset)
        return b.available, b.hold


def buy_trade(h: Harness, *, taker: tuple[int, int], maker: tuple[int, int], price: int, qty: int,
              limit: int | None, taker_rem: int, maker_rem: int, tfee: int, mfee: int) -> TradeExecuted:
    """A taker BUY against a resting SELL with the standard move layout."""
    (toid, ta), (moid, ma) = taker, maker
    base, quote = qty * 10, qty * price
    consumed = qty * limit if limit is not None else quote
    moves = [ho(ta, "USDT", -consumed)]
    if consumed != quote:
        moves.append(av(ta, "USDT", consumed - quote))
    moves.append(av(ma, "USDT", quote - mfee))
    if mfee:
        moves.append(av(FEE_ACCOUNT, "USDT", mfee))
    moves += [ho(ma, "BTC", -base), av(ta, "BTC", base - tfee)]
    if tfee:
        moves.append(av(FEE_ACCOUNT, "BTC", tfee))
    return h.trade(
        trade_id=h.next_trade_id(), taker_order_id=toid, taker_account_id=ta, taker_side=BUY,
        maker_order_id=moid, maker_account_id=ma, price_ticks=price, qty_lots=qty, base_amount=base,
        quote_amount=quote, taker_fee=tfee, taker_fee_asset="BTC", maker_fee=mfee, maker_fee_asset="USDT",
        taker_remaining_lots=taker_rem, maker_remaining_lots=maker_rem, moves=moves,
    )


def sell_trade(h: Harness, *, taker: tuple[int, int], maker: tuple[int, int], price: int, qty: int,
               taker_rem: int, maker_rem: int, tfee: int, mfee: int) -> TradeExecuted:
    """A taker SELL against a resting BUY (the maker's hold is at its own price: no refund)."""
    (toid, ta), (moid, ma) = taker, maker
    base, quote = qty * 10, qty * price
    moves = [ho(ma, "USDT", -quote), av(ta, "USDT", quote - tfee)]
    if tfee:
        moves.append(av(FEE_ACCOUNT, "USDT", tfee))
    moves += [ho(ta, "BTC", -base), av(ma, "BTC", base - mfee)]
    if mfee:
        moves.append(av(FEE_ACCOUNT, "BTC", mfee))
    return h.trade(
        trade_id=h.next_trade_id(), taker_order_id=toid, taker_account_id=ta, taker_side=SELL,
        maker_order_id=moid, maker_account_id=ma, price_ticks=price, qty_lots=qty, base_amount=base,
        quote_amount=quote, taker_fee=tfee, taker_fee_asset="USDT", maker_fee=mfee, maker_fee_asset="BTC",
        taker_remaining_lots=taker_rem, maker_remaining_lots=maker_rem, moves=moves,
    )


def fee(x: int, bps: int) -> int:
    return -(-x * bps // 10_000)


# ============================================================================ markets, funds


def test_add_market_and_deposits() -> None:
    h = Harness(fund=False)
    assert h.e.markets() == [make_cfg()]
    evs = h.do(Deposit(account_id=A, asset="USDT", amount=500, reference="tx1"))
    assert evs == [
        h.ev(Deposited, stream="_sys", account_id=A, asset="USDT", amount=500, reference="tx1",
             moves=[av(CUSTODY_ACCOUNT, "USDT", -500), av(A, "USDT", 500)])
    ]
    assert h.bal(A, "USDT") == (500, 0)
    assert h.bal(CUSTODY_ACCOUNT, "USDT") == (-500, 0)


def test_market_added_event_and_market_rejects() -> None:
    e = Engine(checkpoint_every=0)
    cfg = make_cfg()
    cmd = SequencedCommand(seq=1, ts_ms=7, fencing_token=1, correlation_id="x", command=AddMarket(config=cfg))
    assert e.apply(cmd) == [MarketAdded("BTC-USDT:1", SYM, 1, 7, "x", "cmd:1", 1, cfg)]
    again = e.apply(
        SequencedCommand(seq=2, ts_ms=8, fencing_token=1, correlation_id="y", command=AddMarket(config=cfg))
    )
    assert again == [
        CommandRejected("_sys:1", "_sys", 1, 8, "y", "cmd:2", 1, "AddMarket", RejectCode.MARKET_EXISTS, None, None,
                        None, "market 'BTC-USDT' exists")
    ]
    bad = msgspec.structs.replace(make_cfg("ETH-USDT", "ETH"), quote_per_tick_lot=3)
    out = e.apply(SequencedCommand(seq=3, ts_ms=9, fencing_token=1, correlation_id="z", command=AddMarket(config=bad)))
    assert len(out) == 1 and isinstance(out[0], CommandRejected)
    assert out[0].code is RejectCode.INVALID_MARKET and "quote_per_tick_lot" in out[0].detail
    assert out[0].symbol == "_sys" and e.market("ETH-USDT") is None


def test_withdrawals_and_halt() -> None:
    h = Harness()
    evs = h.do(Withdraw(account_id=A, asset="USDT", amount=300, reference="w1"))
    assert evs == [
        h.ev(Withdrawn, stream="_sys", account_id=A, asset="USDT", amount=300, reference="w1",
             moves=[av(A, "USDT", -300), av(CUSTODY_ACCOUNT, "USDT", 300)])
    ]
    evs = h.do(Withdraw(account_id=A, asset="USDT", amount=USDT0))
    assert evs == [h.cmd_rejected("Withdraw", RejectCode.INSUFFICIENT_FUNDS, "not enough available", stream="_sys",
                                  account_id=A)]
    evs = h.do(WithdrawalsHalt(on=True, reason="invariant violation", ticket="INC-7"))
    assert evs == [h.ev(WithdrawalsHaltChanged, stream="_sys", on=True, reason="invariant violation", ticket="INC-7")]
    assert h.e.withdrawals_halted
    evs = h.do(Withdraw(account_id=A, asset="USDT", amount=1))
    assert evs == [h.cmd_rejected("Withdraw", RejectCode.WITHDRAWALS_HALTED, "withdrawals are halted",
                                  stream="_sys", account_id=A)]
    # deposits still work while withdrawals are halted
    assert isinstance(h.do(Deposit(account_id=A, asset="USDT", amount=1))[0], Deposited)
    h.do(WithdrawalsHalt(on=False, reason="resolved", ticket="INC-7"))
    assert isinstance(h.do(Withdraw(account_id=A, asset="USDT", amount=1))[0], Withdrawn)
    # held funds cannot be withdrawn
    h.limit(A, BUY, 100, 9990)  # holds 999000 of the 999701 available
    evs = h.do(Withdraw(account_id=A, asset="USDT", amount=1000))
    assert evs[0].code is RejectCode.INSUFFICIENT_FUNDS


def test_deposit_and_withdraw_validation() -> None:
    h = Harness()
    cases = [
        (Deposit(account_id=0, asset="USDT", amount=1), RejectCode.INVALID_ACCOUNT),
        (Deposit(account_id=A, asset="usdt", amount=1), RejectCode.INVALID_ASSET),
        (Deposit(account_id=A, asset="US-DT", amount=1), RejectCode.INVALID_ASSET),
        (Deposit(account_id=A, asset="USDT", amount=0), RejectCode.INVALID_AMOUNT),
        (Deposit(account_id=A, asset="USDT", amount=2**62), RejectCode.INVALID_AMOUNT),  # total supply cap
        (Withdraw(account_id=A, asset="USDT", amount=-5), RejectCode.INVALID_AMOUNT),
        (Withdraw(account_id=A, asset="DOGE", amount=5), RejectCode.INSUFFICIENT_FUNDS),
    ]
    for cmd, code in cases:
        evs = h.do(cmd)
        assert len(evs) == 1 and isinstance(evs[0], CommandRejected), cmd
        assert evs[0].code is code and evs[0].symbol == "_sys", (cmd, evs)
    # an asset no market trades yet may be deposited
    assert isinstance(h.do(Deposit(account_id=A, asset="DOGE", amount=5))[0], Deposited)
    assert h.bal(A, "DOGE") == (5, 0)


# ============================================================================ limit orders, matching


def test_resting_limit_buy_holds_notional() -> None:
    h = Harness()
    evs = h.limit(A, BUY, 100, 7, client_order_id="b1")
    assert evs == [
        h.accepted(A, BUY, 100, 7, [av(A, "USDT", -700), ho(A, "USDT", 700)], coid="b1"),
        h.delta((BUY, 100, 7)),
    ]
    assert h.bal(A, "USDT") == (USDT0 - 700, 700)
    v = h.e.order(h.seq)
    assert v is not None and v.status is OrderStatus.ACCEPTED and v.client_order_id == "b1"
    assert h.e.order_by_client_id(A, "b1") == v
    assert h.e.open_orders(A) == [v]


def test_resting_limit_sell_holds_base() -> None:
    h = Harness()
    evs = h.limit(B, SELL, 100, 7)
    assert evs == [h.accepted(B, SELL, 100, 7, [av(B, "BTC", -70), ho(B, "BTC", 70)]), h.delta((SELL, 100, 7))]


def test_full_match_with_price_improvement_and_fees() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 10)
    maker = h.seq
    evs = h.limit(A, BUY, 105, 10)
    # taker pays the maker's price; the hold at 105 is consumed and the 5*10 improvement returned
    assert evs == [
        h.accepted(A, BUY, 105, 10, [av(A, "USDT", -1050), ho(A, "USDT", 1050)]),
        buy_trade(h, taker=(h.seq, A), maker=(maker, B), price=100, qty=10, limit=105, taker_rem=0, maker_rem=0,
                  tfee=1, mfee=1),
        h.delta((SELL, 100, 0)),
    ]
    assert h.bal(A, "USDT") == (USDT0 - 1000, 0)
    assert h.bal(A, "BTC") == (BTC0 + 99, 0)  # 100 minus the ceil(0.2) = 1 taker fee
    assert h.bal(B, "USDT") == (USDT0 + 999, 0)
    assert h.bal(FEE_ACCOUNT, "BTC") == (1, 0) and h.bal(FEE_ACCOUNT, "USDT") == (1, 0)
    assert h.e.last_trade_price(SYM) == 100
    filled = h.e.order(h.seq)
    assert filled is not None and filled.status is OrderStatus.FILLED
    m = h.e.order(maker)
    assert m is not None and m.status is OrderStatus.FILLED and m.filled_qty_lots == 10


def test_partial_fill_rests_remainder() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 4)
    maker = h.seq
    evs = h.limit(A, BUY, 101, 10)
    assert evs == [
        h.accepted(A, BUY, 101, 10, [av(A, "USDT", -1010), ho(A, "USDT", 1010)]),
        buy_trade(h, taker=(h.seq, A), maker=(maker, B), price=100, qty=4, limit=101, taker_rem=6, maker_rem=0,
                  tfee=1, mfee=1),
        h.delta((SELL, 100, 0), (BUY, 101, 6)),
    ]
    v = h.e.order(h.seq)
    assert v is not None and v.status is OrderStatus.PARTIALLY_FILLED and v.remaining_qty_lots == 6
    assert h.bal(A, "USDT") == (USDT0 - 400 - 606, 606)


def test_price_time_priority_across_levels() -> None:
    h = Harness()
    h.limit(B, SELL, 101, 5)
    o1 = h.seq
    h.limit(C, SELL, 100, 3)
    o2 = h.seq
    h.limit(B, SELL, 100, 3)
    o3 = h.seq
    evs = h.limit(A, BUY, 101, 8)
    t = h.seq
    assert evs == [
        h.accepted(A, BUY, 101, 8, [av(A, "USDT", -808), ho(A, "USDT", 808)]),
        buy_trade(h, taker=(t, A), maker=(o2, C), price=100, qty=3, limit=101, taker_rem=5, maker_rem=0,
                  tfee=1, mfee=1),
        buy_trade(h, taker=(t, A), maker=(o3, B), price=100, qty=3, limit=101, taker_rem=2, maker_rem=0,
                  tfee=1, mfee=1),
        buy_trade(h, taker=(t, A), maker=(o1, B), price=101, qty=2, limit=101, taker_rem=0, maker_rem=3,
                  tfee=1, mfee=1),
        h.delta((SELL, 100, 0), (SELL, 101, 3)),
    ]
    assert h.e.book(SYM) is not None and h.e.book(SYM).asks == [(101, 3)]  # type: ignore[union-attr]


def test_taker_sell_against_bids() -> None:
    h = Harness()
    h.limit(A, BUY, 99, 5)
    b1 = h.seq
    h.limit(C, BUY, 100, 5)
    b2 = h.seq
    evs = h.limit(B, SELL, 99, 7)
    t = h.seq
    assert evs == [
        h.accepted(B, SELL, 99, 7, [av(B, "BTC", -70), ho(B, "BTC", 70)]),
        sell_trade(h, taker=(t, B), maker=(b2, C), price=100, qty=5, taker_rem=2, maker_rem=0,
                   tfee=fee(500, 20), mfee=fee(50, 10)),
        sell_trade(h, taker=(t, B), maker=(b1, A), price=99, qty=2, taker_rem=0, maker_rem=3,
                   tfee=fee(198, 20), mfee=fee(20, 10)),
        h.delta((BUY, 100, 0), (BUY, 99, 3)),
    ]


def test_fee_rounding_exact_amounts() -> None:
    # 30 bps / 15 bps on larger amounts: ceil only when there is a remainder
    h = Harness(maker_fee_bps=15, taker_fee_bps=30)
    h.limit(B, SELL, 1000, 100)  # quote 100000, base 1000
    maker = h.seq
    evs = h.limit(A, BUY, 1000, 100)
    tr = evs[1]
    assert isinstance(tr, TradeExecuted)
    assert (tr.taker_fee, tr.maker_fee) == (3, 150)  # 1000*30/1e4 = 3 exactly; 100000*15/1e4 = 150 exactly
    h.limit(B, SELL, 333, 1)  # quote 333, base 10
    evs = h.limit(A, BUY, 333, 1)
    tr = evs[1]
    assert isinstance(tr, TradeExecuted) and tr.maker_order_id == h.seq - 1 != maker
    assert (tr.taker_fee, tr.maker_fee) == (1, 1)  # ceil(0.03) = 1, ceil(0.4995) = 1


def test_zero_fee_market_has_no_fee_moves() -> None:
    h = Harness(maker_fee_bps=0, taker_fee_bps=0)
    h.limit(B, SELL, 100, 2)
    maker = h.seq
    evs = h.limit(A, BUY, 100, 2)
    assert evs == [
        h.accepted(A, BUY, 100, 2, [av(A, "USDT", -200), ho(A, "USDT", 200)]),
        buy_trade(h, taker=(h.seq, A), maker=(maker, B), price=100, qty=2, limit=100, taker_rem=0,
                  maker_rem=0, tfee=0, mfee=0),
        h.delta((SELL, 100, 0)),
    ]
    assert h.bal(FEE_ACCOUNT, "USDT") == (0, 0)


# ============================================================================ time in force


def test_ioc_partial_then_expired() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 3)
    maker = h.seq
    evs = h.limit(A, BUY, 102, 5, tif=IOC)
    t = h.seq
    assert evs == [
        h.accepted(A, BUY, 102, 5, [av(A, "USDT", -510), ho(A, "USDT", 510)], tif=IOC),
        buy_trade(h, taker=(t, A), maker=(maker, B), price=100, qty=3, limit=102, taker_rem=2, maker_rem=0,
                  tfee=1, mfee=1),
        h.canceled(t, A, CancelReason.EXPIRED_IOC, 2, 3, [ho(A, "USDT", -204), av(A, "USDT", 204)]),
        h.delta((SELL, 100, 0)),
    ]
    v = h.e.order(t)
    assert v is not None and v.status is OrderStatus.CANCELED and v.filled_qty_lots == 3


def test_ioc_that_does_not_cross_expires_whole() -> None:
    h = Harness()
    evs = h.limit(A, SELL, 100, 5, tif=IOC)
    assert evs == [
        h.accepted(A, SELL, 100, 5, [av(A, "BTC", -50), ho(A, "BTC", 50)], tif=IOC),
        h.canceled(h.seq, A, CancelReason.EXPIRED_IOC, 5, 0, [ho(A, "BTC", -50), av(A, "BTC", 50)]),
    ]
    assert h.e.book(SYM).asks == []  # type: ignore[union-attr]


def test_fok_fillable_fills_completely() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 3)
    m1 = h.seq
    h.limit(B, SELL, 101, 3)
    m2 = h.seq
    evs = h.limit(A, BUY, 101, 5, tif=FOK)
    t = h.seq
    assert evs == [
        h.accepted(A, BUY, 101, 5, [av(A, "USDT", -505), ho(A, "USDT", 505)], tif=FOK),
        buy_trade(h, taker=(t, A), maker=(m1, B), price=100, qty=3, limit=101, taker_rem=2, maker_rem=0,
                  tfee=1, mfee=1),
        buy_trade(h, taker=(t, A), maker=(m2, B), price=101, qty=2, limit=101, taker_rem=0, maker_rem=1,
                  tfee=1, mfee=1),
        h.delta((SELL, 100, 0), (SELL, 101, 1)),
    ]


def test_fok_unfillable_is_rejected_without_side_effects() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 3)
    before = h.e.state_hash()
    evs = h.limit(A, BUY, 100, 4, tif=FOK, client_order_id="f")
    assert evs == [h.rejected(A, RejectCode.FOK_UNFILLABLE, "cannot fill the whole quantity", coid="f")]
    # only the stream seq and last_seq moved
    assert h.e.book(SYM).asks == [(100, 3)]  # type: ignore[union-attr]
    assert h.bal(A, "USDT") == (USDT0, 0)
    assert h.e.state_hash() != before  # seqs are part of the state
    # FOK that does not cross at all
    evs = h.limit(A, BUY, 90, 1, tif=FOK)
    assert evs[0].code is RejectCode.FOK_UNFILLABLE


# ============================================================================ post-only


def test_post_only() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 3)
    evs = h.limit(A, BUY, 100, 1, post_only=True)
    assert evs == [h.rejected(A, RejectCode.POST_ONLY_WOULD_TAKE, "post-only order would take")]
    evs = h.limit(A, BUY, 99, 1, post_only=True)
    assert evs == [
        h.accepted(A, BUY, 99, 1, [av(A, "USDT", -99), ho(A, "USDT", 99)], post_only=True),
        h.delta((BUY, 99, 1)),
    ]


# ============================================================================ self-trade prevention


def _stp_book(h: Harness) -> tuple[int, int]:
    h.limit(A, SELL, 100, 2)  # own order first in the queue
    own = h.seq
    h.limit(B, SELL, 100, 2)
    other = h.seq
    return own, other


def test_stp_expire_taker() -> None:
    h = Harness()
    _stp_book(h)
    evs = h.limit(A, BUY, 100, 3, stp=SelfTradePrevention.EXPIRE_TAKER)
    t = h.seq
    assert evs == [
        h.accepted(A, BUY, 100, 3, [av(A, "USDT", -300), ho(A, "USDT", 300)]),
        h.canceled(t, A, CancelReason.STP, 3, 0, [ho(A, "USDT", -300), av(A, "USDT", 300)]),
        h.delta((SELL, 100, 4)),
    ]
    assert h.e.book(SYM).asks == [(100, 4)]  # type: ignore[union-attr]


def test_stp_expire_maker_continues_matching() -> None:
    h = Harness()
    own, other = _stp_book(h)
    evs = h.limit(A, BUY, 100, 3, stp=SelfTradePrevention.EXPIRE_MAKER)
    t = h.seq
    assert evs == [
        h.accepted(A, BUY, 100, 3, [av(A, "USDT", -300), ho(A, "USDT", 300)], stp=SelfTradePrevention.EXPIRE_MAKER),
        h.canceled(own, A, CancelReason.STP, 2, 0, [ho(A, "BTC", -20), av(A, "BTC", 20)]),
        buy_trade(h, taker=(t, A), maker=(other, B), price=100, qty=2, limit=100, taker_rem=1, maker_rem=0,
                  tfee=1, mfee=1),
        h.delta((SELL, 100, 0), (BUY, 100, 1)),
    ]


def test_stp_expire_both() -> None:
    h = Harness()
    own, _other = _stp_book(h)
    evs = h.limit(A, BUY, 100, 3, stp=SelfTradePrevention.EXPIRE_BOTH)
    t = h.seq
    assert evs == [
        h.accepted(A, BUY, 100, 3, [av(A, "USDT", -300), ho(A, "USDT", 300)], stp=SelfTradePrevention.EXPIRE_BOTH),
        h.canceled(own, A, CancelReason.STP, 2, 0, [ho(A, "BTC", -20), av(A, "BTC", 20)]),
        h.canceled(t, A, CancelReason.STP, 3, 0, [ho(A, "USDT", -300), av(A, "USDT", 300)]),
        h.delta((SELL, 100, 2)),
    ]


def test_stp_none_allows_self_trade() -> None:
    h = Harness()
    own, _other = _stp_book(h)
    evs = h.limit(A, BUY, 100, 1, stp=SelfTradePrevention.NONE)
    assert evs == [
        h.accepted(A, BUY, 100, 1, [av(A, "USDT", -100), ho(A, "USDT", 100)], stp=SelfTradePrevention.NONE),
        buy_trade(h, taker=(h.seq, A), maker=(own, A), price=100, qty=1, limit=100, taker_rem=0,
                  maker_rem=1, tfee=1, mfee=1),
        h.delta((SELL, 100, 3)),
    ]


def test_stp_after_partial_fill_cancels_rest() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 2)
    other = h.seq
    h.limit(A, SELL, 101, 2)
    evs = h.limit(A, BUY, 101, 5)
    t = h.seq
    assert evs == [
        h.accepted(A, BUY, 101, 5, [av(A, "USDT", -505), ho(A, "USDT", 505)]),
        buy_trade(h, taker=(t, A), maker=(other, B), price=100, qty=2, limit=101, taker_rem=3, maker_rem=0,
                  tfee=1, mfee=1),
        h.canceled(t, A, CancelReason.STP, 3, 2, [ho(A, "USDT", -303), av(A, "USDT", 303)]),
        h.delta((SELL, 100, 0), (SELL, 101, 2)),
    ]


# ============================================================================ cancel


def test_cancel_by_id_and_client_id() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 5, client_order_id="x1")
    o1 = h.seq
    h.limit(A, SELL, 110, 2, client_order_id="x2")
    o2 = h.seq
    evs = h.do(CancelOrder(account_id=A, symbol=SYM, order_id=o1))
    assert evs == [
        h.canceled(o1, A, CancelReason.USER, 5, 0, [ho(A, "USDT", -500), av(A, "USDT", 500)], coid="x1"),
        h.delta((BUY, 100, 0)),
    ]
    evs = h.do(CancelOrder(account_id=A, symbol=SYM, client_order_id="x2"))
    assert evs == [
        h.canceled(o2, A, CancelReason.USER, 2, 0, [ho(A, "BTC", -20), av(A, "BTC", 20)], coid="x2"),
        h.delta((SELL, 110, 0)),
    ]
    v = h.e.order_by_client_id(A, "x2")
    assert v is not None and v.status is OrderStatus.CANCELED


def test_cancel_unknown_or_foreign_order() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 5)
    oid = h.seq
    evs = h.do(CancelOrder(account_id=B, symbol=SYM, order_id=oid))  # not B's: same answer as unknown
    assert evs == [h.cmd_rejected("CancelOrder", RejectCode.UNKNOWN_ORDER, "no such open order", account_id=B,
                                  order_id=oid)]
    evs = h.do(CancelOrder(account_id=A, symbol=SYM, order_id=999))
    assert evs[0].code is RejectCode.UNKNOWN_ORDER
    evs = h.do(CancelOrder(account_id=A, symbol=SYM))
    assert evs[0].code is RejectCode.UNKNOWN_ORDER
    h.do(CancelOrder(account_id=A, symbol=SYM, order_id=oid))
    evs = h.do(CancelOrder(account_id=A, symbol=SYM, order_id=oid))  # already canceled
    assert evs[0].code is RejectCode.UNKNOWN_ORDER
    evs = h.do(CancelOrder(account_id=A, symbol="ETH-USDT", order_id=oid))
    assert evs == [h.cmd_rejected("CancelOrder", RejectCode.UNKNOWN_SYMBOL, "unknown symbol 'ETH-USDT'",
                                  stream="_sys", account_id=A, order_id=oid)]


def test_duplicate_client_order_id_only_while_open() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 5, client_order_id="dup")
    first = h.seq
    evs = h.limit(A, BUY, 99, 5, client_order_id="dup")
    assert evs == [h.rejected(A, RejectCode.DUPLICATE_CLIENT_ORDER_ID, "open order has 'dup'", coid="dup")]
    # another account may use the same id
    assert isinstance(h.limit(B, BUY, 99, 1, client_order_id="dup")[0], OrderAccepted)
    h.do(CancelOrder(account_id=A, symbol=SYM, order_id=first))
    assert isinstance(h.limit(A, BUY, 99, 1, client_order_id="dup")[0], OrderAccepted)
    v = h.e.order_by_client_id(A, "dup")
    assert v is not None and v.order_id == h.seq


# ============================================================================ amend


def test_amend_size_decrease_keeps_priority() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 5)
    first = h.seq
    h.limit(C, SELL, 100, 5)
    evs = h.do(AmendOrder(account_id=B, symbol=SYM, order_id=first, new_qty_lots=2))
    assert evs == [
        h.ev(OrderAmended, order_id=first, account_id=B, client_order_id="", price_ticks=100, qty_lots=2,
             remaining_qty_lots=2, priority_kept=True, moves=[ho(B, "BTC", -30), av(B, "BTC", 30)]),
        h.delta((SELL, 100, 7)),
    ]
    evs = h.limit(A, BUY, 100, 1)
    tr = evs[1]
    assert isinstance(tr, TradeExecuted) and tr.maker_order_id == first  # still first in the queue


def test_amend_price_change_loses_priority() -> None:
    h = Harness()
    h.limit(B, SELL, 101, 5)
    first = h.seq
    h.limit(C, SELL, 100, 5)
    second = h.seq
    evs = h.do(AmendOrder(account_id=B, symbol=SYM, order_id=first, new_price_ticks=100))
    assert evs == [
        h.ev(OrderAmended, order_id=first, account_id=B, client_order_id="", price_ticks=100, qty_lots=5,
             remaining_qty_lots=5, priority_kept=False, moves=[]),
        h.delta((SELL, 101, 0), (SELL, 100, 10)),
    ]
    evs = h.limit(A, BUY, 100, 1)
    tr = evs[1]
    assert isinstance(tr, TradeExecuted) and tr.maker_order_id == second


def test_amend_size_increase_loses_priority_and_holds_more() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 5)
    first = h.seq
    h.limit(C, BUY, 100, 5)
    second = h.seq
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=first, new_qty_lots=8))
    assert evs == [
        h.ev(OrderAmended, order_id=first, account_id=A, client_order_id="", price_ticks=100, qty_lots=8,
             remaining_qty_lots=8, priority_kept=False, moves=[av(A, "USDT", -300), ho(A, "USDT", 300)]),
        h.delta((BUY, 100, 13)),
    ]
    evs = h.limit(B, SELL, 100, 1)
    tr = evs[1]
    assert isinstance(tr, TradeExecuted) and tr.maker_order_id == second


def test_amend_price_down_on_buy_releases_hold() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 5)
    oid = h.seq
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=oid, new_price_ticks=90))
    assert evs[0] == h.ev(
        OrderAmended, order_id=oid, account_id=A, client_order_id="", price_ticks=90, qty_lots=5,
        remaining_qty_lots=5, priority_kept=False, moves=[ho(A, "USDT", -50), av(A, "USDT", 50)],
    )


def test_amend_below_filled_cancels() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 5)
    oid = h.seq
    h.limit(B, SELL, 100, 2)
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=oid, new_qty_lots=2))  # == filled
    assert evs == [
        h.canceled(oid, A, CancelReason.AMEND, 3, 2, [ho(A, "USDT", -300), av(A, "USDT", 300)]),
        h.delta((BUY, 100, 0)),
    ]
    v = h.e.order(oid)
    assert v is not None and v.status is OrderStatus.CANCELED


def test_amend_partial_keeps_filled_in_total() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 5)
    oid = h.seq
    h.limit(B, SELL, 100, 2)
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=oid, new_qty_lots=4))
    assert evs[0] == h.ev(
        OrderAmended, order_id=oid, account_id=A, client_order_id="", price_ticks=100, qty_lots=4,
        remaining_qty_lots=2, priority_kept=True, moves=[ho(A, "USDT", -100), av(A, "USDT", 100)],
    )
    v = h.e.order(oid)
    assert v is not None and (v.qty_lots, v.filled_qty_lots, v.remaining_qty_lots) == (4, 2, 2)
    assert v.status is OrderStatus.PARTIALLY_FILLED


def test_amend_that_crosses_trades() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 2)
    maker = h.seq
    h.limit(A, BUY, 95, 5)
    oid = h.seq
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=oid, new_price_ticks=101))
    assert evs == [
        h.ev(OrderAmended, order_id=oid, account_id=A, client_order_id="", price_ticks=101, qty_lots=5,
             remaining_qty_lots=5, priority_kept=False, moves=[av(A, "USDT", -30), ho(A, "USDT", 30)]),
        buy_trade(h, taker=(oid, A), maker=(maker, B), price=100, qty=2, limit=101, taker_rem=3, maker_rem=0,
                  tfee=1, mfee=1),
        h.delta((BUY, 95, 0), (SELL, 100, 0), (BUY, 101, 3)),
    ]


def test_amend_rejects() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 2)
    h.limit(A, BUY, 95, 5, post_only=True, client_order_id="p")
    oid = h.seq
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=oid, new_price_ticks=100))
    assert evs == [h.cmd_rejected("AmendOrder", RejectCode.POST_ONLY_WOULD_TAKE, "post-only order would take",
                                  account_id=A, order_id=oid, client_order_id="p")]
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=oid, new_qty_lots=10**7))
    assert evs[0].code is RejectCode.INSUFFICIENT_FUNDS
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=oid))
    assert evs[0].code is RejectCode.INVALID_ORDER
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=oid, new_price_ticks=0))
    assert evs[0].code is RejectCode.INVALID_PRICE
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=oid, new_qty_lots=-1))
    assert evs[0].code is RejectCode.INVALID_QTY
    evs = h.do(AmendOrder(account_id=B, symbol=SYM, order_id=oid, new_qty_lots=1))
    assert evs[0].code is RejectCode.UNKNOWN_ORDER
    v = h.e.order(oid)
    assert v is not None and (v.price_ticks, v.qty_lots) == (95, 5)  # untouched by the rejects


# ============================================================================ market orders


def test_market_buy_by_qty_walks_and_holds_exact_cost() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 2)
    m1 = h.seq
    h.limit(C, SELL, 103, 2)
    m2 = h.seq
    evs = h.market(A, BUY, qty_lots=5)
    t = h.seq
    cost = 2 * 100 + 2 * 103
    assert evs == [
        h.accepted(A, BUY, None, 5, [av(A, "USDT", -cost), ho(A, "USDT", cost)], tif=IOC, type=OrderType.MARKET),
        buy_trade(h, taker=(t, A), maker=(m1, B), price=100, qty=2, limit=None, taker_rem=3, maker_rem=0,
                  tfee=1, mfee=1),
        buy_trade(h, taker=(t, A), maker=(m2, C), price=103, qty=2, limit=None, taker_rem=1, maker_rem=0,
                  tfee=1, mfee=1),
        h.canceled(t, A, CancelReason.EXPIRED_IOC, 1, 4, []),
        h.delta((SELL, 100, 0), (SELL, 103, 0)),
    ]
    assert h.bal(A, "USDT") == (USDT0 - cost, 0)


def test_market_buy_by_quote_amount() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 2)
    m1 = h.seq
    h.limit(C, SELL, 110, 5)
    m2 = h.seq
    # 500: 2 lots at 100 (200), then 300 // 110 = 2 lots (220); 80 left cannot buy a lot -> FILLED
    evs = h.market(A, BUY, quote_amount=500)
    t = h.seq
    assert evs == [
        h.accepted(A, BUY, None, None, [av(A, "USDT", -420), ho(A, "USDT", 420)], tif=IOC,
                   type=OrderType.MARKET, quote=500),
        buy_trade(h, taker=(t, A), maker=(m1, B), price=100, qty=2, limit=None, taker_rem=2, maker_rem=0,
                  tfee=1, mfee=1),
        buy_trade(h, taker=(t, A), maker=(m2, C), price=110, qty=2, limit=None, taker_rem=0, maker_rem=3,
                  tfee=1, mfee=1),
        h.delta((SELL, 100, 0), (SELL, 110, 3)),
    ]
    v = h.e.order(t)
    assert v is not None and v.status is OrderStatus.FILLED and v.qty_lots == 4 and v.quote_amount == 500


def test_market_buy_by_quote_runs_out_of_book() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 2)
    maker = h.seq
    evs = h.market(A, BUY, quote_amount=1000)
    t = h.seq
    # the walk can only spend 200: that is the hold; the order expires (its qty is what it got)
    assert evs == [
        h.accepted(A, BUY, None, None, [av(A, "USDT", -200), ho(A, "USDT", 200)], tif=IOC,
                   type=OrderType.MARKET, quote=1000),
        buy_trade(h, taker=(t, A), maker=(maker, B), price=100, qty=2, limit=None, taker_rem=0, maker_rem=0,
                  tfee=1, mfee=1),
        h.canceled(t, A, CancelReason.EXPIRED_IOC, 0, 2, []),
        h.delta((SELL, 100, 0)),
    ]
    assert h.bal(A, "USDT") == (USDT0 - 200, 0)


def test_market_sell_by_qty() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 3)
    m1 = h.seq
    evs = h.market(B, SELL, qty_lots=2)
    t = h.seq
    assert evs == [
        h.accepted(B, SELL, None, 2, [av(B, "BTC", -20), ho(B, "BTC", 20)], tif=IOC, type=OrderType.MARKET),
        sell_trade(h, taker=(t, B), maker=(m1, A), price=100, qty=2, taker_rem=0, maker_rem=1, tfee=1, mfee=1),
        h.delta((BUY, 100, 1)),
    ]


def test_market_on_empty_book_expires() -> None:
    h = Harness()
    evs = h.market(A, BUY, qty_lots=5)
    assert evs == [
        h.accepted(A, BUY, None, 5, [], tif=IOC, type=OrderType.MARKET),
        h.canceled(h.seq, A, CancelReason.EXPIRED_IOC, 5, 0, []),
    ]


def test_market_insufficient_funds_and_fok() -> None:
    h = Harness()
    h.limit(B, SELL, 100, 2)
    h.do(Deposit(account_id=2000, asset="USDT", amount=150))
    evs = h.market(2000, BUY, qty_lots=2)
    assert evs == [h.rejected(2000, RejectCode.INSUFFICIENT_FUNDS, "needs 200 USDT available")]
    assert isinstance(h.market(2000, BUY, qty_lots=1)[1], TradeExecuted)  # 100 is affordable
    evs = h.market(A, BUY, qty_lots=5, tif=FOK)
    assert evs[0].code is RejectCode.FOK_UNFILLABLE
    evs = h.market(A, BUY, qty_lots=1, tif=FOK)
    assert isinstance(evs[1], TradeExecuted)


def test_market_order_shape_rejects() -> None:
    h = Harness()
    for kw, code in [
        ({"qty_lots": 1, "price_ticks": 5}, RejectCode.INVALID_ORDER),
        ({"qty_lots": 1, "post_only": True}, RejectCode.INVALID_ORDER),
        ({"quote_amount": 100, "qty_lots": 1}, RejectCode.INVALID_ORDER),
        ({"quote_amount": 100, "tif": FOK}, RejectCode.INVALID_ORDER),
        ({"quote_amount": 0}, RejectCode.INVALID_QTY),
        ({}, RejectCode.INVALID_QTY),
    ]:
        evs = h.market(A, BUY, **kw)
        assert evs[0].code is code, kw
    assert h.market(A, SELL, quote_amount=100)[0].code is RejectCode.INVALID_ORDER


# ============================================================================ validation


def test_limit_validation_rejects() -> None:
    h = Harness(min_notional=50)
    cases: list[tuple[dict[str, Any], RejectCode, str]] = [
        ({"price_ticks": 0, "qty_lots": 1}, RejectCode.INVALID_PRICE, "limit price must be > 0 ticks"),
        ({"price_ticks": None, "qty_lots": 1}, RejectCode.INVALID_PRICE, "limit price must be > 0 ticks"),
        ({"price_ticks": 10, "qty_lots": 0}, RejectCode.INVALID_QTY, "qty must be > 0 lots"),
        ({"price_ticks": 10, "qty_lots": 1, "quote_amount": 5}, RejectCode.INVALID_ORDER,
         "quote_amount is for market buys"),
        ({"price_ticks": 10, "qty_lots": 4}, RejectCode.MIN_NOTIONAL, "notional 40 < 50"),
        ({"price_ticks": 10**14, "qty_lots": 10**6}, RejectCode.INVALID_QTY, "notional too large"),
        ({"price_ticks": 10, "qty_lots": 5, "client_order_id": "x" * 65}, RejectCode.INVALID_ORDER,
         "client_order_id longer than 64"),
        ({"price_ticks": 10, "qty_lots": 5, "tif": "GTD"}, RejectCode.INVALID_ORDER, "bad side, type, tif or stp"),
    ]
    for kw, code, detail in cases:
        kw.setdefault("client_order_id", "")
        evs = h.do(PlaceOrder(account_id=A, symbol=SYM, side=BUY, **kw))
        assert evs == [h.rejected(A, code, detail, coid=kw["client_order_id"])], kw
    evs = h.do(PlaceOrder(account_id=0, symbol=SYM, client_order_id="", side=BUY, price_ticks=10, qty_lots=5))
    assert evs == [h.rejected(0, RejectCode.INVALID_ACCOUNT, "account_id must be > 0")]
    evs = h.limit(2000, BUY, 10, 5)  # unknown account = no funds
    assert evs == [h.rejected(2000, RejectCode.INSUFFICIENT_FUNDS, "needs 50 USDT available")]
    evs = h.limit(A, SELL, 10, BTC0 // 10 + 1)
    assert evs == [h.rejected(A, RejectCode.INSUFFICIENT_FUNDS, f"needs {BTC0 + 10} BTC available")]
    assert isinstance(h.limit(A, BUY, 10, 5)[0], OrderAccepted)  # exactly min notional is fine


def test_unknown_symbol_goes_to_sys_stream() -> None:
    h = Harness()
    evs = h.do(PlaceOrder(account_id=A, symbol="NOPE-USDT", client_order_id="q", side=BUY, price_ticks=1,
                          qty_lots=1))
    assert evs == [h.rejected(A, RejectCode.UNKNOWN_SYMBOL, "unknown symbol 'NOPE-USDT'", coid="q", stream="_sys")]


def test_price_band_from_last_trade() -> None:
    h = Harness(price_band_bps=1000)  # 10%
    h.limit(B, SELL, 100, 1)
    h.limit(A, BUY, 100, 1)  # last trade 100
    assert h.limit(A, BUY, 111, 1)[0].code is RejectCode.PRICE_BAND
    assert h.limit(A, SELL, 89, 1) == [h.rejected(A, RejectCode.PRICE_BAND, "price outside the band")]
    assert isinstance(h.limit(A, BUY, 90, 1)[0], OrderAccepted)  # bounds inclusive
    assert isinstance(h.limit(B, SELL, 110, 1)[0], OrderAccepted)


def test_price_band_from_mid_and_none() -> None:
    h = Harness(price_band_bps=1000)
    assert isinstance(h.limit(A, BUY, 1, 1)[0], OrderAccepted)  # no trade, no mid: no band
    assert isinstance(h.limit(B, SELL, 1000, 1)[0], OrderAccepted)  # one-sided book: still no mid
    h.do(AdminCancelAll(symbol=SYM))
    h.limit(A, BUY, 95, 1)
    h.limit(B, SELL, 105, 1)  # mid 100 (no band yet: the bid alone gives no mid)
    assert h.limit(C, BUY, 89, 1)[0].code is RejectCode.PRICE_BAND
    assert isinstance(h.limit(C, BUY, 90, 1)[0], OrderAccepted)
    assert isinstance(h.limit(C, SELL, 110, 1)[0], OrderAccepted)
    assert h.limit(C, SELL, 111, 1)[0].code is RejectCode.PRICE_BAND


def test_market_order_walk_stops_at_band() -> None:
    h = Harness(price_band_bps=500)  # 5%
    assert isinstance(h.limit(C, SELL, 106, 1)[0], OrderAccepted)  # no reference price yet: no band
    far = h.seq
    assert isinstance(h.limit(C, BUY, 94, 1)[0], OrderAccepted)  # one-sided book before it: still no band
    h.limit(B, SELL, 100, 1)
    h.limit(A, BUY, 100, 1)  # last 100 -> buys may walk up to 105
    assert h.limit(C, SELL, 106, 1)[0].code is RejectCode.PRICE_BAND  # now 106 is outside the band
    h.limit(B, SELL, 104, 1)
    m1 = h.seq
    h.limit(B, SELL, 105, 1)
    m2 = h.seq
    h.limit(C, SELL, 105, 1)
    m3 = h.seq
    evs = h.market(A, BUY, qty_lots=5)
    trades = [x for x in evs if isinstance(x, TradeExecuted)]
    assert [(t.maker_order_id, t.price_ticks) for t in trades] == [(m1, 104), (m2, 105), (m3, 105)]
    assert isinstance(evs[-2], OrderCanceled) and evs[-2].canceled_qty_lots == 2
    assert h.e.book(SYM).asks == [(106, 1)] and h.e.is_open(far)  # type: ignore[union-attr]
    # last 105: a market sell may walk down to ceil(99.75) = 100, not to the 94 bid
    h.limit(A, BUY, 100, 1)
    evs = h.market(B, SELL, qty_lots=3)
    trades = [x for x in evs if isinstance(x, TradeExecuted)]
    assert [(t.maker_order_id, t.price_ticks) for t in trades] == [(h.seq - 1, 100)]
    assert isinstance(evs[-2], OrderCanceled) and evs[-2].canceled_qty_lots == 2
    assert h.e.book(SYM).bids == [(94, 1)]  # type: ignore[union-attr]
    # the last price is 100 again: limits within [95, 105]
    assert isinstance(h.limit(B, SELL, 105, 1)[0], OrderAccepted)
    assert h.limit(B, SELL, 106, 1)[0].code is RejectCode.PRICE_BAND


# ============================================================================ modes


def test_cancel_only_mode() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 5)
    oid = h.seq
    evs = h.do(SetSymbolMode(symbol=SYM, mode=SymbolMode.CANCEL_ONLY, reason="invariant", ticket="INC-1"))
    assert evs == [h.ev(SymbolModeChanged, mode=SymbolMode.CANCEL_ONLY, previous_mode=SymbolMode.NORMAL,
                        reason="invariant", ticket="INC-1")]
    assert h.limit(A, BUY, 100, 1) == [h.rejected(A, RejectCode.CANCEL_ONLY, "market is cancel-only")]
    assert h.market(A, BUY, qty_lots=1)[0].code is RejectCode.CANCEL_ONLY
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=oid, new_qty_lots=1))
    assert evs[0].code is RejectCode.CANCEL_ONLY
    assert isinstance(h.do(CancelOrder(account_id=A, symbol=SYM, order_id=oid))[0], OrderCanceled)
    assert h.e.mode(SYM) is SymbolMode.CANCEL_ONLY


def test_soft_halt_mode() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 5)
    oid = h.seq
    h.do(SetSymbolMode(symbol=SYM, mode=SymbolMode.SOFT_HALT, reason="settlement lag", ticket="INC-2"))
    assert h.limit(A, BUY, 100, 1) == [h.rejected(A, RejectCode.MARKET_HALTED, "market is SOFT_HALT")]
    evs = h.do(AmendOrder(account_id=A, symbol=SYM, order_id=oid, new_qty_lots=1))
    assert evs[0].code is RejectCode.MARKET_HALTED
    assert isinstance(h.do(CancelOrder(account_id=A, symbol=SYM, order_id=oid))[0], OrderCanceled)


def test_hard_halt_mode() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 5)
    oid = h.seq
    h.limit(B, SELL, 110, 1)
    h.do(SetSymbolMode(symbol=SYM, mode=SymbolMode.HARD_HALT, reason="split brain", ticket="INC-3"))
    assert h.limit(A, BUY, 100, 1)[0].code is RejectCode.MARKET_HALTED
    evs = h.do(CancelOrder(account_id=A, symbol=SYM, order_id=oid))
    assert evs == [h.cmd_rejected("CancelOrder", RejectCode.MARKET_HALTED, "market is HARD_HALT", account_id=A,
                                  order_id=oid)]
    evs = h.do(CancelAllAccount(account_id=A, symbol=SYM))
    assert evs[0].code is RejectCode.MARKET_HALTED
    evs = h.do(CancelAllAccount(account_id=A))  # all symbols: HARD_HALT books are skipped
    assert evs == [h.ev(CancelAllDone, stream="_sys", account_id=A, canceled=0, reason="", ticket="")]
    evs = h.do(AdminCancelAll(symbol=SYM, reason="freeze and flatten", ticket="INC-3"))
    assert evs == [
        h.canceled(oid, A, CancelReason.ADMIN, 5, 0, [ho(A, "USDT", -500), av(A, "USDT", 500)]),
        h.canceled(oid + 1, B, CancelReason.ADMIN, 1, 0, [ho(B, "BTC", -10), av(B, "BTC", 10)]),
        h.delta((BUY, 100, 0), (SELL, 110, 0)),
        h.ev(CancelAllDone, account_id=None, canceled=2, reason="freeze and flatten", ticket="INC-3"),
    ]
    evs = h.do(SetSymbolMode(symbol=SYM, mode=SymbolMode.NORMAL, reason="resume", ticket="INC-3"))
    assert evs[0].previous_mode is SymbolMode.HARD_HALT
    assert isinstance(h.limit(A, BUY, 100, 1)[0], OrderAccepted)


def test_set_mode_rejects() -> None:
    h = Harness()
    evs = h.do(SetSymbolMode(symbol="X-Y", mode=SymbolMode.NORMAL))
    assert evs[0].code is RejectCode.UNKNOWN_SYMBOL and evs[0].symbol == "_sys"
    evs = h.do(SetSymbolMode(symbol=SYM, mode="PANIC"))  # type: ignore[arg-type]
    assert evs == [h.cmd_rejected("SetSymbolMode", RejectCode.INVALID_MODE, "unknown mode 'PANIC'")]


# ============================================================================ cancel-all


def test_cancel_all_account_per_symbol_and_all() -> None:
    h = Harness()
    h.do(AddMarket(config=make_cfg("ETH-USDT", "ETH")))
    h.do(Deposit(account_id=A, asset="ETH", amount=1000))
    h.limit(A, BUY, 100, 1)
    o1 = h.seq
    h.limit(B, BUY, 100, 1)
    h.limit(A, SELL, 120, 2)
    o3 = h.seq
    h.do(PlaceOrder(account_id=A, symbol="ETH-USDT", client_order_id="", side=SELL, price_ticks=50, qty_lots=1))
    o4 = h.seq
    evs = h.do(CancelAllAccount(account_id=A, symbol=SYM))
    assert evs == [
        h.canceled(o1, A, CancelReason.USER, 1, 0, [ho(A, "USDT", -100), av(A, "USDT", 100)]),
        h.canceled(o3, A, CancelReason.USER, 2, 0, [ho(A, "BTC", -20), av(A, "BTC", 20)]),
        h.delta((BUY, 100, 1), (SELL, 120, 0)),
        h.ev(CancelAllDone, account_id=A, canceled=2, reason="", ticket=""),
    ]
    assert [o.order_id for o in h.e.open_orders(A)] == [o4]
    evs = h.do(CancelAllAccount(account_id=A))
    assert evs == [
        h.ev(OrderCanceled, stream="ETH-USDT", order_id=o4, account_id=A, client_order_id="",
             reason=CancelReason.USER, canceled_qty_lots=1, filled_qty_lots=0,
             moves=[ho(A, "ETH", -10), av(A, "ETH", 10)]),
        h.ev(BookDelta, stream="ETH-USDT", levels=[LevelChange(SELL, 50, 0)]),
        h.ev(CancelAllDone, stream="_sys", account_id=A, canceled=1, reason="", ticket=""),
    ]
    assert h.e.open_orders(A) == []
    assert len(h.e.open_orders(B)) == 1


def test_cancel_all_without_orders_still_answers() -> None:
    h = Harness()
    evs = h.do(CancelAllAccount(account_id=4242, symbol=SYM))
    assert evs == [h.ev(CancelAllDone, account_id=4242, canceled=0, reason="", ticket="")]


# ============================================================================ fencing, sequencing


def test_fencing_token() -> None:
    h = Harness()
    h.fence = 5
    assert isinstance(h.limit(A, BUY, 100, 1)[0], OrderAccepted)
    oid = h.seq
    assert h.e.fencing_token == 5
    evs = h.do(PlaceOrder(account_id=A, symbol=SYM, client_order_id="z", side=BUY, price_ticks=100, qty_lots=1),
               fence=4)
    assert evs == [h.rejected(A, RejectCode.FENCING_TOKEN, "fencing token 4 < 5", coid="z")]
    evs = h.do(CancelOrder(account_id=A, symbol=SYM, order_id=oid), fence=4)
    assert evs == [h.cmd_rejected("CancelOrder", RejectCode.FENCING_TOKEN, "fencing token 4 < 5", account_id=A,
                                  order_id=oid)]
    evs = h.do(Deposit(account_id=A, asset="USDT", amount=1), fence=1)
    assert evs[0].code is RejectCode.FENCING_TOKEN and evs[0].symbol == "_sys"
    evs = h.do(SetSymbolMode(symbol=SYM, mode=SymbolMode.HARD_HALT), fence=3)
    assert evs[0].code is RejectCode.FENCING_TOKEN and h.e.mode(SYM) is SymbolMode.NORMAL
    # a higher token is accepted and becomes the floor
    assert isinstance(h.do(CancelOrder(account_id=A, symbol=SYM, order_id=oid), fence=6)[0], OrderCanceled)
    assert h.e.fencing_token == 6
    assert h.limit(A, BUY, 100, 1)[0].code is RejectCode.FENCING_TOKEN  # h.fence is still 5


def test_sequence_must_be_contiguous() -> None:
    e = Engine()
    cmd = Deposit(account_id=A, asset="USDT", amount=1)
    with pytest.raises(SequenceError):
        e.apply(SequencedCommand(seq=2, ts_ms=0, fencing_token=0, correlation_id="", command=cmd))
    e.apply(SequencedCommand(seq=1, ts_ms=0, fencing_token=0, correlation_id="", command=cmd))
    with pytest.raises(SequenceError):
        e.apply(SequencedCommand(seq=1, ts_ms=0, fencing_token=0, correlation_id="", command=cmd))
    assert e.last_seq == 1


# ============================================================================ checkpoint, hash, snapshot


def test_checkpoint_every_n_commands() -> None:
    h = Harness(fund=False, checkpoint_every=3)
    twin = Engine(checkpoint_every=0)  # same commands, no checkpoints: exactly the state that is hashed
    for cmd in (
        AddMarket(config=make_cfg()),
        Deposit(account_id=A, asset="USDT", amount=100),
        Deposit(account_id=B, asset="BTC", amount=7),
    ):
        twin.apply(SequencedCommand(seq=twin.last_seq + 1, ts_ms=0, fencing_token=1, correlation_id="", command=cmd))
    h.do(Deposit(account_id=A, asset="USDT", amount=100))
    evs = h.do(Deposit(account_id=B, asset="BTC", amount=7))
    # seq 3: the deposit then the checkpoint, whose watermark and hash exclude the checkpoint itself
    assert evs == [
        h.ev(Deposited, stream="_sys", account_id=B, asset="BTC", amount=7, reference="",
             moves=[av(CUSTODY_ACCOUNT, "BTC", -7), av(B, "BTC", 7)]),
        h.ev(EngineCheckpoint, stream="_sys", last_seq=3, state_hash=twin.state_hash(),
             stream_seqs={SYM: 1, "_sys": 2},
             totals=[AssetTotal("BTC", 7, 0, -7), AssetTotal("USDT", 100, 0, -100)]),
    ]
    assert Engine.from_snapshot(h.e.snapshot()).checkpoint_every == 3
    h.do(Deposit(account_id=B, asset="BTC", amount=1))
    h.do(Deposit(account_id=B, asset="BTC", amount=1))
    evs = h.do(Deposit(account_id=B, asset="BTC", amount=1))
    assert isinstance(evs[-1], EngineCheckpoint) and evs[-1].last_seq == 6 and evs[-1].seq == 7


@pytest.mark.parametrize("restore_at", [1, 2, 3, 4, 6])
def test_checkpoint_cadence_survives_a_snapshot_restore(restore_at: int) -> None:
    """An engine restored from a snapshot taken at any seq checkpoints at the same seqs as one that
    never stopped (the next checkpoint seq is derived from the restored last_seq)."""
    cmds: list[Command] = [AddMarket(config=make_cfg())]
    cmds += [Deposit(account_id=A, asset="USDT", amount=i) for i in range(1, 9)]
    stream = [SequencedCommand(seq=i, ts_ms=i, fencing_token=1, correlation_id="", command=c)
              for i, c in enumerate(cmds, 1)]
    straight = Engine(checkpoint_every=3)
    head = Engine(checkpoint_every=3)
    straight_out = [straight.apply(sc) for sc in stream]
    for sc in stream[:restore_at]:
        head.apply(sc)
    restored = Engine.from_snapshot(head.snapshot())
    assert [restored.apply(sc) for sc in stream[restore_at:]] == straight_out[restore_at:]
    ckpts = [e.last_seq for out in straight_out for e in out if isinstance(e, EngineCheckpoint)]
    assert ckpts == [3, 6, 9]


def test_state_hash_ignores_history_order() -> None:
    def run(order: list[Command]) -> Engine:
        e = Engine(checkpoint_every=0)
        for i, c in enumerate([AddMarket(config=make_cfg()), *order], 1):
            e.apply(SequencedCommand(seq=i, ts_ms=i, fencing_token=1, correlation_id="", command=c))
        return e

    d1 = Deposit(account_id=B, asset="BTC", amount=7)
    d2 = Deposit(account_id=A, asset="USDT", amount=9)
    d3 = Deposit(account_id=C, asset="ETH", amount=1)
    e1, e2 = run([d1, d2, d3]), run([d3, d2, d1])
    assert e1.state_hash() == e2.state_hash()
    e3 = run([d1, d2, Deposit(account_id=C, asset="ETH", amount=2)])
    assert e3.state_hash() != e1.state_hash()


def test_snapshot_round_trip_continues_identically() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 5, client_order_id="a")
    h.limit(C, BUY, 100, 2)
    h.limit(B, SELL, 100, 1)  # partial fill of A
    h.limit(B, SELL, 120, 3, post_only=True, stp=SelfTradePrevention.EXPIRE_BOTH)
    snap = h.e.snapshot()
    e2 = Engine.from_snapshot(snap)
    assert e2.state_hash() == h.e.state_hash()
    assert e2.snapshot() == snap
    assert e2.open_orders(A) == h.e.open_orders(A)
    assert e2.book(SYM) == h.e.book(SYM)
    nxt = SequencedCommand(seq=h.seq + 1, ts_ms=5, fencing_token=1, correlation_id="n",
                           command=PlaceOrder(account_id=B, symbol=SYM, client_order_id="", side=SELL,
                                              price_ticks=100, qty_lots=6))
    assert e2.apply(nxt) == h.e.apply(nxt)
    assert e2.state_hash() == h.e.state_hash()
    with pytest.raises(ValueError):
        Engine.from_snapshot(snap[:-3] + b"abc")


def test_order_lifecycle_statuses() -> None:
    h = Harness()
    h.limit(A, BUY, 100, 4)
    oid = h.seq
    assert h.e.order(oid).status is OrderStatus.ACCEPTED  # type: ignore[union-attr]
    h.limit(B, SELL, 100, 1)
    assert h.e.order(oid).status is OrderStatus.PARTIALLY_FILLED  # type: ignore[union-attr]
    h.limit(B, SELL, 100, 3)
    assert h.e.order(oid).status is OrderStatus.FILLED  # type: ignore[union-attr]
    assert h.e.open_orders(A) == []
    assert h.e.order(424242) is None


def test_every_engine_reject_code_has_a_golden_scenario() -> None:
    """Guard: each reject code the engine can produce appears in a scenario above (TICK_SIZE and
    LOT_SIZE are produced at the edge by the decimal helpers, see test_wire.py)."""
    import pathlib

    src = pathlib.Path(__file__).read_text()
    body = src.split("def test_every_engine_reject_code_has_a_golden_scenario")[0]
    missing = [c.name for c in RejectCode if c not in (RejectCode.TICK_SIZE, RejectCode.LOT_SIZE)
               and f"RejectCode.{c.name}" not in body]
    assert missing == []
