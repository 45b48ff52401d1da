"""``spotex safety-case`` (seed §10) on a temp build dir with fabricated evidence files: the bundle
(manifest with sha256/age/source, tarball, .sha256) and the gate (missing, stale, failed proofs)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from spotex.safety_case import REQUIRED, build_safety_case

ROOT = Path(__file__).resolve().parents[2]

GOOD: dict[str, dict[str, object]] = {
    "verification/verification-factory-latest.json": {"verification_factory_ok": True},
    "runbooks/exactly-once-million/exactly-once-million-summary.json": {"exactly_once_million_ok": True,
                                                                        "trades": 1_000_000},
    "runbooks/adversarial-reliability/adversarial-reliability-summary.json": {"adversarial_ok": True},
    "runbooks/policy-tamper/policy-tamper-summary.json": {"policy_tamper_ok": True},
    "runbooks/audit-chain-tamper/audit-chain-tamper-summary.json": {"runbook_audit_tamper_ok": True},
    "dr/dr-report.json": {"dr_rehearsal_ok": True},
    "runbooks/load-regression/load-all-latest.json": {"load_regression_ok": True},
}


def _write(build: Path, rel: str, data: object, age_s: float = 0) -> Path:
    p = build / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data))
    if age_s:
        t = time.time() - age_s
        os.utime(p, (t, t))
    return p


def _good(build: Path) -> None:
    for rel, data in GOOD.items():
        _write(build, rel, data)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotex", "safety-case", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_required_list_covers_the_fabricated_set() -> None:
    assert {r.path for r in REQUIRED} == set(GOOD)


def test_complete_evidence_passes_and_bundles_every_file(tmp_path: Path) -> None:
    build = tmp_path / "build"
    _good(build)
    # Of a stamped family only the newest is bundled; unrelated files are not.
    old = _write(build, "runbooks/game-day-anomaly/safety-budget-20261101T000000Z-1.json", {"budget_ok": False},
                 age_s=3600)
    new = _write(build, "runbooks/game-day-anomaly/safety-budget-20261124T000000Z-2.json", {"budget_ok": True})
    _write(build, "native/something.so", {"x": 1})
    m = build_safety_case(build, build / "safety-case", repo=ROOT)
    assert m["safety_case_ok"] is True and m["missing"] == []
    paths = {f["path"]: f for f in m["files"]}
    assert set(GOOD) <= set(paths)
    assert new.relative_to(build).as_posix() in paths and old.relative_to(build).as_posix() not in paths
    assert not any(p.startswith("native/") for p in paths)
    for rel, row in paths.items():
        assert row["sha256"] == hashlib.sha256((build / rel).read_bytes()).hexdigest()
        assert row["source"] in ("runbooks", "verification", "dr") and row["age_s"] >= 0
    tar = build / "safety-case" / m["bundle"]
    assert m["bundle"] == f"safety-case-{m['commit']}.tar.gz" and m["commit"] != "unknown"
    digest, name = (build / "safety-case" / f"{m['bundle']}.sha256").read_text().split()
    assert name == m["bundle"] and digest == hashlib.sha256(tar.read_bytes()).hexdigest()
    with tarfile.open(tar) as t:
        names = set(t.getnames())
        inner = json.loads(t.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert names == {"manifest.json"} | {f"evidence/{p}" for p in paths}
    assert inner["files"] == m["files"] and inner["safety_case_ok"] is True
    assert json.loads((build / "safety-case" / "manifest.json").read_text())["files"] == m["files"]


def test_gate_names_each_missing_stale_and_failed_item(tmp_path: Path) -> None:
    build = tmp_path / "build"
    _good(build)
    (build / "dr" / "dr-report.json").unlink()  # missing
    _write(build, "runbooks/policy-tamper/policy-tamper-summary.json", {"policy_tamper_ok": True},
           age_s=200 * 3600)  # stale at the default 168 h
    _write(build, "runbooks/adversarial-reliability/adversarial-reliability-summary.json",
           {"adversarial_ok": False})  # a failed proof
    _write(build, "runbooks/exactly-once-million/exactly-once-million-summary.json",
           {"exactly_once_million_ok": True, "trades": 20_000})  # a short run is not the million
    (build / "verification" / "verification-factory-latest.json").write_text("{not json")
    res = _cli("--build-dir", str(build))
    assert res.returncode == 1, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("safety_case_missing=")]
    got = {ln.split()[0].split("=", 1)[1]: ln.split()[1] for ln in lines}
    assert got == {"dr_rehearsal": "reason=MISSING", "policy_tamper": "reason=STALE",
                   "adversarial_reliability": "reason=FAILED", "exactly_once_million": "reason=FAILED",
                   "verification_factory": "reason=UNREADABLE"}
    assert res.stdout.strip().splitlines()[-1] == "safety_case_ok=false"
    manifest = json.loads((build / "safety-case" / "manifest.json").read_text())
    assert manifest["safety_case_ok"] is False and len(manifest["missing"]) == 5
    # Configurable: a larger max age makes the old policy evidence fresh; skipped items are not judged;
    # --allow-missing reports but exits 0.
    res = _cli("--build-dir", str(build), "--max-age-hours", "300", "--skip", "dr_rehearsal", "--skip",
               "adversarial_reliability", "--skip", "exactly_once_million", "--skip", "verification_factory")
    assert res.returncode == 0 and "safety_case_ok=true" in res.stdout, res.stdout + res.stderr
    assert "safety_case_skipped=dr_rehearsal,adversarial_reliability,exactly_once_million,verification_factory" \
        in res.stdout
    res = _cli("--build-dir", str(build), "--allow-missing")
    assert res.returncode == 0 and res.stdout.strip().endswith("safety_case_ok=false")
    assert _cli("--build-dir", str(build), "--skip", "nope").returncode == 2


def test_make_safety_case_real_run(tmp_path: Path) -> None:
    """The Makefile target end to end on this checkout's build/ (whatever evidence it holds): it
    writes the bundle and its verdict matches the manifest's required rows."""
    out = tmp_path / "sc"
    res = subprocess.run(["make", "-s", "safety-case", f"SAFETY_CASE_ARGS=--out {out}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    manifest = json.loads((out / "manifest.json").read_text())
    ok = all(r["ok"] for r in manifest["required"])
    assert manifest["safety_case_ok"] is ok and (res.returncode == 0) is ok, res.stdout + res.stderr
    assert f"safety_case_ok={'true' if ok else 'false'}" in res.stdout
    assert len([ln for ln in res.stdout.splitlines() if ln.startswith("safety_case_missing=")]) == \
        len(manifest["missing"])
    assert (out / manifest["bundle"]).exists() and (out / f"{manifest['bundle']}.sha256").exists()
