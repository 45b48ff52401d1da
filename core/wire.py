"""The wire contract of spotex: commands, events, market configuration and money helpers.

Everything here is a frozen msgspec Struct. Commands and events are tagged unions (tag field ``t``,
tag = class name), msgpack on the bus and in the WAL, JSON outside. Money is integers everywhere:

- prices in *ticks* of the market's ``tick_size``;
- quantities in *lots* of the market's ``lot_size``;
- balances, amounts and fees in each asset's *minor units* (``10**-scale`` of the asset).

For a market, ``notional_quote_minor = price_ticks * qty_lots * quote_per_tick_lot`` and
``base_minor = qty_lots * base_per_lot``; both factors are integers >= 1 (validated by
:func:`validate_market`). Decimal strings exist only at the API edge, through the helpers at the
bottom of this module, which raise :class:`PrecisionError` (a ``ValueError``) for wrong precision.

Event envelope: every event carries ``event_id, symbol, seq, occurred_at, correlation_id,
causation_id, fencing_token``. ``symbol`` is the event's *stream*: a market symbol such as
``BTC-USDT``, or ``_sys`` for events tied to no market (deposits, withdrawals, the withdrawals halt,
checkpoints, rejections of commands naming no known market). ``seq`` is contiguous from 1 per stream
and ``event_id == f"{symbol}:{seq}"`` (the JetStream ``Nats-Msg-Id``).

Balance-changing events carry ``moves``: explicit double-entry postings for the ledger. Per event
and per asset the deltas sum to zero. ``CUSTODY_ACCOUNT`` (0) is the outside world (deposits debit
it, so it goes negative), ``FEE_ACCOUNT`` (1) collects fees.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final

import msgspec

__all__ = [
    "CUSTODY_ACCOUNT",
    "FEE_ACCOUNT",
    "MAX_AMOUNT",
    "SYS_STREAM",
    "AddMarket",
    "AdminCancelAll",
    "AmendOrder",
    "AssetTotal",
    "BookDelta",
    "Bucket",
    "CancelAllAccount",
    "CancelAllDone",
    "CancelOrder",
    "CancelReason",
    "Command",
    "CommandRejected",
    "Deposit",
    "Deposited",
    "EngineCheckpoint",
    "Event",
    "LevelChange",
    "MarketAdded",
    "MarketConfig",
    "Move",
    "OrderAccepted",
    "OrderAmended",
    "OrderCanceled",
    "OrderRejected",
    "OrderStatus",
    "OrderType",
    "PlaceOrder",
    "PrecisionError",
    "RejectCode",
    "SelfTradePrevention",
    "SequencedCommand",
    "SetSymbolMode",
    "Side",
    "SymbolMode",
    "SymbolModeChanged",
    "TimeInForce",
    "TradeExecuted",
    "Withdraw",
    "WithdrawalsHalt",
    "WithdrawalsHaltChanged",
    "Withdrawn",
    "amount_to_minor",
    "decode_command",
    "decode_event",
    "decode_events",
    "decode_request",
    "encode_command",
    "encode_event",
    "encode_events",
    "encode_request",
    "fee_for",
    "lots_to_qty",
    "market_config",
    "market_config_diff",
    "minor_to_amount",
    "price_to_ticks",
    "qty_to_lots",
    "ticks_to_price",
    "validate_market",
]

CUSTODY_ACCOUNT: Final = 0
FEE_ACCOUNT: Final = 1
SYS_STREAM: Final = "_sys"
# Largest single amount (price, quantity, notional, deposit, balance) the engine accepts: keeps every
# integer on the wire inside msgpack's signed 64-bit range with headroom for sums.
MAX_AMOUNT: Final = 2**62


# --------------------------------------------------------------------------------------------------
# Enumerations (encoded by value)


class Side(StrEnum):
    BUY = "BUY"
    SELL = "SELL"


class OrderType(StrEnum):
    LIMIT = "LIMIT"
    MARKET = "MARKET"


class TimeInForce(StrEnum):
    GTC = "GTC"
    IOC = "IOC"
    FOK = "FOK"


class SelfTradePrevention(StrEnum):
    """Applied when a taker would trade against a resting order of the same account."""

    EXPIRE_TAKER = "EXPIRE_TAKER"
    EXPIRE_MAKER = "EXPIRE_MAKER"
    EXPIRE_BOTH = "EXPIRE_BOTH"
    NONE = "NONE"


class SymbolMode(StrEnum):
    NORMAL = "NORMAL"
    CANCEL_ONLY = "CANCEL_ONLY"
    SOFT_HALT = "SOFT_HALT"
    HARD_HALT = "HARD_HALT"


class OrderStatus(StrEnum):
    NEW = "NEW"
    ACCEPTED = "ACCEPTED"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELED = "CANCELED"
    REJECTED = "REJECTED"


class CancelReason(StrEnum):
    USER = "USER"  # CancelOrder or CancelAllAccount
    ADMIN = "ADMIN"  # AdminCancelAll
    EXPIRED_IOC = "EXPIRED_IOC"  # unfilled rest of an IOC limit or of a market order
    STP = "STP"  # self-trade prevention expired this order (taker or maker)
    AMEND = "AMEND"  # amended to a quantity <= its filled quantity


class RejectCode(StrEnum):
    FENCING_TOKEN = "FENCING_TOKEN"
    UNKNOWN_SYMBOL = "UNKNOWN_SYMBOL"
    MARKET_HALTED = "MARKET_HALTED"
    CANCEL_ONLY = "CANCEL_ONLY"
    INVALID_ACCOUNT = "INVALID_ACCOUNT"
    INVALID_ORDER = "INVALID_ORDER"
    INVALID_PRICE = "INVALID_PRICE"
    INVALID_QTY = "INVALID_QTY"
    TICK_SIZE = "TICK_SIZE"  # raised at the edge by price_to_ticks (never by the engine: it sees ticks)
    LOT_SIZE = "LOT_SIZE"  # raised at the edge by qty_to_lots
    MIN_NOTIONAL = "MIN_NOTIONAL"
    PRICE_BAND = "PRICE_BAND"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    POST_ONLY_WOULD_TAKE = "POST_ONLY_WOULD_TAKE"
    FOK_UNFILLABLE = "FOK_UNFILLABLE"
    DUPLICATE_CLIENT_ORDER_ID = "DUPLICATE_CLIENT_ORDER_ID"
    UNKNOWN_ORDER = "UNKNOWN_ORDER"
    WITHDRAWALS_HALTED = "WITHDRAWALS_HALTED"
    INVALID_AMOUNT = "INVALID_AMOUNT"
    INVALID_ASSET = "INVALID_ASSET"
    INVALID_MODE = "INVALID_MODE"
    MARKET_EXISTS = "MARKET_EXISTS"
    INVALID_MARKET = "INVALID_MARKET"


class Bucket(StrEnum):
    AVAILABLE = "available"
    HOLD = "hold"


# --------------------------------------------------------------------------------------------------
# Market configuration


class MarketConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A market. Use :func:`market_config` to derive the integer factors from decimal sizes.

    ``tick_size`` / ``lot_size`` are decimal strings in quote-per-base and base units;
    ``base_per_lot = lot_size * 10**base_scale`` and
    ``quote_per_tick_lot = tick_size * lot_size * 10**quote_scale`` must both be integers >= 1.
    """

    symbol: str
    base: str
    quote: str
    base_scale: int
    quote_scale: int
    tick_size: str
    lot_size: str
    base_per_lot: int
    quote_per_tick_lot: int
    min_notional: int = 0  # quote minor units; a LIMIT needs price*qty*quote_per_tick_lot >= this
    price_band_bps: int = 0  # 0 = no band
    maker_fee_bps: int = 0
    taker_fee_bps: int = 0


# --------------------------------------------------------------------------------------------------
# Commands


class _Cmd(msgspec.Struct, frozen=True, kw_only=True, tag=True, tag_field="t"):
    pass


class PlaceOrder(_Cmd, frozen=True):
    """LIMIT needs ``price_ticks`` and ``qty_lots``. MARKET has no price; a market BUY gives either
    ``qty_lots`` (base) or ``quote_amount`` (quote minor units to spend), a market SELL ``qty_lots``.
    A MARKET order never rests: tif GTC is treated as IOC. ``client_order_id`` "" means none."""

    account_id: int
    symbol: str
    client_order_id: str
    side: Side
    type: OrderType = OrderType.LIMIT
    tif: TimeInForce = TimeInForce.GTC
    price_ticks: int | None = None
    qty_lots: int | None = None
    quote_amount: int | None = None
    post_only: bool = False
    stp: SelfTradePrevention = SelfTradePrevention.EXPIRE_TAKER


class CancelOrder(_Cmd, frozen=True):
    """Cancel by ``order_id`` or, when it is None, by ``client_order_id``."""

    account_id: int
    symbol: str
    order_id: int | None = None
    client_order_id: str | None = None


class AmendOrder(_Cmd, frozen=True):
    """``new_qty_lots`` is the new TOTAL quantity (filled included); ``new_price_ticks`` the new price."""

    account_id: int
    symbol: str
    order_id: int
    new_qty_lots: int | None = None
    new_price_ticks: int | None = None


class CancelAllAccount(_Cmd, frozen=True):
    account_id: int
    symbol: str | None = None


class AdminCancelAll(_Cmd, frozen=True):
    symbol: str
    reason: str = ""
    ticket: str = ""


class SetSymbolMode(_Cmd, frozen=True):
    symbol: str
    mode: SymbolMode
    reason: str = ""
    ticket: str = ""


class WithdrawalsHalt(_Cmd, frozen=True):
    on: bool
    reason: str = ""
    ticket: str = ""


class Deposit(_Cmd, frozen=True):
    account_id: int
    asset: str
    amount: int  # minor units
    reference: str = ""  # e.g. chain transaction id, carried to the event


class Withdraw(_Cmd, frozen=True):
    account_id: int
    asset: str
    amount: int
    reference: str = ""


class AddMarket(_Cmd, frozen=True):
    config: MarketConfig
    reason: str = ""
    ticket: str = ""


Command = (
    PlaceOrder
    | CancelOrder
    | AmendOrder
    | CancelAllAccount
    | AdminCancelAll
    | SetSymbolMode
    | WithdrawalsHalt
    | Deposit
    | Withdraw
    | AddMarket
)


class SequencedCommand(msgspec.Struct, frozen=True, kw_only=True):
    """A command as the sequencer stored it in the WAL. ``ts_ms`` is the only clock the engine sees."""

    seq: int
    ts_ms: int
    fencing_token: int
    correlation_id: str
    command: Command


# --------------------------------------------------------------------------------------------------
# Events


class Move(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One posting: ``delta`` minor units of ``asset`` on ``account_id``'s ``bucket``."""

    account_id: int
    asset: str
    bucket: Bucket
    delta: int


class LevelChange(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """The new total of one price level after a command; ``qty_lots == 0`` means removed."""

    side: Side
    price_ticks: int
    qty_lots: int


class AssetTotal(msgspec.Struct, frozen=True, gc=False):
    """Sums over every account except custody; ``custody`` is the custody account's balance, so
    ``available + hold + custody == 0`` always."""

    asset: str
    available: int
    hold: int
    custody: int


class _Evt(msgspec.Struct, frozen=True, tag=True, tag_field="t", gc=False):
    event_id: str
    symbol: str
    seq: int
    occurred_at: int
    correlation_id: str
    causation_id: str
    fencing_token: int


class MarketAdded(_Evt, frozen=True):
    config: MarketConfig


class OrderAccepted(_Evt, frozen=True):
    order_id: int
    account_id: int
    client_order_id: str
    side: Side
    type: OrderType
    tif: TimeInForce
    price_ticks: int | None
    qty_lots: int | None
    quote_amount: int | None
    post_only: bool
    stp: SelfTradePrevention
    moves: list[Move]


class OrderRejected(_Evt, frozen=True):
    account_id: int
    client_order_id: str
    code: RejectCode
    detail: str


class OrderCanceled(_Evt, frozen=True):
    order_id: int
    account_id: int
    client_order_id: str
    reason: CancelReason
    canceled_qty_lots: int
    filled_qty_lots: int
    moves: list[Move]


class OrderAmended(_Evt, frozen=True):
    order_id: int
    account_id: int
    client_order_id: str
    price_ticks: int
    qty_lots: int
    remaining_qty_lots: int
    priority_kept: bool
    moves: list[Move]


class TradeExecuted(_Evt, frozen=True):
    """One fill. Fees are taken from the asset each side receives (the buyer pays in base, the seller
    in quote). An order whose ``*_remaining_lots`` is 0 is FILLED."""

    trade_id: int
    taker_order_id: int
    taker_account_id: int
    taker_side: Side
    maker_order_id: int
    maker_account_id: int
    price_ticks: int
    qty_lots: int
    base_amount: int
    quote_amount: int
    taker_fee: int
    taker_fee_asset: str
    maker_fee: int
    maker_fee_asset: str
    taker_remaining_lots: int
    maker_remaining_lots: int
    moves: list[Move]


class BookDelta(_Evt, frozen=True):
    """Levels changed by one command, in the order they were first touched."""

    levels: list[LevelChange]


class CancelAllDone(_Evt, frozen=True):
    """Closes a CancelAllAccount (``account_id`` set) or AdminCancelAll (``account_id`` None)."""

    account_id: int | None
    canceled: int
    reason: str
    ticket: str


class SymbolModeChanged(_Evt, frozen=True):
    mode: SymbolMode
    previous_mode: SymbolMode
    reason: str
    ticket: str


class WithdrawalsHaltChanged(_Evt, frozen=True):
    on: bool
    reason: str
    ticket: str


class Deposited(_Evt, frozen=True):
    account_id: int
    asset: str
    amount: int
    reference: str
    moves: list[Move]


class Withdrawn(_Evt, frozen=True):
    account_id: int
    asset: str
    amount: int
    reference: str
    moves: list[Move]


class CommandRejected(_Evt, frozen=True):
    """Rejection of any command other than PlaceOrder; ``command`` is the command's tag."""

    command: str
    code: RejectCode
    account_id: int | None
    order_id: int | None
    client_order_id: str | None
    detail: str


class EngineCheckpoint(_Evt, frozen=True):
    """Emitted on ``_sys`` after every N-th command. ``state_hash`` and ``stream_seqs`` describe the
    state after command ``last_seq`` and before this event (so ``stream_seqs['_sys'] == seq - 1``)."""

    last_seq: int
    state_hash: str
    stream_seqs: dict[str, int]
    totals: list[AssetTotal]


Event = (
    MarketAdded
    | OrderAccepted
    | OrderRejected
    | OrderCanceled
    | OrderAmended
    | TradeExecuted
    | BookDelta
    | CancelAllDone
    | SymbolModeChanged
    | WithdrawalsHaltChanged
    | Deposited
    | Withdrawn
    | CommandRejected
    | EngineCheckpoint
)


# --------------------------------------------------------------------------------------------------
# Codec (cached encoder/decoders)

_encoder = msgspec.msgpack.Encoder()
_seq_cmd_decoder = msgspec.msgpack.Decoder(SequencedCommand)
_cmd_decoder: msgspec.msgpack.Decoder[Command] = msgspec.msgpack.Decoder(Command)
_evt_decoder: msgspec.msgpack.Decoder[Event] = msgspec.msgpack.Decoder(Event)
_evts_decoder: msgspec.msgpack.Decoder[list[Event]] = msgspec.msgpack.Decoder(list[Event])


def encode_command(cmd: SequencedCommand) -> bytes:
    """A sequenced command as stored in the WAL."""
    return _encoder.encode(cmd)


def decode_command(data: bytes) -> SequencedCommand:
    return _seq_cmd_decoder.decode(data)


def encode_request(cmd: Command) -> bytes:
    """A bare command as the edge publishes it, before sequencing."""
    return _encoder.encode(cmd)


def decode_request(data: bytes) -> Command:
    return _cmd_decoder.decode(data)


def encode_event(evt: Event) -> bytes:
    return _encoder.encode(evt)


def decode_event(data: bytes) -> Event:
    return _evt_decoder.decode(data)


def encode_events(evts: list[Event]) -> bytes:
    return _encoder.encode(evts)


def decode_events(data: bytes) -> list[Event]:
    return _evts_decoder.decode(data)


# --------------------------------------------------------------------------------------------------
# Fees


def fee_for(received: int, bps: int) -> int:
    """Fee on ``received`` minor units: ceil(received * bps / 10_000), never more than ``received``.

    Rounding up is in the exchange's favour and makes tiny fills pay at least one minor unit when the
    rate is not zero.
    """
    if bps <= 0 or received <= 0:
        return 0
    fee = (received * bps + 9_999) // 10_000
    return fee if fee < received else received


# --------------------------------------------------------------------------------------------------
# Decimal strings <-> integers (API edge only)

_DEC_RE = re.compile(r"(\d{1,30})(?:\.(\d{1,30}))?")
_SYMBOL_RE = re.compile(r"[A-Z0-9]{1,16}-[A-Z0-9]{1,16}")
_ASSET_RE = re.compile(r"[A-Z0-9]{1,16}")


class PrecisionError(ValueError):
    """A decimal string that is malformed or not a whole number of units. ``code`` is the reject code
    the edge should answer with (TICK_SIZE, LOT_SIZE, INVALID_PRICE, INVALID_QTY, INVALID_AMOUNT)."""

    def __init__(self, message: str, code: RejectCode) -> None:
        super().__init__(message)
        self.code = code


def _parse(value: str, what: str, code: RejectCode) -> tuple[int, int]:
    """'65000.10' -> (6500010, 2): the digits as an integer and the number of decimals."""
    if not isinstance(value, str):
        raise PrecisionError(f"{what} must be a decimal string, got {type(value).__name__}", code)
    m = _DEC_RE.fullmatch(value)
    if m is None:
        raise PrecisionError(f"{what} {value!r} is not a plain non-negative decimal like '123.45'", code)
    ip, fp = m.group(1), m.group(2) or ""
    return int(ip + fp), len(fp)


@functools.lru_cache(maxsize=1024)
def _unit(unit: str) -> tuple[int, int]:
    """``_parse`` of a market's tick, lot or asset unit: a handful of strings, parsed once each (every
    order answer formats five or more amounts)."""
    return _parse(unit, "unit", RejectCode.INVALID_AMOUNT)


def _units(value: str, unit: str, what: str, code: RejectCode) -> int:
    v, vs = _parse(value, what, code)
    try:
        u, us = _unit(unit)
    except PrecisionError as exc:
        raise PrecisionError(str(exc), code) from None
    if u == 0:
        raise ValueError(f"unit {unit!r} must be positive")
    # value/unit = (v / 10**vs) / (u / 10**us) = v*10**us / (u*10**vs); must be a whole number.
    num = v * int(10**us)
    den = u * int(10**vs)
    q, r = divmod(num, den)
    if r:
        raise PrecisionError(f"{what} {value!r} is not a multiple of {unit}", code)
    return int(q)


def _format(units: int, unit: str) -> str:
    u, us = _unit(unit)
    n = units * u
    sign = "-" if n < 0 else ""
    n = abs(n)
    if us == 0:
        return f"{sign}{n}"
    s = str(n).rjust(us + 1, "0")
    return f"{sign}{s[:-us]}.{s[-us:]}"


def price_to_ticks(price: str, cfg: MarketConfig) -> int:
    """'65000.10' -> 6500010 for tick_size '0.01'. Raises PrecisionError (TICK_SIZE / INVALID_PRICE)."""
    ticks = _units(price, cfg.tick_size, "price", RejectCode.TICK_SIZE)
    if ticks <= 0:
        raise PrecisionError(f"price {price!r} must be positive", RejectCode.INVALID_PRICE)
    return ticks


def qty_to_lots(qty: str, cfg: MarketConfig) -> int:
    """'0.001' -> 100 for lot_size '0.00001'. Raises PrecisionError (LOT_SIZE / INVALID_QTY)."""
    lots = _units(qty, cfg.lot_size, "quantity", RejectCode.LOT_SIZE)
    if lots <= 0:
        raise PrecisionError(f"quantity {qty!r} must be positive", RejectCode.INVALID_QTY)
    return lots


def ticks_to_price(ticks: int, cfg: MarketConfig) -> str:
    """6500010 -> '65000.10' (as many decimals as the tick size has)."""
    return _format(ticks, cfg.tick_size)


def lots_to_qty(lots: int, cfg: MarketConfig) -> str:
    return _format(lots, cfg.lot_size)


def amount_to_minor(amount: str, scale: int) -> int:
    """'12.5' with scale 6 -> 12500000. Raises PrecisionError (INVALID_AMOUNT) beyond ``scale`` decimals."""
    if scale < 0:
        raise ValueError("scale must be >= 0")
    return _units(amount, "0." + "0" * (scale - 1) + "1" if scale else "1", "amount", RejectCode.INVALID_AMOUNT)


def minor_to_amount(minor: int, scale: int) -> str:
    """12500000 with scale 6 -> '12.500000'."""
    if scale < 0:
        raise ValueError("scale must be >= 0")
    return _format(minor, "0." + "0" * (scale - 1) + "1" if scale else "1")


def _factor(size: str, scale: int, what: str) -> int:
    v, vs = _parse(size, what, RejectCode.INVALID_MARKET)
    q, r = divmod(v * int(10**scale), int(10**vs))
    if r or q < 1:
        raise ValueError(f"{what} {size!r} is not a whole number >= 1 of minor units at scale {scale}")
    return int(q)


def market_config_diff(ours: MarketConfig, theirs: MarketConfig | Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields where two definitions of one market differ, as ``{field: (ours, theirs)}``; empty when
    they map prices, quantities and fees the same way. ``theirs`` may be a MarketConfig or its
    decoded map (a core query answer); a field it lacks counts as a difference."""
    other = msgspec.structs.asdict(theirs) if isinstance(theirs, MarketConfig) else dict(theirs)
    out: dict[str, tuple[Any, Any]] = {}
    for name in MarketConfig.__struct_fields__:
        a, b = getattr(ours, name), other.get(name, _MISSING)
        if a != b:
            out[name] = (a, None if b is _MISSING else b)
    return out


_MISSING = object()


def market_config(
    symbol: str,
    base: str,
    quote: str,
    *,
    base_scale: int,
    quote_scale: int,
    tick_size: str,
    lot_size: str,
    min_notional: int = 0,
    price_band_bps: int = 0,
    maker_fee_bps: int = 0,
    taker_fee_bps: int = 0,
) -> MarketConfig:
    """Build a validated MarketConfig, deriving ``base_per_lot`` and ``quote_per_tick_lot``."""
    v_t, s_t = _parse(tick_size, "tick_size", RejectCode.INVALID_MARKET)
    v_l, s_l = _parse(lot_size, "lot_size", RejectCode.INVALID_MARKET)
    base_per_lot = _factor(lot_size, base_scale, "lot_size")
    q, r = divmod(v_t * v_l * 10**quote_scale, 10 ** (s_t + s_l))
    if r or q < 1:
        raise ValueError(
            f"tick_size*lot_size = {tick_size}*{lot_size} is not a whole number >= 1 of quote minor units "
            f"at quote_scale {quote_scale}"
        )
    cfg = MarketConfig(
        symbol=symbol,
        base=base,
        quote=quote,
        base_scale=base_scale,
        quote_scale=quote_scale,
        tick_size=tick_size,
        lot_size=lot_size,
        base_per_lot=base_per_lot,
        quote_per_tick_lot=q,
        min_notional=min_notional,
        price_band_bps=price_band_bps,
        maker_fee_bps=maker_fee_bps,
        taker_fee_bps=taker_fee_bps,
    )
    problems = validate_market(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


def validate_market(cfg: MarketConfig) -> list[str]:
    """Problems with a market config (empty list = valid). The engine rejects AddMarket with
    INVALID_MARKET when this is not empty."""
    p: list[str] = []
    if not isinstance(cfg.symbol, str) or _SYMBOL_RE.fullmatch(cfg.symbol) is None:
        p.append(f"symbol {cfg.symbol!r} must look like BASE-QUOTE in [A-Z0-9]")
    for name in ("base", "quote"):
        v = getattr(cfg, name)
        if not isinstance(v, str) or _ASSET_RE.fullmatch(v) is None:
            p.append(f"{name} {v!r} must match [A-Z0-9]{{1,16}}")
    if cfg.base == cfg.quote:
        p.append("base and quote must differ")
    for name in ("base_scale", "quote_scale"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or not 0 <= v <= 18:
            p.append(f"{name} must be an integer in [0, 18]")
    for name in ("base_per_lot", "quote_per_tick_lot"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 10**15:
            p.append(f"{name} must be an integer in [1, 1e15]")
    if not isinstance(cfg.min_notional, int) or not 0 <= cfg.min_notional <= MAX_AMOUNT:
        p.append("min_notional must be an integer >= 0")
    if not isinstance(cfg.price_band_bps, int) or not 0 <= cfg.price_band_bps <= 10_000:
        p.append("price_band_bps must be in [0, 10000] (0 = no band)")
    for name in ("maker_fee_bps", "taker_fee_bps"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or not 0 <= v <= 10_000:
            p.append(f"{name} must be in [0, 10000]")
    if not p:
        try:
            if _factor(cfg.lot_size, cfg.base_scale, "lot_size") != cfg.base_per_lot:
                p.append("base_per_lot != lot_size * 10**base_scale")
            v_t, s_t = _parse(cfg.tick_size, "tick_size", RejectCode.INVALID_MARKET)
            v_l, s_l = _parse(cfg.lot_size, "lot_size", RejectCode.INVALID_MARKET)
            q, r = divmod(v_t * v_l * 10**cfg.quote_scale, 10 ** (s_t + s_l))
            if r or q != cfg.quote_per_tick_lot:
                p.append("quote_per_tick_lot != tick_size * lot_size * 10**quote_scale")
        except ValueError as exc:
            p.append(str(exc))
    return p
