"""Ed25519 public keys in the operator formats, shared by the services that verify signatures.

The edge (API and operator keys, ``edge/auth.py``, ``edge/access.py``) and the jobs (policy
signer keys, ``jobs/policy.py``) read the same key formats; jobs may not import the edge, so the
one parser lives here. No trading logic.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["load_public_key", "raw_public_key"]


def load_public_key(value: bytes | str | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from raw 32 bytes, 64 hex characters or PEM."""
    if isinstance(value, Ed25519PublicKey):
        return value
    if isinstance(value, str):
        v = value.strip()
        if v.startswith("-----BEGIN"):
            value = v.encode()
        else:
            try:
                value = bytes.fromhex(v)
            except ValueError:
                raise ValueError("Ed25519 public key must be 64 hex characters or PEM") from None
    if value.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(value)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("PEM key is not an Ed25519 public key")
        return key
    if len(value) != 32:
        raise ValueError("Ed25519 public key must be 32 bytes")
    return Ed25519PublicKey.from_public_bytes(value)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    """The key's raw 32 bytes (hex of these is the operator format)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
