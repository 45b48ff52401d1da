"""Seed RUNBOOK §3 incident playbooks in the app: each shows its live signals and offers its
immediate actions as the matching §6 controls (the same confirmation path as everywhere else)."""

from __future__ import annotations

from dataclasses import dataclass

from cockpit.model import TileSpec, counter_rate, gauge
from cockpit.sources import Snapshot, SourceState

__all__ = ["PLAYBOOKS", "Playbook", "PlaybookAction"]


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


def _kafka_health(snap: Snapshot) -> float | None:
    return None if snap.state("kafka") is SourceState.DISCONNECTED else 1.0


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
        PlaybookAction("Over T3: SOFT_HALT the affected symbol", "set_mode", "SOFT_HALT"),
    )),
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
