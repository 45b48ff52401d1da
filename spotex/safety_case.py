"""``make safety-case`` / ``spotex safety-case`` (seed §10): the release's safety case.

Collects the newest evidence under the build directory (drill evidence under runbooks/, the
verification factory's reports, DR, load, snapshot, security scans, policy, bench JSON) into
``<out>/manifest.json`` (per file: path, source, sha256, size, mtime, age), a tarball
``<out>/safety-case-<commit>.tar.gz`` holding the manifest and every listed file, and
``<out>/safety-case-<commit>.tar.gz.sha256`` (``sha256sum -c`` format).

Of stamped families (``foo-20261124T025838Z-184.json``) only the newest file is taken.

The gate: every item of the required list (``REQUIRED``; docs/verification.md) must be present, no
older than its max age (default ``--max-age-hours`` 168) and, where the item names one, its verdict
field must be true (a present but failed proof is not evidence of safety). Each miss prints one line
``safety_case_missing=<name> reason=<MISSING|STALE|FAILED|UNREADABLE> ...``; then
``safety_case_ok=false`` and exit 1 (``--allow-missing``: the same lines, exit 0). The bundle is
written in both cases, with the gate's verdict in the manifest.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import re
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.checks import dotted_get

__all__ = ["REQUIRED", "SOURCES", "Required", "build_safety_case", "check_required", "collect"]

# source name -> globs under the build dir
SOURCES: dict[str, tuple[str, ...]] = {
    "runbooks": ("runbooks/**/*.json", "runbooks/**/*.jsonl"),
    "verification": ("verification/*.json", "verification/checks/*.json"),
    "dr": ("dr/**/*.json",),
    "load": ("load/**/*.json",),
    "snapshot": ("snapshot/**/*.json",),
    "security": ("security/**/*.json",),
    "policy": ("policy/**/*.json", "policy/**/*.sig", "policy/**/MANIFEST*"),
    "bench": ("bench/**/*.json", "bench*.json"),
}
STAMP = re.compile(r"\d{8}T\d{6}Z(-\d+)?")


@dataclass(frozen=True)
class Required:
    name: str
    path: str  # glob under the build dir; the newest match is judged
    field: str | None = None  # must be JSON true (dotted path)
    min_field: tuple[str, int] | None = None  # (dotted path, minimum)


# The release gate's required evidence (docs/verification.md "Safety case").
REQUIRED: tuple[Required, ...] = (
    Required("verification_factory", "verification/verification-factory-latest.json", "verification_factory_ok"),
    Required("exactly_once_million", "runbooks/exactly-once-million/exactly-once-million-summary.json",
             "exactly_once_million_ok", ("trades", 1_000_000)),
    Required("adversarial_reliability", "runbooks/adversarial-reliability/adversarial-reliability-summary.json",
             "adversarial_ok"),
    Required("policy_tamper", "runbooks/policy-tamper/policy-tamper-summary.json", "policy_tamper_ok"),
    Required("audit_chain_tamper", "runbooks/audit-chain-tamper/audit-chain-tamper-summary.json",
             "runbook_audit_tamper_ok"),
    Required("dr_rehearsal", "dr/dr-report.json", "dr_rehearsal_ok"),
    Required("load_regression", "runbooks/load-regression/load-all-latest.json", "load_regression_ok"),
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _newest(build: Path, pattern: str) -> Path | None:
    files = [Path(p) for p in glob.glob(str(build / pattern), recursive=True) if Path(p).is_file()]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def collect(build: Path, out: Path, now: float) -> list[dict[str, Any]]:
    """Every evidence file (newest of each stamped family), with its source, sha256, size and age."""
    chosen: dict[str, Path] = {}
    source_of: dict[str, str] = {}
    out_r = out.resolve()
    for source, patterns in SOURCES.items():
        for pattern in patterns:
            for p in (Path(x) for x in glob.glob(str(build / pattern), recursive=True)):
                if not p.is_file() or out_r in p.resolve().parents:
                    continue
                rel = p.relative_to(build).as_posix()
                family = STAMP.sub("*", rel)
                old = chosen.get(family)
                if old is None or p.stat().st_mtime > old.stat().st_mtime:
                    chosen[family] = p
                    source_of[family] = source
    rows = []
    for family, p in sorted(chosen.items()):
        st = p.stat()
        rows.append({"path": p.relative_to(build).as_posix(), "source": source_of[family], "sha256": _sha256(p),
                     "size": st.st_size, "mtime": st.st_mtime, "age_s": round(now - st.st_mtime, 1)})
    return rows


def check_required(build: Path, required: tuple[Required, ...], max_age_s: float, now: float) -> list[dict[str, Any]]:
    """One row per required item: ok, or the reason it blocks the release."""
    rows = []
    for req in required:
        p = _newest(build, req.path)
        row: dict[str, Any] = {"name": req.name, "path": req.path, "file": None, "ok": False}
        if p is None:
            row["reason"] = "MISSING"
        else:
            age = now - p.stat().st_mtime
            row.update(file=p.relative_to(build).as_posix(), age_s=round(age, 1))
            if age > max_age_s:
                row.update(reason="STALE", detail=f"age {age / 3600:.1f} h > max {max_age_s / 3600:.1f} h")
            else:
                try:
                    data = json.loads(p.read_text())
                    if req.field is not None and dotted_get(data, req.field) is not True:
                        row.update(reason="FAILED", detail=f"{req.field}={dotted_get(data, req.field)!r}")
                    elif req.min_field is not None and not int(dotted_get(data, req.min_field[0])) >= req.min_field[1]:
                        row.update(reason="FAILED", detail=f"{req.min_field[0]}={dotted_get(data, req.min_field[0])!r} "
                                                           f"< {req.min_field[1]}")
                    else:
                        row["ok"] = True
                except (ValueError, KeyError, TypeError) as exc:
                    row.update(reason="UNREADABLE", detail=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return rows


def _commit(repo: Path) -> tuple[str, bool]:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", True
    if head.returncode != 0:
        return "unknown", True
    return head.stdout.strip(), bool(dirty.stdout.strip())


def build_safety_case(build: Path, out: Path, *, max_age_s: float = 168 * 3600,
                      required: tuple[Required, ...] = REQUIRED, repo: Path | None = None,
                      now: float | None = None) -> dict[str, Any]:
    """Write manifest.json, the tarball and its .sha256 under ``out``; return the manifest (with
    ``safety_case_ok`` and the gate rows)."""
    now = time.time() if now is None else now
    build = build.resolve()
    out.mkdir(parents=True, exist_ok=True)
    commit, dirty = _commit(repo or Path.cwd())
    files = collect(build, out, now)
    gate = check_required(build, required, max_age_s, now)
    ok = all(r["ok"] for r in gate)
    tar_name = f"safety-case-{commit}.tar.gz"
    manifest = {"safety_case_ok": ok, "commit": commit, "worktree_dirty": dirty, "created_at": now,
                "created_at_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "build_dir": str(build),
                "max_age_s": max_age_s, "required": gate, "missing": [r for r in gate if not r["ok"]],
                "file_count": len(files), "files": files, "bundle": tar_name}
    text = json.dumps(manifest, indent=2, sort_keys=True)
    (out / "manifest.json").write_text(text)
    tar_path = out / tar_name
    tmp = tar_path.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        info = tarfile.TarInfo("manifest.json")
        data = text.encode()
        info.size, info.mtime = len(data), int(now)
        tar.addfile(info, io.BytesIO(data))
        for f in files:
            tar.add(build / f["path"], arcname=f"evidence/{f['path']}", recursive=False)
    tmp.replace(tar_path)
    digest = _sha256(tar_path)
    (out / f"{tar_name}.sha256").write_text(f"{digest}  {tar_name}\n")
    manifest["bundle_sha256"] = digest
    return manifest
