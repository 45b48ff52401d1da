"""``spotex ledger ...``: the book of record for operators at a terminal (no edge needed).

These verbs talk to PostgreSQL and NATS directly with the stack's endpoints; whoever can run them
has the database's credentials, so every change they make is audited with the actor, reason and
ticket given. Exit codes: 0 ok, 1 a check failed or a request was refused, 2 bad usage.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

__all__ = ["register"]

T = TypeVar("T")


def _endpoints(data_dir: str | None, config: str | None) -> tuple[Any, Any]:
    from spotex.cli import _load
    from spotex.supervisor import resolve_endpoints

    env = _load(data_dir, config)
    return env.cfg, resolve_endpoints(env.cfg, env.data)


async def _with(dsn: str, nats_url: str | None, fn: Callable[[Any, Any], Awaitable[T]]) -> T:
    import asyncpg

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, timeout=10)
    nc = None
    try:
        js = None
        if nats_url:
            import nats

            try:
                nc = await nats.connect(nats_url, connect_timeout=3, max_reconnect_attempts=1, allow_reconnect=False)
                js = nc.jetstream()
            except Exception:
                nc = js = None
        return await fn(pool, js)
    finally:
        if nc is not None:
            await nc.close()
        await pool.close()


def _run(data_dir: str | None, config: str | None, fn: Callable[[Any, Any, Any], Awaitable[T]], *,
         nats: bool = False) -> T:
    from spotex.cli import fail

    cfg, ep = _endpoints(data_dir, config)
    try:
        return asyncio.run(_with(ep.pg_dsn, ep.nats_url if nats else None, lambda p, js: fn(cfg, p, js)))
    except OSError as exc:
        fail(f"cannot reach the ledger database: {exc}")


def _out(data: Any, as_json: bool = True) -> None:
    click.echo(json.dumps(data, sort_keys=True, default=str, indent=None if as_json else 2))


def register(main: click.Group) -> None:
    from spotex.cli import stack_options

    @main.group("ledger")
    def ledger_group() -> None:
        """The ledger: status, invariants, balances rebuild, safety latch, corrections."""

    @ledger_group.command("status")
    @stack_options
    @click.option("--json", "as_json", is_flag=True)
    def status(data_dir: str | None, config: str | None, as_json: bool) -> None:
        """Settlement per stream (engine seq, ledger seq, lag), latches, checkpoints, open alerts."""
        from ledger.reconcile import lag_report, latch_state

        async def go(cfg: Any, pool: Any, js: Any) -> dict[str, Any]:
            streams = await lag_report(pool, js, cfg.nats.evt_stream)
            async with pool.acquire() as c:
                counts = {
                    "journal_transactions": await c.fetchval("SELECT count(*) FROM ledger_journal"),
                    "postings": await c.fetchval("SELECT count(*) FROM ledger_postings"),
                    "trades": await c.fetchval("SELECT count(*) FROM ledger_trades"),
                    "accounts": await c.fetchval("SELECT count(*) FROM ledger_accounts"),
                }
                ck = {r["status"]: r["n"] for r in await c.fetch(
                    "SELECT status, count(*) AS n FROM ledger_engine_checkpoints GROUP BY 1")}
                last_ck = await c.fetchrow("SELECT sys_seq, status FROM ledger_engine_checkpoints "
                                           "WHERE status <> 'pending' ORDER BY sys_seq DESC LIMIT 1")
                inv = await c.fetchrow("SELECT id, scope, ok, started_at FROM ledger_invariant_runs "
                                       "ORDER BY id DESC LIMIT 1")
                alerts = await c.fetchval("SELECT count(*) FROM ledger_alerts WHERE resolved_at IS NULL")
            return {"engine_reachable": js is not None, "streams": streams, "latches": await latch_state(pool),
                    "counts": counts, "engine_checkpoints": ck,
                    "last_checkpoint": dict(last_ck) if last_ck else None,
                    "last_invariants": dict(inv) if inv else None, "open_alerts": alerts}

        report = _run(data_dir, config, go, nats=True)
        if as_json:
            _out(report)
            return
        click.echo(f"ledger: {report['counts']['trades']} trades, {report['counts']['journal_transactions']} "
                   f"journal transactions, {report['open_alerts']} open alerts"
                   + ("" if report["engine_reachable"] else " (engine not reachable: no lag)"))
        for s, r in sorted(report["streams"].items()):
            lag = r.get("lag", "-")
            click.echo(f"  {s:<12} engine {r.get('engine_seq', '-'):>10} ledger {r['ledger_seq']:>10} lag {lag:>8} "
                       f"{r['state']}{' (' + r['stop_reason'] + ')' if r.get('stop_reason') else ''}")
        for s, latch in sorted(report["latches"].items()):
            click.echo(f"  latch {s}: {'ENGAGED ' + latch['mode'] if latch['engaged'] else 'released'} "
                       f"({latch['cause']}: {latch['reason']})")
        click.echo(f"  checkpoints: {report['engine_checkpoints']}  last invariants: {report['last_invariants']}")

    @ledger_group.command("invariants")
    @stack_options
    @click.option("--full", is_flag=True, help="Every transaction and the materialized balances too.")
    @click.option("--json", "as_json", is_flag=True)
    def invariants(data_dir: str | None, config: str | None, full: bool, as_json: bool) -> None:
        """Run the invariant checks now; exit 1 on any violation (which also alerts and responds)."""
        from ledger.invariants import run_invariants

        async def go(cfg: Any, pool: Any, js: Any) -> Any:
            return await run_invariants(pool, full=full)

        rep = _run(data_dir, config, go)
        if as_json:
            _out(rep.to_dict())
        else:
            click.echo(f"ok={'true' if rep.ok else 'false'} scope={rep.scope} "
                       + " ".join(f"{k}={'ok' if v['ok'] else v['count']}" for k, v in rep.checks.items()))
        sys.exit(0 if rep.ok else 1)

    @ledger_group.command("rebuild-balances")
    @stack_options
    @click.option("--dry-run", is_flag=True, help="Only report the differences.")
    @click.option("--actor", default="operator", show_default=True)
    @click.option("--reason", default=None, help="Required when differences are written.")
    @click.option("--ticket", default=None, help="Required when differences are written.")
    def rebuild(data_dir: str | None, config: str | None, dry_run: bool, actor: str, reason: str | None,
                ticket: str | None) -> None:
        """Recompute the materialized balances from the postings; report (and fix) any difference.

        Exit 0 when none differed, 1 when some did (written unless --dry-run)."""
        from ledger.audit import AuditError
        from ledger.invariants import rebuild_balances
        from spotex.cli import fail

        async def go(cfg: Any, pool: Any, js: Any) -> dict[str, Any]:
            res = await rebuild_balances(pool, write=False)
            if res["differences"] and not dry_run:
                res = await rebuild_balances(pool, write=True, actor=actor, reason=reason, ticket=ticket)
            return res

        try:
            res = _run(data_dir, config, go)
        except AuditError as exc:
            fail(f"not rebuilt: {exc} (pass --reason and --ticket)")
        for d in res["differences"]:
            click.echo(f"difference account={d['account_id']} asset={d['asset']} bucket={d['bucket']} "
                       f"postings={d['postings_sum']} materialized={d['materialized']}")
        click.echo(f"accounts={res['accounts']} differences={len(res['differences'])} "
                   f"written={'true' if res['written'] else 'false'}")
        sys.exit(1 if res["differences"] else 0)

    @ledger_group.command("alerts")
    @stack_options
    @click.option("--all", "show_all", is_flag=True, help="Resolved ones too.")
    def alerts(data_dir: str | None, config: str | None, show_all: bool) -> None:
        """Alerts (invariant violations, gaps, fencing refusals) with their automatic response."""

        async def go(cfg: Any, pool: Any, js: Any) -> list[dict[str, Any]]:
            async with pool.acquire() as c:
                rows = await c.fetch("SELECT * FROM ledger_alerts WHERE $1 OR resolved_at IS NULL ORDER BY id",
                                     show_all)
            return [dict(r) for r in rows]

        for a in _run(data_dir, config, go):
            _out(a)

    @ledger_group.command("resume")
    @stack_options
    @click.argument("stream")
    @click.option("--actor", required=True)
    @click.option("--reason", required=True)
    @click.option("--ticket", required=True)
    def resume(data_dir: str | None, config: str | None, stream: str, actor: str, reason: str, ticket: str) -> None:
        """Let a stopped stream (gap, fencing refusal, unbalanced event) settle again (audited)."""
        from ledger.settlement import resume_stream

        async def go(cfg: Any, pool: Any, js: Any) -> bool:
            return await resume_stream(pool, stream, actor, reason, ticket)

        ok = _run(data_dir, config, go)
        click.echo(f"resumed={'true' if ok else 'false'} stream={stream}")
        sys.exit(0 if ok else 1)

    @ledger_group.group("latch")
    def latch_group() -> None:
        """The reconciliation safety latch per symbol."""

    @latch_group.command("list")
    @stack_options
    def latch_list(data_dir: str | None, config: str | None) -> None:
        from ledger.reconcile import latch_state

        async def go(cfg: Any, pool: Any, js: Any) -> dict[str, Any]:
            return await latch_state(pool)

        _out(_run(data_dir, config, go))

    @latch_group.command("release")
    @stack_options
    @click.argument("symbol")
    @click.option("--reason", required=True, help="Approval reason.")
    @click.option("--ticket", required=True)
    @click.option("--approver", "approvers", multiple=True, required=True,
                  help="Approving operator; give it twice (two people) where a second approver is required.")
    def latch_release(data_dir: str | None, config: str | None, symbol: str, reason: str, ticket: str,
                      approvers: tuple[str, ...]) -> None:
        """Release SYMBOL's latch (lag must be 0 and invariants pass); sets it back to NORMAL."""
        from ledger.reconcile import release_latch, second_approver_required

        async def go(cfg: Any, pool: Any, js: Any) -> Any:
            if js is None:
                from ledger.reconcile import LatchReleaseResult

                return LatchReleaseResult(False, "ENGINE_UNAVAILABLE", 503, symbol, "NATS not reachable")
            return await release_latch(pool, symbol, list(approvers), reason, ticket, js=js,
                                       evt_stream=cfg.nats.evt_stream,
                                       requires_second_approver=second_approver_required(cfg))

        res = _run(data_dir, config, go, nats=True)
        _out(res.to_dict())
        sys.exit(0 if res.ok else 1)

    @ledger_group.group("correction")
    def correction_group() -> None:
        """Corrections: request, two approvals by distinct operators, applied as new entries."""

    def _corr(fn: Callable[[Any], Awaitable[Any]], data_dir: str | None, config: str | None) -> None:
        from ledger.corrections import CorrectionError

        async def go(cfg: Any, pool: Any, js: Any) -> Any:
            return await fn(pool)

        try:
            res = _run(data_dir, config, go)
        except CorrectionError as exc:
            click.echo(json.dumps({"ok": False, "code": exc.code, "detail": exc.detail}))
            sys.exit(1)
        if isinstance(res, list):
            for r in res:
                _out(r.to_dict())
        else:
            _out({"ok": True, **res.to_dict()})

    @correction_group.command("request")
    @stack_options
    @click.option("--requested-by", required=True)
    @click.option("--reason", required=True)
    @click.option("--ticket", required=True)
    @click.option("--posting", "postings", multiple=True, required=True,
                  help="ACCOUNT:ASSET:BUCKET:DELTA, e.g. 1001:USDT:available:250 (repeat; must balance per asset)")
    def corr_request(data_dir: str | None, config: str | None, requested_by: str, reason: str, ticket: str,
                     postings: tuple[str, ...]) -> None:
        from ledger.corrections import request_correction
        from spotex.cli import fail

        items = []
        for p in postings:
            parts = p.split(":")
            if len(parts) != 4:
                fail(f"--posting {p!r}: expected ACCOUNT:ASSET:BUCKET:DELTA", 2)
            items.append({"account_id": parts[0], "asset": parts[1], "bucket": parts[2], "delta": parts[3]})
        _corr(lambda pool: request_correction(pool, requested_by, items, reason, ticket), data_dir, config)

    @correction_group.command("approve")
    @stack_options
    @click.argument("request_id", type=int)
    @click.option("--approver", required=True)
    @click.option("--reason", default=None)
    @click.option("--ticket", default=None)
    def corr_approve(data_dir: str | None, config: str | None, request_id: int, approver: str, reason: str | None,
                     ticket: str | None) -> None:
        from ledger.corrections import approve_correction

        _corr(lambda pool: approve_correction(pool, request_id, approver, reason=reason, ticket=ticket), data_dir,
              config)

    @correction_group.command("reject")
    @stack_options
    @click.argument("request_id", type=int)
    @click.option("--actor", required=True)
    @click.option("--reason", required=True)
    @click.option("--ticket", required=True)
    def corr_reject(data_dir: str | None, config: str | None, request_id: int, actor: str, reason: str,
                    ticket: str) -> None:
        from ledger.corrections import reject_correction

        _corr(lambda pool: reject_correction(pool, request_id, actor, reason, ticket), data_dir, config)

    @correction_group.command("list")
    @stack_options
    @click.option("--status", default=None, type=click.Choice(["pending", "applied", "rejected"]))
    def corr_list(data_dir: str | None, config: str | None, status: str | None) -> None:
        from ledger.corrections import list_corrections

        _corr(lambda pool: list_corrections(pool, status), data_dir, config)
