"""Startup guardrails drill (seed §4.4): each service, started in production mode with one unsafe
setting, must refuse with one line naming the reason; a safe production config must pass.

Runs the real CLI (`spotex serve NAME`) in child processes; no network traffic: the refusal
happens before any connection is made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from runbooks.common import Drill

__all__ = ["SAFE_PRODUCTION_ENV", "UNSAFE_CASES", "startup_guardrails"]

SAFE_PRODUCTION_ENV = {
    "SPOTEX_ENV": "production",
    "SPOTEX_NATS__URL": "nats://nats-1.prod.internal:4222,nats://nats-2.prod.internal:4222",
    "SPOTEX_POSTGRES__DSN": "postgresql://spotex:secret@pg.prod.internal:5432/spotex",
    "SPOTEX_KAFKA__BOOTSTRAP": "redpanda-1.prod.internal:9092",
    "SPOTEX_SECURITY__ADMIN_KEYS": '{"' + "ab" * 32 + '": ["admin"]}',
    "SPOTEX_LEDGER__LATCH_REQUIRES_SECOND_APPROVER": "true",
    "SPOTEX_DEMO__ENABLED": "false",
}

# (service, unsafe override, text the refusal line must contain)
UNSAFE_CASES: list[tuple[str, dict[str, str], str]] = [
    ("core", {"SPOTEX_NATS__URL": ""}, "embedded nats-server"),
    ("core", {"SPOTEX_NATS__URL": "nats://127.0.0.1:4222"}, "loopback"),
    ("core", {"SPOTEX_DEMO__ENABLED": "true"}, "demo funding"),
    ("core-standby", {"SPOTEX_NATS__URL": ""}, "embedded nats-server"),
    ("demo", {"SPOTEX_DEMO__ENABLED": "true"}, "demo funding"),
    ("edge", {"SPOTEX_SECURITY__ADMIN_KEYS": "{}"}, "no operator keys"),
    ("edge", {"SPOTEX_NATS__URL": "nats://localhost:4222"}, "loopback"),
    ("edge", {"SPOTEX_DEMO__ENABLED": "true"}, "demo funding"),
    ("ledger", {"SPOTEX_POSTGRES__DSN": ""}, "embedded PostgreSQL"),
    ("ledger", {"SPOTEX_POSTGRES__DSN": "postgresql://u@127.0.0.1/x"}, "loopback"),
    ("ledger", {"SPOTEX_SECURITY__LATCH_APPROVAL_ENABLED": "false"}, "latch approval is disabled"),
    ("ledger", {"SPOTEX_LEDGER__LATCH_REQUIRES_SECOND_APPROVER": "false"}, "second approver"),
    ("exporter", {"SPOTEX_KAFKA__BOOTSTRAP": ""}, "embedded Kafka"),
    ("exporter", {"SPOTEX_KAFKA__BOOTSTRAP": "127.0.0.1:9092"}, "loopback broker"),
    ("jobs", {"SPOTEX_SECURITY__ADMIN_KEYS": "{}"}, "no operator keys"),
    ("jobs", {"SPOTEX_POSTGRES__DSN": ""}, "embedded PostgreSQL"),
]


def _serve(service: str, env: dict[str, str], data_dir: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPOTEX_")}
    return subprocess.run([sys.executable, "-m", "spotex", "serve", service, "--data-dir", data_dir],
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


def check_cases(data_dir: str) -> list[dict[str, Any]]:
    results = []
    for service, unsafe, needle in UNSAFE_CASES:
        res = _serve(service, {**SAFE_PRODUCTION_ENV, **unsafe}, data_dir)
        lines = [ln for ln in res.stderr.splitlines() if needle in ln]
        ok = (res.returncode == 3 and len(lines) == 1
              and lines[0].startswith(f"spotex: refusing to start {service} in production: "))
        results.append({"service": service, "unsafe": unsafe, "expect": needle, "exit": res.returncode,
                        "refusal": lines[0] if lines else res.stderr.strip()[:300], "ok": ok})
    return results


def startup_guardrails(d: Drill) -> bool:
    d.status("before")
    results = check_cases(str(d.data_dir / "guardrails-scratch"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPOTEX_")}
    safe = subprocess.run([sys.executable, "-m", "spotex", "guardrails", "check", "--data-dir",
                           str(d.data_dir / "guardrails-scratch")], env={**clean, **SAFE_PRODUCTION_ENV},
                          capture_output=True, text=True, timeout=60)
    by = {s: all(r["ok"] for r in results if r["service"] == s)
          for s in ("core", "core-standby", "edge", "ledger", "exporter", "jobs", "demo")}
    safe_ok = safe.returncode == 0 and "guardrails_ok=true env=production" in safe.stdout
    ok = all(by.values()) and safe_ok
    d.status("after")
    d.write("startup-guardrails-summary.json", {"cases": results, "safe_config_passes": safe_ok, "by_service": by,
                                                "runbook_startup_guardrails_ok": ok})
    d.emit("core_guardrails_ok", by["core"] and by["core-standby"])
    d.emit("edge_guardrails_tests_ok", by["edge"])
    d.emit("ledger_guardrails_tests_ok", by["ledger"])
    d.emit("exporter_guardrails_ok", by["exporter"])
    d.emit("jobs_guardrails_ok", by["jobs"])
    d.emit("safe_production_config_ok", safe_ok)
    for r in results:
        if not r["ok"]:
            print(f"guardrail_failed={json.dumps(r)}", file=sys.stderr)
    d.emit("runbook_startup_guardrails_ok", ok)
    return ok
