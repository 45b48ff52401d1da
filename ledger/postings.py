"""Posting rules: how a core event becomes a journal transaction.

The core computes every balance change itself and ships it as ``moves`` on the event
(``core.wire.Move``); the ledger posts exactly those moves, one posting per move, and never
re-derives them. What the ledger adds is the check that they are a valid double entry and the
labels people query by:

| event | entry kind (``ledger_entries``) | reference | typical moves |
|---|---|---|---|
| OrderAccepted | reserve | order id | available -> hold |
| OrderAmended | reserve_adjust | order id | hold <-> available |
| OrderCanceled | release | order id | hold -> available |
| TradeExecuted | settlement | trade id | buyer's quote hold -> seller, seller's base hold -> buyer, fees |
| Deposited | deposit | reference or event id | custody -> available |
| Withdrawn | withdrawal | reference or event id | available -> custody |

A move list is valid when, per asset, its deltas sum to zero; every bucket is ``available`` or
``hold``; account ids are >= 0; and custody (account 0) only ever moves ``available``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from core.wire import (
    CUSTODY_ACCOUNT,
    FEE_ACCOUNT,
    Deposited,
    Move,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    TradeExecuted,
    Withdrawn,
)

__all__ = [
    "BUCKETS",
    "CORRECTION_STREAM",
    "ENTRY_KIND",
    "BalanceKey",
    "account_kind",
    "entry_kind",
    "has_moves",
    "net_moves",
    "reference",
    "validate_moves",
]

BUCKETS: Final = frozenset({"available", "hold"})
# Corrections live in the journal under this pseudo stream; '~' cannot start a market symbol or _sys.
CORRECTION_STREAM: Final = "~correction"

ENTRY_KIND: Final = {
    "OrderAccepted": "reserve",
    "OrderAmended": "reserve_adjust",
    "OrderCanceled": "release",
    "TradeExecuted": "settlement",
    "Deposited": "deposit",
    "Withdrawn": "withdrawal",
    "Correction": "correction",
}

BalanceKey = tuple[int, str, str]  # (account_id, asset, bucket)


def account_kind(account_id: int) -> str:
    if account_id == CUSTODY_ACCOUNT:
        return "custody"
    if account_id == FEE_ACCOUNT:
        return "fee"
    return "user"


def entry_kind(kind: str) -> str:
    return ENTRY_KIND.get(kind, kind.lower())


def has_moves(evt: Any) -> bool:
    return bool(getattr(evt, "moves", None))


def reference(evt: Any) -> tuple[str, str]:
    """(reference_type, reference_id) of a balance-changing event."""
    if isinstance(evt, TradeExecuted):
        return "trade", str(evt.trade_id)
    if isinstance(evt, OrderAccepted | OrderCanceled | OrderAmended):
        return "order", str(evt.order_id)
    if isinstance(evt, Deposited):
        return "deposit", evt.reference or evt.event_id
    if isinstance(evt, Withdrawn):
        return "withdrawal", evt.reference or evt.event_id
    return "event", str(getattr(evt, "event_id", ""))


def validate_moves(moves: Iterable[Move]) -> list[str]:
    """Problems that make a move list unpostable (empty list = a valid double entry)."""
    problems: list[str] = []
    sums: dict[str, int] = {}
    n = 0
    for m in moves:
        n += 1
        bucket = str(m.bucket)
        if bucket not in BUCKETS:
            problems.append(f"leg {n - 1}: bucket {bucket!r} is not available/hold")
        if not isinstance(m.account_id, int) or m.account_id < 0:
            problems.append(f"leg {n - 1}: account {m.account_id!r} is not a non-negative integer")
        if not isinstance(m.delta, int) or isinstance(m.delta, bool):
            problems.append(f"leg {n - 1}: delta {m.delta!r} is not an integer")
            continue
        if m.account_id == CUSTODY_ACCOUNT and bucket != "available":
            problems.append(f"leg {n - 1}: custody moves only 'available'")
        if not m.asset:
            problems.append(f"leg {n - 1}: empty asset")
        sums[m.asset] = sums.get(m.asset, 0) + m.delta
    if n == 0:
        problems.append("no moves")
    for asset, total in sorted(sums.items()):
        if total != 0:
            problems.append(f"{asset} legs sum to {total}, not 0")
    return problems


def net_moves(moves: Iterable[Move], into: dict[BalanceKey, int] | None = None) -> dict[BalanceKey, int]:
    """Add the moves' deltas per (account, asset, bucket): one balance update per key per batch."""
    out = {} if into is None else into
    for m in moves:
        k = (m.account_id, m.asset, str(m.bucket))
        out[k] = out.get(k, 0) + m.delta
    return out
