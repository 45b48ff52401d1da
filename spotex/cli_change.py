"""``spotex change propose|approve|apply|list|show`` (seed §4.0 change workflow; docs/changes.md) and
``spotex drill change-workflow`` (seed §4.7).

Each command prints one ``change_*=`` summary line (``--json``: the proposal as JSON) and exits 0;
a refusal prints ``spotex: CODE: detail`` on stderr and exits 1 (the refusal is in the change audit
chain). Ops on the command line: ``--op mode:BTC-USDT=CANCEL_ONLY``, ``--op throttle:BTC-USDT=5[/10]``,
``--op throttle-clear:BTC-USDT``, ``--op withdrawals-halt:on|off`` (repeatable, applied in order).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

__all__ = ["register"]

T = TypeVar("T")


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


async def _with(env: Any, fn: Callable[..., Awaitable[T]], *, nats: bool = False) -> T:
    import asyncpg

    from spotex.supervisor import resolve_endpoints

    ep = resolve_endpoints(env.cfg, env.data)
    pool = await asyncpg.create_pool(ep.pg_dsn, min_size=1, max_size=4, timeout=10)
    nc = None
    try:
        if nats:
            import nats as nats_mod

            from ledger.changes import Exchange

            nc = await nats_mod.connect(ep.nats_url, connect_timeout=5, max_reconnect_attempts=2)
            return await fn(pool, Exchange(nc, env.cfg.core.query_subject))
        return await fn(pool)
    finally:
        if nc is not None:
            await nc.close()
        await pool.close()


def _line(p: Any) -> str:
    apps = ",".join(p.approvers()) or "-"
    out = (f"change_id={p.id} change_state={p.state} change_hash={p.hash} change_ops={len(p.ops)} "
           f"change_proposer={p.proposer} change_approvals={len(p.approvals)} change_approvers={apps}")
    if p.result is not None:
        out += f" change_ok={'true' if p.result.get('ok') else 'false'}"
    return out


def register(main: click.Group) -> None:
    from ledger.changes import ChangeError
    from spotex.cli import _load, fail, stack_options

    def run(data_dir: str | None, config: str | None, fn: Callable[..., Awaitable[T]], *, nats: bool = False) -> T:
        env = _load(data_dir, config)
        try:
            return asyncio.run(_with(env, fn, nats=nats))
        except ChangeError as exc:
            fail(f"{exc.code}: {exc.detail}")
        except OSError as exc:
            fail(f"change: cannot reach the stack ({type(exc).__name__}: {exc})")

    def show_p(p: Any, as_json: bool) -> None:
        click.echo(json.dumps(p.to_dict(), sort_keys=True, default=str) if as_json else _line(p))

    @main.group("change")
    def change() -> None:
        """Change workflow: propose, two approvals (not the proposer), apply with verification."""

    @change.command("propose")
    @stack_options
    @click.option("--op", "ops", multiple=True, required=True,
                  help="mode:SYM=MODE | throttle:SYM=RATE[/BURST] | throttle-clear:SYM | withdrawals-halt:on|off")
    @click.option("--actor", required=True, help="The proposer (cannot approve this change).")
    @click.option("--reason", required=True)
    @click.option("--ticket", required=True)
    @click.option("--ttl-sec", default=24 * 3600, show_default=True, help="Approve and apply before this.")
    @click.option("--json", "as_json", is_flag=True)
    def propose(data_dir: str | None, config: str | None, ops: tuple[str, ...], actor: str, reason: str,
                ticket: str, ttl_sec: int, as_json: bool) -> None:
        """Propose a change (stored in PostgreSQL, audited on the change chain)."""
        from ledger import changes

        env = _load(data_dir, config)
        try:
            parsed = [changes.parse_op(o) for o in ops]
        except ChangeError as exc:
            fail(f"{exc.code}: {exc.detail}")
        symbols = [m.symbol for m in env.cfg.markets]
        p = run(data_dir, config, lambda pool: changes.propose(pool, actor, parsed, reason, ticket, ttl_s=ttl_sec,
                                                                symbols=symbols))
        show_p(p, as_json)

    @change.command("approve")
    @stack_options
    @click.argument("change_id")
    @click.option("--actor", required=True, help="The approver (not the proposer, once per change).")
    @click.option("--json", "as_json", is_flag=True)
    def approve(data_dir: str | None, config: str | None, change_id: str, actor: str, as_json: bool) -> None:
        """Record one approval of CHANGE_ID (two distinct approvers are needed to apply)."""
        from ledger import changes

        show_p(run(data_dir, config, lambda pool: changes.approve(pool, change_id, actor)), as_json)

    @change.command("apply")
    @stack_options
    @click.argument("change_id")
    @click.option("--actor", required=True, help="Who applies (recorded with every admin action).")
    @click.option("--skip-verification", is_flag=True,
                  help="Check only each op's effect; skip the ledger invariants and the audit-chain verify.")
    @click.option("--timeout", default=20.0, show_default=True, help="Seconds to wait for each effect to show.")
    @click.option("--json", "as_json", is_flag=True)
    def apply(data_dir: str | None, config: str | None, change_id: str, actor: str, skip_verification: bool,
              timeout: float, as_json: bool) -> None:
        """Apply an approved change, then verify it; exit 1 when refused or when verification fails."""
        from ledger import changes

        p = run(data_dir, config, lambda pool, ex: changes.apply(pool, ex, change_id, actor,
                                                                 skip_verification=skip_verification,
                                                                 verify_timeout_s=timeout), nats=True)
        show_p(p, as_json)
        if p.state != "verified":
            res = p.result or {}
            bad = [f"op {i + 1}: {r.get('error') or 'not visible'}" for i, r in enumerate(res.get("ops", []))
                   if r.get("error") or not r.get("visible")]
            bad += [k for k, v in (res.get("checks") or {}).items() if isinstance(v, dict) and not v.get("ok")]
            fail(f"CHANGE_VERIFY_FAILED: {change_id} applied but not verified ({'; '.join(bad) or 'see show'})")

    @change.command("list")
    @stack_options
    @click.option("--limit", default=20, show_default=True)
    @click.option("--json", "as_json", is_flag=True)
    def list_(data_dir: str | None, config: str | None, limit: int, as_json: bool) -> None:
        """The latest changes, newest first."""
        from ledger import changes

        ps = run(data_dir, config, lambda pool: changes.list_changes(pool, limit))
        if as_json:
            click.echo(json.dumps([p.to_dict() for p in ps], sort_keys=True, default=str))
        for p in ps if not as_json else []:
            click.echo(_line(p))

    @change.command("show")
    @stack_options
    @click.argument("change_id")
    @click.option("--json", "as_json", is_flag=True)
    def show(data_dir: str | None, config: str | None, change_id: str, as_json: bool) -> None:
        """One change: ops, approvals, state, and the apply result."""
        from ledger import changes

        p = run(data_dir, config, lambda pool: changes.get(pool, change_id))
        if as_json:
            show_p(p, True)
            return
        click.echo(_line(p))
        click.echo(f"change_reason={p.reason}")
        click.echo(f"change_ticket={p.ticket}")
        click.echo(f"change_content_ok={'true' if p.content_ok else 'false'}")
        for i, op in enumerate(p.ops, 1):
            click.echo(f"change_op_{i}={json.dumps(op, sort_keys=True)}")

    drill = main.commands.get("drill")
    if isinstance(drill, click.Group):
        @drill.command("change-workflow")
        @click.option("--out", default=None, help="Evidence directory (default build/runbooks/change-workflow).")
        @click.option("--data-dir", default=None, help="Run against this running stack (default: start one).")
        @click.option("--symbol", default=None, help="The market to change (default: the first configured).")
        @click.option("--skip-verification/--full-verification", "skip", default=None,
                      help="Apply without the invariants/audit verify (default: RUNBOOK_SKIP_VERIFICATION, "
                           "else true).")
        def change_workflow(out: str | None, data_dir: str | None, symbol: str | None, skip: bool | None) -> None:
            """Seed §4.7: proposal -> refusals -> two approvals -> apply -> verify -> revert, change chain verified."""
            from runbooks.change_drill import change_workflow as fn
            from runbooks.common import drill_stack

            env_skip = os.environ.get("RUNBOOK_SKIP_VERIFICATION")
            skip_v = skip if skip is not None else (True if env_skip is None or not env_skip.strip()
                                                    else _truthy(env_skip))
            with drill_stack("change-workflow", data_dir, out) as d:
                ok = asyncio.run(fn(d, symbol=symbol, skip_verification=skip_v))
            sys.exit(0 if ok else 1)
