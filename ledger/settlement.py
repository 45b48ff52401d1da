"""Settlement: the core's events into the double-entry book, exactly once.

Two layers:

- :class:`Book` applies a batch of *deliveries* (one EVT message = the events of one stream) in ONE
  PostgreSQL transaction. Idempotency lives here, in the database: under the writer lock it reads
  each stream's checkpoint (last applied seq), skips what is already applied, refuses what must
  not be applied (a lower fencing token, an unbalanced move list) and stops at a gap. The journal,
  the postings, the trade rows, the netted balance updates and the new checkpoints commit together
  or not at all. The fast path COPYs straight into the tables; if a unique key still fires (some
  other writer got there first), the batch is re-run on the slow path, which first asks the
  journal which sources are already posted.
- :class:`SettlementConsumer` is the durable JetStream pull consumer ``ledger`` on EVT
  (``evt.>``): fetch a batch, settle it, and only after the commit ack the messages. Acks are a
  courtesy: a late or lost ack only causes a redelivery, which the Book skips.

Where the consumer resumes is derived from the database, not from JetStream's delivery state:
after a kill -9 the messages the dead process held would only come back after ``ack_wait``,
behind newer ones, so at start (and whenever a gap is seen) the consumer is re-created at the
first EVT message that holds an unapplied event (:meth:`SettlementConsumer.restart_point`). A gap
seen again right after such a re-read is real: the stream stops and an alert is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
from prometheus_client import Counter, Gauge, Histogram

from core.aio import stop_tasks
from core.bus import H_FIRST, H_LAST
from core.wire import (
    CUSTODY_ACCOUNT,
    Bucket,
    EngineCheckpoint,
    Event,
    MarketAdded,
    SymbolModeChanged,
    TradeExecuted,
    WithdrawalsHaltChanged,
    decode_events,
)
from ledger.postings import reference, validate_moves

__all__ = [
    "Alert",
    "BatchOutcome",
    "Book",
    "ConsumerOptions",
    "Delivery",
    "SettlementConsumer",
    "StreamState",
    "resume_stream",
]

log = logging.getLogger("ledger.settlement")


M_APPLIED = Counter("ledger_events_applied_total", "Events applied (posted or recorded) per stream", ["stream"])
M_JOURNAL = Counter("ledger_journal_transactions_total", "Journal transactions posted by settlement")
M_TRADES = Counter("ledger_trades_settled_total", "TradeExecuted events settled")
M_DUPS = Counter("ledger_duplicate_events_total", "Redelivered events skipped because already applied")
M_GAPS = Counter("ledger_gaps_total", "Gaps seen (event seq beyond last applied + 1)", ["stream"])
M_FENCED = Counter("ledger_fencing_refused_total", "Events refused: fencing token lower than the stream's highest",
                   ["stream"])
M_UNBALANCED = Counter("ledger_unbalanced_events_total", "Events refused: moves not a valid double entry", ["stream"])
M_DB_ERRORS = Counter("ledger_db_tx_errors_total", "Settlement transactions that failed (retried)", ["kind"])
M_REPLAN = Counter("ledger_replans_total", "Batches planned ahead whose predicted stream states were stale")
M_SLOW = Counter("ledger_slow_path_total", "Batches re-run on the slow idempotent path after a unique conflict")
M_COMMIT = Histogram("ledger_batch_commit_seconds", "One settlement transaction, begin to commit",
                     buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0))
M_BATCH = Histogram("ledger_batch_events", "Events per settlement transaction",
                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000))
M_LAG_MS = Histogram("ledger_settlement_lag_ms", "Event occurred_at to ledger commit, per EVT message (ms)",
                     buckets=(5, 10, 25, 50, 100, 200, 500, 1000, 2500, 5000, 10000, 60000))
M_LAG_MS_LAST = Gauge("ledger_settlement_lag_ms_last", "Settlement lag (ms) of the last message applied", ["stream"])
M_APPLIED_SEQ = Gauge("ledger_applied_seq", "Last applied engine seq per stream", ["stream"])
M_CONSUMER_LAG = Gauge("ledger_consumer_lag_messages", "EVT messages not yet delivered or acked to the ledger consumer")
M_REPOSITION = Counter("ledger_consumer_repositions_total", "Consumer re-created at the database's resume point",
                       ["reason"])
M_UNDECODABLE = Counter("ledger_undecodable_messages_total", "EVT messages that are not a list of events of their "
                        "subject's stream (skipped; a missing event then shows as a gap)", ["stream"])
M_STOPPED = Gauge("ledger_stream_stopped", "1 while settlement of a stream is stopped (gap, fencing, unbalanced)",
                  ["stream"])

_AVAILABLE = Bucket.AVAILABLE
_HOLD = Bucket.HOLD

J_COLS = ["tx_id", "stream", "seq", "kind", "reference_type", "reference_id", "occurred_at_ms", "fencing_token",
          "correlation_id", "legs"]
P_COLS = ["tx_id", "leg", "account_id", "asset", "bucket", "delta"]
T_COLS = ["symbol", "trade_id", "seq", "tx_id", "taker_order_id", "taker_account_id", "taker_side", "maker_order_id",
          "maker_account_id", "price_ticks", "qty_lots", "base_amount", "quote_amount", "taker_fee", "taker_fee_asset",
          "maker_fee", "maker_fee_asset", "occurred_at_ms"]

_DB_RETRYABLE = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, ConnectionError, TimeoutError)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Delivery:
    """The events of one stream in one EVT message (contiguous seqs). ``js_seq`` is the message's EVT
    stream sequence (0 when fed directly); ``msg`` the NATS message to ack, if any."""

    stream: str
    js_seq: int
    events: list[Event]
    msg: Any = None

    @property
    def first_seq(self) -> int:
        return self.events[0].seq if self.events else 0

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0


@dataclass(slots=True)
class StreamState:
    stream: str
    last_seq: int = 0
    max_token: int = 0
    last_js_seq: int = 0
    last_occurred_at_ms: int = 0
    state: str = "running"
    stop_reason: str | None = None
    stopped_at_seq: int | None = None
    applied: int = 0
    dirty: bool = False


@dataclass(slots=True)
class Alert:
    category: str  # invariant | gap | fencing | decode | lag
    check_name: str
    key: str
    stream: str | None
    detail: dict[str, Any]


@dataclass
class BatchOutcome:
    deliveries: int = 0
    applied_events: int = 0
    journal_rows: int = 0
    postings: int = 0
    trades: int = 0
    duplicates: int = 0
    held: list[Delivery] = field(default_factory=list)
    suspect_gaps: list[tuple[str, int, int]] = field(default_factory=list)  # (stream, expected, got), not yet confirmed
    alerts: list[Alert] = field(default_factory=list)
    new_alert_ids: list[int] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # evaluated EngineCheckpoints
    streams: dict[str, StreamState] = field(default_factory=dict)
    slow_path: bool = False
    commit_seconds: float = 0.0  # begin to commit, less any wait for the batch before
    locked_seconds: float = 0.0  # writer lock taken to commit (the part batches cannot overlap)
    lag_ms: list[tuple[str, int]] = field(default_factory=list)
    next_tx: int = 0
    replanned: bool = False


@dataclass
class _Plan:
    journal: list[tuple[Any, ...]] = field(default_factory=list)
    postings: list[tuple[Any, ...]] = field(default_factory=list)
    trades: list[tuple[Any, ...]] = field(default_factory=list)
    nets: dict[tuple[int, str, str], int] = field(default_factory=dict)
    checkpoints: list[EngineCheckpoint] = field(default_factory=list)
    markets: list[tuple[str, str, str]] = field(default_factory=list)
    modes: list[tuple[str, str, int]] = field(default_factory=list)
    flags: list[tuple[str, str, int]] = field(default_factory=list)
    candidates: list[tuple[str, int]] = field(default_factory=list)
    next_tx: int = 1


def plan_batch(deliveries: Sequence[Delivery], states: dict[str, StreamState], next_tx: int, out: BatchOutcome,
               *, existing: set[tuple[str, int]] | None = None,
               confirmed_gaps: set[tuple[str, int]] | None = None) -> _Plan:
    """Decide, event by event, what this batch posts; pure apart from ``states``/``out``.

    Per stream, in order: seq <= last applied -> duplicate (skipped); fencing token below the
    stream's highest -> refused, stream stopped; seq beyond last + 1 -> gap (stream stopped when
    ``confirmed``, else only held back); moves not a valid double entry -> refused, stream
    stopped; otherwise posted. ``existing`` (slow path) are sources the journal already holds:
    they advance the checkpoint without being posted again.
    """
    plan = _Plan(next_tx=next_tx)
    journal, postings, trades, nets = plan.journal, plan.postings, plan.trades, plan.nets
    tx = next_tx
    confirmed = confirmed_gaps or set()
    for d in deliveries:
        st = states.get(d.stream)
        if st is None:
            st = states[d.stream] = StreamState(d.stream)
        if st.state == "stopped":
            out.held.append(d)
            continue
        stream = d.stream
        held = False
        applied_here = 0
        for e in d.events:
            seq = e.seq
            last = st.last_seq
            if seq <= last:
                out.duplicates += 1
                continue
            tok = e.fencing_token
            if tok < st.max_token:
                _stop(st, "fencing", seq, out, Alert(
                    "fencing", "fencing_token", f"{stream}:{seq}", stream,
                    {"seq": seq, "fencing_token": tok, "highest_seen": st.max_token, "event_id": e.event_id,
                     "js_seq": d.js_seq}))
                M_FENCED.labels(stream).inc()
                held = True
                break
            if seq != last + 1:
                M_GAPS.labels(stream).inc()
                if (stream, last + 1) in confirmed:
                    _stop(st, "gap", last + 1, out, Alert(
                        "gap", "gap", f"{stream}:{last + 1}", stream,
                        {"expected_seq": last + 1, "got_seq": seq, "js_seq": d.js_seq}))
                else:
                    out.suspect_gaps.append((stream, last + 1, seq))
                held = True
                break
            moves = getattr(e, "moves", None)
            if moves:
                dup = existing is not None and (stream, seq) in existing
                # One pass builds the postings and nets and checks the double entry; the rare
                # invalid event is undone below (and explained by validate_moves).
                p0 = len(postings)
                sums: dict[str, int] = {}
                ok = True
                for leg, m in enumerate(moves):
                    acct, asset, bucket, delta = m.account_id, m.asset, m.bucket, m.delta
                    sums[asset] = sums.get(asset, 0) + delta
                    if acct == CUSTODY_ACCOUNT and bucket is _HOLD:
                        ok = False
                    if not dup:
                        postings.append((tx, leg, acct, asset, bucket, delta))
                        key = (acct, asset, bucket)
                        nets[key] = nets.get(key, 0) + delta
                if not ok or any(sums.values()):
                    if not dup:
                        del postings[p0:]
                        for m in moves:
                            key = (m.account_id, m.asset, m.bucket)
                            nets[key] -= m.delta
                    problems = validate_moves(moves) or ["invalid moves"]
                    _stop(st, "unbalanced", seq, out, Alert(
                        "invariant", "transaction_balanced", f"{stream}:{seq}", stream,
                        {"seq": seq, "event_id": e.event_id, "problems": problems}))
                    M_UNBALANCED.labels(stream).inc()
                    held = True
                    break
                if dup:
                    out.duplicates += 1
                else:
                    kind = type(e).__name__
                    if kind == "TradeExecuted":
                        t: TradeExecuted = e  # type: ignore[assignment]
                        journal.append((tx, stream, seq, kind, "trade", str(t.trade_id), t.occurred_at, tok,
                                        t.correlation_id, len(moves)))
                        trades.append((stream, t.trade_id, seq, tx, t.taker_order_id, t.taker_account_id,
                                       t.taker_side, t.maker_order_id, t.maker_account_id, t.price_ticks, t.qty_lots,
                                       t.base_amount, t.quote_amount, t.taker_fee, t.taker_fee_asset, t.maker_fee,
                                       t.maker_fee_asset, t.occurred_at))
                    else:
                        rtype, rid = reference(e)
                        journal.append((tx, stream, seq, kind, rtype, rid, e.occurred_at, tok, e.correlation_id,
                                        len(moves)))
                    plan.candidates.append((stream, seq))
                    tx += 1
            elif isinstance(e, EngineCheckpoint):
                plan.checkpoints.append(e)
            elif isinstance(e, MarketAdded):
                plan.markets.append((e.config.symbol, e.config.base, e.config.quote))
            elif isinstance(e, SymbolModeChanged):
                plan.modes.append((stream, str(e.mode), seq))
            elif isinstance(e, WithdrawalsHaltChanged):
                plan.flags.append(("withdrawals_halt", "on" if e.on else "off", seq))
            st.last_seq = seq
            if tok > st.max_token:
                st.max_token = tok
            st.last_occurred_at_ms = e.occurred_at
            applied_here += 1
        if applied_here:
            st.last_js_seq = d.js_seq or st.last_js_seq
            st.applied += applied_here
            st.dirty = True
            out.applied_events += applied_here
            out.lag_ms.append((stream, d.events[-1].occurred_at))
        if held:
            out.held.append(d)
    plan.next_tx = tx
    return plan


def _stop(st: StreamState, reason: str, seq: int, out: BatchOutcome, alert: Alert) -> None:
    st.state = "stopped"
    st.stop_reason = f"{reason} at seq {seq}"
    st.stopped_at_seq = seq
    st.dirty = True
    out.alerts.append(alert)
    log.error("settlement stopped for a stream", extra={"stream": st.stream, "reason": reason, "seq": seq,
                                                         "detail": alert.detail})


def _state_key(st: StreamState | None) -> tuple[int, int, str]:
    return (st.last_seq, st.max_token, st.state) if st is not None else (0, 0, "running")


def _fresh_copy(st: StreamState) -> StreamState:
    return StreamState(st.stream, st.last_seq, st.max_token, st.last_js_seq, st.last_occurred_at_ms, st.state,
                       st.stop_reason, st.stopped_at_seq)


@dataclass
class Prepared:
    """A batch planned against *predicted* stream states (those the previous batches will leave):
    used as is when the states read under the writer lock agree, re-planned otherwise."""

    deliveries: list[Delivery]
    base: dict[str, tuple[int, int, str]]
    base_next_tx: int
    plan: _Plan
    out: BatchOutcome
    states: dict[str, StreamState]
    plan_alerts: list[Alert] = field(default_factory=list)


def prepare(deliveries: Sequence[Delivery], states: dict[str, StreamState], next_tx: int, *,
            confirmed_gaps: set[tuple[str, int]] | None = None,
            existing: set[tuple[str, int]] | None = None) -> Prepared:
    streams = {d.stream for d in deliveries}
    copies = {s: (_fresh_copy(states[s]) if s in states else StreamState(s)) for s in streams}
    base = {s: _state_key(copies[s]) for s in streams}
    out = BatchOutcome(deliveries=len(deliveries))
    plan = plan_batch(deliveries, copies, next_tx, out, existing=existing, confirmed_gaps=confirmed_gaps)
    return Prepared(list(deliveries), base, next_tx, plan, out, copies, list(out.alerts))


# Two statements on purpose: in READ COMMITTED a statement that waited for the row lock still reads
# every other table as of its own start, so the checkpoints must be read by a statement that begins
# after the lock is held (else a writer that waited would plan against the previous writer's past).
_LOCK = "SELECT next_tx_id FROM ledger_writer WHERE id = 1 FOR UPDATE"
_READ_CHECKPOINTS = """
SELECT stream, last_seq, max_fencing_token, last_js_seq, last_occurred_at_ms, state, stop_reason, stopped_at_seq
FROM ledger_consumer_checkpoint WHERE stream = ANY($1::text[])"""

_UPSERT_BALANCES = """
WITH u AS (
    INSERT INTO ledger_accounts AS a (account_id, asset, bucket, balance, last_tx_id)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::numeric[], $5::bigint[])
    ON CONFLICT (account_id, asset, bucket) DO UPDATE
        SET balance = a.balance + EXCLUDED.balance, last_tx_id = EXCLUDED.last_tx_id, updated_at = now()
    RETURNING a.account_id, a.asset, a.bucket, a.balance)
SELECT account_id, asset, bucket, balance FROM u WHERE balance < 0 AND account_id <> 0"""

# Accounts the book already has: a plain UPDATE (about twice as fast as the upsert), which must
# touch every key it is given (else the known-accounts cache is stale and the batch is re-run).
_UPDATE_BALANCES = """
WITH u AS (
    UPDATE ledger_accounts AS a SET balance = a.balance + d.delta, last_tx_id = $5, updated_at = now()
    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[]) AS d(account_id, asset, bucket, delta)
    WHERE a.account_id = d.account_id AND a.asset = d.asset AND a.bucket = d.bucket
    RETURNING a.account_id, a.asset, a.bucket, a.balance)
SELECT (SELECT count(*) FROM u) AS n,
       (SELECT coalesce(json_agg(json_build_array(account_id, asset, bucket, balance::text)), '[]'::json)::text
        FROM u WHERE balance < 0 AND account_id <> 0) AS negatives"""
_UPDATE_BALANCES_NUMERIC = _UPDATE_BALANCES.replace("$4::bigint[]", "$4::numeric[]")
_I63 = 2**63


class _StaleAccounts(Exception):
    pass


class _Mispredicted(Exception):
    """Rows written ahead (while the batch before committed) rest on a prediction of the stream
    states and next tx id that the committed book does not match: roll them back, plan afresh."""


class _Abandoned(Exception):
    """The batch before this one did not commit cleanly (a gap to re-read, or a stop): this one,
    planned on top of it, must not commit either."""


async def _pass(gate: asyncio.Future[bool] | None) -> float:
    """Wait for the batch before to be decided; raise :class:`_Abandoned` unless it committed
    cleanly. Returns the seconds waited."""
    if gate is None:
        return 0.0
    t = time.perf_counter()
    if not await asyncio.shield(gate):
        raise _Abandoned()
    return time.perf_counter() - t


_UPSERT_CHECKPOINTS = """
WITH w AS (UPDATE ledger_writer SET next_tx_id = $10 WHERE id = 1 AND next_tx_id <> $10)
INSERT INTO ledger_consumer_checkpoint AS c (stream, last_seq, max_fencing_token, last_js_seq, last_occurred_at_ms,
                                             events_applied, state, stop_reason, stopped_at_seq, updated_at)
SELECT s, l, t, j, o, n, st, r, ss, now()
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::text[], $8::text[],
            $9::bigint[]) AS x(s, l, t, j, o, n, st, r, ss)
ON CONFLICT (stream) DO UPDATE SET
    last_seq = greatest(c.last_seq, EXCLUDED.last_seq),
    max_fencing_token = greatest(c.max_fencing_token, EXCLUDED.max_fencing_token),
    last_js_seq = EXCLUDED.last_js_seq,
    last_occurred_at_ms = EXCLUDED.last_occurred_at_ms,
    events_applied = c.events_applied + EXCLUDED.events_applied,
    state = EXCLUDED.state, stop_reason = EXCLUDED.stop_reason, stopped_at_seq = EXCLUDED.stopped_at_seq,
    updated_at = now()"""

_UPSERT_ALERT = """
INSERT INTO ledger_alerts AS a (category, check_name, key, stream, detail, response_state)
VALUES ($1, $2, $3, $4, $5::jsonb, $6)
ON CONFLICT (category, check_name, key) WHERE resolved_at IS NULL
DO UPDATE SET occurrences = a.occurrences + 1, last_seen_at = now(), detail = EXCLUDED.detail
RETURNING id, (xmax = 0) AS inserted"""


async def record_alerts(conn: Any, alerts: Iterable[Alert]) -> list[int]:
    """Upsert alert rows (one open row per category/check/key); returns the ids of NEW alerts.
    Violations count in ``invariant_violation_total``; new ones wait for the automatic response."""
    from ledger.invariants import M_VIOLATIONS

    new: list[int] = []
    for a in alerts:
        row = await conn.fetchrow(_UPSERT_ALERT, a.category, a.check_name, a.key, a.stream,
                                  msgspec.json.encode(a.detail).decode(), "pending")
        if a.category == "invariant":
            M_VIOLATIONS.labels(a.check_name).inc()
        if row["inserted"]:
            new.append(int(row["id"]))
    return new


class Book:
    """Applies batches of deliveries to the book, one transaction each, exactly once."""

    KNOWN_MAX = 2_000_000

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._pending_checkpoints = True  # look once at start-up; then only when a checkpoint arrives
        self.known: set[tuple[int, str, str]] = set()  # balance rows known to exist

    async def load_states(self) -> tuple[dict[str, StreamState], int]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM ledger_consumer_checkpoint")
            next_tx = int(await conn.fetchval("SELECT next_tx_id FROM ledger_writer WHERE id = 1"))
        states = {r["stream"]: StreamState(r["stream"], r["last_seq"], r["max_fencing_token"], r["last_js_seq"],
                                           r["last_occurred_at_ms"], r["state"], r["stop_reason"], r["stopped_at_seq"])
                  for r in rows}
        return states, next_tx

    async def settle(self, deliveries: Sequence[Delivery], *, confirmed_gaps: set[tuple[str, int]] | None = None,
                     prepared: Prepared | None = None, gate: asyncio.Future[bool] | None = None) -> BatchOutcome:
        """Apply one batch. With ``gate`` (the pipelined consumer: resolved True once the batch
        before committed cleanly) and ``prepared``, the append-only rows (journal, postings, trades)
        are written while the batch before commits, and the rest waits for the gate and the writer
        lock; a misprediction found under the lock rolls them back and the batch is planned afresh."""
        stale = mispredicted = False
        while True:
            try:
                out = await self._settle(deliveries, slow=False, confirmed_gaps=confirmed_gaps, prepared=prepared,
                                         gate=gate)
                out.replanned = out.replanned or mispredicted  # the consumer's later predictions are off too
                return out
            except _StaleAccounts:
                self.known.clear()
                if stale:
                    raise
                stale = True
            except _Mispredicted:
                M_REPLAN.inc()
                mispredicted = True
                prepared, gate = None, None  # the gate was passed: the batch before is committed
            except asyncpg.UniqueViolationError as exc:
                # Someone posted part of this batch although our checkpoint said otherwise (a second
                # writer, or rows inserted by hand): ask the journal, post only what is missing.
                log.warning("fast path conflict; re-running the batch on the slow path", extra={"error": str(exc)})
                M_SLOW.inc()
                await _pass(gate)  # the conflict may have been raised while writing ahead
                return await self._settle(deliveries, slow=True, confirmed_gaps=confirmed_gaps, prepared=None,
                                          gate=None)

    async def _settle(self, deliveries: Sequence[Delivery], *, slow: bool, confirmed_gaps: set[tuple[str, int]] | None,
                      prepared: Prepared | None, gate: asyncio.Future[bool] | None = None) -> BatchOutcome:
        t0 = time.perf_counter()
        streams = sorted({d.stream for d in deliveries})
        touched: list[tuple[int, str, str]] = []
        ahead = prepared is not None and gate is not None and not slow
        async with self.pool.acquire() as conn, conn.transaction():
            if ahead:
                assert prepared is not None
                await self._append_rows(conn, prepared.plan, slow=False)
            waited = await _pass(gate)
            t_lock = time.perf_counter()
            next_tx = int(await conn.fetchval(_LOCK))
            rows = await conn.fetch(_READ_CHECKPOINTS, streams)
            states: dict[str, StreamState] = {}
            for r in rows:
                if r["stream"] is not None:
                    states[r["stream"]] = StreamState(
                        r["stream"], r["last_seq"], r["max_fencing_token"], r["last_js_seq"],
                        r["last_occurred_at_ms"], r["state"], r["stop_reason"], r["stopped_at_seq"])
            p = prepared
            replanned = False
            if p is not None and not slow and (p.base_next_tx != next_tx or any(
                    _state_key(states.get(s)) != k for s, k in p.base.items())):
                if ahead:
                    raise _Mispredicted()
                M_REPLAN.inc()
                p = None
                replanned = True
            if p is None or slow:
                existing: set[tuple[str, int]] | None = None
                if slow:
                    cand = prepare(deliveries, states, next_tx, confirmed_gaps=confirmed_gaps).plan.candidates
                    found = await conn.fetch(  # an index probe per candidate, never a scan of the journal
                        "SELECT c.stream, c.seq FROM unnest($1::text[], $2::bigint[]) AS c(stream, seq) "
                        "CROSS JOIN LATERAL (SELECT 1 FROM ledger_journal j WHERE j.stream = c.stream "
                        "AND j.seq = c.seq OFFSET 0) x", [c[0] for c in cand], [c[1] for c in cand])
                    existing = {(r["stream"], r["seq"]) for r in found}
                p = prepare(deliveries, states, next_tx, confirmed_gaps=confirmed_gaps, existing=existing)
            plan, out, after = p.plan, p.out, p.states
            # A retried batch starts from what planning found, not from a failed attempt's additions.
            out.alerts, out.checkpoints, out.new_alert_ids = list(p.plan_alerts), [], []
            out.slow_path = slow
            out.replanned = replanned or slow
            if not ahead:
                await self._append_rows(conn, plan, slow=slow)
            if plan.nets:
                touched = [k for k, v in plan.nets.items() if v]
                await self._balances(conn, touched, plan, out)
            dirty = [st for st in after.values() if st.dirty]
            if dirty:
                await conn.execute(
                    _UPSERT_CHECKPOINTS, [st.stream for st in dirty], [st.last_seq for st in dirty],
                    [st.max_token for st in dirty], [st.last_js_seq for st in dirty],
                    [st.last_occurred_at_ms for st in dirty], [st.applied for st in dirty],
                    [st.state for st in dirty], [st.stop_reason for st in dirty], [st.stopped_at_seq for st in dirty],
                    plan.next_tx)
            elif plan.next_tx != next_tx:
                await conn.execute("UPDATE ledger_writer SET next_tx_id = $1 WHERE id = 1", plan.next_tx)
            await self._core_state(conn, plan)
            if plan.checkpoints or self._pending_checkpoints:
                await self._checkpoints(conn, plan, out)
            if out.alerts:
                out.new_alert_ids = await record_alerts(conn, out.alerts)
        if len(self.known) > self.KNOWN_MAX:
            self.known.clear()
        self.known.update(touched)
        # The transaction's own time: not the wait for the batch before (pipelined).
        t_end = time.perf_counter()
        out.commit_seconds = t_end - t0 - waited
        out.locked_seconds = t_end - t_lock
        out.journal_rows = len(plan.journal)
        out.postings = len(plan.postings)
        out.trades = len(plan.trades)
        out.streams = {**states, **after}
        out.next_tx = plan.next_tx
        self._observe(out)
        return out

    @staticmethod
    async def _append_rows(conn: Any, plan: _Plan, *, slow: bool) -> None:
        """The append-only rows of a plan: journal, postings, trades."""
        if plan.journal:
            await conn.copy_records_to_table("ledger_journal", records=plan.journal, columns=J_COLS)
            await conn.copy_records_to_table("ledger_postings", records=plan.postings, columns=P_COLS)
        if plan.trades:
            if slow:
                await conn.executemany(
                    f"INSERT INTO ledger_trades ({', '.join(T_COLS)}) VALUES "
                    f"({', '.join(f'${i + 1}' for i in range(len(T_COLS)))}) ON CONFLICT DO NOTHING", plan.trades)
            else:
                await conn.copy_records_to_table("ledger_trades", records=plan.trades, columns=T_COLS)

    async def _balances(self, conn: Any, keys: list[tuple[int, str, str]], plan: _Plan, out: BatchOutcome) -> None:
        nets = plan.nets
        old = [k for k in keys if k in self.known]
        new = [k for k in keys if k not in self.known]
        last_tx = plan.next_tx - 1
        negatives: list[tuple[Any, ...]] = []
        if old:
            deltas = [nets[k] for k in old]
            # bigint[] encodes several times faster than numeric[]; a batch's net deltas fit unless
            # something moved more than 2**63 (numeric then).
            sql = _UPDATE_BALANCES if all(-_I63 <= d < _I63 for d in deltas) else _UPDATE_BALANCES_NUMERIC
            r = await conn.fetchrow(sql, [k[0] for k in old], [k[1] for k in old], [str(k[2]) for k in old], deltas,
                                    last_tx)
            if r["n"] != len(old):
                raise _StaleAccounts()
            negatives += [tuple(x) for x in msgspec.json.decode(r["negatives"])]
        if new:
            rows = await conn.fetch(_UPSERT_BALANCES, [k[0] for k in new], [k[1] for k in new],
                                    [str(k[2]) for k in new], [nets[k] for k in new], [last_tx] * len(new))
            negatives += [(x["account_id"], x["asset"], x["bucket"], str(x["balance"])) for x in rows]
        for acct, asset, bucket, bal in negatives:
            out.alerts.append(Alert("invariant", "non_negative", f"{acct}:{asset}:{bucket}", None,
                                    {"account_id": acct, "asset": asset, "bucket": bucket, "balance": str(bal)}))

    async def _core_state(self, conn: Any, plan: _Plan) -> None:
        if plan.markets:
            await conn.executemany(
                "INSERT INTO ledger_markets (symbol, base, quote) VALUES ($1, $2, $3) ON CONFLICT (symbol) DO NOTHING",
                plan.markets)
        for symbol, mode, seq in plan.modes:
            await conn.execute(
                """INSERT INTO ledger_markets AS m (symbol, base, quote, mode, mode_seq) VALUES ($1, '', '', $2, $3)
                   ON CONFLICT (symbol) DO UPDATE SET mode = EXCLUDED.mode, mode_seq = EXCLUDED.mode_seq,
                       updated_at = now() WHERE m.mode_seq < EXCLUDED.mode_seq""", symbol, mode, seq)
        for name, value, seq in plan.flags:
            await conn.execute(
                """INSERT INTO ledger_core_flags AS f (name, value, seq) VALUES ($1, $2, $3)
                   ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, seq = EXCLUDED.seq, updated_at = now()
                   WHERE f.seq < EXCLUDED.seq""", name, value, seq)

    async def _checkpoints(self, conn: Any, plan: _Plan, out: BatchOutcome) -> None:
        from ledger.invariants import evaluate_checkpoints

        for c in plan.checkpoints:
            await conn.execute(
                """INSERT INTO ledger_engine_checkpoints (sys_seq, last_seq, state_hash, stream_seqs, totals,
                                                          occurred_at_ms)
                   VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6) ON CONFLICT (sys_seq) DO NOTHING""",
                c.seq, c.last_seq, c.state_hash, msgspec.json.encode(c.stream_seqs).decode(),
                msgspec.json.encode(c.totals).decode(), c.occurred_at)
        recent: dict[int, list[tuple[Any, ...]]] = {}
        for row in plan.postings:
            recent.setdefault(row[0], []).append(row)
        results, pending_left = await evaluate_checkpoints(conn, recent)
        self._pending_checkpoints = pending_left
        for r in results:
            out.checkpoints.append(r)
            if r["status"] == "mismatch":
                out.alerts.append(Alert("invariant", "engine_checkpoint", f"sys_seq:{r['sys_seq']}", None, r))

    def _observe(self, out: BatchOutcome) -> None:
        M_COMMIT.observe(out.commit_seconds)
        M_BATCH.observe(out.applied_events)
        if out.duplicates:
            M_DUPS.inc(out.duplicates)
        if out.journal_rows:
            M_JOURNAL.inc(out.journal_rows)
        if out.trades:
            M_TRADES.inc(out.trades)
        now = _now_ms()
        for stream, occurred in out.lag_ms:
            lag = max(0, now - occurred)
            M_LAG_MS.observe(lag)
            M_LAG_MS_LAST.labels(stream).set(lag)
        for st in out.streams.values():
            if st.applied:
                M_APPLIED.labels(st.stream).inc(st.applied)
                M_APPLIED_SEQ.labels(st.stream).set(st.last_seq)
            M_STOPPED.labels(st.stream).set(1 if st.state == "stopped" else 0)


# --------------------------------------------------------------------------------------------------
# The JetStream consumer


class ConsumerOptions(msgspec.Struct, frozen=True, kw_only=True):
    evt_stream: str = "EVT"
    durable: str = "ledger"
    subject_prefix: str = "evt"
    fetch_max_msgs: int = 64
    batch_max_events: int = 500
    ack_wait_s: float = 30.0
    # nats-py's fetch, once a message has arrived on a waiting pull, waits out the whole timeout for
    # the rest of the batch: keep it short or an idle-then-busy stream pays it as settlement lag.
    fetch_wait_s: float = 0.02
    # After a fetch that brought fewer than batch_wait_below_events events, wait this long before
    # the next one, so that a transaction settles several EVT messages: at a live rate of ~100
    # messages/s a fetch otherwise returns the one message the core just published, and every
    # transaction costs a commit whatever it carries. A fetch with more events than that already
    # amortises its commit and does not wait, so a busy consumer (a backlog, a high live rate) never
    # idles on purpose.
    batch_wait_s: float = 0.0
    batch_wait_below_events: int = 100
    max_ack_pending: int = 20_000
    # Chaos only (drills): leave this share of messages unacked so JetStream redelivers them.
    chaos_drop_ack_ratio: float = 0.0


class SettlementConsumer:
    """The durable pull consumer ``ledger`` on EVT feeding :class:`Book`.

    Fetching, decoding and planning run one or two batches ahead of the transaction in flight
    (planned against the stream states the batches before will leave; checked under the writer
    lock), so Python and PostgreSQL work at the same time. Messages are acked after their commit.
    """

    def __init__(self, book: Book, js: Any, opts: ConsumerOptions | None = None) -> None:
        self.book = book
        self.js = js
        self.opts = opts or ConsumerOptions()
        self.psub: Any = None
        self.hint: dict[str, int] = {}  # stream -> last applied seq known to be committed
        self.committed: dict[str, StreamState] = {}
        self.committed_next_tx = 0
        self.stopped_streams: set[str] = set()
        self.suspect: set[tuple[str, int]] = set()
        self.confirmed: set[tuple[str, int]] = set()
        self.last_error: str | None = None
        self.last_error_at = 0.0
        self.batches = 0
        self.events = 0
        self.outcome_hooks: list[Any] = []
        self.stop = asyncio.Event()
        self.reposition_requested = False
        self._rng = random.Random()

    @property
    def filter_subject(self) -> str:
        return f"{self.opts.subject_prefix}.>"

    # ----------------------------------------------------------------------------------------------
    # position

    async def restart_point(self) -> int:
        """The first EVT stream sequence that may hold an event the book lacks, for a running stream.

        Per stream (subject): if the message holding our last applied seq was only partly applied,
        resume there; else at the subject's next message after it (none: caught up, no constraint);
        a stream we never saw (or whose message is gone) from its first message. Stopped streams are
        left out: nothing after their stop is applied until an operator resumes them.
        """
        from nats.js.errors import NotFoundError

        info = await self.js.stream_info(self.opts.evt_stream, subjects_filter=self.filter_subject)
        end = int(info.state.last_seq)
        subjects = dict(info.state.subjects or {})
        async with self.book.pool.acquire() as conn:
            rows = await conn.fetch("SELECT stream, last_seq, last_js_seq, state FROM ledger_consumer_checkpoint")
        known = {r["stream"]: r for r in rows}
        points: list[int] = []
        plen = len(self.opts.subject_prefix) + 1

        async def next_on(subject: str, from_seq: int) -> int | None:
            try:
                m = await self.js.get_msg(self.opts.evt_stream, seq=max(1, from_seq), subject=subject, next=True)
                return int(m.seq)
            except NotFoundError:
                return None

        for subject in subjects:
            stream = subject[plen:]
            r = known.get(stream)
            if r is not None and r["state"] == "stopped":
                continue
            start = 1
            if r is not None and r["last_js_seq"] > 0:
                try:
                    held = await self.js.get_msg(self.opts.evt_stream, int(r["last_js_seq"]))
                    if held.subject == subject:
                        if int((held.headers or {}).get(H_LAST, 0)) > r["last_seq"]:
                            points.append(int(r["last_js_seq"]))  # partly applied: re-read it
                            continue
                        start = int(r["last_js_seq"]) + 1
                except NotFoundError:
                    start = 1
            nxt = await next_on(subject, start)
            if nxt is not None:
                points.append(nxt)
        return min(points) if points else end + 1

    async def position(self, *, force: bool = False, reason: str = "start") -> int:
        """Bind to the durable consumer, re-creating it at :meth:`restart_point` when it would not
        deliver in order from there (messages in flight to a dead process, or it is ahead of the book)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        if self.psub is not None:
            with contextlib.suppress(Exception):
                await self.psub.unsubscribe()
            self.psub = None
        point = await self.restart_point()
        keep = False
        if not force:
            try:
                ci = await self.js.consumer_info(self.opts.evt_stream, self.opts.durable)
                delivered = int(ci.delivered.stream_seq or 0)
                keep = (ci.num_ack_pending == 0 and delivered + 1 <= point
                        and ci.config.filter_subject == self.filter_subject)
            except NotFoundError:
                keep = False
        if not keep:
            with contextlib.suppress(NotFoundError):
                await self.js.delete_consumer(self.opts.evt_stream, self.opts.durable)
            cfg = ConsumerConfig(
                durable_name=self.opts.durable, filter_subject=self.filter_subject,
                ack_policy=AckPolicy.EXPLICIT, ack_wait=self.opts.ack_wait_s, max_deliver=-1,
                max_ack_pending=self.opts.max_ack_pending,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, point))
            await self.js.add_consumer(self.opts.evt_stream, cfg)
            M_REPOSITION.labels(reason).inc()
            log.info("consumer positioned from the book", extra={"durable": self.opts.durable, "start_js_seq": point,
                                                                   "reason": reason})
        self.psub = await self.js.pull_subscribe_bind(
            durable=self.opts.durable, stream=self.opts.evt_stream,
            pending_msgs_limit=1_000_000, pending_bytes_limit=1024 * 1024 * 1024)
        return point

    # ----------------------------------------------------------------------------------------------
    # the loop

    def _decode(self, msgs: list[Any]) -> tuple[list[Delivery], list[Any]]:
        deliveries: list[Delivery] = []
        skipped: list[Any] = []
        plen = len(self.opts.subject_prefix) + 1
        for m in msgs:
            stream = m.subject[plen:]
            headers = m.headers or {}
            try:
                last = int(headers.get(H_LAST, 0))
            except ValueError:
                last = 0
            if last and last <= self.hint.get(stream, 0):
                M_DUPS.inc()  # a whole redelivered message: no need to decode it
                skipped.append(m)
                continue
            js_seq = int(m.metadata.sequence.stream)
            try:
                events = decode_events(m.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                # Unreadable: acked and left out; the stream then sees a gap and stops (never skips).
                log.error("undecodable EVT message", extra={"stream": stream, "js_seq": js_seq, "error": str(exc)})
                M_UNDECODABLE.labels(stream).inc()
                skipped.append(m)
                continue
            if not events or any(e.symbol != stream for e in events):
                log.error("EVT message without events of its subject's stream", extra={"stream": stream,
                                                                                        "js_seq": js_seq})
                M_UNDECODABLE.labels(stream).inc()
                skipped.append(m)
                continue
            deliveries.append(Delivery(stream, js_seq, events, m))
        return deliveries, skipped

    def _chunks(self, msgs: list[Any]) -> list[list[Any]]:
        """Raw messages in runs of about ``batch_max_events`` events (counted from the headers)."""
        out: list[list[Any]] = []
        cur: list[Any] = []
        n = 0
        for m in msgs:
            h = m.headers or {}
            try:
                k = max(1, int(h.get(H_LAST, 0)) - int(h.get(H_FIRST, 0)) + 1)
            except ValueError:
                k = 1
            if cur and n + k > self.opts.batch_max_events:
                out.append(cur)
                cur, n = [], 0
            cur.append(m)
            n += k
        if cur:
            out.append(cur)
        return out

    def _groups(self, deliveries: list[Delivery]) -> list[list[Delivery]]:
        groups: list[list[Delivery]] = []
        cur: list[Delivery] = []
        n = 0
        for d in deliveries:
            if cur and n + len(d.events) > self.opts.batch_max_events:
                groups.append(cur)
                cur, n = [], 0
            cur.append(d)
            n += len(d.events)
        if cur:
            groups.append(cur)
        return groups

    async def _ack(self, msgs: Iterable[Any]) -> None:
        drop = self.opts.chaos_drop_ack_ratio
        for m in msgs:
            if m is None:
                continue
            if drop and self._rng.random() < drop:
                continue
            with contextlib.suppress(Exception):  # a lost ack is a redelivery, which the book skips
                await m.ack()

    async def _settle_retry(self, p: Prepared, gate: asyncio.Future[bool] | None = None) -> BatchOutcome | None:
        """Settle until it commits; None when stopping or when the batch before did not commit
        cleanly (``gate``: see :meth:`Book.settle`)."""
        delay = 0.1
        while True:
            try:
                out = await self.book.settle(p.deliveries, prepared=p, confirmed_gaps=self.confirmed, gate=gate)
                self.last_error = None
                return out
            except _Abandoned:
                return None
            except _DB_RETRYABLE as exc:
                kind, err = type(exc).__name__, exc
            except Exception as exc:  # a bug must not skip events either: retry, loudly
                kind, err = type(exc).__name__, exc
                log.exception("settlement batch failed")
            M_DB_ERRORS.labels(kind).inc()
            self.last_error = f"{kind}: {err}"
            self.last_error_at = time.monotonic()
            log.warning("settlement transaction failed; retrying", extra={"error": self.last_error})
            for d in p.deliveries:  # keep JetStream from redelivering what we still hold
                if d.msg is not None:
                    with contextlib.suppress(Exception):
                        await d.msg.in_progress()
            if self.stop.is_set():
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _committed(self, out: BatchOutcome) -> None:
        self.batches += 1
        self.events += out.applied_events
        self.committed_next_tx = out.next_tx
        for st in out.streams.values():
            self.committed[st.stream] = _fresh_copy(st)
            self.hint[st.stream] = st.last_seq
            if st.state == "stopped":
                self.stopped_streams.add(st.stream)
        for hook in self.outcome_hooks:
            try:
                await hook(out)
            except Exception:
                log.exception("outcome hook failed")

    async def _after_commit(self, p: Prepared, out: BatchOutcome) -> bool:
        """Ack what the commit covered. False when a gap asks for a re-read from the book."""
        await self._committed(out)
        if out.suspect_gaps:
            # Ack only what was applied; re-read from the book's resume point. A gap that is still
            # there after that is real and stops its stream (the next pass has it `confirmed`).
            held = {id(d) for d in out.held}
            await self._ack(d.msg for d in p.deliveries if id(d) not in held)
            for stream, expected, _got in out.suspect_gaps:
                key = (stream, expected)
                if key in self.suspect:
                    self.confirmed.add(key)
                self.suspect.add(key)
            log.warning("gap seen; re-reading EVT from the book's resume point", extra={"gaps": out.suspect_gaps})
            return False
        await self._ack(d.msg for d in p.deliveries)
        return True

    async def process(self, msgs: list[Any]) -> bool:
        """Settle one fetched batch, without pipelining (tests). False when a re-read is needed."""
        deliveries, skipped = self._decode(msgs)
        await self._ack(skipped)
        for group in self._groups(deliveries):
            p = prepare(group, self.committed, self.committed_next_tx, confirmed_gaps=self.confirmed)
            out = await self._settle_retry(p)
            if out is None:
                return True
            if not await self._after_commit(p, out):
                return False
        return True

    async def _pump(self) -> str | None:
        """Run the pipeline until a re-position is needed (returns why) or the consumer stops (None)."""
        q: asyncio.Queue[Prepared | None] = asyncio.Queue(maxsize=2)
        reason: list[str] = []
        predicted = {k: _fresh_copy(v) for k, v in self.committed.items()}
        predicted_tx = [self.committed_next_tx]

        async def producer() -> None:
            try:
                while not self.stop.is_set():
                    if self.reposition_requested:
                        self.reposition_requested = False
                        reason.append("resume")
                        return
                    try:
                        msgs = await self.psub.fetch(self.opts.fetch_max_msgs, timeout=self.opts.fetch_wait_s)
                    except TimeoutError:
                        continue
                    except Exception as exc:
                        if self.stop.is_set():
                            return
                        self.last_error = f"fetch: {type(exc).__name__}: {exc}"
                        self.last_error_at = time.monotonic()
                        log.warning("fetch failed", extra={"error": self.last_error})
                        await asyncio.sleep(0.5)
                        reason.append("fetch_error")
                        return
                    # Decode and plan a batch at a time, yielding in between: a whole fetch at once
                    # would hold the event loop (and the commit in flight) for tens of milliseconds.
                    fetched_events = 0
                    for chunk in self._chunks(msgs):
                        deliveries, skipped = self._decode(chunk)
                        fetched_events += sum(len(d.events) for d in deliveries)
                        await self._ack(skipped)
                        for group in self._groups(deliveries):
                            p = prepare(group, predicted, predicted_tx[0], confirmed_gaps=self.confirmed)
                            predicted.update(p.states)
                            predicted_tx[0] = p.plan.next_tx
                            await q.put(p)
                        await asyncio.sleep(0)
                    if self.opts.batch_wait_s > 0 and fetched_events < self.opts.batch_wait_below_events:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.stop.wait(), self.opts.batch_wait_s)
            finally:
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(None)

        prod = asyncio.create_task(producer(), name="settle-fetch")
        # Two batches overlap: batch k+1 writes its append-only rows while batch k commits; it takes
        # the writer lock only once k is decided (its gate). k's outcome is handled (stream states,
        # acks) before k+1's.
        inflight: list[tuple[Prepared, asyncio.Task[BatchOutcome | None], asyncio.Future[bool]]] = []
        loop = asyncio.get_running_loop()

        async def finish() -> bool:
            """Settle the batch in flight's outcome: False when the pump must stop (re-read, stop)."""
            p, task, decided = inflight.pop(0)
            out = await task
            decided.set_result(out is not None and not out.suspect_gaps)
            if out is None:
                return False
            if not await self._after_commit(p, out):
                reason.append("gap")
                return False
            if out.replanned:
                # Our predictions were off (another writer, a correction): plan afresh from here.
                predicted.clear()
                predicted.update({k: _fresh_copy(v) for k, v in self.committed.items()})
                predicted_tx[0] = self.committed_next_tx
            return True

        try:
            while True:
                if inflight and q.empty():
                    # Nothing to overlap with: finish the batch in flight now (its acks would wait).
                    if not await finish():
                        break
                    continue
                p = await q.get()
                if p is None:
                    if prod.done():
                        break
                    continue
                gate = inflight[-1][2] if inflight else None
                inflight.append((p, asyncio.create_task(self._settle_retry(p, gate)), loop.create_future()))
                if len(inflight) > 1 and not await finish():
                    break
            while inflight and not self.stop.is_set():  # the last batch of a finished fetch
                if not await finish():
                    break
        except BaseException:  # cancelled: so are the batches in flight (each rolls back)
            for _, task, _ in inflight:
                task.cancel()
            raise
        finally:
            # Left over: a batch waiting on a batch that did not commit cleanly (or when stopping)
            # abandons and rolls back; one already committing completes, unacked (a redelivery of it
            # is skipped by the book).
            for _, _, decided in inflight:
                if not decided.done():
                    decided.set_result(False)
            for _, task, _ in inflight:
                with contextlib.suppress(BaseException):
                    await task
            await stop_tasks([prod])
        return reason[0] if reason else None

    async def run(self) -> None:
        self.committed, self.committed_next_tx = await self.book.load_states()
        self.hint = {k: v.last_seq for k, v in self.committed.items()}
        self.stopped_streams = {k for k, v in self.committed.items() if v.state == "stopped"}
        await self.position(reason="start")
        depth = asyncio.create_task(self._poll_depth(), name="settle-depth")
        try:
            while not self.stop.is_set():
                why = await self._pump()
                if why is not None and not self.stop.is_set():
                    await self._reposition(why)
        finally:
            await stop_tasks([depth])
            if self.psub is not None:
                with contextlib.suppress(Exception):
                    await self.psub.unsubscribe()

    async def _reposition(self, reason: str) -> None:
        while not self.stop.is_set():
            try:
                # After a gap, re-read from the book even if the consumer looks consistent.
                await self.position(force=reason != "fetch_error", reason=reason)
                return
            except Exception as exc:
                self.last_error = f"reposition: {type(exc).__name__}: {exc}"
                log.warning("could not re-position the consumer", extra={"error": self.last_error})
                await asyncio.sleep(1.0)

    async def _poll_depth(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                info = await self.js.consumer_info(self.opts.evt_stream, self.opts.durable)
                M_CONSUMER_LAG.set(info.num_pending + info.num_ack_pending)
            await asyncio.sleep(1.0)

    def status(self) -> dict[str, Any]:
        return {"durable": self.opts.durable, "batches": self.batches, "events": self.events,
                "stopped_streams": sorted(self.stopped_streams), "last_error": self.last_error}


async def resume_stream(pool: Any, stream: str, actor: str, reason: str, ticket: str) -> bool:
    """Let a stopped stream settle again (audited). The consumer re-reads EVT from the stream's
    checkpoint: a gap that is still there, or the same refused event, stops it again."""
    from ledger import audit

    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT * FROM ledger_writer w, ledger_consumer_checkpoint c "
                                  "WHERE w.id = 1 AND c.stream = $1 FOR UPDATE OF w, c", stream)
        if row is None or row["state"] != "stopped":
            return False
        await audit.append(conn, actor, "LedgerStreamResume",
                           {"stream": stream, "stop_reason": row["stop_reason"], "last_seq": row["last_seq"]},
                           reason, ticket)
        await conn.execute("UPDATE ledger_consumer_checkpoint SET state = 'running', stop_reason = NULL, "
                           "stopped_at_seq = NULL, updated_at = now() WHERE stream = $1", stream)
        await conn.execute("UPDATE ledger_alerts SET resolved_at = now(), resolved_by = $2, resolve_reason = $3 "
                           "WHERE stream = $1 AND category IN ('gap', 'fencing', 'decode') AND resolved_at IS NULL",
                           stream, actor, reason)
    M_STOPPED.labels(stream).set(0)
    return True
