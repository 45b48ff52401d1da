"""CRC32 checksum of the top of an order book, Kraken-style (docs/ws.md has the test vectors).

For each of the top 10 ask levels (best, i.e. lowest, first) and then the top 10 bid levels (best,
i.e. highest, first): take the level's price and quantity as the API prints them (decimal strings
with the market's tick / lot precision, e.g. ``"65000.10"`` and ``"0.00100"``), remove the decimal
point, remove leading zeros (``"65000.10"`` -> ``"6500010"``, ``"0.00100"`` -> ``"100"``) and
append price then quantity to one ASCII string. The checksum is ``zlib.crc32`` of that string as an
unsigned 32-bit integer. A side with fewer than 10 levels contributes the levels it has; an empty
book gives ``crc32(b"") == 0``.

Because a decimal string with its point and leading zeros removed is just the integer number of
the unit's smallest digit, ``"65000.10"`` at tick ``"0.01"`` is ``str(6500010)``: with the tick
size's digits ``u`` (``"0.05"`` -> 5, ``"0.01"`` -> 1, ``"10"`` -> 10) the price string is
``str(price_ticks * u)`` and likewise for lots. :func:`book_checksum` uses that fast form;
:func:`book_checksum_from_strings` is the literal definition, for clients and tests.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

from core.wire import MarketConfig

__all__ = ["CHECKSUM_LEVELS", "book_checksum", "book_checksum_from_strings", "checksum_string", "unit_digits"]

CHECKSUM_LEVELS = 10


def unit_digits(size: str) -> int:
    """``"0.05"`` -> 5, ``"0.00001"`` -> 1, ``"10"`` -> 10: the size with its point and leading zeros removed."""
    digits = size.replace(".", "").lstrip("0")
    if not digits or not digits.isdigit():
        raise ValueError(f"not a positive decimal size: {size!r}")
    return int(digits)


def _strip(s: str) -> str:
    return s.replace(".", "").lstrip("0")


def checksum_string(bids: Sequence[tuple[str, str]], asks: Sequence[tuple[str, str]],
                    levels: int = CHECKSUM_LEVELS) -> str:
    """The string that is checksummed, from decimal-string levels (best first on both sides)."""
    parts: list[str] = []
    for side in (asks, bids):
        for price, qty in side[:levels]:
            parts.append(_strip(price))
            parts.append(_strip(qty))
    return "".join(parts)


def book_checksum_from_strings(bids: Sequence[tuple[str, str]], asks: Sequence[tuple[str, str]],
                               levels: int = CHECKSUM_LEVELS) -> int:
    """The checksum by its literal definition, from the decimal strings a client received."""
    return zlib.crc32(checksum_string(bids, asks, levels).encode("ascii")) & 0xFFFFFFFF


def book_checksum(bids: Iterable[tuple[int, int]], asks: Iterable[tuple[int, int]], price_unit: int,
                  qty_unit: int, levels: int = CHECKSUM_LEVELS) -> int:
    """The checksum from integer levels ``(price_ticks, qty_lots)``, best first; ``price_unit`` and
    ``qty_unit`` are :func:`unit_digits` of the market's tick and lot sizes."""
    parts: list[str] = []
    for side in (asks, bids):
        for n, (price, qty) in enumerate(side):
            if n == levels:
                break
            parts.append(str(price * price_unit))
            parts.append(str(qty * qty_unit))
    return zlib.crc32("".join(parts).encode("ascii")) & 0xFFFFFFFF


def market_units(cfg: MarketConfig) -> tuple[int, int]:
    return unit_digits(cfg.tick_size), unit_digits(cfg.lot_size)
