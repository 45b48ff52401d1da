"""The CRC-32 of the WAL and the snapshots.

The formats use zlib's CRC-32 (IEEE 802.3). ISA-L's implementation (the ``isal`` package) computes
the same value with carry-less multiplication, ~2.5 times faster than the zlib build Python links
on the ~200-byte WAL records (~80 against ~195 ns a call, call included), which is ~3.5% of a
compiled replay. Where no ``isal`` wheel exists, zlib's gives the same checksums.
"""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - a platform without an isal wheel
    from zlib import crc32

__all__ = ["crc32"]
