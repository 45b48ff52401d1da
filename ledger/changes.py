"""Change workflow: propose -> two approvals -> apply -> verify, every step audited (docs/changes.md).

A *change* is an operator's proposal to alter the running exchange's operational settings, made of
typed operations the exchange already supports as audited admin actions:

- ``{"kind": "set_mode", "symbol": S, "mode": "NORMAL|CANCEL_ONLY|SOFT_HALT|HARD_HALT"}``: the
  core's SetSymbolMode on CMD (as :class:`ledger.reconcile.CoreAdmin` sends it);
- ``{"kind": "set_throttle", "symbol": S, "orders_per_s": N, "burst": B}``: the ``operator`` layer
  of the ``symbol_throttle`` KV bucket (as the edge's admin API writes it);
- ``{"kind": "clear_throttle", "symbol": S}``: delete that operator layer (the policy layer is the
  settlement-lag job's and is never touched);
- ``{"kind": "withdrawals_halt", "on": true|false}``: the core's WithdrawalsHalt.

A proposal has an id, ops, reason, ticket, proposer, creation and expiry times and ``hash`` =
sha256 of the canonical JSON of exactly those fields. Rules (each refusal is a :class:`ChangeError`
with a stable code, and is appended to the ``change`` audit chain as ``ChangeRefused``):

- approve: not the proposer (CHANGE_SELF_APPROVAL), not twice by the same approver
  (CHANGE_DUPLICATE_APPROVAL), not once applied (CHANGE_ALREADY_APPLIED), not expired
  (CHANGE_EXPIRED), not when the stored content no longer matches its hash (CHANGE_TAMPERED);
- apply: two approvals by distinct approvers other than the proposer (CHANGE_NOT_APPROVED), each for
  the proposal's current hash and each backed by its ``ChangeApproved`` audit entry, else
  CHANGE_TAMPERED; only once (CHANGE_ALREADY_APPLIED); before expiry (CHANGE_EXPIRED).

Apply appends ``ChangeApplied`` (change chain) first, then executes the ops in order, each audited on
the ``admin`` chain with ``change_id`` in its params, then verifies each op's effect is visible (the
core's ``book`` query for a mode, its ``status`` query for the withdrawals halt, the KV value read
back for a throttle) and, unless verification is skipped, runs the ledger invariants and verifies
both audit chains. The outcome is ``ChangeVerified`` or ``ChangeVerifyFailed`` on the change chain.

Identities (proposer, approvers, applier) are the names the operator gives (``--actor``): this is a
tool for holders of the database credentials, like ``spotex ledger``; separation of duties holds
between those names, and every one of them is in the tamper-evident chain.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ledger import audit

__all__ = ["APPROVALS_REQUIRED", "CHAIN", "DEFAULT_TTL_S", "MAX_TTL_S", "ChangeError", "Proposal", "apply",
           "approve", "content_hash", "get", "list_changes", "parse_op", "propose", "read_state", "revert_ops",
           "validate_ops"]

CHAIN = "change"
APPROVALS_REQUIRED = 2
DEFAULT_TTL_S = 24 * 3600
MAX_TTL_S = 7 * 24 * 3600
MAX_OPS = 32
MODES = ("NORMAL", "CANCEL_ONLY", "SOFT_HALT", "HARD_HALT")
_SYMBOL_RE = re.compile(r"[A-Z0-9]{1,16}-[A-Z0-9]{1,16}")
_ID_RE = re.compile(r"CHG-[0-9a-f]{16}")
_ACTOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}")
_OP_ACTION = {"set_mode": "SetSymbolMode", "set_throttle": "SetSymbolThrottle",
              "clear_throttle": "ClearSymbolThrottle", "withdrawals_halt": "WithdrawalsHalt"}


class ChangeError(Exception):
    """A refused step. ``code``: CHANGE_INVALID, CHANGE_NOT_FOUND, CHANGE_SELF_APPROVAL,
    CHANGE_DUPLICATE_APPROVAL, CHANGE_NOT_APPROVED, CHANGE_TAMPERED, CHANGE_ALREADY_APPLIED,
    CHANGE_EXPIRED, CHANGE_UNAVAILABLE (no JetStream/core connection to apply with)."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- operations ----------------------------------------------------------------------------------


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ChangeError("CHANGE_INVALID", f"{what} must be an integer in {lo}..{hi}")
    return v


def _symbol(v: Any, symbols: Sequence[str] | None) -> str:
    if not isinstance(v, str) or not _SYMBOL_RE.fullmatch(v):
        raise ChangeError("CHANGE_INVALID", f"symbol {v!r} is not a market symbol like BTC-USDT")
    if symbols is not None and v not in symbols:
        raise ChangeError("CHANGE_INVALID", f"unknown symbol {v} (configured: {', '.join(symbols)})")
    return v


def validate_ops(ops: Any, symbols: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The ops in canonical form (only their documented keys), or CHANGE_INVALID."""
    if not isinstance(ops, list) or not ops:
        raise ChangeError("CHANGE_INVALID", "a change needs at least one op")
    if len(ops) > MAX_OPS:
        raise ChangeError("CHANGE_INVALID", f"a change holds at most {MAX_OPS} ops")
    out: list[dict[str, Any]] = []
    for i, op in enumerate(ops):
        if not isinstance(op, Mapping):
            raise ChangeError("CHANGE_INVALID", f"op #{i + 1} is not an object")
        kind = op.get("kind")
        keys = {"set_mode": {"kind", "symbol", "mode"}, "set_throttle": {"kind", "symbol", "orders_per_s", "burst"},
                "clear_throttle": {"kind", "symbol"}, "withdrawals_halt": {"kind", "on"}}.get(str(kind))
        if keys is None:
            raise ChangeError("CHANGE_INVALID", f"op #{i + 1}: unknown kind {kind!r} "
                              f"(one of {', '.join(_OP_ACTION)})")
        extra = set(op) - keys
        if extra:
            raise ChangeError("CHANGE_INVALID", f"op #{i + 1} ({kind}): unknown fields {', '.join(sorted(extra))}")
        if kind == "set_mode":
            if op.get("mode") not in MODES:
                raise ChangeError("CHANGE_INVALID", f"op #{i + 1}: mode must be one of {', '.join(MODES)}")
            out.append({"kind": kind, "symbol": _symbol(op.get("symbol"), symbols), "mode": op["mode"]})
        elif kind == "set_throttle":
            rate = _int(op.get("orders_per_s"), f"op #{i + 1}: orders_per_s", 1, 1_000_000)
            burst = _int(op.get("burst", rate), f"op #{i + 1}: burst", 1, 1_000_000)
            out.append({"kind": kind, "symbol": _symbol(op.get("symbol"), symbols), "orders_per_s": rate,
                        "burst": burst})
        elif kind == "clear_throttle":
            out.append({"kind": kind, "symbol": _symbol(op.get("symbol"), symbols)})
        else:
            if not isinstance(op.get("on"), bool):
                raise ChangeError("CHANGE_INVALID", f"op #{i + 1}: withdrawals_halt needs on: true|false")
            out.append({"kind": kind, "on": op["on"]})
    return out


def parse_op(spec: str) -> dict[str, Any]:
    """The command-line form of an op: ``mode:SYMBOL=MODE``, ``throttle:SYMBOL=RATE[/BURST]``,
    ``throttle-clear:SYMBOL``, ``withdrawals-halt:on|off``."""
    kind, _, rest = spec.strip().partition(":")
    target, _, value = rest.partition("=")
    try:
        if kind == "mode" and value:
            return {"kind": "set_mode", "symbol": target, "mode": value.upper()}
        if kind == "throttle" and value:
            rate, _, burst = value.partition("/")
            return {"kind": "set_throttle", "symbol": target, "orders_per_s": int(rate),
                    "burst": int(burst) if burst else int(rate)}
        if kind == "throttle-clear" and target and not value:
            return {"kind": "clear_throttle", "symbol": target}
        if kind == "withdrawals-halt" and target in ("on", "off") and not value:
            return {"kind": "withdrawals_halt", "on": target == "on"}
    except ValueError:
        pass
    raise ChangeError("CHANGE_INVALID", f"cannot read op {spec!r}: use mode:SYMBOL=MODE, throttle:SYMBOL=RATE[/BURST], "
                      "throttle-clear:SYMBOL or withdrawals-halt:on|off")


# --- proposals -----------------------------------------------------------------------------------

_HASHED = ("id", "ops", "reason", "ticket", "proposer", "created_at_ms", "expires_at_ms")


def content_hash(fields: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON (ledger.audit.canonical_json) of the proposal's content."""
    import hashlib

    return hashlib.sha256(audit.canonical_json({k: fields[k] for k in _HASHED})).hexdigest()


@dataclass
class Proposal:
    id: str
    ops: list[dict[str, Any]]
    reason: str
    ticket: str
    proposer: str
    created_at_ms: int
    expires_at_ms: int
    hash: str
    state: str
    proposed_seq: int
    approvals: list[dict[str, Any]] = field(default_factory=list)
    applied_by: str | None = None
    applied_at_ms: int | None = None
    result: dict[str, Any] | None = None

    @property
    def content_ok(self) -> bool:
        return content_hash(self.__dict__) == self.hash

    def approvers(self) -> list[str]:
        return [a["approver"] for a in self.approvals]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "ops": self.ops, "reason": self.reason, "ticket": self.ticket,
                "proposer": self.proposer, "created_at_ms": self.created_at_ms, "expires_at_ms": self.expires_at_ms,
                "hash": self.hash, "content_ok": self.content_ok, "state": self.state,
                "proposed_seq": self.proposed_seq, "approvals": self.approvals, "applied_by": self.applied_by,
                "applied_at_ms": self.applied_at_ms, "result": self.result}


def _load_json(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else v


async def _fetch(conn: Any, change_id: str, *, lock: bool = False) -> Proposal | None:
    row = await conn.fetchrow("SELECT * FROM change_proposals WHERE id = $1" + (" FOR UPDATE" if lock else ""),
                              change_id)
    if row is None:
        return None
    apps = await conn.fetch("SELECT approver, approved_at_ms, hash, audit_seq FROM change_approvals "
                            "WHERE change_id = $1 ORDER BY approved_at_ms, approver", change_id)
    return Proposal(id=row["id"], ops=_load_json(row["ops"]), reason=row["reason"], ticket=row["ticket"],
                    proposer=row["proposer"], created_at_ms=row["created_at_ms"], expires_at_ms=row["expires_at_ms"],
                    hash=row["hash"], state=row["state"], proposed_seq=row["proposed_seq"],
                    approvals=[dict(a) for a in apps], applied_by=row["applied_by"],
                    applied_at_ms=row["applied_at_ms"], result=_load_json(row["result"]))


def _actor(name: str, what: str) -> str:
    v = (name or "").strip()
    if not _ACTOR_RE.fullmatch(v):
        raise ChangeError("CHANGE_INVALID", f"{what} must be a name of 1-64 letters, digits or _.:@- (got {name!r})")
    return v


async def _refuse(pool: Any, actor: str, step: str, code: str, detail: str, p: Proposal | None,
                  change_id: str) -> ChangeError:
    """Append ``ChangeRefused`` to the change chain; the error to raise."""
    params: dict[str, Any] = {"change_id": change_id, "step": step, "code": code}
    if p is not None:
        params["hash"] = p.hash
    reason = f"{step} refused: {detail}"[: audit.MAX_REASON]
    ticket = (p.ticket if p is not None else "") or "CHANGE-UNKNOWN"
    try:
        await audit.append(pool, actor or "unknown", "ChangeRefused", params, reason, ticket, chain=CHAIN)
    except audit.AuditError as exc:
        return ChangeError(code, f"{detail} (and the refusal could not be audited: {exc.code})")
    return ChangeError(code, detail)


async def propose(pool: Any, proposer: str, ops: Any, reason: str, ticket: str, *, ttl_s: int = DEFAULT_TTL_S,
                  symbols: Sequence[str] | None = None, now_ms: int | None = None) -> Proposal:
    """Store a new proposal (state ``proposed``) and its ``ChangeProposed`` entry in one transaction."""
    proposer = _actor(proposer, "proposer")
    ops = validate_ops(ops, symbols)
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 60 <= ttl_s <= MAX_TTL_S:
        raise ChangeError("CHANGE_INVALID", f"ttl must be an integer number of seconds in 60..{MAX_TTL_S}")
    reason, ticket = (reason or "").strip(), (ticket or "").strip()
    if not reason or not ticket:
        raise ChangeError("CHANGE_INVALID", "a change needs a non-empty reason and ticket")
    now = _now_ms() if now_ms is None else now_ms
    fields = {"id": f"CHG-{secrets.token_hex(8)}", "ops": ops, "reason": reason, "ticket": ticket,
              "proposer": proposer, "created_at_ms": now, "expires_at_ms": now + ttl_s * 1000}
    h = content_hash(fields)
    async with pool.acquire() as conn, conn.transaction():
        try:
            entry = await audit.append(conn, proposer, "ChangeProposed", {**fields, "hash": h}, reason, ticket,
                                       chain=CHAIN, now_ms=now)
        except audit.AuditError as exc:
            raise ChangeError("CHANGE_INVALID" if exc.code != "AUDIT_UNAVAILABLE" else "CHANGE_UNAVAILABLE",
                              exc.detail) from exc
        await conn.execute(
            """INSERT INTO change_proposals (id, ops, reason, ticket, proposer, created_at_ms, expires_at_ms, hash,
                                             proposed_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            fields["id"], json.dumps(ops), reason, ticket, proposer, now, fields["expires_at_ms"], h, entry.seq)
        p = await _fetch(conn, str(fields["id"]))
    assert p is not None
    return p


async def get(pool: Any, change_id: str) -> Proposal:
    async with pool.acquire() as conn:
        p = await _fetch(conn, change_id)
    if p is None:
        raise ChangeError("CHANGE_NOT_FOUND", f"no change {change_id}")
    return p


async def list_changes(pool: Any, limit: int = 20) -> list[Proposal]:
    async with pool.acquire() as conn:
        ids = await conn.fetch("SELECT id FROM change_proposals ORDER BY created_at_ms DESC, id LIMIT $1", limit)
        out = [await _fetch(conn, r["id"]) for r in ids]
    return [p for p in out if p is not None]


def _state_refusal(p: Proposal, now: int) -> tuple[str, str] | None:
    if p.state != "proposed":
        return "CHANGE_ALREADY_APPLIED", f"{p.id} was already applied by {p.applied_by} (state {p.state})"
    if now >= p.expires_at_ms:
        return "CHANGE_EXPIRED", f"{p.id} expired at {p.expires_at_ms} ms; propose it again"
    if not p.content_ok:
        return "CHANGE_TAMPERED", f"{p.id}: the stored proposal no longer matches its hash {p.hash[:16]}"
    return None


async def _locked(conn: Any, change_id: str, now: int) -> tuple[Proposal | None, tuple[str, str] | None]:
    """The proposal, row-locked for this transaction, and why no step may be taken on it now
    (not found, applied, expired, tampered), else None."""
    p = await _fetch(conn, change_id, lock=True)
    if p is None:
        return None, ("CHANGE_NOT_FOUND", f"no change {change_id}")
    return p, _state_refusal(p, now)


async def approve(pool: Any, change_id: str, approver: str, *, now_ms: int | None = None) -> Proposal:
    """Record one approval (for the proposal's current hash) and its ``ChangeApproved`` entry."""
    approver = _actor(approver, "approver")
    now = _now_ms() if now_ms is None else now_ms
    refusal: tuple[str, str] | None = None
    p: Proposal | None = None
    async with pool.acquire() as conn, conn.transaction():
        p, refusal = await _locked(conn, change_id, now)
        if p is not None:
            if refusal is None and approver == p.proposer:
                refusal = ("CHANGE_SELF_APPROVAL", f"{approver} proposed {p.id} and cannot approve it")
            if refusal is None and approver in p.approvers():
                refusal = ("CHANGE_DUPLICATE_APPROVAL", f"{approver} already approved {p.id}; "
                           "a second approval must come from someone else")
        if refusal is None and p is not None:
            entry = await audit.append(conn, approver, "ChangeApproved",
                                       {"change_id": p.id, "hash": p.hash, "approval": len(p.approvals) + 1},
                                       p.reason, p.ticket, chain=CHAIN, now_ms=now)
            await conn.execute("INSERT INTO change_approvals (change_id, approver, approved_at_ms, hash, audit_seq) "
                               "VALUES ($1, $2, $3, $4, $5)", p.id, approver, now, p.hash, entry.seq)
            p = await _fetch(conn, p.id)
            assert p is not None
            return p
    assert refusal is not None
    raise await _refuse(pool, approver, "approve", refusal[0], refusal[1], p, change_id)


async def _approvals_valid(conn: Any, p: Proposal) -> tuple[list[str], str | None]:
    """Distinct approvers (not the proposer) whose approval is for the current hash and backed by
    its ChangeApproved entry; and why any approval is not (a tampered table), else None."""
    seqs = [int(a["audit_seq"]) for a in p.approvals]
    rows = await conn.fetch("SELECT seq, body FROM audit_chain WHERE chain = $1 AND seq = ANY($2::bigint[])",
                            CHAIN, seqs)
    bodies = {int(r["seq"]): json.loads(r["body"]) for r in rows}
    good: list[str] = []
    for a in p.approvals:
        b = bodies.get(int(a["audit_seq"]))
        if a["hash"] != p.hash:
            return good, f"the approval of {a['approver']} is for hash {a['hash'][:16]}, not {p.hash[:16]}"
        if (b is None or b.get("action") != "ChangeApproved" or b.get("actor") != a["approver"]
                or (b.get("params") or {}).get("change_id") != p.id or (b.get("params") or {}).get("hash") != p.hash):
            return good, f"the approval of {a['approver']} has no matching ChangeApproved audit entry"
        if a["approver"] != p.proposer and a["approver"] not in good:
            good.append(a["approver"])
    return good, None


# --- apply ---------------------------------------------------------------------------------------


@dataclass
class Exchange:
    """Where the ops go: a NATS connection (JetStream for CMD and the KV bucket, requests for the
    core's queries) and the core's query subject."""

    nc: Any
    query_subject: str = "core.query"

    @property
    def js(self) -> Any:
        return self.nc.jetstream()


async def _core_query(ex: Exchange, req: dict[str, Any]) -> Any:
    import msgspec

    try:
        resp = await ex.nc.request(ex.query_subject, msgspec.msgpack.encode(req), timeout=3)
        return msgspec.msgpack.decode(resp.data)
    except Exception:
        return None


async def core_mode(ex: Exchange, symbol: str) -> str | None:
    """The symbol's mode in the core now: the ``book`` query at depth 0 that
    ``jobs.checks.core_symbol_mode`` uses; None when the core does not answer."""
    data = await _core_query(ex, {"op": "book", "symbol": symbol, "depth": 0})
    return str(data["mode"]) if isinstance(data, dict) and "mode" in data else None


async def core_withdrawals_halted(ex: Exchange) -> bool | None:
    data = await _core_query(ex, {"op": "status"})
    v = data.get("withdrawals_halted") if isinstance(data, dict) else None
    return v if isinstance(v, bool) else None


async def operator_throttle(ex: Exchange, symbol: str) -> dict[str, Any] | None:
    """The operator layer of the symbol's throttle as stored, None when there is none."""
    import msgspec
    from nats.js.errors import KeyDeletedError, KeyNotFoundError, NotFoundError

    from core.bus import decode_setting, throttle_bucket, throttle_key

    kv = await throttle_bucket(ex.js)
    try:
        e = await kv.get(throttle_key(symbol, "operator"))
    except (KeyNotFoundError, KeyDeletedError, NotFoundError):
        return None
    s = decode_setting(e.value or b"")
    return None if s is None else {**msgspec.structs.asdict(s), "revision": int(e.revision or 0)}


async def read_state(ex: Exchange, ops: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What each op's target holds now (mode, operator throttle, withdrawals halt)."""
    out: list[dict[str, Any]] = []
    for op in ops:
        if op["kind"] == "set_mode":
            out.append({"mode": await core_mode(ex, op["symbol"])})
        elif op["kind"] in ("set_throttle", "clear_throttle"):
            t = await operator_throttle(ex, op["symbol"])
            out.append({"throttle": None if t is None else {"orders_per_s": t["orders_per_s"], "burst": t["burst"]}})
        else:
            out.append({"withdrawals_halted": await core_withdrawals_halted(ex)})
    return out


def revert_ops(ops: Sequence[Mapping[str, Any]], before: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ops that put back what ``before`` (from :func:`read_state`, or an applied change's
    ``result.before``) recorded, in reverse order. An unknown prior value (None) cannot be reverted."""
    out: list[dict[str, Any]] = []
    for op, b in reversed(list(zip(ops, before, strict=True))):
        if op["kind"] == "set_mode":
            if b.get("mode") is None:
                raise ChangeError("CHANGE_INVALID", f"the mode of {op['symbol']} before the change is unknown")
            out.append({"kind": "set_mode", "symbol": op["symbol"], "mode": b["mode"]})
        elif op["kind"] in ("set_throttle", "clear_throttle"):
            t = b.get("throttle")
            out.append({"kind": "clear_throttle", "symbol": op["symbol"]} if t is None else
                       {"kind": "set_throttle", "symbol": op["symbol"], "orders_per_s": t["orders_per_s"],
                        "burst": t["burst"]})
        else:
            if b.get("withdrawals_halted") is None:
                raise ChangeError("CHANGE_INVALID", "the withdrawals halt before the change is unknown")
            out.append({"kind": "withdrawals_halt", "on": bool(b["withdrawals_halted"])})
    return out


async def _execute(pool: Any, ex: Exchange, p: Proposal, actor: str, op: Mapping[str, Any]) -> int:
    """Audit the op on the admin chain (params carry change_id), then act. The admin audit seq."""
    import msgspec

    from core.bus import SymbolThrottle, throttle_bucket, throttle_key
    from core.wire import SetSymbolMode, SymbolMode, WithdrawalsHalt
    from ledger.reconcile import CoreAdmin

    tag = {"change_id": p.id, "change_hash": p.hash}
    if op["kind"] in ("set_mode", "withdrawals_halt"):
        cmd = (SetSymbolMode(symbol=op["symbol"], mode=SymbolMode(op["mode"]), reason=p.reason, ticket=p.ticket)
               if op["kind"] == "set_mode" else WithdrawalsHalt(on=op["on"], reason=p.reason, ticket=p.ticket))
        seq = await CoreAdmin(pool, ex.js, actor=actor).send(cmd, reason=p.reason, ticket=p.ticket, params=tag)
        assert seq is not None
        return seq
    kv = await throttle_bucket(ex.js)
    key = throttle_key(op["symbol"], "operator")
    if op["kind"] == "set_throttle":
        params = {"symbol": op["symbol"], "layer": "operator", "orders_per_s": op["orders_per_s"],
                  "burst": op["burst"], **tag}
        entry = await audit.append(pool, actor, "SetSymbolThrottle", params, p.reason, p.ticket)
        try:
            await kv.put(key, msgspec.json.encode(SymbolThrottle(
                symbol=op["symbol"], layer="operator", orders_per_s=op["orders_per_s"], burst=op["burst"],
                actor=actor, reason=p.reason, ticket=p.ticket, audit_seq=entry.seq, set_at_ms=_now_ms())))
        except Exception as exc:
            await audit.append(pool, actor, "SetSymbolThrottle.failed",
                               {**params, "error": type(exc).__name__, "audit_seq": entry.seq}, p.reason, p.ticket)
            raise
        return entry.seq
    was = await operator_throttle(ex, op["symbol"])
    params = {"symbol": op["symbol"], "layers": ["operator"], **tag,
              "was": {"operator": None if was is None else {"orders_per_s": was["orders_per_s"],
                                                            "actor": was["actor"]}}}
    entry = await audit.append(pool, actor, "ClearSymbolThrottle", params, p.reason, p.ticket)
    try:
        await kv.delete(key)
    except Exception as exc:
        await audit.append(pool, actor, "ClearSymbolThrottle.failed",
                           {**params, "error": type(exc).__name__, "audit_seq": entry.seq}, p.reason, p.ticket)
        raise
    return entry.seq


async def _effect_visible(ex: Exchange, op: Mapping[str, Any], admin_seq: int) -> tuple[bool, Any]:
    if op["kind"] == "set_mode":
        m = await core_mode(ex, op["symbol"])
        return m == op["mode"], {"mode": m}
    if op["kind"] == "withdrawals_halt":
        w = await core_withdrawals_halted(ex)
        return w is op["on"], {"withdrawals_halted": w}
    t = await operator_throttle(ex, op["symbol"])
    if op["kind"] == "clear_throttle":
        return t is None, {"throttle": t}
    ok = (t is not None and t["orders_per_s"] == op["orders_per_s"] and t["burst"] == op["burst"]
          and t["audit_seq"] == admin_seq)
    return ok, {"throttle": None if t is None else {k: t[k] for k in ("orders_per_s", "burst", "audit_seq")}}


async def apply(pool: Any, ex: Exchange | None, change_id: str, actor: str, *, skip_verification: bool = False,
                verify_timeout_s: float = 20.0, now_ms: int | None = None) -> Proposal:
    """Apply an approved change (see the module docstring). Returns the proposal with its final
    state (``verified`` or ``verify_failed``) and ``result``; a refusal raises :class:`ChangeError`."""
    actor = _actor(actor, "applier")
    now = _now_ms() if now_ms is None else now_ms
    refusal: tuple[str, str] | None = None
    p: Proposal | None = None
    async with pool.acquire() as conn, conn.transaction():
        p, refusal = await _locked(conn, change_id, now)
        if p is not None:
            if refusal is None:
                good, bad = await _approvals_valid(conn, p)
                if bad is not None:
                    refusal = ("CHANGE_TAMPERED", f"{p.id}: {bad}")
                elif len(good) < APPROVALS_REQUIRED:
                    refusal = ("CHANGE_NOT_APPROVED", f"{p.id} has {len(good)} of {APPROVALS_REQUIRED} approvals "
                               "(distinct approvers, not the proposer)")
            if refusal is None and ex is None:
                refusal = ("CHANGE_UNAVAILABLE", "no NATS connection to the exchange: nothing applied")
            if refusal is None:
                await audit.append(conn, actor, "ChangeApplied",
                                   {"change_id": p.id, "hash": p.hash, "ops": p.ops, "approvers": p.approvers(),
                                    "skip_verification": skip_verification}, p.reason, p.ticket, chain=CHAIN,
                                   now_ms=now)
                await conn.execute("UPDATE change_proposals SET state = 'applying', applied_by = $2, "
                                   "applied_at_ms = $3 WHERE id = $1", p.id, actor, now)
    if refusal is not None or p is None or ex is None:
        assert refusal is not None
        raise await _refuse(pool, actor, "apply", refusal[0], refusal[1], p, change_id)

    t0 = time.perf_counter()
    before = await read_state(ex, p.ops)
    ops_out: list[dict[str, Any]] = []
    failed = False
    for op, b in zip(p.ops, before, strict=True):
        rec: dict[str, Any] = {"op": op, "before": b}
        if failed:
            rec["error"] = "not executed: an earlier op failed"
        else:
            try:
                rec["admin_seq"] = await _execute(pool, ex, p, actor, op)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
                failed = True
        ops_out.append(rec)

    # Verify every executed op's effect is visible, waiting for the core to apply its commands.
    deadline = time.monotonic() + verify_timeout_s
    pending = [r for r in ops_out if "admin_seq" in r]
    while True:
        for r in pending:
            r["visible"], r["after"] = await _effect_visible(ex, r["op"], r["admin_seq"])
        if all(r["visible"] for r in pending) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.2)
    effects_ok = not failed and all(r["visible"] for r in pending)

    checks: dict[str, Any] = {"effects_visible": effects_ok}
    if not skip_verification:
        from ledger.invariants import run_invariants

        try:
            inv = await run_invariants(pool, record=False)
            checks["invariants"] = {"ok": inv.ok, "scope": inv.scope, "checked_through_tx": inv.checked_through_tx,
                                    "violations": [f"{n}:{k}" for n, k, _ in inv.violations()][:20]}
        except Exception as exc:
            checks["invariants"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        for chain in ("admin", CHAIN):
            checks[f"audit_{chain}"] = (await audit.verify_db(pool, chain, require_events=True)).to_dict()
    ok = effects_ok and all(v.get("ok") for k, v in checks.items() if isinstance(v, dict))
    result = {"ok": ok, "skip_verification": skip_verification, "ops": ops_out, "before": before, "checks": checks,
              "seconds": round(time.perf_counter() - t0, 3)}
    state = "verified" if ok else "verify_failed"
    failures = [f"op {i + 1}: {r.get('error') or 'effect not visible'}" for i, r in enumerate(ops_out)
                if r.get("error") or not r.get("visible")]
    failures += [k for k, v in checks.items() if isinstance(v, dict) and not v.get("ok")]
    async with pool.acquire() as conn, conn.transaction():
        await audit.append(conn, actor, "ChangeVerified" if ok else "ChangeVerifyFailed",
                           {"change_id": p.id, "hash": p.hash, "skip_verification": skip_verification,
                            "admin_seqs": [r.get("admin_seq") for r in ops_out], "failures": failures},
                           p.reason, p.ticket, chain=CHAIN)
        await conn.execute("UPDATE change_proposals SET state = $2, result = $3 WHERE id = $1", p.id, state,
                           json.dumps(result, default=str))
        final = await _fetch(conn, p.id)
    assert final is not None
    return final
