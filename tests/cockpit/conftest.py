"""One real stack (with the demo market maker, so trades flow) for the cockpit's Pilot tests, stopped after
the last test of tests/cockpit (its demo trader would otherwise load the machine for the rest of the run)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cockpit.signing import OperatorKey
from spotex.testing import Stack, stack


def _key() -> OperatorKey:
    raw = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                     serialization.NoEncryption())
    return OperatorKey.from_hex(raw.hex())


@dataclass
class CockpitStack:
    stack: Stack
    operator: OperatorKey  # roles operator + admin
    viewer: OperatorKey  # role viewer only: the edge refuses its controls
    approver: OperatorKey  # role approver only: latch releases


@pytest.fixture(scope="package")
def cockpit_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CockpitStack]:
    op, viewer, approver = _key(), _key(), _key()
    keys = {op.public_hex: ["operator", "admin"], viewer.public_hex: ["viewer"], approver.public_hex: ["approver"]}
    data_dir: Path = tmp_path_factory.mktemp("cockpit") / "stack"
    with stack(data_dir, demo=True, env={"SPOTEX_SECURITY__ADMIN_KEYS": json.dumps(keys)}) as st:
        yield CockpitStack(st, op, viewer, approver)
