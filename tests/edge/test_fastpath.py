"""``edge.fastpath`` answers exactly as the Litestar routes do.

Two edge apps run in this process against the shared real stack (NATS, the core, PostgreSQL), each
with its own limiter, replay cache and market-data state: one served by Litestar alone, one behind
:class:`edge.fastpath.FastOrders`. Every scenario runs once against each, with fresh signatures,
and the two lists of answers must be equal: status, every header in order, and the body, once the
values the core assigns (order and trade ids, times) and the clock-derived rate-limit figures are
masked. The requests the front must serve itself are checked to have bypassed Litestar, and the
ones it must hand on (query strings, repeated headers, chunked or oversized bodies, lenient JSON) to
have reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest

import edge.app
import edge.fastpath
from edge.app import MAX_BODY, create_app, master_key_path
from edge.auth import SecretBox, signed_headers
from edge.fastpath import FastOrders
from tests.edge.stackenv import USD, Env

Answer = tuple[int, list[tuple[str, str]], Any, bool]  # status, headers, body, served by Litestar

_MASK_KEYS = {"orderId", "transactTime", "time", "tradeId", "clientOrderId"}
# Clock-derived, or sized by the masked ids (each front's content-length is checked against its body).
_VOLATILE_HEADERS = {"ratelimit-remaining", "ratelimit-reset", "retry-after", "content-length"}


def _mask(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: ("<masked>" if k in _MASK_KEYS else _mask(x)) for k, x in v.items()}
    if isinstance(v, list):
        return [_mask(x) for x in v]
    if isinstance(v, str):
        # order ids in paths, clock readings inside details
        v = re.sub(r"/v1/orders/0*\d+$", "/v1/orders/<id>", re.sub(r"X-TS is -?\d+ ms", "X-TS is <n> ms", v))
        return re.sub(r"\d{6,}", "<n>", v)
    return v


class Front:
    """One ASGI app driven with raw ASGI messages (so repeated headers and chunked bodies can be sent)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.resting: list[int] = []  # ids of the orders placed through this front that rest (NEW)

    async def raw(self, method: str, path: str, headers: list[tuple[str, str]], chunks: list[bytes],
                  query: bytes = b"") -> Answer:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {}}
        pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                   for i, c in enumerate(chunks or [b""])]
        out: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop(0)
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(m: dict[str, Any]) -> None:
            out.append(m)

        await self.app(scope, receive, send)
        start, body = out[0], b"".join(m.get("body", b"") for m in out[1:])
        assert dict(start["headers"])[b"content-length"] == str(len(body)).encode()
        hs = [(k.decode(), "<n>" if k.decode() in _VOLATILE_HEADERS else v.decode()) for k, v in start["headers"]]
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            parsed = body
        if method == "POST" and start["status"] == 201 and parsed.get("status") == "NEW":
            self.resting.append(int(parsed["orderId"]))
        return start["status"], hs, _mask(parsed), bool(scope.get("reached_litestar"))


Scenario = Callable[[Front, dict[str, Any]], Awaitable[list[Answer]]]


def _signed(key: dict[str, Any], method: str, path: str, body: bytes, **extra: str) -> list[tuple[str, str]]:
    h = signed_headers(key["api_key"], key["secret"], method, path, body)
    return [*h.items(), ("content-type", "application/json"), *extra.items()]


async def _send(f: Front, key: dict[str, Any], method: str, path: str, doc: Any = None, **extra: str) -> Answer:
    body = json.dumps(doc).encode() if doc is not None else b""
    hs = _signed(key, method, path, body, **extra)
    if body or method == "POST":
        hs.append(("content-length", str(len(body))))
    return await f.raw(method, path, hs, [body])


def _limit(price: str, side: str = "BUY", qty: str = "0.001", **kw: Any) -> dict[str, Any]:
    return {"symbol": "BTC-USDT", "side": side, "price": price, "quantity": qty, **kw}


async def _prices(app: Any) -> dict[str, Any]:
    """Prices for the scenarios from the live BTC-USDT book (other tests share it): a trade price X
    inside the spread and near the last trade (inside the price band), and resting bids 3% under it.
    Both runs see the same conditions: the first run's trade at X and its bids below X change
    neither the band nor what the second run's orders cross."""
    from core.wire import price_to_ticks, ticks_to_price

    st = app.state.edge
    m = st.markets["BTC-USDT"]
    book = await st.core.query("book", symbol="BTC-USDT", depth=1)
    deadline = time.monotonic() + 10
    while st.md.seq("BTC-USDT") < int(book["seq"]):  # market data caught up: its last trade is current
        assert time.monotonic() < deadline, "market data did not catch up with the core"
        await asyncio.sleep(0.05)
    bid = book["bids"][0][0] if book["bids"] else None
    ask = book["asks"][0][0] if book["asks"] else None
    last = st.md.trades("BTC-USDT", 1)
    ref = last[0].price_ticks if last else (bid + ask) // 2 if bid and ask else price_to_ticks("40000", m)
    lo, hi = (bid or 0) + 1, (ask - 1) if ask else 1 << 60
    x = min(max(ref, lo), hi)
    assert lo <= hi and abs(x - ref) * 20 <= ref, f"no room for a trade near {ref} inside ({bid}, {ask})"
    base = x - x * 3 // 100
    return {"x": ticks_to_price(x, m), "bids": [ticks_to_price(base + i, m) for i in range(6)],
            "off_tick": ticks_to_price(base, m) + "1"}


async def _orders(f: Front, k: dict[str, Any]) -> list[Answer]:
    bids = k["px"]["bids"]
    out = [await _send(f, k["maker"], "POST", "/v1/orders", _limit(bids[0]))]
    out.append(await _send(f, k["maker"], "POST", "/v1/orders", _limit(bids[1], postOnly=True, timeInForce="GTC")))
    # a trade: the maker rests a sell, the taker's IOC buy takes it
    out.append(await _send(f, k["maker"], "POST", "/v1/orders", _limit(k["px"]["x"], side="SELL", qty="0.002")))
    out.append(await _send(f, k["taker"], "POST", "/v1/orders", _limit(k["px"]["x"], qty="0.002", timeInForce="IOC")))
    # rejects from the edge and from the core (stored problems: no RateLimit headers)
    out.append(await _send(f, k["maker"], "POST", "/v1/orders", {"symbol": "NOPE-USDT", "side": "BUY",
                                                                  "price": "1", "quantity": "1"}))
    out.append(await _send(f, k["maker"], "POST", "/v1/orders", _limit(k["px"]["off_tick"])))
    out.append(await _send(f, k["maker"], "POST", "/v1/orders", _limit(k["px"]["bids"][0], qty="100000")))
    out.append(await _send(f, k["maker"], "POST", "/v1/orders", {"symbol": "BTC-USDT", "side": "BUY",
                                                                  "type": "MARKET", "price": "1", "quantity": "1"}))
    # cancels: someone else's order, the own one, the same again, unknown ids, ids Litestar parses too
    oid = f.resting[0]
    out.append(await _send(f, k["taker"], "DELETE", f"/v1/orders/{oid}"))
    out.append(await _send(f, k["maker"], "DELETE", f"/v1/orders/{oid}"))
    out.append(await _send(f, k["maker"], "DELETE", f"/v1/orders/{oid}"))
    for ident in ("999999999999", "0", f"00{f.resting[1]}", "99999999999999999999999"):
        out.append(await _send(f, k["maker"], "DELETE", f"/v1/orders/{ident}"))
    return out


async def _auth(f: Front, k: dict[str, Any]) -> list[Answer]:
    body = json.dumps(_limit(k["px"]["bids"][0])).encode()
    out = [await f.raw("POST", "/v1/orders", [("content-length", str(len(body)))], [body])]  # no auth headers
    hs = _signed(k["maker"], "POST", "/v1/orders", body)
    bad = [(n, ("0" * 64 if n.lower() == "x-signature" else v)) for n, v in hs]
    out.append(await f.raw("POST", "/v1/orders", [*bad, ("content-length", str(len(body)))], [body]))
    out.append(await f.raw("POST", "/v1/orders", [*hs, ("content-length", str(len(body)))], [body]))
    out.append(await f.raw("POST", "/v1/orders", [*hs, ("content-length", str(len(body)))], [body]))  # replay
    old = signed_headers(k["maker"]["api_key"], k["maker"]["secret"], "POST", "/v1/orders", body,
                         ts_ms=int(time.time() * 1000) - 60_000)
    out.append(await f.raw("POST", "/v1/orders", [*old.items(), ("content-length", str(len(body)))], [body]))
    out.append(await _send(f, k["reader"], "POST", "/v1/orders", _limit(k["px"]["bids"][0])))  # read scope only
    out.append(await _send(f, k["reader"], "DELETE", "/v1/orders/1"))
    return out


async def _idempotency(f: Front, k: dict[str, Any]) -> list[Answer]:
    key = f"{k['tag']}-idem-1"
    first = await _send(f, k["maker"], "POST", "/v1/orders", _limit(k["px"]["bids"][2]), **{"Idempotency-Key": key})
    again = await _send(f, k["maker"], "POST", "/v1/orders", _limit(k["px"]["bids"][2]), **{"Idempotency-Key": key})
    other = await _send(f, k["maker"], "POST", "/v1/orders", _limit(k["px"]["bids"][3]), **{"Idempotency-Key": key})
    bad = await _send(f, k["maker"], "POST", "/v1/orders", _limit(k["px"]["bids"][2]),
                      **{"Idempotency-Key": "no spaces"})
    rej = await _send(f, k["maker"], "POST", "/v1/orders", _limit(k["px"]["off_tick"]),
                      **{"Idempotency-Key": f"{k['tag']}-idem-2"})
    rej2 = await _send(f, k["maker"], "POST", "/v1/orders", _limit(k["px"]["off_tick"]),
                       **{"Idempotency-Key": f"{k['tag']}-idem-2"})
    cancel = [await _send(f, k["maker"], "DELETE", f"/v1/orders/{f.resting[-1]}",
                          **{"Idempotency-Key": f"{k['tag']}-idem-3"}) for _ in range(2)]
    return [first, again, other, bad, rej, rej2, *cancel]


async def _handed_on(f: Front, k: dict[str, Any]) -> list[Answer]:
    """Requests the fast path leaves to Litestar: every answer must come from Litestar."""
    out = []
    for doc in (b"{not json", json.dumps({**_limit(k["px"]["bids"][4]), "x": 1}).encode(),
                json.dumps({**_limit(k["px"]["bids"][4]), "postOnly": "false"}).encode(), b""):
        hs = _signed(k["maker"], "POST", "/v1/orders", doc)
        out.append(await f.raw("POST", "/v1/orders", [*hs, ("content-length", str(len(doc)))], [doc]))
    body = json.dumps(_limit(k["px"]["bids"][0])).encode()
    hs = _signed(k["maker"], "POST", "/v1/orders", body)
    out.append(await f.raw("POST", "/v1/orders", [*hs, ("x-api-key", "again"), ("content-length", str(len(body)))],
                           [body]))
    hs = _signed(k["maker"], "POST", "/v1/orders", body)
    out.append(await f.raw("POST", "/v1/orders", [*hs, ("transfer-encoding", "chunked")], [body[:10], body[10:]]))
    big = b" " * (MAX_BODY + 1)
    out.append(await f.raw("POST", "/v1/orders", [*_signed(k["maker"], "POST", "/v1/orders", big),
                                                  ("content-length", str(len(big)))], [big]))
    hs = _signed(k["maker"], "POST", "/v1/orders?a=1", body)
    out.append(await f.raw("POST", "/v1/orders", [*hs, ("content-length", str(len(body)))], [body], query=b"a=1"))
    for path in ("/v1/orders/1/", "/v1/orders/open", "/v1/orders/-1", "/v1/orders/\u0661"):
        out.append(await _send(f, k["maker"], "DELETE", path))
    return out


async def _rate_limited(f: Front, k: dict[str, Any]) -> list[Answer]:
    # Empty the key's bucket (1 token/s refills it far slower than this runs), then: 429s with headers.
    k["state"].limiter.check(ip="127.0.0.1", api_key=k["limited"]["api_key"], cost=40)
    return [await _send(f, k["limited"], "DELETE", f"/v1/orders/{42 + i}") for i in range(3)]


@contextlib.asynccontextmanager
async def _fronts(env: Env) -> AsyncIterator[tuple[Front, Front, Any]]:
    from spotex.cli import _load

    loaded = _load(str(env.st.data_dir), None)
    # Rate limits small enough for the 429 scenario; each scenario's key stays under them otherwise.
    cfg = msgspec.structs.replace(loaded.cfg, edge=msgspec.structs.replace(
        loaded.cfg.edge, rate_limit_per_s=1, rate_limit_burst=40, ip_rate_limit_per_s=1000))
    # No data dir: the stack's edge keeps its market-data snapshot file to itself. Its master key
    # decrypts the API keys the CLI created.
    box = SecretBox.from_file(master_key_path(cfg, loaded.data.root))
    apps = [create_app(cfg, nats_url=env.nats, pg_dsn=env.pg_dsn(), box=box) for _ in range(2)]
    async with contextlib.AsyncExitStack() as es:
        for app in apps:
            await es.enter_async_context(app.lifespan())
        deadline = time.monotonic() + 30
        while not all(a.state.edge.mapping_checked for a in apps):
            assert time.monotonic() < deadline, "the in-process edges never learned the engine's markets"
            await asyncio.sleep(0.1)
        yield (Front(_marked(apps[0])), Front(FastOrders(_marked(apps[1]), apps[1].state.edge, max_body=MAX_BODY)),
               apps)


def _marked(app: Any) -> Any:
    """``app``, marking the scopes of the requests that reach it."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        scope["reached_litestar"] = True
        await app(scope, receive, send)

    return asgi


def test_fast_path_answers_as_litestar_does(edge_env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env = edge_env
    # Which request metrics each front records: (method, route label, status class) per request.
    recorded: list[tuple[str, str, int]] = []
    observe = edge.app.observe_request

    def spy(method: str, route: str, status: int, t0: float) -> None:
        recorded.append((method, route, status // 100))
        observe(method, route, status, t0)

    monkeypatch.setattr(edge.app, "observe_request", spy)
    monkeypatch.setattr(edge.fastpath, "observe_request", spy)
    keys: dict[str, Any] = {}
    for name, acct, scopes in (("maker", 771_001, "read,trade"), ("taker", 771_002, "read,trade"),
                               ("reader", 771_001, "read"), ("limited", 771_003, "read,trade")):
        keys[name] = env.key(acct, scopes)
    env.fund(771_001, {"USDT": 10_000_000 * USD, "BTC": 100 * USD})
    env.fund(771_002, {"USDT": 10_000_000 * USD, "BTC": 100 * USD})
    scenarios: list[tuple[str, Scenario]] = [("orders", _orders), ("auth", _auth), ("idempotency", _idempotency),
                                             ("handed_on", _handed_on), ("rate_limited", _rate_limited)]

    metrics: list[tuple[str, list[tuple[str, str, int]], list[tuple[str, str, int]]]] = []

    async def main() -> list[tuple[str, list[Answer], list[Answer]]]:
        results = []
        async with _fronts(env) as (lit, fast, apps):
            px = await _prices(apps[0])
            for name, scenario in scenarios:
                runs, labels = [], []
                for tag, front, app in (("L", lit, apps[0]), ("F", fast, apps[1])):
                    front.resting.clear()
                    ctx = dict(keys, px=px, state=app.state.edge, tag=f"{name}-{tag}-{time.time_ns()}")
                    start = len(recorded)
                    runs.append(await scenario(front, ctx))
                    labels.append(recorded[start:])
                results.append((name, runs[0], runs[1]))
                metrics.append((name, labels[0], labels[1]))
        return results

    results = asyncio.run(main())
    for name, lit_answers, fast_answers in results:
        assert len(lit_answers) == len(fast_answers)
        for i, (a, b) in enumerate(zip(lit_answers, fast_answers, strict=True)):
            assert a[:3] == b[:3], f"{name}[{i}]: Litestar answered {a[:3]}, the fast path {b[:3]}"
            assert a[3], f"{name}[{i}]: the Litestar-only app did not route through Litestar"
            if name == "handed_on":
                assert b[3], f"{name}[{i}]: the fast path should have handed this request to Litestar"
            else:
                assert not b[3], f"{name}[{i}]: the fast path handed a request it serves to Litestar: {b[:3]}"
    for (name, answers, _), (_, lit_labels, fast_labels) in zip(results, metrics, strict=True):
        if name != "handed_on":  # (Litestar records no sample for what its router refuses, e.g. a 405)
            assert len(lit_labels) == len(answers), f"{name}: one latency sample per request: {lit_labels}"
        assert lit_labels == fast_labels, f"{name}: request metrics differ: {lit_labels} vs {fast_labels}"
    # The scenarios reach what they are meant to (else equal answers would prove little).
    got = {name: [a[0] for a in la] for name, la, _ in results}
    assert got["orders"][:4] == [201, 201, 201, 201] and got["orders"][8:11] == [404, 200, 409], got["orders"]
    assert set(got["orders"][4:8]) <= {400, 404, 422} and 422 in got["orders"][4:8], got["orders"]
    assert got["auth"] == [401, 401, 201, 401, 401, 403, 403], got["auth"]
    assert got["idempotency"] == [201, 201, 409, 400, 422, 422, 200, 200], got["idempotency"]
    assert got["rate_limited"] == [429, 429, 429], got["rate_limited"]
    assert ("retry-after", "<n>") in results[-1][2][0][1], results[-1][2][0]
    fills = results[0][1][3][2]
    assert fills["status"] == "FILLED" and len(fills["fills"]) == 1, fills
