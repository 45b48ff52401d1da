"""Access control around operator keys (seed RUNBOOK §4.0, §9; docs/security.md "Access control:
SoD, JIT grants and the access review"): separation-of-duties rules as data and a checker over the
effective operator set, just-in-time role grants, and the monthly access review.

The effective operator set is every operator key the edge would accept: ``security.admin_keys``
(config: hex public key -> roles), the ``operator_keys`` table (a row there may also revoke a
config key), and the active ``jit_grants`` rows (migration 0007), which add one role to a known key
until ``expires_at_ms``. The edge honours grants in :class:`edge.auth.OperatorKeyStore`.

A grant or a revocation is appended to the admin audit chain (``JitGrant`` / ``JitRevoke``) in the
same transaction that writes the grant row, before the row exists for anyone else: a grant without
its entry cannot be seen by the edge. Bad input raises :class:`AccessError` with one line.

Times are integer epoch milliseconds; every function takes ``now_ms`` so tests can drive the clock.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from core.keys import load_public_key, raw_public_key
from edge.auth import OPERATOR_ROLES
from ledger import audit

__all__ = [
    "MAX_JIT_MINUTES",
    "SOD_RULES",
    "AccessError",
    "EffectiveKey",
    "JitGrant",
    "OperatorKeyRow",
    "access_review",
    "binding",
    "check_grant_input",
    "check_revoke_input",
    "connect_pool",
    "effective_set",
    "evaluate_sod",
    "grant",
    "iso",
    "list_grants",
    "load_operator_keys",
    "revoke",
    "sod_check",
]

MAX_JIT_MINUTES = 480
DEFAULT_UNUSED_DAYS = 90
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")  # as the jit_grants CHECK
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_DAY_MS = 86_400_000

# Separation-of-duties rules, as data. ``scope``: "always", or "production" (evaluated only when the
# config's env is production; reported as not applied otherwise). ``enforced``: where the rule is
# also prevented up front (the checker still looks, for rows written around the tools).
SOD_RULES: tuple[dict[str, str], ...] = (
    {"id": "operator-approver-split", "scope": "always",
     "description": "no single operator key may hold both 'operator' and 'approver' (standing or JIT)",
     "enforced": "spotex access jit-grant refuses a grant that would break it"},
    {"id": "admin-jit-only", "scope": "production",
     "description": "in production 'admin' is held only through an active, ticketed JIT grant, never standing",
     "enforced": "checker only (config and operator_keys are reviewed, not blocked)"},
    {"id": "named-key", "scope": "always",
     "description": "every operator key in operator_keys has a non-empty name",
     "enforced": "OperatorKeyStore.add refuses a blank name"},
    {"id": "jit-not-self-granted", "scope": "always",
     "description": "a JIT grant is never granted by the user it is for",
     "enforced": "spotex access jit-grant refuses it"},
    {"id": "jit-max-duration", "scope": "always",
     "description": f"a JIT grant lasts at most {MAX_JIT_MINUTES} minutes",
     "enforced": "spotex access jit-grant refuses it"},
    {"id": "latch-approvers-distinct", "scope": "always",
     "description": "the approvers of a latch release are distinct operator keys (two when a second approver is "
                    "required)",
     "enforced": "edge/admin.py latch_release and ledger.reconcile.release_latch"},
)
_RULE_IDS = {r["id"] for r in SOD_RULES}


class AccessError(ValueError):
    """Refused input or state; ``str(exc)`` is the one line to show."""


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _key_hex(key: str) -> str:
    try:
        return raw_public_key(load_public_key(key.strip())).hex()
    except (ValueError, TypeError) as exc:
        raise AccessError(f"--key must be an operator's Ed25519 public key (64 hex digits): {exc}") from None


def _key_id(key_hex: str) -> str:
    """How the admin audit chain names a key (OperatorIdentity.actor ends with ':' + this)."""
    return key_hex[:16]


# --- the operator set ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OperatorKeyRow:
    key_hex: str
    name: str
    source: str  # "config" | "table"
    roles: frozenset[str]  # standing roles
    revoked_at_ms: int | None = None
    created_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class JitGrant:
    id: int
    user: str
    key_hex: str
    role: str
    ticket: str
    reason: str
    granted_by: str
    granted_at_ms: int
    expires_at_ms: int
    audit_seq: int
    revoked_at_ms: int | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    revoke_ticket: str | None = None
    revoke_audit_seq: int | None = None

    def state(self, now_ms: int) -> str:
        if self.revoked_at_ms is not None:
            return "revoked"
        return "active" if now_ms < self.expires_at_ms else "expired"

    def to_dict(self, now_ms: int) -> dict[str, Any]:
        return {"id": self.id, "user": self.user, "public_key_hex": self.key_hex, "key_id": _key_id(self.key_hex),
                "role": self.role, "ticket": self.ticket, "reason": self.reason, "granted_by": self.granted_by,
                "granted_at_ms": self.granted_at_ms, "granted_at": iso(self.granted_at_ms),
                "expires_at_ms": self.expires_at_ms, "expires_at": iso(self.expires_at_ms),
                "audit_seq": self.audit_seq, "state": self.state(now_ms), "revoked_at_ms": self.revoked_at_ms,
                "revoked_by": self.revoked_by, "revoke_reason": self.revoke_reason,
                "revoke_ticket": self.revoke_ticket, "revoke_audit_seq": self.revoke_audit_seq}


@dataclass(frozen=True, slots=True)
class EffectiveKey:
    """A key the edge accepts now, with its standing and JIT roles."""
    key_hex: str
    name: str
    sources: tuple[str, ...]  # "config", "table", "jit"
    standing_roles: frozenset[str]
    jit_roles: frozenset[str]
    grants: tuple[JitGrant, ...] = field(default=())

    @property
    def roles(self) -> frozenset[str]:
        return self.standing_roles | self.jit_roles


def _grant(r: Mapping[str, Any]) -> JitGrant:
    return JitGrant(id=r["id"], user=r["username"], key_hex=r["public_key_hex"], role=r["role"], ticket=r["ticket"],
                    reason=r["reason"], granted_by=r["granted_by"], granted_at_ms=r["granted_at_ms"],
                    expires_at_ms=r["expires_at_ms"], audit_seq=r["audit_seq"], revoked_at_ms=r["revoked_at_ms"],
                    revoked_by=r["revoked_by"], revoke_reason=r["revoke_reason"], revoke_ticket=r["revoke_ticket"],
                    revoke_audit_seq=r["revoke_audit_seq"])


async def load_operator_keys(conn: Any, config_keys: Mapping[str, Sequence[str]] | None) -> list[OperatorKeyRow]:
    """Every configured and stored operator key, revoked ones included (``revoked_at_ms`` set)."""
    out: dict[str, OperatorKeyRow] = {}
    for key, roles in (config_keys or {}).items():
        k = raw_public_key(load_public_key(key)).hex()
        out[k] = OperatorKeyRow(k, f"op-{k[:12]}", "config", frozenset(roles))
    for r in await conn.fetch("SELECT public_key_hex, name, roles, created_at_ms, revoked_at_ms FROM operator_keys"):
        k = r["public_key_hex"]
        if k in out:  # a table row for a config key only revokes it (the store's rule)
            if r["revoked_at_ms"] is not None:
                c = out[k]
                out[k] = OperatorKeyRow(k, c.name, "config", c.roles, r["revoked_at_ms"], r["created_at_ms"])
            continue
        out[k] = OperatorKeyRow(k, r["name"], "table", frozenset(r["roles"]), r["revoked_at_ms"], r["created_at_ms"])
    return [out[k] for k in sorted(out)]


async def list_grants(conn: Any) -> list[JitGrant]:
    return [_grant(r) for r in await conn.fetch("SELECT * FROM jit_grants ORDER BY id")]


def effective_set(keys: Iterable[OperatorKeyRow], grants: Iterable[JitGrant], now_ms: int) -> list[EffectiveKey]:
    """The keys the edge accepts at ``now_ms``: not revoked, standing roles plus active grants' roles."""
    active: dict[str, list[JitGrant]] = {}
    for g in grants:
        if g.state(now_ms) == "active":
            active.setdefault(g.key_hex, []).append(g)
    out = []
    for k in keys:
        if k.revoked_at_ms is not None:
            continue
        gs = tuple(active.get(k.key_hex, ()))
        out.append(EffectiveKey(k.key_hex, k.name, (k.source, "jit") if gs else (k.source,), k.roles,
                                frozenset(g.role for g in gs), gs))
    return out


# --- separation of duties -----------------------------------------------------------------------

def _violation(rule: str, key_hex: str | None, roles: Iterable[str], detail: str) -> dict[str, Any]:
    assert rule in _RULE_IDS
    return {"rule": rule, "key_id": _key_id(key_hex) if key_hex else None, "public_key_hex": key_hex,
            "roles": sorted(roles), "detail": detail}


def _latch_violations(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """LatchRelease entries of the admin chain: approvers distinct by key, two when the release's
    LatchReleaseRequested entries (same symbol and ticket) said a second approver was required."""
    out = []
    second: dict[tuple[str, str], bool] = {}
    for e in entries:
        p = e.get("params") or {}
        key = (str(p.get("symbol")), str(e.get("ticket")))
        if e.get("action") == "LatchReleaseRequested":
            second[key] = bool(p.get("second_approver"))
        elif e.get("action") == "LatchRelease":
            approvers = [str(a) for a in p.get("approvers") or []]
            ids = [a.rsplit(":", 1)[-1] for a in approvers]
            if len(set(ids)) != len(ids):
                out.append(_violation("latch-approvers-distinct", None, ["approver"],
                                      f"audit seq {e.get('seq')}: release of {key[0]} approved twice by one key "
                                      f"({', '.join(approvers)})"))
            elif second.get(key) and len(ids) < 2:
                out.append(_violation("latch-approvers-distinct", None, ["approver"],
                                      f"audit seq {e.get('seq')}: release of {key[0]} needed two approvers, "
                                      f"had {len(ids)}"))
    return out


def evaluate_sod(keys: Iterable[EffectiveKey], grants: Iterable[JitGrant], *, production: bool, now_ms: int,
                 audit_entries: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Every rule of :data:`SOD_RULES` over the effective set; ``ok`` is False on any violation."""
    v: list[dict[str, Any]] = []
    keys = list(keys)
    for k in keys:
        if {"operator", "approver"} <= k.roles:
            how = "standing" if {"operator", "approver"} <= k.standing_roles else "with its JIT grants"
            v.append(_violation("operator-approver-split", k.key_hex, k.roles,
                                f"{k.name} holds operator and approver ({how})"))
        if production and "admin" in k.standing_roles:
            v.append(_violation("admin-jit-only", k.key_hex, k.roles,
                                f"{k.name} holds a standing admin role ({'/'.join(k.sources)}); grant it JIT"))
        if "table" in k.sources and not k.name.strip():
            v.append(_violation("named-key", k.key_hex, k.roles, "operator_keys row without a name"))
    for g in grants:
        if g.state(now_ms) != "active":
            continue
        if g.granted_by.strip().lower() == g.user.strip().lower():
            v.append(_violation("jit-not-self-granted", g.key_hex, [g.role],
                                f"grant {g.id} to {g.user} was granted by {g.granted_by}"))
        if g.expires_at_ms - g.granted_at_ms > MAX_JIT_MINUTES * 60_000:
            v.append(_violation("jit-max-duration", g.key_hex, [g.role],
                                f"grant {g.id} lasts {(g.expires_at_ms - g.granted_at_ms) // 60_000} min"))
    v.extend(_latch_violations(audit_entries))
    rules = [{**r, "applied": r["scope"] == "always" or production} for r in SOD_RULES]
    return {"ok": not v, "production": production, "checked_at_ms": now_ms, "checked_at": iso(now_ms),
            "keys_checked": len(keys), "rules": rules, "violations": v}


async def sod_check(pool: Any, config_keys: Mapping[str, Sequence[str]] | None, *, production: bool,
                    now_ms: int | None = None) -> dict[str, Any]:
    now = _now_ms() if now_ms is None else now_ms
    async with pool.acquire() as conn:
        keys = await load_operator_keys(conn, config_keys)
        grants = await list_grants(conn)
        entries = [e for e in await audit.load_entries(conn, "admin")
                   if e.get("action") in ("LatchRelease", "LatchReleaseRequested")]
    eff = effective_set(keys, grants, now)
    res = evaluate_sod(eff, grants, production=production, now_ms=now, audit_entries=entries)
    res["keys"] = [{"key_id": _key_id(k.key_hex), "public_key_hex": k.key_hex, "name": k.name,
                    "sources": list(k.sources), "roles": sorted(k.roles)} for k in eff]
    return res


# --- JIT grants ---------------------------------------------------------------------------------

def _text(value: str | None, what: str, limit: int) -> str:
    v = (value or "").strip()
    if not v:
        raise AccessError(f"{what} must not be empty")
    if len(v) > limit:
        raise AccessError(f"{what} is longer than {limit} characters")
    if _CONTROL_RE.search(v):
        raise AccessError(f"{what} must not contain control characters")
    return v


def _minutes(raw: str | int) -> int:
    s = str(raw).strip()
    if not re.fullmatch(r"[+-]?\d{1,9}", s):
        raise AccessError(f"duration_minutes must be a whole number of minutes, got {raw!r}")
    n = int(s)
    if n <= 0 or n > MAX_JIT_MINUTES:
        raise AccessError(f"duration_minutes must be 1..{MAX_JIT_MINUTES}, got {n}")
    return n


def check_grant_input(*, user: str, key: str, role: str, ticket: str, reason: str, minutes: str | int,
                      actor: str) -> tuple[str, str, str, str, str, int]:
    """The grant's input, checked without the database: (user, key hex, ticket, reason, actor, minutes)."""
    u = (user or "").strip()
    if not _USER_RE.fullmatch(u):
        raise AccessError(f"user must be 1-64 characters of A-Z a-z 0-9 . _ @ - (got {user!r})")
    if role not in OPERATOR_ROLES:
        raise AccessError(f"unknown role {role!r}; known: {', '.join(OPERATOR_ROLES)}")
    t = _text(ticket, "ticket", audit.MAX_TICKET)
    r = _text(reason, "reason", audit.MAX_REASON)
    n = _minutes(minutes)
    a = _text(actor, "actor (the granting admin)", 200)
    k = _key_hex(key)
    if a.lower() == u.lower():
        raise AccessError(f"{a} cannot grant a role to themself (rule jit-not-self-granted)")
    return u, k, t, r, a, n


async def grant(pool: Any, config_keys: Mapping[str, Sequence[str]] | None, *, user: str, key: str, role: str,
                ticket: str, reason: str, minutes: str | int, actor: str, now_ms: int | None = None) -> JitGrant:
    """Grant ``role`` to operator ``key`` (belonging to ``user``) for ``minutes``: audited
    (``JitGrant`` on the admin chain) in the transaction that writes the row. Refuses (AccessError)
    bad input, an unknown or revoked key, a role the key already holds standing, a self-grant, and a
    grant that would give the key both operator and approver."""
    u, k, t, r, a, n = check_grant_input(user=user, key=key, role=role, ticket=ticket, reason=reason,
                                         minutes=minutes, actor=actor)
    now = _now_ms() if now_ms is None else now_ms
    expires = now + n * 60_000
    try:
        async with pool.acquire() as conn, conn.transaction():
            # One grant at a time per key: the SoD check below must see the other grants.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('jit_grants:' || $1))", k)
            keys = {x.key_hex: x for x in await load_operator_keys(conn, config_keys)}
            row = keys.get(k)
            if row is None or row.revoked_at_ms is not None:
                raise AccessError(f"operator key {_key_id(k)} is {'revoked' if row else 'not known'} "
                                  "(security.admin_keys or operator_keys)")
            if role in row.roles:
                raise AccessError(f"operator key {_key_id(k)} ({row.name}) already holds {role} standing")
            others = await conn.fetch(
                """SELECT role FROM jit_grants WHERE public_key_hex = $1 AND revoked_at_ms IS NULL
                   AND expires_at_ms > $2""", k, now)
            after = row.roles | {x["role"] for x in others} | {role}
            if {"operator", "approver"} <= after:
                raise AccessError(f"operator key {_key_id(k)} would hold both operator and approver "
                                  "(rule operator-approver-split)")
            gid = await conn.fetchval("SELECT nextval(pg_get_serial_sequence('jit_grants', 'id'))")
            entry = await audit.append(
                conn, a, "JitGrant",
                {"grant_id": gid, "user": u, "key_id": _key_id(k), "public_key_hex": k, "role": role,
                 "duration_minutes": n, "expires_at_ms": expires, "expires_at": iso(expires)},
                r, t, now_ms=now)
            got = await conn.fetchrow(
                """INSERT INTO jit_grants (id, username, public_key_hex, role, ticket, reason, granted_by,
                                           granted_at_ms, expires_at_ms, audit_seq)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *""",
                gid, u, k, role, t, r, a, now, expires, entry.seq)
    except audit.AuditError as exc:
        raise AccessError(f"audit refused the grant ({exc.code}): {exc.detail}") from None
    return _grant(got)


def check_revoke_input(*, user: str | None, all_grants: bool, actor: str, reason: str,
                       ticket: str) -> tuple[str | None, str, str, str]:
    """(user or None for all, ticket, reason, actor), checked without the database."""
    if all_grants == (user is not None):
        raise AccessError("give exactly one of --user U or --all")
    u = None
    if user is not None:
        u = user.strip()
        if not _USER_RE.fullmatch(u):
            raise AccessError(f"user must be 1-64 characters of A-Z a-z 0-9 . _ @ - (got {user!r})")
    return u, _text(ticket, "ticket", audit.MAX_TICKET), _text(reason, "reason", audit.MAX_REASON), \
        _text(actor, "actor", 200)


async def revoke(pool: Any, *, user: str | None, all_grants: bool, actor: str, reason: str, ticket: str,
                 now_ms: int | None = None) -> tuple[int, list[JitGrant]]:
    """Revoke the active grants of ``user`` (or all of them): one ``JitRevoke`` entry (listing the
    grant ids, possibly none) in the transaction that marks them. Returns (audit seq, revoked)."""
    u, t, r, a = check_revoke_input(user=user, all_grants=all_grants, actor=actor, reason=reason, ticket=ticket)
    now = _now_ms() if now_ms is None else now_ms
    try:
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """SELECT * FROM jit_grants WHERE revoked_at_ms IS NULL AND expires_at_ms > $1
                   AND ($2::text IS NULL OR username = $2) ORDER BY id FOR UPDATE""", now, u)
            ids = [x["id"] for x in rows]
            entry = await audit.append(conn, a, "JitRevoke",
                                       {"user": u, "all": all_grants, "grant_ids": ids,
                                        "key_ids": sorted({_key_id(x["public_key_hex"]) for x in rows})},
                                       r, t, now_ms=now)
            done = await conn.fetch(
                """UPDATE jit_grants SET revoked_at_ms = $2, revoked_by = $3, revoke_reason = $4, revoke_ticket = $5,
                          revoke_audit_seq = $6
                   WHERE id = ANY($1::bigint[]) RETURNING *""", ids, now, a, r, t, entry.seq)
    except audit.AuditError as exc:
        raise AccessError(f"audit refused the revocation ({exc.code}): {exc.detail}") from None
    return entry.seq, sorted((_grant(x) for x in done), key=lambda g: g.id)


def binding(g: JitGrant) -> dict[str, Any]:
    """The grant as a binding document (seed §9: ticket-id, reason and expires-at annotations)."""
    return {
        "apiVersion": "spotex/v1",
        "kind": "JitRoleBinding",
        "metadata": {
            "name": f"jit-{g.user}-{g.id}",
            "annotations": {"ticket-id": g.ticket, "reason": g.reason, "expires-at": iso(g.expires_at_ms),
                            "granted-by": g.granted_by, "granted-at": iso(g.granted_at_ms),
                            "audit-seq": str(g.audit_seq)},
        },
        "subject": {"user": g.user, "operatorKey": g.key_hex, "keyId": _key_id(g.key_hex)},
        "roleRef": {"role": g.role},
        "grant": {"id": g.id, "granted_at_ms": g.granted_at_ms, "expires_at_ms": g.expires_at_ms,
                  "duration_minutes": (g.expires_at_ms - g.granted_at_ms) // 60_000},
    }


# --- the access review --------------------------------------------------------------------------

async def access_review(pool: Any, config_keys: Mapping[str, Sequence[str]] | None, *, production: bool,
                        unused_days: int = DEFAULT_UNUSED_DAYS, now_ms: int | None = None) -> dict[str, Any]:
    """The monthly access review (seed §4 "access review (RBAC/MFA/JIT)") as one JSON document."""
    if unused_days <= 0:
        raise AccessError(f"--unused-days must be > 0, got {unused_days}")
    now = _now_ms() if now_ms is None else now_ms
    async with pool.acquire() as conn:
        keys = await load_operator_keys(conn, config_keys)
        grants = await list_grants(conn)
        used: dict[str, tuple[int, int]] = {}  # key id -> (last ts, entries)
        for r in await conn.fetch("""SELECT actor, max(ts_ms) AS last, count(*) AS n FROM audit_chain
                                     WHERE chain = 'admin' GROUP BY actor"""):
            kid = str(r["actor"]).rsplit(":", 1)[-1]
            if _KEY_ID_RE.fullmatch(kid):
                last, n = used.get(kid, (0, 0))
                used[kid] = (max(last, r["last"]), n + r["n"])
        trader = await conn.fetch(
            """SELECT k.api_key, k.account_id, k.kind, k.scopes, k.label, k.created_at_ms, k.revoked_at_ms,
                      (SELECT max(i.created_at_ms) FROM idempotency_keys i WHERE i.api_key = k.api_key) AS seen_ms
               FROM api_keys k ORDER BY k.api_key""")
        entries = [e for e in await audit.load_entries(conn, "admin")
                   if e.get("action") in ("LatchRelease", "LatchReleaseRequested")]
    eff = {k.key_hex: k for k in effective_set(keys, grants, now)}
    operators = []
    for k in keys:
        e = eff.get(k.key_hex)
        kid = _key_id(k.key_hex)
        last_use: int | None = used[kid][0] if kid in used else None
        n = used[kid][1] if kid in used else 0
        kg = [g for g in grants if g.key_hex == k.key_hex]
        operators.append({
            "key_id": kid, "public_key_hex": k.key_hex, "name": k.name,
            "source": k.source, "sources": list(e.sources) if e else [k.source],
            "standing_roles": sorted(k.roles), "jit_roles": sorted(e.jit_roles) if e else [],
            "effective_roles": sorted(e.roles) if e else [], "revoked": k.revoked_at_ms is not None,
            "revoked_at": iso(k.revoked_at_ms), "last_use_ms": last_use, "last_use": iso(last_use),
            "admin_chain_entries": n,
            "jit_grants": {"active": sum(g.state(now) == "active" for g in kg),
                           "expired": sum(g.state(now) == "expired" for g in kg),
                           "revoked": sum(g.state(now) == "revoked" for g in kg)},
        })
    by_scope: dict[str, int] = {}
    by_scope_set: dict[str, int] = {}
    unused = []
    active_trader = 0
    cutoff = now - unused_days * _DAY_MS
    for t in trader:
        if t["revoked_at_ms"] is not None:
            continue
        active_trader += 1
        scopes = sorted(t["scopes"])
        for s in scopes:
            by_scope[s] = by_scope.get(s, 0) + 1
        by_scope_set[",".join(scopes)] = by_scope_set.get(",".join(scopes), 0) + 1
        last = t["seen_ms"] if t["seen_ms"] is not None else t["created_at_ms"]
        if last < cutoff:
            unused.append({"api_key": t["api_key"], "account_id": t["account_id"], "kind": t["kind"],
                           "scopes": scopes, "label": t["label"], "created_at": iso(t["created_at_ms"]),
                           "last_seen_ms": t["seen_ms"], "last_seen": iso(t["seen_ms"]),
                           "idle_days": (now - last) // _DAY_MS})
    sod = evaluate_sod(list(eff.values()), grants, production=production, now_ms=now, audit_entries=entries)
    return {
        "report": "access-review", "generated_at_ms": now, "generated_at": iso(now),
        "env": "production" if production else "dev",
        "operators": operators,
        "operator_counts": {"total": len(keys), "active": len(eff),
                            "revoked": sum(k.revoked_at_ms is not None for k in keys),
                            "config": sum(k.source == "config" for k in keys),
                            "table": sum(k.source == "table" for k in keys),
                            "with_active_jit": sum(1 for k in eff.values() if k.jit_roles)},
        "jit_grants": {s: [g.to_dict(now) for g in grants if g.state(now) == s]
                       for s in ("active", "expired", "revoked")},
        "trader_keys": {"active": active_trader, "revoked": sum(t["revoked_at_ms"] is not None for t in trader),
                        "by_scope": dict(sorted(by_scope.items())), "by_scope_set": dict(sorted(by_scope_set.items())),
                        "unused_days": unused_days, "unused": unused,
                        "last_use_source": "idempotency_keys.created_at_ms (the newest Idempotency-Key record of "
                                           "the key; records expire) else the key's created_at_ms"},
        "last_use_source": "admin audit chain: newest entry whose actor ends with ':<key id>'",
        "mfa": "operator requests are Ed25519-signed per request (possession of the private key); the edge has "
               "no second factor of its own",
        "sod": sod,
    }


async def connect_pool(dsn: str) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, timeout=10)
    assert pool is not None
    return pool
