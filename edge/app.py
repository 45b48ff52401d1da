"""The edge's Litestar application: wiring, probes, metrics and the one error renderer.

``create_app(cfg, nats_url=..., pg_dsn=..., data_dir=...)`` returns an app whose lifespan connects
NATS (commands, events, queries) and PostgreSQL (API keys, idempotency, audit), and builds the
security primitives of ``edge.auth`` / ``edge.ratelimit`` / ``edge.idempotency``. Routes live in
``edge.orders`` (trading), ``edge.account``, ``edge.admin`` (operators) and ``edge.binance`` (the
Binance-compatible facade); market data comes from ``edge.marketdata`` / ``edge.ws`` when present.

Every error is a :class:`~edge.errors.SpotexError` rendered as RFC 9457 problem+json (Binance's
``{"code","msg"}`` under ``/api/v3``); anything else is an opaque 500. Litestar's own errors (bad
body, unknown route, wrong method) are mapped onto the same stable codes, so bad input is never a
5xx and an error never rides inside a 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from core.aio import stop_tasks
from core.obs import install_gc_timer, loop_lag_monitor
from core.wire import MarketConfig, SymbolModeChanged, WithdrawalsHaltChanged, market_config_diff
from edge.auth import (
    KeyStore,
    OperatorIdentity,
    OperatorKeyStore,
    OperatorVerifier,
    Principal,
    RequestVerifier,
    SecretBox,
    path_with_query,
)
from edge.core_client import CoreClient
from edge.errors import PROBLEM_CONTENT_TYPE, SpotexError, to_binance, to_problem
from edge.idempotency import IdempotencyStore, StoredResponse, fingerprint
from edge.idempotency import run as idem_run
from edge.ratelimit import EdgeRateLimiter
from spotex.config import Config, market_configs

__all__ = ["MAX_BODY", "Call", "EdgeState", "create_app", "edge_state", "json_response", "observe_request",
           "problem_stored", "render_error", "signed_target", "stored_response"]

log = logging.getLogger("edge.app")

M_LATENCY = Histogram("edge_http_request_seconds", "Edge HTTP request latency by route", ["method", "route"],
                      buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0))
M_REQUESTS = Counter("edge_http_requests", "Edge HTTP requests by route and status class",
                     ["method", "route", "status"])
M_ERRORS = Counter("edge_http_errors", "Edge HTTP error responses by stable code", ["code"])
M_MAPPING = Gauge("edge_market_mapping_mismatch", "Markets this edge defines differently from the matching engine")

_JSON = msgspec.json.Encoder()
MAX_BODY = 64 * 1024  # bytes of a request body; more is 413 PAYLOAD_TOO_LARGE


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(content=_JSON.encode(data), status_code=status, media_type=MediaType.JSON,
                    headers=headers or {})


def stored_response(resp: StoredResponse) -> Response[Any]:
    """A stored (or freshly built) answer as a Litestar response."""
    headers = dict(resp.headers)
    media = headers.pop("content-type", MediaType.JSON)
    return Response(content=resp.body, status_code=resp.status, media_type=media, headers=headers)


def problem_stored(exc: SpotexError, instance: str, *, order_call: bool) -> StoredResponse:
    body = _JSON.encode(to_problem(exc, instance, order_call=order_call))
    return StoredResponse(exc.status, body, {"content-type": PROBLEM_CONTENT_TYPE, **exc.headers})


@dataclass(slots=True)
class Call:
    """What authentication, rate limiting and idempotency read of one HTTP request, whichever
    front parsed it (a Litestar ``Request`` through :meth:`EdgeState.call_of`, or ``edge.fastpath``)."""

    ip: str
    method: str
    path: str  # the decoded path: a problem's ``instance``
    target: str  # raw path and query as the client signed them
    body: bytes
    headers: Mapping[str, str]  # read with lower-case names
    state: dict[str, Any]  # the scope's state: ``rl_headers`` once the request is charged


@dataclass
class EdgeState:
    """Everything the handlers share; one per app (``app.state.edge``)."""

    cfg: Config
    markets: dict[str, MarketConfig]
    asset_scales: dict[str, int]
    nc: Any = None
    js: Any = None
    pool: Any = None
    keys: KeyStore | None = None
    verifier: RequestVerifier | None = None
    op_verifier: OperatorVerifier | None = None
    limiter: EdgeRateLimiter | None = None
    idem: IdempotencyStore | None = None
    core: CoreClient | None = None
    md: Any = None
    hub: Any = None
    modes: dict[str, str] = field(default_factory=dict)
    throttle: Any = None  # edge.throttle.ThrottleBook: per-symbol new-order throttles (symbol_throttle KV)
    withdrawals_halted: bool | None = None
    # symbol -> {field: (this edge's, the engine's)}: markets this edge maps differently from the core
    mapping_mismatch: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)
    mapping_checked: bool = False
    started_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    _ready_cache: tuple[float, str | None] = (0.0, "starting")

    # --- auth helpers --------------------------------------------------------------------------

    def client_ip(self, request: Request[Any, Any, Any]) -> str:
        c = request.client
        return c.host if c is not None else "unknown"

    def refuse_blocked(self, ip: str) -> None:
        """429 for an IP the limiter has blocked, before any signature work."""
        assert self.limiter is not None
        blocked = self.limiter.ip_blocked(ip)
        if blocked is not None:
            blocked.raise_if_denied()

    async def signed_parts(self, request: Request[Any, Any, Any]) -> tuple[str, bytes, str]:
        """(client ip, raw body, signed target) of a signed request, after refusing a blocked IP."""
        ip = self.client_ip(request)
        self.refuse_blocked(ip)
        return ip, await request.body(), signed_target(request.scope)

    async def call_of(self, request: Request[Any, Any, Any]) -> Call:
        """The parts of a Litestar request that authentication and idempotency read."""
        return Call(ip=self.client_ip(request), method=request.method, path=request.url.path,
                    target=signed_target(request.scope), body=await request.body(), headers=request.headers,
                    state=_scope_state(request.scope))

    async def authenticate(self, request: Request[Any, Any, Any], scope: str) -> Principal:
        """Verify the native signed headers, charge the rate limits, record the RateLimit headers."""
        return await self.authenticate_call(await self.call_of(request), scope)

    async def authenticate_call(self, call: Call, scope: str) -> Principal:
        """:meth:`authenticate` on a request's parts (the Litestar route and ``edge.fastpath`` both
        come here): a blocked IP first, then the signature, then the key's and the IP's buckets."""
        assert self.verifier is not None and self.limiter is not None
        self.refuse_blocked(call.ip)
        h = call.headers
        try:
            p = await self.verifier.verify(api_key=h.get("x-api-key"), ts=h.get("x-ts"),
                                           signature=h.get("x-signature"), method=call.method,
                                           path_with_query=call.target, body=call.body, required_scope=scope)
        except SpotexError:
            # Unknown keys and failed auth pay the IP's bucket (the limiter counts the drop).
            self.limiter.check(ip=call.ip).raise_if_denied()
            raise
        d = self.limiter.check(ip=call.ip, api_key=p.api_key)
        d.raise_if_denied()
        call.state["rl_headers"] = d.headers()
        return p

    async def authenticate_operator(self, request: Request[Any, Any, Any], role: str) -> OperatorIdentity:
        assert self.op_verifier is not None and self.limiter is not None
        ip, body, pwq = await self.signed_parts(request)
        h = request.headers
        try:
            return await self.op_verifier.verify_operator_request(
                key=h.get("x-api-key"), ts=h.get("x-ts"), signature=h.get("x-signature"), method=request.method,
                path_with_query=pwq, body=body, required_role=role)
        except SpotexError:
            d = self.limiter.check(ip=ip)
            d.raise_if_denied()
            raise

    def public_rate(self, request: Request[Any, Any, Any], cost: int = 1) -> None:
        """Charge an unauthenticated request to its IP's bucket."""
        assert self.limiter is not None
        d = self.limiter.check(ip=self.client_ip(request), cost=cost)
        d.raise_if_denied()
        _scope_state(request.scope)["rl_headers"] = d.headers()

    async def idempotent_call(self, call: Call, principal: Principal,
                              handler: Callable[[], Awaitable[StoredResponse]], *, order_call: bool,
                              key: str | None) -> StoredResponse:
        """Run ``handler`` under the Idempotency-Key ``key`` (None: no key). A handler's definitive
        4xx (a core reject, a validation error) is stored and replayed; an UNKNOWN outcome releases
        the key."""
        assert self.idem is not None

        async def run() -> StoredResponse:
            try:
                return await handler()
            except SpotexError as exc:
                # A 429 (rate limit, symbol throttle) is not the request's outcome: a retry may pass.
                if exc.status < 500 and not exc.code.startswith("IDEMPOTENCY_") and exc.status != 429:
                    return problem_stored(exc, call.path, order_call=order_call)
                raise

        if key is None:
            return await run()
        fp = fingerprint(call.method, call.target, call.body, principal.api_key)
        return await idem_run(self.idem, principal.api_key, key, fp, run)

    # --- readiness -------------------------------------------------------------------------------

    async def ready_reason(self) -> str | None:
        now = time.monotonic()
        at, reason = self._ready_cache
        if now - at < 1.0:
            return reason
        reason = await self._check_ready()
        self._ready_cache = (now, reason)
        return reason

    async def _check_ready(self) -> str | None:
        if self.nc is None or not self.nc.is_connected:
            return "nats: not connected"
        if self.pool is None:
            return "postgres: no pool"
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), 2.0)
        except Exception as exc:
            return f"postgres: {type(exc).__name__}"
        if self.core is None:
            return "core: no client"
        if self.throttle is not None and not self.throttle.loaded:
            return "throttle: symbol_throttle not loaded"
        try:
            st = await self.core.query("status", timeout=1.5)
        except SpotexError:
            return "core: no leader answering queries"
        if not isinstance(st, dict) or st.get("role") != "leader":
            return f"core: role {st.get('role') if isinstance(st, dict) else '?'}"
        if not self.mapping_checked:  # _mapping_loop compares as soon as the core answers
            return "core: market definitions not compared yet"
        return None

    def check_mapping(self, symbol: str) -> None:
        """Refuse a new order or an amend on a market this edge defines differently from the engine
        (409 MARKET_MAPPING_MISMATCH): its decimal-to-integer conversion would mis-scale the order."""
        if not self.mapping_checked:
            raise SpotexError("MARKET_DEFINITIONS_PENDING", detail="the engine's market definitions are not known "
                              "to this edge yet (the core has not answered)")
        diff = self.mapping_mismatch.get(symbol)
        if diff:
            fields = ", ".join(f"{k} {a!r} here vs {b!r} in the engine" for k, (a, b) in sorted(diff.items()))
            raise SpotexError("MARKET_MAPPING_MISMATCH", detail=f"{symbol}: {fields}")

    async def refresh_mapping(self) -> bool:
        """Compare this edge's markets with the engine's (core query ``markets``); False when the
        core did not answer (nothing learned)."""
        if self.core is None:
            return False
        try:
            views = await self.core.query("markets", timeout=2.0)
        except SpotexError:
            return False
        engine = {v["symbol"]: v for v in views or [] if isinstance(v, dict) and "symbol" in v}
        diffs = {sym: market_config_diff(m, engine[sym]) for sym, m in self.markets.items() if sym in engine}
        found = {sym: d for sym, d in diffs.items() if d}
        for sym in set(found) - set(self.mapping_mismatch):
            log.error("market definition differs from the engine's: new orders refused",
                      extra={"symbol": sym, "fields": found[sym]})
        self.mapping_mismatch = found
        self.mapping_checked = True
        M_MAPPING.set(len(found))
        return True

    async def symbol_modes(self) -> dict[str, str]:
        """Modes per symbol: learned from the core's book query once, then kept by events."""
        if self.core is not None and len(self.modes) < len(self.markets):
            for sym in self.markets:
                if sym in self.modes:
                    continue
                with contextlib.suppress(SpotexError):
                    bv = await self.core.query("book", symbol=sym, depth=0)
                    if isinstance(bv, dict) and "mode" in bv:
                        self.modes.setdefault(sym, str(bv["mode"]))
        return dict(self.modes)

    async def withdrawals_state(self) -> bool | None:
        """Whether withdrawals are halted: what this edge saw on EVT, else the core's own answer
        (``status`` carries ``withdrawals_halted``), else the ledger's copy of the flag
        (``ledger_core_flags``, settled from the same event). None only when none of them knows."""
        if self.withdrawals_halted is not None:
            return self.withdrawals_halted
        if self.core is not None:
            with contextlib.suppress(SpotexError):
                st = await self.core.query("status", timeout=1.0)
                if isinstance(st, dict) and isinstance(st.get("withdrawals_halted"), bool):
                    self.withdrawals_halted = st["withdrawals_halted"]
                    return self.withdrawals_halted
        if self.pool is not None:
            # Not cached: the ledger may lag the core; the next WithdrawalsHaltChanged event or a
            # core that answers takes over.
            with contextlib.suppress(Exception):
                v = await self.pool.fetchval("SELECT value FROM ledger_core_flags WHERE name = 'withdrawals_halt'")
                if v is not None:
                    return str(v) == "on"
        return None

    def on_events(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, SymbolModeChanged):
                self.modes[ev.symbol] = str(ev.mode)
            elif isinstance(ev, WithdrawalsHaltChanged):
                self.withdrawals_halted = ev.on


def _scope_state(scope: Any) -> dict[str, Any]:
    """The ASGI scope's ``state`` dict, where the RateLimit headers of a charged request wait for
    the response (``_metrics_middleware`` adds them to a success, the error renderer to an error)."""
    st: dict[str, Any] | None = scope.get("state")
    if st is None:
        st = scope["state"] = {}
    return st


def signed_target(scope: Any) -> str:
    """The request target as the client signed it: raw path (not percent-decoded) and query."""
    return path_with_query(scope.get("raw_path") or scope["path"].encode(), scope.get("query_string", b""))


def edge_state(request: Request[Any, Any, Any]) -> EdgeState:
    st: EdgeState = request.app.state.edge
    return st


# --- probes and metrics ---------------------------------------------------------------------------


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz() -> dict[str, Any]:
    return {"status": "ok", "service": "edge"}


@get("/readyz", include_in_schema=False)
async def readyz(request: Request[Any, Any, Any]) -> Response[Any]:
    reason = await edge_state(request).ready_reason()
    if reason is None:
        return json_response({"status": "ready", "service": "edge"})
    return json_response({"status": "not_ready", "service": "edge", "reason": reason}, 503)


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def metrics() -> Response[bytes]:
    return Response(content=generate_latest(), media_type=CONTENT_TYPE_LATEST)


# --- errors ---------------------------------------------------------------------------------------


def _is_order_call(path: str) -> bool:
    return path.startswith("/v1/orders")


def _to_spotex(exc: Exception) -> SpotexError | Exception:
    if isinstance(exc, SpotexError):
        return exc
    code = getattr(exc, "code", None)
    if isinstance(code, str) and not isinstance(exc, HTTPException):
        try:
            return SpotexError(code, detail=getattr(exc, "detail", None))
        except ValueError:
            return exc
    if isinstance(exc, ValidationException):
        extra = exc.extra if isinstance(exc.extra, list) else []
        msg = "; ".join(f"{e.get('key', '')}: {e.get('message', '')}" for e in extra if isinstance(e, dict))
        return SpotexError("VALIDATION", detail=(msg or str(exc.detail))[:500])
    if isinstance(exc, NotFoundException):
        return SpotexError("NOT_FOUND")
    if isinstance(exc, MethodNotAllowedException):
        return SpotexError("METHOD_NOT_ALLOWED")
    if isinstance(exc, HTTPException):
        sc = exc.status_code
        if sc == 413:
            return SpotexError("PAYLOAD_TOO_LARGE")
        if sc == 415:
            return SpotexError("UNSUPPORTED_MEDIA_TYPE")
        if 400 <= sc < 500:
            return SpotexError("VALIDATION", detail=str(exc.detail)[:500])
        if sc == 503:
            return SpotexError("UNAVAILABLE")
    return exc


def _exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    status, body, media, headers = render_error(exc, request.method, request.url.path,
                                                (request.scope.get("state") or {}).get("rl_headers"))
    return Response(content=body, status_code=status, media_type=media, headers=headers)


def render_error(exc: Exception, method: str, path: str, rl_headers: dict[str, str] | None
                 ) -> tuple[int, bytes, str, dict[str, str]]:
    """(status, body, content type, headers) of the answer to ``exc``: problem+json, or Binance's
    ``{"code","msg"}`` under ``/api/v3``. The request's RateLimit headers ride along."""
    conv = _to_spotex(exc)
    extra_headers: dict[str, str] = dict(rl_headers or {})
    if not isinstance(conv, SpotexError):
        log.exception("unhandled error", exc_info=exc, extra={"path": path})
        conv = SpotexError("INTERNAL", detail="Unexpected failure; it has been logged.")
    M_ERRORS.labels(conv.code).inc()
    extra_headers.update(conv.headers)
    if path.startswith("/api/v3"):
        cancel = method == "DELETE"
        # Binance answers client errors with 400 (401 for key problems, 429 for limits).
        status = conv.status
        if status in (403,):
            status = 401
        elif status in (404, 409, 413, 415, 422):
            status = 400
        return status, _JSON.encode(to_binance(conv, cancel=cancel)), MediaType.JSON, extra_headers
    body = to_problem(conv, path, order_call=_is_order_call(path))
    return conv.status, _JSON.encode(body), PROBLEM_CONTENT_TYPE, extra_headers


def _after_request(response: Response[Any]) -> Response[Any]:
    return response


# --- metrics middleware (pure ASGI: one histogram sample per request, labelled by route template) --


_SERIES: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # (method, route, status class) -> its two series


def observe_request(method: str, route: str, status: int, t0: float) -> None:
    """One request's latency sample and status-class count (``t0`` from ``time.perf_counter``)."""
    key = (method, route, status // 100)
    series = _SERIES.get(key)
    if series is None:  # labels() takes a lock and builds the label tuple on every call
        series = _SERIES[key] = (M_LATENCY.labels(method, route), M_REQUESTS.labels(method, route, f"{key[2]}xx"))
    series[0].observe(time.perf_counter() - t0)
    series[1].inc()


def _metrics_middleware(app: Any) -> Any:
    async def mw(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]
        state = scope.setdefault("state", {})

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                rl = state.get("rl_headers")
                if rl and status[0] < 400:
                    hs = list(message.get("headers", []))
                    hs.extend((k.lower().encode(), v.encode()) for k, v in rl.items())
                    message["headers"] = hs
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            observe_request(scope.get("method", "GET"), scope.get("path_template") or "unmatched", status[0], t0)

    return mw


# --- app factory ----------------------------------------------------------------------------------


def _master_box(cfg: Config, data_dir: Path | None) -> SecretBox:
    path = cfg.security.master_key_file
    if path is None:
        if data_dir is None:
            return SecretBox.generate()
        path = str(data_dir / "secrets" / "edge_master.key")
    return SecretBox.from_file(path, create=not cfg.production)


def master_key_path(cfg: Config, data_dir: Path) -> Path:
    if cfg.security.master_key_file:
        return Path(cfg.security.master_key_file)
    return data_dir / "secrets" / "edge_master.key"


def _optional_module(name: str) -> Any:
    """Market data and WebSocket are mounted when their modules are installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def create_app(cfg: Config, *, nats_url: str, pg_dsn: str, data_dir: Path | None = None,
               markets: list[MarketConfig] | None = None, box: SecretBox | None = None,
               connect: bool = True) -> Litestar:
    """The edge app. ``connect=False`` builds it without a lifespan (for the OpenAPI document only)."""
    mkts = markets if markets is not None else market_configs(cfg)
    state = EdgeState(cfg=cfg, markets={m.symbol: m for m in mkts},
                      asset_scales={a.symbol: a.decimals for a in cfg.assets})

    md_mod: Any = _optional_module("edge.marketdata")
    ws_mod: Any = _optional_module("edge.ws")
    if md_mod is not None:
        try:
            snap = data_dir / "edge" / "md-projections.snap" if data_dir else None
            state.md = md_mod.MarketData(mkts, snapshot_path=snap)
        except Exception:
            log.exception("market data unavailable")
            state.md = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        import asyncpg
        import nats

        state.nc = await nats.connect(nats_url, name="spotex-edge", max_reconnect_attempts=-1,
                                      reconnect_time_wait=0.5, pending_size=64 * 1024 * 1024)
        state.js = state.nc.jetstream(publish_async_max_pending=20_000)
        state.pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=max(4, cfg.postgres.pool_max))
        kbox = box or _master_box(cfg, data_dir)
        state.keys = KeyStore(state.pool, kbox)
        with contextlib.suppress(Exception):
            await state.keys.start_listener()
        state.verifier = RequestVerifier.from_config(state.keys, cfg.edge)
        state.op_verifier = OperatorVerifier(OperatorKeyStore.from_config(cfg.security, state.pool),
                                             skew_window_ms=cfg.edge.skew_window_ms)
        state.limiter = EdgeRateLimiter.from_config(cfg.edge)
        state.idem = IdempotencyStore(state.pool, lease_ms=max(60_000, cfg.edge.order_timeout_ms * 4))
        state.core = CoreClient(state.nc, state.js, markets=mkts, query_subject=cfg.core.query_subject,
                                order_timeout_ms=cfg.edge.order_timeout_ms)
        state.core.listeners.append(state.on_events)
        await state.core.start()
        from edge.throttle import ThrottleBook

        state.throttle = ThrottleBook()
        await state.throttle.start(state.js)
        if state.md is not None:
            try:
                await state.md.start(state.nc, state.js, cfg.nats.evt_stream)
            except Exception:
                log.exception("market data failed to start")
        if state.hub is not None:
            # The signed LOGON of private channels uses the same verifier as REST, created above.
            state.hub.verifier = state.verifier
            with contextlib.suppress(Exception):
                await state.hub.start()
        purge = asyncio.create_task(_purge_loop(state), name="edge-purge")
        mapping = asyncio.create_task(_mapping_loop(state), name="edge-mapping")
        install_gc_timer()
        lag = asyncio.create_task(loop_lag_monitor(), name="edge-loop-lag")
        try:
            yield
        finally:
            await stop_tasks([purge, mapping, lag])
            with contextlib.suppress(Exception):
                await state.throttle.stop()
            if state.hub is not None:
                with contextlib.suppress(Exception):
                    await state.hub.stop()
            if state.md is not None:
                with contextlib.suppress(Exception):
                    await state.md.stop()
            with contextlib.suppress(Exception):
                await state.core.stop()
            with contextlib.suppress(Exception):
                await state.keys.close()
            with contextlib.suppress(Exception):
                await state.nc.drain()
            with contextlib.suppress(Exception):
                await state.pool.close()

    from edge import account, admin, binance, orders

    handlers: list[Any] = [healthz, readyz, metrics, *orders.ROUTES, *account.ROUTES, *admin.ROUTES,
                           *binance.ROUTES]
    if md_mod is not None and state.md is not None:
        try:
            handlers.extend(md_mod.marketdata_routes(state.md))
        except Exception:
            log.exception("market data routes unavailable")
    if ws_mod is not None and state.md is not None:
        try:
            state.hub = ws_mod.WsHub(state.md, cfg, None)
            handlers.extend(state.hub.handlers())
        except Exception:
            log.exception("websocket hub unavailable")
            state.hub = None

    openapi = OpenAPIConfig(
        title="spotex REST API", version="1.0.0", path="/schema",
        description="Trader and operator API of the spotex exchange. Decimal strings for money, integer "
                    "milliseconds for time, RFC 9457 problem+json for errors. See docs/api.md.",
        render_plugins=[SwaggerRenderPlugin()],
        components=Components(security_schemes={
            "apiKey": SecurityScheme(type="apiKey", name="X-API-KEY", security_scheme_in="header",
                                     description="With X-TS (ms) and X-SIGNATURE over METHOD\\nPATH\\nX-TS\\nBODY"),
        }),
    )
    app = Litestar(
        route_handlers=handlers,
        lifespan=[lifespan] if connect else [],
        state=State({"edge": state}),
        exception_handlers={Exception: _exception_handler},
        openapi_config=openapi,
        middleware=[_metrics_middleware],
        request_max_body_size=MAX_BODY,
        debug=False,
    )
    return app


async def _mapping_loop(state: EdgeState) -> None:
    """Learn the engine's market definitions as soon as the core answers, then re-check each minute."""
    while True:
        ok = False
        with contextlib.suppress(Exception):
            ok = await state.refresh_mapping()
        await asyncio.sleep(60 if ok else 1)


async def _purge_loop(state: EdgeState) -> None:
    while True:
        await asyncio.sleep(300)
        with contextlib.suppress(Exception):
            if state.idem is not None:
                await state.idem.purge_expired()
