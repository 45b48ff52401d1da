"""The cockpit's data layer: every data source polled over HTTP (or read from the data dir), each
with its own LIVE / STALE / DISCONNECTED state and the age of its data.

- LIVE: the last poll succeeded and its data is younger than ``stale_after``.
- STALE: the last poll failed (or is late) but the data we still hold is younger than
  ``disconnect_after``; screens show it dimmed with its age.
- DISCONNECTED: never reached, or failing for longer than ``disconnect_after``; its data is dropped
  and every value that depends on it shows as a dash.

A failing source never raises out of :meth:`HttpPoller.poll`: losing a source never ends the cockpit.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from cockpit.metrics import Metrics, parse_metrics
from cockpit.signing import OperatorKey

__all__ = [
    "METRIC_SOURCES",
    "SOURCE_NAMES",
    "HttpPoller",
    "Poller",
    "Snapshot",
    "SourceState",
    "SourceStatus",
    "StaticPoller",
    "Tracker",
]


class SourceState(enum.StrEnum):
    LIVE = "LIVE"
    STALE = "STALE"
    DISCONNECTED = "DISCONNECTED"


# Services whose Prometheus /metrics feed the dashboards (names as in run/ports.json).
METRIC_SOURCES = ("core", "core-standby", "edge", "ledger", "exporter")
# Every source, in the order of the status bar.
SOURCE_NAMES = (*METRIC_SOURCES, "kafka", "admin", "audit", "market", "jobs", "throttles", "stack")


@dataclass
class SourceStatus:
    name: str
    state: SourceState
    age_s: float | None = None
    error: str | None = None

    def label(self) -> str:
        age = "-" if self.age_s is None else _age(self.age_s)
        return f"{self.name} {self.state.value} {age}"


def _age(s: float) -> str:
    if s < 10:
        return f"{s:.1f}s"
    if s < 120:
        return f"{s:.0f}s"
    return f"{s / 60:.0f}m"


@dataclass
class Snapshot:
    """What one poll round knows. Data of a DISCONNECTED source is absent (None / missing key)."""

    at: float
    sources: dict[str, SourceStatus]
    metrics: dict[str, Metrics] = field(default_factory=dict)
    # The previous good scrape of each metrics source and the seconds between the two (rates).
    prev_metrics: dict[str, tuple[Metrics, float]] = field(default_factory=dict)
    admin: dict[str, Any] | None = None
    audit: list[dict[str, Any]] | None = None
    markets: list[dict[str, Any]] | None = None
    tickers: dict[str, dict[str, Any]] = field(default_factory=dict)
    stack: dict[str, Any] | None = None
    # The scheduled checks (edge GET /v1/admin/jobs): name, schedule, next_run_at, last_run.
    jobs: list[dict[str, Any]] | None = None
    # The symbol throttles (edge GET /v1/admin/throttles): symbol -> {"layers": {layer: ...}, "enforced": ...};
    # a symbol absent from a present dict has no throttle.
    throttles: dict[str, dict[str, Any]] | None = None

    def state(self, name: str) -> SourceState:
        st = self.sources.get(name)
        return st.state if st is not None else SourceState.DISCONNECTED


class Tracker:
    """LIVE/STALE/DISCONNECTED bookkeeping of one source."""

    def __init__(self, name: str, stale_after: float, disconnect_after: float) -> None:
        self.name = name
        self.stale_after = stale_after
        self.disconnect_after = disconnect_after
        self.data: Any = None
        self.ok_at: float | None = None
        self.prev: Any = None
        self.prev_at: float | None = None
        self.error: str | None = "not polled yet"

    def ok(self, data: Any, now: float) -> None:
        self.prev, self.prev_at = self.data, self.ok_at
        self.data, self.ok_at, self.error = data, now, None

    def fail(self, error: str) -> None:
        self.error = error

    def status(self, now: float) -> SourceStatus:
        if self.ok_at is None:
            return SourceStatus(self.name, SourceState.DISCONNECTED, None, self.error)
        age = max(now - self.ok_at, 0.0)
        if age > self.disconnect_after:
            return SourceStatus(self.name, SourceState.DISCONNECTED, age, self.error)
        if self.error is not None or age > self.stale_after:
            return SourceStatus(self.name, SourceState.STALE, age, self.error)
        return SourceStatus(self.name, SourceState.LIVE, age, None)

    def current(self, now: float) -> Any:
        return None if self.status(now).state is SourceState.DISCONNECTED else self.data


class Poller(Protocol):
    edge_url: str | None
    key: OperatorKey | None

    async def poll(self) -> Snapshot: ...

    async def aclose(self) -> None: ...


class SourceError(Exception):
    pass


def _problem_text(r: httpx.Response) -> str:
    """``HTTP 503 UNAVAILABLE: <detail>`` from a problem+json answer (or the bare status)."""
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("code"):
        return f"HTTP {r.status_code} {body['code']}: {body.get('detail') or ''}".rstrip(": ")[:160]
    return f"HTTP {r.status_code}"


def _short(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    text = str(exc) or type(exc).__name__
    return text[:120]


class HttpPoller:
    """Polls a running stack: the ports recorded in ``<data_dir>/run/ports.json`` (re-read every
    round, services restart on new ports) or a remote edge given by URL."""

    def __init__(self, data_dir: Path | None, edge_url: str | None = None, key: OperatorKey | None = None,
                 *, clock: Callable[[], float] = time.time, timeout: float = 2.0, stale_after: float = 5.0,
                 disconnect_after: float = 20.0, audit_limit: int = 100) -> None:
        self.data_dir = data_dir
        self._edge_override = edge_url.rstrip("/") if edge_url else None
        self.edge_url: str | None = self._edge_override
        self.key = key
        self.clock = clock
        self.audit_limit = audit_limit
        self._client = httpx.AsyncClient(timeout=timeout)
        self.trackers = {n: Tracker(n, stale_after, disconnect_after) for n in SOURCE_NAMES}

    async def aclose(self) -> None:
        await self._client.aclose()

    def _read_json(self, name: str) -> Any:
        if self.data_dir is None:
            raise SourceError("no data dir (remote mode)")
        try:
            return json.loads((self.data_dir / "run" / name).read_text())
        except FileNotFoundError:
            raise SourceError(f"no {name}: is the stack up?") from None

    def _ports(self) -> dict[str, int]:
        try:
            raw = self._read_json("ports.json")
        except (SourceError, json.JSONDecodeError):
            return {}
        return {k: int(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    async def _get_json(self, url: str, path: str, signed: bool = False) -> Any:
        headers: dict[str, str] = {}
        if signed:
            if self.key is None:
                raise SourceError("no operator key (read-only)")
            headers = self.key.headers("GET", path)
        r = await self._client.get(url + path, headers=headers)
        if r.status_code >= 400:
            raise SourceError(_problem_text(r))
        return r.json()

    async def _metrics(self, url: str) -> Metrics:
        r = await self._client.get(url + "/metrics")
        r.raise_for_status()
        return parse_metrics(r.text)

    async def _kafka(self, port: int | None) -> dict[str, Any]:
        if port is None:
            raise SourceError("no kafka endpoint")
        t0 = time.perf_counter()
        _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
        w.close()
        return {"reachable": True, "connect_ms": (time.perf_counter() - t0) * 1000}

    async def _market(self, edge: str) -> dict[str, Any]:
        markets = await self._get_json(edge, "/v1/markets")
        tickers: dict[str, dict[str, Any]] = {}

        async def one(sym: str) -> None:
            try:
                tickers[sym] = await self._get_json(edge, f"/v1/markets/{sym}/ticker")
            except Exception:
                pass  # the market-data endpoints may not exist: the markets screen shows dashes

        await asyncio.gather(*(one(str(m.get("symbol"))) for m in markets if isinstance(m, dict)))
        return {"markets": markets, "tickers": tickers}

    async def poll(self) -> Snapshot:
        ports = self._ports()
        self.edge_url = self._edge_override or (f"http://127.0.0.1:{ports['edge']}" if "edge" in ports else None)
        edge = self.edge_url
        jobs: dict[str, Awaitable[Any]] = {}

        async def missing(why: str) -> Any:
            raise SourceError(why)

        for name in METRIC_SOURCES:
            if name == "edge" and edge is not None:
                jobs[name] = self._metrics(edge)
            elif name in ports and (name != "edge" or self._edge_override is None):
                jobs[name] = self._metrics(f"http://127.0.0.1:{ports[name]}")
            else:
                jobs[name] = missing(f"no {name} endpoint")
        jobs["kafka"] = self._kafka(ports.get("kafka"))
        if edge is None:
            for n in ("admin", "audit", "market"):
                jobs[n] = missing("no edge endpoint")
        else:
            jobs["admin"] = self._get_json(edge, "/v1/admin/status", signed=True)
            jobs["audit"] = self._get_json(edge, f"/v1/admin/audit?limit={self.audit_limit}", signed=True)
            jobs["market"] = self._market(edge)
        jobs["jobs"] = self._get_json(edge, "/v1/admin/jobs", signed=True) if edge is not None \
            else missing("no edge endpoint")
        jobs["throttles"] = self._get_json(edge, "/v1/admin/throttles", signed=True) if edge is not None \
            else missing("no edge endpoint")

        async def stack() -> Any:
            return self._read_json("state.json")

        jobs["stack"] = stack()
        names = list(jobs)
        results = await asyncio.gather(*jobs.values(), return_exceptions=True)
        now = self.clock()
        for name, res in zip(names, results, strict=True):
            tr = self.trackers[name]
            if isinstance(res, BaseException):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                tr.fail(_short(res))
            else:
                tr.ok(res, now)
        return self._snapshot(now)

    def _snapshot(self, now: float) -> Snapshot:
        tr = self.trackers
        snap = Snapshot(at=now, sources={n: t.status(now) for n, t in tr.items()})
        for name in METRIC_SOURCES:
            cur = tr[name].current(now)
            if cur is None:
                continue
            snap.metrics[name] = cur
            t = tr[name]
            if t.prev is not None and t.prev_at is not None and t.ok_at is not None:
                snap.prev_metrics[name] = (t.prev, t.ok_at - t.prev_at)
        snap.admin = tr["admin"].current(now)
        snap.audit = tr["audit"].current(now)
        market = tr["market"].current(now)
        if market is not None:
            snap.markets = market["markets"]
            snap.tickers = market["tickers"]
        snap.stack = tr["stack"].current(now)
        jobs = tr["jobs"].current(now)
        snap.jobs = jobs.get("jobs") if isinstance(jobs, dict) and isinstance(jobs.get("jobs"), list) else None
        th = tr["throttles"].current(now)
        snap.throttles = th.get("throttles") if isinstance(th, dict) and isinstance(th.get("throttles"), dict) \
            else None
        return snap


class StaticPoller:
    """A poller that returns a prepared snapshot (presentation tests: STALE and DISCONNECTED)."""

    def __init__(self, snapshot: Snapshot, edge_url: str | None = None, key: OperatorKey | None = None) -> None:
        self.snapshot = snapshot
        self.edge_url = edge_url
        self.key = key

    async def poll(self) -> Snapshot:
        return self.snapshot

    async def aclose(self) -> None:
        return None
