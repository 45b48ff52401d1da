"""From a :class:`~cockpit.sources.Snapshot` to the numbers on screen: the seed §2 dashboards as
tiles (value, threshold colour, history for the sparkline) and the per-symbol rows."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cockpit.metrics import Metrics, histogram_quantile, rate
from cockpit.sources import Snapshot, SourceState

__all__ = ["AWAITING_SECOND_APPROVER", "DASHBOARDS", "RECON_LEVELS", "TILES", "Model", "SymbolRow", "TileSpec",
           "approval_note", "approval_time", "command_rate", "fmt_value", "latch_approvals", "level",
           "throttle_drop_rate", "throttle_of", "throttle_text"]

RECON_LEVELS = {0: "ok", 1: "warn", 2: "throttle T2", 3: "halt T3"}  # ledger_reconciliation_level

Value = float | None


@dataclass(frozen=True)
class TileSpec:
    key: str
    dashboard: str
    title: str
    source: str
    unit: str
    compute: Callable[[Snapshot], Value]
    warn: float | None = None
    crit: float | None = None
    # For "health" tiles the bad direction is low (1 = ok, 0 = failing).
    low_is_bad: bool = False


def _m(snap: Snapshot, source: str) -> Metrics | None:
    return snap.metrics.get(source)


def _prev(snap: Snapshot, source: str) -> tuple[Metrics | None, float]:
    p = snap.prev_metrics.get(source)
    return (p[0], p[1]) if p is not None else (None, 0.0)


def gauge(source: str, name: str, scale: float = 1.0, agg: str = "sum") -> Callable[[Snapshot], Value]:
    def f(snap: Snapshot) -> Value:
        m = _m(snap, source)
        if m is None:
            return None
        if agg == "max":
            vals = [v for _, v in m.series(name)]
            return max(vals) * scale if vals else None
        v = m.get(name)
        return None if v is None else v * scale
    return f


def counter_rate(source: str, name: str, scale: float = 1.0) -> Callable[[Snapshot], Value]:
    def f(snap: Snapshot) -> Value:
        m = _m(snap, source)
        prev, dt = _prev(snap, source)
        if m is None or prev is None:
            return None
        r = rate(m.get(name), prev.get(name), dt)
        return None if r is None else r * scale
    return f


def quantile(source: str, name: str, q: float, scale: float = 1000.0) -> Callable[[Snapshot], Value]:
    def f(snap: Snapshot) -> Value:
        m = _m(snap, source)
        if m is None:
            return None
        prev, _ = _prev(snap, source)
        v = histogram_quantile(q, m.buckets(name), prev.buckets(name) if prev is not None else None)
        return None if v is None else v * scale
    return f


def _api_error_rate(snap: Snapshot) -> Value:
    m = _m(snap, "edge")
    prev, dt = _prev(snap, "edge")
    if m is None or prev is None:
        return None
    tot = rate(m.get("edge_http_requests_total"), prev.get("edge_http_requests_total"), dt)
    err = rate(m.get("edge_http_requests_total", status="5xx"), prev.get("edge_http_requests_total", status="5xx"),
               dt)
    if tot is None:
        return None
    if tot == 0:
        return 0.0
    return 100.0 * (err or 0.0) / tot


def _kafka_up(snap: Snapshot) -> Value:
    st = snap.state("kafka")
    return None if st is SourceState.DISCONNECTED else 1.0


def _invariants(snap: Snapshot) -> Value:
    return gauge("ledger", "ledger_invariants_ok")(snap)


def _close_and_drop(snap: Snapshot) -> Value:
    a = counter_rate("edge", "ws_close_total")(snap)
    b = counter_rate("edge", "ws_dropped_frames_total")(snap)
    return None if a is None and b is None else (a or 0.0) + (b or 0.0)


TILES: tuple[TileSpec, ...] = (
    TileSpec("api_p50", "Trading API", "latency p50", "edge", "ms",
             quantile("edge", "edge_http_request_seconds", 0.5), 5, 25),
    TileSpec("api_p99", "Trading API", "latency p99", "edge", "ms",
             quantile("edge", "edge_http_request_seconds", 0.99), 25, 100),
    TileSpec("api_err", "Trading API", "error rate", "edge", "%", _api_error_rate, 1, 5),
    # How late the edge's event loop runs: every hop of a request waits that long (docs/performance.md).
    TileSpec("api_loop", "Trading API", "loop lag p99", "edge", "ms",
             quantile("edge", "event_loop_lag_seconds", 0.99), 10, 50),
    TileSpec("eng_queue", "Engine", "queue depth", "core", "", gauge("core", "core_queue_depth"), 100, 1000),
    TileSpec("eng_loop", "Engine", "loop p99", "core", "ms", quantile("core", "core_loop_seconds", 0.99), 25, 100),
    TileSpec("eng_fsync", "Engine", "WAL fsync p99", "core", "ms",
             quantile("core", "core_wal_fsync_seconds", 0.99), 5, 20),
    TileSpec("eng_cpu", "Engine", "CPU", "core", "%", counter_rate("core", "process_cpu_seconds_total", 100), 70, 90),
    TileSpec("eng_tps", "Engine", "trades/s", "core", "/s", counter_rate("core", "core_trades_total")),
    TileSpec("eng_seq", "Engine", "seq rate", "core", "/s", counter_rate("core", "core_stream_seq")),
    # The exporter's view: age of the oldest event Kafka has not acknowledged, and EVT messages not
    # yet exported (its consumer's backlog).
    TileSpec("kafka_prod", "Kafka", "produce lag", "exporter", "ms", gauge("exporter", "exporter_lag_ms"), 1000, 10000),
    TileSpec("kafka_cons", "Kafka", "consume lag", "exporter", "msg",
             gauge("exporter", "exporter_backlog_messages"), 1000, 10000),
    TileSpec("kafka_up", "Kafka", "broker health", "kafka", "", _kafka_up, 0.5, 0.5, low_is_bad=True),
    TileSpec("led_lag", "Ledger", "settlement lag", "ledger", "ms",
             gauge("ledger", "ledger_settlement_lag_ms_last", agg="max"), 1000, 5000),
    TileSpec("led_cons", "Ledger", "consumer lag", "ledger", "msg",
             gauge("ledger", "ledger_consumer_lag_messages"), 100, 1000),
    TileSpec("led_dberr", "Ledger", "DB tx errors", "ledger", "/s",
             counter_rate("ledger", "ledger_db_tx_errors_total"), 0.01, 1),
    TileSpec("led_inv", "Ledger", "invariants", "ledger", "", _invariants, 0.5, 0.5, low_is_bad=True),
    TileSpec("ws_clients", "WS", "clients", "edge", "", gauge("edge", "ws_connected_clients"), 5000, 20000),
    TileSpec("ws_out", "WS", "outbound", "edge", "/s", counter_rate("edge", "ws_frames_out_total"), 20000, 25000),
    TileSpec("ws_drop", "WS", "drops+closes", "edge", "/s", _close_and_drop, 1, 50),
    TileSpec("ws_backlog", "WS", "backlog max", "edge", "B", gauge("edge", "ws_backlog_bytes_max"), 65536, 1048576),
    TileSpec("auth_fail", "Edge auth", "auth failures", "edge", "/s", counter_rate("edge", "auth_fail_total"), 1, 10),
    TileSpec("auth_replay", "Edge auth", "replays", "edge", "/s", counter_rate("edge", "replay_detect_total"), 0.01, 1),
    TileSpec("auth_rl", "Edge auth", "rate-limit drops", "edge", "/s",
             counter_rate("edge", "ratelimit_drops_total"), 1, 50),
)
DASHBOARDS: tuple[str, ...] = tuple(dict.fromkeys(t.dashboard for t in TILES))


def level(spec: TileSpec, v: Value) -> str:
    """ok / warn / crit / none: the tile's threshold colour."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "none"
    if spec.low_is_bad:
        return "crit" if spec.crit is not None and v < spec.crit else "ok"
    if spec.crit is not None and v >= spec.crit:
        return "crit"
    if spec.warn is not None and v >= spec.warn:
        return "warn"
    return "ok"


def fmt_value(spec: TileSpec, v: Value) -> str:
    if v is None:
        return "-"
    if spec.key == "kafka_up":
        return "UP"
    if spec.key in ("led_inv", "pb_inv_ok"):
        return "OK" if v >= 0.5 else "FAIL"
    if spec.unit == "B":
        for unit in ("B", "KiB", "MiB"):
            if abs(v) < 1024 or unit == "MiB":
                return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
            v /= 1024
    if abs(v) >= 1000:
        txt = f"{v:,.0f}"
    elif abs(v) >= 100 or float(v).is_integer():
        txt = f"{v:.0f}"
    elif abs(v) >= 10:
        txt = f"{v:.1f}"
    else:
        txt = f"{v:.2f}"
    return f"{txt} {spec.unit}".rstrip()


@dataclass
class SymbolRow:
    symbol: str
    mode: str | None = None
    best_bid: str | None = None
    best_ask: str | None = None
    last: str | None = None
    tps: Value = None
    seq_rate: Value = None
    latch: str | None = None
    # Approvals of a latch release recorded and awaiting a distinct second approver (admin status
    # ``latches.<symbol>.pendingApprovals``): each {"actor", "ticket", "auditSeq", "tsMs", "reason"}.
    latch_approvals: tuple[dict[str, Any], ...] = ()
    settle_lag_seq: Value = None
    settle_lag_ms: Value = None
    recon_level: Value = None
    applied_seq: Value = None
    engine_seq: Value = None
    stopped: Value = None
    # The symbol throttle: enforced orders/s and its layer ("operator", "policy"; "none" when known to be
    # unthrottled, None when unknown), the other layers present, and refusals per second.
    throttle_rate: Value = None
    throttle_layer: str | None = None
    throttle_others: tuple[str, ...] = ()
    throttle_drops: Value = None


THROTTLE_DROPS = "edge_symbol_throttle_drops_total"
THROTTLE_RATE = "edge_symbol_throttle_orders_per_s"


def throttle_of(snap: Snapshot, symbol: str) -> tuple[Value, str | None, tuple[str, ...]]:
    """(enforced orders/s, its layer, the other layers set) of ``symbol``.

    From the admin API when it answers (its ``enforced`` is what the answering edge applies; a layer
    stored but not yet applied by that edge reads ``<layer> (not enforced)``); else from the edge's
    ``edge_symbol_throttle_orders_per_s`` gauge, which knows the rate but not the layer (``?``).
    ``(None, "none", ())`` when known to be unthrottled, ``(None, None, ())`` when unknown."""
    if snap.throttles is not None:
        ent = snap.throttles.get(symbol)
        if not isinstance(ent, dict):
            return None, "none", ()
        got = ent.get("layers")
        layers: dict[str, Any] = got if isinstance(got, dict) else {}
        enf = ent.get("enforced")
        if isinstance(enf, dict) and enf.get("ordersPerSecond") is not None:
            layer = str(enf.get("layer") or "?")
            return float(enf["ordersPerSecond"]), layer, tuple(sorted(la for la in layers if la != layer))
        stored = [(float(v["ordersPerSecond"]), int(v.get("burst") or 0), str(la)) for la, v in layers.items()
                  if isinstance(v, dict) and v.get("ordersPerSecond") is not None]
        if not stored:
            return None, "none", ()
        rate_, _, layer = min(stored)
        return rate_, f"{layer} (not enforced)", tuple(sorted(la for la in layers if la != layer))
    edge = snap.metrics.get("edge")
    if edge is None or not edge.has(THROTTLE_RATE):
        return None, None, ()
    v = edge.get(THROTTLE_RATE, symbol=symbol)
    if v is None or v <= 0:
        return None, "none", ()  # the gauge is 0 (or was never set) for an unthrottled symbol
    return v, "?", ()


def throttle_text(rate_: Value, layer: str | None, others: tuple[str, ...] = ()) -> str:
    """``50/s operator`` (``+policy`` when another layer is set too); a dash when none or unknown."""
    if rate_ is None:
        return "-"
    txt = f"{rate_:.0f}/s {layer or '?'}"
    return txt + "".join(f" +{o}" for o in others)


def throttle_drop_rate(snap: Snapshot, symbol: str) -> Value:
    """Orders refused by the symbol's throttle per second, between the last two edge scrapes. A declared
    counter without this symbol's series is a real 0 (no refusal yet); no counter at all is unknown."""
    m = _m(snap, "edge")
    prev, dt = _prev(snap, "edge")
    if m is None or prev is None:
        return None

    def total(x: Metrics) -> Value:
        v = x.get(THROTTLE_DROPS, symbol=symbol)
        return 0.0 if v is None and x.has(THROTTLE_DROPS) else v

    return rate(total(m), total(prev), dt)


def command_rate(snap: Snapshot, symbol: str) -> Value:
    """Commands the core sequenced on ``symbol`` per second (new orders, cancels, amends)."""
    m = _m(snap, "core")
    prev, dt = _prev(snap, "core")
    if m is None or prev is None:
        return None

    def total(x: Metrics) -> Value:
        v = x.get("core_commands_total", symbol=symbol)
        return 0.0 if v is None and x.has("core_commands_total") else v

    return rate(total(m), total(prev), dt)


AWAITING_SECOND_APPROVER = "AWAITING SECOND APPROVER"


def latch_approvals(latch: Any) -> tuple[dict[str, Any], ...]:
    """The pending approvals of an engaged latch row of admin status (oldest first); () when none."""
    got = latch.get("pendingApprovals") if isinstance(latch, dict) and latch.get("engaged") else None
    return tuple(a for a in got if isinstance(a, dict)) if isinstance(got, list) else ()


def approval_note(approvals: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> str:
    """What a latch's pending approvals await: ``awaiting 2nd approver`` while every ticket has one
    approver; ``2 approvals: retry release`` once a ticket has two (the release was refused after,
    e.g. LAG_NOT_ZERO); empty when none."""
    per_ticket: dict[str, set[str]] = {}
    for a in approvals:
        per_ticket.setdefault(str(a.get("ticket")), set()).add(str(a.get("actor")))
    if not per_ticket:
        return ""
    most = max(len(v) for v in per_ticket.values())
    return "awaiting 2nd approver" if most < 2 else f"{most} approvals: retry release"


def approval_time(a: dict[str, Any]) -> str:
    ts = a.get("tsMs")
    return time.strftime("%H:%M:%S UTC", time.gmtime(ts / 1000)) if isinstance(ts, int) else "-"


def _latch_of(admin: dict[str, Any] | None, ledger: Metrics | None, symbol: str) -> str | None:
    latches = admin.get("latches") if admin else None
    if isinstance(latches, dict):
        got = latches.get(symbol)
        if isinstance(got, dict):
            return f"ENGAGED {got.get('mode') or ''}".strip() if got.get("engaged") else "released"
        if got is not None:
            return str(got)
        if "error" not in latches:
            return "none"  # the ledger knows every latch: this symbol never had one
    if ledger is not None and ledger.has("ledger_latch_engaged"):
        v = ledger.get("ledger_latch_engaged", symbol=symbol)
        if v is not None:
            return "ENGAGED" if v >= 0.5 else "released"
    return None


@dataclass
class Model:
    """Holds the latest snapshot and the history of every tile (for sparklines)."""

    history_len: int = 60
    snapshot: Snapshot | None = None
    values: dict[str, Value] = field(default_factory=dict)
    history: dict[str, deque[float | None]] = field(default_factory=dict)

    def update(self, snap: Snapshot) -> None:
        self.snapshot = snap
        for spec in TILES:
            try:
                v = spec.compute(snap)
            except Exception:
                v = None  # a malformed metric never takes the cockpit down
            self.values[spec.key] = v
            self.history.setdefault(spec.key, deque(maxlen=self.history_len)).append(v)

    def symbols(self) -> list[str]:
        snap = self.snapshot
        if snap is None:
            return []
        out: list[str] = []
        for m in snap.markets or []:
            if isinstance(m, dict) and m.get("symbol"):
                out.append(str(m["symbol"]))
        if snap.admin and isinstance(snap.admin.get("modes"), dict):
            out.extend(str(s) for s in snap.admin["modes"])
        core = snap.metrics.get("core")
        if core is not None:
            out.extend(s for s in core.by_label("core_trades_total", "symbol") if not s.startswith("_"))
        return sorted(dict.fromkeys(out))

    def rows(self) -> list[SymbolRow]:
        snap = self.snapshot
        if snap is None:
            return []
        core, ledger = snap.metrics.get("core"), snap.metrics.get("ledger")
        pcore, dt = _prev(snap, "core")
        rows = []
        for sym in self.symbols():
            r = SymbolRow(sym)
            for m in snap.markets or []:
                if isinstance(m, dict) and m.get("symbol") == sym and m.get("mode"):
                    r.mode = str(m["mode"])
            if snap.admin and isinstance(snap.admin.get("modes"), dict) and sym in snap.admin["modes"]:
                r.mode = str(snap.admin["modes"][sym])  # the operator view is the fresher one
            t = snap.tickers.get(sym) or {}
            r.best_bid, r.best_ask, r.last = t.get("bestBid"), t.get("bestAsk"), t.get("last")
            if core is not None and pcore is not None:
                r.tps = rate(core.get("core_trades_total", symbol=sym), pcore.get("core_trades_total", symbol=sym), dt)
                r.seq_rate = rate(core.get("core_stream_seq", stream=sym), pcore.get("core_stream_seq", stream=sym), dt)
            r.latch = _latch_of(snap.admin, ledger, sym)
            latches = snap.admin.get("latches") if snap.admin else None
            r.latch_approvals = latch_approvals(latches.get(sym)) if isinstance(latches, dict) else ()
            if ledger is not None:
                r.settle_lag_seq = ledger.get("ledger_settlement_lag_seq", stream=sym)
                r.settle_lag_ms = ledger.get("ledger_settlement_lag_ms_last", stream=sym)
                r.recon_level = ledger.get("ledger_reconciliation_level", stream=sym)
                r.applied_seq = ledger.get("ledger_applied_seq", stream=sym)
                r.engine_seq = ledger.get("ledger_engine_seq", stream=sym)
                r.stopped = ledger.get("ledger_stream_stopped", stream=sym)
            r.throttle_rate, r.throttle_layer, r.throttle_others = throttle_of(snap, sym)
            r.throttle_drops = throttle_drop_rate(snap, sym)
            rows.append(r)
        return rows

    def invariant_checks(self) -> dict[str, Value]:
        snap = self.snapshot
        ledger = snap.metrics.get("ledger") if snap else None
        if ledger is None:
            return {}
        return dict(ledger.by_label("ledger_invariant_check_ok", "check"))

    def auth_fail_by_reason(self) -> dict[str, float]:
        snap = self.snapshot
        edge = snap.metrics.get("edge") if snap else None
        return edge.by_label("auth_fail_total", "reason") if edge is not None else {}

    def auth_fail_reasons(self) -> list[tuple[str, Value, float]] | None:
        """``auth_fail_total{reason}`` of the edge: (reason, rate /s between the last two scrapes, total),
        busiest first; None while the edge's metrics are missing (a dash, not "none")."""
        snap = self.snapshot
        edge = snap.metrics.get("edge") if snap else None
        if snap is None or edge is None:
            return None
        prev, dt = _prev(snap, "edge")
        before = prev.by_label("auth_fail_total", "reason") if prev is not None else {}
        out: list[tuple[str, Value, float]] = []
        for reason, total in edge.by_label("auth_fail_total", "reason").items():
            r = rate(total, before.get(reason, 0.0), dt) if prev is not None else None
            out.append((reason, r, total))
        return sorted(out, key=lambda x: (-(x[1] or 0.0), -x[2], x[0]))

    def latched(self) -> list[str]:
        """Streams with an engaged latch (admin status), ``_sys`` included."""
        latches = self.snapshot.admin.get("latches") if self.snapshot and self.snapshot.admin else None
        if not isinstance(latches, dict):
            return []
        return sorted(s for s, v in latches.items() if isinstance(v, dict) and v.get("engaged"))

    def pending_approvals(self) -> list[tuple[str, dict[str, Any]]]:
        """(stream, approval) of every engaged latch's pending approvals, ``_sys`` included, oldest first."""
        latches = self.snapshot.admin.get("latches") if self.snapshot and self.snapshot.admin else None
        if not isinstance(latches, dict):
            return []
        out = [(str(s), a) for s, v in latches.items() for a in latch_approvals(v)]
        return sorted(out, key=lambda x: (int(x[1].get("auditSeq") or 0), x[0]))

    def job_rows(self, configured: dict[str, str]) -> list[tuple[str, str | None, str | None, str | None,
                                                                 str | None, str | None]]:
        """(job, schedule, next run, last run, outcome, summary): from the jobs service when it
        answers, else the configured schedules with the rest unknown."""
        snap = self.snapshot
        jobs = snap.jobs if snap is not None else None
        if jobs is None:
            return [(name, cron, None, None, None, None) for name, cron in configured.items()]
        rows = []
        for j in jobs:
            if not isinstance(j, dict) or not j.get("name"):
                continue
            last = j.get("last_run") if isinstance(j.get("last_run"), dict) else None
            rows.append((str(j["name"]), _opt(j.get("schedule")), _opt(j.get("next_run_at")),
                         _opt(last.get("started_at")) if last else None, _opt(last.get("outcome")) if last else None,
                         _opt(last.get("summary")) if last else None))
        return rows


def _opt(v: Any) -> str | None:
    return None if v is None else str(v)


def sparkline(values: deque[float | None] | list[float | None], width: int = 16) -> str:
    bars = "▁▂▃▄▅▆▇█"
    vals = list(values)[-width:]
    nums = [v for v in vals if v is not None]
    if not nums:
        return " " * width
    lo, hi = min(nums), max(nums)
    out = []
    for v in vals:
        if v is None:
            out.append(" ")
        elif hi == lo:
            out.append(bars[0])
        else:
            out.append(bars[min(int((v - lo) / (hi - lo) * (len(bars) - 1)), len(bars) - 1)])
    return "".join(out).rjust(width)
