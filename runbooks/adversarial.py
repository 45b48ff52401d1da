"""``spotex drill adversarial-reliability`` / ``./runbooks/adversarial_reliability.sh`` (seed §4.9).

Adversarial input scenarios re-verified as one bundle against one stack:

- ``policy``: the policy tamper drill (``spotex drill policy-tamper``): a changed limit, a removed
  file, a manifest edit and an untrusted signature are each detected and refused;
- ``ws_resume``: the WS resume-gap drill (``spotex drill ws-resume-gap-spike``): a RESUME from past
  the buffer gets Missed(HISTORY_GAP) + Snapshot, an in-buffer RESUME replays;
- ``candle``: hostile candle queries against the stack's real edge (unknown interval, limit 0, -1 and
  one past the 1,500 kept, a 30-digit limit, non-integer startTime/endTime, endTime before startTime,
  an unknown symbol): each answered with its documented problem (400 VALIDATION / 404 UNKNOWN_SYMBOL)
  or an empty list, never a 5xx; then the candle projection's own tests (tests/edge/test_marketdata.py:
  event-time closes, late and out-of-window trades, the REST problems), run by node id against the
  real MarketData;
- ``snapshot``: ``spotex core snapshot`` of the stack's core, copied; ``spotex core verify-snapshot``
  passes on the intact copy and must fail on a flipped payload byte (sidecar kept), a truncated copy
  and a sidecar naming another digest;
- ``exactly_once``: the exactly-once drill at a small size (``--eo-trades``, default 2,000, kill -9s
  and forced redelivery as in the million run).

The safety budget is judged afterwards and reported (``budget_ok``, its recommended action) but does
not decide the bundle: a fresh machine has no load-regression evidence, which is not an adversarial
failure (docs/verification.md).

Evidence in the out dir: ``adversarial-reliability-summary.json`` (``adversarial_ok``,
``failed_step_count``, ``recommended_action``), ``adversarial/adversarial-tests-latest.json`` (every
case of every scenario) and a stamped copy, status-before/after.json, each sub-drill's own evidence.
Success line ``runbook_adversarial_reliability_ok=true``. ``RUNBOOK_ALLOW_ADVERSARIAL_FAIL=true``:
a failure is recorded and printed (``..._ok=false``) but the exit status is 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runbooks.common import Drill

__all__ = ["ACTIONS", "CANDLE_NODES", "STEPS", "adversarial_reliability", "recommended_action"]

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("policy", "ws_resume", "candle", "snapshot", "exactly_once")
# The first failed step (in this order of severity) decides the recommended action.
ACTIONS = {
    "exactly_once": "WITHDRAW_HALT",
    "snapshot": "BLOCK_RELEASE_SNAPSHOT_INTEGRITY",
    "policy": "RESTORE_SIGNED_POLICY",
    "ws_resume": "INVESTIGATE_WS_RESUME",
    "candle": "INVESTIGATE_MARKETDATA",
}
CANDLE_NODES = (
    "tests/edge/test_marketdata.py::test_candles_close_on_event_time_and_ticker",
    "tests/edge/test_marketdata.py::test_rest_routes_decimal_strings_and_problems",
)


def recommended_action(failed: list[str]) -> str:
    for step in ACTIONS:
        if step in failed:
            return ACTIONS[step]
    return "NONE"


def _allowed() -> bool:
    return os.environ.get("RUNBOOK_ALLOW_ADVERSARIAL_FAIL", "").lower() in ("1", "true", "yes")


def _run(cmd: list[str], timeout: float = 1800) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, out, err = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired:
        rc, out, err = None, "", f"timed out after {timeout:.0f}s"
    return {"cmd": cmd, "rc": rc, "seconds": round(time.monotonic() - t0, 2), "stdout_tail": out[-4000:],
            "stderr_tail": err[-2000:], "lines": {ln.strip() for ln in out.splitlines()}}


def _drill_step(d: Drill, drill: str, success: str, *extra: str) -> dict[str, Any]:
    out = d.out_dir / drill
    r = _run([sys.executable, "-m", "spotex", "drill", drill, "--data-dir", str(d.data_dir), "--out", str(out),
              *extra])
    seen = success in r.pop("lines")
    return {**r, "success_line": success, "success_line_seen": seen, "ok": r["rc"] == 0 and seen,
            "evidence_dir": str(out)}


def _candle_step(d: Drill) -> dict[str, Any]:
    import httpx

    edge = d.component("edge").get("endpoint")
    sym = d.cfg.markets[0].symbol
    cases: list[tuple[str, str, int, str | None]] = [  # name, path+query, expected status, expected code
        ("bad_interval", f"/v1/markets/{sym}/candles?interval=7m", 400, "VALIDATION"),
        ("limit_zero", f"/v1/markets/{sym}/candles?interval=1m&limit=0", 400, "VALIDATION"),
        ("limit_negative", f"/v1/markets/{sym}/candles?interval=1m&limit=-1", 400, "VALIDATION"),
        ("limit_past_kept", f"/v1/markets/{sym}/candles?interval=1m&limit=1501", 400, "VALIDATION"),
        ("limit_30_digits", f"/v1/markets/{sym}/candles?interval=1m&limit={'9' * 30}", 400, "VALIDATION"),
        ("start_not_integer", f"/v1/markets/{sym}/candles?interval=1m&startTime=abc", 400, "VALIDATION"),
        ("end_float", f"/v1/markets/{sym}/candles?interval=1m&endTime=1.5", 400, "VALIDATION"),
        ("end_before_start", f"/v1/markets/{sym}/candles?interval=1m&startTime=5000&endTime=1", 200, None),
        ("unknown_symbol", "/v1/markets/NOPE-XYZ/candles?interval=1m", 404, "UNKNOWN_SYMBOL"),
        ("valid", f"/v1/markets/{sym}/candles?interval=1m&limit=5", 200, None),
    ]
    http: dict[str, Any] = {}
    http_ok = bool(edge)
    for name, path, status, code in cases if edge else []:
        try:
            resp = httpx.get(f"{edge}{path}", timeout=10)
            body = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            http[name] = {"path": path, "error": str(exc), "ok": False}
            http_ok = False
            continue
        ok = resp.status_code == status and (code is None or body.get("code") == code)
        if name == "end_before_start":
            ok = ok and body.get("candles") == []
        http[name] = {"path": path, "status": resp.status_code, "code": body.get("code") if isinstance(body, dict)
                      else None, "expected": [status, code], "ok": ok}
        http_ok = http_ok and ok
    py = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
               str(d.out_dir / "candle-pytest"), *CANDLE_NODES], timeout=600)
    py.pop("lines")
    tests_ok = py["rc"] == 0
    return {"ok": http_ok and tests_ok, "edge": edge, "http_cases": http, "http_ok": http_ok,
            "pytest": {**py, "nodes": list(CANDLE_NODES)}, "pytest_ok": tests_ok}


def _snapshot_step(d: Drill) -> dict[str, Any]:
    spotex = [sys.executable, "-m", "spotex"]
    dd = ["--data-dir", str(d.data_dir)]
    work = d.out_dir / "snapshot"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    take = _run([*spotex, "core", "snapshot", *dd], timeout=600)
    kv = dict(ln.split("=", 1) for ln in take.pop("lines") if "=" in ln)
    snap = Path(kv.get("snapshot", ""))
    if take["rc"] != 0 or not snap.is_file() or not Path(f"{snap}.sha256").is_file():
        return {"ok": False, "take": take, "reason": "no snapshot with its .sha256 sidecar was written"}
    cases: dict[str, Any] = {}

    def verify(name: str, data: bytes, sidecar: str, expect_ok: bool) -> None:
        f = work / name / snap.name
        f.parent.mkdir(parents=True)
        f.write_bytes(data)
        side = Path(f"{f}.sha256")
        side.write_text(sidecar)
        r = _run([*spotex, "core", "verify-snapshot", *dd, "--snapshot", str(f), "--sha256-file", str(side),
                  "--out", str(work / f"verify-{name}.json")], timeout=600)
        lines = r.pop("lines")
        verified = r["rc"] == 0 and "snapshot_verify_ok=true" in lines
        # A refusal counts only as the verifier's own verdict (not a usage error or a crash).
        refused = (r["rc"] == 1 and "snapshot_verify_ok=false" in lines
                   and any(w in r["stderr_tail"] for w in ("mismatch", "truncated")))
        cases[name] = {**r, "expected_ok": expect_ok, "verified": verified, "refused": refused,
                       "ok": verified if expect_ok else refused}

    raw, sidecar = snap.read_bytes(), Path(f"{snap}.sha256").read_text()
    flipped = bytearray(raw)
    flipped[-1] ^= 0xFF
    verify("intact", raw, sidecar, True)
    verify("payload_byte_flipped", bytes(flipped), sidecar, False)
    verify("truncated", raw[: len(raw) // 2], sidecar, False)
    verify("sidecar_other_digest", raw, "0" * 64 + sidecar[64:], False)
    return {"ok": all(c["ok"] for c in cases.values()), "snapshot": str(snap), "seq": kv.get("seq"),
            "state_hash": kv.get("state_hash"), "take": take, "cases": cases}


def _budget(d: Drill) -> dict[str, Any]:
    """The safety budget after the bundle (``spotex jobs run safety_budget``: JSON, then job_outcome=)."""
    res = subprocess.run([sys.executable, "-m", "spotex", "jobs", "run", "safety_budget", "--data-dir",
                          str(d.data_dir)], capture_output=True, text=True, timeout=300)
    try:
        job = json.loads(res.stdout[res.stdout.find("{"): res.stdout.rfind("}") + 1])
    except ValueError:
        job = {}
    out = job.get("output") or {}
    return {"outcome": job.get("outcome"), "budget_ok": out.get("budget_ok") is True,
            "recommended_action": out.get("recommended_action"), "evidence": out.get("evidence"),
            "violations": [f"{v.get('name')}:{v.get('reason')}" for v in out.get("violations") or []],
            "rc": res.returncode, "stderr_tail": res.stderr[-1000:]}


def adversarial_reliability(d: Drill, eo_trades: int = 2_000, ws_commands: int = 3_000) -> bool:
    allow = _allowed()
    before = d.status("before")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    steps: dict[str, dict[str, Any]] = {}
    runners = {
        "policy": lambda: _drill_step(d, "policy-tamper", "runbook_policy_tamper_ok=true"),
        "ws_resume": lambda: _drill_step(d, "ws-resume-gap-spike", "runbook_ws_resume_gap_spike_ok=true",
                                         "--commands", str(ws_commands)),
        "candle": lambda: _candle_step(d),
        "snapshot": lambda: _snapshot_step(d),
    }
    for name in STEPS:
        t0 = time.monotonic()
        try:
            if name == "exactly_once":  # runs its own NATS + PostgreSQL: no --data-dir
                out = d.out_dir / "exactly-once"
                r = _run([sys.executable, "-m", "spotex", "drill", "exactly-once-million", "--out", str(out),
                          "--trades", str(eo_trades)], timeout=3600)
                seen = "exactly_once_million_ok=true" in r.pop("lines")
                res = {**r, "success_line": "exactly_once_million_ok=true", "success_line_seen": seen,
                       "ok": r["rc"] == 0 and seen, "evidence_dir": str(out), "trades": eo_trades}
            else:
                res = runners[name]()
        except Exception as exc:  # a scenario that crashes is a failed scenario, recorded
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        res["seconds_total"] = round(time.monotonic() - t0, 2)
        steps[name] = res
        d.emit(f"adversarial_{name}", bool(res["ok"]))
    failed = [n for n in STEPS if not steps[n]["ok"]]
    ok = not failed
    action = recommended_action(failed)
    budget = _budget(d)
    after = d.status("after")
    tests = {"stamp": stamp, "adversarial_ok": ok, "steps": steps}
    latest = d.write("adversarial/adversarial-tests-latest.json", tests)
    d.write(f"adversarial/adversarial-tests-{stamp}.json", tests)
    summary = {"adversarial_ok": ok, "failed_step_count": len(failed), "failed_steps": failed,
               "recommended_action": action, "steps": {n: bool(steps[n]["ok"]) for n in STEPS},
               "budget_ok": budget["budget_ok"], "budget": budget, "fail_allowed": allow,
               "stack_healthy_before": before.get("healthy"), "stack_healthy_after": after.get("healthy"),
               "eo_trades": eo_trades, "ws_commands": ws_commands, "tests": str(latest)}
    d.write("adversarial-reliability-summary.json", summary)
    d.emit("failed_step_count", len(failed))
    d.emit("budget_ok", budget["budget_ok"])
    d.emit("recommended_action", action)
    if allow and not ok:
        d.emit("adversarial_fail_allowed", True)
    d.emit("runbook_adversarial_reliability_ok", ok)
    return ok or allow
