"""Change workflow (ledger/changes.py) against real PostgreSQL, NATS JetStream and an in-process core
node: every refusal with its code and its ChangeRefused entry, and the happy path (two approvals,
apply, each effect visible, invariants and both audit chains verified), then a revert."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from core.bus import ensure_streams
from core.node import JOURNAL_STREAM, CoreNode, CoreOptions
from core.sim import sim_markets
from ledger import audit, changes
from ledger.changes import ChangeError, Exchange
from tests.ledger.test_settlement import pool

__all__ = ["pool"]

SYM = "BTC-USDT"
OPS = [{"kind": "set_throttle", "symbol": SYM, "orders_per_s": 7, "burst": 9},
       {"kind": "set_mode", "symbol": SYM, "mode": "CANCEL_ONLY"},
       {"kind": "withdrawals_halt", "on": True}]


@contextlib.asynccontextmanager
async def exchange(url: str, tmp: Path) -> AsyncIterator[Exchange]:
    """Fresh streams, a leading core node and the symbol_throttle bucket on the session nats-server."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    for name in ("CMD", "EVT", JOURNAL_STREAM):
        with contextlib.suppress(Exception):
            await js.delete_stream(name)
    for kv in ("core_lease", "symbol_throttle"):
        with contextlib.suppress(Exception):
            await js.delete_key_value(kv)
    await ensure_streams(js, lease_ttl_s=1.5)
    node = CoreNode(CoreOptions(node_id="chg", nats_url=url, core_dir=str(tmp / "core"), lease_ttl_ms=1500,
                                checkpoint_every=25, snapshot_every=10_000, markets=sim_markets(), ack_wait_s=2.0))
    task = asyncio.create_task(node.run())
    ex = Exchange(nc)
    try:
        for _ in range(300):
            if node.role == "leader" and await changes.core_mode(ex, SYM) is not None:
                break
            await asyncio.sleep(0.05)
        assert await changes.core_mode(ex, SYM) == "NORMAL"
        yield ex
    finally:
        node.stopping.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await nc.close()


async def _refused(code: str, coro: Any) -> ChangeError:
    with pytest.raises(ChangeError) as ei:
        await coro
    assert ei.value.code == code, ei.value
    return ei.value


async def _chain(p: asyncpg.Pool, chain: str) -> list[dict[str, Any]]:
    return await audit.load_entries(p, chain)


async def test_refusals_each_coded_and_audited(pool: asyncpg.Pool) -> None:
    p = await changes.propose(pool, "alice", OPS, "drill: throttle and cancel-only", "CHG-1", symbols=[SYM])
    assert p.state == "proposed" and p.content_ok and len(p.hash) == 64
    await _refused("CHANGE_INVALID", changes.propose(pool, "alice", [{"kind": "set_mode", "symbol": SYM,
                                                                       "mode": "PAUSED"}], "r", "t"))
    await _refused("CHANGE_INVALID", changes.propose(pool, "alice", OPS, "r", "t", symbols=["ETH-USDT"]))
    await _refused("CHANGE_NOT_APPROVED", changes.apply(pool, None, p.id, "carol"))
    await _refused("CHANGE_SELF_APPROVAL", changes.approve(pool, p.id, "alice"))
    await changes.approve(pool, p.id, "bob")
    await _refused("CHANGE_DUPLICATE_APPROVAL", changes.approve(pool, p.id, "bob"))
    await _refused("CHANGE_NOT_APPROVED", changes.apply(pool, None, p.id, "carol"))
    await _refused("CHANGE_NOT_FOUND", changes.approve(pool, "CHG-0000000000000000", "bob"))

    # Approved by two, then changed in the database behind the workflow's back.
    await changes.approve(pool, p.id, "dave")
    tampered = [{**OPS[0], "orders_per_s": 70_000}, *OPS[1:]]
    await pool.execute("UPDATE change_proposals SET ops = $2 WHERE id = $1", p.id, json.dumps(tampered))
    await _refused("CHANGE_TAMPERED", changes.apply(pool, None, p.id, "carol"))
    await _refused("CHANGE_TAMPERED", changes.approve(pool, p.id, "erin"))
    # Re-hashing the content does not help: the approvals are for the old hash.
    again = await changes.get(pool, p.id)
    new_hash = changes.content_hash({**again.__dict__})
    await pool.execute("UPDATE change_proposals SET hash = $2 WHERE id = $1", p.id, new_hash)
    err = await _refused("CHANGE_TAMPERED", changes.apply(pool, None, p.id, "carol"))
    assert "approval of bob is for hash" in err.detail

    # An approval row forged in the table (no ChangeApproved entry) is refused too.
    q = await changes.propose(pool, "alice", OPS[:1], "forged approvals", "CHG-2")
    await changes.approve(pool, q.id, "bob")
    await pool.execute("INSERT INTO change_approvals VALUES ($1, 'mallory', 1, $2, 1)", q.id, q.hash)
    await _refused("CHANGE_TAMPERED", changes.apply(pool, None, q.id, "carol"))

    # Expired: approvals and apply after expires_at_ms are refused.
    e = await changes.propose(pool, "alice", OPS[:1], "expires", "CHG-3", ttl_s=60)
    await changes.approve(pool, e.id, "bob")
    await changes.approve(pool, e.id, "dave")
    await _refused("CHANGE_EXPIRED", changes.apply(pool, None, e.id, "carol", now_ms=e.expires_at_ms))
    await _refused("CHANGE_EXPIRED", changes.approve(pool, e.id, "erin", now_ms=e.expires_at_ms + 1))

    # Approved and intact, but no exchange to apply to: refused, nothing marked applied.
    await _refused("CHANGE_UNAVAILABLE", changes.apply(pool, None, e.id, "carol"))
    assert (await changes.get(pool, e.id)).state == "proposed"

    entries = await _chain(pool, "change")
    refused = [(x["actor"], x["params"]["step"], x["params"]["code"]) for x in entries
               if x["action"] == "ChangeRefused"]
    assert refused == [("carol", "apply", "CHANGE_NOT_APPROVED"), ("alice", "approve", "CHANGE_SELF_APPROVAL"),
                       ("bob", "approve", "CHANGE_DUPLICATE_APPROVAL"), ("carol", "apply", "CHANGE_NOT_APPROVED"),
                       ("bob", "approve", "CHANGE_NOT_FOUND"), ("carol", "apply", "CHANGE_TAMPERED"),
                       ("erin", "approve", "CHANGE_TAMPERED"), ("carol", "apply", "CHANGE_TAMPERED"),
                       ("carol", "apply", "CHANGE_TAMPERED"), ("carol", "apply", "CHANGE_EXPIRED"),
                       ("erin", "approve", "CHANGE_EXPIRED"), ("carol", "apply", "CHANGE_UNAVAILABLE")]
    assert (await audit.verify_db(pool, "change", require_events=True)).ok
    assert await _chain(pool, "admin") == []  # nothing was executed


async def test_apply_verifies_then_revert_and_no_second_apply(pool: asyncpg.Pool, nats_srv: Any,
                                                              tmp_path: Path) -> None:
    async with exchange(nats_srv.url, tmp_path) as ex:
        before = await changes.read_state(ex, OPS)
        assert before == [{"throttle": None}, {"mode": "NORMAL"}, {"withdrawals_halted": False}]
        p = await changes.propose(pool, "alice", OPS, "throttle and cancel-only", "CHG-10", symbols=[SYM])
        await changes.approve(pool, p.id, "bob")
        await changes.approve(pool, p.id, "dave")
        done = await changes.apply(pool, ex, p.id, "carol")
        assert done.state == "verified", done.result
        res = done.result or {}
        assert res["ok"] and not res["skip_verification"] and res["before"] == before
        assert res["checks"]["invariants"]["ok"] and res["checks"]["audit_admin"]["ok"]
        assert res["checks"]["audit_change"]["ok"]
        assert await changes.core_mode(ex, SYM) == "CANCEL_ONLY"
        assert await changes.core_withdrawals_halted(ex) is True
        thr = await changes.operator_throttle(ex, SYM)
        assert thr is not None and (thr["orders_per_s"], thr["burst"], thr["actor"]) == (7, 9, "carol")

        # The ops are on the admin chain with the change id, as other admin actions are.
        admin = await _chain(pool, "admin")
        assert [(x["action"], x["actor"], x["params"]["change_id"]) for x in admin] == [
            ("SetSymbolThrottle", "carol", p.id), ("SetSymbolMode", "carol", p.id), ("WithdrawalsHalt", "carol", p.id)]
        assert thr["audit_seq"] == admin[0]["seq"]

        await _refused("CHANGE_ALREADY_APPLIED", changes.apply(pool, ex, p.id, "carol"))
        await _refused("CHANGE_ALREADY_APPLIED", changes.approve(pool, p.id, "erin"))

        # The revert, from what apply recorded before it acted, leaves things as found.
        rev_ops = changes.revert_ops(done.ops, res["before"])
        assert rev_ops == [{"kind": "withdrawals_halt", "on": False},
                           {"kind": "set_mode", "symbol": SYM, "mode": "NORMAL"},
                           {"kind": "clear_throttle", "symbol": SYM}]
        r = await changes.propose(pool, "alice", rev_ops, f"revert {p.id}", "CHG-10")
        await changes.approve(pool, r.id, "bob")
        await changes.approve(pool, r.id, "dave")
        rdone = await changes.apply(pool, ex, r.id, "carol", skip_verification=True)
        assert rdone.state == "verified" and "invariants" not in (rdone.result or {})["checks"]
        assert await changes.read_state(ex, OPS) == before

        actions = [x["action"] for x in await _chain(pool, "change")]
        assert actions == ["ChangeProposed", "ChangeApproved", "ChangeApproved", "ChangeApplied", "ChangeVerified",
                           "ChangeRefused", "ChangeRefused",
                           "ChangeProposed", "ChangeApproved", "ChangeApproved", "ChangeApplied", "ChangeVerified"]
        assert (await audit.verify_db(pool, "change", require_events=True)).ok


async def test_effect_not_visible_is_verify_failed(pool: asyncpg.Pool, nats_srv: Any) -> None:
    """CMD accepts the command but no core applies it: apply reports verify_failed, audited."""
    nc = await nats.connect(nats_srv.url)
    try:
        js = nc.jetstream()
        for name in ("CMD", "EVT", JOURNAL_STREAM):
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        await ensure_streams(js, lease_ttl_s=1.5)
        p = await changes.propose(pool, "alice", [OPS[1]], "no core running", "CHG-20")
        await changes.approve(pool, p.id, "bob")
        await changes.approve(pool, p.id, "dave")
        done = await changes.apply(pool, Exchange(nc), p.id, "carol", skip_verification=True, verify_timeout_s=1.0)
    finally:
        await nc.close()
    assert done.state == "verify_failed"
    assert (done.result or {})["ops"][0]["visible"] is False
    last = (await _chain(pool, "change"))[-1]
    assert last["action"] == "ChangeVerifyFailed" and last["params"]["failures"] == ["op 1: effect not visible"]


def test_parse_op() -> None:
    assert changes.parse_op("mode:BTC-USDT=cancel_only") == {"kind": "set_mode", "symbol": "BTC-USDT",
                                                               "mode": "CANCEL_ONLY"}
    assert changes.parse_op("throttle:BTC-USDT=5/10")["burst"] == 10
    assert changes.parse_op("throttle-clear:BTC-USDT") == {"kind": "clear_throttle", "symbol": "BTC-USDT"}
    assert changes.parse_op("withdrawals-halt:off") == {"kind": "withdrawals_halt", "on": False}
    for bad in ("mode:BTC-USDT", "throttle:BTC-USDT=x", "withdrawals-halt:maybe", "halt:BTC-USDT"):
        with pytest.raises(ChangeError):
            changes.parse_op(bad)
