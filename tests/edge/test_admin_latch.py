"""Edge admin API over a real stack (`spotex up`): the reconciliation latch release (engaged by the
ledger's own ``engage_latch``, as its reconciler does on a T2 breach) with clear problem+json for a
bad or absent latch, the release audited and the market back to NORMAL; and the scheduled checks
through the jobs service's NATS API (list, run now, refusals, a hung service)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.auth import signed_headers
from spotex.testing import Stack, stack

pytestmark = pytest.mark.slow


def _raw_pub(k: Ed25519PrivateKey) -> str:
    return k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def stack_endpoints(st: Stack) -> tuple[str, str, str]:
    """(PostgreSQL DSN, NATS URL, EVT stream) of a running stack, as the CLI resolves them."""
    from spotex.cli import _load
    from spotex.supervisor import resolve_endpoints

    env = _load(str(st.data_dir), None)
    ep = resolve_endpoints(env.cfg, env.data)
    return ep.pg_dsn, ep.nats_url, env.cfg.nats.evt_stream


async def engage_latch_async(st: Stack, symbol: str, mode: str = "CANCEL_ONLY") -> None:
    """Engage ``symbol``'s latch exactly as the ledger's reconciler does (audited, mode sent to the core)."""
    import asyncpg
    import nats

    from ledger.reconcile import CoreAdmin, engage_latch

    dsn, nats_url, _ = stack_endpoints(st)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        assert await engage_latch(pool, CoreAdmin(pool, js), symbol, mode, "lag:T2", "test: lag beyond T2",
                                  f"LEDGER-LAG-{symbol}-test")
    finally:
        await nc.close()
        await pool.close()


async def wait_lag_zero_async(st: Stack, symbol: str, timeout: float = 30.0) -> None:
    """Until the ledger has settled every EVT message of ``symbol`` (the latch's mode change included)."""
    import asyncpg
    import nats

    from ledger.reconcile import lag_report

    dsn, nats_url, evt = stack_endpoints(st)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    nc = await nats.connect(nats_url)
    rep: dict[str, Any] = {}
    try:
        for _ in range(int(timeout / 0.2)):
            rep = (await lag_report(pool, nc.jetstream(), evt)).get(symbol, {})
            if rep.get("lag") == 0:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"lag of {symbol} never reached 0: {rep}")
    finally:
        await nc.close()
        await pool.close()


def engage_latch_on(st: Stack, symbol: str, mode: str = "CANCEL_ONLY") -> None:
    asyncio.run(engage_latch_async(st, symbol, mode))


def wait_lag_zero(st: Stack, symbol: str, timeout: float = 30.0) -> None:
    asyncio.run(wait_lag_zero_async(st, symbol, timeout))


class Env:
    def __init__(self, st: Stack, keys: dict[str, Ed25519PrivateKey]) -> None:
        self.st = st
        self.keys = keys
        self.edge = st.endpoint("edge")

    def admin(self, who: str, method: str, path: str, body: Any = None) -> httpx.Response:
        k = self.keys[who]
        b = json.dumps(body).encode() if body is not None else b""
        h = signed_headers(_raw_pub(k), k, method, path, b)
        h["content-type"] = "application/json"
        return httpx.request(method, self.edge + path, content=b, headers=h, timeout=30)

    def status(self) -> dict[str, Any]:
        r = self.admin("viewer", "GET", "/v1/admin/status")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def audit(self, limit: int = 50) -> list[dict[str, Any]]:
        r = self.admin("viewer", "GET", f"/v1/admin/audit?limit={limit}")
        assert r.status_code == 200, r.text
        return list(r.json())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    keys = {n: Ed25519PrivateKey.generate() for n in ("approver", "operator", "viewer")}
    roles = {_raw_pub(keys["approver"]): ["approver"], _raw_pub(keys["operator"]): ["operator"],
             _raw_pub(keys["viewer"]): ["viewer"]}
    data_dir: Path = tmp_path_factory.mktemp("edge-admin") / "stack"
    with stack(data_dir, env={"SPOTEX_SECURITY__ADMIN_KEYS": json.dumps(roles)}) as st:
        yield Env(st, keys)


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = dict(r.json())
    assert body["code"] == code, body
    return body


REL = "/v1/admin/reconciliation/latch/{}/release"
OK_BODY = {"reason": "reconciled: lag 0, invariants pass", "ticket": "INC-42"}


def test_latch_release_bad_input_is_a_clear_problem(env: Env) -> None:
    # Never engaged: 404 with its own code, not a 5xx; unknown symbol: 404 NOT_FOUND.
    body = _problem(env.admin("approver", "POST", REL.format("SOL-USDT"), OK_BODY), 404, "LATCH_NOT_FOUND")
    assert "SOL-USDT" in body["detail"]
    _problem(env.admin("approver", "POST", REL.format("NOPE-USDT"), OK_BODY), 404, "NOT_FOUND")
    # Reason and ticket are required; an operator (not an approver) is refused.
    _problem(env.admin("approver", "POST", REL.format("SOL-USDT"), {"reason": " ", "ticket": "INC-42"}), 400,
             "AUDIT_REASON_REQUIRED")
    _problem(env.admin("approver", "POST", REL.format("SOL-USDT"), {"reason": "ok"}), 400, "AUDIT_TICKET_REQUIRED")
    _problem(env.admin("operator", "POST", REL.format("SOL-USDT"), OK_BODY), 403, "AUTH_ROLE")
    _problem(env.admin("approver", "POST", REL.format("SOL-USDT"), {"reason": "x", "ticket": "y", "extra": 1}), 400,
             "VALIDATION")


def test_latch_release_through_the_admin_api_is_audited(env: Env) -> None:
    sym = "ETH-USDT"
    engage_latch_on(env.st, sym)
    for _ in range(100):  # the edge sees the latch and the core's CANCEL_ONLY
        st = env.status()
        if (st["latches"] or {}).get(sym, {}).get("engaged") and st["modes"].get(sym) == "CANCEL_ONLY":
            break
        time.sleep(0.2)
    assert st["latches"][sym]["engaged"] and st["latches"][sym]["mode"] == "CANCEL_ONLY", st
    assert st["modes"][sym] == "CANCEL_ONLY", st
    wait_lag_zero(env.st, sym)

    r = env.admin("approver", "POST", REL.format(sym), OK_BODY)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["released"] is True and out["modeSet"] == "NORMAL" and out["lag"] == 0
    assert len(out["approvers"]) == 1 and out["approvers"][0].endswith(_raw_pub(env.keys["approver"])[:16])
    assert out["releaseAuditSeq"] > out["auditSeq"]

    entries = {e["seq"]: e for e in env.audit()}
    req, rel = entries[out["auditSeq"]], entries[out["releaseAuditSeq"]]
    assert req["action"] == "LatchReleaseRequested" and req["params"]["symbol"] == sym
    assert req["ticket"] == "INC-42" and req["reason"] == OK_BODY["reason"]
    assert rel["action"] == "LatchRelease" and rel["params"]["symbol"] == sym
    assert rel["params"]["approvers"] == out["approvers"] and rel["params"]["latched_mode"] == "CANCEL_ONLY"
    for _ in range(100):  # the core's own state: NORMAL again; the latch released
        st = env.status()
        if st["modes"].get(sym) == "NORMAL":
            break
        time.sleep(0.2)
    assert st["modes"][sym] == "NORMAL" and st["latches"][sym]["engaged"] is False, st
    assert env.st.cli("audit", "verify", check=False).returncode == 0

    # Releasing again: 409 LATCH_NOT_ENGAGED, and nothing else changes.
    head = env.status()["audit"]["seq"]
    _problem(env.admin("approver", "POST", REL.format(sym), OK_BODY), 409, "LATCH_NOT_ENGAGED")
    assert env.status()["audit"]["seq"] == head


def test_jobs_list_and_run_now_through_the_edge(env: Env) -> None:
    r = env.admin("viewer", "GET", "/v1/admin/jobs")
    assert r.status_code == 200, r.text
    jobs = {j["name"]: j for j in r.json()["jobs"]}
    assert {"invariants", "settlement_lag", "freshness"} <= set(jobs), jobs
    assert jobs["invariants"]["schedule"] == "*/1 * * * *" and jobs["invariants"]["next_run_at"]

    # Refused before anything is audited: role, ticket, a malformed name.
    head = env.status()["audit"]["seq"]
    _problem(env.admin("viewer", "POST", "/v1/admin/jobs/invariants/run", {"reason": "r", "ticket": "t"}), 403,
             "AUTH_ROLE")
    _problem(env.admin("operator", "POST", "/v1/admin/jobs/invariants/run", {"reason": "r"}), 400,
             "AUDIT_TICKET_REQUIRED")
    _problem(env.admin("operator", "POST", "/v1/admin/jobs/Bad-Name/run", {"reason": "r", "ticket": "t"}), 400,
             "VALIDATION")
    assert env.status()["audit"]["seq"] == head

    r = env.admin("operator", "POST", "/v1/admin/jobs/invariants/run", {"reason": "check now", "ticket": "INC-9"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["job"] == "invariants" and isinstance(out["runId"], int) and out["outcome"] == "ok", out
    assert out["summary"].startswith("ok")
    entry = next(e for e in env.audit(10) if e["seq"] == out["auditSeq"])
    assert entry["action"] == "RunCheck" and entry["params"] == {"job": "invariants"} and entry["ticket"] == "INC-9"
    # The run is the job's last run in the list now.
    last = {j["name"]: j for j in env.admin("viewer", "GET", "/v1/admin/jobs").json()["jobs"]}["invariants"]
    assert last["last_run"]["id"] >= out["runId"] and last["last_run"]["outcome"] in ("ok", "violation", "error")

    # An unknown job: audited, refused by the jobs service with its code, the failure recorded.
    _problem(env.admin("operator", "POST", "/v1/admin/jobs/no_such_job/run", {"reason": "r", "ticket": "t"}), 404,
             "UNKNOWN_JOB")
    tail = env.audit(2)
    assert [e["action"] for e in tail] == ["RunCheck.failed", "RunCheck"]
    assert tail[0]["params"]["error"] == "UNKNOWN_JOB" and tail[1]["params"] == {"job": "no_such_job"}


def test_jobs_list_is_503_while_the_jobs_service_does_not_answer(env: Env) -> None:
    pid = next(c["pid"] for c in env.st.status()["components"] if c["name"] == "jobs")
    assert pid
    os.kill(pid, signal.SIGSTOP)  # a hung jobs service: subscribed, never answering
    try:
        body = _problem(env.admin("viewer", "GET", "/v1/admin/jobs"), 503, "UNAVAILABLE")
        assert "jobs.list" in body["detail"], body
    finally:
        os.kill(pid, signal.SIGCONT)
    for _ in range(50):
        if env.admin("viewer", "GET", "/v1/admin/jobs").status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError("the jobs list did not come back after the service resumed")


@pytest.fixture(scope="module")
def env2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A stack where a latch release needs a distinct second approver (as in production)."""
    keys = {n: Ed25519PrivateKey.generate() for n in ("approver", "approver2", "viewer")}
    roles = {_raw_pub(k): ["approver"] for n, k in keys.items() if n != "viewer"}
    roles[_raw_pub(keys["viewer"])] = ["viewer"]
    data_dir: Path = tmp_path_factory.mktemp("edge-admin2") / "stack"
    with stack(data_dir, env={"SPOTEX_SECURITY__ADMIN_KEYS": json.dumps(roles),
                              "SPOTEX_LEDGER__LATCH_REQUIRES_SECOND_APPROVER": "true"}) as st:
        yield Env(st, keys)


def test_latch_release_with_a_second_approver(env2: Env) -> None:
    sym = "BTC-USDT"
    engage_latch_on(env2.st, sym)
    wait_lag_zero(env2.st, sym)
    body = {"reason": "reconciled", "ticket": "INC-50"}
    ids = {n: f"op-{_raw_pub(k)[:12]}:{_raw_pub(k)[:16]}" for n, k in env2.keys.items()}  # config keys
    head = env2.status()["audit"]["seq"]
    # The first approval: recorded, pending (202), not a failure; visible to the second approver.
    r = env2.admin("approver", "POST", REL.format(sym), body)
    assert r.status_code == 202, r.text
    first = r.json()
    assert first["status"] == "AWAITING_SECOND_APPROVER" and first["symbol"] == sym and first["ticket"] == "INC-50"
    assert first["approvers"] == [ids["approver"]] and first["auditSeq"] == head + 1, first
    tail = env2.audit(3)
    assert tail[0]["seq"] == first["auditSeq"] and tail[0]["action"] == "LatchReleaseRequested", tail
    assert tail[0]["params"] == {"symbol": sym, "latched_mode": "CANCEL_ONLY", "second_approver": True}
    assert tail[0]["actor"] == ids["approver"] and tail[0]["ticket"] == "INC-50" and tail[0]["reason"] == "reconciled"
    st = env2.status()
    assert st["audit"]["seq"] == first["auditSeq"], "a first approval writes one entry, no .failed"
    latch = st["latches"][sym]
    assert latch["engaged"] is True
    [pending] = latch["pendingApprovals"]
    assert pending["actor"] == ids["approver"] and pending["ticket"] == "INC-50"
    assert pending["auditSeq"] == first["auditSeq"] and pending["reason"] == "reconciled"
    assert pending["tsMs"] == tail[0]["ts_ms"]
    # The same approver again: 409 with its own code, nothing recorded.
    b = _problem(env2.admin("approver", "POST", REL.format(sym), body), 409, "APPROVER_ALREADY_APPROVED")
    assert "distinct second approver" in b["detail"] and "INC-50" in b["detail"]
    assert env2.status()["audit"]["seq"] == first["auditSeq"]
    # The other approver on another ticket: a separate pending approval, not a completion.
    r = env2.admin("approver2", "POST", REL.format(sym), {**body, "ticket": "INC-51"})
    assert r.status_code == 202 and r.json()["approvers"] == [ids["approver2"]], r.text
    st = env2.status()
    assert st["latches"][sym]["engaged"] is True
    assert [(p["ticket"], p["actor"]) for p in st["latches"][sym]["pendingApprovals"]] == [
        ("INC-50", ids["approver"]), ("INC-51", ids["approver2"])]
    # The distinct second approver on the same ticket completes the release.
    r = env2.admin("approver2", "POST", REL.format(sym), body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["approvers"] == [ids["approver"], ids["approver2"]] and out["modeSet"] == "NORMAL"
    entries = {e["seq"]: e for e in env2.audit(20)}
    req, rel = entries[out["auditSeq"]], entries[out["releaseAuditSeq"]]
    assert req["action"] == "LatchReleaseRequested" and req["actor"] == ids["approver2"] and req["ticket"] == "INC-50"
    assert rel["action"] == "LatchRelease" and rel["params"]["approvers"] == out["approvers"]
    assert not any(e["action"].endswith(".failed") for s, e in entries.items() if s > head), entries
    st = env2.status()
    assert st["latches"][sym]["engaged"] is False and st["latches"][sym]["pendingApprovals"] == []
    assert env2.st.cli("audit", "verify", check=False).returncode == 0
