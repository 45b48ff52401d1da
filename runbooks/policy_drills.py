"""Policy drills (seed §4.10, §4.11; docs/policy.md).

``spotex drill policy-signature`` (``./runbooks/policy_signature.sh``): a drill signing key is
made and trusted (``[security] policy_signer_keys`` plus the drill key, for this drill only); the
drill's policy bundle (the built-in budgets whose evidence the drill refreshes: ``invariants_ok``,
``anomaly_detector_clear``) is signed with ``spotex policy sign`` and checked with
``spotex policy verify`` (child processes: the CLI is the contract); the ``invariants`` and
``anomaly`` jobs refresh their evidence and the ``safety_budget`` job, through ``run_job`` on the
stack, loads the verified policy (its output must say ``source=signed`` with the drill key id) and
judges the budgets. The deployment's own ``[jobs] budgets_file``, when set, is verified too (a
signed bundle that fails, or any failure in production, fails the drill; an unsigned file in dev
is reported). Evidence: ``policy-smoke/policy-smoke-latest.json``, ``policy-signature-summary.json``
(``policy_ok``, ``budget_ok``, ``recommended_action``), status-before/after.json. Success line
``runbook_policy_signature_ok=true``.

``spotex drill policy-tamper`` (``./runbooks/policy_tamper.sh``): the same signed bundle is loaded
once by the job (so a last good policy exists), then tampered in place, one kind at a time from the
pristine copy: a changed limit, the budgets file removed, the manifest edited to match a changed
limit, the signature removed, a re-signed bundle by an untrusted key, and an untrusted signature
claiming the trusted key id. Each must be detected by ``spotex policy verify`` (exit 1, the one
line naming the file and the expected reason) and refused by the jobs' loader (``safety_budget``
outcome ``violation``, ``policy.refused.code`` the expected one, the last good budgets kept,
``recommended_action=RESTORE_SIGNED_POLICY``). Restoring the pristine bundle verifies and loads
again. Evidence: ``policy/prove-policy-tamper-latest.json`` (each tamper, its verify line and the
job's policy block), ``policy-tamper-summary.json`` (``policy_tamper_ok``, ``tamper_detected`` true
only when every tamper was caught, ``recommended_action``), status-before/after.json. Success line
``runbook_policy_tamper_ok=true``.

Diagnostic modes ``RUNBOOK_ALLOW_POLICY_FAIL=true`` / ``RUNBOOK_ALLOW_POLICY_TAMPER_FAIL=true``:
everything runs and is recorded the same way; a failure still prints ``..._ok=false`` and is in the
summary, but the drill exits 0 (``policy_fail_allowed=true``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from runbooks.common import Drill, jobs_context

__all__ = ["DRILL_BUDGETS", "TAMPERS", "policy_signature", "policy_tamper"]

DRILL_BUDGETS = ("invariants_ok", "anomaly_detector_clear")
BUDGETS_FILE = "budgets.json"

# tamper kind -> the reason code verify and the loader must give
TAMPERS = {
    "limit_changed": "FILE_HASH_MISMATCH",
    "file_removed": "FILE_MISSING",
    "manifest_edited": "SIGNATURE_INVALID",
    "signature_removed": "UNSIGNED",
    "resigned_untrusted_key": "UNKNOWN_SIGNER",
    "forged_trusted_key_id": "SIGNATURE_INVALID",
}


def _allowed(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")


def _drill_budgets() -> list[dict[str, Any]]:
    from jobs.checks import DEFAULT_BUDGETS

    return [dict(b) for b in DEFAULT_BUDGETS if b["name"] in DRILL_BUDGETS]


class _Keys:
    """The drill's trusted signing key and an untrusted one, in a private temp dir."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from jobs.policy import key_id

        self.tmp = Path(tempfile.mkdtemp(prefix="spotex-policy-keys-"))
        self.trusted, self.untrusted = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        self.trusted_file = self.tmp / "trusted.key"
        fd = os.open(self.trusted_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.trusted.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                               serialization.NoEncryption()).hex())
        self.public_hex = self.trusted.public_key().public_bytes(serialization.Encoding.Raw,
                                                                 serialization.PublicFormat.Raw).hex()
        self.key_id = key_id(self.trusted.public_key())
        self.untrusted_id = key_id(self.untrusted.public_key())

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _trusting(d: Drill, keys: _Keys) -> Any:
    sec = msgspec.structs.replace(d.cfg.security, policy_signer_keys=[*d.cfg.security.policy_signer_keys,
                                                                       keys.public_hex])
    return msgspec.structs.replace(d.cfg, security=sec)


def _cli(d: Drill, cfg: Any, *args: str) -> dict[str, Any]:
    """``spotex policy ...`` as a child process, trusting what ``cfg`` trusts (env override)."""
    env = {**os.environ, "SPOTEX_SECURITY__POLICY_SIGNER_KEYS": json.dumps(list(cfg.security.policy_signer_keys))}
    res = subprocess.run([sys.executable, "-m", "spotex", "policy", *args, "--data-dir", str(d.data_dir)],
                         capture_output=True, text=True, timeout=120, env=env)
    kv = dict(ln.split("=", 1) for ln in res.stdout.splitlines() if "=" in ln)
    return {"argv": ["spotex", "policy", *args], "rc": res.returncode, "stdout": kv,
            "stderr": res.stderr.strip()[-1000:]}


def _write_bundle(d: Drill, root: Path, keys: _Keys, cfg: Any) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    (root / BUDGETS_FILE).write_text(json.dumps({"budgets": _drill_budgets()}, indent=2, sort_keys=True) + "\n")
    return _cli(d, cfg, "sign", "--key", str(keys.trusted_file), "--dir", str(root), "--file", BUDGETS_FILE)


async def _refresh_and_judge(d: Drill, cfg: Any, budgets_file: Path | None,
                             refresh: bool = True) -> tuple[Any, list[Any], dict[str, Any]]:
    from jobs.scheduler import run_job

    ctx, closers = await jobs_context(d)
    ctx.cfg = cfg
    ctx.evidence_dir = d.out_dir / "jobs"  # the drill budgets' globs (jobs/...) resolve under out_dir
    runs: dict[str, Any] = {}
    if refresh:
        for job in ("invariants", "anomaly"):
            r = await run_job(ctx, job, trigger="drill")
            runs[job] = {"outcome": r["outcome"], "run_id": r["run_id"],
                         "recommended_action": r["output"].get("recommended_action")}
    ctx.budgets_file = str(budgets_file) if budgets_file else None
    return ctx, closers, runs


def _budget_view(run: dict[str, Any]) -> dict[str, Any]:
    out = run["output"]
    return {"outcome": run["outcome"], "run_id": run["run_id"], "budget_ok": out.get("budget_ok"),
            "recommended_action": out.get("recommended_action"), "policy": out.get("policy"),
            "budgets": [r["name"] for r in out.get("results", [])],
            "violations": [{k: v.get(k) for k in ("name", "reason", "recommended_action")}
                           for v in out.get("violations", [])],
            "evidence": out.get("evidence")}


def _deployed_policy(d: Drill) -> dict[str, Any]:
    """The deployment's own budgets file, verified with the configured keys only."""
    from jobs.policy import MANIFEST, load_policy

    path = d.cfg.jobs.budgets_file
    if not path:
        return {"configured": False, "ok": True, "note": "no [jobs] budgets_file: the built-in budgets are used"}
    pol = load_policy(path, d.cfg, None)
    signed_bundle = (Path(path).resolve().parent / MANIFEST).exists()
    ok = pol.info.get("source") == "signed" or (not d.cfg.production and not signed_bundle
                                                 and pol.info.get("source") == "unsigned")
    return {"configured": True, "path": str(path), "ok": ok, "policy": pol.info}


async def policy_signature(d: Drill) -> bool:
    from jobs.scheduler import close_context, run_job

    allow = _allowed("RUNBOOK_ALLOW_POLICY_FAIL")
    d.status("before")
    keys = _Keys()
    cfg = _trusting(d, keys)
    bundle = d.out_dir / "policy-bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    try:
        sign = _write_bundle(d, bundle, keys, cfg)
        verify = _cli(d, cfg, "verify", "--dir", str(bundle))
        ctx, closers, refresh = await _refresh_and_judge(d, cfg, bundle / BUDGETS_FILE)
        try:
            budget = _budget_view(await run_job(ctx, "safety_budget", trigger="drill"))
        finally:
            await close_context(closers)
    finally:
        keys.close()
    deployed = _deployed_policy(d)
    pol = budget["policy"] or {}
    signed_ok = sign["rc"] == 0 and sign["stdout"].get("policy_sign_ok") == "true"
    verify_ok = (verify["rc"] == 0 and verify["stdout"].get("policy_verify_ok") == "true"
                 and verify["stdout"].get("policy_signer") == keys.key_id)
    loaded_ok = (pol.get("source") == "signed" and pol.get("key_id") == keys.key_id
                 and sorted(budget["budgets"]) == sorted(DRILL_BUDGETS))
    policy_ok = signed_ok and verify_ok and loaded_ok and bool(deployed["ok"])
    budget_ok = budget["budget_ok"] is True and budget["outcome"] == "ok"
    action = "NONE" if policy_ok and budget_ok else (
        "RESTORE_SIGNED_POLICY" if not policy_ok else str(budget["recommended_action"]))
    smoke = {"signer_key_id": keys.key_id, "signer_public_key": keys.public_hex, "bundle": str(bundle),
             "sign": sign, "verify": verify, "refresh_runs": refresh, "safety_budget": budget,
             "deployed_policy": deployed, "sign_ok": signed_ok, "verify_ok": verify_ok, "loaded_ok": loaded_ok,
             "policy_ok": policy_ok, "budget_ok": budget_ok}
    smoke_path = d.write("policy-smoke/policy-smoke-latest.json", smoke)
    ok = policy_ok and budget_ok
    d.status("after")
    summary = {"policy_signature_ok": ok, "policy_ok": policy_ok, "budget_ok": budget_ok,
               "recommended_action": action, "signer_key_id": keys.key_id, "policy_source": pol.get("source"),
               "deployed_policy_ok": deployed["ok"], "fail_allowed": allow, "policy_smoke": str(smoke_path)}
    d.write("policy-signature-summary.json", summary)
    d.emit("policy_signer", keys.key_id)
    d.emit("policy_sign_ok", signed_ok)
    d.emit("policy_verify_ok", verify_ok)
    d.emit("policy_loaded_signed", loaded_ok)
    d.emit("policy_deployed_ok", deployed["ok"])
    d.emit("policy_ok", policy_ok)
    d.emit("budget_ok", budget_ok)
    for v in budget["violations"]:
        d.emit(f"budget_violation_{v['name']}", v["reason"])
    d.emit("recommended_action", action)
    if allow and not ok:
        d.emit("policy_fail_allowed", True)
    d.emit("runbook_policy_signature_ok", ok)
    return ok or allow


def _tamper(root: Path, kind: str, keys: _Keys) -> str:
    """Apply one tamper to the bundle in ``root``; what was done."""
    from jobs.policy import MANIFEST, SIGNATURE, key_id, sign_bundle

    f = root / BUDGETS_FILE

    def loosen() -> None:
        data = json.loads(f.read_text())
        for b in data["budgets"]:
            if b["name"] == "invariants_ok":
                b["max_age_s"] = 10**9  # a stale invariants report would pass
        f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    if kind == "limit_changed":
        loosen()
        return "invariants_ok max_age_s 900 -> 1e9 in budgets.json"
    if kind == "file_removed":
        f.unlink()
        return "budgets.json deleted"
    if kind == "manifest_edited":
        import hashlib

        loosen()
        m = json.loads((root / MANIFEST).read_bytes())
        for e in m["files"]:
            if e["path"] == BUDGETS_FILE:
                e["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
                e["bytes"] = f.stat().st_size
        (root / MANIFEST).write_bytes(json.dumps(m, sort_keys=True, separators=(",", ":")).encode())
        return "budgets.json loosened and its manifest sha256 updated to match (signature kept)"
    if kind == "signature_removed":
        (root / SIGNATURE).unlink()
        return "policy.sig deleted"
    if kind == "resigned_untrusted_key":
        loosen()
        sign_bundle(root, [BUDGETS_FILE], keys.untrusted)
        return f"budgets.json loosened and the bundle re-signed by untrusted key {keys.untrusted_id}"
    if kind == "forged_trusted_key_id":
        loosen()
        sign_bundle(root, [BUDGETS_FILE], keys.untrusted)
        sig = json.loads((root / SIGNATURE).read_text())
        sig["key_id"] = key_id(keys.trusted.public_key())
        sig["public_key"] = keys.public_hex
        (root / SIGNATURE).write_text(json.dumps(sig, indent=2, sort_keys=True) + "\n")
        return "budgets.json loosened, re-signed by an untrusted key, the signature claiming the trusted key id"
    raise ValueError(kind)


async def policy_tamper(d: Drill) -> bool:
    from jobs.policy import REASONS
    from jobs.scheduler import close_context, run_job

    allow = _allowed("RUNBOOK_ALLOW_POLICY_TAMPER_FAIL")
    d.status("before")
    keys = _Keys()
    cfg = _trusting(d, keys)
    pdir = d.out_dir / "policy"
    pristine, live = pdir / "pristine", pdir / "live"
    for p in (pristine, live):
        shutil.rmtree(p, ignore_errors=True)
    results: dict[str, Any] = {}
    try:
        sign = _write_bundle(d, pristine, keys, cfg)
        shutil.copytree(pristine, live)
        ctx, closers, refresh = await _refresh_and_judge(d, cfg, live / BUDGETS_FILE)
        try:
            baseline_verify = _cli(d, cfg, "verify", "--dir", str(live))
            baseline = _budget_view(await run_job(ctx, "safety_budget", trigger="drill"))
            good_budgets = sorted(baseline["budgets"])
            for kind, code in TAMPERS.items():
                shutil.rmtree(live)
                shutil.copytree(pristine, live)
                what = _tamper(live, kind, keys)
                keep = pdir / f"tamper-{kind}"
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(live, keep)
                ver = _cli(d, cfg, "verify", "--dir", str(live))
                job = _budget_view(await run_job(ctx, "safety_budget", trigger="drill"))
                refused = (job["policy"] or {}).get("refused") or {}
                detected = ver["rc"] == 1 and REASONS[code] in ver["stderr"] and str(live) in ver["stderr"]
                loader_refused = (job["outcome"] == "violation" and refused.get("code") == code
                                  and (job["policy"] or {}).get("source") == "last_good"
                                  and sorted(job["budgets"]) == good_budgets
                                  and job["recommended_action"] in ("RESTORE_SIGNED_POLICY", "WITHDRAW_HALT",
                                                                    "CANCEL_ONLY"))
                results[kind] = {"tamper": what, "expected": code, "verify_rc": ver["rc"], "verify_line": ver["stderr"],
                                 "detected": detected, "loader_refused": loader_refused, "job": job,
                                 "caught": detected and loader_refused, "copy": str(keep)}
            shutil.rmtree(live)
            shutil.copytree(pristine, live)
            restored_verify = _cli(d, cfg, "verify", "--dir", str(live))
            restored = _budget_view(await run_job(ctx, "safety_budget", trigger="drill"))
        finally:
            await close_context(closers)
    finally:
        keys.close()
    baseline_ok = (sign["rc"] == 0 and baseline_verify["rc"] == 0
                   and (baseline["policy"] or {}).get("source") == "signed")
    restored_ok = restored_verify["rc"] == 0 and (restored["policy"] or {}).get("source") == "signed"
    tamper_detected = bool(results) and all(r["caught"] for r in results.values())
    budget_ok = baseline["budget_ok"] is True
    ok = baseline_ok and restored_ok and tamper_detected
    action = "NONE" if ok else "INVESTIGATE"
    proof = {"signer_key_id": keys.key_id, "untrusted_key_id": keys.untrusted_id, "pristine": str(pristine),
             "live": str(live), "sign": sign, "refresh_runs": refresh, "baseline_verify": baseline_verify,
             "baseline": baseline, "tampers": results, "restored_verify": restored_verify, "restored": restored,
             "baseline_ok": baseline_ok, "restored_ok": restored_ok, "tamper_detected": tamper_detected}
    proof_path = d.write("policy/prove-policy-tamper-latest.json", proof)
    d.status("after")
    summary = {"policy_tamper_ok": ok, "tamper_detected": tamper_detected, "recommended_action": action,
               "budget_ok": budget_ok, "tamper_count": len(results),
               "caught_count": sum(1 for r in results.values() if r["caught"]),
               "tampers": {k: {"expected": r["expected"], "detected": r["detected"],
                               "loader_refused": r["loader_refused"]} for k, r in results.items()},
               "fail_allowed": allow, "proof": str(proof_path)}
    d.write("policy-tamper-summary.json", summary)
    d.emit("policy_signer", keys.key_id)
    d.emit("policy_baseline_ok", baseline_ok)
    for k, r in results.items():
        d.emit(f"policy_tamper_{k}", r["caught"])
    d.emit("policy_restored_ok", restored_ok)
    d.emit("tamper_detected", tamper_detected)
    d.emit("budget_ok", budget_ok)
    d.emit("recommended_action", action)
    if allow and not ok:
        d.emit("policy_fail_allowed", True)
    d.emit("runbook_policy_tamper_ok", ok)
    return ok or allow
