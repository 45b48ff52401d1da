"""Corrections: the only way to change the book besides settlement, and never by editing it.

A correction is requested with balanced postings (per asset they sum to zero), a reason and a
ticket; it needs two approvals by two distinct operators, neither of them the requester; on the
second approval it is applied as a new journal transaction (stream ``~correction``, seq = the
request id, so it can be applied only once) with its postings, in the same transaction as the
materialized balances. A correction may not leave a non-custody balance negative. Every step is
appended to the audit chain in the same database transaction as its effect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from core.wire import MAX_AMOUNT, Bucket, Move
from ledger import audit
from ledger.postings import CORRECTION_STREAM, validate_moves

__all__ = [
    "APPROVALS_REQUIRED",
    "CorrectionError",
    "CorrectionStatus",
    "approve_correction",
    "get_correction",
    "list_corrections",
    "parse_postings",
    "reject_correction",
    "request_correction",
]

APPROVALS_REQUIRED = 2


class CorrectionError(Exception):
    """A refused correction step; ``code`` is stable (VALIDATION, UNBALANCED, NOT_FOUND, NOT_PENDING,
    SELF_APPROVAL, DUPLICATE_APPROVAL, NEGATIVE_BALANCE, AUDIT_*)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class CorrectionStatus:
    id: int
    status: str
    requested_by: str
    approvers: list[str]
    postings: list[dict[str, Any]]
    tx_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "requested_by": self.requested_by, "approvers": self.approvers,
                "postings": self.postings, "tx_id": self.tx_id}


def parse_postings(items: list[dict[str, Any]] | list[Move]) -> list[Move]:
    """Postings as dicts ({account_id, asset, bucket, delta}) or Moves -> validated balanced Moves."""
    moves: list[Move] = []
    it: Any
    for i, it in enumerate(items):
        if isinstance(it, Move):
            moves.append(it)
            continue
        try:
            moves.append(Move(int(it["account_id"]), str(it["asset"]), Bucket(str(it.get("bucket", "available"))),
                              int(it["delta"])))
        except (KeyError, ValueError, TypeError) as exc:
            raise CorrectionError("VALIDATION", f"posting {i}: {exc}") from None
    if any(m.delta == 0 for m in moves):
        raise CorrectionError("VALIDATION", "a posting with delta 0 changes nothing")
    if any(abs(m.delta) > MAX_AMOUNT for m in moves):
        raise CorrectionError("VALIDATION", f"a posting's delta must be within +-{MAX_AMOUNT}")
    problems = validate_moves(moves)
    if problems:
        code = "UNBALANCED" if any("sum to" in p for p in problems) else "VALIDATION"
        raise CorrectionError(code, "; ".join(problems))
    return moves


def _as_json(moves: list[Move]) -> str:
    return msgspec.json.encode([{"account_id": m.account_id, "asset": m.asset, "bucket": str(m.bucket),
                                 "delta": m.delta} for m in moves]).decode()


def _json(v: Any) -> Any:
    return msgspec.json.decode(v.encode() if isinstance(v, str) else v)


def _name(who: str) -> str:
    w = (who or "").strip()
    if not w:
        raise CorrectionError("VALIDATION", "operator name is required")
    return w


async def request_correction(pool: Any, requested_by: str, postings: list[dict[str, Any]] | list[Move], reason: str,
                             ticket: str) -> CorrectionStatus:
    who = _name(requested_by)
    moves = parse_postings(postings)
    async with pool.acquire() as conn, conn.transaction():
        rid = await conn.fetchval(
            "INSERT INTO ledger_correction_requests (requested_by, reason, ticket, postings) "
            "VALUES ($1, $2, $3, $4::jsonb) RETURNING id", who, reason, ticket, _as_json(moves))
        try:
            entry = await audit.append(conn, who, "CorrectionRequest",
                                       {"request_id": rid, "postings": msgspec.json.decode(_as_json(moves))},
                                       reason, ticket)
        except audit.AuditError as exc:
            raise CorrectionError(exc.code, exc.detail) from None
        await conn.execute("UPDATE ledger_correction_requests SET audit_seq = $2 WHERE id = $1", rid, entry.seq)
    return CorrectionStatus(rid, "pending", who, [], msgspec.json.decode(_as_json(moves)))


async def approve_correction(pool: Any, request_id: int, approver: str, *, reason: str | None = None,
                             ticket: str | None = None) -> CorrectionStatus:
    """Record an approval; the second distinct approval applies the correction (same transaction)."""
    who = _name(approver)
    async with pool.acquire() as conn, conn.transaction():
        req = await conn.fetchrow("SELECT * FROM ledger_correction_requests WHERE id = $1 FOR UPDATE", request_id)
        if req is None:
            raise CorrectionError("NOT_FOUND", f"no correction request {request_id}")
        if req["status"] != "pending":
            raise CorrectionError("NOT_PENDING", f"correction {request_id} is {req['status']}")
        if who == req["requested_by"]:
            raise CorrectionError("SELF_APPROVAL", "the requester cannot approve their own correction")
        have = [r["approver"] for r in await conn.fetch(
            "SELECT approver FROM ledger_correction_approvals WHERE request_id = $1 ORDER BY approved_at", request_id)]
        if who in have:
            raise CorrectionError("DUPLICATE_APPROVAL", f"{who} already approved correction {request_id}")
        r = reason or f"approve correction {request_id}: {req['reason']}"
        t = ticket or req["ticket"]
        try:
            entry = await audit.append(conn, who, "CorrectionApprove", {"request_id": request_id}, r, t,
                                       roles=["approver"])
        except audit.AuditError as exc:
            raise CorrectionError(exc.code, exc.detail) from None
        await conn.execute(
            "INSERT INTO ledger_correction_approvals (request_id, approver, audit_seq) VALUES ($1, $2, $3)",
            request_id, who, entry.seq)
        approvers = [*have, who]
        postings = _json(req["postings"])
        if len(approvers) < APPROVALS_REQUIRED:
            return CorrectionStatus(request_id, "pending", req["requested_by"], approvers, postings)
        tx_id = await _apply(conn, request_id, parse_postings(postings), approvers, req["reason"], req["ticket"])
        return CorrectionStatus(request_id, "applied", req["requested_by"], approvers, postings, tx_id)


async def _apply(conn: Any, request_id: int, moves: list[Move], approvers: list[str], reason: str,
                 ticket: str) -> int:
    tx_id = await conn.fetchval("SELECT next_tx_id FROM ledger_writer WHERE id = 1 FOR UPDATE")
    await audit.append(conn, approvers[-1], "CorrectionApply",
                       {"request_id": request_id, "tx_id": tx_id, "approvers": approvers}, reason, ticket)
    try:
        await conn.execute(
            "INSERT INTO ledger_journal (tx_id, stream, seq, kind, reference_type, reference_id, occurred_at_ms, "
            "fencing_token, correlation_id, legs) VALUES ($1, $2, $3, 'Correction', 'correction', $4, $5, 0, $6, $7)",
            tx_id, CORRECTION_STREAM, request_id, str(request_id), time.time_ns() // 1_000_000, ticket, len(moves))
    except asyncpg.UniqueViolationError:
        raise CorrectionError("NOT_PENDING", f"correction {request_id} is already in the journal") from None
    # One statement for all legs: the database's balance trigger sees the whole transaction.
    await conn.execute(
        "INSERT INTO ledger_postings (tx_id, leg, account_id, asset, bucket, delta) "
        "SELECT $1, (o - 1)::smallint, a, s, b, d FROM unnest($2::bigint[], $3::text[], $4::text[], $5::bigint[]) "
        "WITH ORDINALITY AS x(a, s, b, d, o)",
        tx_id, [m.account_id for m in moves], [m.asset for m in moves], [str(m.bucket) for m in moves],
        [m.delta for m in moves])
    nets: dict[tuple[int, str, str], int] = {}
    for m in moves:
        k = (m.account_id, m.asset, str(m.bucket))
        nets[k] = nets.get(k, 0) + m.delta
    keys = [k for k, v in nets.items() if v]
    negative = await conn.fetch(
        """WITH u AS (
               INSERT INTO ledger_accounts AS a (account_id, asset, bucket, balance, last_tx_id)
               SELECT x.a, x.s, x.b, x.d, $5 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::numeric[])
                   AS x(a, s, b, d)
               ON CONFLICT (account_id, asset, bucket) DO UPDATE
                   SET balance = a.balance + EXCLUDED.balance, last_tx_id = EXCLUDED.last_tx_id, updated_at = now()
               RETURNING a.account_id, a.asset, a.bucket, a.balance)
           SELECT * FROM u WHERE balance < 0 AND account_id <> 0""",
        [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], [nets[k] for k in keys], tx_id)
    if negative:
        r = negative[0]
        raise CorrectionError("NEGATIVE_BALANCE", f"would leave {r['account_id']}/{r['asset']}/{r['bucket']} at "
                                                  f"{r['balance']}")
    await conn.execute("UPDATE ledger_writer SET next_tx_id = $1 WHERE id = 1", tx_id + 1)
    await conn.execute(
        "UPDATE ledger_correction_requests SET status = 'applied', applied_at = now(), tx_id = $2 WHERE id = $1",
        request_id, tx_id)
    return int(tx_id)


async def reject_correction(pool: Any, request_id: int, actor: str, reason: str, ticket: str) -> CorrectionStatus:
    who = _name(actor)
    async with pool.acquire() as conn, conn.transaction():
        req = await conn.fetchrow("SELECT * FROM ledger_correction_requests WHERE id = $1 FOR UPDATE", request_id)
        if req is None:
            raise CorrectionError("NOT_FOUND", f"no correction request {request_id}")
        if req["status"] != "pending":
            raise CorrectionError("NOT_PENDING", f"correction {request_id} is {req['status']}")
        try:
            await audit.append(conn, who, "CorrectionReject", {"request_id": request_id}, reason, ticket)
        except audit.AuditError as exc:
            raise CorrectionError(exc.code, exc.detail) from None
        await conn.execute(
            "UPDATE ledger_correction_requests SET status = 'rejected', rejected_by = $2, reject_reason = $3 "
            "WHERE id = $1", request_id, who, reason)
    return await get_correction(pool, request_id)


async def get_correction(pool: Any, request_id: int) -> CorrectionStatus:
    async with pool.acquire() as conn:
        req = await conn.fetchrow("SELECT * FROM ledger_correction_requests WHERE id = $1", request_id)
        if req is None:
            raise CorrectionError("NOT_FOUND", f"no correction request {request_id}")
        approvers = [r["approver"] for r in await conn.fetch(
            "SELECT approver FROM ledger_correction_approvals WHERE request_id = $1 ORDER BY approved_at", request_id)]
    postings = _json(req["postings"])
    return CorrectionStatus(req["id"], req["status"], req["requested_by"], approvers, postings, req["tx_id"])


async def list_corrections(pool: Any, status: str | None = None) -> list[CorrectionStatus]:
    async with pool.acquire() as conn:
        ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM ledger_correction_requests WHERE $1::text IS NULL OR status = $1 ORDER BY id", status)]
    return [await get_correction(pool, i) for i in ids]
