"""Each production guardrail (seed §4.4) refuses start-up with one line and a non-zero exit."""

from __future__ import annotations

import pytest

from runbooks.guardrails_drill import SAFE_PRODUCTION_ENV as SAFE
from runbooks.guardrails_drill import UNSAFE_CASES as CASES
from spotex.testing import spotex_cli


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
