"""Observability base shared by every spotex service.

- Structured JSON logs through the stdlib ``logging`` module, with ONE redaction point
  (:func:`redact`) applied to every record, so secrets and personal data cannot reach a log
  line by a path that forgot to scrub them.
- A tiny asyncio HTTP server for the probes every service exposes: ``/healthz`` (process is
  alive), ``/readyz`` (503 with the reason while a dependency is not ready) and ``/metrics``
  (prometheus-client text format). The edge serves the same three routes from Litestar.
- ``event_loop_lag_seconds``: how late the service's event loop wakes a timer (:func:`loop_lag_monitor`,
  run by the probe server and by the edge). In an asyncio service every hop of a request (a socket
  read, a future's result, a task's wakeup) waits for its turn in the loop, so a lag of a few
  milliseconds multiplies into tens of milliseconds per request: it is the first thing to look at
  when latency rises with load (docs/performance.md, "Where an order's 50 ms go").

- ``python_gc_pause_seconds_total`` / ``python_gc_pause_max_seconds`` (by generation): the time the
  cyclic garbage collector stopped the process (:func:`install_gc_timer`, installed with the lag
  monitor). A collection stops the event loop like any other callback; these say how much of the
  loop lag it explains (docs/performance.md, "Where the edge's CPU goes, and its garbage collector").

It lives in ``core`` because ``core`` depends on nothing of ours and every other service may
depend on ``core``; it holds no trading logic.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from core.aio import stop_tasks

__all__ = [
    "M_LOOP_LAG",
    "JsonFormatter",
    "ProbeServer",
    "ReadinessCheck",
    "configure_logging",
    "freeze_heap",
    "install_gc_timer",
    "loop_lag_monitor",
    "redact",
]

M_LOOP_LAG = Histogram("event_loop_lag_seconds", "How late the event loop woke a timer (sampled every 0.25 s)",
                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))


def freeze_heap(log: logging.Logger, reason: str, gen0_threshold: int = 0) -> None:
    """Collect once, then move everything alive (imported modules, the app, recovered books and
    balances) out of the cyclic GC's generations. A full collection then walks only what was allocated
    since instead of the whole start-up heap: after a 300,000-record replay a full collection of the
    core took ~20 ms, and ~0 ms once frozen; under a 30,000-order load the edge spent 1.81 s of CPU in
    the collector (worst collection 58 ms), and 0.96 s (33 ms) frozen. Frozen objects are still freed
    by reference counting; only cycles among them would outlive their use.

    ``gen0_threshold`` > 0 also sets the young generation's threshold (the older two keep theirs): a
    process whose requests hold many short-lived objects at once otherwise collects over and over
    what reference counting frees a moment later."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    if gen0_threshold > 0:
        _, g1, g2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, g1, g2)
    log.info("heap frozen", extra={"reason": reason, "frozen_objects": gc.get_freeze_count(),
                                   "gc_threshold": gc.get_threshold(),
                                   "ms": round((time.perf_counter() - t0) * 1000, 1)})


class _GcTimer:
    """Times each collection from gc.callbacks into plain lists: no metric lock is taken inside the
    collector (a scrape that allocates while holding one could start a collection and deadlock);
    the collector object below reads them at scrape time."""

    def __init__(self) -> None:
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        d = time.perf_counter() - self._t0
        g = info["generation"]
        self.total_s[g] += d
        if d > self.max_s[g]:
            self.max_s[g] = d

    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily("python_gc_pause", "Time the cyclic GC stopped the process, by generation",
                                    labels=["generation"], unit="seconds")
        worst = GaugeMetricFamily("python_gc_pause_max_seconds", "Longest single collection since start, "
                                  "by generation", labels=["generation"])
        for g in range(3):
            total.add_metric([str(g)], self.total_s[g])
            worst.add_metric([str(g)], self.max_s[g])
        yield total
        yield worst


_GC_TIMER: _GcTimer | None = None


def install_gc_timer() -> None:
    """Time every garbage collection of this process into the default registry (once per process)."""
    global _GC_TIMER
    if _GC_TIMER is None:
        _GC_TIMER = _GcTimer()
        gc.callbacks.append(_GC_TIMER)
        REGISTRY.register(_GC_TIMER)


async def loop_lag_monitor(interval_s: float = 0.25, stop: asyncio.Event | None = None,
                           observe: Callable[[float], None] = M_LOOP_LAG.observe) -> None:
    """Sleep ``interval_s`` again and again and record by how much each wakeup came late: the time
    the loop's other callbacks kept this one waiting. Runs until cancelled or ``stop`` is set."""
    clock = time.perf_counter  # not loop.time(): uvloop's has a 1 ms granularity
    while stop is None or not stop.is_set():
        t0 = clock()
        await asyncio.sleep(interval_s)
        observe(max(0.0, clock() - t0 - interval_s))

# Keys whose values never appear in logs, whatever their nesting.
_SECRET_KEY_RE = re.compile(
    r"(secret|password|passwd|token|signature|api[_-]?key|private|authorization|dsn|email|phone|seed)",
    re.IGNORECASE,
)
# Values that look like secrets or personal data even under an innocent key.
_VALUE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+(?=@)"), "***:***"),  # credentials in URLs
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "***@***"),  # e-mail addresses
    (re.compile(r"\b[0-9a-fA-F]{64,}\b"), "***"),  # long hex: keys, HMACs
)


# Keys whose values are public by design even though they look like secrets (a hash, a lease
# revision): listed one by one, so nothing else slips through.
_PUBLIC_KEYS = frozenset({
    "fencing_token", "old_token", "new_token", "state_hash", "own", "leader", "hash", "prev_hash", "head_hash",
    "sha256", "core_recovery_hash", "core_precrash_wal_hash", "reference_state_hash", "restored_state_hash",
})


def redact(value: Any, key: str = "") -> Any:
    """Return ``value`` with secrets and personal data masked. The single redaction point."""
    if key in _PUBLIC_KEYS:
        return value
    if key and _SECRET_KEY_RE.search(key):
        return "***" if value not in (None, "") else value
    if isinstance(value, str):
        for pattern, repl in _VALUE_PATTERNS:
            value = pattern.sub(repl, value)
        return value
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key) for v in value]
    return value


_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, service, msg, and the record's extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created * 1000),
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(redact(out), default=str, separators=(",", ":"))


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route the root logger to stderr as redacted JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else a short reason (e.g. 'postgres: connection refused')."""


class ProbeServer:
    """Serves /healthz, /readyz and /metrics on an asyncio socket, with no web framework."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        service: str,
        readiness: list[tuple[str, ReadinessCheck]] | None = None,
        registry: CollectorRegistry = REGISTRY,
        extra_routes: Mapping[str, Callable[[], Awaitable[dict[str, Any]]]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.service = service
        self.readiness = list(readiness or [])
        self.registry = registry
        self.extra_routes = dict(extra_routes or {})
        self.started_at = time.time()
        self._server: asyncio.AbstractServer | None = None
        self._lag: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        install_gc_timer()
        self._lag = asyncio.create_task(loop_lag_monitor(), name="loop-lag")
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._lag is not None:
            await stop_tasks([self._lag])
            self._lag = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def ready_reason(self) -> str | None:
        for name, check in self.readiness:
            try:
                reason = await asyncio.wait_for(check(), timeout=2.0)
            except Exception as exc:  # a probe must answer, whatever the dependency does
                reason = f"{type(exc).__name__}: {exc}"
            if reason is not None:
                return f"{name}: {reason}"
        return None

    async def _route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            body = {"status": "ok", "service": self.service, "uptime_s": round(time.time() - self.started_at, 3)}
            return 200, "application/json", json.dumps(body).encode()
        if path == "/readyz":
            reason = await self.ready_reason()
            if reason is None:
                return 200, "application/json", json.dumps({"status": "ready", "service": self.service}).encode()
            body = {"status": "not_ready", "service": self.service, "reason": reason}
            return 503, "application/json", json.dumps(body).encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path in self.extra_routes:
            data = await self.extra_routes[path]()
            return 200, "application/json", json.dumps(data, default=str).encode()
        return 404, "application/problem+json", json.dumps(
            {"type": "about:blank", "title": "Not Found", "status": 404, "code": "NOT_FOUND"}).encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5.0)
            while True:  # drain headers; probes carry no body
                line = await asyncio.wait_for(reader.readline(), timeout=5.0)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request_line.decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            else:
                status, ctype, body = await self._route(parts[1].split("?", 1)[0])
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
            head = (
                f"HTTP/1.1 {status} {reason.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head + (b"" if parts and parts[0] == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
