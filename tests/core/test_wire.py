"""Wire contract: msgpack round trips of every command and event, decimal helpers, market config."""

from __future__ import annotations

import msgspec
import pytest

from core import wire
from core.wire import (
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
    CommandRejected,
    Deposit,
    Deposited,
    EngineCheckpoint,
    LevelChange,
    MarketAdded,
    MarketConfig,
    Move,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderRejected,
    OrderType,
    PlaceOrder,
    PrecisionError,
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
    amount_to_minor,
    decode_command,
    decode_event,
    decode_events,
    decode_request,
    encode_command,
    encode_event,
    encode_events,
    encode_request,
    fee_for,
    lots_to_qty,
    market_config,
    minor_to_amount,
    price_to_ticks,
    qty_to_lots,
    ticks_to_price,
    validate_market,
)

CFG = market_config(
    "BTC-USDT", "BTC", "USDT", base_scale=8, quote_scale=8, tick_size="0.01", lot_size="0.00001",
    min_notional=10**9, price_band_bps=500, maker_fee_bps=10, taker_fee_bps=20,
)

COMMANDS = [
    PlaceOrder(account_id=1000, symbol="BTC-USDT", client_order_id="a", side=Side.BUY, price_ticks=6500010,
               qty_lots=100, post_only=True, stp=SelfTradePrevention.EXPIRE_BOTH),
    PlaceOrder(account_id=1000, symbol="BTC-USDT", client_order_id="", side=Side.BUY, type=OrderType.MARKET,
               tif=TimeInForce.IOC, quote_amount=10**10),
    PlaceOrder(account_id=1000, symbol="BTC-USDT", client_order_id="f", side=Side.SELL, tif=TimeInForce.FOK,
               price_ticks=1, qty_lots=1, stp=SelfTradePrevention.NONE),
    CancelOrder(account_id=1000, symbol="BTC-USDT", order_id=7),
    CancelOrder(account_id=1000, symbol="BTC-USDT", client_order_id="a"),
    AmendOrder(account_id=1000, symbol="BTC-USDT", order_id=7, new_qty_lots=5),
    AmendOrder(account_id=1000, symbol="BTC-USDT", order_id=7, new_price_ticks=5, new_qty_lots=9),
    CancelAllAccount(account_id=1000),
    CancelAllAccount(account_id=1000, symbol="BTC-USDT"),
    AdminCancelAll(symbol="BTC-USDT", reason="incident", ticket="INC-1"),
    SetSymbolMode(symbol="BTC-USDT", mode=SymbolMode.HARD_HALT, reason="split brain", ticket="INC-2"),
    WithdrawalsHalt(on=True, reason="invariant", ticket="INC-3"),
    Deposit(account_id=1000, asset="USDT", amount=10**12, reference="0xabc"),
    Withdraw(account_id=1000, asset="BTC", amount=5),
    AddMarket(config=CFG, reason="listing", ticket="CHG-1"),
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: type(c).__name__)
def test_command_round_trip(cmd: wire.Command) -> None:
    sc = SequencedCommand(seq=42, ts_ms=1_700_000_000_123, fencing_token=3, correlation_id="corr", command=cmd)
    data = encode_command(sc)
    assert decode_command(data) == sc
    assert decode_request(encode_request(cmd)) == cmd
    # tagged: the tag is the class name
    assert msgspec.msgpack.decode(encode_request(cmd))["t"] == type(cmd).__name__


def _env(seq: int, stream: str = "BTC-USDT") -> dict[str, object]:
    return {
        "event_id": f"{stream}:{seq}",
        "symbol": stream,
        "seq": seq,
        "occurred_at": 1_700_000_000_123,
        "correlation_id": "corr",
        "causation_id": "cmd:42",
        "fencing_token": 3,
    }


MOVES = [Move(1000, "USDT", Bucket.AVAILABLE, -5), Move(1000, "USDT", Bucket.HOLD, 5)]

EVENTS = [
    MarketAdded(**_env(1), config=CFG),
    OrderAccepted(**_env(2), order_id=42, account_id=1000, client_order_id="a", side=Side.BUY,
                  type=OrderType.LIMIT, tif=TimeInForce.GTC, price_ticks=1, qty_lots=5, quote_amount=None,
                  post_only=False, stp=SelfTradePrevention.EXPIRE_TAKER, moves=MOVES),
    OrderRejected(**_env(3), account_id=1000, client_order_id="a", code=RejectCode.PRICE_BAND, detail="x"),
    OrderCanceled(**_env(4), order_id=42, account_id=1000, client_order_id="", reason=CancelReason.STP,
                  canceled_qty_lots=3, filled_qty_lots=2, moves=MOVES),
    OrderAmended(**_env(5), order_id=42, account_id=1000, client_order_id="a", price_ticks=3, qty_lots=4,
                 remaining_qty_lots=4, priority_kept=True, moves=[]),
    TradeExecuted(**_env(6), trade_id=1, taker_order_id=43, taker_account_id=1001, taker_side=Side.SELL,
                  maker_order_id=42, maker_account_id=1000, price_ticks=3, qty_lots=1, base_amount=1000,
                  quote_amount=30, taker_fee=1, taker_fee_asset="USDT", maker_fee=1, maker_fee_asset="BTC",
                  taker_remaining_lots=0, maker_remaining_lots=3, moves=MOVES),
    BookDelta(**_env(7), levels=[LevelChange(Side.BUY, 3, 0), LevelChange(Side.SELL, 4, 10)]),
    CancelAllDone(**_env(8), account_id=None, canceled=3, reason="r", ticket="t"),
    SymbolModeChanged(**_env(9), mode=SymbolMode.CANCEL_ONLY, previous_mode=SymbolMode.NORMAL, reason="r",
                      ticket="t"),
    WithdrawalsHaltChanged(**_env(1, "_sys"), on=True, reason="r", ticket="t"),
    Deposited(**_env(2, "_sys"), account_id=1000, asset="USDT", amount=5, reference="tx", moves=MOVES),
    Withdrawn(**_env(3, "_sys"), account_id=1000, asset="USDT", amount=5, reference="", moves=MOVES),
    CommandRejected(**_env(4, "_sys"), command="Withdraw", code=RejectCode.WITHDRAWALS_HALTED, account_id=1000,
                    order_id=None, client_order_id=None, detail="halted"),
    EngineCheckpoint(**_env(5, "_sys"), last_seq=42, state_hash="ab" * 32, stream_seqs={"BTC-USDT": 9, "_sys": 4},
                     totals=[AssetTotal("USDT", 10, 5, -15)]),
]


def test_every_event_type_is_covered() -> None:
    assert {type(e) for e in EVENTS} == set(wire.Event.__args__)  # type: ignore[attr-defined]
    assert {type(c) for c in COMMANDS} == set(wire.Command.__args__)  # type: ignore[attr-defined]


@pytest.mark.parametrize("evt", EVENTS, ids=lambda e: type(e).__name__)
def test_event_round_trip(evt: wire.Event) -> None:
    assert decode_event(encode_event(evt)) == evt
    assert evt.event_id == f"{evt.symbol}:{evt.seq}"
    # JSON outside works too (same tagged shape)
    assert msgspec.json.decode(msgspec.json.encode(evt), type=wire.Event) == evt


def test_event_batch_round_trip() -> None:
    assert decode_events(encode_events(EVENTS)) == EVENTS


def test_compact_moves_and_levels() -> None:
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(MOVES[0])) == [1000, "USDT", "available", -5]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(LevelChange(Side.BUY, 3, 0))) == ["BUY", 3, 0]


def test_decode_rejects_bad_enum() -> None:
    raw = msgspec.msgpack.encode({"t": "CancelAllAccount", "account_id": "x"})
    with pytest.raises(msgspec.ValidationError):
        decode_request(raw)
    raw = msgspec.msgpack.encode(
        {"t": "PlaceOrder", "account_id": 1, "symbol": "S", "client_order_id": "", "side": "UP"}
    )
    with pytest.raises(msgspec.ValidationError):
        decode_request(raw)


def test_commands_are_frozen() -> None:
    with pytest.raises(AttributeError):
        COMMANDS[0].qty_lots = 1  # type: ignore[misc]


# ---------------------------------------------------------------- decimal helpers


def test_price_and_qty_conversion() -> None:
    assert price_to_ticks("65000.10", CFG) == 6500010
    assert price_to_ticks("65000.1", CFG) == 6500010
    assert price_to_ticks("65000", CFG) == 6500000
    assert price_to_ticks("0.01", CFG) == 1
    assert price_to_ticks("65000.1000", CFG) == 6500010  # trailing zeros beyond the tick are fine
    assert qty_to_lots("0.001", CFG) == 100
    assert qty_to_lots("1", CFG) == 100000
    assert ticks_to_price(6500010, CFG) == "65000.10"
    assert ticks_to_price(1, CFG) == "0.01"
    assert lots_to_qty(100, CFG) == "0.00100"
    assert lots_to_qty(100000, CFG) == "1.00000"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("65000.001", RejectCode.TICK_SIZE),
        ("0", RejectCode.INVALID_PRICE),
        ("0.00", RejectCode.INVALID_PRICE),
        ("-1", RejectCode.TICK_SIZE),
        ("1e3", RejectCode.TICK_SIZE),
        ("", RejectCode.TICK_SIZE),
        (" 1", RejectCode.TICK_SIZE),
        ("1.", RejectCode.TICK_SIZE),
        (".5", RejectCode.TICK_SIZE),
        ("NaN", RejectCode.TICK_SIZE),
        ("1" * 31, RejectCode.TICK_SIZE),
    ],
)
def test_bad_price(value: str, code: RejectCode) -> None:
    with pytest.raises(PrecisionError) as ei:
        price_to_ticks(value, CFG)
    assert ei.value.code == code
    assert isinstance(ei.value, ValueError)


def test_bad_qty() -> None:
    with pytest.raises(PrecisionError) as ei:
        qty_to_lots("0.000001", CFG)
    assert ei.value.code == RejectCode.LOT_SIZE
    assert "multiple of 0.00001" in str(ei.value)
    with pytest.raises(PrecisionError) as ei:
        qty_to_lots("0", CFG)
    assert ei.value.code == RejectCode.INVALID_QTY
    with pytest.raises(PrecisionError):
        qty_to_lots(0.001, CFG)  # type: ignore[arg-type]  # floats never reach money


def test_amounts() -> None:
    assert amount_to_minor("12.5", 6) == 12_500_000
    assert amount_to_minor("12", 0) == 12
    assert amount_to_minor("0.000001", 6) == 1
    assert minor_to_amount(12_500_000, 6) == "12.500000"
    assert minor_to_amount(1, 6) == "0.000001"
    assert minor_to_amount(-1, 2) == "-0.01"
    assert minor_to_amount(7, 0) == "7"
    with pytest.raises(PrecisionError) as ei:
        amount_to_minor("0.0000001", 6)
    assert ei.value.code == RejectCode.INVALID_AMOUNT
    with pytest.raises(PrecisionError):
        amount_to_minor("1.2.3", 6)


def test_fee_rounding() -> None:
    assert fee_for(10_000, 10) == 10
    assert fee_for(10_001, 10) == 11  # ceil
    assert fee_for(1, 10) == 1  # at least one minor unit when the rate is not zero
    assert fee_for(1, 0) == 0
    assert fee_for(0, 10) == 0
    assert fee_for(7, 10_000) == 7  # bounded by what was received


# ---------------------------------------------------------------- market config


def test_market_config_derivation() -> None:
    assert CFG.base_per_lot == 1000
    assert CFG.quote_per_tick_lot == 10
    # notional of 1 BTC at 65000.10: 6500010 ticks * 100000 lots * 10 = 6500010000000 = 65000.1 * 1e8
    assert 6500010 * 100000 * CFG.quote_per_tick_lot == 65000_10000000
    assert validate_market(CFG) == []


def test_market_config_rejects_fractional_factors() -> None:
    with pytest.raises(ValueError, match="quote minor units"):
        market_config("BTC-USDT", "BTC", "USDT", base_scale=8, quote_scale=6, tick_size="0.01", lot_size="0.00001")
    with pytest.raises(ValueError, match="lot_size"):
        market_config("BTC-USDT", "BTC", "USDT", base_scale=2, quote_scale=8, tick_size="0.01", lot_size="0.001")


def test_validate_market_catches_inconsistency() -> None:
    bad = msgspec.structs.replace(CFG, quote_per_tick_lot=11)
    assert any("quote_per_tick_lot" in p for p in validate_market(bad))
    bad = msgspec.structs.replace(CFG, symbol="btc/usdt", maker_fee_bps=-1, price_band_bps=20_000)
    problems = validate_market(bad)
    assert len(problems) == 3
    assert validate_market(msgspec.structs.replace(CFG, quote="BTC")) != []


def test_market_config_is_frozen_and_round_trips() -> None:
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(CFG), type=MarketConfig) == CFG
    with pytest.raises(AttributeError):
        CFG.symbol = "X"  # type: ignore[misc]


def test_market_config_diff_names_the_fields_that_map_differently() -> None:
    from core.wire import market_config, market_config_diff

    a = market_config("BTC-USDT", "BTC", "USDT", base_scale=8, quote_scale=8, tick_size="0.01", lot_size="0.00001")
    assert market_config_diff(a, a) == {}
    assert market_config_diff(a, msgspec.structs.asdict(a)) == {}  # the decoded core answer
    b = market_config("BTC-USDT", "BTC", "USDT", base_scale=8, quote_scale=8, tick_size="0.01", lot_size="0.0001")
    assert market_config_diff(a, b) == {"lot_size": ("0.00001", "0.0001"), "base_per_lot": (1000, 10000),
                                        "quote_per_tick_lot": (10, 100)}
    partial = {k: v for k, v in msgspec.structs.asdict(a).items() if k != "taker_fee_bps"}
    assert market_config_diff(a, partial) == {"taker_fee_bps": (0, None)}
