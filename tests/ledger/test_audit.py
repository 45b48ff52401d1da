"""The admin audit chain and break-glass state against a real PostgreSQL, and tamper detection on
stored chains and JSONL exports."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from edge.auth import OperatorIdentity
from ledger.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditError,
    append,
    break_glass_disable,
    break_glass_enable,
    break_glass_status,
    canonical_json,
    entry_hash,
    export_jsonl,
    head,
    load_entries,
    verify_chain,
    verify_db,
    verify_jsonl,
)
from ledger.migrate import migrate

T0 = 1_700_000_000_000
ROOT = Path(__file__).resolve().parents[2]
OPERATOR = OperatorIdentity("ab" * 32, "alice", frozenset({"operator"}), "config")


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate(pg_dsn)
    p = await asyncpg.create_pool(pg_dsn, min_size=2, max_size=10)
    yield p
    await p.close()


async def fill(pool: asyncpg.Pool, n: int) -> list[AuditEntry]:
    out = []
    for i in range(n):
        out.append(await append(pool, OPERATOR, "SetSymbolMode", {"symbol": "BTC-USDT", "mode": "CANCEL_ONLY", "i": i},
                                f"invariant violation {i}", f"INC-{i}", now_ms=T0 + i))
    return out


async def expect(code: str, coro: object) -> AuditError:
    with pytest.raises(AuditError) as ei:
        await coro  # type: ignore[misc]
    assert ei.value.code == code, ei.value
    return ei.value


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ledger.audit", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_entry_hash_golden_vector() -> None:
    # Pinned so an external verifier (or a shell one-liner: canonical line | sha256sum) agrees with us.
    fields = {"prev_hash": GENESIS_HASH, "seq": 1, "ts_ms": 1_700_000_000_000, "actor": "alice:0123456789abcdef",
              "roles": ["operator"], "action": "SetSymbolMode", "params": {"symbol": "BTC-USDT", "mode": "CANCEL_ONLY"},
              "reason": "invariant violation — ledger mismatch", "ticket": "INC-42"}
    line = canonical_json(fields)
    assert line.startswith(b'{"action":"SetSymbolMode","actor":') and b" " not in line.replace(b"violation", b"")[:40]
    assert "—".encode() in line  # UTF-8, not \u escapes
    assert entry_hash(fields) == "e90b3153a5fa1fe38e45da5decdd4f875e3f9fd97c863be0cee361d6701429eb"
    assert entry_hash({**fields, "hash": "ignored"}) == entry_hash(fields)


async def test_append_builds_a_hash_chain(pool: asyncpg.Pool) -> None:
    a, b = await fill(pool, 2)
    assert (a.seq, a.prev_hash, a.ts_ms) == (1, GENESIS_HASH, T0)
    assert a.actor == OPERATOR.actor and a.roles == ("operator",) and a.ticket == "INC-0"
    assert a.hash == entry_hash(a.fields())
    assert (b.seq, b.prev_hash) == (2, a.hash)
    assert await head(pool) == (2, b.hash)
    stored = await load_entries(pool)
    assert stored == [a.to_dict(), b.to_dict()]
    body = await pool.fetchval("SELECT body FROM audit_chain WHERE chain = 'admin' AND seq = 1")
    assert body == a.to_json() == canonical_json(a.to_dict()).decode()
    ok = await verify_db(pool, require_events=True)
    assert ok.ok and ok.count == 2 and ok.head_hash == b.hash
    # Chains are independent.
    c = await append(pool, "bob", "ChangeApply", {"id": 7}, "approved change", "CHG-7", chain="change",
                     roles=["approver"])
    assert c.seq == 1 and c.prev_hash == GENESIS_HASH and c.roles == ("approver",)


async def test_append_refuses_missing_reason_or_ticket_and_bad_params(pool: asyncpg.Pool) -> None:
    e = await expect("AUDIT_REASON_REQUIRED", append(pool, OPERATOR, "CancelAll", {"symbol": "X"}, "  ", "INC-1"))
    assert e.status == 400 and "reason" in e.detail
    await expect("AUDIT_TICKET_REQUIRED", append(pool, OPERATOR, "CancelAll", {"symbol": "X"}, "why", ""))
    await expect("AUDIT_TICKET_REQUIRED", append(pool, OPERATOR, "CancelAll", {}, "why", None))  # type: ignore[arg-type]
    await expect("VALIDATION", append(pool, OPERATOR, "CancelAll", {"qty": 0.1}, "why", "INC-1"))
    await expect("VALIDATION", append(pool, OPERATOR, "CancelAll", {"when": object()}, "why", "INC-1"))
    await expect("VALIDATION", append(pool, OPERATOR, "Cancel All!", {}, "why", "INC-1"))
    await expect("VALIDATION", append(pool, "  ", "CancelAll", {}, "why", "INC-1"))
    await expect("VALIDATION", append(pool, OPERATOR, "CancelAll", {}, "why", "INC\n1"))
    assert await pool.fetchval("SELECT count(*) FROM audit_chain") == 0
    assert await head(pool) == (0, GENESIS_HASH)


async def test_concurrent_appends_are_serialised(pool: asyncpg.Pool) -> None:
    entries = await asyncio.gather(*(append(pool, f"op{i}", "WithdrawalsHalt", {"on": i % 2 == 0}, "drill",
                                            "INC-9") for i in range(30)))
    assert sorted(e.seq for e in entries) == list(range(1, 31))
    res = await verify_db(pool, require_events=True)
    assert res.ok and res.count == 30


async def test_append_commits_with_the_action_or_not_at_all(pool: asyncpg.Pool) -> None:
    await pool.execute("CREATE TABLE symbol_mode (symbol text PRIMARY KEY, mode text NOT NULL)")
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await append(conn, OPERATOR, "SetSymbolMode", {"symbol": "BTC-USDT"}, "why", "INC-1")
                await conn.execute("INSERT INTO symbol_mode VALUES ('BTC-USDT', 'CANCEL_ONLY')")
                raise RuntimeError("action failed")
        assert await head(conn) == (0, GENESIS_HASH)
        async with conn.transaction():
            e = await append(conn, OPERATOR, "SetSymbolMode", {"symbol": "BTC-USDT"}, "why", "INC-1")
            await conn.execute("INSERT INTO symbol_mode VALUES ('BTC-USDT', 'CANCEL_ONLY')")
    assert e.seq == 1 and await pool.fetchval("SELECT mode FROM symbol_mode") == "CANCEL_ONLY"
    # An audit failure stops the action: it must come first.
    with pytest.raises(AuditError):
        async with pool.acquire() as conn, conn.transaction():
            await append(conn, OPERATOR, "SetSymbolMode", {"symbol": "ETH-USDT"}, "", "INC-2")
            await conn.execute("INSERT INTO symbol_mode VALUES ('ETH-USDT', 'SOFT_HALT')")
    assert await pool.fetchval("SELECT count(*) FROM symbol_mode") == 1


async def test_database_failure_is_audit_unavailable(pg_dsn: str, pool: asyncpg.Pool) -> None:
    conn = await asyncpg.connect(pg_dsn)
    await conn.close()
    e = await expect("AUDIT_UNAVAILABLE", append(conn, OPERATOR, "CancelAll", {}, "why", "INC-1"))
    assert e.status == 503


async def test_history_is_append_only_in_the_database(pool: asyncpg.Pool) -> None:
    await fill(pool, 2)
    for sql in ("UPDATE audit_chain SET actor = 'mallory' WHERE seq = 1", "DELETE FROM audit_chain WHERE seq = 2",
                "TRUNCATE audit_chain"):
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await pool.execute(sql)
    assert (await verify_db(pool)).ok


# --- tamper detection ----------------------------------------------------------------------------

def rehash(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "hash": entry_hash(d)}


async def test_verify_detects_changed_missing_reordered(pool: asyncpg.Pool) -> None:
    good = [e.to_dict() for e in await fill(pool, 5)]
    assert verify_chain(good).ok and verify_chain([AuditEntry.from_dict(d) for d in good]).ok

    changed = [dict(d) for d in good]
    changed[2]["reason"] = "nothing to see"
    r = verify_chain(changed)
    assert (r.ok, r.kind, r.first_bad_seq, r.count, r.head_hash) == (False, "changed", 3, 2, good[1]["hash"])

    rewritten = [dict(d) for d in good]  # changed and re-hashed: the next link breaks
    rewritten[2] = rehash({**rewritten[2], "params": {"symbol": "ETH-USDT"}})
    r = verify_chain(rewritten)
    assert (r.kind, r.first_bad_seq) == ("changed", 4) and "prev_hash" in (r.why or "")

    r = verify_chain(good[:2] + good[3:])
    assert (r.kind, r.first_bad_seq) == ("missing", 3) and "seq 3 missing" in (r.why or "")
    r = verify_chain(good[1:])
    assert (r.kind, r.first_bad_seq) == ("missing", 1)
    r = verify_chain(good[:1] + good[4:])
    assert r.kind == "missing" and "seqs 2..4" in (r.why or "")

    r = verify_chain([good[0], good[2], good[1], good[3], good[4]])
    assert (r.kind, r.first_bad_seq) == ("reordered", 2)
    r = verify_chain([*good[:3], good[2], *good[3:]])
    assert (r.kind, r.first_bad_seq) == ("reordered", 3)

    # Removing and renumbering with fresh hashes from the cut onwards: the link to the earlier entry breaks.
    renumbered = [*good[:2], rehash({**good[3], "seq": 3})]
    r = verify_chain(renumbered)
    assert (r.kind, r.first_bad_seq) == ("changed", 3)

    # A cut tail is invisible to the chain alone, not to its head.
    assert verify_chain(good[:4]).ok
    r = verify_chain(good[:4], expected_head=(5, good[4]["hash"]))
    assert (r.ok, r.kind, r.first_bad_seq) == (False, "missing", 5)
    assert not verify_chain(good, expected_head=(5, "f" * 64)).ok
    # A suffix verifies against its anchor.
    assert verify_chain(good[2:], start=(2, good[1]["hash"])).ok


def test_verify_malformed_and_empty() -> None:
    assert verify_chain([]).ok and verify_chain([]).count == 0
    r = verify_chain([], require_events=True)
    assert (r.ok, r.kind, r.head_hash) == (False, "empty", GENESIS_HASH)
    r = verify_chain([{"seq": 1}])
    assert r.kind == "malformed" and "lacks" in (r.why or "")
    fields = {"prev_hash": GENESIS_HASH, "seq": 1, "ts_ms": 1, "actor": "a", "roles": [], "action": "X",
              "params": {}, "reason": "r", "ticket": "t"}
    assert verify_chain([rehash(fields)]).ok
    assert verify_chain([{**rehash(fields), "extra": 1}]).kind == "malformed"
    assert verify_chain([{**rehash(fields), "seq": True}]).kind == "malformed"
    assert verify_chain([{**rehash(fields), "hash": "XYZ"}]).kind == "malformed"
    assert verify_chain(["not an object"]).kind == "malformed"  # type: ignore[list-item]


async def test_jsonl_export_and_tamper_drill(pool: asyncpg.Pool, tmp_path: Path) -> None:
    entries = await fill(pool, 4)
    path = tmp_path / "audit.jsonl"
    assert await export_jsonl(pool, path) == 4
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == [e.to_json() for e in entries]
    ok = verify_jsonl(path, require_events=True)
    assert ok.ok and ok.count == 4 and ok.head_hash == entries[-1].hash

    def drill(name: str, new_lines: list[str]) -> Any:
        p = tmp_path / name
        p.write_text("\n".join(new_lines) + "\n", encoding="utf-8")
        return verify_jsonl(p, require_events=True)

    assert drill("edited.jsonl", [ln.replace("INC-2", "INC-3") for ln in lines]).kind == "changed"
    assert drill("deleted.jsonl", lines[:1] + lines[2:]).kind == "missing"
    assert drill("swapped.jsonl", [lines[0], lines[2], lines[1], lines[3]]).kind == "reordered"
    r = drill("garbage.jsonl", [*lines[:2], "{not json", *lines[2:]])
    assert (r.kind, r.first_bad_seq, r.count) == ("malformed", 3, 2)
    dup = lines[0][:-1] + ',"seq":1}'
    assert drill("dupkey.jsonl", [dup]).kind == "malformed"
    assert drill("blank-lines.jsonl", [lines[0], "", lines[1]]).ok
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert verify_jsonl(empty).ok
    assert verify_jsonl(empty, require_events=True).kind == "empty"
    # Pretty-printing does not change meaning, so it still verifies.
    pretty = [json.dumps(json.loads(ln), indent=None, separators=(", ", ": ")) for ln in lines]
    assert drill("pretty.jsonl", pretty).ok


async def test_cli_verify_export_head(pool: asyncpg.Pool, pg_dsn: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = cli("verify", str(empty), "--require-events")
    assert r.returncode == 1 and json.loads(r.stdout)["kind"] == "empty"
    entries = await fill(pool, 3)
    out = tmp_path / "export.jsonl"
    r = cli("export", "--dsn", pg_dsn, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exported"] == 3
    r = cli("verify", str(out), "--require-events")
    assert r.returncode == 0 and json.loads(r.stdout) == {"ok": True, "head_hash": entries[-1].hash, "count": 3,
                                                          "first_bad_seq": None, "why": None, "kind": None}
    r = cli("verify-db", "--dsn", pg_dsn, "--require-events")
    assert r.returncode == 0 and json.loads(r.stdout)["count"] == 3
    r = cli("head", "--dsn", pg_dsn)
    assert json.loads(r.stdout) == {"chain": "admin", "seq": 3, "hash": entries[-1].hash}
    out.write_text(out.read_text().replace('"i":1', '"i":9'))
    r = cli("verify", str(out))
    assert r.returncode == 1 and json.loads(r.stdout)["first_bad_seq"] == 2
    assert cli("verify", str(tmp_path / "nope.jsonl")).returncode == 2


# --- break-glass ---------------------------------------------------------------------------------

async def test_break_glass_lifecycle_is_audited(pool: asyncpg.Pool) -> None:
    assert not (await break_glass_status(pool, now_ms=T0)).active
    st = await break_glass_enable(pool, "oncall-1", 900, "INC-7 core down", now_ms=T0)
    assert st.active and st.actor == "oncall-1" and st.expires_at_ms == T0 + 900_000 and st.remaining_s == 900
    assert st.ticket == "BREAK-GLASS-NO-TICKET" and st.audit_seq == 1
    st = await break_glass_status(pool, now_ms=T0 + 899_500)
    assert st.active and st.remaining_s == 1
    st = await break_glass_disable(pool, OPERATOR, "resolved", "INC-7", now_ms=T0 + 1000)
    assert not st.active and st.disabled_by == OPERATOR.actor and st.disabled_at_ms == T0 + 1000
    # Disabling again changes nothing and appends nothing.
    await break_glass_disable(pool, OPERATOR, "again", now_ms=T0 + 2000)
    # Re-enable with a ticket; expiry needs no write.
    st = await break_glass_enable(pool, OPERATOR, 60, "second incident", "INC-8", now_ms=T0 + 3000)
    assert st.active and st.ticket == "INC-8" and st.audit_seq == 3
    assert not (await break_glass_status(pool, now_ms=T0 + 63_000)).active
    await break_glass_disable(pool, OPERATOR, "expired anyway", now_ms=T0 + 63_000)
    chain = await load_entries(pool)
    assert [(e["action"], e["actor"]) for e in chain] == [
        ("BreakGlassEnable", "oncall-1"), ("BreakGlassDisable", OPERATOR.actor), ("BreakGlassEnable", OPERATOR.actor)]
    assert chain[0]["params"] == {"ttl_s": 900, "expires_at_ms": T0 + 900_000}
    assert chain[1]["params"] == {"enabled_audit_seq": 1} and chain[1]["reason"] == "resolved"
    assert (await verify_db(pool, require_events=True)).ok


async def test_break_glass_refusals(pool: asyncpg.Pool) -> None:
    for ttl in (0, -5, 4 * 3600 + 1, 1.5, True):
        e = await expect("BREAK_GLASS_TTL", break_glass_enable(pool, "oncall", ttl, "why"))  # type: ignore[arg-type]
        assert e.status == 400
    await break_glass_enable(pool, "oncall", 7200, "why", max_ttl_s=7200, now_ms=T0)
    await expect("AUDIT_REASON_REQUIRED", break_glass_enable(pool, "oncall", 60, " "))
    await expect("AUDIT_REASON_REQUIRED", break_glass_disable(pool, "oncall", ""))
    assert (await break_glass_status(pool, now_ms=T0)).active
    # Inside a transaction that fails, neither the state nor the entry lands.
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await break_glass_disable(conn, "oncall", "done", now_ms=T0 + 1)
                raise RuntimeError("rollback")
    assert (await break_glass_status(pool, now_ms=T0 + 1)).active
    assert await head(pool) == (1, (await load_entries(pool))[0]["hash"])
