"""Seed RUNBOOK §3 incident playbooks in the app: each shows its live signals and offers its
immediate actions as the matching §6 controls (the same confirmation path as everywhere else)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cockpit.model import RECON_LEVELS, Model, TileSpec, counter_rate, gauge, throttle_text
from cockpit.sources import Snapshot, SourceState

__all__ = ["PLAYBOOKS", "Playbook", "PlaybookAction", "lag_throttle_details", "most_lagged"]


@dataclass(frozen=True)
class PlaybookAction:
    label: str
    control: str | None  # ControlSpec id, or None for a manual step (no control exists)
    option: str | None = None


@dataclass(frozen=True)
class Playbook:
    id: str
    title: str
    severity: str
    signals: tuple[TileSpec, ...]
    actions: tuple[PlaybookAction, ...]
    notes: str = ""
    # Per-symbol live lines under the signals: (text, level "ok" / "warn" / "crit" / "none").
    details: Callable[[Model], list[tuple[str, str]]] | None = None
    # The default symbol of its controls (else the markets screen's selected row).
    target: Callable[[Model], str | None] | None = None


def _kafka_health(snap: Snapshot) -> float | None:
    return None if snap.state("kafka") is SourceState.DISCONNECTED else 1.0


def _dash(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def lag_throttle_details(model: Model) -> list[tuple[str, str]]:
    """§3.2: the affected symbols (lagging, or throttled by either layer) with their lag, reconciliation
    level and throttle: enforced orders/s and layer, and refusals per second."""
    rows = model.rows()
    if model.snapshot is None or not rows:
        return [("symbols: -", "none")]
    out: list[tuple[str, str]] = []
    for r in rows:
        lagging = (r.recon_level or 0) >= 1 or (r.settle_lag_seq or 0) > 0
        if not lagging and r.throttle_rate is None:
            continue
        lvl = None if r.recon_level is None else RECON_LEVELS.get(int(r.recon_level), _dash(r.recon_level))
        txt = (f"{r.symbol:<10} lag {_dash(r.settle_lag_seq)} seq / {_dash(r.settle_lag_ms)} ms  level {lvl or '-'}"
               f"  throttle {throttle_text(r.throttle_rate, r.throttle_layer, r.throttle_others)}"
               f"  drops {_dash(r.throttle_drops, '{:.1f}')}/s")
        sev = "crit" if (r.recon_level or 0) >= 2 else "warn" if lagging or r.throttle_rate is not None else "ok"
        out.append((txt, sev))
    if not out:
        unknown = all(r.settle_lag_seq is None for r in rows) or all(r.throttle_layer is None for r in rows)
        out.append(("symbols: -" if unknown else "no symbol lagging or throttled", "none" if unknown else "ok"))
    return out


def most_lagged(model: Model) -> str | None:
    rows = [r for r in model.rows() if r.settle_lag_seq is not None or r.settle_lag_ms is not None]
    if not rows:
        return None
    best = max(rows, key=lambda r: (r.recon_level or 0, r.settle_lag_seq or 0, r.settle_lag_ms or 0))
    return best.symbol if (best.settle_lag_seq or 0) > 0 or (best.recon_level or 0) > 0 else None


PLAYBOOKS: tuple[Playbook, ...] = (
    Playbook("3.1", "Ledger invariant violation", "SEV1", (
        TileSpec("pb_inv_ok", "", "invariants ok (last run)", "ledger", "", gauge("ledger", "ledger_invariants_ok"),
                 0.5, 0.5, low_is_bad=True),
        TileSpec("pb_inv_viol", "", "invariant_violation_total", "ledger", "",
                 gauge("ledger", "invariant_violation_total"), 1, 1),
        TileSpec("pb_recon", "", "reconciliation level (max)", "ledger", "",
                 gauge("ledger", "ledger_reconciliation_level", agg="max"), 1, 3),
    ), (
        PlaybookAction("HALT withdrawals (mandatory)", "withdrawals", "on"),
        PlaybookAction("Affected symbol to CANCEL_ONLY", "set_mode", "CANCEL_ONLY"),
        PlaybookAction("Global scope unknown: SOFT_HALT", "set_mode", "SOFT_HALT"),
        PlaybookAction("Forensic bundle: WAL + snapshots + offsets + ledger range (spotex drill / CLI)", None),
        PlaybookAction("Release the reconciliation latch (approver, after recovery)", "latch_release"),
    )),
    Playbook("3.2", "Settlement lag spike", "SEV2 -> SEV1", (
        TileSpec("pb_lag_ms", "", "settlement lag ms (max)", "ledger", "ms",
                 gauge("ledger", "ledger_settlement_lag_ms_last", agg="max"), 1000, 5000),
        TileSpec("pb_lag_seq", "", "settlement lag seq (max)", "ledger", "",
                 gauge("ledger", "ledger_settlement_lag_seq", agg="max"), 100, 1000),
        TileSpec("pb_cons", "", "consumer lag", "ledger", "msg", gauge("ledger", "ledger_consumer_lag_messages"),
                 100, 1000),
        TileSpec("pb_dberr", "", "DB tx errors /s", "ledger", "/s",
                 counter_rate("ledger", "ledger_db_tx_errors_total"), 0.01, 1),
    ), (
        PlaybookAction("Verify Postgres health and Kafka consumer lag", None),
        PlaybookAction("Over T2: throttle new orders of the affected symbol", "set_throttle"),
        PlaybookAction("Over T3: SOFT_HALT the affected symbol", "set_mode", "SOFT_HALT"),
        PlaybookAction("Recovered: clear the throttle", "clear_throttle", "operator"),
    ), details=lag_throttle_details, target=most_lagged),
    Playbook("3.3", "Split-brain suspected", "SEV1", (
        TileSpec("pb_dup", "", "duplicate seq", "core", "", gauge("core", "core_duplicate_seq_total"), 1, 1),
        TileSpec("pb_div", "", "standby divergence", "core-standby", "",
                 gauge("core-standby", "core_standby_divergence_total"), 1, 1),
        TileSpec("pb_fence", "", "fencing rejections", "core", "",
                 gauge("core", "core_fencing_rejections_total"), 1, 1),
        TileSpec("pb_lead", "", "leaders (core + standby)", "core", "",
                 lambda s: _sum(gauge("core", "core_is_leader")(s), gauge("core-standby", "core_is_leader")(s)),
                 2, 2),
    ), (
        PlaybookAction("Affected symbol to HARD_HALT", "set_mode", "HARD_HALT"),
        PlaybookAction("Confirm one leader holds lease + fencing token (core /status)", None),
        PlaybookAction("Resume in CANCEL_ONLY first", "set_mode", "CANCEL_ONLY"),
        PlaybookAction("Then NORMAL after validation", "set_mode", "NORMAL"),
    )),
    Playbook("3.4", "WS fan-out overload", "SEV2/SEV3", (
        TileSpec("pb_ws_close", "", "ws closes /s", "edge", "/s", counter_rate("edge", "ws_close_total"), 1, 50),
        TileSpec("pb_ws_drop", "", "ws dropped frames /s", "edge", "/s",
                 counter_rate("edge", "ws_dropped_frames_total"), 1, 50),
        TileSpec("pb_ws_backlog", "", "backlog max (B)", "edge", "B", gauge("edge", "ws_backlog_bytes_max"),
                 65536, 1048576),
        TileSpec("pb_ws_over", "", "overload mode", "edge", "", gauge("edge", "ws_overload_mode")),
    ), (
        PlaybookAction("Enable conflation: config edge.ws_overload_mode = true (no §6 control)", None),
        PlaybookAction("Lower book depth default: edge.ws_overload_depth (20)", None),
    )),
    Playbook("3.5", "Kafka/Redpanda outage", "SEV2", (
        TileSpec("pb_kafka", "", "broker reachable", "kafka", "", _kafka_health, 0.5, 0.5, low_is_bad=True),
        TileSpec("pb_k_cons", "", "ledger consumer lag", "ledger", "msg",
                 gauge("ledger", "ledger_consumer_lag_messages"), 100, 1000),
    ), (
        PlaybookAction("Keep the trading core running (WAL/outbox)", None),
        PlaybookAction("Degrade WS, pause noncritical consumers", None),
    )),
    Playbook("3.6", "Postgres failover / corruption", "SEV1/SEV2", (
        TileSpec("pb_pg_err", "", "DB tx errors /s", "ledger", "/s",
                 counter_rate("ledger", "ledger_db_tx_errors_total"), 0.01, 1),
        TileSpec("pb_pg_stopped", "", "streams stopped", "ledger", "", gauge("ledger", "ledger_stream_stopped"), 1, 1),
    ), (
        PlaybookAction("Freeze withdrawals", "withdrawals", "on"),
        PlaybookAction("CANCEL_ONLY", "set_mode", "CANCEL_ONLY"),
        PlaybookAction("or SOFT_HALT", "set_mode", "SOFT_HALT"),
        PlaybookAction("Verify backups + PITR readiness", None),
    )),
)


def _sum(*vals: float | None) -> float | None:
    got = [v for v in vals if v is not None]
    return sum(got) if got else None
