"""The order path's front: ``POST /v1/orders`` and ``DELETE /v1/orders/{id}`` served without
Litestar's per-request machinery.

Those two calls are ~90% of a trader's requests. Under the Litestar app, each one pays for the
router, the exception middleware, the kwargs model, the header and body parsers and the response
object around a handler that is a few calls into ``edge.orders`` (py-spy, docs/performance.md:
about a third of the edge's Python time). :class:`FastOrders` sits in front of the Litestar app as
the ASGI application uvicorn runs and serves those two calls itself, through the same functions the
Litestar routes call:

- :func:`edge.orders.place_call` / :func:`edge.orders.cancel_call`: authentication, rate limits,
  Idempotency-Key, the command to the core and the answer;
- :func:`edge.app.render_error`: every error, with its RateLimit headers;
- :func:`edge.app.observe_request`: the latency histogram and status counters, labelled with the
  Litestar route templates.

It answers with the same status, body and headers, in the same order, as the Litestar route
(``tests/edge/test_fastpath.py`` compares both on every path). Whatever it is not sure of goes to
Litestar untouched, before any side effect: a query string, a duplicated header it reads, a chunked
or oversized body, a body that does not decode strictly as :class:`edge.orders.PlaceOrderIn`
(Litestar decodes leniently and words its own validation errors), a path that is not exactly the
route. A body already read is handed on to Litestar as it arrived. ``edge.fast_path = false``
turns the front off.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from edge.app import Call, EdgeState, observe_request, render_error, signed_target
from edge.idempotency import StoredResponse
from edge.orders import PlaceOrderIn, cancel_call, place_call

__all__ = ["FastOrders"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_PREFIX = "/v1/orders/"
_POST_ROUTE = "/v1/orders"  # the Litestar route templates, as the metrics label them
_DELETE_ROUTE = "/v1/orders/{order_id}"
# The request headers this front reads; a request repeating one of them goes to Litestar.
_READ = frozenset({b"x-api-key", b"x-ts", b"x-signature", b"idempotency-key", b"content-length",
                   b"transfer-encoding"})
_PLACE = msgspec.json.Decoder(PlaceOrderIn)
_JSON = b"application/json"


class FastOrders:
    """ASGI app: the two hot order calls here, everything else (lifespan and WebSocket included)
    to ``app``."""

    def __init__(self, app: Any, state: EdgeState, *, max_body: int) -> None:  # app: the Litestar app
        self.app = app
        self.state = state
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("query_string"):
            method = scope["method"]
            path = scope["path"]
            if method == "POST" and path == _POST_ROUTE:
                await self._serve(scope, receive, send, None)
                return
            if method == "DELETE" and path.startswith(_PREFIX):
                tail = path[len(_PREFIX):]
                if 0 < len(tail) <= 30 and tail.isascii() and tail.isdigit():
                    await self._serve(scope, receive, send, int(tail))
                    return
        await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, order_id: int | None) -> None:
        t0 = time.perf_counter()
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _READ:
                k = name.decode("latin-1")
                if k in headers:
                    await self.app(scope, receive, send)
                    return
                headers[k] = value.decode("latin-1")
        cl = headers.get("content-length")
        if "transfer-encoding" in headers or (cl is not None and not (cl.isascii() and cl.isdigit()
                                                                      and int(cl) <= self.max_body)):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left before its body arrived
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        data: PlaceOrderIn | None = None
        if order_id is None:
            try:
                data = _PLACE.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                await self.app(scope, _replay(body, receive), send)
                return
        method: str = scope["method"]
        path: str = scope["path"]
        client = scope.get("client")
        state: dict[str, Any] = scope.setdefault("state", {})
        call = Call(ip=client[0] if client else "unknown", method=method, path=path, target=signed_target(scope),
                    body=body, headers=headers, state=state)
        status = 500
        try:
            try:
                if data is not None:
                    resp = await place_call(self.state, call, data)
                else:
                    assert order_id is not None
                    resp = await cancel_call(self.state, call, order_id=order_id)
            except Exception as exc:  # rendered exactly as Litestar's exception handler does
                status, out, media, extra = render_error(exc, method, path, state.get("rl_headers"))
                await _respond(send, status, out, media.encode(), extra, None)
            else:
                status = resp.status
                await _respond_stored(send, resp, state.get("rl_headers") if status < 400 else None)
        finally:
            observe_request(method, _POST_ROUTE if order_id is None else _DELETE_ROUTE, status, t0)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for Litestar after this front read the body: the body first, then the client's."""
    sent = False

    async def again() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def _respond_stored(send: Send, resp: StoredResponse, rl: dict[str, str] | None) -> None:
    headers = dict(resp.headers)
    media = headers.pop("content-type", None)
    await _respond(send, resp.status, resp.body, media.encode() if media else _JSON, headers, rl)


async def _respond(send: Send, status: int, body: bytes, media: bytes, headers: dict[str, str],
                   rl: dict[str, str] | None) -> None:
    """A Litestar ``Response``'s start message: its own headers, content type and length, then
    (for a success) the RateLimit headers ``_metrics_middleware`` appends."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-type", media))
    raw.append((b"content-length", str(len(body)).encode()))
    if rl:
        raw.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in rl.items())
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
