"""``spotex drill verification-factory`` / ``./scripts/verification_factory.sh`` (seed §4.0 "Shared
verification bundle").

Without flags it runs the quick always-on checks against one stack (the one in SPOTEX_DATA_DIR /
``--data-dir``, else a fresh one it starts and stops):

- ``status_before``: ``spotex status --json`` (the stack is healthy before anything runs);
- ``audit_self_test_change`` (only on a stack the factory started itself, whose audit chains are
  empty): one real change through the governed path (propose ``throttle-clear:SYM``, two approvals,
  apply with verification), so both chains hold events for ``--require-events``. On an operator's
  stack this step never runs: an empty chain there is a finding;
- ``audit_admin`` / ``audit_change``: ``spotex audit verify --require-events [--chain change]``;
- ``pii_scan``: ``spotex logs pii-scan`` (success line ``pii_log_scan_ok=true``);
- ``ledger_invariants``: ``spotex ledger invariants --json`` (exit 0, ``"ok": true``);
- ``export_verify``, ``jobs_invariants``, ``jobs_anomaly``: the producers of the default safety
  budgets' evidence, run now so the budget judges fresh evidence;
- ``safety_budget``: ``spotex jobs run safety_budget`` (outcome ``ok``);
- ``status_after``: ``spotex status --json`` healthy at the end.

Each ``--run-*`` flag adds a drill, run through its seed entrypoint (runbooks/*.sh) against the same
stack, with its evidence under ``--runbooks-out/<drill>``; drills run before the quick checks so the
audit verify, the invariants and the budget judge what the drills did. A drill whose entrypoint is
not in this checkout is reported ``not_available`` with the reason, which is not a pass.

The report goes to ``<out>/verification-factory-<stamp>.json`` and ``-latest.json``: per step the
command, exit code, seconds, the success line expected and whether it was seen, status
(``passed``/``failed``/``not_available``) and evidence paths. ``verification_factory_ok=true`` is
printed only when every selected step passed; otherwise false and exit 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DRILLS", "Step", "StepResult", "build_report", "drill_steps", "run_factory"]

ROOT = Path(__file__).resolve().parents[1]
SPOTEX = [sys.executable, "-m", "spotex"]


@dataclass
class Step:
    name: str
    kind: str  # "quick" | "drill"
    cmd: list[str]
    success: str | None = None  # the success line that must be printed (exit 0 is always required)
    timeout: float = 600
    env: dict[str, str] = field(default_factory=dict)
    evidence_dir: Path | None = None
    check: Callable[[subprocess.CompletedProcess[str]], str | None] | None = None  # extra check: failure reason
    not_available: str | None = None
    stdout_to: Path | None = None  # keep stdout as evidence


@dataclass
class StepResult:
    name: str
    kind: str
    command: list[str]
    status: str  # passed | failed | not_available
    exit_code: int | None = None
    seconds: float = 0.0
    success_line: str | None = None
    success_line_seen: bool | None = None
    reason: str | None = None
    evidence: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# flag -> (drill name, seed entrypoint, success line)
DRILLS: dict[str, tuple[str, str, str]] = {
    "startup-guardrails": ("startup-guardrails", "runbooks/startup_guardrails.sh",
                           "runbook_startup_guardrails_ok=true"),
    "change-workflow": ("change-workflow", "runbooks/change_workflow.sh", "runbook_change_workflow_ok=true"),
    "policy-signature": ("policy-signature", "runbooks/policy_signature.sh", "runbook_policy_signature_ok=true"),
    "policy-tamper": ("policy-tamper", "runbooks/policy_tamper.sh", "runbook_policy_tamper_ok=true"),
    "network-partition": ("network-partition", "runbooks/network_partition.sh", "runbook_network_partition_ok=true"),
    "redpanda-bounce": ("redpanda-broker-bounce", "runbooks/redpanda_broker_bounce.sh",
                        "runbook_redpanda_broker_bounce_ok=true"),
    "exactly-once-runbook": ("exactly-once-runbook", "runbooks/exactly_once_million_failure.sh",
                             "exactly_once_million_ok=true"),
    "mapping-integrity-runbook": ("mapping-integrity-failure", "runbooks/mapping_integrity_failure.sh",
                                  "runbook_mapping_integrity_failure_ok=true"),
    "idempotency-latch-runbook": ("idempotency-latch-failure", "runbooks/idempotency_latch_failure.sh",
                                  "runbook_idempotency_latch_failure_ok=true"),
    "determinism": ("determinism", "", "sim_ok=true"),
    "exactly-once-million": ("exactly-once-million", "runbooks/exactly_once_million_failure.sh",
                             "exactly_once_million_ok=true"),
    "adversarial": ("adversarial-reliability", "runbooks/adversarial_reliability.sh",
                    "runbook_adversarial_reliability_ok=true"),
}


def _spotex(data_dir: Path, *args: str) -> list[str]:
    return [*SPOTEX, *args, "--data-dir", str(data_dir)]


def _json_ok(res: subprocess.CompletedProcess[str]) -> str | None:
    try:
        data = json.loads(res.stdout)
    except ValueError:
        return "output is not JSON"
    return None if data.get("ok") is True else f"ok={data.get('ok')!r}"


def _job_ok(res: subprocess.CompletedProcess[str]) -> str | None:
    """``spotex jobs run``: its output JSON, then ``job_outcome=...``."""
    try:
        data = json.loads(res.stdout[: res.stdout.rfind("}") + 1])
    except ValueError:
        return "output is not JSON"
    if data.get("outcome") == "ok":
        return None
    out = data.get("output") or {}
    bad = [f"{v.get('name')}:{v.get('reason')}" for v in out.get("violations") or []][:8]
    return (f"outcome={data.get('outcome')} recommended_action={out.get('recommended_action')}"
            + (f" violations={','.join(bad)}" if bad else ""))


def _healthy(res: subprocess.CompletedProcess[str]) -> str | None:
    try:
        data = json.loads(res.stdout)
    except ValueError:
        return "status output is not JSON"
    if data.get("healthy") is True:
        return None
    bad = [c.get("name") for c in data.get("components") or [] if not c.get("healthy", c.get("ok", True))]
    return f"stack not healthy ({', '.join(str(b) for b in bad) or 'see status JSON'})"


def quick_steps(data_dir: Path, out: Path, budgets: str | None) -> list[Step]:
    ev = out / "checks"
    budget_args = ["--budgets", budgets] if budgets else []
    return [
        Step("audit_admin", "quick", _spotex(data_dir, "audit", "verify", "--require-events", "--json"),
             stdout_to=ev / "audit-admin.json"),
        Step("audit_change", "quick", _spotex(data_dir, "audit", "verify", "--chain", "change", "--require-events",
                                              "--json"), stdout_to=ev / "audit-change.json"),
        Step("pii_scan", "quick", _spotex(data_dir, "logs", "pii-scan", "--out", str(ev / "pii-log-scan.json")),
             success="pii_log_scan_ok=true"),
        Step("ledger_invariants", "quick", _spotex(data_dir, "ledger", "invariants", "--json"), check=_json_ok,
             stdout_to=ev / "ledger-invariants.json"),
        Step("export_verify", "quick", _spotex(data_dir, "export", "verify"), success="export_verify_ok=true"),
        Step("jobs_invariants", "quick", _spotex(data_dir, "jobs", "run", "invariants"), success="job_outcome=ok",
             check=_job_ok, stdout_to=ev / "jobs-invariants.txt"),
        Step("jobs_anomaly", "quick", _spotex(data_dir, "jobs", "run", "anomaly"), success="job_outcome=ok",
             check=_job_ok, stdout_to=ev / "jobs-anomaly.txt"),
        Step("safety_budget", "quick", _spotex(data_dir, "jobs", "run", "safety_budget", *budget_args),
             success="job_outcome=ok", check=_job_ok, stdout_to=ev / "safety-budget.txt"),
    ]


def drill_steps(selected: list[str], data_dir: Path, runbooks_out: Path, eom_trades: int) -> list[Step]:
    steps: list[Step] = []
    base_env = {"SPOTEX_DATA_DIR": str(data_dir)}
    for flag in selected:
        name, entry, success = DRILLS[flag]
        out = runbooks_out / name
        env = {**base_env, "SPOTEX_RUNBOOK_OUT": str(out)}
        if entry and not (ROOT / entry).exists():
            steps.append(Step(name, "drill", [str(ROOT / entry)], not_available=f"{entry} is not in this checkout"))
        elif flag == "determinism":
            steps.append(Step("determinism_sim", "drill", [*SPOTEX, "sim", "--seeds", "200"], success="sim_ok=true",
                              stdout_to=out / "sim.txt"))
            steps.append(Step("determinism_replicas", "drill", [*SPOTEX, "core", "hash", "--json"], evidence_dir=out))
        elif flag == "exactly-once-runbook":
            steps.append(Step(name, "drill", [str(ROOT / entry), "--trades", str(eom_trades)], success, timeout=3600,
                              env=env, evidence_dir=out))
        elif flag == "exactly-once-million":
            steps.append(Step(name, "drill", [str(ROOT / entry)], success, timeout=4 * 3600, env=env,
                              evidence_dir=out))
        elif flag == "adversarial":
            steps.append(Step(name, "drill", [str(ROOT / entry), "--eo-trades", str(min(eom_trades, 20_000))],
                              success, timeout=3600, env=env, evidence_dir=out))
        else:
            steps.append(Step(name, "drill", [str(ROOT / entry)], success, timeout=3600, env=env, evidence_dir=out))
    for s in steps:  # each drill's own key=value output is kept next to its evidence
        if s.stdout_to is None and s.not_available is None and s.evidence_dir is not None:
            s.stdout_to = s.evidence_dir / "factory-stdout.txt"
    return steps


def _files(d: Path | None) -> list[str]:
    if d is None or not d.exists():
        return []
    return sorted(str(p) for p in d.rglob("*") if p.is_file())[:200]


def run_step(step: Step) -> StepResult:
    r = StepResult(step.name, step.kind, step.cmd, "failed", success_line=step.success)
    if step.not_available:
        r.status, r.reason = "not_available", step.not_available
        print(f"step_{step.name}=not_available reason={step.not_available}", flush=True)
        return r
    t0 = time.monotonic()
    env = {**os.environ, **step.env}
    try:
        res = subprocess.run(step.cmd, capture_output=True, text=True, timeout=step.timeout, env=env, cwd=os.getcwd())
    except subprocess.TimeoutExpired:
        r.seconds = round(time.monotonic() - t0, 2)
        r.reason = f"timed out after {step.timeout:.0f}s"
        print(f"step_{step.name}=failed reason={r.reason}", flush=True)
        return r
    r.seconds = round(time.monotonic() - t0, 2)
    r.exit_code = res.returncode
    if step.stdout_to is not None:
        step.stdout_to.parent.mkdir(parents=True, exist_ok=True)
        step.stdout_to.write_text(res.stdout)
        r.evidence.append(str(step.stdout_to))
    if step.success is not None:
        r.success_line_seen = step.success in {ln.strip() for ln in res.stdout.splitlines()}
    reasons = []
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or res.stdout.strip().splitlines() or [""])[-1]
        reasons.append(f"exit {res.returncode}: {tail[:300]}")
    if step.success is not None and not r.success_line_seen:
        reasons.append(f"success line {step.success!r} not printed")
    if step.check is not None:
        why = step.check(res)
        if why:
            reasons.append(why)
    r.evidence += _files(step.evidence_dir)
    for ln in res.stdout.splitlines():
        if ln.startswith("evidence=") or (ln.endswith(".json") and "=" in ln and "/" in ln):
            p = ln.split("=", 1)[1].strip()
            if Path(p).exists() and p not in r.evidence:
                r.evidence.append(p)
    r.evidence = list(dict.fromkeys(r.evidence))
    r.status = "failed" if reasons else "passed"
    r.reason = "; ".join(reasons) or None
    print(f"step_{step.name}={r.status} exit={r.exit_code} seconds={r.seconds}"
          + (f" reason={r.reason}" if r.reason else ""), flush=True)
    return r


def _status(data_dir: Path, out: Path, label: str) -> StepResult:
    path = out / f"status-{label}.json"
    step = Step(f"status_{label}", "quick", _spotex(data_dir, "status", "--json"), check=_healthy, stdout_to=path)
    return run_step(step)


def _replicas(data_dir: Path, out: Path) -> StepResult:
    """Both core replicas replay to the same state hash at the same sequence (a few tries: a live
    stack may move between the two reads)."""
    step_cmd = _spotex(data_dir, "core", "hash", "--json")
    r = StepResult("determinism_replicas", "drill", [*step_cmd, "--node", "core|core-standby"], "failed")
    t0 = time.monotonic()
    seen: list[dict[str, Any]] = []
    for _ in range(5):
        a = subprocess.run(step_cmd, capture_output=True, text=True, timeout=300)
        b = subprocess.run([*step_cmd, "--node", "core-standby"], capture_output=True, text=True, timeout=300)
        r.exit_code = a.returncode or b.returncode
        if r.exit_code:
            r.reason = f"core hash exit {r.exit_code}: {(a.stderr or b.stderr).strip()[-300:]}"
            break
        ha, hb = json.loads(a.stdout), json.loads(b.stdout)
        seen.append({"core": ha, "core-standby": hb})
        if ha["last_seq"] == hb["last_seq"]:
            if ha["state_hash"] == hb["state_hash"]:
                r.status, r.reason = "passed", None
            else:
                r.reason = f"state hashes differ at seq {ha['last_seq']}"
            break
        time.sleep(1)
    else:
        r.reason = "the replicas never showed the same sequence in 5 tries"
    r.seconds = round(time.monotonic() - t0, 2)
    path = out / "determinism" / "replica-hashes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(seen, indent=2, sort_keys=True))
    r.evidence.append(str(path))
    print(f"step_{r.name}={r.status}" + (f" reason={r.reason}" if r.reason else ""), flush=True)
    return r


def _self_test_change(data_dir: Path, out: Path, symbol: str) -> StepResult:
    """A real governed change on a stack the factory started: propose, two approvals, apply+verify."""
    t0 = time.monotonic()
    tag = uuid.uuid4().hex[:8]
    cmds: list[list[str]] = [_spotex(data_dir, "change", "propose", "--op", f"throttle-clear:{symbol}",
                                     "--actor", "verification-factory", "--reason", "verification factory self-test",
                                     "--ticket", f"VF-{tag}", "--ttl-sec", "600", "--json")]
    r = StepResult("audit_self_test_change", "quick", cmds[0], "failed")
    log: list[dict[str, Any]] = []
    res = subprocess.run(cmds[0], capture_output=True, text=True, timeout=120)
    log.append({"cmd": cmds[0], "rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr})
    if res.returncode == 0:
        cid = json.loads(res.stdout)["id"]
        for cmd in (_spotex(data_dir, "change", "approve", cid, "--actor", "vf-approver-1"),
                    _spotex(data_dir, "change", "approve", cid, "--actor", "vf-approver-2"),
                    _spotex(data_dir, "change", "apply", cid, "--actor", "vf-applier")):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            log.append({"cmd": cmd, "rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr})
            if res.returncode:
                break
    r.exit_code = res.returncode
    ok = res.returncode == 0 and "change_ok=true" in res.stdout
    r.status = "passed" if ok else "failed"
    r.reason = None if ok else f"exit {res.returncode}: {(res.stderr or res.stdout).strip()[-300:]}"
    r.seconds = round(time.monotonic() - t0, 2)
    path = out / "checks" / "audit-self-test-change.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(log, indent=2))
    r.evidence.append(str(path))
    print(f"step_{r.name}={r.status}" + (f" reason={r.reason}" if r.reason else ""), flush=True)
    return r


def build_report(results: list[StepResult], meta: dict[str, Any]) -> dict[str, Any]:
    """The factory's verdict: ok only when every step passed (not_available is not a pass)."""
    failed = [r.name for r in results if r.status == "failed"]
    unavailable = [r.name for r in results if r.status == "not_available"]
    ok = bool(results) and not failed and not unavailable
    return {**meta, "verification_factory_ok": ok, "step_count": len(results), "failed_steps": failed,
            "not_available_steps": unavailable, "steps": [vars(r) for r in results]}


def run_factory(data_dir: Path, out: Path, selected: list[str], self_started: bool, *, runbooks_out: Path,
                eom_trades: int = 20_000, budgets: str | None = None, symbol: str = "BTC-USDT") -> bool:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    started = time.time()
    print(f"verification_factory_data_dir={data_dir} self_started={'true' if self_started else 'false'} "
          f"selected={','.join(selected) or '-'}", flush=True)
    results = [_status(data_dir, out, "before")]
    for step in drill_steps(selected, data_dir, runbooks_out, eom_trades):
        if step.name == "determinism_replicas":
            results.append(_replicas(data_dir, runbooks_out))
        else:
            results.append(run_step(step))
    if self_started:
        results.append(_self_test_change(data_dir, out, symbol))
    results += [run_step(s) for s in quick_steps(data_dir, out, budgets)]
    results.append(_status(data_dir, out, "after"))
    report = build_report(results, {"stamp": stamp, "started_at": started, "finished_at": time.time(),
                                    "data_dir": str(data_dir), "self_started": self_started, "selected": selected,
                                    "eom_trades": eom_trades, "budgets": budgets, "cwd": os.getcwd()})
    path = out / f"verification-factory-{stamp}.json"
    text = json.dumps(report, indent=2, sort_keys=True, default=str)
    path.write_text(text)
    (out / "verification-factory-latest.json").write_text(text)
    ok = bool(report["verification_factory_ok"])
    print(f"verification_factory_failed_steps={','.join(report['failed_steps']) or '-'}", flush=True)
    print(f"verification_factory_not_available={','.join(report['not_available_steps']) or '-'}", flush=True)
    print(f"verification_factory_report={path}", flush=True)
    print(f"verification_factory_ok={'true' if ok else 'false'}", flush=True)
    return ok
