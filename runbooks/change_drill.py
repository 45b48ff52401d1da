"""``spotex drill change-workflow`` (seed §4.7 "Change workflow drill"; docs/changes.md).

Runs the change workflow end to end through its seed entrypoints (``scripts/change_proposal.sh``,
``scripts/change_approve.sh``, ``scripts/apply_change.sh``, ``scripts/verify_change_audit_chain.sh``)
against a whole stack, on one symbol:

- ``proposed``: a change of two ops, an operator throttle (5/s) and CANCEL_ONLY;
- ``refused_unapproved``: applying it before any approval: CHANGE_NOT_APPROVED;
- ``refused_self_approval``: the proposer approving it: CHANGE_SELF_APPROVAL;
- ``refused_duplicate_approval``: the first approver approving again: CHANGE_DUPLICATE_APPROVAL;
- ``refused_tampered``: a second proposal, approved by two, then its ops rewritten in PostgreSQL
  (what someone with database access could do): apply refuses CHANGE_TAMPERED and nothing changed;
- ``approved``: the second distinct approver: two approvals;
- ``applied_verified``: apply; the change ends ``verified``, the drill reads the core's mode and the
  KV throttle itself, and finds the ops on the admin chain carrying the change id;
- ``edge_cancel_only``: a funded trader's signed REST order through the real edge is refused
  ``409 CANCEL_ONLY`` (anything that rested on the way is canceled);
- ``refused_reapply``: applying it again: CHANGE_ALREADY_APPLIED;
- ``reverted``: the revert (from what apply recorded before acting) proposed, approved by two,
  applied and verified: the symbol is as found;
- ``edge_orders_after_revert``: the trader's new orders are accepted again (then canceled);
- ``change_chain_verified``: ``verify_change_audit_chain.sh --require-events`` passes and the chain
  holds every step above (proposed, approved, refused, applied, verified).

Apply runs with ``--skip-verification`` unless RUNBOOK_SKIP_VERIFICATION is false (the seed's
"full verification apply"), in which case apply also runs the ledger invariants and verifies both
audit chains. Evidence: status-before.json, status-after.json, change-workflow-summary.json
(``change_workflow_ok``, steps, ``failed_steps``, ``recommended_action``) and
verify-change-audit-chain-<stamp>.json. Success line ``runbook_change_workflow_ok=true``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from runbooks.common import Drill

__all__ = ["change_workflow"]

ROOT = Path(__file__).resolve().parent.parent
PROPOSER, APPROVERS, APPLIER = "drill-proposer", ("drill-approver-1", "drill-approver-2"), "drill-applier"
STEPS = ("proposed", "refused_unapproved", "refused_self_approval", "refused_duplicate_approval", "refused_tampered",
         "approved", "applied_verified", "edge_cancel_only", "refused_reapply", "reverted", "edge_orders_after_revert",
         "change_chain_verified")
ACTIONS = {
    "proposed": "CHECK_DATABASE: proposals cannot be stored (spotex db migrate; PostgreSQL reachable?)",
    "refused_unapproved": "STOP_CHANGES: an unapproved change was not refused; fix ledger/changes.py before any change",
    "refused_self_approval": "STOP_CHANGES: separation of duties broken (proposer could approve)",
    "refused_duplicate_approval": "STOP_CHANGES: one approver counted twice",
    "refused_tampered": "STOP_CHANGES: a tampered proposal was not refused",
    "approved": "CHECK_DATABASE: approvals cannot be recorded",
    "applied_verified": "INVESTIGATE_APPLY: the change was not applied or its effect not visible (core, NATS KV, "
                        "invariants, audit chains: see the step detail)",
    "edge_cancel_only": "INVESTIGATE_EDGE: the core shows CANCEL_ONLY but a trader's new order was not refused",
    "edge_orders_after_revert": "RESTORE_MANUALLY: after the revert a trader's new order is still refused",
    "refused_reapply": "STOP_CHANGES: an applied change could be applied twice",
    "reverted": "RESTORE_MANUALLY: the symbol may not be as found; set its mode/throttle back through spotex change",
    "change_chain_verified": "INVESTIGATE_AUDIT: the change audit chain does not verify or lacks steps "
                             "(spotex audit verify --chain change)",
}


class _Abort(Exception):
    """The first step failed: nothing else can run."""


def _sh(d: Drill, script: str, *args: str) -> tuple[int, Any, str]:
    """Run a seed script against the drill's stack: (exit code, parsed JSON stdout or None, stderr)."""
    res = subprocess.run([str(ROOT / "scripts" / script), *args, "--data-dir", str(d.data_dir), "--json"],
                         capture_output=True, text=True, timeout=180)
    try:
        out = json.loads(res.stdout) if res.stdout.strip() else None
    except ValueError:
        out = res.stdout.strip()
    return res.returncode, out, res.stderr.strip()


async def _run(d: Drill, script: str, *args: str) -> tuple[int, Any, str]:
    return await asyncio.to_thread(_sh, d, script, *args)


async def _approve_by_both(d: Drill, change_id: str, detail: dict[str, Any]) -> bool:
    """Both APPROVERS approve through the seed script; each one's answer goes into ``detail``."""
    ok = True
    for who in APPROVERS:
        rc, _, err = await _run(d, "change_approve.sh", change_id, "--actor", who)
        ok = ok and rc == 0
        detail[f"approve_{who}"] = err or rc
    return ok


def _refused(rc: int, err: str, code: str) -> bool:
    return rc == 1 and f"spotex: {code}:" in err


async def change_workflow(d: Drill, *, symbol: str | None = None, skip_verification: bool = True) -> bool:
    import asyncpg
    import nats

    from ledger import audit, changes

    d.status("before")
    sym = symbol or d.cfg.markets[0].symbol
    ep = d.endpoints
    steps: dict[str, dict[str, Any]] = {}
    ids: dict[str, str] = {}
    skip_flag = ["--skip-verification"] if skip_verification else []
    ticket = f"DRILL-CHG-{int(time.time())}"
    ops = [f"throttle:{sym}=5/5", f"mode:{sym}=CANCEL_ONLY"]
    d.emit("change_workflow_symbol", sym)
    d.emit("change_workflow_skip_verification", skip_verification)

    def step(name: str, ok: bool, **detail: Any) -> bool:
        steps[name] = {"ok": bool(ok), **detail}
        d.emit(f"change_step_{name}_ok", bool(ok))
        return bool(ok)

    pool = await asyncpg.create_pool(ep.pg_dsn, min_size=1, max_size=4)
    nc = await nats.connect(ep.nats_url)
    ex = changes.Exchange(nc, d.cfg.core.query_subject)
    applied: Any = None
    trader: Any = None
    edge_url = d.component("edge").get("endpoint")
    try:
        if edge_url:
            from runbooks.common import Trader

            trader = await Trader.create(d, pool, ep.nats_url, str(edge_url))
        state_ops = [changes.parse_op(o) for o in ops]
        before = await changes.read_state(ex, state_ops)
        admin_head = (await audit.head(pool, "admin"))[0]

        rc, p, err = await _run(d, "change_proposal.sh", *[a for o in ops for a in ("--op", o)], "--actor", PROPOSER,
                                "--reason", f"change-workflow drill: throttle and CANCEL_ONLY on {sym}",
                                "--ticket", ticket)
        if not step("proposed", rc == 0 and isinstance(p, dict) and p.get("state") == "proposed",
                    rc=rc, stderr=err, change=p):
            raise _Abort
        cid = ids["change"] = p["id"]

        rc, _, err = await _run(d, "apply_change.sh", cid, "--actor", APPLIER, *skip_flag)
        step("refused_unapproved", _refused(rc, err, "CHANGE_NOT_APPROVED"), rc=rc, stderr=err)
        rc, _, err = await _run(d, "change_approve.sh", cid, "--actor", PROPOSER)
        step("refused_self_approval", _refused(rc, err, "CHANGE_SELF_APPROVAL"), rc=rc, stderr=err)
        rc1, _, err1 = await _run(d, "change_approve.sh", cid, "--actor", APPROVERS[0])
        rc, _, err = await _run(d, "change_approve.sh", cid, "--actor", APPROVERS[0])
        step("refused_duplicate_approval", rc1 == 0 and _refused(rc, err, "CHANGE_DUPLICATE_APPROVAL"),
             first_approval_rc=rc1, first_approval_stderr=err1, rc=rc, stderr=err)

        # A second change, approved by two, then rewritten in the database: refused at apply.
        rc, t, err = await _run(d, "change_proposal.sh", "--op", f"throttle:{sym}=2/2", "--actor", PROPOSER,
                                "--reason", "change-workflow drill: to be tampered with", "--ticket", ticket,
                                "--ttl-sec", "300")
        tampered_ok = rc == 0 and isinstance(t, dict)
        detail: dict[str, Any] = {"propose_rc": rc, "propose_stderr": err}
        if tampered_ok:
            ids["tampered"] = t["id"]
            tampered_ok = await _approve_by_both(d, t["id"], detail)
            forged = [{"kind": "set_throttle", "symbol": sym, "orders_per_s": 1_000_000, "burst": 1_000_000}]
            await pool.execute("UPDATE change_proposals SET ops = $2 WHERE id = $1", t["id"], json.dumps(forged))
            thr_before = await changes.operator_throttle(ex, sym)
            rc, _, err = await _run(d, "apply_change.sh", t["id"], "--actor", APPLIER, *skip_flag)
            untouched = await changes.operator_throttle(ex, sym) == thr_before
            tampered_ok = tampered_ok and _refused(rc, err, "CHANGE_TAMPERED") and untouched
            detail.update(rc=rc, stderr=err, throttle_untouched=untouched)
        step("refused_tampered", tampered_ok, **detail)

        rc, a2, err = await _run(d, "change_approve.sh", cid, "--actor", APPROVERS[1])
        approvers = sorted(x["approver"] for x in a2.get("approvals") or []) if isinstance(a2, dict) else []
        step("approved", rc == 0 and approvers == sorted(APPROVERS), rc=rc, stderr=err, approvers=approvers)

        rc, applied, err = await _run(d, "apply_change.sh", cid, "--actor", APPLIER, *skip_flag)
        now = await changes.read_state(ex, state_ops)
        admin = [e for e in await audit.load_entries(pool, "admin", after_seq=admin_head)
                 if (e.get("params") or {}).get("change_id") == cid]
        want_now = [{"throttle": {"orders_per_s": 5, "burst": 5}}, {"mode": "CANCEL_ONLY"}]
        result = applied.get("result") if isinstance(applied, dict) else None
        checks = (result or {}).get("checks") or {}
        full_ok = skip_verification or all(checks.get(k, {}).get("ok") for k in ("invariants", "audit_admin",
                                                                                  "audit_change"))
        step("applied_verified", rc == 0 and isinstance(applied, dict) and applied.get("state") == "verified"
             and now == want_now and [e["action"] for e in admin] == ["SetSymbolThrottle", "SetSymbolMode"]
             and full_ok, rc=rc, stderr=err, state_before=before, state_after=now,
             admin_entries=[{k: e[k] for k in ("seq", "action", "actor")} for e in admin], checks=checks)

        if trader is not None:
            probe = await trader.probe(sym, "CANCEL_ONLY", timeout=20, limit=10)
            step("edge_cancel_only", probe["seen"] and probe["cancels"] == probe["cancels_ok"], probe=probe)
        else:
            step("edge_cancel_only", False, detail="no edge in this stack")

        rc, _, err = await _run(d, "apply_change.sh", cid, "--actor", APPLIER, *skip_flag)
        step("refused_reapply", _refused(rc, err, "CHANGE_ALREADY_APPLIED"), rc=rc, stderr=err)
    except _Abort:
        pass
    except Exception as exc:  # a broken step must still leave the symbol as found and write the summary
        steps.setdefault("error", {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]})
    finally:
        try:
            await _revert(d, ex, steps, ids, applied, skip_flag, ticket)
            if trader is not None and steps.get("reverted", {}).get("ok"):
                burst = await trader.burst(sym, 2)
                step("edge_orders_after_revert", burst["flowing"] and burst["cancels_ok"], burst=burst)
        finally:
            if trader is not None:
                await trader.close()
            await nc.close()
    try:
        await _verify_chain(d, pool, steps, ids)
    finally:
        await pool.close()
    return _finish(d, steps, ids, skip_verification)


async def _revert(d: Drill, ex: Any, steps: dict[str, dict[str, Any]], ids: dict[str, str], applied: Any,
                  skip_flag: list[str], ticket: str) -> None:
    """Propose, approve and apply the revert of an applied change; a step only when something was applied."""
    from ledger import changes

    result = applied.get("result") if isinstance(applied, dict) else None
    if not result:
        if "change" in ids:
            steps["reverted"] = {"ok": False, "detail": "nothing applied, nothing to revert"}
            d.emit("change_step_reverted_ok", False)
        return
    before = result["before"]
    rev = changes.revert_ops(applied["ops"], before)
    spec = []
    for op in rev:
        if op["kind"] == "set_mode":
            spec.append(f"mode:{op['symbol']}={op['mode']}")
        elif op["kind"] == "set_throttle":
            spec.append(f"throttle:{op['symbol']}={op['orders_per_s']}/{op['burst']}")
        elif op["kind"] == "clear_throttle":
            spec.append(f"throttle-clear:{op['symbol']}")
        else:
            spec.append(f"withdrawals-halt:{'on' if op['on'] else 'off'}")
    detail: dict[str, Any] = {"ops": rev}
    rc, p, err = await _run(d, "change_proposal.sh", *[a for s in spec for a in ("--op", s)], "--actor", PROPOSER,
                            "--reason", f"change-workflow drill: revert {ids['change']}", "--ticket", ticket)
    ok = rc == 0 and isinstance(p, dict)
    detail.update(propose_rc=rc, propose_stderr=err)
    if ok:
        ids["revert"] = p["id"]
        ok = await _approve_by_both(d, p["id"], detail)
        rc, done, err = await _run(d, "apply_change.sh", p["id"], "--actor", APPLIER, *skip_flag)
        after = await changes.read_state(ex, applied["ops"])
        ok = ok and rc == 0 and isinstance(done, dict) and done.get("state") == "verified" and after == before
        detail.update(rc=rc, stderr=err, state_after=after, state_before=before)
    steps["reverted"] = {"ok": ok, **detail}
    d.emit("change_step_reverted_ok", ok)


async def _verify_chain(d: Drill, pool: Any, steps: dict[str, dict[str, Any]], ids: dict[str, str]) -> None:
    from ledger import audit

    rc, res, err = await _run(d, "verify_change_audit_chain.sh", "--require-events")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"verify-change-audit-chain-{stamp}.json"
    d.write(name, {"rc": rc, "result": res, "stderr": err, "chain": "change"})
    d.emit("change_verify_evidence", name)
    entries = await audit.load_entries(pool, "change")
    by_change: dict[str, list[str]] = {}
    for e in entries:
        p = e.get("params") or {}
        cid = p.get("change_id") or p.get("id")
        if cid in ids.values():
            by_change.setdefault(str(cid), []).append(e["action"] + (f":{p['code']}" if "code" in p else ""))
    want = {"ChangeProposed", "ChangeApproved", "ChangeApplied", "ChangeVerified", "ChangeRefused:CHANGE_NOT_APPROVED",
            "ChangeRefused:CHANGE_SELF_APPROVAL", "ChangeRefused:CHANGE_DUPLICATE_APPROVAL",
            "ChangeRefused:CHANGE_ALREADY_APPLIED"}
    have = set(by_change.get(ids.get("change", ""), []))
    tampered = set(by_change.get(ids.get("tampered", ""), []))
    ok = (rc == 0 and isinstance(res, dict) and bool(res.get("ok")) and want <= have
          and "ChangeRefused:CHANGE_TAMPERED" in tampered)
    steps["change_chain_verified"] = {"ok": ok, "rc": rc, "result": res, "stderr": err, "evidence": name,
                                      "missing_steps": sorted(want - have), "entries_by_change": by_change}
    d.emit("change_step_change_chain_verified_ok", ok)


def _finish(d: Drill, steps: dict[str, dict[str, Any]], ids: dict[str, str], skip_verification: bool) -> bool:
    failed = [s for s in (*STEPS, "error") if s in steps and not steps[s]["ok"]]
    failed += [s for s in STEPS if s not in steps and s not in failed]
    ok = not failed
    action = "NONE" if ok else ACTIONS.get(failed[0], "INVESTIGATE: see the failed step's detail")
    d.write("change-workflow-summary.json", {
        "change_workflow_ok": ok, "steps": steps, "failed_steps": failed, "recommended_action": action,
        "changes": ids, "skip_verification": skip_verification,
        "evidence": sorted(p.name for p in d.out_dir.glob("verify-change-audit-chain-*.json"))})
    d.status("after")
    d.emit("change_workflow_summary", str(d.out_dir / "change-workflow-summary.json"))
    d.emit("change_workflow_failed_steps", ",".join(failed) or "-")
    d.emit("change_workflow_recommended_action", action)
    d.emit("runbook_change_workflow_ok", ok)
    return ok
