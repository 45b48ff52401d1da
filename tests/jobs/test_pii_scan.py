"""PII log scan gate: the policy on single lines, and over a real stack's logs (pass), plus an injected leak."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from jobs.pii_scan import luhn_ok, scan_line
from spotex.testing import stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("line", "kind"), [
    ('{"msg":"login","user":"alice.smith@example.com"}', "email"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "private_key"),
    ("-----BEGIN PRIVATE KEY-----", "private_key"),
    ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123", "bearer_token"),
    ("tok eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "jwt"),
    ("dsn postgresql://spotex:hunter2@db:5432/spotex", "url_credentials"),
    ('{"api_secret": "9f8e7d6c5b4a3210"}', "secret_assignment"),
    ("SPOTEX_JOBS__WEBHOOK_SECRET=s3cr3t-value", "secret_assignment"),
    ("password: correcthorse", "secret_assignment"),
    ("aws AKIAIOSFODNN7EXAMPLE", "cloud_token"),
    ("card 4111 1111 1111 1111 declined", "card_number"),
    ("pan=5555555555554444", "card_number"),
    ("amex 378282246310005", "card_number"),
    ("call +44 20 7946 0958 now", "phone"),
    ("client 8.8.8.8 connected", "ip_address"),
    ("client 2001:4860:4860::8888 connected", "ip_address"),
])
def test_policy_finds(line: str, kind: str) -> None:
    assert kind in [k for k, _s, _e in scan_line(line)], scan_line(line)


@pytest.mark.parametrize("line", [
    '{"msg":"auth failed","key":"***","email":"***@***","dsn":"postgresql://***:***@127.0.0.1:5432/spotex"}',
    '{"state_hash":"2647369238e184d3858b110a074319478e42735a004a4dc25897cbc7f4aa4cdc","last_seq":603}',
    '{"ts_ms":1732413600000,"ns":1732413600000123456,"amount":4000000000000000}',  # timestamps, not cards
    "card 4111 1111 1111 1112 (fails Luhn)",
    '{"fencing_token":14,"detail":"FENCING_TOKEN: seq.journal: wrong last sequence: 141"}',
    "listening on 127.0.0.1:4222, 10.0.0.7, 192.168.1.2, 0.0.0.0, ::1",
    "2026-11-24 02:00:57.123 +0000 LOG: checkpoint complete",
    '{"password":"***","token":null,"secret":"<redacted>","auth_fail_total":3}',
])
def test_policy_passes(line: str) -> None:
    assert scan_line(line) == []


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def _scan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "scripts" / "pii_log_scan.sh"), *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)


def test_real_stack_logs_pass_and_an_injected_leak_fails(tmp_path: Path) -> None:
    data = tmp_path / "stack"
    with stack(data, demo=True):
        # The services log very little at INFO (auth failures, for one, are metrics, not log lines): what
        # this proves is that a real run's logs, third-party servers' included, raise no false alarm.
        deadline = time.monotonic() + 60
        while "demo trader running" not in (data / "logs" / "demo.log").read_text():
            assert time.monotonic() < deadline, "the demo trader did not start"
            time.sleep(0.5)
        time.sleep(3)  # a few seconds of trading
    logs = data / "logs"
    assert len(list(logs.glob("*.log"))) >= 8
    res = _scan(str(logs), "--out", str(tmp_path / "pass.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "pii_log_scan_ok=true"
    ev = json.loads((tmp_path / "pass.json").read_text())
    assert ev["ok"] and ev["files"] >= 8 and ev["lines"] > 50 and ev["findings"] == []

    # A leak the redactor would never let through, written straight into a service log.
    edge_log = logs / "edge.log"
    n = len(edge_log.read_text().splitlines())
    with open(edge_log, "a") as f:
        f.write('{"level":"INFO","msg":"kyc","contact":"carol.jones@example.net","card":"4111-1111-1111-1111"}\n')
    res = _scan("--data-dir", str(data), "--out", str(tmp_path / "fail.json"))
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "pii_log_scan_ok=false"
    findings = [ln for ln in lines if ln.startswith(f"{edge_log}:{n + 1}: ")]
    assert sorted(ln.split(": ")[1] for ln in findings) == ["card_number", "email"]
    assert "carol.jones@example.net" not in res.stdout and "4111-1111-1111-1111" not in res.stdout
    ev = json.loads((tmp_path / "fail.json").read_text())
    assert not ev["ok"] and len(ev["findings"]) == 2
