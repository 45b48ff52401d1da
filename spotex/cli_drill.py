"""``spotex drill NAME``: the runbook-as-code drills. Each prints key=value lines ending with its
success line and exits 0 only when every check passed."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import click

__all__ = ["register"]


def _run(name: str, data_dir: str | None, out: str | None, fn: Callable[..., Any], **kw: Any) -> None:
    from runbooks.common import drill_stack

    with drill_stack(name, data_dir, out) as d:
        result = fn(d, **kw)
        ok = asyncio.run(result) if asyncio.iscoroutine(result) else bool(result)
    sys.exit(0 if ok else 1)


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--out", default=None, help="Evidence directory (default build/runbooks/<drill>).")(f)
    f = click.option("--data-dir", default=None, help="Run against this running stack (default: start one).")(f)
    return f


def register(main: click.Group) -> None:
    @main.group("drill")
    def drill() -> None:
        """Runbook drills: each runs its scenario and checks its success criteria."""

    @drill.command("startup-guardrails")
    @_common
    def startup_guardrails(data_dir: str | None, out: str | None) -> None:
        """Seed §4.4: every production guardrail refuses start-up with one line; a safe config passes."""
        from runbooks.guardrails_drill import startup_guardrails as fn

        _run("startup-guardrails", data_dir, out, fn)

    @drill.command("audit-chain-tamper")
    @_common
    def audit_chain_tamper(data_dir: str | None, out: str | None) -> None:
        """Seed §4.6: tampering in a copy of the audit log (changed, missing, reordered) is detected."""
        from runbooks.audit_drills import audit_chain_tamper as fn

        _run("audit-chain-tamper", data_dir, out, fn)

    @drill.command("core-kill-recover")
    @_common
    @click.option("--commands", default=3000, show_default=True)
    @click.option("--rate", default=600.0, show_default=True, help="Commands per second.")
    def core_kill_recover(data_dir: str | None, out: str | None, commands: int, rate: float) -> None:
        """kill -9 the leading core under load; the recovered hash equals the pre-crash WAL hash."""
        from runbooks.core_drills import core_kill_recover as fn

        _run("core-kill-recover", data_dir, out, fn, commands=commands, rate=rate)

    @drill.command("split-brain")
    @_common
    @click.option("--commands", default=4000, show_default=True)
    @click.option("--rate", default=800.0, show_default=True)
    def split_brain(data_dir: str | None, out: str | None, commands: int, rate: float) -> None:
        """SIGSTOP the leader past its lease, SIGCONT it after the standby took over: fenced, no stale events."""
        from runbooks.core_drills import split_brain as fn

        _run("split-brain", data_dir, out, fn, commands=commands, rate=rate)

    @drill.command("ledger-kill-recover")
    @_common
    @click.option("--commands", default=3000, show_default=True)
    @click.option("--rate", default=600.0, show_default=True, help="Commands per second.")
    @click.option("--kills", default=1, show_default=True, help="Times the ledger is kill -9'd under load.")
    def ledger_kill_recover(data_dir: str | None, out: str | None, commands: int, rate: float, kills: int) -> None:
        """Seed §4.1 Ledger only: kill -9 the ledger while trades flow; no duplicate, none missing."""
        from runbooks.ledger_drills import ledger_kill_recover as fn

        _run("ledger-kill-recover", data_dir, out, fn, commands=commands, rate=rate, kills=kills)

    @drill.command("network-partition")
    @_common
    @click.option("--commands", default=2000, show_default=True)
    @click.option("--rate", default=400.0, show_default=True)
    @click.option("--fault-seconds", default=6.0, show_default=True)
    def network_partition(data_dir: str | None, out: str | None, commands: int, rate: float,
                          fault_seconds: float) -> None:
        """Seed §4.12: blackhole the path to Kafka under load; backlog grows, drains, nothing missing."""
        from runbooks.kafka_drills import network_partition as fn

        _run("network-partition", data_dir, out, fn, commands=commands, rate=rate, fault_s=fault_seconds)

    @drill.command("redpanda-broker-bounce")
    @_common
    @click.option("--commands", default=2000, show_default=True)
    @click.option("--rate", default=400.0, show_default=True)
    @click.option("--fault-seconds", default=5.0, show_default=True)
    def redpanda_broker_bounce(data_dir: str | None, out: str | None, commands: int, rate: float,
                               fault_seconds: float) -> None:
        """Seed §4.13: stop and restart the broker under load; re-export, nothing missing downstream."""
        from runbooks.kafka_drills import redpanda_broker_bounce as fn

        _run("redpanda-broker-bounce", data_dir, out, fn, commands=commands, rate=rate, fault_s=fault_seconds)

    @drill.command("game-day-anomaly")
    @_common
    def game_day_anomaly(data_dir: str | None, out: str | None) -> None:
        """Seed §4.5: forced anomaly signals -> severities, actions, signed webhook, evidence JSON."""
        from runbooks.jobs_drills import game_day_anomaly as fn

        _run("game-day-anomaly", data_dir, out, fn)

    @drill.command("lag-spike")
    @_common
    @click.option("--t2", default=150, show_default=True, help="Drill T2 (throttle), below the ledger's own T2.")
    @click.option("--t3", default=600, show_default=True, help="Drill T3 (SOFT_HALT), below the ledger's own T2.")
    @click.option("--rate", default=150.0, show_default=True, help="Commands per second while the ledger is paused.")
    def lag_spike(data_dir: str | None, out: str | None, t2: int, t3: int, rate: float) -> None:
        """Seed §4.0/§3.2: ledger paused under load -> the lag job throttles past T2, SOFT_HALTs past T3,
        audited; the ledger resumes and the job lifts it."""
        from runbooks.jobs_drills import lag_spike as fn

        _run("lag-spike", data_dir, out, fn, t2=t2, t3=t3, rate=rate)

    @drill.command("budget-failure")
    @_common
    def budget_failure(data_dir: str | None, out: str | None) -> None:
        """Seed §4.8: missing, stale and breached budgets are each diagnosed with an action."""
        from runbooks.jobs_drills import budget_failure as fn

        _run("budget-failure", data_dir, out, fn)

    @drill.command("idempotency-latch-failure")
    @_common
    @click.option("--symbol", default=None, help="The market to latch (default: the first configured).")
    @click.option("--concurrent", default=12, show_default=True, help="Identical requests sent at once.")
    def idempotency_latch_failure(data_dir: str | None, out: str | None, symbol: str | None, concurrent: int) -> None:
        """Seed §4.0: Idempotency-Key under retries, a request storm and an edge kill -9; the safety latch
        holding its mode, refusing bad releases, surviving a ledger kill -9, released by two approvers."""
        from runbooks.idem_latch_drill import idempotency_latch_failure as fn

        _run("idempotency-latch-failure", data_dir, out, fn, symbol=symbol, concurrent=concurrent)

    @drill.command("mapping-integrity-failure")
    @click.option("--out", default=None, help="Evidence directory (default build/runbooks/mapping-integrity-failure).")
    @click.option("--symbol", default=None, help="The market to drift (default: the first configured).")
    def mapping_integrity_failure(out: str | None, symbol: str | None) -> None:
        """Seed §4.0: a market's lot size drifted between the configuration and the engine: caught by
        `spotex mapping check` before deploy; deployed anyway, the edge refuses the market's new
        orders (409 MARKET_MAPPING_MISMATCH); repaired. Runs on a private stack (it rewrites its config)."""
        from runbooks.mapping_drill import run

        sys.exit(0 if run(out, symbol) else 1)

    @drill.command("load-regression")
    @_common
    @click.option("--scale", default=1.0, show_default=True, type=float,
                  help="Shrink every profile (e.g. 0.01); a scaled run checks the harness, it is not release evidence.")
    @click.option("--profiles", default=None, help="Comma-separated subset of load-smoke,load-10k,load-50k.")
    def load_regression(data_dir: str | None, out: str | None, scale: float, profiles: str | None) -> None:
        """Seed §4.3: load-smoke, load-10k, load-50k in one pass, judged by the load safety budgets
        (RUNBOOK_ALLOW_BUDGET_FAIL=true: violations recorded, not fatal)."""
        from runbooks.load_drills import load_regression as fn

        names = tuple(p.strip() for p in (profiles or "").split(",") if p.strip())
        _run("load-regression", data_dir, out, fn, scale=scale, profiles=names)

    @drill.command("exactly-once-million")
    @click.option("--out", default=None, help="Evidence directory (default build/runbooks/exactly-once-million).")
    @click.option("--trades", default=1_000_000, show_default=True)
    @click.option("--kills", default=10, show_default=True, help="kill -9 points (at least 10 for the proof).")
    @click.option("--seed", default=7, show_default=True)
    @click.option("--dup-deliveries", default=1_000, show_default=True,
                  help="Deliveries of the one trade of the concurrent-duplicate variant.")
    def exactly_once_million(out: str | None, trades: int, kills: int, seed: int, dup_deliveries: int) -> None:
        """N trades through the real ledger consumer, kill -9'd at random points with forced redelivery."""
        from runbooks.ledger_drills import exactly_once_million as fn

        sys.exit(0 if fn(out, trades=trades, kills=kills, seed=seed, dup_deliveries=dup_deliveries) else 1)

    @drill.command("ws-drop-spike")
    @_common
    @click.option("--commands", default=4000, show_default=True)
    @click.option("--rate", default=800.0, show_default=True)
    def ws_drop_spike(data_dir: str | None, out: str | None, commands: int, rate: float) -> None:
        """Seed §3.4: a slow WS consumer is closed 4001 SLOW_CONSUMER; trades intact; overload conflates."""
        from runbooks.ws_drills import ws_drop_spike as fn

        _run("ws-drop-spike", data_dir, out, fn, commands=commands, rate=rate)

    @drill.command("ws-resume-gap-spike")
    @_common
    @click.option("--commands", default=3000, show_default=True)
    @click.option("--rate", default=800.0, show_default=True)
    def ws_resume_gap_spike(data_dir: str | None, out: str | None, commands: int, rate: float) -> None:
        """Seed §4.2: RESUME past the buffer gets Missed(HISTORY_GAP)+Snapshot and counts ws_resume_gaps."""
        from runbooks.ws_drills import ws_resume_gap_spike as fn

        _run("ws-resume-gap-spike", data_dir, out, fn, commands=commands, rate=rate)

    @drill.command("dr-rehearsal")
    @click.option("--out", default="build/dr", show_default=True, help="Evidence directory (dr-report.json).")
    @click.option("--data-dir", default=None, help="Run against this running stack (default: start one).")
    @click.option("--commands", default=600, show_default=True, help="Simulator commands traded before the backup.")
    @click.option("--rate", default=300.0, show_default=True, help="Commands per second.")
    @click.option("--keep-restore", is_flag=True, help="Keep the restored copy (its path is in the report).")
    def dr_rehearsal(data_dir: str | None, out: str, commands: int, rate: float, keep_restore: bool) -> None:
        """Seed §8: back up core (snapshot + WAL) and PostgreSQL, restore both elsewhere, replay, compare the
        state hash with the source's, run the ledger invariants; timings against the [dr] RTO/RPO targets."""
        from runbooks.dr_drills import dr_rehearsal as fn

        _run("dr-rehearsal", data_dir, out, fn, commands=commands, rate=rate, keep_restore=keep_restore)
