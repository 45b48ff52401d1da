"""Per-symbol order throttle: a limit on NEW orders per second on one symbol, across all traders.

Seed §3.2 ("settlement lag > T2: throttle new orders for affected symbols"). Cancels, amends and
queries are never throttled: they reduce risk or read state, and a throttle must never stop a trader
from getting out.

Where the state lives: the JetStream KV bucket ``symbol_throttle`` (``core.bus``), one key per
symbol and layer (``<symbol>.operator``, ``<symbol>.policy``). Every edge process watches the
bucket; the watch starts with the last value of every key, so a restarted edge (or a new replica)
enforces what was set before it started, and a change reaches every edge within a NATS round trip.
Writers (the admin API, the jobs service's settlement-lag policy) append their audit entry first
and then write the key. Why a KV bucket and not a core mode or command: the throttle is a wall-clock
rate, which has no place in the deterministic core (a replay must not depend on how fast orders
arrived); refusing at the edge also keeps the excess off CMD, the core and the ledger, which is the
point when the ledger is the one lagging. The two layers keep the operator's throttle and the
policy's apart: the policy sets and lifts only its own, never an operator's.

Enforcement: the strictest layer present wins. One token bucket per throttled symbol (refill
``orders_per_s``, capacity ``burst``) in each edge process, O(1) and no I/O on the order path. A
refused order is ``429 SYMBOL_THROTTLED`` with ``Retry-After`` (the facade: ``-1015``) and counts in
``edge_symbol_throttle_drops_total{symbol}``. With N edge processes the aggregate ceiling is N times
the rate (as for the per-key limits, docs/security.md); this deployment runs one edge process.

Until the bucket's current content is loaded the edge is not ready (``/readyz`` 503), so a starting
edge never serves orders without the throttles it should enforce.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge

from core.aio import stop_tasks
from core.bus import (
    THROTTLE_LAYERS,
    SymbolThrottle,
    decode_setting,
    read_settings,
    read_values,
    setting_for_key,
    throttle_bucket,
)
from edge.errors import SpotexError
from edge.ratelimit import TokenBucketLimiter

__all__ = ["DROPS", "ThrottleBook", "decode_setting", "read_settings"]

log = logging.getLogger("edge.throttle")

DROPS = Counter("edge_symbol_throttle_drops", "New orders refused by a symbol throttle", ["symbol"])
ACTIVE = Gauge("edge_symbol_throttle_orders_per_s", "Effective throttle of a symbol (orders/s; 0 = none)",
               ["symbol"])

class ThrottleBook:
    """The edge's copy of ``symbol_throttle`` and the token buckets that enforce it."""

    RESYNC_S = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.settings: dict[str, dict[str, SymbolThrottle]] = {}
        self._limits: dict[str, TokenBucketLimiter] = {}
        self.loaded = False
        self.drops: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    # --- state -----------------------------------------------------------------------------------

    def effective(self, symbol: str) -> SymbolThrottle | None:
        """The strictest layer on ``symbol`` (lowest rate, then lowest burst), or None."""
        layers = self.settings.get(symbol)
        if not layers:
            return None
        return min(layers.values(), key=lambda s: (s.orders_per_s, s.burst))

    def apply(self, key: str, value: bytes | None) -> None:
        """One KV update: ``value`` None (a delete or purge) removes that layer."""
        symbol, _, layer = key.rpartition(".")
        if not symbol or layer not in THROTTLE_LAYERS:
            log.warning("ignoring symbol_throttle key %r", key)
            return
        if value is None:
            self.settings.get(symbol, {}).pop(layer, None)
        else:
            s = setting_for_key(key, value)
            if s is None:
                log.warning("ignoring invalid symbol_throttle value under %r", key)
                return
            self.settings.setdefault(symbol, {})[layer] = s
        self._retune(symbol)

    def set_local(self, s: SymbolThrottle) -> None:
        """Apply a setting this process just wrote (its watch delivers the same value again)."""
        self.settings.setdefault(s.symbol, {})[s.layer] = s
        self._retune(s.symbol)

    def clear_local(self, symbol: str, layer: str) -> None:
        self.settings.get(symbol, {}).pop(layer, None)
        self._retune(symbol)

    def _retune(self, symbol: str) -> None:
        eff = self.effective(symbol)
        if eff is None:
            self.settings.pop(symbol, None)
            self._limits.pop(symbol, None)
            ACTIVE.labels(symbol).set(0)
            return
        lim = self._limits.get(symbol)
        if lim is None:
            self._limits[symbol] = TokenBucketLimiter(eff.orders_per_s, eff.burst, scope="symbol", max_buckets=1,
                                                      clock=self._clock, count_drops=False)
        elif (lim.rate, lim.burst) != (float(eff.orders_per_s), eff.burst):
            lim.retune(eff.orders_per_s, eff.burst)
        ACTIVE.labels(symbol).set(eff.orders_per_s)

    # --- the order path --------------------------------------------------------------------------

    def check(self, symbol: str) -> None:
        """Charge one new order on ``symbol``; raise 429 SYMBOL_THROTTLED when it is over."""
        lim = self._limits.get(symbol)
        if lim is None:
            return
        d = lim.take(symbol)
        if d.allowed:
            return
        DROPS.labels(symbol).inc()
        self.drops[symbol] = self.drops.get(symbol, 0) + 1
        eff = self.effective(symbol)
        rate = f"{eff.orders_per_s} new orders/s (burst {eff.burst}, {eff.layer})" if eff else "its throttle"
        raise SpotexError("SYMBOL_THROTTLED", detail=f"{symbol} is throttled to {rate}; retry after "
                          f"{d.retry_after_s} s", headers={"Retry-After": str(d.retry_after_s or 1)},
                          execution_status="NOT_EXECUTED")

    def snapshot(self) -> dict[str, Any]:
        """What this edge enforces now, for the admin API."""
        out: dict[str, Any] = {}
        for sym in sorted(self.settings):
            eff = self.effective(sym)
            if eff is None:
                continue
            out[sym] = {"ordersPerSecond": eff.orders_per_s, "burst": eff.burst, "layer": eff.layer,
                        "drops": self.drops.get(sym, 0)}
        return out

    # --- the watch -------------------------------------------------------------------------------

    async def start(self, js: Any, *, load_timeout_s: float = 10.0) -> None:
        """Watch the bucket in the background; wait (up to ``load_timeout_s``) for its current
        content. If it cannot be loaded yet, the edge stays not ready and the watch keeps retrying."""
        loaded = asyncio.Event()
        self._task = asyncio.create_task(self._run(js, loaded), name="symbol-throttle-watch")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(loaded.wait(), load_timeout_s)
        if not self.loaded:
            log.error("symbol_throttle not loaded after %.0f s; the edge stays not ready until it is", load_timeout_s)

    async def stop(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None

    async def _run(self, js: Any, loaded: asyncio.Event) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        while True:
            try:
                kv = await throttle_bucket(js)
                w = await kv.watchall()
                # A (re)started watch replays the last value of every key; at the end of that replay
                # the book is rebuilt from the bucket's content, so a delete missed while disconnected
                # cannot leave a stale throttle behind. The content is read directly (core.bus.read_values)
                # because the watcher's end marker can come before entries the server already pushed;
                # the replayed entries themselves are what that read returns, so they are skipped, and
                # what the watch delivers after the marker is applied on top, newest last. The watch
                # is renewed after RESYNC_S without updates, so a consumer lost silently (server
                # restart) costs at most that long.
                initial = True
                try:
                    while True:
                        try:
                            e = await w.updates(timeout=self.RESYNC_S)
                        except NatsTimeout:
                            break
                        if e is None:  # the watcher's end of the current content
                            if initial:
                                self._replace({k: raw for k, (raw, _rev) in (await read_values(js)).items()})
                                initial = False
                                self.loaded = True
                                loaded.set()
                            continue
                        if not hasattr(e, "key"):  # the watcher was stopped
                            break
                        if not initial:
                            self.apply(e.key, e.value if e.operation is None and e.value else None)
                finally:
                    with contextlib.suppress(Exception):
                        await w.stop()
                if not initial:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("symbol_throttle watch failed; retrying")
            await asyncio.sleep(1.0)

    def _replace(self, values: dict[str, bytes]) -> None:
        old = set(self.settings)
        self.settings = {}
        for key, value in values.items():
            self.apply(key, value)
        for sym in old - set(self.settings):
            self._retune(sym)
