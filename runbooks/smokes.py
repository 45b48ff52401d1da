"""Seed §5 (Gate G0) and §5.1 (Gate G3) local smokes, against a running or self-started stack.

Both walk the product path the way a trader and an operator meet it: two fresh accounts are funded
(a ``Deposit`` command on CMD, as custody would), an Ed25519 API key is registered for each, a
WebSocket client subscribes to ``trades`` and ``candles`` (1m) of the market, then a maker SELL (GTC)
and a crossing taker BUY (IOC) go through the signed REST API (``POST /v1/orders``).

``spotex smoke g0`` checks: both orders accepted (201, not REJECTED), the taker traded, every trade of
the taker order is settled in PostgreSQL (a ``ledger_trades`` row and a ``settlement`` entry in the
``ledger_entries`` view), and the WebSocket delivered ``TradeExecuted`` for those trades and a
``CandleUpdated`` at or after them. Success line ``smoke_g0_success=true``.

``spotex smoke g3`` (the ledger safety path) checks in addition: each order has exactly one
``reserve`` entry, each trade exactly ONE trade entry (``reference_type='trade'``) and one
``ledger_trades`` row, the trade's postings are complete and sum to zero per asset, and the ledger's
checkpoint for the market reached the trade's seq. Success line ``smoke_g3_success=true``.

A failed check prints ``smoke_<gate>_failed=<check>: <detail>`` (the first failing check), then
``smoke_<gate>_success=false``, and the command exits 1. Evidence:
``build/runbooks/smoke-<gate>/smoke-<gate>.json`` (every check, the orders, trades, ledger rows and the
WS frames seen), status-before.json and status-after.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from decimal import ROUND_CEILING, Decimal
from typing import Any

from runbooks.common import Drill

__all__ = ["SmokeFailed", "smoke_g0", "smoke_g3"]

WAIT_S = 30.0  # per asynchronous check (settlement, WS delivery); the stack shares 2 cores


class SmokeFailed(Exception):
    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check, self.detail = check, detail


def _endpoint(status: dict[str, Any], name: str) -> str:
    for c in status.get("components") or []:
        if c.get("name") == name and c.get("endpoint"):
            return str(c["endpoint"])
    raise SmokeFailed("stack_ready", f"no {name} endpoint in `spotex status` (is the {name} service running?)")


def _dec(s: str) -> Decimal:
    return Decimal(s)


def _minor(amount: Decimal, scale: int) -> int:
    return int((amount * (Decimal(10) ** scale)).to_integral_value(ROUND_CEILING))


def _plan(market: dict[str, Any], book: dict[str, Any], last: str | None) -> tuple[Decimal, Decimal]:
    """A price strictly above the best bid (the maker SELL must rest, not take) and a quantity worth
    about twice the minimum notional."""
    tick, lot = _dec(market["tickSize"]), _dec(market["lotSize"])
    bid = _dec(book["bids"][0][0]) if book.get("bids") else None
    ask = _dec(book["asks"][0][0]) if book.get("asks") else None
    if last is not None:
        price = _dec(last)
    elif bid is not None and ask is not None:
        price = ((bid + ask) / 2).quantize(tick)
    else:
        price = ask or bid or Decimal(100)
    if bid is not None and price <= bid:
        price = bid + tick
    price = price.quantize(tick)
    qty = (_dec(market["minNotional"]) * 2 / price / lot).to_integral_value(ROUND_CEILING) * lot
    return price, max(qty, lot)


class _Ws:
    """A WebSocket client that records every frame (parsed) with its arrival time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.frames: list[dict[str, Any]] = []
        self.ws: Any = None
        self._task: asyncio.Task[None] | None = None
        self._new = asyncio.Event()

    async def __aenter__(self) -> _Ws:
        import websockets

        self.ws = await websockets.connect(self.url, max_size=None)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await self.ws.close()

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                f = json.loads(raw)
                f["_rx_ms"] = time.time_ns() // 1_000_000
                self.frames.append(f)
                self._new.set()

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(obj))

    async def wait_for(self, pred: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if any(pred(f) for f in self.frames):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)


async def _smoke(d: Drill, gate: str, symbol: str | None) -> bool:
    report: dict[str, Any] = {"gate": gate, "checks": {}, "started_at_ms": time.time_ns() // 1_000_000}
    checks: dict[str, Any] = report["checks"]
    failed: SmokeFailed | None = None
    try:
        await _walk(d, gate, symbol, report, checks)
    except SmokeFailed as exc:
        failed = exc
    except Exception as exc:  # an unexpected error is a failed smoke, named as such
        failed = SmokeFailed("unexpected_error", repr(exc))
    report["status_after"] = d.status("after").get("healthy")
    ok = failed is None
    if failed is not None:
        checks[failed.check] = {"ok": False, "detail": failed.detail}
        report["failed"] = {"check": failed.check, "detail": failed.detail}
    report["success"] = ok
    for name, c in checks.items():
        d.emit(f"smoke_{gate}_{name}", bool(c.get("ok")))
    if report.get("ws_events"):
        d.emit("ws_events", ",".join(report["ws_events"]))
    path = d.write(f"smoke-{gate}.json", report)
    d.emit(f"smoke_{gate}_evidence", str(path))
    if failed is not None:
        d.emit(f"smoke_{gate}_failed", f"{failed.check}: {failed.detail}")
    d.emit(f"smoke_{gate}_success", ok)
    return ok


def _check(checks: dict[str, Any], name: str, ok: bool, detail: str, **extra: Any) -> None:
    checks[name] = {"ok": ok, "detail": detail, **extra}
    if not ok:
        raise SmokeFailed(name, detail)


async def _walk(d: Drill, gate: str, symbol: str | None, report: dict[str, Any], checks: dict[str, Any]) -> None:
    import asyncpg
    import httpx
    import nats
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from core.bus import cmd_subject
    from core.wire import Deposit, encode_request
    from edge.app import master_key_path
    from edge.auth import KeyStore, SecretBox, signed_headers

    before = d.status("before")
    _check(checks, "stack_ready", bool(before.get("healthy")), "spotex status reports the stack healthy"
           if before.get("healthy") else f"spotex status: {json.dumps(before)[:300]}")
    edge = _endpoint(before, "edge")
    ws_url = "ws" + edge[len("http"):] + "/v1/ws"
    ep = d.endpoints
    http = httpx.AsyncClient(base_url=edge, timeout=15)
    pool = await asyncpg.create_pool(ep.pg_dsn, min_size=1, max_size=2)
    nc = await nats.connect(ep.nats_url)
    try:
        markets = (await http.get("/v1/markets")).json()
        cands = [m for m in markets
                 if m.get("mode", "NORMAL") == "NORMAL" and (symbol is None or m["symbol"] == symbol)]
        _check(checks, "market", bool(cands), f"market {symbol or '(first NORMAL)'} listed and NORMAL")
        mkt = cands[0]
        sym = mkt["symbol"]
        report["symbol"] = sym
        book = (await http.get(f"/v1/markets/{sym}/orderbook", params={"depth": 20})).json()
        last_trades = (await http.get(f"/v1/markets/{sym}/trades", params={"limit": 1})).json().get("trades") or []
        price, qty = _plan(mkt, book, last_trades[0]["price"] if last_trades else None)
        report["price"], report["quantity"] = str(price), str(qty)

        # Two fresh accounts with an Ed25519 key each (nothing secret stored), funded on CMD.
        nonce = secrets.randbelow(10**8)
        maker_acct, taker_acct = 3_000_000_000 + 2 * nonce, 3_000_000_001 + 2 * nonce
        box = SecretBox.from_file(master_key_path(d.cfg, d.data_dir), create=not d.cfg.production)
        store = KeyStore(pool, box)
        keys: dict[int, tuple[str, Ed25519PrivateKey]] = {}
        for acct in (maker_acct, taker_acct):
            pk = Ed25519PrivateKey.generate()
            pub = pk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
            ck = await store.create(acct, ["read", "trade"], label=f"smoke-{gate}", ed25519_public_key=pub)
            keys[acct] = (ck.api_key, pk)
        report["accounts"] = {"maker": maker_acct, "taker": taker_acct}
        js = nc.jetstream()
        scale_b, scale_q = int(mkt["baseScale"]), int(mkt["quoteScale"])
        funding = {maker_acct: (mkt["base"], _minor(qty * 2, scale_b)),
                   taker_acct: (mkt["quote"], _minor(price * qty * 2, scale_q))}
        for acct, (asset, amount) in funding.items():
            await js.publish(cmd_subject(None), encode_request(Deposit(account_id=acct, asset=asset, amount=amount,
                                                                       reference=f"smoke-{gate}-{nonce}")),
                             headers={"Nats-Msg-Id": f"smoke-{gate}-fund-{acct}"})

        async def req(acct: int, method: str, path: str, body: Any = None, idem: str | None = None) -> Any:
            raw = json.dumps(body).encode() if body is not None else b""
            api_key, pk = keys[acct]
            h = signed_headers(api_key, pk, method, path, raw)
            h["content-type"] = "application/json"
            if idem:
                h["Idempotency-Key"] = idem
            return await http.request(method, path, content=raw, headers=h)

        async def funded(acct: int, asset: str, amount: int) -> bool:
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                r = await req(acct, "GET", "/v1/account/balances")
                if r.status_code == 200:
                    for b in r.json().get("balances", []):
                        if b["asset"] == asset and _minor(_dec(b["available"]), scale_q if asset == mkt["quote"]
                                                          else scale_b) >= amount:
                            return True
                await asyncio.sleep(0.2)
            return False

        for acct, (asset, amount) in funding.items():
            _check(checks, "funded", await funded(acct, asset, amount),
                   f"deposits visible in GET /v1/account/balances of {maker_acct} and {taker_acct}")

        async with _Ws(ws_url) as ws:
            await ws.send({"op": "SUB", "channel": "trades", "symbol": sym})
            await ws.send({"op": "SUB", "channel": "candles", "symbol": sym, "interval": "1m"})
            subscribed = await ws.wait_for(lambda f: f.get("type") == "Snapshot" and f.get("channel") == "candles",
                                           WAIT_S)
            _check(checks, "ws_subscribed", subscribed and any(
                f.get("type") == "Snapshot" and f.get("channel") == "trades" for f in ws.frames),
                "Snapshot frames for trades and candles(1m)")

            tag = f"smoke-{gate}-{nonce}"
            r_m = await req(maker_acct, "POST", "/v1/orders",
                            {"symbol": sym, "side": "SELL", "type": "LIMIT", "timeInForce": "GTC",
                             "price": str(price), "quantity": str(qty), "clientOrderId": f"{tag}-m"}, f"{tag}-m")
            maker = r_m.json()
            report["maker_order"] = maker
            _check(checks, "maker_order_accepted", r_m.status_code == 201 and maker.get("status") != "REJECTED",
                   f"POST /v1/orders (maker SELL {qty}@{price}) -> {r_m.status_code} {maker.get('status') or r_m.text}")
            r_t = await req(taker_acct, "POST", "/v1/orders",
                            {"symbol": sym, "side": "BUY", "type": "LIMIT", "timeInForce": "IOC",
                             "price": str(price), "quantity": str(qty), "clientOrderId": f"{tag}-t"}, f"{tag}-t")
            taker = r_t.json()
            report["taker_order"] = taker
            _check(checks, "order_accepted", r_t.status_code == 201 and taker.get("status") != "REJECTED",
                   f"POST /v1/orders (taker BUY IOC {qty}@{price}) -> {r_t.status_code} "
                   f"{taker.get('status') or r_t.text}")
            trade_ids = [int(f["tradeId"]) for f in taker.get("fills") or []]
            _check(checks, "trade_executed", bool(trade_ids), f"the taker order traded: trade ids {trade_ids}",
                   trade_ids=trade_ids)

            got_trades = await ws.wait_for(
                lambda _f: {f["data"]["tradeId"] for f in ws.frames if f.get("type") == "TradeExecuted"
                            and f.get("channel") == "trades"} >= set(trade_ids), WAIT_S)
            tr_frames = [f for f in ws.frames if f.get("type") == "TradeExecuted" and f["data"]["tradeId"] in trade_ids]
            _check(checks, "ws_trade_executed", got_trades,
                   f"WS TradeExecuted for trades {trade_ids} (got {[f['data']['tradeId'] for f in tr_frames]})")
            trade_seqs = {f["data"]["tradeId"]: int(f["seq"]) for f in tr_frames}
            top_seq = max(trade_seqs.values())
            got_candle = await ws.wait_for(lambda f: f.get("type") == "CandleUpdated" and f.get("symbol") == sym
                                           and int(f.get("seq") or 0) >= top_seq, WAIT_S)
            _check(checks, "ws_candle_updated", got_candle, f"WS CandleUpdated at seq >= {top_seq}")
            report["ws_events"] = sorted({f["type"] for f in ws.frames})
            report["ws_frames"] = [f for f in ws.frames if f.get("type") in ("TradeExecuted", "CandleUpdated")][:50]

            # Settlement in PostgreSQL (the book of record).
            deadline = time.monotonic() + WAIT_S
            rows: list[Any] = []
            while time.monotonic() < deadline:
                rows = await pool.fetch("SELECT trade_id, seq, tx_id FROM ledger_trades WHERE symbol = $1 "
                                        "AND trade_id = ANY($2::bigint[])", sym, trade_ids)
                if len(rows) == len(trade_ids):
                    break
                await asyncio.sleep(0.2)
            _check(checks, "ledger_trade_rows", len(rows) == len(trade_ids),
                   f"ledger_trades rows for {trade_ids}: {len(rows)}")
            entries = [dict(r) for r in await pool.fetch(
                "SELECT entry_id, reference_type, reference_id, entry_kind, symbol, engine_seq, legs "
                "FROM ledger_entries WHERE symbol = $1 AND reference_type = 'trade' AND reference_id = ANY($2::text[]) "
                "ORDER BY entry_id", sym, [str(t) for t in trade_ids])]
            report["ledger_entries"] = entries
            per_trade = {t: [e for e in entries if e["reference_id"] == str(t)] for t in trade_ids}
            if gate == "g0":
                _check(checks, "settlement_append", all(
                    any(e["entry_kind"] == "settlement" for e in es) for es in per_trade.values()),
                    f"a settlement entry in ledger_entries for every trade: {per_trade}")
            else:
                await _g3_checks(pool, sym, maker, taker, rows, per_trade, checks)
            with contextlib.suppress(Exception):  # leave the book as found
                if maker.get("status") in ("NEW", "ACCEPTED", "PARTIALLY_FILLED"):
                    await req(maker_acct, "DELETE", f"/v1/orders/{maker['orderId']}", idem=f"{tag}-cancel")
    finally:
        await http.aclose()
        await pool.close()
        await nc.close()


async def _g3_checks(pool: Any, sym: str, maker: dict[str, Any], taker: dict[str, Any], rows: list[Any],
                     per_trade: dict[int, list[dict[str, Any]]], checks: dict[str, Any]) -> None:
    _check(checks, "one_trade_entry", all(len(es) == 1 and es[0]["entry_kind"] == "settlement"
                                           for es in per_trade.values()),
           "exactly one trade entry per trade: " + ", ".join(f"{t}={len(es)}" for t, es in per_trade.items()))
    for name, order in (("maker", maker), ("taker", taker)):
        n = await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE symbol = $1 AND reference_type = 'order' "
                                "AND reference_id = $2 AND entry_kind = 'reserve'", sym, str(order["orderId"]))
        _check(checks, f"reserve_{name}", n == 1, f"one reserve entry for the {name} order {order['orderId']}: {n}")
    for r in rows:
        sums = await pool.fetch("SELECT asset, sum(delta)::bigint AS total, count(*) AS n FROM ledger_postings "
                                "WHERE tx_id = $1 GROUP BY asset", r["tx_id"])
        legs = await pool.fetchval("SELECT legs FROM ledger_journal WHERE tx_id = $1", r["tx_id"])
        n = sum(s["n"] for s in sums)
        _check(checks, "postings_balanced", all(s["total"] == 0 for s in sums) and n == legs,
               f"trade {r['trade_id']} postings per asset {[(s['asset'], s['total']) for s in sums]}, "
               f"{n} of {legs} legs")
    cp = await pool.fetchval("SELECT last_seq FROM ledger_consumer_checkpoint WHERE stream = $1", sym)
    top = max(r["seq"] for r in rows)
    _check(checks, "ledger_checkpoint", cp is not None and cp >= top,
           f"ledger checkpoint of {sym} = {cp}, trade seqs {[r['seq'] for r in rows]}")


async def smoke_g0(d: Drill, symbol: str | None = None) -> bool:
    return await _smoke(d, "g0", symbol)


async def smoke_g3(d: Drill, symbol: str | None = None) -> bool:
    return await _smoke(d, "g3", symbol)
