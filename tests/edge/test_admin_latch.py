"""Edge admin API over a real stack (`spotex up`): the reconciliation latch release (engaged by the
ledger's own ``engage_latch``, as its reconciler does on a T2 breach) with clear problem+json for a
bad or absent latch, the release audited and the market back to NORMAL; and the scheduled-checks
endpoints when no jobs service answers."""

from __future__ import annotations

import asyncio
import json
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


def engage_latch_on(st: Stack, symbol: str, mode: str = "CANCEL_ONLY") -> None:
    """Engage ``symbol``'s latch exactly as the ledger's reconciler does (audited, mode sent to the core)."""
    import asyncpg
    import nats

    from ledger.reconcile import CoreAdmin, engage_latch

    dsn, nats_url, _ = stack_endpoints(st)

    async def go() -> None:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            assert await engage_latch(pool, CoreAdmin(pool, js), symbol, mode, "lag:T2", "test: lag beyond T2",
                                      f"LEDGER-LAG-{symbol}-test")
        finally:
            await nc.close()
            await pool.close()

    asyncio.run(go())


def wait_lag_zero(st: Stack, symbol: str, timeout: float = 30.0) -> None:
    """Until the ledger has settled every EVT message of ``symbol`` (the latch's mode change included)."""
    import asyncpg
    import nats

    from ledger.reconcile import lag_report

    dsn, nats_url, evt = stack_endpoints(st)

    async def go() -> None:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        nc = await nats.connect(nats_url)
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

    asyncio.run(go())


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


def test_jobs_endpoints_without_a_jobs_api_are_503(env: Env) -> None:
    body = _problem(env.admin("viewer", "GET", "/v1/admin/jobs"), 503, "UNAVAILABLE")
    assert "jobs" in body["detail"]
    _problem(env.admin("viewer", "POST", "/v1/admin/jobs/invariants/run", {"reason": "r", "ticket": "t"}), 403,
             "AUTH_ROLE")
    _problem(env.admin("operator", "POST", "/v1/admin/jobs/invariants/run", {"reason": "r"}), 400,
             "AUDIT_TICKET_REQUIRED")
    _problem(env.admin("operator", "POST", "/v1/admin/jobs/Bad-Name/run", {"reason": "r", "ticket": "t"}), 400,
             "VALIDATION")
    r = env.admin("operator", "POST", "/v1/admin/jobs/invariants/run", {"reason": "check now", "ticket": "INC-9"})
    _problem(r, 503, "UNAVAILABLE")
    # Audited before it ran, and its failure recorded after.
    last = env.audit(2)
    assert [e["action"] for e in last] == ["RunCheck.failed", "RunCheck"]
    assert last[1]["params"] == {"job": "invariants"} and last[0]["params"]["error"] == "UNAVAILABLE"
