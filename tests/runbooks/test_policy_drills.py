"""The policy signature and policy tamper drills (seed §4.10, §4.11) through their seed entrypoints,
against one real stack (SPOTEX_DATA_DIR): sign, verify and load a policy in the safety_budget job;
six tampers each detected by verify and refused by the loader; a failing deployed policy fails the
signature drill, and RUNBOOK_ALLOW_POLICY_FAIL=true records that failure with exit 0."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.policy import sign_bundle
from runbooks.policy_drills import TAMPERS, _Keys
from spotex.testing import Stack, stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("policy") / "stack") as s:
        yield s


def _run(script: str, st: Stack, out: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("RUNBOOK_ALLOW")},
            "SPOTEX_DATA_DIR": str(st.data_dir), **env}
    res = subprocess.run([str(ROOT / "runbooks" / script), "--out", str(out)], capture_output=True, text=True,
                         timeout=300, env=full)
    return res, dict(ln.split("=", 1) for ln in res.stdout.splitlines() if "=" in ln)


def test_policy_signature_drill(st: Stack, tmp_path: Path) -> None:
    ev = tmp_path / "sig"
    res, kv = _run("policy_signature.sh", st, ev)
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["runbook_policy_signature_ok"] == "true" and kv["recommended_action"] == "NONE"
    s = json.loads((ev / "policy-signature-summary.json").read_text())
    assert s["policy_ok"] is True and s["budget_ok"] is True and s["recommended_action"] == "NONE"
    smoke = json.loads((ev / "policy-smoke" / "policy-smoke-latest.json").read_text())
    assert smoke["verify"]["stdout"]["policy_signer"] == smoke["signer_key_id"] == kv["policy_signer"]
    pol = smoke["safety_budget"]["policy"]
    assert pol["source"] == "signed" and pol["key_id"] == smoke["signer_key_id"]
    assert smoke["safety_budget"]["outcome"] == "ok" and smoke["safety_budget"]["run_id"] is not None
    assert (ev / "status-before.json").exists() and (ev / "status-after.json").exists()


def test_policy_tamper_drill(st: Stack, tmp_path: Path) -> None:
    ev = tmp_path / "tam"
    res, kv = _run("policy_tamper.sh", st, ev)
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["runbook_policy_tamper_ok"] == "true" and kv["tamper_detected"] == "true"
    s = json.loads((ev / "policy-tamper-summary.json").read_text())
    assert s["policy_tamper_ok"] is True and s["tamper_detected"] is True and s["recommended_action"] == "NONE"
    proof = json.loads((ev / "policy" / "prove-policy-tamper-latest.json").read_text())
    assert set(proof["tampers"]) == set(TAMPERS)
    for kind, r in proof["tampers"].items():
        assert r["verify_rc"] == 1 and r["caught"] is True, kind
        job = r["job"]
        assert job["outcome"] == "violation" and job["policy"]["refused"]["code"] == TAMPERS[kind], kind
        assert job["policy"]["source"] == "last_good" and job["budgets"] == proof["baseline"]["budgets"], kind
    assert proof["restored"]["policy"]["source"] == "signed"
    assert (ev / "status-before.json").exists() and (ev / "status-after.json").exists()


def test_policy_signature_drill_fails_on_an_untrusted_deployed_policy(st: Stack, tmp_path: Path) -> None:
    # The deployment's budgets file is a bundle signed by a key the config does not trust.
    keys = _Keys()
    try:
        b = tmp_path / "deployed"
        b.mkdir()
        (b / "budgets.json").write_text(json.dumps({"budgets": []}))
        sign_bundle(b, ["budgets.json"], keys.untrusted)
    finally:
        keys.close()
    env = {"SPOTEX_JOBS__BUDGETS_FILE": str(b / "budgets.json"),
           "SPOTEX_SECURITY__POLICY_SIGNER_KEYS": json.dumps([keys.public_hex])}
    res, kv = _run("policy_signature.sh", st, tmp_path / "fail", **env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert kv["policy_deployed_ok"] == "false" and kv["policy_ok"] == "false"
    assert kv["runbook_policy_signature_ok"] == "false" and kv["recommended_action"] == "RESTORE_SIGNED_POLICY"
    smoke = json.loads((tmp_path / "fail" / "policy-smoke" / "policy-smoke-latest.json").read_text())
    assert smoke["deployed_policy"]["policy"]["refused"]["code"] == "UNKNOWN_SIGNER"

    res, kv = _run("policy_signature.sh", st, tmp_path / "allowed", RUNBOOK_ALLOW_POLICY_FAIL="true", **env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["runbook_policy_signature_ok"] == "false" and kv["policy_fail_allowed"] == "true"
    s = json.loads((tmp_path / "allowed" / "policy-signature-summary.json").read_text())
    assert s["policy_ok"] is False and s["fail_allowed"] is True
