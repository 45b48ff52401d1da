"""The book checksum's test vectors (the same ones docs/ws.md publishes for client authors)."""

from __future__ import annotations

import random
import zlib

import pytest

from core.sim import sim_markets
from core.wire import lots_to_qty, market_config, ticks_to_price
from edge.checksum import book_checksum, book_checksum_from_strings, checksum_string, market_units, unit_digits

VECTORS = [
    # (bids best first, asks best first, checksummed string, crc32)
    ([("0.5666", "4831.75496356"), ("0.5665", "6658.22734739")],
     [("0.5668", "4410.79769741"), ("0.5669", "4655.40412487")],
     "5668441079769741566946554041248756664831754963565665665822734739", 3588693387),
    ([("65000.10", "0.00100"), ("65000.00", "1.25000"), ("64999.99", "0.00001")],
     [("65000.20", "0.50000"), ("65001.00", "12.00000")],
     "650002050000650010012000006500010100650000012500064999991", 2653136149),
    ([(f"{100 - i}.00", f"{i + 1}.0") for i in range(12)],  # 12 levels a side: only the top 10 count
     [(f"{101 + i}.00", f"{i + 1}.5") for i in range(12)],
     "1010015102002510300351040045105005510600651070075108008510900951100010510000109900209800309700409600509500"
     "609400709300809200909100100", 315819231),
    ([], [], "", 0),
]


@pytest.mark.parametrize(("bids", "asks", "text", "crc"), VECTORS)
def test_vectors(bids: list[tuple[str, str]], asks: list[tuple[str, str]], text: str, crc: int) -> None:
    assert checksum_string(bids, asks) == text
    assert book_checksum_from_strings(bids, asks) == crc == zlib.crc32(text.encode())


def test_unit_digits() -> None:
    assert unit_digits("0.01") == 1 and unit_digits("0.05") == 5 and unit_digits("10") == 10
    assert unit_digits("0.00001") == 1 and unit_digits("2.5") == 25
    with pytest.raises(ValueError):
        unit_digits("0")


@pytest.mark.parametrize("tick,lot", [("0.01", "0.00001"), ("0.05", "0.001"), ("0.5", "0.01"), ("1", "1")])
def test_integer_form_equals_the_string_definition(tick: str, lot: str) -> None:
    cfg = market_config("AAA-BBB", "AAA", "BBB", base_scale=8, quote_scale=8, tick_size=tick, lot_size=lot)
    rng = random.Random(tick + lot)
    for _ in range(200):
        bids = sorted({rng.randint(1, 10**7) for _ in range(rng.randint(0, 15))}, reverse=True)
        asks = sorted({rng.randint(10**7 + 1, 2 * 10**7) for _ in range(rng.randint(0, 15))})
        b = [(p, rng.randint(1, 10**9)) for p in bids]
        a = [(p, rng.randint(1, 10**9)) for p in asks]
        strings_b = [(ticks_to_price(p, cfg), lots_to_qty(q, cfg)) for p, q in b]
        strings_a = [(ticks_to_price(p, cfg), lots_to_qty(q, cfg)) for p, q in a]
        assert book_checksum(b, a, *market_units(cfg)) == book_checksum_from_strings(strings_b, strings_a)


def test_sim_market_units() -> None:
    btc = sim_markets()[0]
    assert market_units(btc) == (1, 1)
