"""The edge's connection to the trading core: commands over JetStream, answers from EVT, queries.

A command is published to ``cmd.<symbol>`` with ``Nats-Msg-Id`` = its correlation id; the core
stamps every event the command produces with that id. One plain core-NATS subscription to
``evt.>`` (not a JetStream consumer: nothing to ack, no redelivery, cheapest fan-in) resolves the
waiting requests by correlation id. All of one command's events for one stream arrive in one EVT
message (the core batches per stream), so a waiter is resolved by the first message carrying its
id; a multi-symbol account cancel-all waits for its ``CancelAllDone`` instead.

The same subscription keeps a bounded in-memory fills history per account (``fills``), so
``GET /v1/fills`` and Binance ``myTrades`` answer without a database round trip. It covers the
trades this edge process has seen since it started (the ledger is the book of record).

Queries use NATS request/reply on ``cfg.core.query_subject`` (msgpack ``{"op": ...}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import Counter, Gauge, Histogram

from core.bus import EVT_PREFIX, cmd_subject
from core.wire import (
    CancelAllAccount,
    CancelAllDone,
    Command,
    CommandRejected,
    Event,
    MarketConfig,
    OrderAccepted,
    OrderRejected,
    TradeExecuted,
    decode_events,
    encode_request,
)
from edge.errors import SpotexError

__all__ = ["CommandResult", "CoreClient", "Fill", "correlation_for"]

log = logging.getLogger("edge.core_client")

M_ACK = Histogram("edge_core_ack_seconds", "Command publish to its first event at the edge",
                  buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0))
M_TIMEOUTS = Counter("edge_core_timeouts", "Commands with no event inside edge.order_timeout_ms")
M_INFLIGHT = Gauge("edge_core_inflight", "Commands waiting for their events")
M_EVT_MSGS = Counter("edge_evt_messages", "EVT messages received by the edge")

_FILLS_PER_ACCOUNT = 1_000
_MAX_ACCOUNTS = 100_000


# Keyless commands: a random 96-bit prefix per process and a counter. As unique as a uuid4 per
# command (two edge processes, or one restarted, draw different prefixes) without a urandom call,
# which py-spy put at ~1.5% of the edge's CPU on the order path.
_KEYLESS_PREFIX = secrets.token_hex(12)
_keyless = itertools.count(1)


def correlation_for(api_key: str, idem_key: str | None) -> str:
    """The command's ``Nats-Msg-Id``. With an Idempotency-Key it is derived from (api key, key), so a
    retry dedupes on the bus, while two API keys that happen to pick the same Idempotency-Key never
    collide in JetStream's duplicate window (which is global, not per key)."""
    if idem_key is None:
        return f"{_KEYLESS_PREFIX}{next(_keyless):x}"
    return f"{hashlib.sha256(api_key.encode()).hexdigest()[:16]}:{idem_key}"


@dataclass(slots=True)
class CommandResult:
    correlation_id: str
    events: list[Event]
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class Fill:
    """One side of a trade as the account saw it."""

    trade_id: int
    symbol: str
    order_id: int
    client_order_id: str
    side: str
    maker: bool
    price_ticks: int
    qty_lots: int
    quote_amount: int
    fee: int
    fee_asset: str
    ts_ms: int
    seq: int


@dataclass(slots=True)
class _Waiter:
    fut: asyncio.Future[list[Event]]
    until_done: Callable[[Event], bool] | None
    events: list[Event] = field(default_factory=list)


class CoreClient:
    def __init__(self, nc: Any, js: Any, *, markets: list[MarketConfig], query_subject: str = "core.query",
                 order_timeout_ms: int = 5_000) -> None:
        self.nc = nc
        self.js = js
        self.markets: dict[str, MarketConfig] = {m.symbol: m for m in markets}
        self.query_subject = query_subject
        self.timeout_s = order_timeout_ms / 1000.0
        self._waiters: dict[str, _Waiter] = {}
        self._sub: Any = None
        self._fills: OrderedDict[int, deque[Fill]] = OrderedDict()
        # account -> client order id -> order id, learned from OrderAccepted (for fills' coids)
        self._coids: dict[int, str] = {}
        # order id -> quote filled so far, from the trades this process saw (cancel/get answers)
        self._order_quote: dict[int, int] = {}
        self.last_event_ms = 0
        self.listeners: list[Callable[[list[Event]], None]] = []

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{EVT_PREFIX}.>", cb=self._on_msg, pending_msgs_limit=1_000_000,
                                            pending_bytes_limit=1024 * 1024 * 1024)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for w in self._waiters.values():
            if not w.fut.done():
                w.fut.cancel()
        self._waiters.clear()

    # --- events ----------------------------------------------------------------------------------

    async def _on_msg(self, msg: Any) -> None:
        M_EVT_MSGS.inc()
        try:
            events = decode_events(msg.data)
        except Exception:  # a foreign message on evt.> must not kill the subscription
            log.warning("undecodable EVT message", extra={"subject": msg.subject})
            return
        self.last_event_ms = time.time_ns() // 1_000_000
        self._observe(events)
        waiters = self._waiters
        if waiters:
            touched: dict[str, _Waiter] = {}
            for ev in events:
                w = waiters.get(ev.correlation_id)
                if w is not None:
                    w.events.append(ev)
                    touched[ev.correlation_id] = w
                    if w.until_done is not None and w.until_done(ev) and not w.fut.done():
                        w.fut.set_result(w.events)
            for w in touched.values():
                if w.until_done is None and not w.fut.done():
                    w.fut.set_result(w.events)
        for fn in self.listeners:
            try:
                fn(events)
            except Exception:
                log.exception("EVT listener failed")

    def _observe(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, OrderAccepted):
                if ev.client_order_id:
                    self._coids[ev.order_id] = ev.client_order_id
                    if len(self._coids) > 1_000_000:
                        for k in list(self._coids)[:100_000]:
                            del self._coids[k]
            elif isinstance(ev, TradeExecuted):
                m = self.markets.get(ev.symbol)
                base = m.base if m else ""
                quote = m.quote if m else ""
                taker_buy = ev.taker_side == "BUY"
                oq = self._order_quote
                oq[ev.taker_order_id] = oq.get(ev.taker_order_id, 0) + ev.quote_amount
                oq[ev.maker_order_id] = oq.get(ev.maker_order_id, 0) + ev.quote_amount
                if len(oq) > 1_000_000:
                    for k in list(oq)[:100_000]:
                        del oq[k]
                for acct, oid, side, maker, fee, fee_asset in (
                    (ev.taker_account_id, ev.taker_order_id, "BUY" if taker_buy else "SELL", False,
                     ev.taker_fee, ev.taker_fee_asset or (base if taker_buy else quote)),
                    (ev.maker_account_id, ev.maker_order_id, "SELL" if taker_buy else "BUY", True,
                     ev.maker_fee, ev.maker_fee_asset or (quote if taker_buy else base)),
                ):
                    self._add_fill(acct, Fill(ev.trade_id, ev.symbol, oid, self._coids.get(oid, ""), side, maker,
                                              ev.price_ticks, ev.qty_lots, ev.quote_amount, fee, fee_asset,
                                              ev.occurred_at, ev.seq))

    def _add_fill(self, account: int, f: Fill) -> None:
        q = self._fills.get(account)
        if q is None:
            q = deque(maxlen=_FILLS_PER_ACCOUNT)
            self._fills[account] = q
            if len(self._fills) > _MAX_ACCOUNTS:
                self._fills.popitem(last=False)
        else:
            self._fills.move_to_end(account)
        q.append(f)

    def quote_filled(self, order_id: int) -> int | None:
        """Quote amount filled for an order, from the trades this process has seen (None: none seen)."""
        return self._order_quote.get(order_id)

    def fills(self, account_id: int, symbol: str | None = None, limit: int = 100,
              order_id: int | None = None) -> list[Fill]:
        """Newest first."""
        q = self._fills.get(account_id)
        if not q:
            return []
        out = []
        for f in reversed(q):
            if (symbol is None or f.symbol == symbol) and (order_id is None or f.order_id == order_id):
                out.append(f)
                if len(out) >= limit:
                    break
        return out

    # --- commands --------------------------------------------------------------------------------

    async def submit(self, cmd: Command, correlation_id: str, *, symbol: str | None = None,
                     until_done: Callable[[Event], bool] | None = None) -> CommandResult:
        """Publish ``cmd`` and wait for its events. Raises UPSTREAM_TIMEOUT (UNKNOWN) when none arrive
        in time, UNAVAILABLE when the command could not be handed to the bus (NOT_EXECUTED)."""
        if correlation_id in self._waiters:
            raise SpotexError("IDEMPOTENCY_IN_PROGRESS", detail="a command with this id is already in flight",
                              headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        w = _Waiter(loop.create_future(), until_done)
        self._waiters[correlation_id] = w
        M_INFLIGHT.inc()
        t0 = time.perf_counter()
        try:
            try:
                ack = await self.js.publish_async(cmd_subject(symbol), encode_request(cmd),
                                                  headers={"Nats-Msg-Id": correlation_id}, wait_stall=self._stall())
            except Exception as exc:
                raise SpotexError("UNAVAILABLE", detail="the command bus is not available",
                                  execution_status="NOT_EXECUTED") from exc
            # A timer on the waiter's own future, awaited directly: asyncio.wait_for(shield(fut))
            # costs two more trips through the event loop between the event's arrival and this
            # task's wakeup, and each trip is a whole loop iteration (milliseconds) on a busy edge.
            timer = loop.call_later(self.timeout_s, _expire, w.fut)
            try:
                events = await w.fut
            except TimeoutError:
                M_TIMEOUTS.inc()
                pub_failed = ack.done() and not ack.cancelled() and ack.exception() is not None
                if pub_failed:
                    raise SpotexError("UNAVAILABLE", detail="the command bus refused the command",
                                      execution_status="NOT_EXECUTED") from None
                raise SpotexError("UPSTREAM_TIMEOUT", execution_status="UNKNOWN",
                                  detail="no acknowledgement from the core in time; the order may or may not "
                                         "have executed: look it up by clientOrderId or retry with the same "
                                         "Idempotency-Key") from None
            finally:
                timer.cancel()
                if not ack.done():
                    ack.add_done_callback(_swallow)
                else:
                    _swallow(ack)
            dt = time.perf_counter() - t0
            M_ACK.observe(dt)
            return CommandResult(correlation_id, events, dt)
        finally:
            self._waiters.pop(correlation_id, None)
            M_INFLIGHT.dec()

    def _stall(self) -> float | None:
        """``wait_stall`` for ``publish_async``: None while its window of unacknowledged publishes has
        room. With a timeout, nats-py takes the window's semaphore through ``asyncio.wait_for``, which
        on Python 3.11 runs the acquire as a task of its own: three event-loop iterations before the
        command is even buffered, each several milliseconds on a busy edge. Without one, a free
        semaphore is taken at once. A full window (or a nats-py without that attribute) keeps the
        bounded wait, so a stalled bus still answers NOT_EXECUTED in time."""
        sem = getattr(self.js, "_publish_async_pending_semaphore", None)
        if isinstance(sem, asyncio.Semaphore) and not sem.locked():
            return None
        return self.timeout_s

    async def cancel_all_account(self, account_id: int, symbol: str | None, correlation_id: str) -> CommandResult:
        cmd = CancelAllAccount(account_id=account_id, symbol=symbol)
        return await self.submit(cmd, correlation_id, symbol=symbol,
                                 until_done=lambda e: isinstance(e, (CancelAllDone, CommandRejected, OrderRejected)))

    # --- queries ---------------------------------------------------------------------------------

    async def query(self, op: str, timeout: float = 2.0, **kw: Any) -> Any:
        req = {"op": op, **kw}
        try:
            msg = await self.nc.request(self.query_subject, msgspec.msgpack.encode(req), timeout=timeout)
        except Exception as exc:
            raise SpotexError("UNAVAILABLE", detail="the trading core did not answer") from exc
        resp = msgspec.msgpack.decode(msg.data)
        if isinstance(resp, dict) and set(resp) == {"error"}:
            raise SpotexError("UNAVAILABLE", detail="the trading core could not answer the query")
        return resp


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _swallow(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
