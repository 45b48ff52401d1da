"""``spotex export verify``, ``spotex mapping check``, ``spotex faultproxy``, ``spotex jobs list|run``.

Exit codes: 0 ok, 1 a check found a problem (missing events, a violation), 2 bad usage.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

__all__ = ["register"]


def _env(data_dir: str | None, config: str | None) -> tuple[Any, Any, Any]:
    from spotex.cli import _load
    from spotex.supervisor import resolve_endpoints

    env = _load(data_dir, config)
    return env.cfg, env.data, resolve_endpoints(env.cfg, env.data)


def register(main: click.Group) -> None:
    from spotex.cli import stack_options

    @main.group("export")
    def export() -> None:
        """The Kafka export (docs/kafka.md)."""

    @export.command("verify")
    @stack_options
    @click.option("--bootstrap", default=None, help="Kafka bootstrap (default: the stack's broker).")
    @click.option("--prefix", default=None, help="Topic prefix (default: [kafka] topic_prefix).")
    @click.option("--durable", default=None,
                  help="The exporter's consumer: events after its ack floor count as in flight, not missing "
                       "(default: [kafka] exporter_durable).")
    @click.option("--json", "as_json", is_flag=True)
    def export_verify(data_dir: str | None, config: str | None, bootstrap: str | None, prefix: str | None,
                      durable: str | None, as_json: bool) -> None:
        """Read the topics back: every EVT event id present, duplicates counted."""
        from jobs.verify_export import verify

        cfg, data, ep = _env(data_dir, config)

        async def exporter_state() -> dict[str, Any] | None:
            """The stack's exporter /status, None when it does not answer (or reading another prefix)."""
            import httpx

            if prefix not in (None, cfg.kafka.topic_prefix) or bootstrap not in (None, ep.kafka_bootstrap):
                return None
            try:
                async with httpx.AsyncClient(timeout=3) as c:
                    r = await c.get(ep.probe_url("exporter") + "/status")
                return dict(r.json()) if r.status_code == 200 else None
            except (KeyError, httpx.HTTPError, ValueError):
                return None

        async def go() -> dict[str, Any]:
            before = await exporter_state()
            rep = await verify(ep.nats_url, bootstrap or ep.kafka_bootstrap, prefix or cfg.kafka.topic_prefix,
                               cfg.nats.evt_stream, durable=durable or cfg.kafka.exporter_durable)
            after = await exporter_state()
            # Settled: nothing left to export and no loss check or re-export pending, before and after
            # the read-back. Missing events seen while it is not settled may still be on their way.
            settled: bool | None = None
            if before is not None and after is not None:
                settled = before.get("rewinds") == after.get("rewinds") and all(
                    int(st.get("backlog_messages", 1)) == 0 and not st.get("rewind_pending")
                    and not st.get("loss_check_due") for st in (before, after))
            rep["exporter_settled"] = settled
            keys = ("backlog_messages", "rewinds", "rewind_pending", "loss_check_due", "broker_reachable")
            rep["exporter"] = {k: after.get(k) for k in keys} if after is not None else None
            return rep

        rep = asyncio.run(go())
        ev = data.root / "evidence" / "jobs"
        ev.mkdir(parents=True, exist_ok=True)
        (ev / "export-verify-latest.json").write_text(json.dumps(rep, indent=2, sort_keys=True))
        if as_json:
            click.echo(json.dumps(rep, indent=2, sort_keys=True))
        else:
            for k in ("evt_events", "kafka_records", "missing", "in_flight", "duplicates", "unexpected"):
                click.echo(f"export_{k}={rep[k]}")
            settled = rep["exporter_settled"]
            click.echo(f"export_exporter_settled={'unknown' if settled is None else str(settled).lower()}")
            if rep["missing"] and settled is False:
                click.echo("spotex: the exporter was still exporting (backlog or re-export); run verify again once "
                           "its backlog is 0", err=True)
            click.echo(f"export_verify_ok={'true' if rep['ok'] else 'false'}")
        sys.exit(0 if rep["ok"] else 1)

    @main.group("mapping")
    def mapping() -> None:
        """One definition of every market across the engine, the edge, the ledger and the config."""

    @mapping.command("check")
    @stack_options
    @click.option("--json", "as_json", is_flag=True)
    def mapping_check(data_dir: str | None, config: str | None, as_json: bool) -> None:
        """Compare the configuration's markets (tick, lot, scales, fees) with the engine's definitions,
        the running edge's and the ledger's (a config about to be deployed: pass it with --config)."""
        from jobs.mapping import mapping_report

        cfg, data, ep = _env(data_dir, config)
        try:
            edge_url: str | None = ep.probe_url("edge")
        except KeyError:
            edge_url = None
        rep = asyncio.run(mapping_report(cfg, nats_url=ep.nats_url, pg_dsn=ep.pg_dsn, edge_url=edge_url))
        ev = data.root / "evidence" / "mapping"
        ev.mkdir(parents=True, exist_ok=True)
        (ev / "mapping-check-latest.json").write_text(json.dumps(rep, indent=2, sort_keys=True, default=str))
        if as_json:
            click.echo(json.dumps(rep, indent=2, sort_keys=True, default=str))
        else:
            for m in rep["mismatches"]:
                click.echo(f"mapping_mismatch={m['where']}:{m['symbol']}:{m['field']} "
                           f"config={m['config']!r} {m['where']}={m['other']!r}")
            for k, v in sorted(rep["sources"].items()):
                if v != "ok":
                    click.echo(f"spotex: {k} {v}", err=True)
            click.echo(f"mapping_markets={len(rep['markets'])} mapping_pending={len(rep['pending'])}")
            click.echo(f"recommended_action={rep['recommended_action']}")
            click.echo(f"mapping_integrity_ok={'true' if rep['mapping_integrity_ok'] else 'false'}")
        sys.exit(0 if rep["mapping_integrity_ok"] else 1)

    @main.group("faultproxy", invoke_without_command=False)
    def faultproxy() -> None:
        """A TCP fault proxy: latency, blackhole (partition), refuse, reset, bandwidth limit."""

    @faultproxy.command("run")
    @click.option("--listen", default="127.0.0.1:0", show_default=True, help="host:port to accept on.")
    @click.option("--target", required=True, help="host:port to forward to.")
    @click.option("--control-port", default=0, show_default=True, help="JSON-lines control port (0: any free).")
    @click.option("--latency-ms", default=0.0)
    @click.option("--bandwidth-bps", default=0)
    def fp_run(listen: str, target: str, control_port: int, latency_ms: float, bandwidth_bps: int) -> None:
        """Run a proxy in the foreground; prints its listen and control ports."""
        from jobs.faultproxy import FaultProxy

        lh, lp = listen.rsplit(":", 1)
        th, tp = target.rsplit(":", 1)

        async def go() -> None:
            p = await FaultProxy(lh, int(lp), th, int(tp), control_port=control_port).start()
            p.set(latency_ms=latency_ms, bandwidth_bps=bandwidth_bps)
            click.echo(f"faultproxy_listen={p.address}", err=False)
            click.echo(f"faultproxy_control_port={p.control_port}")
            sys.stdout.flush()
            try:
                await asyncio.Event().wait()
            finally:
                await p.stop()

        try:
            asyncio.run(go())
        except KeyboardInterrupt:
            pass

    @faultproxy.command("ctl")
    @click.option("--control-port", required=True, type=int)
    @click.argument("op", type=click.Choice(["status", "partition", "heal", "reset", "set"]))
    @click.option("--mode", type=click.Choice(["pass", "blackhole", "refuse"]), default=None)
    @click.option("--latency-ms", type=float, default=None)
    @click.option("--bandwidth-bps", type=int, default=None)
    def fp_ctl(control_port: int, op: str, mode: str | None, latency_ms: float | None,
               bandwidth_bps: int | None) -> None:
        """Change a running proxy: ``partition``, ``heal``, ``reset``, ``set --latency-ms 200``..."""
        from jobs.faultproxy import control

        req: dict[str, Any] = {"op": op}
        for k, v in (("mode", mode), ("latency_ms", latency_ms), ("bandwidth_bps", bandwidth_bps)):
            if v is not None:
                req[k] = v
        click.echo(json.dumps(asyncio.run(control(control_port, req)), sort_keys=True))

    @main.group("jobs")
    def jobs() -> None:
        """Scheduled checks (the ``jobs`` service) and their history."""

    @jobs.command("list")
    @stack_options
    @click.option("--json", "as_json", is_flag=True)
    def jobs_list(data_dir: str | None, config: str | None, as_json: bool) -> None:
        """The jobs, their crons and their last run (from job_runs when PostgreSQL answers)."""
        from jobs.scheduler import job_table

        cfg, _, ep = _env(data_dir, config)
        rows = job_table(cfg)

        async def last() -> dict[str, Any]:
            import asyncpg

            try:
                conn = await asyncpg.connect(ep.pg_dsn, timeout=3)
            except Exception:
                return {}
            try:
                recs = await conn.fetch(
                    "SELECT DISTINCT ON (job) job, id, outcome, started_at, finished_at FROM job_runs "
                    "ORDER BY job, started_at DESC")
                return {r["job"]: dict(r) for r in recs}
            except Exception:
                return {}
            finally:
                await conn.close()

        lasts = asyncio.run(last())
        out: list[dict[str, Any]] = []
        for r in rows:
            lr = lasts.get(r["job"])
            out.append({**r, "last_outcome": lr["outcome"] if lr else None,
                        "last_started_at": str(lr["started_at"]) if lr else None})
        if as_json:
            click.echo(json.dumps(out, indent=2))
        else:
            for r in out:
                seen = f"{r['last_outcome'] or '-'} {r['last_started_at'] or ''}"
                click.echo(f"{r['job']:<16} {r['cron']:<14} last={seen}")

    @jobs.command("run")
    @stack_options
    @click.argument("name")
    @click.option("--budgets", default=None, help="Budgets file for safety_budget / freshness.")
    @click.option("--inject", multiple=True, help="signal=value forced into the anomaly detector (game day).")
    @click.option("--evidence-dir", default=None, help="Where evidence JSON goes (default DATA_DIR/evidence/jobs).")
    @click.option("--webhook-url", default=None)
    def jobs_run(data_dir: str | None, config: str | None, name: str, budgets: str | None, inject: tuple[str, ...],
                 evidence_dir: str | None, webhook_url: str | None) -> None:
        """Run one job now; prints its outcome and output JSON, stores the run."""
        from pathlib import Path

        from jobs.checks import CHECKS
        from jobs.scheduler import close_context, make_context, open_context, run_job
        from spotex.cli import fail

        if name not in CHECKS:
            fail(f"unknown job {name!r}; one of {', '.join(CHECKS)}", 2)
        cfg, data, ep = _env(data_dir, config)
        forced = {}
        for item in inject:
            k, _, v = item.partition("=")
            forced[k] = float(v)
        try:
            edge_metrics: str | None = ep.probe_url("edge") + "/metrics"
        except KeyError:
            edge_metrics = None

        async def go() -> dict[str, Any]:
            ctx = make_context(cfg, data.root, pg_dsn=ep.pg_dsn, nats_url=ep.nats_url, edge_metrics_url=edge_metrics,
                               evidence_dir=Path(evidence_dir) if evidence_dir else None, budgets_file=budgets,
                               inject=forced)
            if webhook_url:
                ctx.webhook_url = webhook_url
            closers = await open_context(ctx)
            try:
                return await run_job(ctx, name, trigger="manual")
            finally:
                await close_context(closers)

        res = asyncio.run(go())
        click.echo(json.dumps(res, indent=2, sort_keys=True, default=str))
        click.echo(f"job_outcome={res['outcome']}")
        sys.exit(0 if res["outcome"] in ("ok", "not_available") else 1)
