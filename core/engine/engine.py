"""The matching engine: sequenced commands in, events out. Pure, deterministic, no I/O.

Determinism: :meth:`Engine.apply` depends only on the engine's state and the command (its ``ts_ms``
is the only clock). Every iteration that can influence an event walks an ordered structure (book
levels best first, FIFO queues, order ids ascending, symbols sorted), never a dict whose order could
depend on history that is not part of the state. The state hash and the snapshot use one canonical
form, so two engines that went through different histories to the same state hash the same.

An exception escaping :meth:`Engine.apply` (other than :class:`SequenceError`, raised before anything
changes) means a bug: the instance must be discarded and rebuilt from a snapshot and the WAL.

Semantics, reject codes, fee rounding and the canonical form are documented in docs/engine.md.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import msgspec

from core.engine.book import STP_BOTH, STP_MAKER, STP_NONE, STP_TAKER, BookSide, Level, Order
from core.engine.views import BalanceView, BookView, OrderView
from core.wire import (
    CUSTODY_ACCOUNT,
    FEE_ACCOUNT,
    MAX_AMOUNT,
    SYS_STREAM,
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
    validate_market,
)

__all__ = ["SNAPSHOT_FORMAT", "Engine", "SequenceError"]

SNAPSHOT_FORMAT: Final = 1
MAX_CLIENT_ORDER_ID_LEN: Final = 64
MAX_TICKS_OR_LOTS: Final = 10**15

# Hot-path constants bound as module globals (a global load is cheaper than Enum attribute access).
BUY: Final = Side.BUY
SELL: Final = Side.SELL
LIMIT: Final = OrderType.LIMIT
MARKET: Final = OrderType.MARKET
GTC: Final = TimeInForce.GTC
IOC: Final = TimeInForce.IOC
FOK: Final = TimeInForce.FOK
AVAILABLE: Final = Bucket.AVAILABLE
HOLD: Final = Bucket.HOLD
NORMAL: Final = SymbolMode.NORMAL
CANCEL_ONLY_MODE: Final = SymbolMode.CANCEL_ONLY
HARD_HALT: Final = SymbolMode.HARD_HALT
ST_ACCEPTED: Final = OrderStatus.ACCEPTED
ST_PARTIAL: Final = OrderStatus.PARTIALLY_FILLED
ST_FILLED: Final = OrderStatus.FILLED
ST_CANCELED: Final = OrderStatus.CANCELED
R_USER: Final = CancelReason.USER
R_ADMIN: Final = CancelReason.ADMIN
R_IOC: Final = CancelReason.EXPIRED_IOC
R_STP: Final = CancelReason.STP
R_AMEND: Final = CancelReason.AMEND

_STP_CODE: Final[dict[str, int]] = {
    SelfTradePrevention.NONE: STP_NONE,
    SelfTradePrevention.EXPIRE_TAKER: STP_TAKER,
    SelfTradePrevention.EXPIRE_MAKER: STP_MAKER,
    SelfTradePrevention.EXPIRE_BOTH: STP_BOTH,
}
# (side, tif, stp, type) -> the same as members, is_buy, stp code: one dict hit validates and
# normalizes all four (a plain string hashes and compares equal to its StrEnum member).
_OrderKind = tuple[Side, TimeInForce, SelfTradePrevention, OrderType, bool, int]
_ORDER_KINDS: Final[dict[tuple[str, str, str, str], _OrderKind]] = {
    (sd, tf, sp, ty): (sd, tf, sp, ty, sd is Side.BUY, _STP_CODE[sp])
    for sd in Side for tf in TimeInForce for sp in SelfTradePrevention for ty in OrderType
}

# Plain value string of each enum member the canonical form carries.
_VALUE: Final[dict[str, str]] = {v: v.value for e in (TimeInForce, SelfTradePrevention, SymbolMode) for v in e}

# Why a match / walk stopped.
STOP_QTY: Final = 0  # the taker's quantity is exhausted
STOP_BUDGET: Final = 1  # a market buy by quote cannot afford one more lot
STOP_BOOK: Final = 2  # no more liquidity within the limit price / price band
STOP_STP: Final = 3  # self-trade prevention expired the taker

_NO_BUDGET: Final = -1
_Ids = tuple[int | None, int | None, str | None]
_UNBOUNDED: Final = 1 << 62


class SequenceError(ValueError):
    """The command's seq is not ``last_seq + 1``. Raised before any state changes."""


class Market:
    __slots__ = (
        "asks",
        "band",
        "base",
        "bi",
        "bids",
        "bpl",
        "cfg",
        "k",
        "last_price",
        "maker_bps",
        "min_notional",
        "mode",
        "prefix",
        "qi",
        "quote",
        "seq",
        "symbol",
        "taker_bps",
        "touched",
        "trade_seq",
    )

    def __init__(self, cfg: MarketConfig, bi: int, qi: int) -> None:
        self.cfg = cfg
        self.symbol = cfg.symbol
        self.prefix = cfg.symbol + ":"
        self.base = cfg.base
        self.quote = cfg.quote
        self.bi = bi
        self.qi = qi
        self.bpl = cfg.base_per_lot
        self.k = cfg.quote_per_tick_lot
        self.min_notional = cfg.min_notional
        self.band = cfg.price_band_bps
        self.maker_bps = cfg.maker_fee_bps
        self.taker_bps = cfg.taker_fee_bps
        self.mode = NORMAL
        self.seq = 0
        self.trade_seq = 0
        self.last_price = 0
        self.bids = BookSide(True)
        self.asks = BookSide(False)
        # Level keys ((price << 1) | is_buy) changed by the current command, in first-touch order.
        self.touched: dict[int, None] = {}


class Account:
    __slots__ = ("avail", "coids", "hold", "open")

    def __init__(self, n_assets: int) -> None:
        self.avail = [0] * n_assets
        self.hold = [0] * n_assets
        self.open: dict[int, Order] = {}
        self.coids: dict[str, Order] = {}


class Engine:
    """Matching engine + in-memory risk. See the module docstring and docs/engine.md."""

    def __init__(self, checkpoint_every: int = 10_000, recent_orders: int = 10_000) -> None:
        if checkpoint_every < 0 or recent_orders < 0:
            raise ValueError("checkpoint_every and recent_orders must be >= 0")
        self._ckpt_every = checkpoint_every
        # The next seq that gets an EngineCheckpoint (-1: never): one compare per command.
        self._next_ckpt = checkpoint_every or -1
        self._recent_cap = recent_orders
        self._markets: dict[str, Market] = {}
        self._accounts: dict[int, Account] = {}
        self._orders: dict[int, Order] = {}
        self._assets: dict[str, int] = {}
        self._asset_names: list[str] = []
        self._last_seq = 0
        self._max_fence = 0
        self._sys_seq = 0
        self._halted = False
        # Terminal orders kept for lookups only: not state (not hashed, not in snapshots).
        self._recent: OrderedDict[int, Order] = OrderedDict()
        self._recent_coid: dict[tuple[int, str], int] = {}
        # Orders that went terminal, oldest first, not yet indexed into _recent: indexing is deferred
        # to the first lookup (replay and the hot path only append here). Trimmed to the newest
        # ``recent_orders`` once it holds twice that many (see _trim_retired).
        self._retired: list[Order] = []
        self._retired_max = max(2 * recent_orders, 1024)
        # Per-command context.
        self._ts = 0
        self._corr = ""
        self._cause = ""
        self._fence = 0
        self._out: list[Event] = []
        # False while replaying a stretch whose events nobody will read (see emit_events): the
        # hot paths skip building them, every stream seq still advances exactly as it would.
        self._emit = True
        self._fee_acct = self._account(FEE_ACCOUNT)
        # The rarer commands (apply calls _place, _cancel and _amend directly).
        self._handlers: dict[type, Callable[[Any], None]] = {
            CancelAllAccount: self._cancel_all_account,
            AdminCancelAll: self._admin_cancel_all,
            SetSymbolMode: self._set_mode,
            WithdrawalsHalt: self._withdrawals_halt,
            Deposit: self._deposit,
            Withdraw: self._withdraw,
            AddMarket: self._add_market,
        }

    # ------------------------------------------------------------------------------------------
    # Apply

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def checkpoint_every(self) -> int:
        return self._ckpt_every

    def emit_events(self, on: bool) -> None:
        """Whether :meth:`apply` builds events (the default). Off, ``apply`` returns an empty list
        and the state it leaves is exactly the same, stream seqs and checkpoint seqs included (only
        the checkpoint's state hash is not computed). Recovery turns it off for the part of the WAL
        tail whose events are long on EVT: building and dropping them is about a quarter of a
        replayed command's cost."""
        self._emit = bool(on)

    @property
    def emitting(self) -> bool:
        return self._emit

    def apply(self, cmd: SequencedCommand) -> list[Event]:
        """Apply one sequenced command; return its events in order. ``cmd.seq`` must be
        ``last_seq + 1`` (else :class:`SequenceError`, nothing changes). With events off (see
        :meth:`emit_events`) the list is empty."""
        seq = cmd.seq
        if seq != self._last_seq + 1:
            raise SequenceError(f"expected seq {self._last_seq + 1}, got {seq}")
        self._last_seq = seq
        self._ts = cmd.ts_ms
        self._corr = cmd.correlation_id
        emit = self._emit
        if emit:
            self._cause = f"cmd:{seq}"
        fence = cmd.fencing_token
        self._fence = fence
        out: list[Event] = []
        self._out = out
        c = cmd.command
        if fence < self._max_fence:
            self._reject_stale(c)
        else:
            self._max_fence = fence
            # The three commands of the order flow by direct call (a direct C call when compiled),
            # the rest through the table.
            if type(c) is PlaceOrder:
                self._place(c)
            elif type(c) is CancelOrder:
                self._cancel(c)
            elif type(c) is AmendOrder:
                self._amend(c)
            else:
                try:
                    handler = self._handlers[type(c)]
                except KeyError:
                    raise TypeError(f"not a command: {type(c).__name__}") from None
                handler(c)
        if seq == self._next_ckpt:
            self._next_ckpt = seq + self._ckpt_every
            self._checkpoint()
        if len(self._retired) > self._retired_max:
            self._trim_retired()
        if not emit and out:
            out.clear()  # what the rarer paths built regardless
        return out

    # ------------------------------------------------------------------------------------------
    # Small helpers

    def _account(self, aid: int) -> Account:
        acct = self._accounts.get(aid)
        if acct is None:
            acct = Account(len(self._asset_names))
            self._accounts[aid] = acct
        return acct

    def _asset(self, name: str) -> int:
        """Index of an asset, registering it. Indices follow name order so that the canonical form
        can take each account's balance lists as they are; registering shifts later indices (rare:
        AddMarket or a deposit of a new asset), so callers must not hold indices across this call."""
        idx = self._assets.get(name)
        if idx is None:
            names = self._asset_names
            idx = bisect_left(names, name)
            names.insert(idx, name)
            self._assets = {n: i for i, n in enumerate(names)}
            for acct in self._accounts.values():
                acct.avail.insert(idx, 0)
                acct.hold.insert(idx, 0)
            for m in self._markets.values():
                m.bi = self._assets[m.base]
                m.qi = self._assets[m.quote]
        return idx

    def _env_m(self, m: Market) -> tuple[str, str, int, int, str, str, int]:
        m.seq = s = m.seq + 1
        return (m.prefix + str(s), m.symbol, s, self._ts, self._corr, self._cause, self._fence)

    def _env_sys(self) -> tuple[str, str, int, int, str, str, int]:
        self._sys_seq = s = self._sys_seq + 1
        return ("_sys:" + str(s), SYS_STREAM, s, self._ts, self._corr, self._cause, self._fence)

    def _env_for(self, symbol: str | None) -> tuple[str, str, int, int, str, str, int]:
        m = self._markets.get(symbol) if symbol is not None else None
        return self._env_m(m) if m is not None else self._env_sys()

    def _reject_order(self, m: Market | None, c: PlaceOrder, code: RejectCode, detail: str) -> None:
        env = self._env_m(m) if m is not None else self._env_sys()
        self._out.append(OrderRejected(*env, c.account_id, c.client_order_id, code, detail))

    def _reject_cmd(
        self, symbol: str | None, c: Command, code: RejectCode, detail: str, ids: _Ids = (None, None, None)
    ) -> None:
        """CommandRejected on the symbol's stream (``_sys`` when it names no known market); ``ids`` is
        (account_id, order_id, client_order_id) as far as the command names them."""
        aid, oid, coid = ids
        self._out.append(CommandRejected(*self._env_for(symbol), type(c).__name__, code, aid, oid, coid, detail))

    def _reject_stale(self, c: Command) -> None:
        detail = f"fencing token {self._fence} < {self._max_fence}"
        code = RejectCode.FENCING_TOKEN
        if isinstance(c, PlaceOrder):
            self._reject_order(self._markets.get(c.symbol), c, code, detail)
            return
        symbol = getattr(c, "symbol", None)
        if isinstance(c, AddMarket):
            symbol = None
        ids = (getattr(c, "account_id", None), getattr(c, "order_id", None), getattr(c, "client_order_id", None))
        self._reject_cmd(symbol, c, code, detail, ids)

    def _flush_book(self, m: Market) -> None:
        touched = m.touched
        if not touched:
            return
        if not self._emit:
            touched.clear()
            m.seq += 1
            return
        bl = m.bids.levels
        al = m.asks.levels
        changes: list[LevelChange] = []
        for key in touched:
            price = key >> 1
            if key & 1:
                lvl = bl.get(price)
                changes.append(LevelChange(BUY, price, lvl.total if lvl is not None else 0))
            else:
                lvl = al.get(price)
                changes.append(LevelChange(SELL, price, lvl.total if lvl is not None else 0))
        touched.clear()
        m.seq = s = m.seq + 1
        self._out.append(
            BookDelta(m.prefix + str(s), m.symbol, s, self._ts, self._corr, self._cause, self._fence, changes)
        )

    def _retire(self, o: Order) -> None:
        """Remember a terminal order for lookups (bounded, not part of the state). Deferred: the
        order is indexed into ``_recent`` by :meth:`_index_retired` at the next lookup."""
        self._retired.append(o)

    def _trim_retired(self) -> None:
        """Keep only the newest ``recent_orders`` pending retirements: they alone will be in the
        lookup cache, so whatever it holds now would be evicted by them anyway."""
        cap = self._recent_cap
        pending = self._retired
        if cap:
            del pending[:-cap]
        else:
            pending.clear()
        self._recent.clear()
        self._recent_coid.clear()

    def _index_retired(self) -> None:
        """Index the pending terminal orders into the bounded lookup cache, oldest first: the cache
        then holds the last ``recent_orders`` terminal orders, exactly as if indexed one by one."""
        pending = self._retired
        if not pending:
            return
        cap = self._recent_cap
        if len(pending) >= cap:
            self._trim_retired()
        self._retired = []
        recent = self._recent
        recent_coid = self._recent_coid
        for o in pending:
            recent[o.order_id] = o
            if o.client_order_id:
                recent_coid[(o.account_id, o.client_order_id)] = o.order_id
            if len(recent) > cap:
                _, old = recent.popitem(last=False)
                if old.client_order_id:
                    key = (old.account_id, old.client_order_id)
                    if recent_coid.get(key) == old.order_id:
                        del recent_coid[key]

    def _unindex(self, o: Order, acct: Account) -> None:
        del self._orders[o.order_id]
        del acct.open[o.order_id]
        coid = o.client_order_id
        if coid and acct.coids.get(coid) is o:
            del acct.coids[coid]

    def _release_resting(self, m: Market, o: Order, acct: Account) -> list[Move]:
        """Return a resting order's whole hold to available; the moves that say so."""
        rem = o.remaining
        aid = o.account_id
        if o.is_buy:
            amt = rem * o.price * m.k
            qi = m.qi
            acct.hold[qi] -= amt
            acct.avail[qi] += amt
            asset = m.quote
        else:
            amt = rem * m.bpl
            bi = m.bi
            acct.hold[bi] -= amt
            acct.avail[bi] += amt
            asset = m.base
        return [Move(aid, asset, HOLD, -amt), Move(aid, asset, AVAILABLE, amt)] if amt else []

    def _cancel_resting(self, m: Market, o: Order, reason: CancelReason) -> None:
        """Remove a resting order from the book and indexes, release its hold, emit OrderCanceled."""
        acct = self._accounts[o.account_id]
        if o.is_buy:
            m.bids.remove(o)
            m.touched[(o.price << 1) | 1] = None
        else:
            m.asks.remove(o)
            m.touched[o.price << 1] = None
        self._unindex(o, acct)
        moves = self._release_resting(m, o, acct)
        rem = o.remaining
        o.remaining = 0
        o.status = ST_CANCELED
        m.seq = s = m.seq + 1
        if self._emit:
            self._out.append(
                OrderCanceled(
                    m.prefix + str(s), m.symbol, s, self._ts, self._corr, self._cause, self._fence,
                    o.order_id, o.account_id, o.client_order_id, reason, rem, o.filled, moves,
                )
            )
        self._retired.append(o)

    def _band_ref(self, m: Market) -> tuple[int, int]:
        """Price band reference as a fraction num/den: last trade, else mid (den 2), else (0, 1)."""
        if m.last_price:
            return m.last_price, 1
        bk = m.bids.keys
        ak = m.asks.keys
        if bk and ak:
            return bk[-1] - ak[-1], 2
        return 0, 1

    # ------------------------------------------------------------------------------------------
    # Walk (dry run) and match

    def _walk(
        self, m: Market, is_buy: bool, limit: int, qty: int, budget: int, aid: int, stp_code: int
    ) -> tuple[int, int, int]:
        """What a taker would fill without changing anything: (lots, quote cost, stop reason).
        Mirrors :meth:`_match` decision for decision."""
        side = m.asks if is_buy else m.bids
        keys = side.keys
        levels = side.levels
        k = m.k
        filled = 0
        cost = 0
        for i in range(len(keys) - 1, -1, -1):
            if is_buy:
                p = -keys[i]
                if p > limit:
                    return filled, cost, STOP_BOOK
            else:
                p = keys[i]
                if p < limit:
                    return filled, cost, STOP_BOOK
            pk = p * k
            for mo in levels[p].orders.values():
                if budget != _NO_BUDGET and budget - cost < pk:
                    return filled, cost, STOP_BUDGET
                if stp_code and mo.account_id == aid:
                    if stp_code == STP_MAKER:
                        continue
                    return filled, cost, STOP_STP
                q = mo.remaining
                need = qty - filled
                if q > need:
                    q = need
                if budget != _NO_BUDGET:
                    afford = (budget - cost) // pk
                    if q > afford:
                        q = afford
                filled += q
                cost += q * pk
                if filled == qty:
                    return filled, cost, STOP_QTY
        return filled, cost, STOP_BOOK

    def _match(
        self,
        m: Market,
        o: Order,
        acct: Account,
        limit: int,
        rem: int,
        budget: int,
        hold_pk: int,
        hold: int,
    ) -> tuple[int, int, int]:
        """Trade taker ``o`` against the opposite side: returns (rem, hold left, stop reason).

        ``limit`` bounds the price (limit price or price band), ``rem`` the lots, ``budget`` the quote
        spend (market buy by quote, else ``_NO_BUDGET``). A buyer's hold is consumed at ``hold_pk``
        (limit price * quote_per_tick_lot) per lot with the price improvement returned to available,
        or at the trade price when ``hold_pk`` is 0 (market orders: the hold is the walked cost).
        """
        is_buy = o.is_buy
        side = m.asks if is_buy else m.bids
        keys = side.keys
        levels = side.levels
        touched = m.touched
        accounts = self._accounts
        fee_acct = self._fee_acct
        out = self._out
        k = m.k
        bpl = m.bpl
        bi = m.bi
        qi = m.qi
        base = m.base
        quote = m.quote
        tbps = m.taker_bps
        mbps = m.maker_bps
        aid = o.account_id
        oid = o.order_id
        stp_code = o.stp_code
        tav = acct.avail
        tho = acct.hold
        prefix = m.prefix
        sym = m.symbol
        ts = self._ts
        corr = self._corr
        cause = self._cause
        fence = self._fence
        spent = 0
        stop = STOP_BOOK
        taker_side = BUY if is_buy else SELL
        all_orders = self._orders
        retired = self._retired
        emit = self._emit
        moves: list[Move] = []
        while rem > 0 and keys:
            if is_buy:
                p = -keys[-1]
                if p > limit:
                    break
                touched[p << 1] = None
            else:
                p = keys[-1]
                if p < limit:
                    break
                touched[(p << 1) | 1] = None
            lvl = levels[p]
            orders = lvl.orders
            pk = p * k
            while rem > 0 and orders:
                if budget != _NO_BUDGET and budget - spent < pk:
                    stop = STOP_BUDGET
                    break
                mo = next(iter(orders.values()))
                if stp_code and mo.account_id == aid:
                    if stp_code == STP_TAKER:
                        stop = STOP_STP
                        break
                    self._cancel_resting(m, mo, R_STP)
                    if stp_code == STP_BOTH:
                        stop = STOP_STP
                        break
                    continue
                mrem = mo.remaining
                q = rem if rem < mrem else mrem
                if budget != _NO_BUDGET:
                    afford = (budget - spent) // pk
                    if q > afford:
                        q = afford
                base_amt = q * bpl
                quote_amt = q * pk
                maid = mo.account_id
                mac = accounts[maid]
                if is_buy:
                    t_fee = (base_amt * tbps + 9_999) // 10_000 if tbps else 0
                    m_fee = (quote_amt * mbps + 9_999) // 10_000 if mbps else 0
                    consumed = q * hold_pk if hold_pk else quote_amt
                    refund = consumed - quote_amt
                    tho[qi] -= consumed
                    if refund:
                        tav[qi] += refund
                    tav[bi] += base_amt - t_fee
                    mac.hold[bi] -= base_amt
                    mac.avail[qi] += quote_amt - m_fee
                    if m_fee:
                        fee_acct.avail[qi] += m_fee
                    if t_fee:
                        fee_acct.avail[bi] += t_fee
                    hold -= consumed
                    if emit:
                        moves = [Move(aid, quote, HOLD, -consumed)]
                        if refund:
                            moves.append(Move(aid, quote, AVAILABLE, refund))
                        if quote_amt != m_fee:
                            moves.append(Move(maid, quote, AVAILABLE, quote_amt - m_fee))
                        if m_fee:
                            moves.append(Move(FEE_ACCOUNT, quote, AVAILABLE, m_fee))
                        moves.append(Move(maid, base, HOLD, -base_amt))
                        if base_amt != t_fee:
                            moves.append(Move(aid, base, AVAILABLE, base_amt - t_fee))
                        if t_fee:
                            moves.append(Move(FEE_ACCOUNT, base, AVAILABLE, t_fee))
                    t_fee_asset = base
                    m_fee_asset = quote
                else:
                    t_fee = (quote_amt * tbps + 9_999) // 10_000 if tbps else 0
                    m_fee = (base_amt * mbps + 9_999) // 10_000 if mbps else 0
                    mac.hold[qi] -= quote_amt
                    tho[bi] -= base_amt
                    tav[qi] += quote_amt - t_fee
                    mac.avail[bi] += base_amt - m_fee
                    if t_fee:
                        fee_acct.avail[qi] += t_fee
                    if m_fee:
                        fee_acct.avail[bi] += m_fee
                    hold -= base_amt
                    if emit:
                        moves = [Move(maid, quote, HOLD, -quote_amt)]
                        if quote_amt != t_fee:
                            moves.append(Move(aid, quote, AVAILABLE, quote_amt - t_fee))
                        if t_fee:
                            moves.append(Move(FEE_ACCOUNT, quote, AVAILABLE, t_fee))
                        moves.append(Move(aid, base, HOLD, -base_amt))
                        if base_amt != m_fee:
                            moves.append(Move(maid, base, AVAILABLE, base_amt - m_fee))
                        if m_fee:
                            moves.append(Move(FEE_ACCOUNT, base, AVAILABLE, m_fee))
                    t_fee_asset = quote
                    m_fee_asset = base
                spent += quote_amt
                rem -= q
                o.filled += q
                mrem -= q
                mo.remaining = mrem
                mo.filled += q
                lvl.total -= q
                m.trade_seq = tid = m.trade_seq + 1
                m.seq = s = m.seq + 1
                if emit:
                    out.append(
                        TradeExecuted(
                            prefix + str(s), sym, s, ts, corr, cause, fence,
                            tid, oid, aid, taker_side, mo.order_id, maid, p, q, base_amt, quote_amt,
                            t_fee, t_fee_asset, m_fee, m_fee_asset, o.qty - o.filled, mrem, moves,
                        )
                    )
                m.last_price = p
                if mrem:
                    mo.status = ST_PARTIAL
                else:
                    orders.popitem(last=False)
                    mo.status = ST_FILLED
                    moid = mo.order_id
                    del all_orders[moid]
                    del mac.open[moid]
                    mcoid = mo.client_order_id
                    if mcoid and mac.coids.get(mcoid) is mo:
                        del mac.coids[mcoid]
                    retired.append(mo)
                    if not orders:
                        # the level matched is always the best one: its key is the last
                        del levels[p]
                        keys.pop()
            else:
                # Level exhausted (dropped already, by a fill or an STP cancel) or taker done.
                continue
            break  # budget or STP stop
        else:
            stop = STOP_QTY if rem == 0 else STOP_BOOK
        if stop == STOP_BOOK and rem == 0:
            stop = STOP_QTY
        return rem, hold, stop

    # ------------------------------------------------------------------------------------------
    # PlaceOrder

    def _place(self, c: PlaceOrder) -> None:
        m = self._markets.get(c.symbol)
        if m is None:
            return self._reject_order(None, c, RejectCode.UNKNOWN_SYMBOL, f"unknown symbol {c.symbol!r}")
        mode = m.mode
        if mode is not NORMAL:
            if mode is CANCEL_ONLY_MODE:
                return self._reject_order(m, c, RejectCode.CANCEL_ONLY, "market is cancel-only")
            return self._reject_order(m, c, RejectCode.MARKET_HALTED, f"market is {mode.value}")
        aid = c.account_id
        if aid <= CUSTODY_ACCOUNT:
            return self._reject_order(m, c, RejectCode.INVALID_ACCOUNT, "account_id must be > 0")
        kind = _ORDER_KINDS.get((c.side, c.tif, c.stp, c.type))
        if kind is None:
            return self._reject_order(m, c, RejectCode.INVALID_ORDER, "bad side, type, tif or stp")
        side, tif, stp, typ, is_buy, stp_code = kind
        coid = c.client_order_id
        if coid and len(coid) > MAX_CLIENT_ORDER_ID_LEN:
            return self._reject_order(m, c, RejectCode.INVALID_ORDER, "client_order_id longer than 64")
        qty = c.qty_lots
        quote = c.quote_amount
        price = c.price_ticks
        post_only = c.post_only
        k = m.k
        if typ is LIMIT:
            if price is None or price <= 0 or price > MAX_TICKS_OR_LOTS:
                return self._reject_order(m, c, RejectCode.INVALID_PRICE, "limit price must be > 0 ticks")
            if qty is None or qty <= 0 or qty > MAX_TICKS_OR_LOTS:
                return self._reject_order(m, c, RejectCode.INVALID_QTY, "qty must be > 0 lots")
            if quote is not None:
                return self._reject_order(m, c, RejectCode.INVALID_ORDER, "quote_amount is for market buys")
            notional = price * qty * k
            if notional > MAX_AMOUNT:
                return self._reject_order(m, c, RejectCode.INVALID_QTY, "notional too large")
            if notional < m.min_notional:
                return self._reject_order(m, c, RejectCode.MIN_NOTIONAL, f"notional {notional} < {m.min_notional}")
        else:
            if price is not None or post_only:
                return self._reject_order(m, c, RejectCode.INVALID_ORDER, "market orders take no price/post_only")
            if tif is GTC:
                tif = IOC
            if quote is not None:
                if not is_buy or qty is not None or tif is FOK:
                    return self._reject_order(
                        m, c, RejectCode.INVALID_ORDER, "quote_amount: market BUY only, without qty, not FOK"
                    )
                if quote <= 0 or quote > MAX_AMOUNT:
                    return self._reject_order(m, c, RejectCode.INVALID_QTY, "quote_amount must be > 0")
                if quote < m.min_notional:
                    return self._reject_order(
                        m, c, RejectCode.MIN_NOTIONAL, f"quote_amount {quote} < {m.min_notional}"
                    )
            elif qty is None or qty <= 0 or qty > MAX_TICKS_OR_LOTS:
                return self._reject_order(m, c, RejectCode.INVALID_QTY, "qty must be > 0 lots")
        acct = self._accounts.get(aid)
        if coid and acct is not None and coid in acct.coids:
            return self._reject_order(m, c, RejectCode.DUPLICATE_CLIENT_ORDER_ID, f"open order has {coid!r}")
        # Price band reference as a fraction num/den: last trade, else mid (den 2), else none (num 0).
        band = m.band
        num = m.last_price if band else 0
        den = 1
        if band and not num:
            bk = m.bids.keys
            ak = m.asks.keys
            if bk and ak:
                num = bk[-1] - ak[-1]
                den = 2
        if is_buy:
            ai = m.qi
            asset = m.quote
            opp = m.asks.keys
        else:
            ai = m.bi
            asset = m.base
            opp = m.bids.keys
        if typ is LIMIT:
            assert price is not None and qty is not None
            if num and abs(price * den - num) * 10_000 > num * band:
                return self._reject_order(m, c, RejectCode.PRICE_BAND, "price outside the band")
            crosses = bool(opp) and (price >= -opp[-1] if is_buy else price <= opp[-1])
            if crosses and post_only:
                return self._reject_order(m, c, RejectCode.POST_ONLY_WOULD_TAKE, "post-only order would take")
            if tif is FOK and (not crosses or self._walk(m, is_buy, price, qty, _NO_BUDGET, aid, stp_code)[0] < qty):
                return self._reject_order(m, c, RejectCode.FOK_UNFILLABLE, "cannot fill the whole quantity")
            hold = notional if is_buy else qty * m.bpl
            # (limit, rem, budget, hold_pk: set below, only when the order takes)
        else:
            if is_buy:
                limit = (num * (10_000 + band)) // (den * 10_000) if num else _UNBOUNDED
            else:
                limit = -((-num * (10_000 - band)) // (den * 10_000)) if num else 0
            budget = quote if quote is not None else _NO_BUDGET
            want = qty if qty is not None else _UNBOUNDED
            fill, cost, _stop = self._walk(m, is_buy, limit, want, budget, aid, stp_code)
            if tif is FOK and fill < want:
                return self._reject_order(m, c, RejectCode.FOK_UNFILLABLE, "cannot fill the whole quantity")
            if qty is None:
                qty = fill  # a buy by quote: its quantity is what the walk can buy
            if fill and cost < m.min_notional:
                return self._reject_order(m, c, RejectCode.MIN_NOTIONAL, f"notional {cost} < {m.min_notional}")
            # Run the match whenever something is within reach, even if nothing will fill: STP must
            # still expire the makers (EXPIRE_MAKER/BOTH) or the taker (EXPIRE_TAKER) it runs into.
            crosses = bool(opp) and (-opp[-1] <= limit if is_buy else opp[-1] >= limit)
            rem = want
            hold = cost if is_buy else fill * m.bpl
            hold_pk = 0
        if hold:
            if acct is None or acct.avail[ai] < hold:
                return self._reject_order(m, c, RejectCode.INSUFFICIENT_FUNDS, f"needs {hold} {asset} available")
            acct.avail[ai] -= hold
            acct.hold[ai] += hold
        elif acct is None:
            acct = self._account(aid)
        oid = self._last_seq
        o = Order(
            oid, aid, m.symbol, is_buy, price if price is not None else 0, qty, qty, 0, coid, typ, tif,
            stp, stp_code, post_only, ST_ACCEPTED, quote,
        )
        out = self._out
        ts = self._ts
        corr = self._corr
        cause = self._cause
        fence = self._fence
        prefix = m.prefix
        sym = m.symbol
        emit = self._emit
        m.seq = s = m.seq + 1
        if emit:
            out.append(
                OrderAccepted(
                    prefix + str(s), sym, s, ts, corr, cause, fence,
                    oid, aid, coid, side, typ, tif, price, c.qty_lots, quote, post_only, stp,
                    [Move(aid, asset, AVAILABLE, -hold), Move(aid, asset, HOLD, hold)] if hold else [],
                )
            )
        book = m.bids if is_buy else m.asks
        if not crosses and tif is GTC:
            # Hot path: a passive limit rests; exactly one level changes.
            assert price is not None
            levels = book.levels
            lvl = levels.get(price)
            if lvl is None:
                lvl = Level()
                levels[price] = lvl
                insort(book.keys, price if is_buy else -price)
            lvl.orders[oid] = o
            total = lvl.total + qty
            lvl.total = total
            self._orders[oid] = o
            acct.open[oid] = o
            if coid:
                acct.coids[coid] = o
            m.seq = s = s + 1
            if emit:
                out.append(
                    BookDelta(prefix + str(s), sym, s, ts, corr, cause, fence, [LevelChange(side, price, total)])
                )
            return None
        if typ is LIMIT:
            assert price is not None
            limit = price
            rem = qty
            budget = _NO_BUDGET
            hold_pk = price * k if is_buy else 0
        stop = STOP_BOOK
        if crosses:
            rem, hold, stop = self._match(m, o, acct, limit, rem, budget, hold_pk, hold)
        if typ is MARKET:
            rem = qty - o.filled
        # A market buy by quote is done when its budget cannot buy one more lot.
        filled_all = rem == 0 if quote is None else (stop == STOP_BUDGET and o.filled > 0)
        o.remaining = rem
        if filled_all:
            # hold is 0 here: a filled limit buy consumed rem*price*k, a market order its walked cost
            o.status = ST_FILLED
            self._retired.append(o)
        elif tif is GTC and stop != STOP_STP:
            if o.filled:
                o.status = ST_PARTIAL
            book.add(o)
            m.touched[(o.price << 1) | is_buy] = None
            self._orders[oid] = o
            acct.open[oid] = o
            if coid:
                acct.coids[coid] = o
        else:
            if hold:
                acct.hold[ai] -= hold
                acct.avail[ai] += hold
            o.remaining = 0
            o.status = ST_CANCELED
            m.seq = s = m.seq + 1
            if emit:
                out.append(
                    OrderCanceled(
                        prefix + str(s), sym, s, ts, corr, cause, fence,
                        oid, aid, coid, R_STP if stop == STOP_STP else R_IOC, rem, o.filled,
                        [Move(aid, asset, HOLD, -hold), Move(aid, asset, AVAILABLE, hold)] if hold else [],
                    )
                )
            self._retired.append(o)
        if m.touched:
            self._flush_book(m)
        return None

    # ------------------------------------------------------------------------------------------
    # Cancel / amend / cancel-all

    def _find_open(self, m: Market, aid: int, order_id: int | None, coid: str | None) -> Order | None:
        if order_id is not None:
            o = self._orders.get(order_id)
        elif coid:
            acct = self._accounts.get(aid)
            o = acct.coids.get(coid) if acct is not None else None
        else:
            return None
        if o is None or o.account_id != aid or o.symbol != m.symbol:
            return None
        return o

    def _cancel(self, c: CancelOrder) -> None:
        m = self._markets.get(c.symbol)
        o = None
        if m is not None and m.mode is not HARD_HALT:
            oid = c.order_id
            if oid is not None:  # _find_open, inlined for the common case
                o = self._orders.get(oid)
                if o is not None and (o.account_id != c.account_id or o.symbol != m.symbol):
                    o = None
            else:
                o = self._find_open(m, c.account_id, None, c.client_order_id)
        if o is None or m is None:
            ids: _Ids = (c.account_id, c.order_id, c.client_order_id)
            if m is None:
                return self._reject_cmd(None, c, RejectCode.UNKNOWN_SYMBOL, f"unknown symbol {c.symbol!r}", ids)
            if m.mode is HARD_HALT:
                return self._reject_cmd(m.symbol, c, RejectCode.MARKET_HALTED, "market is HARD_HALT", ids)
            return self._reject_cmd(m.symbol, c, RejectCode.UNKNOWN_ORDER, "no such open order", ids)
        # Hot path, inlined: leave the book, release the hold, two events.
        oid = o.order_id
        aid = o.account_id
        acct = self._accounts[aid]
        price = o.price
        rem = o.remaining
        if o.is_buy:
            book = m.bids
            amt = rem * price * m.k
            ai = m.qi
            asset = m.quote
            lside = BUY
            key = price
        else:
            book = m.asks
            amt = rem * m.bpl
            ai = m.bi
            asset = m.base
            lside = SELL
            key = -price
        levels = book.levels
        lvl = levels[price]
        orders = lvl.orders
        del orders[oid]
        total = lvl.total - rem
        lvl.total = total
        if not orders:  # BookSide.drop_level, inlined
            del levels[price]
            keys = book.keys
            if keys[-1] == key:
                keys.pop()
            else:
                del keys[bisect_left(keys, key)]
        del self._orders[oid]
        del acct.open[oid]
        coid = o.client_order_id
        if coid and acct.coids.get(coid) is o:
            del acct.coids[coid]
        acct.hold[ai] -= amt
        acct.avail[ai] += amt
        o.remaining = 0
        o.status = ST_CANCELED
        out = self._out
        ts = self._ts
        corr = self._corr
        cause = self._cause
        fence = self._fence
        prefix = m.prefix
        sym = m.symbol
        s = m.seq
        m.seq = s + 2
        self._retired.append(o)
        if not self._emit:
            return None
        out.append(
            OrderCanceled(
                prefix + str(s + 1), sym, s + 1, ts, corr, cause, fence,
                oid, aid, coid, R_USER, rem, o.filled,
                [Move(aid, asset, HOLD, -amt), Move(aid, asset, AVAILABLE, amt)],
            )
        )
        out.append(
            BookDelta(prefix + str(s + 2), sym, s + 2, ts, corr, cause, fence, [LevelChange(lside, price, total)])
        )
        return None

    def _amend(self, c: AmendOrder) -> None:
        m = self._markets.get(c.symbol)
        ids: _Ids = (c.account_id, c.order_id, None)
        if m is None:
            return self._reject_cmd(None, c, RejectCode.UNKNOWN_SYMBOL, f"unknown symbol {c.symbol!r}", ids)
        mode = m.mode
        if mode is not NORMAL:
            code = RejectCode.CANCEL_ONLY if mode is CANCEL_ONLY_MODE else RejectCode.MARKET_HALTED
            return self._reject_cmd(m.symbol, c, code, f"market is {mode.value}", ids)
        o = self._find_open(m, c.account_id, c.order_id, None)
        if o is None:
            return self._reject_cmd(m.symbol, c, RejectCode.UNKNOWN_ORDER, "no such open order", ids)
        ids = (c.account_id, c.order_id, o.client_order_id)
        new_qty = c.new_qty_lots
        new_price = c.new_price_ticks
        if new_qty is None and new_price is None:
            return self._reject_cmd(m.symbol, c, RejectCode.INVALID_ORDER, "nothing to amend", ids)
        if new_price is None:
            new_price = o.price
        elif new_price <= 0 or new_price > MAX_TICKS_OR_LOTS:
            return self._reject_cmd(m.symbol, c, RejectCode.INVALID_PRICE, "price must be > 0 ticks", ids)
        if new_qty is None:
            new_qty = o.qty
        elif new_qty <= 0 or new_qty > MAX_TICKS_OR_LOTS:
            return self._reject_cmd(m.symbol, c, RejectCode.INVALID_QTY, "qty must be > 0 lots", ids)
        if new_qty <= o.filled:
            self._cancel_resting(m, o, R_AMEND)
            self._flush_book(m)
            return None
        acct = self._accounts[o.account_id]
        aid = o.account_id
        is_buy = o.is_buy
        k = m.k
        new_rem = new_qty - o.filled
        old_rem = o.remaining
        if new_price == o.price and new_rem <= old_rem:
            # Size decrease (or no change): keep the queue position.
            diff = old_rem - new_rem
            if is_buy:
                amt = diff * o.price * k
                ai = m.qi
                asset = m.quote
                lvl = m.bids.levels[o.price]
                m.touched[(o.price << 1) | 1] = None
            else:
                amt = diff * m.bpl
                ai = m.bi
                asset = m.base
                lvl = m.asks.levels[o.price]
                m.touched[o.price << 1] = None
            acct.hold[ai] -= amt
            acct.avail[ai] += amt
            lvl.total -= diff
            o.remaining = new_rem
            o.qty = new_qty
            if self._emit:
                moves = [Move(aid, asset, HOLD, -amt), Move(aid, asset, AVAILABLE, amt)] if amt else []
                self._out.append(
                    OrderAmended(
                        *self._env_m(m), o.order_id, aid, o.client_order_id, new_price, new_qty, new_rem, True,
                        moves,
                    )
                )
            else:
                m.seq += 1
            self._flush_book(m)
            return None
        # Price change or size increase: re-enter at the back of the queue, matching if it crosses.
        notional = new_price * new_qty * k
        if notional > MAX_AMOUNT:
            return self._reject_cmd(m.symbol, c, RejectCode.INVALID_QTY, "notional too large", ids)
        if notional < m.min_notional:
            return self._reject_cmd(
                m.symbol, c, RejectCode.MIN_NOTIONAL, f"notional {notional} < {m.min_notional}", ids
            )
        if m.band:
            num, den = self._band_ref(m)
            if num and abs(new_price * den - num) * 10_000 > num * m.band:
                return self._reject_cmd(m.symbol, c, RejectCode.PRICE_BAND, "price outside the band", ids)
        if is_buy:
            ak = m.asks.keys
            crosses = bool(ak) and new_price >= -ak[-1]
            old_hold = old_rem * o.price * k
            new_hold = new_rem * new_price * k
            ai = m.qi
            asset = m.quote
        else:
            bk = m.bids.keys
            crosses = bool(bk) and new_price <= bk[-1]
            old_hold = old_rem * m.bpl
            new_hold = new_rem * m.bpl
            ai = m.bi
            asset = m.base
        if crosses and o.post_only:
            return self._reject_cmd(
                m.symbol, c, RejectCode.POST_ONLY_WOULD_TAKE, "post-only order would take", ids
            )
        delta = new_hold - old_hold
        if delta > acct.avail[ai]:
            return self._reject_cmd(
                m.symbol, c, RejectCode.INSUFFICIENT_FUNDS, f"needs {delta} more {asset} available", ids
            )
        # Leave the book, re-price, re-hold.
        if is_buy:
            m.bids.remove(o)
            m.touched[(o.price << 1) | 1] = None
        else:
            m.asks.remove(o)
            m.touched[o.price << 1] = None
        acct.avail[ai] -= delta
        acct.hold[ai] += delta
        o.price = new_price
        o.qty = new_qty
        o.remaining = new_rem
        if self._emit:
            if delta > 0:
                moves = [Move(aid, asset, AVAILABLE, -delta), Move(aid, asset, HOLD, delta)]
            elif delta < 0:
                moves = [Move(aid, asset, HOLD, delta), Move(aid, asset, AVAILABLE, -delta)]
            else:
                moves = []
            self._out.append(
                OrderAmended(
                    *self._env_m(m), o.order_id, aid, o.client_order_id, new_price, new_qty, new_rem, False, moves
                )
            )
        else:
            m.seq += 1
        stop = STOP_BOOK
        rem = new_rem
        hold = new_hold
        if crosses:
            rem, hold, stop = self._match(
                m, o, acct, new_price, new_rem, _NO_BUDGET, new_price * k if is_buy else 0, new_hold
            )
        o.remaining = rem
        if rem == 0:
            self._unindex(o, acct)
            o.status = ST_FILLED
            self._retired.append(o)
        elif stop == STOP_STP:
            self._unindex(o, acct)
            acct.hold[ai] -= hold
            acct.avail[ai] += hold
            moves = [Move(aid, asset, HOLD, -hold), Move(aid, asset, AVAILABLE, hold)] if hold else []
            o.remaining = 0
            o.status = ST_CANCELED
            self._out.append(
                OrderCanceled(*self._env_m(m), o.order_id, aid, o.client_order_id, R_STP, rem, o.filled, moves)
            )
            self._retired.append(o)
        else:
            if is_buy:
                m.bids.add(o)
                m.touched[(o.price << 1) | 1] = None
            else:
                m.asks.add(o)
                m.touched[o.price << 1] = None
            o.status = ST_PARTIAL if o.filled else ST_ACCEPTED
        self._flush_book(m)
        return None

    def _cancel_all_account(self, c: CancelAllAccount) -> None:
        aid = c.account_id
        if c.symbol is not None:
            m = self._markets.get(c.symbol)
            if m is None:
                return self._reject_cmd(None, c, RejectCode.UNKNOWN_SYMBOL, "unknown symbol", ids=(aid, None, None))
            if m.mode is HARD_HALT:
                return self._reject_cmd(
                    m.symbol, c, RejectCode.MARKET_HALTED, "market is HARD_HALT", ids=(aid, None, None)
                )
            markets = [m]
        else:
            # HARD_HALT markets are frozen: their orders stay.
            markets = [
                self._markets[s] for s in sorted(self._markets) if self._markets[s].mode is not HARD_HALT
            ]
        acct = self._accounts.get(aid)
        n = 0
        if acct is not None:
            for m in markets:
                sym = m.symbol
                for oid in sorted(acct.open):
                    o = acct.open[oid]
                    if o.symbol == sym:
                        self._cancel_resting(m, o, R_USER)
                        n += 1
                self._flush_book(m)
        env = self._env_m(markets[0]) if c.symbol is not None else self._env_sys()
        self._out.append(CancelAllDone(*env, aid, n, "", ""))
        return None

    def _admin_cancel_all(self, c: AdminCancelAll) -> None:
        m = self._markets.get(c.symbol)
        if m is None:
            return self._reject_cmd(None, c, RejectCode.UNKNOWN_SYMBOL, f"unknown symbol {c.symbol!r}")
        victims = sorted(
            (o for side in (m.bids, m.asks) for lvl in side.levels.values() for o in lvl.orders.values()),
            key=lambda o: o.order_id,
        )
        for o in victims:
            self._cancel_resting(m, o, R_ADMIN)
        self._flush_book(m)
        self._out.append(CancelAllDone(*self._env_m(m), None, len(victims), c.reason, c.ticket))
        return None

    # ------------------------------------------------------------------------------------------
    # Admin, funds, markets

    def _set_mode(self, c: SetSymbolMode) -> None:
        m = self._markets.get(c.symbol)
        if m is None:
            return self._reject_cmd(None, c, RejectCode.UNKNOWN_SYMBOL, f"unknown symbol {c.symbol!r}")
        try:
            mode = SymbolMode(c.mode)
        except ValueError:
            return self._reject_cmd(m.symbol, c, RejectCode.INVALID_MODE, f"unknown mode {c.mode!r}")
        prev = m.mode
        m.mode = mode
        self._out.append(SymbolModeChanged(*self._env_m(m), mode, prev, c.reason, c.ticket))
        return None

    def _withdrawals_halt(self, c: WithdrawalsHalt) -> None:
        self._halted = bool(c.on)
        self._out.append(WithdrawalsHaltChanged(*self._env_sys(), self._halted, c.reason, c.ticket))

    def _check_funds_cmd(self, c: Deposit | Withdraw) -> RejectCode | None:
        if not isinstance(c.account_id, int) or c.account_id <= CUSTODY_ACCOUNT:
            return RejectCode.INVALID_ACCOUNT
        if not isinstance(c.asset, str) or not c.asset.isascii() or not c.asset.isalnum() or len(c.asset) > 16:
            return RejectCode.INVALID_ASSET
        if c.asset.upper() != c.asset:
            return RejectCode.INVALID_ASSET
        if not isinstance(c.amount, int) or c.amount <= 0 or c.amount > MAX_AMOUNT:
            return RejectCode.INVALID_AMOUNT
        return None

    def _deposit(self, c: Deposit) -> None:
        code = self._check_funds_cmd(c)
        if code is None:
            # Bound the asset's total supply (custody is minus everything held on the exchange) so
            # every balance and sum stays inside msgpack's 64-bit integers.
            custody = self._accounts.get(CUSTODY_ACCOUNT)
            ai = self._assets.get(c.asset)
            if custody is not None and ai is not None and custody.avail[ai] - c.amount < -MAX_AMOUNT:
                code = RejectCode.INVALID_AMOUNT
        if code is not None:
            return self._reject_cmd(None, c, code, "deposit rejected", ids=(c.account_id, None, None))
        ai = self._asset(c.asset)
        acct = self._account(c.account_id)
        custody = self._account(CUSTODY_ACCOUNT)
        custody.avail[ai] -= c.amount
        acct.avail[ai] += c.amount
        moves = [
            Move(CUSTODY_ACCOUNT, c.asset, AVAILABLE, -c.amount),
            Move(c.account_id, c.asset, AVAILABLE, c.amount),
        ]
        self._out.append(Deposited(*self._env_sys(), c.account_id, c.asset, c.amount, c.reference, moves))
        return None

    def _withdraw(self, c: Withdraw) -> None:
        if self._halted:
            return self._reject_cmd(
                None, c, RejectCode.WITHDRAWALS_HALTED, "withdrawals are halted", ids=(c.account_id, None, None)
            )
        code = self._check_funds_cmd(c)
        if code is not None:
            return self._reject_cmd(None, c, code, "withdrawal rejected", ids=(c.account_id, None, None))
        acct = self._accounts.get(c.account_id)
        ai = self._assets.get(c.asset)
        if acct is None or ai is None or acct.avail[ai] < c.amount:
            return self._reject_cmd(
                None, c, RejectCode.INSUFFICIENT_FUNDS, "not enough available", ids=(c.account_id, None, None)
            )
        custody = self._account(CUSTODY_ACCOUNT)
        acct.avail[ai] -= c.amount
        custody.avail[ai] += c.amount
        moves = [
            Move(c.account_id, c.asset, AVAILABLE, -c.amount),
            Move(CUSTODY_ACCOUNT, c.asset, AVAILABLE, c.amount),
        ]
        self._out.append(Withdrawn(*self._env_sys(), c.account_id, c.asset, c.amount, c.reference, moves))
        return None

    def _add_market(self, c: AddMarket) -> None:
        cfg = c.config
        if not isinstance(cfg, MarketConfig):
            return self._reject_cmd(None, c, RejectCode.INVALID_MARKET, "config must be a MarketConfig")
        if cfg.symbol in self._markets:
            return self._reject_cmd(None, c, RejectCode.MARKET_EXISTS, f"market {cfg.symbol!r} exists")
        problems = validate_market(cfg)
        if problems:
            return self._reject_cmd(None, c, RejectCode.INVALID_MARKET, "; ".join(problems))
        self._asset(cfg.base)
        self._asset(cfg.quote)
        m = Market(cfg, self._assets[cfg.base], self._assets[cfg.quote])
        self._markets[cfg.symbol] = m
        self._out.append(MarketAdded(*self._env_m(m), cfg))
        return None

    # ------------------------------------------------------------------------------------------
    # Checkpoint, hash, snapshot

    def stream_seqs(self) -> dict[str, int]:
        """Last event seq per stream, streams sorted by name."""
        seqs = {s: self._markets[s].seq for s in self._markets}
        seqs[SYS_STREAM] = self._sys_seq
        return {k: seqs[k] for k in sorted(seqs)}

    def totals(self) -> list[AssetTotal]:
        """Per asset: sums of available and hold over every account but custody, and custody's balance."""
        # One C-level pass per bucket (column sums over every account), then custody taken back out:
        # asset indices follow name order, so ``_asset_names`` is already the sorted name list.
        names = self._asset_names
        accounts = self._accounts
        av_all = [sum(col) for col in zip(*[a.avail for a in accounts.values()], strict=True)]
        ho_all = [sum(col) for col in zip(*[a.hold for a in accounts.values()], strict=True)]
        custody = accounts.get(CUSTODY_ACCOUNT)
        out: list[AssetTotal] = []
        for i, name in enumerate(names):
            av = av_all[i] if av_all else 0
            ho = ho_all[i] if ho_all else 0
            cu = 0
            if custody is not None:
                cav = custody.avail[i]
                cho = custody.hold[i]
                av -= cav
                ho -= cho
                cu = cav + cho
            out.append(AssetTotal(name, av, ho, cu))
        return out

    def _checkpoint(self) -> None:
        if not self._emit:
            self._sys_seq += 1  # the checkpoint's place in _sys, as _env_sys would take it
            return
        h = self.state_hash()
        seqs = self.stream_seqs()
        self._out.append(EngineCheckpoint(*self._env_sys(), self._last_seq, h, seqs, self.totals()))

    def _canonical(self) -> list[Any]:
        """The state in canonical form: only sorted lists, no dicts, zero balances omitted. Enum
        members go in as their plain value strings, looked up in ``_VALUE`` (a dict hit; the
        ``.value`` descriptor is a Python-level call, and msgspec encodes members ~4x slower)."""
        value = _VALUE
        markets: list[Any] = []
        for sym in sorted(self._markets):
            m = self._markets[sym]
            sides: list[Any] = []
            for side in (m.bids, m.asks):
                levels: list[Any] = []
                for price in side.prices_best_first():
                    levels.append(
                        [
                            price,
                            [
                                [
                                    o.order_id, o.account_id, o.client_order_id, o.qty, o.remaining, o.filled,
                                    value[o.tif], value[o.stp], o.post_only,
                                ]
                                for o in side.levels[price].orders.values()
                            ],
                        ]
                    )
                sides.append(levels)
            markets.append(
                [msgspec.to_builtins(m.cfg), value[m.mode], m.seq, m.trade_seq, m.last_price, sides[0], sides[1]]
            )
        # Asset columns: those a market trades or someone holds. Custody is minus everything else and
        # every other balance is >= 0, so custody != 0 exactly when someone holds the asset.
        names = self._asset_names
        traded = {a for m in self._markets.values() for a in (m.base, m.quote)}
        custody = self._accounts.get(CUSTODY_ACCOUNT)
        cols = [
            i for i, n in enumerate(names)
            if n in traded or (custody is not None and (custody.avail[i] or custody.hold[i]))
        ]
        full = len(cols) == len(names)
        balances: list[Any] = []
        accounts = self._accounts
        for aid in sorted(accounts):
            acct = accounts[aid]
            av = acct.avail
            ho = acct.hold
            if any(av) or any(ho):
                if full:
                    balances.append([aid, av, ho])
                else:
                    balances.append([aid, [av[i] for i in cols], [ho[i] for i in cols]])
        return [
            SNAPSHOT_FORMAT, self._last_seq, self._max_fence, self._halted, self._sys_seq, markets,
            [names[i] for i in cols], balances,
        ]

    def _state_bytes(self) -> bytes:
        return msgspec.msgpack.encode(self._canonical())

    def state_hash(self) -> str:
        """blake2b-256 (hex) of the canonical state encoding (see docs/engine.md)."""
        return hashlib.blake2b(self._state_bytes(), digest_size=32).hexdigest()

    def snapshot(self) -> bytes:
        state = self._state_bytes()
        return msgspec.msgpack.encode(
            {
                "format": SNAPSHOT_FORMAT,
                "checkpoint_every": self._ckpt_every,
                "state_hash": hashlib.blake2b(state, digest_size=32).hexdigest(),
                "state": state,
            }
        )

    @classmethod
    def from_snapshot(
        cls, data: bytes, *, checkpoint_every: int | None = None, recent_orders: int = 10_000
    ) -> Engine:
        """Rebuild an engine from :meth:`snapshot` bytes (verifying the embedded state hash).
        ``checkpoint_every`` defaults to the snapshotted engine's value."""
        outer = msgspec.msgpack.decode(data)
        if not isinstance(outer, dict) or outer.get("format") != SNAPSHOT_FORMAT:
            raise ValueError("not a spotex engine snapshot (or an unsupported format)")
        state_b = outer["state"]
        if hashlib.blake2b(state_b, digest_size=32).hexdigest() != outer["state_hash"]:
            raise ValueError("snapshot state does not match its hash")
        ce = outer["checkpoint_every"] if checkpoint_every is None else checkpoint_every
        eng = cls(checkpoint_every=ce, recent_orders=recent_orders)
        fmt, last_seq, max_fence, halted, sys_seq, markets, asset_names, balances = msgspec.msgpack.decode(state_b)
        if fmt != SNAPSHOT_FORMAT:
            raise ValueError(f"unsupported state format {fmt}")
        eng._last_seq = last_seq
        if ce:
            eng._next_ckpt = (last_seq // ce + 1) * ce
        eng._max_fence = max_fence
        eng._halted = halted
        eng._sys_seq = sys_seq
        for name in asset_names:
            eng._asset(name)
        for cfg_b, mode, seq, trade_seq, last_price, bids, asks in markets:
            cfg = msgspec.convert(cfg_b, MarketConfig)
            m = Market(cfg, eng._assets[cfg.base], eng._assets[cfg.quote])
            m.mode = SymbolMode(mode)
            m.seq = seq
            m.trade_seq = trade_seq
            m.last_price = last_price
            eng._markets[cfg.symbol] = m
            for is_buy, levels in ((True, bids), (False, asks)):
                side = m.bids if is_buy else m.asks
                for price, orders in levels:
                    for oid, aid, coid, qty, rem, filled, tif, stp, post_only in orders:
                        o = Order(
                            oid, aid, cfg.symbol, is_buy, price, qty, rem, filled, coid, LIMIT,
                            TimeInForce(tif), SelfTradePrevention(stp), _STP_CODE[stp], post_only,
                            ST_PARTIAL if filled else ST_ACCEPTED, None,
                        )
                        side.add(o)
                        eng._orders[oid] = o
        for oid in sorted(eng._orders):
            o = eng._orders[oid]
            acct = eng._account(o.account_id)
            acct.open[oid] = o
            if o.client_order_id:
                acct.coids[o.client_order_id] = o
        cols = [eng._assets[n] for n in asset_names]
        for aid, av, ho in balances:
            acct = eng._account(aid)
            for i, a, h in zip(cols, av, ho, strict=True):
                acct.avail[i] = a
                acct.hold[i] = h
        return eng

    # ------------------------------------------------------------------------------------------
    # Queries (for the edge; views are copies)

    def markets(self) -> list[MarketConfig]:
        return [self._markets[s].cfg for s in sorted(self._markets)]

    def market(self, symbol: str) -> MarketConfig | None:
        m = self._markets.get(symbol)
        return m.cfg if m is not None else None

    def mode(self, symbol: str) -> SymbolMode | None:
        m = self._markets.get(symbol)
        return m.mode if m is not None else None

    def last_trade_price(self, symbol: str) -> int | None:
        m = self._markets.get(symbol)
        return (m.last_price or None) if m is not None else None

    @property
    def withdrawals_halted(self) -> bool:
        return self._halted

    @property
    def fencing_token(self) -> int:
        """The highest fencing token seen."""
        return self._max_fence

    def stream_seq(self, stream: str) -> int:
        if stream == SYS_STREAM:
            return self._sys_seq
        m = self._markets.get(stream)
        return m.seq if m is not None else 0

    def balances(self, account_id: int) -> dict[str, BalanceView]:
        """Non-zero balances of an account by asset (sorted)."""
        acct = self._accounts.get(account_id)
        if acct is None:
            return {}
        out: dict[str, BalanceView] = {}
        for name in sorted(self._assets):
            i = self._assets[name]
            if acct.avail[i] or acct.hold[i]:
                out[name] = BalanceView(name, acct.avail[i], acct.hold[i])
        return out

    def balance(self, account_id: int, asset: str) -> BalanceView:
        acct = self._accounts.get(account_id)
        i = self._assets.get(asset)
        if acct is None or i is None:
            return BalanceView(asset, 0, 0)
        return BalanceView(asset, acct.avail[i], acct.hold[i])

    @staticmethod
    def _view(o: Order) -> OrderView:
        return OrderView(
            order_id=o.order_id,
            account_id=o.account_id,
            symbol=o.symbol,
            client_order_id=o.client_order_id,
            side=BUY if o.is_buy else SELL,
            type=o.type,
            tif=o.tif,
            price_ticks=o.price if o.type == LIMIT else None,
            qty_lots=o.qty,
            filled_qty_lots=o.filled,
            remaining_qty_lots=o.remaining,
            status=o.status,
            post_only=o.post_only,
            stp=o.stp,
            quote_amount=o.quote_amount,
        )

    def open_orders(self, account_id: int, symbol: str | None = None) -> list[OrderView]:
        acct = self._accounts.get(account_id)
        if acct is None:
            return []
        return [
            self._view(acct.open[oid])
            for oid in sorted(acct.open)
            if symbol is None or acct.open[oid].symbol == symbol
        ]

    def order(self, order_id: int) -> OrderView | None:
        """An open order, or a recently terminal one (bounded cache, not part of the state)."""
        self._index_retired()
        o = self._orders.get(order_id) or self._recent.get(order_id)
        return self._view(o) if o is not None else None

    def order_by_client_id(self, account_id: int, client_order_id: str) -> OrderView | None:
        acct = self._accounts.get(account_id)
        o = acct.coids.get(client_order_id) if acct is not None else None
        if o is None:
            self._index_retired()
            oid = self._recent_coid.get((account_id, client_order_id))
            o = self._recent.get(oid) if oid is not None else None
        return self._view(o) if o is not None else None

    def book(self, symbol: str, depth: int = 20) -> BookView | None:
        m = self._markets.get(symbol)
        if m is None:
            return None
        return BookView(symbol=symbol, seq=m.seq, mode=m.mode, bids=m.bids.depth(depth), asks=m.asks.depth(depth))

    def open_order_count(self) -> int:
        return len(self._orders)

    def is_open(self, order_id: int) -> bool:
        return order_id in self._orders

    def accounts(self) -> list[int]:
        """Ids of every account the engine knows (sorted), custody and fee accounts included."""
        return sorted(self._accounts)
