"""core.crc: the WAL's and the snapshots' CRC-32 is zlib's, whichever implementation computes it."""

from __future__ import annotations

import random
import zlib

from core import crc


def test_the_crc_is_zlibs_crc32() -> None:
    rng = random.Random(7)
    for n in [0, 1, 7, 8, 15, 16, 63, 64, 200, 206, 4_095, 65_537]:
        data = rng.randbytes(n)
        assert crc.crc32(data) == zlib.crc32(data)
        seed = zlib.crc32(rng.randbytes(8))
        assert crc.crc32(data, seed) == zlib.crc32(data, seed)  # chained, as the WAL's payload checksum is
        assert crc.crc32(memoryview(data)[1:]) == zlib.crc32(data[1:])


def test_the_fast_implementation_is_in_use() -> None:
    """isal is a dependency (pyproject.toml): on the platforms it has wheels for, it is the one used."""
    from isal import isal_zlib

    assert crc.crc32 is isal_zlib.crc32
