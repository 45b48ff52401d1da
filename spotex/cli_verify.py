"""``spotex drill verification-factory`` (seed §4.0 shared verification bundle),
``spotex drill adversarial-reliability`` (seed §4.9) and ``spotex safety-case`` (seed §10).
docs/verification.md."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

__all__ = ["register"]

FLAGS = ("startup-guardrails", "change-workflow", "policy-signature", "policy-tamper", "network-partition",
         "redpanda-bounce", "exactly-once-runbook", "mapping-integrity-runbook", "idempotency-latch-runbook",
         "determinism", "exactly-once-million", "adversarial")


def register(main: click.Group) -> None:
    drill = main.commands.get("drill")
    if isinstance(drill, click.Group):
        _register_drills(drill)

    @main.command("safety-case")
    @click.option("--build-dir", default="build", show_default=True, help="Where the evidence is.")
    @click.option("--out", default=None, help="Output directory (default BUILD_DIR/safety-case).")
    @click.option("--max-age-hours", default=168.0, show_default=True,
                  help="Required evidence older than this is stale.")
    @click.option("--skip", "skip", multiple=True, help="Drop a required item by name (repeatable; recorded).")
    @click.option("--allow-missing", is_flag=True, help="Report missing/stale/failed evidence but exit 0.")
    def safety_case(build_dir: str, out: str | None, max_age_hours: float, skip: tuple[str, ...],
                    allow_missing: bool) -> None:
        """Seed §10: bundle the newest evidence (manifest.json with each file's sha256, age and source;
        safety-case-<commit>.tar.gz and .sha256) and gate on the required list (docs/verification.md)."""
        from spotex.safety_case import REQUIRED, build_safety_case

        names = {r.name for r in REQUIRED}
        unknown = [s for s in skip if s not in names]
        if unknown:
            raise click.UsageError(f"--skip: no required item {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        if max_age_hours <= 0:
            raise click.UsageError("--max-age-hours must be positive")
        build = Path(build_dir)  # a missing build dir is judged like an empty one: everything MISSING
        required = tuple(r for r in REQUIRED if r.name not in skip)
        m = build_safety_case(build, Path(out) if out else build / "safety-case", max_age_s=max_age_hours * 3600,
                              required=required)
        for r in m["missing"]:
            click.echo(f"safety_case_missing={r['name']} reason={r['reason']} path={r['file'] or r['path']}"
                       + (f" detail={r['detail']}" if r.get("detail") else ""))
        outdir = Path(out) if out else build / "safety-case"
        click.echo(f"safety_case_files={m['file_count']}")
        click.echo(f"safety_case_skipped={','.join(skip) or '-'}")
        click.echo(f"safety_case_manifest={outdir / 'manifest.json'}")
        click.echo(f"safety_case_bundle={outdir / m['bundle']}")
        click.echo(f"safety_case_bundle_sha256={m['bundle_sha256']}")
        click.echo(f"safety_case_ok={'true' if m['safety_case_ok'] else 'false'}")
        sys.exit(0 if m["safety_case_ok"] or allow_missing else 1)


def _register_drills(drill: click.Group) -> None:
    from spotex.cli_drill import _common, _run

    @drill.command("verification-factory")
    @click.option("--data-dir", default=None, help="Run against this running stack (default: start one).")
    @click.option("--out", default="build/verification", show_default=True, help="Where the report goes.")
    @click.option("--runbooks-out", default="build/runbooks", show_default=True,
                  help="Each selected drill's evidence goes to RUNBOOKS_OUT/<drill>.")
    @click.option("--eom-trades", default=20_000, show_default=True,
                  help="Trades of --run-exactly-once-runbook (the full million is --run-exactly-once-million).")
    @click.option("--budgets", default=None, help="Budgets file for the safety_budget check (default: the stack's).")
    @click.option("--all", "run_all", is_flag=True, help="Every drill below.")
    @click.option("--run", "runs", multiple=True, type=click.Choice(FLAGS), help="A drill to add (repeatable).")
    def verification_factory(data_dir: str | None, out: str, runbooks_out: str, eom_trades: int,
                             budgets: str | None, run_all: bool, runs: tuple[str, ...]) -> None:
        """Seed §4.0 shared verification bundle: the quick checks (audit chains, PII scan, invariants,
        safety budget, status) plus each selected drill; a report under OUT (docs/verification.md)."""
        from runbooks.common import drill_stack
        from runbooks.verification_factory import run_factory

        if eom_trades < 1:
            raise click.UsageError("--eom-trades must be at least 1")
        selected = list(FLAGS) if run_all else list(dict.fromkeys(runs))
        os.environ.pop("SPOTEX_RUNBOOK_OUT", None)  # each drill gets RUNBOOKS_OUT/<drill>
        with drill_stack("verification-factory", data_dir, out) as d:
            ok = run_factory(d.data_dir, d.out_dir, selected, data_dir is None,
                             runbooks_out=Path(runbooks_out).resolve(), eom_trades=eom_trades,
                             budgets=str(Path(budgets).resolve()) if budgets else None,
                             symbol=d.cfg.markets[0].symbol)
        sys.exit(0 if ok else 1)

    @drill.command("adversarial-reliability")
    @_common
    @click.option("--eo-trades", default=2_000, show_default=True, help="Trades of the exactly-once step.")
    @click.option("--ws-commands", default=3_000, show_default=True, help="Commands of the WS resume-gap step.")
    def adversarial_reliability(data_dir: str | None, out: str | None, eo_trades: int, ws_commands: int) -> None:
        """Seed §4.9: policy tamper, WS resume gap, hostile candle queries, snapshot tamper and exactly-once,
        one bundle (RUNBOOK_ALLOW_ADVERSARIAL_FAIL=true: a failure is recorded, exit 0)."""
        from runbooks.adversarial import adversarial_reliability as fn

        if eo_trades < 1 or ws_commands < 1:
            raise click.UsageError("--eo-trades and --ws-commands must be at least 1")
        _run("adversarial-reliability", data_dir, out, fn, eo_trades=eo_trades, ws_commands=ws_commands)
