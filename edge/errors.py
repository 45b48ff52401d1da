"""The edge's one exception root and its RFC 9457 problem+json rendering.

Every error a client can see has a stable ``code`` (UPPER_SNAKE) listed in :data:`REGISTRY` with its
HTTP status and meaning; docs/security.md carries the same table. Handlers raise
:class:`SpotexError` (or a subclass); the Litestar app renders it with :func:`to_problem` and
:data:`PROBLEM_CONTENT_TYPE`, adds ``exc.headers`` (``Retry-After``, ``RateLimit-*``), and never
puts an error inside a 200.

Order calls also say whether the order executed (``executionStatus``): ``NOT_EXECUTED`` when the
request was refused before or by the core, ``UNKNOWN`` when the edge cannot know (timeout, lost
connection, crash), ``EXECUTED`` when it did and the error concerns something after it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "PROBLEM_BASE",
    "PROBLEM_CONTENT_TYPE",
    "REGISTRY",
    "BinanceError",
    "ErrorSpec",
    "ExecutionStatus",
    "SpotexError",
    "order_rejected",
    "problem_type",
    "register",
    "to_binance",
    "to_problem",
]

ExecutionStatus = Literal["NOT_EXECUTED", "UNKNOWN", "EXECUTED"]
_EXECUTION_STATUSES = ("NOT_EXECUTED", "UNKNOWN", "EXECUTED")

PROBLEM_BASE = "https://spotex.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"
_CODE_RE = re.compile(r"^[A-Z][A-Z0-9_]{1,63}$")


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """One stable error code. ``order_execution`` is what an order call reports by default."""

    code: str
    status: int
    title: str
    meaning: str
    order_execution: ExecutionStatus | None = "NOT_EXECUTED"


REGISTRY: dict[str, ErrorSpec] = {}


def register(code: str, status: int, title: str, meaning: str,
             order_execution: ExecutionStatus | None = "NOT_EXECUTED") -> ErrorSpec:
    """Add a stable code. Codes are a public contract: never change the status of a released one."""
    if not _CODE_RE.match(code):
        raise ValueError(f"error code must be UPPER_SNAKE: {code!r}")
    if not 400 <= status <= 599:
        raise ValueError(f"{code}: an error status must be 4xx or 5xx, got {status}")
    spec = ErrorSpec(code, status, title, meaning, order_execution)
    old = REGISTRY.get(code)
    if old is not None and old != spec:
        raise ValueError(f"error code {code} is already registered differently")
    REGISTRY[code] = spec
    return spec


# --- request / auth ------------------------------------------------------------------------------
register("AUTH_MISSING", 401, "Authentication required",
         "X-API-KEY, X-TS or X-SIGNATURE (or the operator equivalents) is missing.")
register("AUTH_MALFORMED", 401, "Malformed authentication",
         "An auth header is present but unparseable: X-TS not integer milliseconds, signature not hex/base64.")
register("AUTH_UNKNOWN_KEY", 401, "Unknown API key",
         "The key does not exist or was revoked (deliberately indistinguishable).")
register("AUTH_BAD_SIGNATURE", 401, "Bad signature",
         "The signature does not verify over METHOD\\nPATH_WITH_QUERY\\nX-TS\\nBODY.")
register("AUTH_TIMESTAMP_SKEW", 401, "Timestamp outside the window",
         "|server time - X-TS| exceeds the skew window (edge.skew_window_ms, default 5000 ms).")
register("AUTH_REPLAY", 401, "Replayed request",
         "The same key and signature was already accepted inside the window; re-sign with a fresh X-TS.")
register("AUTH_SCOPE", 403, "Missing scope", "The API key lacks the scope the endpoint needs (read, trade).")
register("AUTH_ROLE", 403, "Missing role", "The operator key lacks the role the admin action needs.")
register("RATE_LIMITED", 429, "Too many requests",
         "The per-key or per-IP token bucket is empty; wait Retry-After seconds.")
register("SYMBOL_THROTTLED", 429, "Symbol throttled",
         "New orders on this symbol are over its throttle (orders per second across all traders, set by an "
         "operator or the settlement-lag policy); wait Retry-After seconds. Cancels are never throttled.")
register("IDEMPOTENCY_KEY_INVALID", 400, "Invalid Idempotency-Key",
         "Idempotency-Key must be 1-128 characters of [A-Za-z0-9._:-].")
register("IDEMPOTENCY_CONFLICT", 409, "Idempotency-Key reused",
         "The key was already used with a different request (method, path, body or api key).")
register("IDEMPOTENCY_IN_PROGRESS", 409, "Request with this Idempotency-Key in progress",
         "The original request is still executing; retry after Retry-After to get its result.",
         order_execution="UNKNOWN")
register("VALIDATION", 400, "Invalid request", "The request is malformed or a field is out of range.")
register("NOT_FOUND", 404, "Not found", "No such resource.")
register("METHOD_NOT_ALLOWED", 405, "Method not allowed", "The resource does not support this method.")
register("PAYLOAD_TOO_LARGE", 413, "Payload too large", "The request body exceeds the edge's limit.")
register("UNSUPPORTED_MEDIA_TYPE", 415, "Unsupported media type", "Send application/json.")
register("INTERNAL", 500, "Internal error", "Unexpected failure; details are in the edge's logs.",
         order_execution="UNKNOWN")
register("UNAVAILABLE", 503, "Service unavailable",
         "A dependency (core, bus, database) is not ready; retry after Retry-After.", order_execution="UNKNOWN")
register("UPSTREAM_TIMEOUT", 504, "Timed out waiting for the core",
         "No acknowledgement inside edge.order_timeout_ms; the order may or may not have executed.",
         order_execution="UNKNOWN")

# --- admin ---------------------------------------------------------------------------------------
register("AUDIT_REASON_REQUIRED", 400, "Reason required", "Every admin action needs a non-empty reason.")
register("AUDIT_TICKET_REQUIRED", 400, "Ticket required", "Every admin action needs a non-empty ticket id.")
register("AUDIT_UNAVAILABLE", 503, "Audit chain unavailable",
         "The audit entry could not be appended, so the action was not taken.")
register("BREAK_GLASS_TTL", 400, "Invalid break-glass TTL", "The TTL is not within 1 s .. the configured maximum.")
register("LATCH_NOT_FOUND", 404, "No latch on this symbol",
         "The reconciliation latch of this symbol was never engaged.", order_execution=None)
register("LATCH_NOT_ENGAGED", 409, "Latch not engaged", "The symbol's latch is already released.", order_execution=None)
register("LAG_NOT_ZERO", 409, "Settlement lag not zero",
         "A latch releases only when the ledger has settled everything the engine published.", order_execution=None)
register("SETTLEMENT_STOPPED", 409, "Settlement stopped",
         "The symbol's settlement stream is stopped (gap, fencing, bad event); resume it first.",
         order_execution=None)
register("INVARIANTS_FAILING", 409, "Invariants failing", "A latch releases only while the ledger invariants pass.",
         order_execution=None)
register("SECOND_APPROVER_REQUIRED", 409, "Second approver required",
         "The ledger's release (CLI) was given one approver where a distinct second approver is required. "
         "The admin API answers a first approval with 202 AWAITING_SECOND_APPROVER instead.",
         order_execution=None)
register("APPROVER_ALREADY_APPROVED", 409, "Approver already approved",
         "This approver's approval of the release (same latch, same ticket) is already recorded; a distinct "
         "second approver must send it. Nothing new is recorded.", order_execution=None)
register("APPROVER_REQUIRED", 400, "Approver required", "A latch release needs an approver.", order_execution=None)
register("ENGINE_UNAVAILABLE", 503, "Engine unavailable",
         "The engine's seq (EVT on JetStream) cannot be read, so the lag cannot be checked.", order_execution=None)
register("CORE_UNAVAILABLE", 503, "Core unavailable",
         "The command could not be sent to the core; the latch stays engaged (safe side).", order_execution=None)
register("THROTTLE_NOT_SET", 404, "No throttle on this symbol",
         "The symbol has no throttle in the layer(s) the clear names.", order_execution=None)
register("UNKNOWN_JOB", 404, "Unknown job", "The jobs service has no scheduled check of this name.",
         order_execution=None)
register("JOB_RUNNING", 409, "Job running", "The scheduled check is running now; wait for its result.",
         order_execution=None)

# --- order reject pass-through (core reject reasons; the order did not execute) -------------------
# 422: the request is well-formed but breaks a trading rule for its own content or the account's
#      state (funds, price band, increments); retrying the same request will fail the same way.
# 409: the request conflicts with the current state of the market or of another resource (mode,
#      duplicate client order id, order already closed); it may succeed once that state changes.
register("INSUFFICIENT_FUNDS", 422, "Insufficient funds", "Available balance does not cover the order and fees.")
register("PRICE_BAND", 422, "Price outside band", "The limit price is outside the market's band around last/mid.")
register("TICK_SIZE", 422, "Price not on tick", "The price is not a multiple of the market's tick size.")
register("LOT_SIZE", 422, "Quantity not on lot", "The quantity is not a multiple of the market's lot size.")
register("MIN_NOTIONAL", 422, "Below minimum notional", "price x quantity is below the market's minimum.")
register("POST_ONLY_WOULD_TAKE", 422, "Post-only would take", "A post-only order would have matched on entry.")
register("FOK_UNFILLABLE", 422, "Fill-or-kill unfillable", "The order cannot fill completely at once.")
register("UNKNOWN_SYMBOL", 422, "Unknown symbol", "The symbol in the request is not a listed market.")
register("MARKET_HALTED", 409, "Market halted", "The market is SOFT_HALT or HARD_HALT; no new orders.")
register("CANCEL_ONLY", 409, "Market is cancel-only", "The market accepts cancels only.")
register("MARKET_DEFINITIONS_PENDING", 503, "Market definitions not compared yet",
         "This edge has not yet compared its market definitions with the engine's (the core has not answered); "
         "the order was not sent. Retry shortly.")
register("MARKET_MAPPING_MISMATCH", 409, "Market definition mismatch",
         "This edge's definition of the market (tick, lot, scales, fees) differs from the matching engine's, so "
         "it cannot convert prices and quantities safely: new orders and amends are refused, cancels pass, "
         "until the configuration is fixed (spotex mapping check).")
register("DUPLICATE_CLIENT_ORDER_ID", 409, "Duplicate client order id",
         "An open or recent order of this account already uses the clientOrderId.")
register("ORDER_NOT_FOUND", 404, "Order not found", "No such order for this account.")
register("ORDER_ALREADY_CLOSED", 409, "Order already closed", "The order is FILLED, CANCELED or REJECTED.")
register("FENCING_TOKEN", 503, "Leader changed",
         "The core leader changed while the command was in flight and it was refused; retry.")


def problem_type(code: str) -> str:
    """``AUTH_BAD_SIGNATURE`` -> ``https://spotex.dev/problems/auth-bad-signature``."""
    return PROBLEM_BASE + code.lower().replace("_", "-")


class SpotexError(Exception):
    """The root of every error the edge turns into a response.

    ``status`` and ``title`` default from :data:`REGISTRY`; a code that is not registered must
    give its status explicitly (it is then still rendered, but add it to the registry).
    """

    def __init__(self, code: str, status: int | None = None, title: str | None = None, detail: str | None = None,
                 execution_status: ExecutionStatus | None = None, headers: Mapping[str, str] | None = None) -> None:
        spec = REGISTRY.get(code)
        if status is None:
            if spec is None:
                raise ValueError(f"unregistered error code {code!r} needs an explicit status")
            status = spec.status
        if execution_status is not None and execution_status not in _EXECUTION_STATUSES:
            raise ValueError(f"execution_status must be one of {_EXECUTION_STATUSES}, got {execution_status!r}")
        self.code = code
        self.status = status
        self.title = title or (spec.title if spec else code.replace("_", " ").capitalize())
        self.detail = detail or (spec.meaning if spec else self.title)
        self.execution_status: ExecutionStatus | None = execution_status
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(f"{code}: {self.detail}")

    @property
    def spec(self) -> ErrorSpec | None:
        return REGISTRY.get(self.code)

    def for_order(self) -> SpotexError:
        """Set ``executionStatus`` from the registry's default when the handler did not."""
        if self.execution_status is None and self.spec is not None:
            self.execution_status = self.spec.order_execution
        return self


class BinanceError(SpotexError):
    """An error of the Binance facade: rendered as ``{"code": -NNNN, "msg": ...}`` by :func:`to_binance`,
    and still a :class:`SpotexError` with our own code for logs and metrics."""

    def __init__(self, binance_code: int, msg: str, code: str, status: int = 400,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(code, status=status, detail=msg, headers=headers)
        self.binance_code = binance_code
        self.msg = msg


def order_rejected(reason: str, detail: str | None = None) -> SpotexError:
    """The error for a core reject reason. Unknown reasons pass through as 422 NOT_EXECUTED so a new
    reject code in the core never turns into a 500; register it to give it a better status."""
    if reason in REGISTRY:
        return SpotexError(reason, detail=detail, execution_status="NOT_EXECUTED")
    if not _CODE_RE.match(reason):
        reason = "VALIDATION"
    return SpotexError(reason, status=422, title="Order rejected", detail=detail or reason,
                       execution_status="NOT_EXECUTED")


def to_problem(exc: BaseException, instance: str, *, order_call: bool = False) -> dict[str, Any]:
    """RFC 9457 problem details for ``exc``. Anything that is not a :class:`SpotexError` becomes an
    opaque INTERNAL problem: exception text never reaches a client."""
    if not isinstance(exc, SpotexError):
        # Errors of other packages (e.g. ledger.audit.AuditError) carry a registered stable code.
        code = getattr(exc, "code", None)
        if isinstance(code, str) and code in REGISTRY:
            exc = SpotexError(code, detail=getattr(exc, "detail", None))
        else:
            exc = SpotexError("INTERNAL", detail="Unexpected failure; it has been logged.")
    if order_call:
        exc.for_order()
    out: dict[str, Any] = {
        "type": problem_type(exc.code),
        "title": exc.title,
        "status": exc.status,
        "detail": exc.detail,
        "instance": instance,
        "code": exc.code,
    }
    if exc.execution_status is not None:
        out["executionStatus"] = exc.execution_status
    return out


# Our codes -> Binance's, for errors raised outside the facade's own checks.
_BINANCE_CODES: dict[str, int] = {
    "RATE_LIMITED": -1003,
    "SYMBOL_THROTTLED": -1015,  # Binance's TOO_MANY_ORDERS ("Too many new orders")
    "VALIDATION": -1102,
    "UNKNOWN_SYMBOL": -1121,
    "AUTH_MISSING": -2014,
    "AUTH_MALFORMED": -1102,
    "AUTH_UNKNOWN_KEY": -2015,
    "AUTH_SCOPE": -2015,
    "AUTH_BAD_SIGNATURE": -1022,
    "AUTH_REPLAY": -1022,
    "AUTH_TIMESTAMP_SKEW": -1021,
    "ORDER_NOT_FOUND": -2013,
    "UNAVAILABLE": -1001,
    "UPSTREAM_TIMEOUT": -1007,
    "INTERNAL": -1000,
}


def to_binance(exc: BaseException, *, cancel: bool = False) -> dict[str, Any]:
    """Binance's error body ``{"code": -NNNN, "msg": ...}``. Order rejects map to -2010 (new order)
    or -2011 (cancel) as Binance does."""
    if isinstance(exc, BinanceError):
        return {"code": exc.binance_code, "msg": exc.msg}
    if not isinstance(exc, SpotexError):
        return {"code": -1000, "msg": "An unknown error occurred while processing the request."}
    code = -2011 if cancel and exc.code in ("ORDER_NOT_FOUND", "ORDER_ALREADY_CLOSED") else _BINANCE_CODES.get(exc.code)
    if code is None:
        code = -2011 if cancel else -2010 if exc.status in (409, 422) else -1000
    return {"code": code, "msg": exc.detail}
