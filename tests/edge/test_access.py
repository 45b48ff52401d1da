"""Access control (edge/access.py, spotex access, scripts/rbac_sod_check.sh, access_review.sh,
jit_access_grant.sh) on a real PostgreSQL: SoD violations found, JIT grants and revocations audited on
the admin chain and honoured (then dropped) by the operator key store, bad input refused with nothing
written, the access review's fields; and one real stack where a JIT grant lets a viewer key take an
``operator`` action through the signed admin API until it is revoked or expires (then AUTH_ROLE)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge import access
from edge.access import AccessError
from edge.auth import OperatorKeyStore, signed_headers
from ledger import audit
from ledger.migrate import migrate

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_780_000_000_000


def pub(k: Ed25519PrivateKey) -> str:
    return k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def newkey() -> str:
    return pub(Ed25519PrivateKey.generate())


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate(pg_dsn)
    p = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    assert p is not None
    yield p
    await p.close()


async def test_sod_violations_found(pool: asyncpg.Pool) -> None:
    both, admin, viewer, blank, jit = (newkey() for _ in range(5))
    cfg = {both: ["operator", "approver"], admin: ["admin"], viewer: ["viewer"], jit: ["operator"]}
    await OperatorKeyStore(None, pool).add(newkey(), "carol", ["approver"])  # clean table key
    # Rows written around the tools (direct SQL) are what the checker exists for.
    await pool.execute("INSERT INTO operator_keys (public_key_hex, name, roles, created_at_ms) VALUES ($1, ' ', "
                       "'{viewer}', $2)", blank, NOW)
    for user, by, minutes in (("dave", "dave", 30), ("erin", "boss", 600)):
        await pool.execute(
            """INSERT INTO jit_grants (username, public_key_hex, role, ticket, reason, granted_by, granted_at_ms,
                                       expires_at_ms, audit_seq)
               VALUES ($1, $2, 'viewer', 'T-1', 'r', $3, $4, $5, 1)""",
            user, viewer, by, NOW - 60_000, NOW - 60_000 + minutes * 60_000)
    # ... and an active grant giving the operator key approver too (jit-grant itself refuses that).
    await pool.execute(
        """INSERT INTO jit_grants (username, public_key_hex, role, ticket, reason, granted_by, granted_at_ms,
                                   expires_at_ms, audit_seq) VALUES ('frank', $1, 'approver', 'T-2', 'r', 'boss',
                                   $2, $3, 1)""", jit, NOW - 1000, NOW + 60_000)
    same = f"x:{both[:16]}"
    await audit.append(pool, "ledger", "LatchReleaseRequested", {"symbol": "BTC-USDT", "second_approver": True},
                       "r", "INC-7", now_ms=NOW)
    await audit.append(pool, same, "LatchRelease", {"symbol": "BTC-USDT", "approvers": [same, f"y:{both[:16]}"]},
                       "r", "INC-7", now_ms=NOW)
    await audit.append(pool, same, "LatchRelease", {"symbol": "ETH-USDT", "approvers": [f"z:{viewer[:16]}"]},
                       "r", "INC-8", now_ms=NOW)  # one approver where none more was asked for: fine

    res = await access.sod_check(pool, cfg, production=True, now_ms=NOW)
    got = sorted((v["rule"], v["key_id"]) for v in res["violations"])
    assert got == sorted([
        ("operator-approver-split", both[:16]), ("operator-approver-split", jit[:16]),
        ("admin-jit-only", admin[:16]), ("named-key", blank[:16]), ("jit-not-self-granted", viewer[:16]),
        ("jit-max-duration", viewer[:16]), ("latch-approvers-distinct", None)]), res["violations"]
    assert not res["ok"] and res["keys_checked"] == 6
    split = next(v for v in res["violations"] if v["key_id"] == jit[:16])
    assert split["roles"] == ["approver", "operator"] and "JIT" in split["detail"]
    # admin-jit-only is a production rule: reported as not applied in dev, no violation there.
    dev = await access.sod_check(pool, cfg, production=False, now_ms=NOW)
    assert "admin-jit-only" not in {v["rule"] for v in dev["violations"]}
    assert next(r for r in dev["rules"] if r["id"] == "admin-jit-only")["applied"] is False
    # Once the grants expire, the JIT-only violations go; a clean set passes.
    later = await access.sod_check(pool, cfg, production=False, now_ms=NOW + 10 * 3_600_000)
    assert {v["rule"] for v in later["violations"]} == {"operator-approver-split", "named-key",
                                                        "latch-approvers-distinct"}
    clean = access.evaluate_sod(
        access.effective_set([access.OperatorKeyRow(viewer, "v", "config", frozenset({"viewer"}))], [], NOW), [],
        production=True, now_ms=NOW)
    assert clean["ok"] and clean["violations"] == []


async def test_jit_grant_and_revoke_audited_and_honoured(pool: asyncpg.Pool) -> None:
    k = newkey()
    cfg = {k: ["viewer"]}
    clock = [100.0]
    clock_ms = [NOW]
    store = OperatorKeyStore(cfg, pool, cache_ttl_s=10.0, clock=lambda: clock[0], clock_ms=lambda: clock_ms[0])
    before = await store.get(k)
    assert before is not None and before.roles == {"viewer"}

    g = await access.grant(pool, cfg, user="alice", key=k.upper(), role="operator", ticket="INC-1",
                           reason="on-call: halt BTC", minutes="30", actor="boss", now_ms=NOW)
    assert (g.user, g.key_hex, g.role, g.expires_at_ms) == ("alice", k, "operator", NOW + 30 * 60_000)
    entries = await audit.load_entries(pool)
    assert [e["action"] for e in entries] == ["JitGrant"]
    e = entries[0]
    assert e["seq"] == g.audit_seq and e["actor"] == "boss" and e["ticket"] == "INC-1"
    assert e["reason"] == "on-call: halt BTC"
    assert e["params"] == {"grant_id": g.id, "user": "alice", "key_id": k[:16], "public_key_hex": k,
                           "role": "operator", "duration_minutes": 30, "expires_at_ms": NOW + 1_800_000,
                           "expires_at": access.iso(NOW + 1_800_000)}
    doc = access.binding(g)
    assert doc["metadata"]["annotations"] == {
        "ticket-id": "INC-1", "reason": "on-call: halt BTC", "expires-at": access.iso(NOW + 1_800_000),
        "granted-by": "boss", "granted-at": access.iso(NOW), "audit-seq": str(g.audit_seq)}
    assert doc["subject"] == {"user": "alice", "operatorKey": k, "keyId": k[:16]}
    assert doc["roleRef"]["role"] == "operator"

    # The store still serves its cached viewer identity until its TTL, then the grant's role ...
    clock[0] += 11
    ident = await store.get(k)
    assert ident is not None and ident.roles == {"viewer", "operator"}
    # ... and never past the grant's expiry, though its own TTL (10 s) has not run out: loaded 3 s
    # before the expiry, the identity is reloaded (without the role) 4 s later.
    clock_ms[0] = NOW + 30 * 60_000 - 3000
    clock[0] += 11
    assert (await store.get(k)).roles == {"viewer", "operator"}  # type: ignore[union-attr]
    clock_ms[0] += 4000
    clock[0] += 4
    assert (await store.get(k)).roles == {"viewer"}  # type: ignore[union-attr]

    # Revocation: one JitRevoke entry listing the grant, in the transaction that marks it.
    g2 = await access.grant(pool, cfg, user="alice", key=k, role="operator", ticket="INC-2", reason="again",
                            minutes=60, actor="boss", now_ms=NOW + 100)
    other = newkey()
    cfg[other] = ["viewer"]
    g3 = await access.grant(pool, cfg, user="bob", key=other, role="admin", ticket="INC-3", reason="upgrade",
                            minutes=5, actor="boss", now_ms=NOW + 200)
    seq, done = await access.revoke(pool, user="alice", all_grants=False, actor="sec-oncall", reason="suspicious",
                                    ticket="SEC-9", now_ms=NOW + 300)
    assert [x.id for x in done] == [g.id, g2.id]  # both of alice's grants were still active
    assert all(x.revoked_by == "sec-oncall" and x.revoke_audit_seq == seq for x in done)
    last = (await audit.load_entries(pool))[-1]
    assert (last["seq"], last["action"], last["actor"], last["ticket"]) == (seq, "JitRevoke", "sec-oncall", "SEC-9")
    assert last["params"] == {"user": "alice", "all": False, "grant_ids": [g.id, g2.id], "key_ids": [k[:16]]}
    fresh = OperatorKeyStore(cfg, pool, clock_ms=lambda: NOW + 400)
    assert (await fresh.get(k)).roles == {"viewer"}  # type: ignore[union-attr]
    assert (await fresh.get(other)).roles == {"viewer", "admin"}  # type: ignore[union-attr]
    seq2, done2 = await access.revoke(pool, user=None, all_grants=True, actor="sec-oncall", reason="playbook step 1",
                                      ticket="SEC-9", now_ms=NOW + 500)
    assert [x.id for x in done2] == [g3.id]
    seq3, done3 = await access.revoke(pool, user=None, all_grants=True, actor="sec-oncall", reason="again",
                                      ticket="SEC-9", now_ms=NOW + 600)
    assert done3 == [] and seq3 == seq2 + 1  # nothing left to revoke, still on the record
    res = await audit.verify_db(pool, "admin", require_events=True)
    assert res.ok and res.count == 6


async def test_bad_input_refused_with_nothing_written(pool: asyncpg.Pool) -> None:
    k, appr, gone = newkey(), newkey(), newkey()
    cfg = {k: ["operator"], appr: ["approver"], gone: ["viewer"]}
    await OperatorKeyStore(cfg, pool).revoke(gone)
    ok = {"user": "alice", "key": k, "role": "viewer", "ticket": "INC-1", "reason": "r", "minutes": "30",
          "actor": "boss"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"minutes": "0"}, "duration_minutes must be 1..480, got 0"),
        ({"minutes": "-5"}, "duration_minutes must be 1..480, got -5"),
        ({"minutes": "481"}, "duration_minutes must be 1..480, got 481"),
        ({"minutes": "1.5"}, "whole number of minutes"),
        ({"role": "root"}, "unknown role 'root'"),
        ({"ticket": " "}, "ticket must not be empty"),
        ({"reason": ""}, "reason must not be empty"),
        ({"actor": ""}, "actor (the granting admin) must not be empty"),
        ({"user": "bad user"}, "user must be"),
        ({"key": "zz"}, "--key must be"),
        ({"actor": "Alice"}, "rule jit-not-self-granted"),
        ({"key": newkey()}, "is not known"),
        ({"key": gone}, "is revoked"),
        ({"role": "operator"}, "already holds operator standing"),
        ({"role": "approver"}, "rule operator-approver-split"),
        ({"key": appr, "role": "operator"}, "rule operator-approver-split"),
    ]
    for change, msg in cases:
        with pytest.raises(AccessError) as ei:
            await access.grant(pool, cfg, **{**ok, **change}, now_ms=NOW)
        assert msg in str(ei.value), (change, str(ei.value))
        assert "\n" not in str(ei.value)
    for kw, msg in (({"user": None, "all_grants": False}, "exactly one of --user U or --all"),
                    ({"user": "a", "all_grants": True}, "exactly one of --user U or --all"),
                    ({"user": "a", "all_grants": False, "ticket": ""}, "ticket must not be empty")):
        with pytest.raises(AccessError, match="") as ei:
            await access.revoke(pool, **{"actor": "x", "reason": "r", "ticket": "T", **kw})  # type: ignore[arg-type]
        assert msg in str(ei.value)
    assert await pool.fetchval("SELECT count(*) FROM jit_grants") == 0
    assert await audit.head(pool) == (0, audit.GENESIS_HASH)
    # The CLI says the same in one line and exits 1, before touching any stack.
    r = subprocess.run([str(ROOT / ".venv/bin/spotex"), "access", "jit-grant", "alice", "INC-1", "r", "0",
                        "--key", k, "--role", "operator", "--actor", "boss"], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "spotex: duration_minutes must be 1..480, got 0\n")


async def test_access_review_report_fields(pool: asyncpg.Pool) -> None:
    cfg_key, table_key, revoked = newkey(), newkey(), newkey()
    cfg = {cfg_key: ["viewer"], revoked: ["operator"]}
    store = OperatorKeyStore(cfg, pool)
    await store.add(table_key, "carol", ["approver"])
    await store.revoke(revoked)
    await access.grant(pool, cfg, user="alice", key=cfg_key, role="operator", ticket="INC-1", reason="r",
                       minutes=30, actor="boss", now_ms=NOW - 3_600_000)  # expired by NOW
    await access.grant(pool, cfg, user="alice", key=cfg_key, role="admin", ticket="INC-2", reason="r",
                       minutes=60, actor="boss", now_ms=NOW - 60_000)  # active at NOW
    await audit.append(pool, f"carol:{table_key[:16]}", "LatchReleaseRequested",
                       {"symbol": "BTC-USDT", "second_approver": False}, "r", "T", now_ms=NOW - 5000)
    day = 86_400_000
    for api_key, scopes, created, seen in (("k" * 16, ["read"], NOW - 200 * day, None),
                                           ("m" * 16, ["read", "trade"], NOW - 200 * day, NOW - day),
                                           ("n" * 16, ["read", "trade"], NOW - day, None)):
        await pool.execute("""INSERT INTO api_keys (api_key, account_id, kind, scopes, public_key, created_at_ms)
                              VALUES ($1, 7, 'ed25519', $2, $3, $4)""", api_key, scopes, os.urandom(32), created)
        if seen is not None:
            await pool.execute(
                """INSERT INTO idempotency_keys (api_key, idem_key, fingerprint, state, claim_token, created_at_ms,
                                                 locked_until_ms, expires_at_ms) VALUES ($1, 'i1', 'f', 'in_progress',
                                                 'c', $2, $2, $2)""", api_key, seen)
    await pool.execute("""INSERT INTO api_keys (api_key, account_id, kind, scopes, public_key, created_at_ms,
                          revoked_at_ms) VALUES ($1, 8, 'ed25519', '{trade}', $2, $3, $3)""",
                       "r" * 16, os.urandom(32), NOW - day)

    rep = await access.access_review(pool, cfg, production=False, unused_days=90, now_ms=NOW)
    ops = {o["key_id"]: o for o in rep["operators"]}
    assert set(ops) == {cfg_key[:16], table_key[:16], revoked[:16]}
    c = ops[cfg_key[:16]]
    assert (c["source"], c["sources"], c["standing_roles"], c["jit_roles"], c["effective_roles"]) == (
        "config", ["config", "jit"], ["viewer"], ["admin"], ["admin", "viewer"])
    assert c["jit_grants"] == {"active": 1, "expired": 1, "revoked": 0} and c["last_use_ms"] is None
    t = ops[table_key[:16]]
    assert (t["source"], t["name"], t["effective_roles"], t["last_use_ms"], t["admin_chain_entries"]) == (
        "table", "carol", ["approver"], NOW - 5000, 1)
    assert ops[revoked[:16]]["revoked"] is True and ops[revoked[:16]]["effective_roles"] == []
    assert rep["operator_counts"] == {"total": 3, "active": 2, "revoked": 1, "config": 2, "table": 1,
                                      "with_active_jit": 1}
    assert [g["role"] for g in rep["jit_grants"]["active"]] == ["admin"]
    assert [g["role"] for g in rep["jit_grants"]["expired"]] == ["operator"] and rep["jit_grants"]["revoked"] == []
    tk = rep["trader_keys"]
    assert (tk["active"], tk["revoked"], tk["by_scope"], tk["by_scope_set"]) == (
        3, 1, {"read": 3, "trade": 2}, {"read": 1, "read,trade": 2})
    assert [(u["api_key"], u["idle_days"]) for u in tk["unused"]] == [("k" * 16, 200)]
    assert rep["sod"]["ok"] is True and rep["env"] == "dev"
    with pytest.raises(AccessError, match="unused-days must be > 0"):
        await access.access_review(pool, cfg, production=False, unused_days=0, now_ms=NOW)


# --- one real stack: the edge honours a grant, then refuses after revoke and after expiry -----------

def _edge_call(edge: str, k: Ed25519PrivateKey, body: dict[str, Any]) -> httpx.Response:
    path = "/v1/admin/break-glass/enable"
    b = json.dumps(body).encode()
    h = signed_headers(pub(k), k, "POST", path, b)
    h["content-type"] = "application/json"
    return httpx.post(edge + path, content=b, headers=h, timeout=30)


def _sh(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "scripts" / script), *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.slow
def test_jit_grant_through_the_signed_admin_api(tmp_path: Path) -> None:
    from spotex.cli import _load
    from spotex.supervisor import resolve_endpoints
    from spotex.testing import stack

    keys = {n: Ed25519PrivateKey.generate() for n in ("a", "b")}
    cfg = {pub(k): ["viewer"] for k in keys.values()}
    body = {"reason": "jit test", "ticket": "INC-5", "ttl_s": 60}
    # A 1 s operator cache (default 10 s): the grant and the revocation below are made by other processes.
    with stack(tmp_path / "stack", env={"SPOTEX_SECURITY__ADMIN_KEYS": json.dumps(cfg),
                                        "SPOTEX_SECURITY__OPERATOR_CACHE_TTL_S": "1"}) as st:
        edge = st.endpoint("edge")
        env = {**os.environ, **st.env, "SPOTEX_DATA_DIR": str(st.data_dir), "ACCESS_OUT_DIR": str(tmp_path / "ev")}
        r = _edge_call(edge, keys["a"], body)
        assert r.status_code == 403 and r.json()["code"] == "AUTH_ROLE", r.text
        # Grant through the seed entrypoint: the binding document carries the annotations.
        p = _sh("jit_access_grant.sh", "alice", "INC-5", "incident 5 mitigation", "60", "--key", pub(keys["a"]),
                "--role", "operator", "--actor", "boss", env=env)
        assert p.returncode == 0 and "jit_grant_ok=true" in p.stdout, p.stdout + p.stderr
        binding = Path(next(ln for ln in p.stdout.splitlines() if ln.startswith("binding=")).split("=", 1)[1])
        ann = json.loads(binding.read_text())["metadata"]["annotations"]
        assert binding.name.startswith("jit-alice-") and binding.parent == tmp_path / "ev"
        assert (ann["ticket-id"], ann["reason"], ann["granted-by"]) == ("INC-5", "incident 5 mitigation", "boss")
        # The edge's key cache (1 s here) may still hold the refused identity: poll until the grant shows.
        deadline = time.monotonic() + 40
        while (r := _edge_call(edge, keys["a"], body)).status_code == 403 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert r.status_code == 200 and r.json()["active"] is True, r.text
        # Playbook step 1: revoke; the edge drops the role within its cache TTL.
        rv = st.cli("access", "jit-revoke", "--all", "--actor", "sec", "--reason", "playbook", "--ticket", "SEC-1")
        assert rv.returncode == 0 and "revoked=1" in rv.stdout, rv.stdout + rv.stderr
        deadline = time.monotonic() + 40
        while (r := _edge_call(edge, keys["a"], body)).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert r.status_code == 403 and r.json()["code"] == "AUTH_ROLE", r.text

        # Expiry: a 1-minute grant made 50 s ago (the library takes the clock) on a key the edge has
        # not seen yet; allowed now, refused once expires_at has passed, with no revocation. The edge
        # caches the identity only until the grant expires, so the refusal owes nothing to the 1 s TTL.
        c = _load(str(st.data_dir), None)

        async def grant_b() -> access.JitGrant:
            pool = await access.connect_pool(str(resolve_endpoints(c.cfg, c.data).pg_dsn))
            try:
                return await access.grant(pool, cfg, user="bob", key=pub(keys["b"]), role="operator", ticket="INC-6",
                                          reason="short", minutes=1, actor="boss",
                                          now_ms=time.time_ns() // 1_000_000 - 50_000)
            finally:
                await pool.close()

        g = asyncio.run(grant_b())
        r = _edge_call(edge, keys["b"], body)
        assert r.status_code == 200, r.text
        time.sleep(max(0.0, g.expires_at_ms / 1000 - time.time()) + 0.5)
        r = _edge_call(edge, keys["b"], body)
        assert r.status_code == 403 and r.json()["code"] == "AUTH_ROLE", r.text

        p = _sh("rbac_sod_check.sh", env=env)
        assert p.returncode == 0 and p.stdout.splitlines()[-1] == "rbac_sod_ok=true", p.stdout + p.stderr
        assert json.loads((tmp_path / "ev" / "rbac-sod-latest.json").read_text())["ok"] is True
        p = _sh("access_review.sh", env=env)
        assert p.returncode == 0 and p.stdout.splitlines()[-1] == "access_review_ok=true", p.stdout + p.stderr
        rep = json.loads((tmp_path / "ev" / "access-review-latest.json").read_text())
        ops = {o["key_id"]: o for o in rep["operators"]}
        assert ops[pub(keys["a"])[:16]]["last_use_ms"] is not None  # its break-glass entries name it
        assert ops[pub(keys["a"])[:16]]["jit_grants"] == {"active": 0, "expired": 0, "revoked": 1}
        assert ops[pub(keys["b"])[:16]]["jit_grants"] == {"active": 0, "expired": 1, "revoked": 0}
        verify = st.cli("audit", "verify", "--require-events")
        assert verify.returncode == 0, verify.stdout + verify.stderr
