"""``spotex access ...``: separation-of-duties check, JIT operator role grants and the monthly access
review (seed RUNBOOK §4.0, §9; the logic is edge/access.py, the doc docs/security.md "Access control:
SoD, JIT grants and the access review").

- ``spotex access sod-check [--json]``: one ``violation ...`` line per violation, then
  ``rbac_sod_ok=true|false``; exit 1 on violations. Evidence ``build/access/rbac-sod-<stamp>.json``
  and ``rbac-sod-latest.json``.
- ``spotex access jit-grant USER TICKET REASON DURATION_MINUTES --key HEX --role ROLE --actor A``:
  audited (``JitGrant``) in the transaction that stores the grant; writes the binding document
  ``build/access/jit-<user>-<stamp>.json``.
- ``spotex access jit-revoke (--user U | --all) --actor A --reason R --ticket T``: audited (``JitRevoke``).
- ``spotex access review [--json] [--unused-days N]``: ``build/access/access-review-<stamp>.json`` and
  ``-latest.json``; ``access_review_ok=true`` when the report was written and SoD passes.

These run against the stack's PostgreSQL (SPOTEX_DATA_DIR / --data-dir) with the database's
credentials, like ``spotex keys``. Errors: one line ``spotex: ...`` and exit 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["register"]

DEFAULT_OUT = "build/access"


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _write(out: str, name: str, doc: dict[str, Any], latest: str | None = None) -> Path:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    p = d / name
    tmp = p.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    if latest:
        tmp = (d / latest).with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, d / latest)
    return p


def _run(data_dir: str | None, config: str | None, fn: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    """``fn(pool, env)`` against the stack's PostgreSQL; AccessError and connection failures -> one line."""
    from edge.access import AccessError, connect_pool
    from spotex.cli import _load, fail
    from spotex.supervisor import resolve_endpoints

    env = _load(data_dir, config)

    async def go() -> Any:
        pool = await connect_pool(str(resolve_endpoints(env.cfg, env.data).pg_dsn))
        try:
            return await fn(pool, env)
        finally:
            await pool.close()

    try:
        return asyncio.run(go())
    except AccessError as exc:
        fail(str(exc))
    except (TimeoutError, OSError) as exc:
        fail(f"cannot reach the stack's PostgreSQL ({type(exc).__name__}: {exc}); is the stack up?")


def register(main: click.Group) -> None:
    from spotex.cli import stack_options

    @main.group("access")
    def access() -> None:
        """Operator access control: SoD check, JIT role grants, access review."""

    @access.command("sod-check")
    @click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
    @click.option("--out", default=DEFAULT_OUT, show_default=True, help="Evidence directory.")
    @stack_options
    def sod_check(as_json: bool, out: str, data_dir: str | None, config: str | None) -> None:
        """Check the separation-of-duties rules over config keys, operator_keys and active JIT grants."""
        from edge.access import sod_check as check

        res = _run(data_dir, config, lambda pool, env: check(pool, env.cfg.security.admin_keys,
                                                              production=env.cfg.production))
        stamp = _stamp()
        path = _write(out, f"rbac-sod-{stamp}.json", res, "rbac-sod-latest.json")
        if as_json:
            click.echo(json.dumps(res, sort_keys=True))
        else:
            for v in res["violations"]:
                click.echo(f"violation key={v['key_id'] or '-'} roles={','.join(v['roles']) or '-'} "
                           f"rule={v['rule']} detail={v['detail']}")
            click.echo(f"keys_checked={res['keys_checked']}")
            click.echo(f"violations={len(res['violations'])}")
            click.echo(f"evidence={path}")
            click.echo(f"rbac_sod_ok={'true' if res['ok'] else 'false'}")
        raise SystemExit(0 if res["ok"] else 1)

    @access.command("jit-grant")
    @click.argument("user")
    @click.argument("ticket")
    @click.argument("reason")
    @click.argument("duration_minutes")
    @click.option("--key", "key", envvar="JIT_OPERATOR_KEY", default="",
                  help="The user's operator public key (hex Ed25519); env JIT_OPERATOR_KEY.")
    @click.option("--role", envvar="JIT_ROLE", default="",
                  help="Role to grant: viewer, operator, approver or admin; env JIT_ROLE.")
    @click.option("--actor", envvar="JIT_ACTOR", default="",
                  help="The granting admin (recorded on the audit chain); env JIT_ACTOR.")
    @click.option("--out", default=DEFAULT_OUT, show_default=True, help="Where the binding document goes.")
    @click.option("--json", "as_json", is_flag=True, help="Print the binding document.")
    @stack_options
    def jit_grant(user: str, ticket: str, reason: str, duration_minutes: str, key: str, role: str, actor: str,
                  out: str, as_json: bool, data_dir: str | None, config: str | None) -> None:
        """Grant ROLE to an operator key for DURATION_MINUTES (1..480), audited first."""
        from edge.access import AccessError, binding, check_grant_input, grant
        from spotex.cli import fail

        if not key.strip():
            fail("--key (or JIT_OPERATOR_KEY) is required: the operator public key the grant is for")
        if not role.strip():
            fail("--role (or JIT_ROLE) is required: viewer, operator, approver or admin")
        try:
            check_grant_input(user=user, key=key, role=role.strip(), ticket=ticket, reason=reason,
                              minutes=duration_minutes, actor=actor)
        except AccessError as exc:
            fail(str(exc))
        g = _run(data_dir, config, lambda pool, env: grant(
            pool, env.cfg.security.admin_keys, user=user, key=key, role=role.strip(), ticket=ticket, reason=reason,
            minutes=duration_minutes, actor=actor))
        doc = binding(g)
        path = _write(out, f"jit-{g.user}-{_stamp()}-{g.id}.json", doc)
        if as_json:
            click.echo(json.dumps(doc, sort_keys=True))
            return
        ann = doc["metadata"]["annotations"]
        click.echo(f"jit_grant_id={g.id}")
        click.echo(f"user={g.user} key={doc['subject']['keyId']} role={g.role}")
        for k in ("ticket-id", "reason", "expires-at", "granted-by", "audit-seq"):
            click.echo(f"{k}={ann[k]}")
        click.echo(f"binding={path}")
        click.echo("jit_grant_ok=true")

    @access.command("jit-revoke")
    @click.option("--user", default=None, help="Revoke this user's active grants.")
    @click.option("--all", "all_grants", is_flag=True, help="Revoke every active grant (incident playbook step 1).")
    @click.option("--actor", default="", help="Who revokes (recorded on the audit chain).")
    @click.option("--reason", default="")
    @click.option("--ticket", default="")
    @click.option("--json", "as_json", is_flag=True)
    @stack_options
    def jit_revoke(user: str | None, all_grants: bool, actor: str, reason: str, ticket: str, as_json: bool,
                   data_dir: str | None, config: str | None) -> None:
        """Revoke active JIT grants, audited (the edge drops the role within its key cache TTL, 10 s)."""
        from edge.access import AccessError, check_revoke_input, revoke
        from spotex.cli import fail

        try:
            check_revoke_input(user=user, all_grants=all_grants, actor=actor, reason=reason, ticket=ticket)
        except AccessError as exc:
            fail(str(exc))
        seq, done = _run(data_dir, config, lambda pool, env: revoke(
            pool, user=user, all_grants=all_grants, actor=actor, reason=reason, ticket=ticket))
        now = time.time_ns() // 1_000_000
        if as_json:
            click.echo(json.dumps({"audit_seq": seq, "revoked": [g.to_dict(now) for g in done]}, sort_keys=True))
            return
        for g in done:
            click.echo(f"revoked grant={g.id} user={g.user} key={g.key_hex[:16]} role={g.role}")
        click.echo(f"revoked={len(done)}")
        click.echo(f"audit_seq={seq}")
        click.echo("jit_revoke_ok=true")

    @access.command("review")
    @click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
    @click.option("--unused-days", default=90, show_default=True, type=int,
                  help="Trader API keys not seen for longer than this are listed as unused.")
    @click.option("--out", default=DEFAULT_OUT, show_default=True, help="Evidence directory.")
    @stack_options
    def review(as_json: bool, unused_days: int, out: str, data_dir: str | None, config: str | None) -> None:
        """The monthly access review: operator keys, roles, last use, JIT grants, trader keys, SoD."""
        from edge.access import access_review

        rep = _run(data_dir, config, lambda pool, env: access_review(
            pool, env.cfg.security.admin_keys, production=env.cfg.production, unused_days=unused_days))
        path = _write(out, f"access-review-{_stamp()}.json", rep, "access-review-latest.json")
        ok = bool(rep["sod"]["ok"])
        if as_json:
            click.echo(json.dumps(rep, sort_keys=True))
        else:
            for o in rep["operators"]:
                click.echo(f"operator key={o['key_id']} name={o['name']} source={'+'.join(o['sources'])} "
                           f"roles={','.join(o['effective_roles']) or '-'} revoked={str(o['revoked']).lower()} "
                           f"last_use={o['last_use'] or '-'}")
            j = rep["jit_grants"]
            click.echo(f"jit_active={len(j['active'])} jit_expired={len(j['expired'])} jit_revoked={len(j['revoked'])}")
            t = rep["trader_keys"]
            click.echo(f"trader_keys_active={t['active']} by_scope={json.dumps(t['by_scope'], sort_keys=True)} "
                       f"unused_over_{t['unused_days']}d={len(t['unused'])}")
            for v in rep["sod"]["violations"]:
                click.echo(f"violation key={v['key_id'] or '-'} roles={','.join(v['roles']) or '-'} "
                           f"rule={v['rule']} detail={v['detail']}")
            click.echo(f"rbac_sod_ok={'true' if ok else 'false'}")
            click.echo(f"evidence={path}")
            click.echo(f"access_review_ok={'true' if ok else 'false'}")
        raise SystemExit(0 if ok else 1)
