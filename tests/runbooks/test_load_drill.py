"""The load harness (seed §7) and the load regression drill (seed §4.3) against one real stack, at tiny
sizes. Thresholds come from a budgets file ([jobs] budgets_file): generous latency/throughput limits
where the test checks behaviour (this shared machine's timings are not the subject), an impossible
one where it checks that a violation is caught and named."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.checks import DEFAULT_BUDGETS, LOAD_EVIDENCE, evaluate_budgets
from runbooks.load_drills import PROFILES
from spotex.testing import Stack, spotex_cli, stack

ROOT = Path(__file__).resolve().parents[2]


def _lines(out: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)


def _budgets(tmp: Path, name: str, **limits: float) -> dict[str, str]:
    """The default load budgets with the latency/throughput limits replaced; the error-rate and WS
    limits stay the defaults (0 errors, trades delivered, none lost)."""
    out = []
    for b in DEFAULT_BUDGETS:
        if b["evidence"] != LOAD_EVIDENCE:
            continue
        b = dict(b)
        if b["name"] in limits:
            b["limit"] = limits[b["name"]]
        elif b["field"].endswith("order_p99_ms"):
            b["limit"] = 60_000
        elif b["field"].endswith("order_tps"):
            b["limit"] = 1
        out.append(b)
    path = tmp / name
    path.write_text(json.dumps({"budgets": out}))
    return {"SPOTEX_JOBS__BUDGETS_FILE": str(path)}


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("load") / "stack") as s:
        yield s


def _drill(st: Stack, out: Path, env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                                              dict[str, str]]:
    res = spotex_cli("drill", "load-regression", "--data-dir", str(st.data_dir), "--out", str(out), *args,
                     env=env, timeout=300)
    return res, _lines(res.stdout)


def test_load_regression_writes_the_evidence(st: Stack, tmp_path: Path) -> None:
    out = tmp_path / "load-regression"
    res, kv = _drill(st, out, _budgets(tmp_path, "lenient.json"), "--scale", "0.01")
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["runbook_load_regression_ok"] == "true" and kv["budget_ok"] == "true"
    assert kv["load_budget_enforced"] == "true" and kv["load_full_size"] == "false"
    for name in ("load_smoke", "load_10k", "load_50k"):
        assert kv[f"{name}_pass"] == "true"
    stamped = sorted(out.glob("load-all-2*.json"))
    assert len(stamped) == 1 and kv["load_all_evidence"] == stamped[0].name
    latest = json.loads((out / "load-all-latest.json").read_text())
    assert latest == json.loads(stamped[0].read_text())
    assert latest["load_regression_ok"] and latest["harness_ok"] and latest["full_size"] is False
    assert latest["profiles_run"] == ["load-smoke", "load-10k", "load-50k"] == [*PROFILES]
    assert set(latest["profiles"]) == set(PROFILES)
    for name, orders in (("load-smoke", 20), ("load-10k", 100), ("load-50k", 500)):
        p = latest["profiles"][name]
        assert p["orders"] == p["orders_sent"] == orders
        assert p["order_error_rate"] == 0 and p["order_errors"] == 0
        assert p["order_tps"] > 0 and 0 < p["order_p50_ms"] <= p["order_p99_ms"] <= p["order_max_ms"]
        assert p["ws_connected"] == p["ws_subscribers"] and p["ws_lost"] == 0
        assert p["ws_messages"] >= p["ws_trade_frames"] and len(p["load_avg_before"]) == 3
        assert {t["field"].rsplit(".", 1)[1] for t in p["thresholds"]} == {
            "order_p99_ms", "order_error_rate", "order_tps"}
        assert all(t["ok"] and t["value"] is not None for t in p["thresholds"]) and p["pass"]
    assert latest["ws_trade_frames"] > 0 and latest["ws_messages"] == sum(
        p["ws_messages"] for p in latest["profiles"].values())
    # the safety budget job judged this run's file, and not load_full_size (a scaled run)
    sb = json.loads((out / kv["safety_budget_evidence"]).read_text())
    assert sb["budget_ok"] and sb["violation_count"] == 0
    judged = {r["name"] for r in sb["results"]}
    assert "load_smoke_p99_ms" in judged and "load_ws_none_lost" in judged and "load_full_size" not in judged
    assert all(Path(r["file"]) == out / "load-all-latest.json" for r in sb["results"])
    assert (out / "status-before.json").exists() and (out / "status-after.json").exists()


def test_budget_violation_fails_and_is_named(st: Stack, tmp_path: Path) -> None:
    out = tmp_path / "load-regression"
    env = _budgets(tmp_path, "impossible.json", load_smoke_p99_ms=0.001)
    res, kv = _drill(st, out, env, "--profiles", "load-smoke", "--scale", "0.2")
    assert res.returncode == 1, res.stdout + res.stderr
    assert kv["runbook_load_regression_ok"] == "false" and kv["budget_ok"] == "false"
    assert kv["violation_count"] == "1" and kv["load_smoke_pass"] == "false"
    assert kv["violation_load_smoke_p99_ms"].startswith("LIMIT_BREACHED:order_p99_ms=")
    assert kv["violation_load_smoke_p99_ms"].endswith("(limit <= 0.001):BLOCK_RELEASE")
    assert "load_10k_pass" not in kv  # only the profile asked for ran
    latest = json.loads((out / "load-all-latest.json").read_text())
    assert [v["name"] for v in latest["budget"]["violations"]] == ["load_smoke_p99_ms"]
    assert latest["profiles"]["load-smoke"]["orders_sent"] == 24 and not latest["load_regression_ok"]

    # the gateway-only dry run: the same violation recorded, the drill passes
    out2 = tmp_path / "dry-run" / "load-regression"
    res, kv = _drill(st, out2, {**env, "RUNBOOK_ALLOW_BUDGET_FAIL": "true"}, "--profiles", "load-smoke",
                     "--scale", "0.2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["runbook_load_regression_ok"] == "true" and kv["load_budget_enforced"] == "false"
    assert kv["budget_ok"] == "false" and kv["violation_load_smoke_p99_ms"].startswith("LIMIT_BREACHED")
    latest = json.loads((out2 / "load-all-latest.json").read_text())
    assert latest["allow_budget_fail"] and not latest["budget_enforced"] and not latest["pass"]
    assert [v["name"] for v in latest["budget"]["violations"]] == ["load_smoke_p99_ms"]
    sb = json.loads((out2 / latest["budget"]["evidence"]).read_text())
    assert not sb["budget_ok"] and [v["name"] for v in sb["violations"]] == ["load_smoke_p99_ms"]


def test_load_smoke_script(st: Stack, tmp_path: Path) -> None:
    out = tmp_path / "load"
    env = {**os.environ, **_budgets(tmp_path, "lenient.json"), "SPOTEX_DATA_DIR": str(st.data_dir),
           "SPOTEX_RUNBOOK_OUT": str(out)}
    res = subprocess.run([str(ROOT / "scripts" / "load_smoke.sh"), "--orders", "40", "--concurrency", "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    kv = _lines(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert kv["load_smoke_ok"] == "true"
    doc = json.loads((out / "load-smoke.json").read_text())
    for k in ("order_p99_ms", "order_error_rate", "order_tps", "ws_messages"):
        assert k in doc and kv[k] == str(doc[k])
    assert doc["orders_sent"] == 40 and doc["order_error_rate"] == 0 and doc["pass"]
    assert doc["ws_trade_frames"] > 0 and doc["raw"]["mix"]["rest"] > 0 and len(doc["load_avg_after"]) == 3
    assert {t["budget"] for t in doc["thresholds"]} == {"load_smoke_p99_ms", "load_smoke_error_rate",
                                                        "load_smoke_orders_per_s", "load_ws_trades_delivered",
                                                        "load_ws_none_lost"}

    res = spotex_cli("load", "smoke", "--data-dir", str(st.data_dir), "--out", str(tmp_path / "load2"),
                     "--orders", "20", "--concurrency", "2",
                     env=_budgets(tmp_path, "slow.json", load_smoke_orders_per_s=10**9), timeout=300)
    kv = _lines(res.stdout)
    assert res.returncode == 1 and kv["load_smoke_ok"] == "false"
    assert kv["violation_load_smoke_orders_per_s"].startswith("LIMIT_BREACHED:order_tps=")
    assert not json.loads((tmp_path / "load2" / "load-smoke.json").read_text())["pass"]


def _doc(**kw: Any) -> dict[str, Any]:
    prof = {"order_p99_ms": 100.0, "order_error_rate": 0.0, "order_tps": 900.0}
    return {"full_size": True, "ws_trade_frames": 10, "ws_lost": 0,
            "profiles": {p: dict(prof) for p in ("load-smoke", "load-10k", "load-50k")}, **kw}


def test_default_budgets_judge_the_drills_latest_evidence(tmp_path: Path) -> None:
    """What the scheduled safety budget makes of build/runbooks/load-regression/load-all-latest.json."""
    load = [b for b in DEFAULT_BUDGETS if b["evidence"] == LOAD_EVIDENCE]
    assert len(load) == 12 and all(b["max_age_s"] == 7 * 86_400 for b in load)
    f = tmp_path / LOAD_EVIDENCE
    f.parent.mkdir(parents=True)
    assert evaluate_budgets(load, [tmp_path], time.time())["violation_count"] == 12  # missing
    f.write_text(json.dumps(_doc()))
    assert evaluate_budgets(load, [tmp_path], time.time())["budget_ok"]
    f.write_text(json.dumps(_doc(full_size=False)))  # a scaled run is no release evidence
    r = evaluate_budgets(load, [tmp_path], time.time())
    assert [(v["name"], v["reason"]) for v in r["violations"]] == [("load_full_size", "LIMIT_BREACHED")]
    bad = _doc()
    bad["profiles"]["load-50k"]["order_error_rate"] = 0.001
    f.write_text(json.dumps(bad))
    r = evaluate_budgets(load, [tmp_path], time.time())
    assert [v["name"] for v in r["violations"]] == ["load_50k_error_rate"]
    assert r["violations"][0]["recommended_action"] == "BLOCK_RELEASE"
    os.utime(f, (time.time() - 8 * 86_400,) * 2)
    assert {v["reason"] for v in evaluate_budgets(load, [tmp_path], time.time())["violations"]} == {"EVIDENCE_STALE"}
