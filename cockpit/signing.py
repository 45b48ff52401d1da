"""Client side of the edge's operator signing (docs/api.md): Ed25519 over
``METHOD\\nPATH_WITH_QUERY\\nX-TS\\nBODY``, sent as ``X-API-KEY`` (hex public key), ``X-TS`` (epoch ms)
and ``X-SIGNATURE`` (hex). Re-implemented here because the cockpit talks to services only over
their APIs and never imports the edge."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["OperatorKey", "load_operator_key", "signing_string"]


def signing_string(method: str, path_with_query: str, ts: str | int, body: bytes) -> bytes:
    return f"{method.upper()}\n{path_with_query}\n{ts}\n".encode() + body


@dataclass(frozen=True)
class OperatorKey:
    private: Ed25519PrivateKey

    @classmethod
    def from_hex(cls, text: str) -> OperatorKey:
        raw = bytes.fromhex(text.strip())
        if len(raw) != 32:
            raise ValueError("an operator key is 32 bytes of hex (an Ed25519 private key)")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @property
    def public_hex(self) -> str:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw).hex()

    def headers(self, method: str, path_with_query: str, body: bytes = b"",
                ts_ms: int | None = None) -> dict[str, str]:
        ts = str(time.time_ns() // 1_000_000 if ts_ms is None else ts_ms)
        sig = self.private.sign(signing_string(method, path_with_query, ts, body)).hex()
        return {"X-API-KEY": self.public_hex, "X-TS": ts, "X-SIGNATURE": sig}


def load_operator_key(path: str | os.PathLike[str] | None) -> OperatorKey | None:
    """``--operator-key FILE``, else the file named by SPOTEX_OPERATOR_KEY (or the hex key itself)."""
    if path is not None:
        return OperatorKey.from_hex(Path(path).read_text())
    env = os.environ.get("SPOTEX_OPERATOR_KEY")
    if not env:
        return None
    p = Path(env).expanduser()
    if p.is_file():
        return OperatorKey.from_hex(p.read_text())
    return OperatorKey.from_hex(env)
