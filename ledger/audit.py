"""Tamper-evident audit chain for admin actions, and break-glass state.

Each entry is canonical JSON (sorted keys, no whitespace, UTF-8, no floats) of
``prev_hash, seq, ts_ms, actor, roles, action, params, reason, ticket`` plus
``hash = sha256(canonical entry without "hash")`` in lowercase hex. ``prev_hash`` of seq 1 is
:data:`GENESIS_HASH`. Changing, removing or reordering an entry breaks the chain;
:func:`verify_chain` says which and where.

:func:`append` runs BEFORE the action takes effect: pass the connection of the transaction that
applies a database action and both commit or neither does; for an action sent elsewhere (a command
to the core) append first, then act, so an action without its entry cannot exist (an entry whose
action then failed can, and says so in a follow-up entry). Appends are serialised per chain by
``SELECT ... FOR UPDATE`` on the chain's ``audit_head`` row, which also pins the last hash so a
truncated tail is detected by :func:`verify_db`.

What the chain cannot do alone: someone with write access to the database can rewrite it from
seq 1 with fresh hashes. Anchor the head outside it (``python -m ledger.audit head`` into the logs,
the JSONL export into the forensic bundle) and verify against that anchor.

Command line (for scripts/verify_audit_chain.sh and the tamper drill):
``python -m ledger.audit verify FILE.jsonl [--require-events]``,
``python -m ledger.audit verify-db --dsn DSN [--chain admin] [--require-events]``,
``python -m ledger.audit export --dsn DSN --out FILE.jsonl [--chain admin]``,
``python -m ledger.audit head --dsn DSN [--chain admin]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol, runtime_checkable

import asyncpg

__all__ = [
    "BREAK_GLASS_MAX_TTL_S",
    "GENESIS_HASH",
    "AuditEntry",
    "AuditError",
    "BreakGlassStatus",
    "VerifyResult",
    "append",
    "break_glass_disable",
    "break_glass_enable",
    "break_glass_status",
    "canonical_json",
    "entry_hash",
    "export_jsonl",
    "head",
    "load_entries",
    "main",
    "verify_chain",
    "verify_db",
    "verify_jsonl",
]

GENESIS_HASH = "0" * 64
BREAK_GLASS_MAX_TTL_S = 4 * 3600
BREAK_GLASS_NO_TICKET = "BREAK-GLASS-NO-TICKET"
_FIELDS = ("prev_hash", "seq", "ts_ms", "actor", "roles", "action", "params", "reason", "ticket")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_CHAIN_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_ACTION_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:/-]{0,63}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MAX_REASON = 2000
MAX_TICKET = 200

Conn = Any  # asyncpg.Connection or a pool's connection proxy
ConnOrPool = Any


class AuditError(Exception):
    """A refused audit append; nothing was written and the action must not proceed.

    ``code`` is one of the stable error codes the edge renders as problem+json
    (VALIDATION, AUDIT_REASON_REQUIRED, AUDIT_TICKET_REQUIRED, AUDIT_UNAVAILABLE, BREAK_GLASS_TTL)."""

    _STATUS = {"AUDIT_UNAVAILABLE": 503}

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        self.status = self._STATUS.get(code, 400)
        super().__init__(f"{code}: {detail}")


@runtime_checkable
class OperatorIdentity(Protocol):
    """Who acts: the edge's verified operator (edge.auth.OperatorIdentity) fits this."""

    @property
    def actor(self) -> str: ...

    @property
    def roles(self) -> frozenset[str]: ...


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_json(v: Any, path: str) -> None:
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return
    if isinstance(v, float):
        raise AuditError("VALIDATION", detail=f"audit params must not contain floats ({path}); use a decimal string")
    if isinstance(v, Mapping):
        for k, x in v.items():
            if not isinstance(k, str):
                raise AuditError("VALIDATION", detail=f"audit params keys must be strings ({path})")
            _check_json(x, f"{path}.{k}")
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_json(x, f"{path}[{i}]")
        return
    raise AuditError("VALIDATION", detail=f"audit params hold a {type(v).__name__} at {path}; use JSON types")


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (not \\u escapes), NaN refused."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def entry_hash(fields: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical entry without its ``hash``."""
    return hashlib.sha256(canonical_json({k: v for k, v in fields.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    ts_ms: int
    actor: str
    roles: tuple[str, ...]
    action: str
    params: dict[str, Any]
    reason: str
    ticket: str
    prev_hash: str
    hash: str

    def fields(self) -> dict[str, Any]:
        """The hashed fields (everything but ``hash``)."""
        return {"prev_hash": self.prev_hash, "seq": self.seq, "ts_ms": self.ts_ms, "actor": self.actor,
                "roles": list(self.roles), "action": self.action, "params": self.params, "reason": self.reason,
                "ticket": self.ticket}

    def to_dict(self) -> dict[str, Any]:
        return {**self.fields(), "hash": self.hash}

    def to_json(self) -> str:
        """The canonical line stored in the database and written to JSONL."""
        return canonical_json(self.to_dict()).decode()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditEntry:
        return cls(seq=d["seq"], ts_ms=d["ts_ms"], actor=d["actor"], roles=tuple(d["roles"]), action=d["action"],
                   params=dict(d["params"]), reason=d["reason"], ticket=d["ticket"], prev_hash=d["prev_hash"],
                   hash=d["hash"])


def _check_text(value: str | None, code: str, what: str, limit: int) -> str:
    v = (value or "").strip()
    if not v:
        raise AuditError(code, detail=f"an admin action needs a non-empty {what}")
    if len(v) > limit:
        raise AuditError("VALIDATION", detail=f"{what} is longer than {limit} characters")
    if what == "ticket" and _CONTROL_RE.search(v):
        raise AuditError("VALIDATION", detail="ticket must not contain control characters")
    return v


def _check_chain(chain: str) -> str:
    if not _CHAIN_RE.fullmatch(chain):
        raise ValueError(f"invalid audit chain name {chain!r}")
    return chain


@contextlib.asynccontextmanager
async def _tx(conn_or_pool: ConnOrPool) -> AsyncIterator[Conn]:
    """A transaction on the given connection (a savepoint if one is open) or on a pooled one."""
    if isinstance(conn_or_pool, asyncpg.Pool):
        async with conn_or_pool.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with conn_or_pool.transaction():
            yield conn_or_pool


def _actor_roles(actor: str | OperatorIdentity, roles: Iterable[str] | None) -> tuple[str, tuple[str, ...]]:
    if isinstance(actor, OperatorIdentity):
        name = actor.actor
        rs = actor.roles if roles is None else roles
    else:
        name = actor.strip()
        rs = roles or ()
    if not name:
        raise AuditError("VALIDATION", detail="audit actor must not be empty")
    return name, tuple(sorted(set(rs)))


async def _append_locked(conn: Conn, chain: str, actor: str, roles: tuple[str, ...], action: str,
                         params: Mapping[str, Any], reason: str, ticket: str, now_ms: int) -> AuditEntry:
    await conn.execute("INSERT INTO audit_head (chain, seq, hash) VALUES ($1, 0, $2) ON CONFLICT (chain) DO NOTHING",
                       chain, GENESIS_HASH)
    h = await conn.fetchrow("SELECT seq, hash FROM audit_head WHERE chain = $1 FOR UPDATE", chain)
    fields = {"prev_hash": h["hash"], "seq": h["seq"] + 1, "ts_ms": now_ms, "actor": actor, "roles": list(roles),
              "action": action, "params": dict(params), "reason": reason, "ticket": ticket}
    entry = AuditEntry.from_dict({**fields, "hash": entry_hash(fields)})
    await conn.execute(
        """INSERT INTO audit_chain (chain, seq, ts_ms, actor, action, prev_hash, hash, body)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        chain, entry.seq, entry.ts_ms, actor, action, entry.prev_hash, entry.hash, entry.to_json())
    await conn.execute("UPDATE audit_head SET seq = $2, hash = $3 WHERE chain = $1", chain, entry.seq, entry.hash)
    return entry


async def append(conn_or_pool: ConnOrPool, actor: str | OperatorIdentity, action: str, params: Mapping[str, Any],
                 reason: str, ticket: str, *, roles: Iterable[str] | None = None, chain: str = "admin",
                 now_ms: int | None = None) -> AuditEntry:
    """Append one entry; call it before the action takes effect (see the module docstring).

    Refuses (AuditError, nothing written) an empty reason (AUDIT_REASON_REQUIRED) or ticket
    (AUDIT_TICKET_REQUIRED), and params that are not plain JSON without floats (VALIDATION). A
    database failure raises AUDIT_UNAVAILABLE: the action must then not be taken.
    """
    _check_chain(chain)
    name, rs = _actor_roles(actor, roles)
    if not _ACTION_RE.fullmatch(action or ""):
        raise AuditError("VALIDATION", detail=f"invalid audit action name {action!r}")
    reason = _check_text(reason, "AUDIT_REASON_REQUIRED", "reason", MAX_REASON)
    ticket = _check_text(ticket, "AUDIT_TICKET_REQUIRED", "ticket", MAX_TICKET)
    if not isinstance(params, Mapping):
        raise AuditError("VALIDATION", detail="audit params must be a JSON object")
    _check_json(params, "params")
    now = _now_ms() if now_ms is None else now_ms
    try:
        async with _tx(conn_or_pool) as conn:
            return await _append_locked(conn, chain, name, rs, action, params, reason, ticket, now)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise AuditError("AUDIT_UNAVAILABLE", detail=f"audit append failed ({type(exc).__name__}); "
                         "the action was not taken") from exc


async def head(conn_or_pool: ConnOrPool, chain: str = "admin") -> tuple[int, str]:
    """(seq, hash) of the chain's last entry; (0, GENESIS_HASH) when empty. Anchor it elsewhere."""
    row = await conn_or_pool.fetchrow("SELECT seq, hash FROM audit_head WHERE chain = $1", _check_chain(chain))
    return (0, GENESIS_HASH) if row is None else (int(row["seq"]), str(row["hash"]))


async def load_entries(conn_or_pool: ConnOrPool, chain: str = "admin", *, after_seq: int = 0,
                       limit: int | None = None) -> list[dict[str, Any]]:
    """Entries as stored (parsed from the authoritative ``body``), by seq."""
    rows = await conn_or_pool.fetch(
        "SELECT body FROM audit_chain WHERE chain = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        _check_chain(chain), after_seq, limit)
    return [json.loads(r["body"]) for r in rows]


async def export_jsonl(conn_or_pool: ConnOrPool, out: str | os.PathLike[str] | IO[str], chain: str = "admin") -> int:
    """Write the chain as JSONL (one canonical entry per line, by seq); returns the number of entries."""
    rows = await conn_or_pool.fetch("SELECT body FROM audit_chain WHERE chain = $1 ORDER BY seq", _check_chain(chain))
    if isinstance(out, (str, os.PathLike)):
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(r["body"] + "\n" for r in rows)
    else:
        out.writelines(r["body"] + "\n" for r in rows)
    return len(rows)


# --- verification --------------------------------------------------------------------------------

FailKind = Literal["changed", "missing", "reordered", "malformed", "empty"]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """``count`` entries verified (before the first failure); ``head_hash`` is the hash of the last
    good one; ``first_bad_seq`` the seq at which verification first fails."""

    ok: bool
    head_hash: str
    count: int
    first_bad_seq: int | None = None
    why: str | None = None
    kind: FailKind | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "head_hash": self.head_hash, "count": self.count, "first_bad_seq": self.first_bad_seq,
                "why": self.why, "kind": self.kind}


def _shape_error(d: Any) -> str | None:
    if not isinstance(d, Mapping):
        return "entry is not a JSON object"
    missing = [k for k in (*_FIELDS, "hash") if k not in d]
    if missing:
        return f"entry lacks {', '.join(missing)}"
    extra = sorted(set(d) - {*_FIELDS, "hash"})
    if extra:
        return f"entry has unknown fields {', '.join(extra)}"
    if not (isinstance(d["seq"], int) and not isinstance(d["seq"], bool) and d["seq"] > 0):
        return "seq must be a positive integer"
    if not (isinstance(d["ts_ms"], int) and not isinstance(d["ts_ms"], bool)):
        return "ts_ms must be an integer"
    for k in ("actor", "action", "reason", "ticket"):
        if not isinstance(d[k], str):
            return f"{k} must be a string"
    if not (isinstance(d["roles"], list) and all(isinstance(r, str) for r in d["roles"])):
        return "roles must be a list of strings"
    if not isinstance(d["params"], Mapping):
        return "params must be an object"
    for k in ("prev_hash", "hash"):
        if not (isinstance(d[k], str) and _HASH_RE.fullmatch(d[k])):
            return f"{k} must be 64 lowercase hex characters"
    return None


def verify_chain(entries: Iterable[AuditEntry | Mapping[str, Any]], *, require_events: bool = False,
                 start: tuple[int, str] | None = None, expected_head: tuple[int, str] | None = None) -> VerifyResult:
    """Verify entries in the order given.

    - changed: an entry's content does not match its hash, or its prev_hash is not the hash of the
      entry before it (an earlier entry was rewritten and re-hashed);
    - missing: a seq gap, a chain not starting at seq 1 (or ``start``), or a chain ending before
      ``expected_head`` (the tail was cut);
    - reordered: a seq appears before a smaller one or twice;
    - malformed: not an audit entry at all; empty: no entries but ``require_events``.

    ``start`` = (seq, hash) of the entry just before the first given (to verify a suffix).
    """
    items: list[Any] = [e.to_dict() if isinstance(e, AuditEntry) else e for e in entries]
    prev_seq, prev_hash = start if start is not None else (0, GENESIS_HASH)
    seqs = [d.get("seq") if isinstance(d, Mapping) else None for d in items]
    count = 0

    def fail(kind: FailKind, seq: int | None, why: str) -> VerifyResult:
        return VerifyResult(False, prev_hash, count, seq, why, kind)

    for i, d in enumerate(items):
        expected = prev_seq + 1
        err = _shape_error(d)
        if err is not None:
            return fail("malformed", expected, f"entry #{i + 1}: {err}")
        seq = d["seq"]
        if seq != expected:
            if seq < expected:
                return fail("reordered", seq, f"entry #{i + 1} has seq {seq} after seq {prev_seq} "
                            "(out of order or duplicated)")
            if expected in seqs[i + 1:]:
                return fail("reordered", expected, f"entry #{i + 1} has seq {seq} but seq {expected} comes later")
            gap = f"seq {expected}" if seq == expected + 1 else f"seqs {expected}..{seq - 1}"
            return fail("missing", expected, f"{gap} missing (next present is {seq})")
        if entry_hash(d) != d["hash"]:
            return fail("changed", seq, f"entry seq {seq} does not match its hash (its content was changed)")
        if d["prev_hash"] != prev_hash:
            return fail("changed", seq, f"entry seq {seq}: prev_hash does not match the hash of seq {prev_seq} "
                        "(an earlier entry was rewritten, or removed and the rest renumbered)")
        prev_seq, prev_hash = seq, d["hash"]
        count += 1
    if count == 0 and require_events:
        return VerifyResult(False, prev_hash, 0, None, "no audit events, and events are required", "empty")
    if expected_head is not None:
        hseq, hhash = expected_head
        if hseq > prev_seq:
            return fail("missing", prev_seq + 1, f"chain ends at seq {prev_seq} but its head is seq {hseq}: "
                        "entries at the end were removed")
        if (hseq, hhash) != (prev_seq, prev_hash):
            return fail("changed", prev_seq, f"chain ends at seq {prev_seq} with a hash different from its head "
                        f"(seq {hseq})")
    return VerifyResult(True, prev_hash, count)


def verify_jsonl(path: str | os.PathLike[str], *, require_events: bool = False,
                 expected_head: tuple[int, str] | None = None) -> VerifyResult:
    """Verify a JSONL export (blank lines ignored; a line that is not an entry fails as malformed)."""
    items: list[Any] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line, object_pairs_hook=_no_dup_keys))
            except ValueError as exc:
                before = verify_chain(items)
                if not before.ok:
                    return before
                return VerifyResult(False, before.head_hash, before.count, before.count + 1,
                                    f"line {n}: not a JSON entry ({exc})", "malformed")
    return verify_chain(items, require_events=require_events, expected_head=expected_head)


def _no_dup_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key in entry")
    return d


async def verify_db(conn_or_pool: ConnOrPool, chain: str = "admin", *, require_events: bool = False) -> VerifyResult:
    """Verify the stored chain, including that it ends where its head row says."""
    entries = await load_entries(conn_or_pool, chain)
    return verify_chain(entries, require_events=require_events, expected_head=await head(conn_or_pool, chain))


# --- break-glass ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BreakGlassStatus:
    active: bool
    actor: str | None = None
    reason: str | None = None
    ticket: str | None = None
    enabled_at_ms: int | None = None
    expires_at_ms: int | None = None
    remaining_s: int = 0
    disabled_at_ms: int | None = None
    disabled_by: str | None = None
    audit_seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"active": self.active, "actor": self.actor, "reason": self.reason, "ticket": self.ticket,
                "enabled_at_ms": self.enabled_at_ms, "expires_at_ms": self.expires_at_ms,
                "remaining_s": self.remaining_s, "disabled_at_ms": self.disabled_at_ms,
                "disabled_by": self.disabled_by, "audit_seq": self.audit_seq}


def _status(row: Mapping[str, Any] | None, now: int) -> BreakGlassStatus:
    if row is None:
        return BreakGlassStatus(False)
    active = bool(row["enabled"]) and row["expires_at_ms"] > now
    remaining = max(0, -(-(row["expires_at_ms"] - now) // 1000)) if active else 0
    return BreakGlassStatus(active, row["actor"], row["reason"], row["ticket"], row["enabled_at_ms"],
                            row["expires_at_ms"], remaining, row["disabled_at_ms"], row["disabled_by"],
                            row["audit_seq"])


async def break_glass_status(conn_or_pool: ConnOrPool, *, now_ms: int | None = None) -> BreakGlassStatus:
    """Active while enabled and not past its TTL (expiry needs no write: the enable entry already
    records ``expires_at_ms``)."""
    now = _now_ms() if now_ms is None else now_ms
    return _status(await conn_or_pool.fetchrow("SELECT * FROM break_glass WHERE id = 1"), now)


async def break_glass_enable(conn_or_pool: ConnOrPool, actor: str | OperatorIdentity, ttl_s: int, reason: str,
                             ticket: str | None = None, *, roles: Iterable[str] | None = None,
                             max_ttl_s: int = BREAK_GLASS_MAX_TTL_S, now_ms: int | None = None) -> BreakGlassStatus:
    """Enable (or re-enable with a new window) break-glass for ``ttl_s`` seconds, audited in the same
    transaction. Break-glass exists for when the normal process is unavailable, so the ticket may
    be omitted; the entry then says BREAK-GLASS-NO-TICKET for the post-incident review to fill."""
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= max_ttl_s:
        raise AuditError("BREAK_GLASS_TTL", detail=f"ttl_s must be an integer in 1..{max_ttl_s}")
    now = _now_ms() if now_ms is None else now_ms
    expires = now + ttl_s * 1000
    t = ticket if ticket is not None and ticket.strip() else BREAK_GLASS_NO_TICKET
    name, rs = _actor_roles(actor, roles)
    reason = _check_text(reason, "AUDIT_REASON_REQUIRED", "reason", MAX_REASON)
    t = _check_text(t, "AUDIT_TICKET_REQUIRED", "ticket", MAX_TICKET)
    try:
        async with _tx(conn_or_pool) as conn:
            entry = await _append_locked(conn, "admin", name, rs, "BreakGlassEnable",
                                         {"ttl_s": ttl_s, "expires_at_ms": expires}, reason, t, now)
            await conn.execute(
                """INSERT INTO break_glass (id, enabled, actor, reason, ticket, enabled_at_ms, expires_at_ms,
                                            disabled_at_ms, disabled_by, disable_reason, audit_seq)
                   VALUES (1, true, $1, $2, $3, $4, $5, NULL, NULL, NULL, $6)
                   ON CONFLICT (id) DO UPDATE SET enabled = true, actor = $1, reason = $2, ticket = $3,
                       enabled_at_ms = $4, expires_at_ms = $5, disabled_at_ms = NULL, disabled_by = NULL,
                       disable_reason = NULL, audit_seq = $6""",
                name, reason, t, now, expires, entry.seq)
            return _status(await conn.fetchrow("SELECT * FROM break_glass WHERE id = 1"), now)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise AuditError("AUDIT_UNAVAILABLE", detail="break-glass change not audited, so not made") from exc


async def break_glass_disable(conn_or_pool: ConnOrPool, actor: str | OperatorIdentity, reason: str,
                              ticket: str | None = None, *, roles: Iterable[str] | None = None,
                              now_ms: int | None = None) -> BreakGlassStatus:
    """Disable break-glass, audited in the same transaction. Disabling when it is not active (never
    enabled, already disabled or expired) changes nothing and appends nothing."""
    now = _now_ms() if now_ms is None else now_ms
    t = ticket if ticket is not None and ticket.strip() else BREAK_GLASS_NO_TICKET
    name, rs = _actor_roles(actor, roles)
    reason = _check_text(reason, "AUDIT_REASON_REQUIRED", "reason", MAX_REASON)
    t = _check_text(t, "AUDIT_TICKET_REQUIRED", "ticket", MAX_TICKET)
    try:
        async with _tx(conn_or_pool) as conn:
            # Lock the chain head first, as enable does, so the two never interleave.
            await conn.execute("SELECT 1 FROM audit_head WHERE chain = 'admin' FOR UPDATE")
            row = await conn.fetchrow("SELECT * FROM break_glass WHERE id = 1 FOR UPDATE")
            if not _status(row, now).active:
                return _status(row, now)
            entry = await _append_locked(conn, "admin", name, rs, "BreakGlassDisable",
                                         {"enabled_audit_seq": row["audit_seq"]}, reason, t, now)
            await conn.execute(
                """UPDATE break_glass SET enabled = false, disabled_at_ms = $1, disabled_by = $2,
                       disable_reason = $3, audit_seq = $4 WHERE id = 1""", now, name, reason, entry.seq)
            return _status(await conn.fetchrow("SELECT * FROM break_glass WHERE id = 1"), now)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise AuditError("AUDIT_UNAVAILABLE", detail="break-glass change not audited, so not made") from exc


# --- command line --------------------------------------------------------------------------------

async def _with_conn(dsn: str, fn: Any) -> Any:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await fn(conn)
    finally:
        await conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when the chain verifies, 1 when it does not, 2 on usage or I/O errors."""
    ap = argparse.ArgumentParser(prog="python -m ledger.audit", description="spotex audit chain tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="verify a JSONL export")
    v.add_argument("file")
    v.add_argument("--require-events", action="store_true")
    vd = sub.add_parser("verify-db", help="verify the chain stored in PostgreSQL")
    e = sub.add_parser("export", help="export the chain to JSONL")
    hd = sub.add_parser("head", help="print the chain head (seq, hash) to anchor elsewhere")
    for p in (vd, e, hd):
        p.add_argument("--dsn", required=True)
        p.add_argument("--chain", default="admin")
    vd.add_argument("--require-events", action="store_true")
    e.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "verify":
            res = verify_jsonl(args.file, require_events=args.require_events)
        elif args.cmd == "verify-db":
            res = asyncio.run(_with_conn(args.dsn, lambda c: verify_db(c, args.chain,
                                                                      require_events=args.require_events)))
        elif args.cmd == "export":
            n = asyncio.run(_with_conn(args.dsn, lambda c: export_jsonl(c, args.out, args.chain)))
            print(json.dumps({"exported": n, "chain": args.chain, "out": str(Path(args.out))}))
            return 0
        else:
            seq, h = asyncio.run(_with_conn(args.dsn, lambda c: head(c, args.chain)))
            print(json.dumps({"chain": args.chain, "seq": seq, "hash": h}))
            return 0
    except (OSError, asyncpg.PostgresError, ValueError) as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), file=sys.stderr)
        return 2
    print(json.dumps(res.to_dict()))
    return 0 if res.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
