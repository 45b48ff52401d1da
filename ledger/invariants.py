"""Ledger invariants, and the comparison with the core at each EngineCheckpoint.

Checks (each returns the violating keys; a violation opens an alert, counts in
``invariant_violation_total`` and triggers the seed §3.1 response, see ``ledger.reconcile``):

- ``transaction_balanced``: every journal transaction has exactly its ``legs`` postings and they
  sum to zero per asset; no posting without a transaction. Incremental (transactions after the last
  run) on the hot schedule, everything with ``full``.
- ``non_negative``: no available or hold balance below zero, except custody (account 0).
- ``custody_total``: per asset, the sum over every account but custody equals minus custody
  (i.e. all balances of an asset sum to zero).
- ``materialized_balances`` (``full`` only): each materialized balance equals the sum of its postings.
- ``engine_checkpoint``: the latest evaluated EngineCheckpoint matched (ledger totals at the
  checkpoint's watermark equal the core's totals).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import Counter, Gauge

__all__ = [
    "CHECKS",
    "M_VIOLATIONS",
    "InvariantReport",
    "evaluate_checkpoints",
    "ledger_totals_at",
    "rebuild_balances",
    "run_invariants",
]

CHECKS = ("transaction_balanced", "non_negative", "custody_total", "materialized_balances", "engine_checkpoint")

M_VIOLATIONS = Counter("invariant_violation", "Ledger invariant violations detected (seed §3.1 signal)", ["check"])
M_CHECKS = Counter("ledger_invariant_checks_total", "Invariant checks run", ["check", "result"])
M_OK = Gauge("ledger_invariants_ok", "1 when the last invariant run passed every check")
M_CHECK_OK = Gauge("ledger_invariant_check_ok", "1 when the check passed in the last run", ["check"])
M_CKPT = Counter("ledger_engine_checkpoints_total", "EngineCheckpoints evaluated", ["result"])

_SAMPLE = 20


@dataclass
class InvariantReport:
    ok: bool
    scope: str
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    checked_through_tx: int = 0
    seconds: float = 0.0
    run_id: int | None = None

    def violations(self) -> list[tuple[str, str, dict[str, Any]]]:
        out = []
        for name, c in self.checks.items():
            for s in c.get("samples", []):
                out.append((name, str(s["key"]), s))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "scope": self.scope, "checks": self.checks,
                "checked_through_tx": self.checked_through_tx, "seconds": round(self.seconds, 3),
                "run_id": self.run_id}


# --------------------------------------------------------------------------------------------------
# EngineCheckpoint comparison

# One index range scan per stream: a plain join let the planner hash the whole journal, and
# OFFSET 0 keeps it from flattening the LATERAL subquery back into that join.
_TXS_AFTER = """
SELECT x.tx_id FROM unnest($1::text[], $2::bigint[]) AS w(stream, seq)
CROSS JOIN LATERAL (SELECT j.tx_id FROM ledger_journal j WHERE j.stream = w.stream AND j.seq > w.seq OFFSET 0) x"""

# Postings are in tx_id order (BRIN): the range bounds let the scan read only the tail that holds
# the transactions after the watermark.
_POSTINGS_OF = """
SELECT asset, bucket, account_id = 0 AS custody, sum(delta) AS d FROM ledger_postings
WHERE tx_id BETWEEN $1 AND $2 AND tx_id = ANY($3::bigint[]) GROUP BY 1, 2, 3"""

_CURRENT = """
SELECT asset, bucket, account_id = 0 AS custody, sum(balance) AS b FROM ledger_accounts GROUP BY 1, 2, 3"""


Recent = dict[int, list[tuple[Any, ...]]]  # tx_id -> its postings (tx, leg, account, asset, bucket, delta)


async def ledger_totals_at(conn: Any, watermark: dict[str, int], recent: Recent | None = None
                           ) -> dict[str, dict[str, int]]:
    """Per asset {available, hold, custody} as the book stood when every stream was at ``watermark``
    (streams the watermark does not name count from 0). Corrections always count. ``recent`` are
    postings the caller has in hand (the batch being committed): they are not read back."""
    streams = [r["stream"] for r in await conn.fetch("SELECT stream FROM ledger_consumer_checkpoint")]
    allw = {s: 0 for s in streams}
    allw.update({s: int(v) for s, v in watermark.items()})
    # A generic plan would not know how narrow the range is; plan these with the real values.
    await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
    txs = [r["tx_id"] for r in await conn.fetch(_TXS_AFTER, list(allw), list(allw.values()))]
    out: dict[str, dict[str, int]] = {}

    def add(asset: str, bucket: str, custody: bool, v: int) -> None:
        t = out.setdefault(asset, {"available": 0, "hold": 0, "custody": 0})
        t["custody" if custody else bucket] += v

    for r in await conn.fetch(_CURRENT):
        add(r["asset"], r["bucket"], r["custody"], int(r["b"]))
    rest = []
    for tx in txs:
        legs = recent.get(tx) if recent is not None else None
        if legs is None:
            rest.append(tx)
            continue
        for _tx, _leg, acct, asset, bucket, delta in legs:
            add(asset, str(bucket), acct == 0, -int(delta))
    if rest:
        for r in await conn.fetch(_POSTINGS_OF, min(rest), max(rest), rest):
            add(r["asset"], r["bucket"], r["custody"], -int(r["d"]))
    return out


async def evaluate_checkpoints(conn: Any, recent: Recent | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Evaluate the pending EngineCheckpoints whose watermark the book has reached on every stream
    (call inside the settlement transaction, under the writer lock). Returns the results and
    whether any checkpoint is still pending."""
    pending = await conn.fetch(
        "SELECT sys_seq, last_seq, stream_seqs, totals FROM ledger_engine_checkpoints WHERE status = 'pending' "
        "ORDER BY sys_seq")
    if not pending:
        return [], False
    applied = {r["stream"]: (r["last_seq"], r["state"]) for r in
               await conn.fetch("SELECT stream, last_seq, state FROM ledger_consumer_checkpoint")}
    results: list[dict[str, Any]] = []
    left = False
    for p in pending:
        wm: dict[str, int] = msgspec.json.decode(p["stream_seqs"].encode() if isinstance(p["stream_seqs"], str)
                                                 else p["stream_seqs"])
        if any(applied.get(s, (0, "running"))[0] < int(v) for s, v in wm.items()):
            left = True
            break  # later checkpoints have later watermarks
        core = msgspec.json.decode(p["totals"].encode() if isinstance(p["totals"], str) else p["totals"])
        ours = await ledger_totals_at(conn, wm, recent)
        diffs = []
        assets = sorted({t["asset"] for t in core} | set(ours))
        core_by = {t["asset"]: t for t in core}
        for a in assets:
            c = core_by.get(a, {"available": 0, "hold": 0, "custody": 0})
            o = ours.get(a, {"available": 0, "hold": 0, "custody": 0})
            for k in ("available", "hold", "custody"):
                if int(c.get(k, 0)) != int(o.get(k, 0)):
                    diffs.append({"asset": a, "field": k, "core": str(c.get(k, 0)), "ledger": str(o.get(k, 0))})
        status = "match" if not diffs else "mismatch"
        detail = {"sys_seq": p["sys_seq"], "last_seq": p["last_seq"], "status": status, "watermark": wm,
                  "diffs": diffs, "assets": sorted({d["asset"] for d in diffs})}
        await conn.execute(
            "UPDATE ledger_engine_checkpoints SET status = $2, detail = $3::jsonb, evaluated_at = now() "
            "WHERE sys_seq = $1", p["sys_seq"], status, msgspec.json.encode(detail).decode())
        M_CKPT.labels(status).inc()
        results.append(detail)
    return results, left


# --------------------------------------------------------------------------------------------------
# The checks


async def _check_balanced(conn: Any, after_tx: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    rows = await conn.fetch(
        """SELECT tx_id, asset, sum(delta) AS total FROM ledger_postings WHERE tx_id > $1
           GROUP BY tx_id, asset HAVING sum(delta) <> 0 ORDER BY tx_id LIMIT $2""", after_tx, _SAMPLE)
    out += [{"key": f"tx:{r['tx_id']}:{r['asset']}", "tx_id": r["tx_id"], "asset": r["asset"],
             "problem": f"postings sum to {r['total']}"} for r in rows]
    rows = await conn.fetch(
        """SELECT j.tx_id, j.legs, coalesce(p.n, 0) AS n FROM ledger_journal j
           LEFT JOIN (SELECT tx_id, count(*) AS n FROM ledger_postings WHERE tx_id > $1 GROUP BY tx_id) p USING (tx_id)
           WHERE j.tx_id > $1 AND coalesce(p.n, 0) <> j.legs ORDER BY j.tx_id LIMIT $2""", after_tx, _SAMPLE)
    out += [{"key": f"tx:{r['tx_id']}:legs", "tx_id": r["tx_id"],
             "problem": f"{r['n']} postings, journal says {r['legs']}"} for r in rows]
    rows = await conn.fetch(
        """SELECT DISTINCT p.tx_id FROM ledger_postings p LEFT JOIN ledger_journal j USING (tx_id)
           WHERE p.tx_id > $1 AND j.tx_id IS NULL ORDER BY p.tx_id LIMIT $2""", after_tx, _SAMPLE)
    out += [{"key": f"tx:{r['tx_id']}:orphan", "tx_id": r["tx_id"], "problem": "postings without a journal transaction"}
            for r in rows]
    rows = await conn.fetch(
        """SELECT tx_id, count(*) AS n FROM ledger_journal WHERE tx_id > $1 GROUP BY tx_id HAVING count(*) > 1
           ORDER BY tx_id LIMIT $2""", after_tx, _SAMPLE)
    out += [{"key": f"tx:{r['tx_id']}:reused", "tx_id": r["tx_id"], "problem": f"{r['n']} journal transactions "
             "share this tx_id"} for r in rows]
    return out


async def _check_non_negative(conn: Any) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT account_id, asset, bucket, balance FROM ledger_accounts WHERE account_id <> 0 AND balance < 0
           ORDER BY account_id, asset, bucket LIMIT $1""", _SAMPLE)
    return [{"key": f"{r['account_id']}:{r['asset']}:{r['bucket']}", "account_id": r["account_id"],
             "asset": r["asset"], "bucket": r["bucket"], "balance": str(r["balance"])} for r in rows]


async def _check_custody(conn: Any) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT asset, coalesce(sum(balance) FILTER (WHERE account_id <> 0), 0) AS held,
                  coalesce(sum(balance) FILTER (WHERE account_id = 0), 0) AS custody
           FROM ledger_accounts GROUP BY asset HAVING sum(balance) <> 0 ORDER BY asset LIMIT $1""", _SAMPLE)
    return [{"key": r["asset"], "asset": r["asset"], "held": str(r["held"]), "custody": str(r["custody"]),
             "problem": "sum over accounts != -custody"} for r in rows]


async def _check_materialized(conn: Any) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT coalesce(p.account_id, a.account_id) AS account_id, coalesce(p.asset, a.asset) AS asset,
                  coalesce(p.bucket, a.bucket) AS bucket, coalesce(p.s, 0) AS postings, coalesce(a.balance, 0) AS bal
           FROM (SELECT account_id, asset, bucket, sum(delta) AS s FROM ledger_postings GROUP BY 1, 2, 3) p
           FULL JOIN ledger_accounts a ON a.account_id = p.account_id AND a.asset = p.asset AND a.bucket = p.bucket
           WHERE coalesce(p.s, 0) <> coalesce(a.balance, 0) LIMIT $1""", _SAMPLE)
    return [{"key": f"{r['account_id']}:{r['asset']}:{r['bucket']}", "account_id": r["account_id"],
             "asset": r["asset"], "bucket": r["bucket"], "postings_sum": str(r["postings"]),
             "materialized": str(r["bal"])} for r in rows]


async def _check_checkpoint(conn: Any) -> list[dict[str, Any]]:
    r = await conn.fetchrow(
        "SELECT sys_seq, status, detail FROM ledger_engine_checkpoints WHERE status <> 'pending' "
        "ORDER BY sys_seq DESC LIMIT 1")
    if r is None or r["status"] == "match":
        return []
    detail = msgspec.json.decode(r["detail"].encode() if isinstance(r["detail"], str) else r["detail"]) \
        if r["detail"] else {}
    return [{"key": f"sys_seq:{r['sys_seq']}", "sys_seq": r["sys_seq"], "assets": detail.get("assets", []),
             "diffs": detail.get("diffs", [])[:_SAMPLE]}]


async def run_invariants(pool: Any, *, full: bool = False, record: bool = True) -> InvariantReport:
    """Run the checks; with ``record``, store the run, open alerts for violations (returned in
    ``report.checks[name]['new_alert_ids']``) and resolve alerts whose condition has cleared."""
    from ledger.settlement import Alert, record_alerts

    t0 = time.perf_counter()
    scope = "full" if full else "incremental"
    async with pool.acquire() as conn:
        last = await conn.fetchval(
            "SELECT checked_through_tx FROM ledger_invariant_runs WHERE scope = 'incremental' OR scope = 'full' "
            "ORDER BY id DESC LIMIT 1") or 0
        after = 0 if full else int(last)
        # One snapshot for every check (they must agree with each other), planned with the real
        # bounds (a generic plan would scan every posting for "tx_id > $1").
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            through = await conn.fetchval("SELECT next_tx_id - 1 FROM ledger_writer WHERE id = 1") or 0
            found: dict[str, list[dict[str, Any]]] = {
                "transaction_balanced": await _check_balanced(conn, after),
                "non_negative": await _check_non_negative(conn),
                "custody_total": await _check_custody(conn),
                "engine_checkpoint": await _check_checkpoint(conn),
            }
            if full:
                found["materialized_balances"] = await _check_materialized(conn)
        report = InvariantReport(ok=all(not v for v in found.values()), scope=scope, checked_through_tx=int(through))
        for name, samples in found.items():
            report.checks[name] = {"ok": not samples, "count": len(samples), "samples": samples}
            M_CHECKS.labels(name, "ok" if not samples else "violation").inc()
            M_CHECK_OK.labels(name).set(0 if samples else 1)
        M_OK.set(1 if report.ok else 0)
        report.seconds = time.perf_counter() - t0
        if record:
            async with conn.transaction():
                report.run_id = await conn.fetchval(
                    "INSERT INTO ledger_invariant_runs (scope, ok, results, checked_through_tx, seconds) "
                    "VALUES ($1, $2, $3::jsonb, $4, $5) RETURNING id", scope, report.ok,
                    msgspec.json.encode(report.checks).decode(), report.checked_through_tx, report.seconds)
                alerts = [Alert("invariant", name, str(s["key"]), None, s) for name, s_list in found.items()
                          for s in s_list]
                new_ids = await record_alerts(conn, alerts)
                for name in found:
                    report.checks[name]["new_alert_ids"] = []
                by_key = {(a.check_name, a.key) for a in alerts}
                if new_ids:
                    rows = await conn.fetch("SELECT id, check_name FROM ledger_alerts WHERE id = ANY($1::bigint[])",
                                            new_ids)
                    for r in rows:
                        report.checks[r["check_name"]]["new_alert_ids"].append(int(r["id"]))
                # Conditions that cleared close their alerts (so a recurrence alerts again). The
                # incremental balance check does not see old transactions, so only `full` closes those.
                closable = [n for n in found if n != "transaction_balanced" or full]
                open_rows = await conn.fetch(
                    "SELECT id, check_name, key FROM ledger_alerts WHERE category = 'invariant' "
                    "AND resolved_at IS NULL AND check_name = ANY($1::text[])", closable)
                cleared = [r["id"] for r in open_rows if (r["check_name"], r["key"]) not in by_key]
                if cleared:
                    await conn.execute(
                        "UPDATE ledger_alerts SET resolved_at = now(), resolved_by = 'ledger', "
                        "resolve_reason = 'check passes again' WHERE id = ANY($1::bigint[])", cleared)
    return report


async def rebuild_balances(pool: Any, *, write: bool, actor: str = "operator", reason: str | None = None,
                           ticket: str | None = None) -> dict[str, Any]:
    """Recompute every materialized balance from the postings and report the differences. With
    ``write`` (and differences found) the recomputed values replace the materialized ones, under the
    writer lock and audited in the same transaction (a reason and a ticket are required)."""
    from ledger import audit

    sums_sql = "SELECT account_id, asset, bucket, sum(delta) AS s FROM ledger_postings GROUP BY 1, 2, 3"
    async with pool.acquire() as conn, conn.transaction():
        if write:
            await conn.execute("SELECT 1 FROM ledger_writer WHERE id = 1 FOR UPDATE")
        rows = await conn.fetch(
            f"""SELECT coalesce(p.account_id, a.account_id) AS account_id, coalesce(p.asset, a.asset) AS asset,
                       coalesce(p.bucket, a.bucket) AS bucket, coalesce(p.s, 0) AS postings,
                       coalesce(a.balance, 0) AS materialized
                FROM ({sums_sql}) p FULL JOIN ledger_accounts a
                     ON a.account_id = p.account_id AND a.asset = p.asset AND a.bucket = p.bucket
                WHERE coalesce(p.s, 0) <> coalesce(a.balance, 0)
                ORDER BY 1, 2, 3""")
        accounts = await conn.fetchval("SELECT count(*) FROM ledger_accounts")
        diffs = [{"account_id": r["account_id"], "asset": r["asset"], "bucket": r["bucket"],
                  "postings_sum": str(r["postings"]), "materialized": str(r["materialized"]),
                  "difference": str(r["postings"] - r["materialized"])} for r in rows]
        written = False
        if write and diffs:
            await audit.append(conn, actor, "LedgerRebuildBalances",
                               {"differences": len(diffs), "first": diffs[:20]}, reason or "", ticket or "")
            await conn.execute(
                f"""INSERT INTO ledger_accounts AS a (account_id, asset, bucket, balance)
                    SELECT account_id, asset, bucket, s FROM ({sums_sql}) p
                    ON CONFLICT (account_id, asset, bucket) DO UPDATE SET balance = EXCLUDED.balance,
                        updated_at = now() WHERE a.balance <> EXCLUDED.balance""")
            await conn.execute(
                f"""UPDATE ledger_accounts a SET balance = 0, updated_at = now() WHERE balance <> 0 AND NOT EXISTS (
                        SELECT 1 FROM ({sums_sql}) p WHERE p.account_id = a.account_id AND p.asset = a.asset
                        AND p.bucket = a.bucket)""")
            written = True
    return {"accounts": int(accounts), "differences": diffs, "written": written}
