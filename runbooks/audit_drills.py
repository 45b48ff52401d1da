"""Audit-chain tamper drill (seed §4.6): tampering injected into a COPY of the break-glass audit
log must be caught by the hash-chain verifier — a changed entry, a missing entry and reordered
entries each — while the untouched copy verifies.

The drill performs a real break-glass enable/disable on the stack (so the chain has events to
verify; each is audited with actor "drill" and ticket DRILL-AUDIT-TAMPER), exports the chain to
JSONL, and only ever edits the exported copies."""

from __future__ import annotations

import json
from typing import Any

from runbooks.common import Drill

__all__ = ["audit_chain_tamper"]


def _tamper(lines: list[str], how: str) -> list[str]:
    out = list(lines)
    if how == "changed":
        entry = json.loads(out[-1])
        entry["reason"] = entry.get("reason", "") + " (edited)"
        out[-1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    elif how == "missing":
        del out[len(out) // 2]
    elif how == "truncated":
        del out[-1]
    elif how == "reordered":
        out[-1], out[-2] = out[-2], out[-1]
    return out


async def audit_chain_tamper(d: Drill) -> bool:
    import asyncpg

    from ledger.audit import break_glass_disable, break_glass_enable, export_jsonl, verify_jsonl

    d.status("before")
    pool = await asyncpg.create_pool(d.endpoints.pg_dsn, min_size=1, max_size=2)
    try:
        for _ in range(2):
            await break_glass_enable(pool, "drill", 60, "audit tamper drill", "DRILL-AUDIT-TAMPER")
            await break_glass_disable(pool, "drill", "audit tamper drill done", "DRILL-AUDIT-TAMPER")
        base = d.out_dir / "audit-chain-copy.jsonl"
        count = await export_jsonl(pool, base, "admin")
    finally:
        await pool.close()
    baseline = verify_jsonl(base, require_events=True)
    lines = [ln for ln in base.read_text().splitlines() if ln.strip()]
    cases: dict[str, Any] = {}
    for how in ("changed", "missing", "reordered", "truncated"):
        copy = d.out_dir / f"audit-chain-tampered-{how}.jsonl"
        copy.write_text("\n".join(_tamper(lines, how)) + "\n")
        # A cut tail is only visible against the head anchored outside the chain.
        res = verify_jsonl(copy, require_events=True, expected_head=(baseline.count, baseline.head_hash))
        cases[how] = {"detected": not res.ok, "first_bad_seq": res.first_bad_seq, "why": res.why,
                      "kind": res.kind}
    detected = all(c["detected"] for c in cases.values())
    ok = baseline.ok and count >= 2 and detected
    d.write("audit-chain-tamper-summary.json", {
        "baseline_ok": baseline.ok, "baseline_head_hash": baseline.head_hash, "entries": count,
        "tamper_detected": detected, "cases": cases, "runbook_audit_tamper_ok": ok,
    })
    d.status("after")
    d.emit("baseline_ok", baseline.ok)
    d.emit("audit_entries", count)
    for how, c in cases.items():
        d.emit(f"tamper_{how}_detected", c["detected"])
    d.emit("tamper_detected", detected)
    d.emit("runbook_audit_tamper_ok", ok)
    return ok

