"""``spotex admin break-glass`` / ``scripts/break_glass.sh`` over a real stack: signed, audited, refusals."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cockpit.signing import OperatorKey
from spotex.testing import Stack, stack

ROOT = Path(__file__).resolve().parents[2]


def _key() -> OperatorKey:
    raw = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                     serialization.NoEncryption())
    return OperatorKey.from_hex(raw.hex())


OPERATOR, VIEWER = _key(), _key()


def _hex(k: OperatorKey) -> str:
    return k.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                   serialization.NoEncryption()).hex()


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys = {OPERATOR.public_hex: ["operator"], VIEWER.public_hex: ["viewer"]}
    with stack(tmp_path_factory.mktemp("bg") / "stack", env={"SPOTEX_SECURITY__ADMIN_KEYS": json.dumps(keys)}) as s:
        yield s


def _bg(st: Stack, *args: str, key: OperatorKey | None = OPERATOR) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SPOTEX_OPERATOR_KEY"}
    env["SPOTEX_DATA_DIR"] = str(st.data_dir)
    if key is not None:
        env["SPOTEX_OPERATOR_KEY"] = _hex(key)
    return subprocess.run([str(ROOT / "scripts" / "break_glass.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def _kv(out: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)


def _audit(st: Stack) -> list[dict[str, Any]]:
    path = "/v1/admin/audit?limit=50"
    r = httpx.get(st.endpoint("edge") + path, headers=VIEWER.headers("GET", path), timeout=10)
    r.raise_for_status()
    return list(r.json())


def _one_line_refusal(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spotex: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_break_glass_enable_status_disable(st: Stack) -> None:
    before = _audit(st)
    assert _kv(_bg(st, "status").stdout)["break_glass_active"] == "false"

    res = _bg(st, "enable", "--ttl-sec", "900", "--actor", "alice", "--reason", "INC-42 edge down",
              "--ticket", "INC-42")
    assert res.returncode == 0, res.stdout + res.stderr
    kv = _kv(res.stdout)
    assert kv["break_glass_active"] == "true" and 890 <= int(kv["break_glass_remaining_s"]) <= 900
    assert kv["break_glass_actor"].endswith(OPERATOR.public_hex[:16])  # the signing key, authenticated
    assert kv["break_glass_reason"] == "INC-42 edge down [oncall: alice]" and kv["break_glass_ticket"] == "INC-42"

    status = json.loads(_bg(st, "status", "--json", key=VIEWER).stdout)  # any role may read
    assert status["active"] and status["audit_seq"] == int(kv["break_glass_audit_seq"])
    assert status["expires_at_ms"] - status["enabled_at_ms"] == 900_000

    entries = _audit(st)
    assert len(entries) == len(before) + 1
    top = entries[0]
    assert top["action"] == "BreakGlassEnable" and top["seq"] == status["audit_seq"]
    assert top["params"]["ttl_s"] == 900 and top["reason"] == "INC-42 edge down [oncall: alice]"
    assert top["actor"] == status["actor"] and top["ticket"] == "INC-42"

    res = _bg(st, "disable", "--actor", "alice", "--reason", "resolved")
    assert res.returncode == 0, res.stdout + res.stderr
    kv = _kv(res.stdout)
    assert kv["break_glass_active"] == "false" and kv["break_glass_disabled_by"] == status["actor"]
    assert _kv(_bg(st, "status").stdout)["break_glass_active"] == "false"
    top = _audit(st)[0]
    assert top["action"] == "BreakGlassDisable" and top["reason"] == "resolved [oncall: alice]"
    assert st.cli("audit", "verify", "--require-events").returncode == 0


def test_break_glass_refusals_are_one_line(st: Stack) -> None:
    n = len(_audit(st))
    _one_line_refusal(_bg(st, "enable", "--ttl-sec", "900", "--actor", "alice"), "--reason")
    _one_line_refusal(_bg(st, "enable", "--ttl-sec", "900", "--actor", "alice", "--reason", "  "), "--reason")
    _one_line_refusal(_bg(st, "disable", "--actor", "alice"), "--reason")
    _one_line_refusal(_bg(st, "enable", "--ttl-sec", "900", "--reason", "x"), "--actor")
    _one_line_refusal(_bg(st, "enable", "--actor", "alice", "--reason", "x"), "--ttl-sec")
    _one_line_refusal(_bg(st, "enable", "--ttl-sec", "999999", "--actor", "a", "--reason", "x"),
                      "400", "BREAK_GLASS_TTL")
    _one_line_refusal(_bg(st, "enable", "--ttl-sec", "60", "--actor", "a", "--reason", "x", key=VIEWER), "403")
    _one_line_refusal(_bg(st, "status", key=None), "operator key")
    assert len(_audit(st)) == n  # nothing refused reached the audit chain
    assert _kv(_bg(st, "status").stdout)["break_glass_active"] == "false"
