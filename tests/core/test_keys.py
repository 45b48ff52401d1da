"""core.keys: the one Ed25519 public key parser the edge and the jobs share."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.keys import load_public_key, raw_public_key


def test_every_operator_format_gives_the_same_key() -> None:
    pub = Ed25519PrivateKey.generate().public_key()
    raw = raw_public_key(pub)
    assert len(raw) == 32
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for value in (raw, raw.hex(), f"  {raw.hex().upper()}\n", pem, pem.decode(), f"\n{pem.decode()}  ", pub):
        assert raw_public_key(load_public_key(value)) == raw
    assert load_public_key(pub) is pub


@pytest.mark.parametrize(("value", "message"), [
    ("zz" * 32, "Ed25519 public key must be 64 hex characters or PEM"),
    ("ab" * 31, "Ed25519 public key must be 32 bytes"),
    (b"\x01" * 33, "Ed25519 public key must be 32 bytes"),
])
def test_what_is_not_a_key_is_refused_saying_why(value: str | bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_public_key(value)


def test_a_pem_key_of_another_kind_is_refused() -> None:
    pem = generate_private_key(SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(ValueError, match="PEM key is not an Ed25519 public key"):
        load_public_key(pem)
