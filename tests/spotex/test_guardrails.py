"""Each production guardrail (seed §4.4) refuses start-up with one line and a non-zero exit."""

from __future__ import annotations

import pytest

from spotex.testing import spotex_cli

# Everything safe: real hosts, operator keys, second approver, no demo funding.
SAFE = {
    "SPOTEX_ENV": "production",
    "SPOTEX_NATS__URL": "nats://nats-1.prod.internal:4222,nats://nats-2.prod.internal:4222",
    "SPOTEX_POSTGRES__DSN": "postgresql://spotex:secret@pg.prod.internal:5432/spotex",
    "SPOTEX_KAFKA__BOOTSTRAP": "redpanda-1.prod.internal:9092",
    "SPOTEX_SECURITY__ADMIN_KEYS": '{"' + "ab" * 32 + '": ["admin"]}',
    "SPOTEX_LEDGER__LATCH_REQUIRES_SECOND_APPROVER": "true",
    "SPOTEX_DEMO__ENABLED": "false",
}

CASES = [
    ("core", {"SPOTEX_NATS__URL": ""}, "embedded nats-server"),
    ("core", {"SPOTEX_NATS__URL": "nats://127.0.0.1:4222"}, "loopback"),
    ("core", {"SPOTEX_DEMO__ENABLED": "true"}, "demo funding is enabled"),
    ("edge", {"SPOTEX_SECURITY__ADMIN_KEYS": "{}"}, "no operator keys"),
    ("edge", {"SPOTEX_NATS__URL": "nats://localhost:4222"}, "loopback"),
    ("ledger", {"SPOTEX_POSTGRES__DSN": ""}, "embedded PostgreSQL"),
    ("ledger", {"SPOTEX_POSTGRES__DSN": "postgresql://u@127.0.0.1/x"}, "loopback"),
    ("ledger", {"SPOTEX_SECURITY__LATCH_APPROVAL_ENABLED": "false"}, "latch approval is disabled"),
    ("ledger", {"SPOTEX_LEDGER__LATCH_REQUIRES_SECOND_APPROVER": "false"}, "second approver"),
    ("exporter", {"SPOTEX_KAFKA__BOOTSTRAP": ""}, "embedded Kafka"),
    ("exporter", {"SPOTEX_KAFKA__BOOTSTRAP": "127.0.0.1:9092"}, "loopback broker"),
    ("jobs", {"SPOTEX_SECURITY__ADMIN_KEYS": "{}"}, "no operator keys"),
]


@pytest.mark.parametrize(("service", "unsafe", "needle"), CASES)
def test_service_refuses_unsafe_production_config(tmp_path, service, unsafe, needle) -> None:
    res = spotex_cli("serve", service, "--data-dir", str(tmp_path), env={**SAFE, **unsafe}, timeout=60)
    assert res.returncode == 3, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if needle in ln]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"spotex: refusing to start {service} in production: ")


def test_up_refuses_embedded_servers_in_production(tmp_path) -> None:
    res = spotex_cli("up", "--data-dir", str(tmp_path), env={"SPOTEX_ENV": "production"}, timeout=60)
    assert res.returncode == 3
    assert "embedded nats-server" in res.stderr
    assert not (tmp_path / "run" / "state.json").exists()


def test_safe_production_config_passes_the_check(tmp_path) -> None:
    res = spotex_cli("guardrails", "check", "--data-dir", str(tmp_path), env=SAFE)
    assert res.returncode == 0, res.stderr
    assert "guardrails_ok=true env=production" in res.stdout


def test_dev_mode_has_no_guardrails(tmp_path) -> None:
    res = spotex_cli("guardrails", "check", "--data-dir", str(tmp_path), env={"SPOTEX_ENV": "dev"})
    assert res.returncode == 0
