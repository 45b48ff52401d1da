"""The signed policy bundle (jobs/policy.py, docs/policy.md): real files, real Ed25519 signatures.
Each tamper kind is detected by verify with its reason; the jobs' loader refuses it and keeps the
last good policy (or the defaults); production refuses an unsigned policy at start-up in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jobs.checks import DEFAULT_BUDGETS, JobContext, check_freshness, check_safety_budget
from jobs.policy import (
    MANIFEST,
    REASONS,
    SIGNATURE,
    PolicyError,
    load_policy,
    sign_bundle,
    trusted_keys,
    verify_bundle,
)
from runbooks.guardrails_drill import SAFE_PRODUCTION_ENV as SAFE
from runbooks.policy_drills import TAMPERS, _Keys, _tamper
from spotex import guardrails
from spotex.config import load_config
from spotex.testing import spotex_cli

BUDGETS = [
    {"name": "invariants_ok", "evidence": "jobs/invariants-latest.json", "field": "ok", "op": "==", "limit": True,
     "max_age_s": 900, "action": "WITHDRAW_HALT"},
]


@pytest.fixture
def keys() -> Any:
    k = _Keys()
    yield k
    k.close()


def _cfg(keys: _Keys, **env: str) -> Any:
    return load_config(None, {"SPOTEX_SECURITY__POLICY_SIGNER_KEYS": json.dumps([keys.public_hex]), **env})


def _bundle(root: Path, keys: _Keys) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "budgets.json").write_text(json.dumps({"budgets": BUDGETS}, indent=2))
    sign_bundle(root, ["budgets.json"], keys.trusted)
    return root / "budgets.json"


def _ctx(tmp: Path, cfg: Any, budgets_file: Path) -> JobContext:
    (tmp / "ev" / "jobs").mkdir(parents=True, exist_ok=True)
    (tmp / "ev" / "jobs" / "invariants-latest.json").write_text(json.dumps({"ok": True}))
    return JobContext(cfg=cfg, pg_dsn=None, nats_url=None, data_dir=tmp / "data", evidence_dir=tmp / "ev" / "jobs",
                      budgets_file=str(budgets_file))


def test_sign_then_verify_names_the_signer(tmp_path: Path, keys: _Keys) -> None:
    f = _bundle(tmp_path / "b", keys)
    res = verify_bundle(f.parent, trusted_keys(_cfg(keys)), require=["budgets.json"])
    assert res["key_id"] == keys.key_id and [x["path"] for x in res["files"]] == ["budgets.json"]
    manifest = json.loads((f.parent / MANIFEST).read_bytes())
    assert manifest["files"][0]["sha256"] == res["files"][0]["sha256"]


@pytest.mark.parametrize(("kind", "code"), sorted(TAMPERS.items()))
def test_each_tamper_is_detected_with_its_reason(tmp_path: Path, keys: _Keys, kind: str, code: str) -> None:
    f = _bundle(tmp_path / "b", keys)
    _tamper(f.parent, kind, keys)
    with pytest.raises(PolicyError) as ei:
        verify_bundle(f.parent, trusted_keys(_cfg(keys)), require=["budgets.json"])
    assert ei.value.code == code, ei.value.line()
    assert REASONS[code] in ei.value.line()


def test_file_outside_manifest_untrusted_keys_and_path_escape(tmp_path: Path, keys: _Keys) -> None:
    f = _bundle(tmp_path / "b", keys)
    tk = trusted_keys(_cfg(keys))
    with pytest.raises(PolicyError, match="not covered") as ei:
        verify_bundle(f.parent, tk, require=["other.json"])
    assert ei.value.code == "NOT_IN_MANIFEST"
    with pytest.raises(PolicyError) as ei:
        verify_bundle(f.parent, {})
    assert ei.value.code == "NO_TRUSTED_KEYS"
    # A signed manifest naming a file outside the bundle is refused, never read.
    m = json.loads((f.parent / MANIFEST).read_bytes())
    m["files"][0]["path"] = "../outside.json"
    body = json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
    (f.parent / MANIFEST).write_bytes(body)
    sig = json.loads((f.parent / SIGNATURE).read_text())
    sig["signature"] = keys.trusted.sign(body).hex()
    (f.parent / SIGNATURE).write_text(json.dumps(sig))
    with pytest.raises(PolicyError) as ei:
        verify_bundle(f.parent, tk)
    assert ei.value.code == "MANIFEST_INVALID"


async def test_safety_budget_loads_a_signed_policy_and_refuses_a_tampered_one(tmp_path: Path, keys: _Keys) -> None:
    f = _bundle(tmp_path / "b", keys)
    ctx = _ctx(tmp_path, _cfg(keys), f)
    good = await check_safety_budget(ctx)
    assert good.outcome == "ok", good.output
    assert good.output["policy"]["source"] == "signed" and good.output["policy"]["key_id"] == keys.key_id
    assert [r["name"] for r in good.output["results"]] == ["invariants_ok"]

    # A loosened limit: refused; the last verified budgets are kept, the job says so.
    _tamper(f.parent, "limit_changed", keys)
    bad = await check_safety_budget(ctx)
    assert bad.outcome == "violation"
    pol = bad.output["policy"]
    assert pol["refused"]["code"] == "FILE_HASH_MISMATCH" and pol["source"] == "last_good"
    assert pol["last_good"]["key_id"] == keys.key_id
    assert [r["name"] for r in bad.output["results"]] == ["invariants_ok"]
    assert bad.output["recommended_action"] == "RESTORE_SIGNED_POLICY"
    fresh = await check_freshness(ctx)
    assert fresh.outcome == "violation" and fresh.output["policy"]["refused"]["code"] == "FILE_HASH_MISMATCH"

    # The same tamper at a path that never verified: the built-in defaults.
    other = tmp_path / "b2"
    shutil.copytree(f.parent, other)
    ctx.budgets_file = str(other / "budgets.json")
    res = await check_safety_budget(ctx)
    assert res.output["policy"]["source"] == "defaults_after_refusal"
    assert len(res.output["results"]) == len(DEFAULT_BUDGETS)


def test_unsigned_policy_is_used_in_dev_and_refused_in_production(tmp_path: Path, keys: _Keys) -> None:
    f = tmp_path / "budgets.json"
    f.write_text(json.dumps({"budgets": BUDGETS}))
    dev = load_policy(str(f), _cfg(keys), tmp_path / "data")
    assert dev.info["source"] == "unsigned" and not dev.refused and dev.budgets == BUDGETS
    prod = load_policy(str(f), _cfg(keys), tmp_path / "data", production=True)
    assert prod.refused and prod.info["refused"]["code"] == "UNSIGNED"
    assert prod.info["source"] == "defaults_after_refusal"
    # Invalid content in a correctly signed bundle is refused too.
    b = tmp_path / "b"
    b.mkdir()
    (b / "budgets.json").write_text(json.dumps({"budgets": [{"name": "x"}]}))
    sign_bundle(b, ["budgets.json"], keys.trusted)
    bad = load_policy(str(b / "budgets.json"), _cfg(keys), None)
    assert bad.info["refused"]["code"] == "POLICY_INVALID"


def test_guardrail_refuses_unsigned_policy_in_production(tmp_path: Path, keys: _Keys) -> None:
    f = tmp_path / "budgets.json"
    f.write_text(json.dumps({"budgets": BUDGETS}))
    env = {**SAFE, "SPOTEX_JOBS__BUDGETS_FILE": str(f)}
    lines = guardrails.check(load_config(None, env), "jobs")
    assert lines == [f"refusing to start jobs in production: policy {f}: unsigned (no {MANIFEST} beside it)"]
    signed = _bundle(tmp_path / "b", keys)
    ok_env = {**env, "SPOTEX_JOBS__BUDGETS_FILE": str(signed),
              "SPOTEX_SECURITY__POLICY_SIGNER_KEYS": json.dumps([keys.public_hex])}
    assert guardrails.check(load_config(None, ok_env), "jobs") == []
    cfg = load_config(None, ok_env)
    assert guardrails.check(msgspec.structs.replace(cfg, env="dev"), "jobs") == []
    # The real CLI: `serve jobs` exits 3 with the one line.
    res = spotex_cli("serve", "jobs", "--data-dir", str(tmp_path / "d"), env=env, timeout=60)
    assert res.returncode == 3, res.stderr
    refusals = [ln for ln in res.stderr.splitlines() if "policy" in ln]
    assert refusals == [f"spotex: refusing to start jobs in production: policy {f}: unsigned (no {MANIFEST} beside it)"]


def test_cli_sign_and_verify(tmp_path: Path, keys: _Keys) -> None:
    b = tmp_path / "b"
    b.mkdir()
    (b / "budgets.json").write_text(json.dumps({"budgets": BUDGETS}))
    dd = ["--data-dir", str(tmp_path / "d")]
    env = {"SPOTEX_SECURITY__POLICY_SIGNER_KEYS": json.dumps([keys.public_hex])}
    s = spotex_cli("policy", "sign", "--key", str(keys.trusted_file), "--dir", str(b), *dd)
    assert s.returncode == 0 and f"policy_signer={keys.key_id}" in s.stdout, s.stderr
    v = spotex_cli("policy", "verify", "--dir", str(b), *dd, env=env)
    assert v.returncode == 0, v.stderr
    assert f"policy_signer={keys.key_id}" in v.stdout and "policy_verify_ok=true" in v.stdout
    _tamper(b, "file_removed", keys)
    v = spotex_cli("policy", "verify", "--dir", str(b), *dd, env=env)
    assert v.returncode == 1 and v.stdout == ""
    assert v.stderr.strip().splitlines() == [
        f"spotex: policy verify failed: {b / 'budgets.json'}: file missing (listed in the signed manifest)"]


def test_cli_defaults_to_the_configured_budgets_file(tmp_path: Path, keys: _Keys) -> None:
    b = tmp_path / "etc"
    b.mkdir()
    (b / "budgets.json").write_text(json.dumps({"budgets": BUDGETS}))
    (b / "notes.json").write_text("{}")
    env = {"SPOTEX_SECURITY__POLICY_SIGNER_KEYS": json.dumps([keys.public_hex]),
           "SPOTEX_JOBS__BUDGETS_FILE": str(b / "budgets.json")}
    dd = ["--data-dir", str(tmp_path / "d")]
    s = spotex_cli("policy", "sign", "--key", str(keys.trusted_file), *dd, env=env)
    assert s.returncode == 0 and "policy_files=budgets.json\n" in s.stdout, s.stdout + s.stderr
    assert spotex_cli("policy", "verify", *dd, env=env).returncode == 0
    # A bundle signed over other files only does not cover the configured budgets file.
    sign_bundle(b, ["notes.json"], keys.trusted)
    v = spotex_cli("policy", "verify", *dd, env=env)
    assert v.returncode == 1
    assert v.stderr.strip() == (f"spotex: policy verify failed: {b / 'budgets.json'}: "
                                "file not covered by the signed manifest")
