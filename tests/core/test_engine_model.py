"""Model-based tests: the engine against a naive reference written plainly here.

The reference keeps every resting order in one list and finds the best maker with a linear scan
(``min`` over price, then arrival), computes a market order's hold by *simulating* the match on a deep
copy of itself, and has no indexes, no sorted keys, no FIFO dicts. Same commands must give the same
accept/reject codes, trades (ids, prices, quantities, fees), cancels (ids and reasons), books and
balances. Plus: snapshot/restore mid-stream continues identically, equal streams give equal hashes.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from core.engine import Engine
from core.wire import (
    CUSTODY_ACCOUNT,
    FEE_ACCOUNT,
    MAX_AMOUNT,
    AddMarket,
    AdminCancelAll,
    AmendOrder,
    CancelAllAccount,
    CancelOrder,
    Command,
    CommandRejected,
    Deposit,
    Event,
    MarketConfig,
    OrderCanceled,
    OrderRejected,
    OrderType,
    PlaceOrder,
    RejectCode,
    SelfTradePrevention,
    SequencedCommand,
    SetSymbolMode,
    Side,
    SymbolMode,
    TimeInForce,
    TradeExecuted,
    Withdraw,
    WithdrawalsHalt,
    market_config,
)
from tests.core.test_engine_golden import Shadow, check_invariants

ACCOUNTS = (1000, 1001, 1002)
MARKETS = (
    market_config("BTC-USDT", "BTC", "USDT", base_scale=2, quote_scale=1, tick_size="1", lot_size="0.1",
                  maker_fee_bps=10, taker_fee_bps=25, min_notional=300),
    market_config("ETH-USDT", "ETH", "USDT", base_scale=3, quote_scale=3, tick_size="0.5", lot_size="0.01",
                  maker_fee_bps=0, taker_fee_bps=7, price_band_bps=500),
)
STP_CODES = {
    SelfTradePrevention.NONE: 0,
    SelfTradePrevention.EXPIRE_TAKER: 1,
    SelfTradePrevention.EXPIRE_MAKER: 2,
    SelfTradePrevention.EXPIRE_BOTH: 3,
}
QTY, BUDGET, BOOK, STP = "QTY", "BUDGET", "BOOK", "STP"
BIG = 1 << 62


def ceil_fee(x: int, bps: int) -> int:
    return -(-x * bps // 10_000) if bps else 0


@dataclass
class ROrder:
    oid: int
    acct: int
    sym: str
    buy: bool
    price: int
    qty: int
    rem: int
    filled: int
    coid: str
    stp: SelfTradePrevention
    post_only: bool
    arrival: int


@dataclass
class RMarket:
    cfg: MarketConfig
    mode: SymbolMode = SymbolMode.NORMAL
    last: int = 0


@dataclass
class Ref:
    """The reference exchange. Outcome of a command: (reject code or None, trades, cancels)."""

    markets: dict[str, RMarket] = field(default_factory=dict)
    book: list[ROrder] = field(default_factory=list)
    bal: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    halted: bool = False
    arrival: int = 0
    trades: list[tuple[Any, ...]] = field(default_factory=list)
    cancels: list[tuple[int, str]] = field(default_factory=list)

    # ------------------------------------------------------------------ helpers
    def b(self, acct: int, asset: str) -> list[int]:
        return self.bal.setdefault((acct, asset), [0, 0])

    def hold_of(self, o: ROrder) -> tuple[str, int]:
        cfg = self.markets[o.sym].cfg
        if o.buy:
            return cfg.quote, o.rem * o.price * cfg.quote_per_tick_lot
        return cfg.base, o.rem * cfg.base_per_lot

    def remove(self, o: ROrder, reason: str) -> None:
        asset, amt = self.hold_of(o)
        bb = self.b(o.acct, asset)
        bb[1] -= amt
        bb[0] += amt
        self.book.remove(o)
        self.cancels.append((o.oid, reason))

    def best_maker(self, sym: str, buy: bool, limit: int) -> ROrder | None:
        makers = [
            o for o in self.book
            if o.sym == sym and o.buy != buy and (o.price <= limit if buy else o.price >= limit)
        ]
        if not makers:
            return None
        return min(makers, key=lambda o: (o.price if buy else -o.price, o.arrival))

    def band_ref(self, sym: str) -> tuple[int, int]:
        m = self.markets[sym]
        if m.last:
            return m.last, 1
        bids = [o.price for o in self.book if o.sym == sym and o.buy]
        asks = [o.price for o in self.book if o.sym == sym and not o.buy]
        if bids and asks:
            return max(bids) + min(asks), 2
        return 0, 1

    def crosses(self, sym: str, buy: bool, limit: int) -> bool:
        return self.best_maker(sym, buy, limit) is not None

    # ------------------------------------------------------------------ the match
    def match(self, sym: str, t: ROrder, limit: int, rem: int, budget: int | None, hold_px: int | None) -> tuple[int, str]:  # noqa: E501
        cfg = self.markets[sym].cfg
        k, bpl = cfg.quote_per_tick_lot, cfg.base_per_lot
        stp = STP_CODES[t.stp]
        spent = 0
        while rem > 0:
            mo = self.best_maker(sym, t.buy, limit)
            if mo is None:
                return rem, BOOK
            p = mo.price
            if budget is not None and budget - spent < p * k:
                return rem, BUDGET
            if stp and mo.acct == t.acct:
                if stp == 1:
                    return rem, STP
                self.remove(mo, "STP")
                if stp == 3:
                    return rem, STP
                continue
            q = min(rem, mo.rem)
            if budget is not None:
                q = min(q, (budget - spent) // (p * k))
            base_amt, quote_amt = q * bpl, q * p * k
            buyer, seller = (t, mo) if t.buy else (mo, t)
            b_fee = ceil_fee(base_amt, cfg.taker_fee_bps if t.buy else cfg.maker_fee_bps)
            s_fee = ceil_fee(quote_amt, cfg.maker_fee_bps if t.buy else cfg.taker_fee_bps)
            consumed = q * hold_px * k if (t.buy and hold_px is not None) else quote_amt
            self.b(buyer.acct, cfg.quote)[1] -= consumed
            self.b(buyer.acct, cfg.quote)[0] += consumed - quote_amt
            self.b(seller.acct, cfg.quote)[0] += quote_amt - s_fee
            self.b(FEE_ACCOUNT, cfg.quote)[0] += s_fee
            self.b(seller.acct, cfg.base)[1] -= base_amt
            self.b(buyer.acct, cfg.base)[0] += base_amt - b_fee
            self.b(FEE_ACCOUNT, cfg.base)[0] += b_fee
            spent += quote_amt
            rem -= q
            t.filled += q
            mo.rem -= q
            mo.filled += q
            tfee, mfee = (b_fee, s_fee) if t.buy else (s_fee, b_fee)
            self.trades.append((t.oid, mo.oid, p, q, tfee, mfee))
            if mo.rem == 0:
                self.book.remove(mo)
            self.markets[sym].last = p
        return rem, QTY

    # ------------------------------------------------------------------ commands
    def apply(self, seq: int, c: Command) -> RejectCode | None:
        self.trades, self.cancels = [], []
        handler = getattr(self, "c_" + type(c).__name__)
        code: RejectCode | None = handler(seq, c)
        return code

    def c_AddMarket(self, seq: int, c: AddMarket) -> RejectCode | None:
        self.markets[c.config.symbol] = RMarket(c.config)
        return None

    def c_Deposit(self, seq: int, c: Deposit) -> RejectCode | None:
        self.b(CUSTODY_ACCOUNT, c.asset)[0] -= c.amount
        self.b(c.account_id, c.asset)[0] += c.amount
        return None

    def c_Withdraw(self, seq: int, c: Withdraw) -> RejectCode | None:
        if self.halted:
            return RejectCode.WITHDRAWALS_HALTED
        if self.b(c.account_id, c.asset)[0] < c.amount:
            return RejectCode.INSUFFICIENT_FUNDS
        self.b(c.account_id, c.asset)[0] -= c.amount
        self.b(CUSTODY_ACCOUNT, c.asset)[0] += c.amount
        return None

    def c_WithdrawalsHalt(self, seq: int, c: WithdrawalsHalt) -> RejectCode | None:
        self.halted = c.on
        return None

    def c_SetSymbolMode(self, seq: int, c: SetSymbolMode) -> RejectCode | None:
        self.markets[c.symbol].mode = c.mode
        return None

    def c_AdminCancelAll(self, seq: int, c: AdminCancelAll) -> RejectCode | None:
        for o in sorted((o for o in self.book if o.sym == c.symbol), key=lambda o: o.oid):
            self.remove(o, "ADMIN")
        return None

    def c_CancelAllAccount(self, seq: int, c: CancelAllAccount) -> RejectCode | None:
        if c.symbol is not None and self.markets[c.symbol].mode is SymbolMode.HARD_HALT:
            return RejectCode.MARKET_HALTED
        syms = [c.symbol] if c.symbol is not None else sorted(self.markets)
        for sym in syms:
            if self.markets[sym].mode is SymbolMode.HARD_HALT:
                continue
            for o in sorted((o for o in self.book if o.sym == sym and o.acct == c.account_id), key=lambda o: o.oid):
                self.remove(o, "USER")
        return None

    def find(self, c: CancelOrder | AmendOrder) -> ROrder | None:
        for o in self.book:
            if o.acct == c.account_id and o.sym == c.symbol:
                if c.order_id is not None:
                    if o.oid == c.order_id:
                        return o
                elif isinstance(c, CancelOrder) and c.client_order_id and o.coid == c.client_order_id:
                    return o
        return None

    def c_CancelOrder(self, seq: int, c: CancelOrder) -> RejectCode | None:
        if self.markets[c.symbol].mode is SymbolMode.HARD_HALT:
            return RejectCode.MARKET_HALTED
        o = self.find(c)
        if o is None:
            return RejectCode.UNKNOWN_ORDER
        self.remove(o, "USER")
        return None

    def check_band(self, sym: str, price: int) -> bool:
        band = self.markets[sym].cfg.price_band_bps
        num, den = self.band_ref(sym) if band else (0, 1)
        return not num or abs(price * den - num) * 10_000 <= num * band

    def c_AmendOrder(self, seq: int, c: AmendOrder) -> RejectCode | None:
        m = self.markets[c.symbol]
        if m.mode is not SymbolMode.NORMAL:
            return RejectCode.CANCEL_ONLY if m.mode is SymbolMode.CANCEL_ONLY else RejectCode.MARKET_HALTED
        o = self.find(c)
        if o is None:
            return RejectCode.UNKNOWN_ORDER
        if c.new_qty_lots is None and c.new_price_ticks is None:
            return RejectCode.INVALID_ORDER
        price = o.price if c.new_price_ticks is None else c.new_price_ticks
        qty = o.qty if c.new_qty_lots is None else c.new_qty_lots
        if price <= 0:
            return RejectCode.INVALID_PRICE
        if qty <= 0:
            return RejectCode.INVALID_QTY
        if qty <= o.filled:
            self.remove(o, "AMEND")
            return None
        cfg = m.cfg
        new_rem = qty - o.filled
        asset, old_hold = self.hold_of(o)
        if price == o.price and new_rem <= o.rem:
            o.rem, o.qty = new_rem, qty
            _, new_hold = self.hold_of(o)
            self.b(o.acct, asset)[1] -= old_hold - new_hold
            self.b(o.acct, asset)[0] += old_hold - new_hold
            return None
        if price * qty * cfg.quote_per_tick_lot < cfg.min_notional:
            return RejectCode.MIN_NOTIONAL
        if not self.check_band(c.symbol, price):
            return RejectCode.PRICE_BAND
        crosses = self.crosses(c.symbol, o.buy, price)
        if crosses and o.post_only:
            return RejectCode.POST_ONLY_WOULD_TAKE
        new_hold = new_rem * price * cfg.quote_per_tick_lot if o.buy else new_rem * cfg.base_per_lot
        if new_hold - old_hold > self.b(o.acct, asset)[0]:
            return RejectCode.INSUFFICIENT_FUNDS
        self.b(o.acct, asset)[0] -= new_hold - old_hold
        self.b(o.acct, asset)[1] += new_hold - old_hold
        self.book.remove(o)
        o.price, o.qty, o.rem = price, qty, new_rem
        self.arrival += 1
        o.arrival = self.arrival
        rem, stop = self.match(c.symbol, o, price, new_rem, None, price if o.buy else None) if crosses else (new_rem, BOOK)  # noqa: E501
        o.rem = rem
        if rem == 0:
            return None
        if stop == STP:
            self.book.append(o)  # so that remove() releases exactly its hold
            self.remove(o, "STP")
            return None
        self.book.append(o)
        return None

    def c_PlaceOrder(self, seq: int, c: PlaceOrder) -> RejectCode | None:
        m = self.markets.get(c.symbol)
        if m is None:
            return RejectCode.UNKNOWN_SYMBOL
        if m.mode is not SymbolMode.NORMAL:
            return RejectCode.CANCEL_ONLY if m.mode is SymbolMode.CANCEL_ONLY else RejectCode.MARKET_HALTED
        cfg = m.cfg
        k = cfg.quote_per_tick_lot
        buy = c.side is Side.BUY
        tif = c.tif
        if c.type is OrderType.LIMIT:
            if c.price_ticks is None or c.price_ticks <= 0:
                return RejectCode.INVALID_PRICE
            if c.qty_lots is None or c.qty_lots <= 0:
                return RejectCode.INVALID_QTY
            if c.price_ticks * c.qty_lots * k < cfg.min_notional:
                return RejectCode.MIN_NOTIONAL
        else:
            if tif is TimeInForce.GTC:
                tif = TimeInForce.IOC
            if c.quote_amount is not None:
                if not buy or tif is TimeInForce.FOK:
                    return RejectCode.INVALID_ORDER
                if c.quote_amount < cfg.min_notional:
                    return RejectCode.MIN_NOTIONAL
            elif c.qty_lots is None or c.qty_lots <= 0:
                return RejectCode.INVALID_QTY
        if c.client_order_id and any(o.acct == c.account_id and o.coid == c.client_order_id for o in self.book):
            return RejectCode.DUPLICATE_CLIENT_ORDER_ID
        t = ROrder(seq, c.account_id, c.symbol, buy, c.price_ticks or 0, c.qty_lots or 0, c.qty_lots or 0, 0,
                   c.client_order_id, c.stp, c.post_only, 0)
        if c.type is OrderType.LIMIT:
            price, qty = c.price_ticks, c.qty_lots
            assert price is not None and qty is not None
            if not self.check_band(c.symbol, price):
                return RejectCode.PRICE_BAND
            crosses = self.crosses(c.symbol, buy, price)
            if crosses and c.post_only:
                return RejectCode.POST_ONLY_WOULD_TAKE
            if tif is TimeInForce.FOK:
                sim = copy.deepcopy(self)
                if sim.match(c.symbol, copy.deepcopy(t), price, qty, None, price)[0] != 0:
                    return RejectCode.FOK_UNFILLABLE
            hold = price * qty * k if buy else qty * cfg.base_per_lot
            limit, budget, hold_px, rem = price, None, price, qty
        else:
            num, den = self.band_ref(c.symbol) if cfg.price_band_bps else (0, 1)
            band = cfg.price_band_bps
            if buy:
                limit = num * (10_000 + band) // (den * 10_000) if num else BIG
            else:
                limit = -(-num * (10_000 - band) // (den * 10_000)) if num else 0
            budget = c.quote_amount
            want = c.qty_lots if c.qty_lots is not None else BIG
            sim = copy.deepcopy(self)
            st_ = copy.deepcopy(t)
            sim.match(c.symbol, st_, limit, want, budget, None)
            fill = st_.filled
            cost = sum(tr[2] * tr[3] * k for tr in sim.trades)
            if tif is TimeInForce.FOK and fill < want:
                return RejectCode.FOK_UNFILLABLE
            if fill and cost < cfg.min_notional:
                return RejectCode.MIN_NOTIONAL
            if c.qty_lots is None:
                t.qty = fill
            hold = cost if buy else fill * cfg.base_per_lot
            crosses = self.crosses(c.symbol, buy, limit)
            hold_px, rem = None, want
        asset = cfg.quote if buy else cfg.base
        if hold and self.b(c.account_id, asset)[0] < hold:
            return RejectCode.INSUFFICIENT_FUNDS
        self.b(c.account_id, asset)[0] -= hold
        self.b(c.account_id, asset)[1] += hold
        self.trades, self.cancels = [], []
        stop = BOOK
        if crosses:
            rem, stop = self.match(c.symbol, t, limit, rem, budget, hold_px)
        held_left = hold - sum(
            (tr[3] * hold_px * k if hold_px is not None else tr[2] * tr[3] * k) if buy else tr[3] * cfg.base_per_lot
            for tr in self.trades
        )
        if c.type is OrderType.MARKET:
            rem = t.qty - t.filled
            done = rem == 0 if c.quote_amount is None else (stop == BUDGET and t.filled > 0)
        else:
            done = rem == 0
        if done:
            assert held_left == 0
            return None
        if tif is TimeInForce.GTC and stop != STP:
            t.rem = rem
            self.arrival += 1
            t.arrival = self.arrival
            self.book.append(t)
            return None
        self.b(c.account_id, asset)[1] -= held_left
        self.b(c.account_id, asset)[0] += held_left
        self.cancels.append((t.oid, "STP" if stop == STP else "EXPIRED_IOC"))
        return None

    # ------------------------------------------------------------------ views
    def levels(self, sym: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        agg: dict[tuple[bool, int], int] = {}
        for o in self.book:
            if o.sym == sym:
                agg[(o.buy, o.price)] = agg.get((o.buy, o.price), 0) + o.rem
        bids = sorted(((p, q) for (b, p), q in agg.items() if b), reverse=True)
        asks = sorted((p, q) for (b, p), q in agg.items() if not b)
        return bids, asks


# ======================================================================== comparison


def engine_outcome(events: list[Event]) -> tuple[RejectCode | None, list[tuple[Any, ...]], list[tuple[int, str]]]:
    code: RejectCode | None = None
    trades: list[tuple[Any, ...]] = []
    cancels: list[tuple[int, str]] = []
    for ev in events:
        if isinstance(ev, (OrderRejected, CommandRejected)):
            code = ev.code
        elif isinstance(ev, TradeExecuted):
            trades.append((ev.taker_order_id, ev.maker_order_id, ev.price_ticks, ev.qty_lots, ev.taker_fee,
                           ev.maker_fee))
        elif isinstance(ev, OrderCanceled):
            cancels.append((ev.order_id, str(ev.reason)))
    return code, trades, cancels


def compare_state(e: Engine, ref: Ref) -> None:
    for sym in ref.markets:
        book = e.book(sym, depth=10**9)
        assert book is not None
        assert (book.bids, book.asks) == ref.levels(sym), sym
    assets = {a for _acct, a in ref.bal}
    for acct in {a for a, _ in ref.bal} | set(e.accounts()):
        for asset in assets:
            b = e.balance(acct, asset)
            rb = ref.bal.get((acct, asset), [0, 0])
            assert (b.available, b.hold) == (rb[0], rb[1]), (acct, asset)
    for o in ref.book:
        v = e.order(o.oid)
        assert v is not None and (v.remaining_qty_lots, v.filled_qty_lots, v.qty_lots, v.price_ticks) == (
            o.rem, o.filled, o.qty, o.price,
        )


# ======================================================================== command generation

PRICES = {"BTC-USDT": (95, 105), "ETH-USDT": (185, 215)}


def random_command(rng: random.Random, live: list[tuple[int, str, int]], seq: int,
                   last: dict[str, int | None] | None = None) -> Command:
    """A command from a mix that exercises every path (used by the seeded stream tests). Prices are
    drawn around the last trade when known, so the price drifts and resting orders end up beyond the
    band edges."""
    r = rng.random()
    sym = rng.choice(("BTC-USDT", "ETH-USDT"))
    acct = rng.choice(ACCOUNTS)
    lo, hi = PRICES[sym]
    ref = (last or {}).get(sym)
    if ref is not None:
        half = (hi - lo) // 2
        lo, hi = max(1, ref - half), ref + half
    side = rng.choice((Side.BUY, Side.SELL))
    stp = rng.choice(list(SelfTradePrevention))
    if r < 0.50:
        tif = rng.choice((TimeInForce.GTC, TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK))
        return PlaceOrder(account_id=acct, symbol=sym, client_order_id=rng.choice(("", "", "a", "b")), side=side,
                          tif=tif, price_ticks=rng.randint(lo, hi), qty_lots=rng.randint(1, 12),
                          post_only=rng.random() < 0.1, stp=stp)
    if r < 0.60:
        if side is Side.BUY and rng.random() < 0.4:
            return PlaceOrder(account_id=acct, symbol=sym, client_order_id="", side=side, type=OrderType.MARKET,
                              quote_amount=rng.randint(50, 8000), stp=stp)
        return PlaceOrder(account_id=acct, symbol=sym, client_order_id="", side=side, type=OrderType.MARKET,
                          tif=rng.choice((TimeInForce.IOC, TimeInForce.FOK)), qty_lots=rng.randint(1, 40),
                          stp=stp)
    if r < 0.71 and live:
        oid, osym, oacct = rng.choice(live)
        if rng.random() < 0.1:
            return CancelOrder(account_id=oacct, symbol=osym, client_order_id=rng.choice(("a", "b")))
        return CancelOrder(account_id=oacct if rng.random() < 0.9 else acct, symbol=osym, order_id=oid)
    if r < 0.86 and live:
        oid, osym, oacct = rng.choice(live)
        if osym != sym:
            lo, hi = PRICES[osym]
        choice = rng.random()
        if choice < 0.4:
            return AmendOrder(account_id=oacct, symbol=osym, order_id=oid, new_qty_lots=rng.randint(1, 12))
        if choice < 0.8:
            return AmendOrder(account_id=oacct, symbol=osym, order_id=oid, new_price_ticks=rng.randint(lo, hi))
        return AmendOrder(account_id=oacct, symbol=osym, order_id=oid, new_price_ticks=rng.randint(lo, hi),
                          new_qty_lots=rng.randint(1, 12))
    if r < 0.92:
        asset = rng.choice(("USDT", "BTC", "ETH"))
        if rng.random() < 0.5:
            return Deposit(account_id=acct, asset=asset, amount=rng.randint(1, 5000))
        return Withdraw(account_id=acct, asset=asset, amount=rng.randint(1, 5000))
    if r < 0.925:
        return CancelAllAccount(account_id=acct, symbol=rng.choice((None, sym)))
    if r < 0.93:
        return AdminCancelAll(symbol=sym, reason="drill", ticket="T-1")
    if r < 0.96:
        # mostly back to NORMAL so that trading dominates; a halt lasts ~70 commands
        mode = rng.choice(list(SymbolMode)) if rng.random() < 0.2 else SymbolMode.NORMAL
        return SetSymbolMode(symbol=sym, mode=mode)
    if r < 0.97:
        return WithdrawalsHalt(on=rng.random() < 0.3)
    return Deposit(account_id=acct, asset=rng.choice(("USDT", "BTC", "ETH")), amount=rng.randint(1000, 9000))


def setup_commands() -> list[Command]:
    cmds: list[Command] = [AddMarket(config=cfg) for cfg in MARKETS]
    for acct in ACCOUNTS:
        cmds += [
            Deposit(account_id=acct, asset="USDT", amount=20_000),
            Deposit(account_id=acct, asset="BTC", amount=1_000),
            Deposit(account_id=acct, asset="ETH", amount=10_000),
        ]
    return cmds


def sc(seq: int, c: Command) -> SequencedCommand:
    return SequencedCommand(seq=seq, ts_ms=1_700_000_000_000 + seq * 3, fencing_token=1, correlation_id=f"k{seq}",
                            command=c)


class Driver:
    """Feeds one command to the engine and the reference and compares everything."""

    def __init__(self) -> None:
        self.e = Engine(checkpoint_every=97)
        self.ref = Ref()
        self.shadow = Shadow()
        self.seq = 0
        self.live: list[tuple[int, str, int]] = []
        for c in setup_commands():
            self.step(c)

    def step(self, c: Command) -> list[Event]:
        self.seq += 1
        evs = self.e.apply(sc(self.seq, c))
        code = self.ref.apply(self.seq, c)
        got = engine_outcome(evs)
        assert got == (code, self.ref.trades, self.ref.cancels), (self.seq, c, got)
        self.shadow.post(evs)
        compare_state(self.e, self.ref)
        if isinstance(c, PlaceOrder) and code is None:
            self.live.append((self.seq, c.symbol, c.account_id))
        self.live = [x for x in self.live if self.e.is_open(x[0])][-40:]
        return evs

    def last(self) -> dict[str, int | None]:
        return {s: self.e.last_trade_price(s) for s in self.ref.markets}


def test_seeded_streams_match_reference() -> None:
    for seed in range(6):
        rng = random.Random(seed)
        d = Driver()
        for _ in range(700):
            d.step(random_command(rng, d.live, d.seq + 1, d.last()))
        check_invariants(d.e, d.shadow)


def test_snapshot_mid_stream_gives_identical_events_and_hash() -> None:
    rng = random.Random(99)
    cmds = setup_commands()
    # build a stream whose cancels/amends target real orders: drive once to record it
    d = Driver()
    for _ in range(1500):
        c = random_command(rng, d.live, d.seq + 1, d.last())
        cmds.append(c)
        d.step(c)
    full = Engine(checkpoint_every=97)
    events_full = [full.apply(sc(i, c)) for i, c in enumerate(cmds, 1)]
    cut = 900
    first = Engine(checkpoint_every=97)
    for i, c in enumerate(cmds[:cut], 1):
        first.apply(sc(i, c))
    restored = Engine.from_snapshot(first.snapshot())
    assert restored.state_hash() == first.state_hash()
    events_restored = [restored.apply(sc(i, c)) for i, c in enumerate(cmds[cut:], cut + 1)]
    assert events_restored == events_full[cut:]
    assert restored.state_hash() == full.state_hash() == d.e.state_hash()
    assert restored.snapshot() == full.snapshot()
    # an engine fed the same commands has the same hash (and checkpoints carry it)
    twin = Engine(checkpoint_every=97)
    events_twin = [twin.apply(sc(i, c)) for i, c in enumerate(cmds, 1)]
    assert events_twin == events_full and twin.state_hash() == full.state_hash()
    assert sum(1 for evs in events_full for ev in evs if type(ev).__name__ == "EngineCheckpoint") == len(cmds) // 97


# ======================================================================== hypothesis


class EngineVsReference(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = Driver()

    @rule(data=st.data(), sym=st.sampled_from(("BTC-USDT", "ETH-USDT")), acct=st.sampled_from(ACCOUNTS),
          side=st.sampled_from(list(Side)), qty=st.integers(1, 12),
          tif=st.sampled_from(list(TimeInForce)), post_only=st.booleans(),
          stp=st.sampled_from(list(SelfTradePrevention)), coid=st.sampled_from(("", "", "x", "y")))
    def limit(self, data: st.DataObject, sym: str, acct: int, side: Side, qty: int, tif: TimeInForce,
              post_only: bool, stp: SelfTradePrevention, coid: str) -> None:
        lo, hi = PRICES[sym]
        price = data.draw(st.integers(lo, hi))
        self.d.step(PlaceOrder(account_id=acct, symbol=sym, client_order_id=coid, side=side, tif=tif,
                               price_ticks=price, qty_lots=qty, post_only=post_only, stp=stp))

    @rule(sym=st.sampled_from(("BTC-USDT", "ETH-USDT")), acct=st.sampled_from(ACCOUNTS),
          side=st.sampled_from(list(Side)), qty=st.one_of(st.integers(1, 15), st.none()),
          quote=st.integers(10, 4000), fok=st.booleans(), stp=st.sampled_from(list(SelfTradePrevention)))
    def market(self, sym: str, acct: int, side: Side, qty: int | None, quote: int, fok: bool,
               stp: SelfTradePrevention) -> None:
        if qty is None and side is Side.BUY:
            c = PlaceOrder(account_id=acct, symbol=sym, client_order_id="", side=side, type=OrderType.MARKET,
                           quote_amount=quote, stp=stp)
        else:
            c = PlaceOrder(account_id=acct, symbol=sym, client_order_id="", side=side, type=OrderType.MARKET,
                           tif=TimeInForce.FOK if fok else TimeInForce.IOC, qty_lots=qty or 1, stp=stp)
        self.d.step(c)

    @precondition(lambda self: bool(self.d.live))
    @rule(data=st.data(), by_coid=st.booleans())
    def cancel(self, data: st.DataObject, by_coid: bool) -> None:
        oid, sym, acct = data.draw(st.sampled_from(self.d.live))
        if by_coid:
            self.d.step(CancelOrder(account_id=acct, symbol=sym, client_order_id=data.draw(st.sampled_from("xy"))))
        else:
            self.d.step(CancelOrder(account_id=acct, symbol=sym, order_id=oid))

    @precondition(lambda self: bool(self.d.live))
    @rule(data=st.data(), new_qty=st.one_of(st.none(), st.integers(1, 14)), reprice=st.booleans())
    def amend(self, data: st.DataObject, new_qty: int | None, reprice: bool) -> None:
        oid, sym, acct = data.draw(st.sampled_from(self.d.live))
        lo, hi = PRICES[sym]
        price = data.draw(st.integers(lo, hi)) if reprice or new_qty is None else None
        self.d.step(AmendOrder(account_id=acct, symbol=sym, order_id=oid, new_qty_lots=new_qty,
                               new_price_ticks=price))

    @rule(acct=st.sampled_from(ACCOUNTS), sym=st.sampled_from((None, "BTC-USDT", "ETH-USDT")))
    def cancel_all(self, acct: int, sym: str | None) -> None:
        self.d.step(CancelAllAccount(account_id=acct, symbol=sym))

    @rule(sym=st.sampled_from(("BTC-USDT", "ETH-USDT")),
          mode=st.sampled_from([*SymbolMode, SymbolMode.NORMAL, SymbolMode.NORMAL, SymbolMode.NORMAL]))
    def set_mode(self, sym: str, mode: SymbolMode) -> None:
        self.d.step(SetSymbolMode(symbol=sym, mode=mode, reason="test", ticket="T"))

    @rule(sym=st.sampled_from(("BTC-USDT", "ETH-USDT")))
    def admin_cancel_all(self, sym: str) -> None:
        self.d.step(AdminCancelAll(symbol=sym, reason="test", ticket="T"))

    @rule(acct=st.sampled_from(ACCOUNTS), asset=st.sampled_from(("USDT", "BTC", "ETH")),
          amount=st.integers(1, 6000), deposit=st.booleans())
    def funds(self, acct: int, asset: str, amount: int, deposit: bool) -> None:
        cls = Deposit if deposit else Withdraw
        self.d.step(cls(account_id=acct, asset=asset, amount=amount))

    @rule(on=st.booleans())
    def halt(self, on: bool) -> None:
        self.d.step(WithdrawalsHalt(on=on, reason="test", ticket="T"))

    @rule()
    def restore_from_snapshot(self) -> None:
        h = self.d.e.state_hash()
        e2 = Engine.from_snapshot(self.d.e.snapshot())
        assert e2.state_hash() == h
        self.d.e = e2  # continue on the restored engine: the reference must not notice

    @invariant()
    def invariants(self) -> None:
        check_invariants(self.d.e, self.d.shadow)
        assert self.d.e.balance(CUSTODY_ACCOUNT, "USDT").available >= -MAX_AMOUNT


EngineVsReference.TestCase.settings = settings(
    max_examples=100, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestEngineVsReference = EngineVsReference.TestCase
