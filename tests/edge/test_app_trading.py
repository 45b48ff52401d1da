"""The edge over a real stack (`spotex up`): signed REST orders through JetStream and the core, balances,
problem+json, idempotency, admin SetSymbolMode with audit, and the Binance facade driven by the unmodified
CCXT `binance` class and python-binance."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import httpx
import pytest

from edge.auth import signed_headers
from tests.edge.stackenv import USD, Env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(edge_env: Env) -> Env:
    return edge_env


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = dict(r.json())
    assert body["code"] == code
    return body


def test_probes(env: Env) -> None:
    assert httpx.get(env.edge + "/healthz").status_code == 200
    r = httpx.get(env.edge + "/readyz")
    assert r.status_code == 200, r.text
    assert httpx.get(env.edge + "/schema/openapi.json").status_code == 200


def test_an_idle_connection_outlives_a_clients_pool_expiry(env: Env) -> None:
    """edge.keep_alive_s (65 s): a connection idle for 6 s, past httpx's 5 s pool expiry and uvicorn's
    5 s default, still takes a request. With the server closing first, a client's request could go out
    on a connection being closed under it and fail (the cockpit's control once did)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(env.edge)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        assert r.status == 200 and not r.will_close
        r.read()
        sock = conn.sock
        time.sleep(6.0)
        conn.request("GET", "/healthz")  # on the same socket: a closed one fails (RemoteDisconnected)
        assert conn.sock is sock
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_place_get_cancel_and_balances(env: Env) -> None:
    k = env.key(2001)
    env.fund(2001, {"USDT": 100_000 * USD, "BTC": 10 * USD})
    r = env.req(k, "GET", "/v1/account/balances")
    assert r.status_code == 200
    bal = {b["asset"]: b for b in r.json()["balances"]}
    assert bal["USDT"]["available"] == "100000.00000000"

    r = env.req(k, "POST", "/v1/orders", {"symbol": "BTC-USDT", "side": "BUY", "price": "50000.00",
                                          "quantity": "0.01", "clientOrderId": "a1"},
                {"Idempotency-Key": "place-a1"})
    assert r.status_code == 201, r.text
    assert r.headers["ratelimit-limit"]
    o = r.json()
    assert o["status"] == "NEW" and o["price"] == "50000.00" and o["quantity"] == "0.01000"
    # same key, same payload: the original result, not a second order
    r2 = env.req(k, "POST", "/v1/orders", {"symbol": "BTC-USDT", "side": "BUY", "price": "50000.00",
                                           "quantity": "0.01", "clientOrderId": "a1"},
                 {"Idempotency-Key": "place-a1"})
    assert r2.status_code == 201 and r2.json()["orderId"] == o["orderId"]
    assert r2.headers.get("idempotent-replayed") == "true"
    # same key, different payload
    _problem(env.req(k, "POST", "/v1/orders", {"symbol": "BTC-USDT", "side": "BUY", "price": "50001.00",
                                               "quantity": "0.01"}, {"Idempotency-Key": "place-a1"}),
             409, "IDEMPOTENCY_CONFLICT")
    _problem(env.req(k, "POST", "/v1/orders", {"symbol": "BTC-USDT", "side": "BUY", "price": "1", "quantity": "1"},
                     {"Idempotency-Key": "bad key!"}), 400, "IDEMPOTENCY_KEY_INVALID")

    bal = {b["asset"]: b for b in env.req(k, "GET", "/v1/account/balances").json()["balances"]}
    assert bal["USDT"]["hold"] != "0.00000000"

    g = env.req(k, "GET", f"/v1/orders/{o['orderId']}")
    assert g.status_code == 200 and g.json()["status"] == "NEW"
    g = env.req(k, "GET", "/v1/orders/by-client-id/a1")
    assert g.status_code == 200 and g.json()["orderId"] == o["orderId"]
    assert [x["orderId"] for x in env.req(k, "GET", "/v1/orders/open").json()] == [o["orderId"]]

    a = env.req(k, "PATCH", f"/v1/orders/{o['orderId']}", {"quantity": "0.005"})
    assert a.status_code == 200 and a.json()["quantity"] == "0.00500", a.text

    d = env.req(k, "DELETE", f"/v1/orders/{o['orderId']}")
    assert d.status_code == 200 and d.json()["status"] == "CANCELED"
    body = _problem(env.req(k, "DELETE", f"/v1/orders/{o['orderId']}"), 409, "ORDER_ALREADY_CLOSED")
    assert body["executionStatus"] == "NOT_EXECUTED"
    _problem(env.req(k, "GET", "/v1/orders/999999999"), 404, "ORDER_NOT_FOUND")


def test_trade_and_fills(env: Env) -> None:
    maker, taker = env.key(2002), env.key(2003)
    env.fund(2002, {"BTC": 10 * USD})
    env.fund(2003, {"USDT": 1_000_000 * USD})
    r = env.req(maker, "POST", "/v1/orders", {"symbol": "BTC-USDT", "side": "SELL", "price": "40000.00",
                                              "quantity": "0.5"})
    assert r.status_code == 201, r.text
    r = env.req(taker, "POST", "/v1/orders", {"symbol": "BTC-USDT", "side": "BUY", "price": "40000.00",
                                              "quantity": "0.2", "timeInForce": "IOC"})
    assert r.status_code == 201, r.text
    o = r.json()
    assert o["status"] == "FILLED" and o["executedQuantity"] == "0.20000" and len(o["fills"]) == 1
    f = env.req(taker, "GET", "/v1/fills").json()
    assert f[0]["price"] == "40000.00" and f[0]["quantity"] == "0.20000" and not f[0]["maker"]
    f = env.req(maker, "GET", "/v1/fills?symbol=BTC-USDT").json()
    assert f[0]["maker"] and f[0]["side"] == "SELL"
    c = env.req(maker, "DELETE", "/v1/orders?symbol=BTC-USDT")
    assert c.status_code == 200 and c.json()["canceled"] == 1


def test_errors_are_problems(env: Env) -> None:
    k = env.key(2004)
    env.fund(2004, {"USDT": 10 * USD})
    _problem(env.req(k, "POST", "/v1/orders", {"symbol": "BTC-USDT", "side": "BUY", "price": "50000.001",
                                               "quantity": "0.01"}), 422, "TICK_SIZE")
    b = _problem(env.req(k, "POST", "/v1/orders", {"symbol": "BTC-USDT", "side": "BUY", "price": "40000.00",
                                                   "quantity": "1"}), 422, "INSUFFICIENT_FUNDS")
    assert b["executionStatus"] == "NOT_EXECUTED"
    _problem(env.req(k, "POST", "/v1/orders", {"symbol": "NOPE-USDT", "side": "BUY", "price": "1",
                                               "quantity": "1"}), 422, "UNKNOWN_SYMBOL")
    _problem(env.req(k, "POST", "/v1/orders", {"side": "BUY"}), 400, "VALIDATION")
    _problem(httpx.post(env.edge + "/v1/orders", content=b'{"symbol":"BTC-USDT","side":"BUY"}'), 401, "AUTH_MISSING")
    ro = env.key(2004, "read")
    _problem(env.req(ro, "POST", "/v1/orders", {"symbol": "BTC-USDT", "side": "BUY", "price": "1.00",
                                                "quantity": "1"}), 403, "AUTH_SCOPE")
    h = signed_headers(k["api_key"], k["secret"], "GET", "/v1/account/balances", b"")
    assert httpx.get(env.edge + "/v1/account/balances", headers=h).status_code == 200
    _problem(httpx.get(env.edge + "/v1/account/balances", headers=h), 401, "AUTH_REPLAY")
    _problem(httpx.get(env.edge + "/v1/nope"), 404, "NOT_FOUND")
    _problem(httpx.put(env.edge + "/v1/markets"), 405, "METHOD_NOT_ALLOWED")
    m = httpx.get(env.edge + "/metrics").text
    assert "auth_fail_total" in m and "edge_http_request_seconds_bucket" in m and "replay_detect_total" in m


def test_admin_set_mode_is_audited_first(env: Env) -> None:
    k = env.key(2005)
    env.fund(2005, {"USDT": 100_000 * USD})
    r = env.admin("POST", "/v1/admin/symbols/SOL-USDT/mode", {"mode": "CANCEL_ONLY", "reason": "drill"})
    _problem(r, 400, "AUDIT_TICKET_REQUIRED")
    r = env.admin("POST", "/v1/admin/symbols/SOL-USDT/mode", {"mode": "CANCEL_ONLY", "ticket": "INC-7"})
    _problem(r, 400, "AUDIT_REASON_REQUIRED")
    r = env.admin("POST", "/v1/admin/symbols/SOL-USDT/mode",
                  {"mode": "CANCEL_ONLY", "reason": "invariant drill", "ticket": "INC-7"})
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "CANCEL_ONLY"
    _problem(env.req(k, "POST", "/v1/orders", {"symbol": "SOL-USDT", "side": "BUY", "price": "100.000",
                                               "quantity": "1"}), 409, "CANCEL_ONLY")
    st = env.admin("GET", "/v1/admin/status").json()
    assert st["modes"]["SOL-USDT"] == "CANCEL_ONLY" and st["core"]["role"] == "leader"
    r = env.admin("POST", "/v1/admin/symbols/SOL-USDT/mode", {"mode": "NORMAL", "reason": "resume", "ticket": "INC-7"})
    assert r.status_code == 200
    audit = env.admin("GET", "/v1/admin/audit?limit=5").json()
    assert audit[0]["params"] == {"mode": "NORMAL", "symbol": "SOL-USDT"} and audit[0]["seq"] > audit[1]["seq"]
    r = env.admin("POST", "/v1/admin/withdrawals/halt", {"on": True, "reason": "drill", "ticket": "INC-8"})
    assert r.status_code == 200 and r.json()["withdrawalsHalted"] is True
    r = env.admin("POST", "/v1/admin/break-glass/enable", {"ttl_s": 60, "reason": "drill"})
    assert r.status_code == 200 and r.json()["active"] is True
    r = env.admin("POST", "/v1/admin/break-glass/disable", {"reason": "done"})
    assert r.status_code == 200 and r.json()["active"] is False
    # a trader key is not an operator
    _problem(env.req(k, "GET", "/v1/admin/status"), 401, "AUTH_UNKNOWN_KEY")
    res = env.st.cli("audit", "verify", "--require-events")
    assert res.returncode == 0 and "audit chain OK" in res.stdout, res.stdout + res.stderr


def test_ccxt_binance_class(env: Env) -> None:
    ccxt = pytest.importorskip("ccxt")
    mk_key, tk_key = env.key(2010), env.key(2011)
    env.fund(2010, {"BTC": 10 * USD})
    env.fund(2011, {"USDT": 1_000_000 * USD})
    base = env.edge + "/api/v3"

    def client(k: dict[str, Any]) -> Any:
        ex = ccxt.binance({"apiKey": k["api_key"], "secret": k["secret"],
                           "options": {"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False,
                                       "fetchMargins": False}})
        for name in ("public", "private", "v3", "v1"):
            ex.urls["api"][name] = base
        return ex

    mk, tk = client(mk_key), client(tk_key)
    markets = mk.load_markets()
    assert {"BTC/USDT", "ETH/USDT", "SOL/USDT"} <= set(markets)
    assert markets["BTC/USDT"]["precision"]["price"] == 0.01
    o = mk.create_order("BTC/USDT", "limit", "sell", 0.3, 41000)
    assert o["status"] == "open"
    book = tk.fetch_order_book("BTC/USDT")
    assert book["asks"][0][0] == 41000.0
    t = tk.create_order("BTC/USDT", "limit", "buy", 0.1, 41000, {"timeInForce": "IOC"})
    assert t["status"] == "closed" and t["filled"] == 0.1
    assert tk.fetch_balance()["BTC"]["total"] == pytest.approx(0.1 - 0.1 * 0.002)
    trades = tk.fetch_my_trades("BTC/USDT")
    assert trades[-1]["price"] == 41000.0 and trades[-1]["amount"] == 0.1
    assert mk.fetch_order(o["id"], "BTC/USDT")["filled"] == 0.1
    assert [x["id"] for x in mk.fetch_open_orders("BTC/USDT")] == [o["id"]]
    public = tk.fetch_trades("BTC/USDT")
    assert public and public[-1]["price"] == 41000.0
    candle = tk.fetch_ohlcv("BTC/USDT", "1m")[-1]
    assert candle[4] == 41000.0 and candle[5] >= 0.1  # close, volume
    assert tk.fetch_ticker("BTC/USDT")["last"] == 41000.0
    assert mk.cancel_order(o["id"], "BTC/USDT")["status"] == "canceled"
    with pytest.raises(ccxt.OrderNotFound):
        mk.fetch_order("99999999", "BTC/USDT")
    with pytest.raises(ccxt.InsufficientFunds):
        mk.create_order("BTC/USDT", "limit", "sell", 100, 41000)


def test_python_binance(env: Env) -> None:
    binance = pytest.importorskip("binance")
    k, ks = env.key(2020), env.key(2021)
    env.fund(2020, {"USDT": 100_000 * USD})
    env.fund(2021, {"BTC": 1 * USD})

    def client(key: dict[str, Any]) -> Any:
        c = binance.Client(key["api_key"], key["secret"], ping=False)
        c.API_URL = env.edge + "/api"
        return c

    c, seller = client(k), client(ks)
    info = c.get_symbol_info("BTCUSDT")
    assert info is not None and {f["filterType"] for f in info["filters"]} >= {"PRICE_FILTER", "LOT_SIZE", "NOTIONAL"}
    o = c.create_order(symbol="BTCUSDT", side="BUY", type="LIMIT", timeInForce="GTC", quantity="0.01",
                       price="39000.00")
    assert o["status"] == "NEW"
    assert c.get_order(symbol="BTCUSDT", orderId=o["orderId"])["status"] == "NEW"
    assert [x["orderId"] for x in c.get_open_orders(symbol="BTCUSDT")] == [o["orderId"]]
    book = c.get_order_book(symbol="BTCUSDT")
    assert book["lastUpdateId"] > 0 and book["bids"][0] == ["39000.00", "0.01000"]
    acct = c.get_account()
    assert {b["asset"]: b for b in acct["balances"]}["USDT"]["locked"] == "390.00000000"
    # Another client takes part of it: a public trade, a candle, a fill on each side.
    s = seller.create_order(symbol="BTCUSDT", side="SELL", type="LIMIT", timeInForce="IOC", quantity="0.004",
                            price="39000.00")
    assert s["status"] == "FILLED" and s["executedQty"] == "0.00400" and len(s["fills"]) == 1
    trade_id = s["fills"][0]["tradeId"]
    # Market data is a projection of EVT (its own subscription): it may trail the order's answer.
    deadline = time.monotonic() + 10
    while (last := c.get_recent_trades(symbol="BTCUSDT")[-1])["id"] != trade_id and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last["id"] == trade_id and last["price"] == "39000.00" and last["qty"] == "0.00400"
    assert last["isBuyerMaker"] is True
    kline = c.get_klines(symbol="BTCUSDT", interval="1m")[-1]
    assert kline[4] == "39000.00" and float(kline[5]) >= 0.004
    mine = c.get_my_trades(symbol="BTCUSDT")[-1]
    assert mine["id"] == trade_id and mine["orderId"] == o["orderId"] and mine["isBuyer"] and mine["isMaker"]
    assert mine["commission"] == "0.00000400" and mine["commissionAsset"] == "BTC"  # maker 10 bps, in base
    theirs = seller.get_my_trades(symbol="BTCUSDT")[-1]
    assert theirs["id"] == trade_id and not theirs["isBuyer"] and not theirs["isMaker"]
    q = c.get_order(symbol="BTCUSDT", orderId=o["orderId"])
    assert q["status"] == "PARTIALLY_FILLED" and q["executedQty"] == "0.00400"
    assert c.cancel_order(symbol="BTCUSDT", orderId=o["orderId"])["status"] == "CANCELED"
    assert c.get_open_orders(symbol="BTCUSDT") == []
    bal = {b["asset"]: b for b in c.get_account()["balances"]}
    assert bal["BTC"]["free"] == "0.00399600" and bal["USDT"]["locked"] == "0.00000000"
    with pytest.raises(binance.exceptions.BinanceAPIException) as ei:
        c.get_order(symbol="BTCUSDT", orderId=123456789)
    assert ei.value.code == -2013


def test_fills_come_from_the_ledger_survive_an_edge_restart_and_page(env: Env) -> None:
    maker, taker = env.key(2030), env.key(2031)
    env.fund(2030, {"ETH": 100 * USD})
    env.fund(2031, {"USDT": 1_000_000 * USD})
    r = env.req(maker, "POST", "/v1/orders", {"symbol": "ETH-USDT", "side": "SELL", "price": "2000.00",
                                              "quantity": "10", "clientOrderId": "mk-1"})
    assert r.status_code == 201, r.text
    maker_oid = r.json()["orderId"]
    taken = []
    for i in range(5):
        r = env.req(taker, "POST", "/v1/orders", {"symbol": "ETH-USDT", "side": "BUY", "price": "2000.00",
                                                  "quantity": f"0.{i + 1}", "timeInForce": "IOC"})
        assert r.status_code == 201 and r.json()["status"] == "FILLED", r.text
        taken.append(r.json()["fills"][0])
    ids = [f["tradeId"] for f in taken]
    assert ids == sorted(ids)
    before = env.req(taker, "GET", "/v1/fills?symbol=ETH-USDT").json()
    assert [f["tradeId"] for f in before] == ids[::-1]

    # Wait for the ledger (the book of record) to settle them, then kill the edge and its memory.
    deadline = time.monotonic() + 60
    while env.settled_fills(2031) < 5 or env.settled_fills(2030) < 5:
        assert time.monotonic() < deadline, "the ledger did not settle the trades"
        time.sleep(0.3)
    env.restart_edge()

    after = env.req(taker, "GET", "/v1/fills?symbol=ETH-USDT").json()
    assert [f["tradeId"] for f in after] == ids[::-1]
    for got, want in zip(after[::-1], taken, strict=True):
        assert {k: got[k] for k in ("price", "quantity", "quoteQuantity", "fee", "feeAsset", "side", "maker")} == \
            {k: want[k] for k in ("price", "quantity", "quoteQuantity", "fee", "feeAsset", "side", "maker")}
    mk = env.req(maker, "GET", f"/v1/fills?orderId={maker_oid}").json()
    assert [f["tradeId"] for f in mk] == ids[::-1] and all(f["maker"] and f["side"] == "SELL" for f in mk)
    assert all(f["feeAsset"] == "USDT" for f in mk)  # the seller pays in quote
    # Paging: newest first by limit; forward from a trade id (oldest first); a time window.
    assert [f["tradeId"] for f in env.req(taker, "GET", "/v1/fills?symbol=ETH-USDT&limit=2").json()] == ids[:2:-1]
    page = env.req(taker, "GET", f"/v1/fills?symbol=ETH-USDT&fromId={ids[1]}&limit=2").json()
    assert [f["tradeId"] for f in page] == ids[1:3]
    page = env.req(taker, "GET", f"/v1/fills?symbol=ETH-USDT&fromId={ids[3]}&limit=10").json()
    assert [f["tradeId"] for f in page] == ids[3:]
    t = [f["time"] for f in taken]
    window = env.req(taker, "GET", f"/v1/fills?startTime={t[0]}&endTime={t[4]}").json()
    assert {f["tradeId"] for f in window} == set(ids)
    assert env.req(taker, "GET", f"/v1/fills?startTime={t[4] + 1}").json() == []
    _problem(env.req(taker, "GET", f"/v1/fills?fromId={ids[0]}"), 400, "VALIDATION")
    _problem(env.req(taker, "GET", f"/v1/fills?startTime={t[4]}&endTime={t[0] - 1}"), 400, "VALIDATION")


def test_binance_my_trades_from_the_ledger(env: Env) -> None:
    """Runs after the restart above: every trade it reads comes from PostgreSQL, none from memory."""
    binance = pytest.importorskip("binance")
    k = env.key(2031, "read")  # a new key of the taker's account
    c = binance.Client(k["api_key"], k["secret"], ping=False)
    c.API_URL = env.edge + "/api"
    trades = c.get_my_trades(symbol="ETHUSDT")
    assert len(trades) == 5 and [t["id"] for t in trades] == sorted(t["id"] for t in trades)
    assert all(t["isBuyer"] and not t["isMaker"] and t["commissionAsset"] == "ETH" for t in trades)
    assert [t["qty"] for t in trades] == ["0.1000", "0.2000", "0.3000", "0.4000", "0.5000"]
    page = c.get_my_trades(symbol="ETHUSDT", fromId=trades[2]["id"], limit=2)
    assert [t["id"] for t in page] == [trades[2]["id"], trades[3]["id"]]
    last2 = c.get_my_trades(symbol="ETHUSDT", limit=2)
    assert [t["id"] for t in last2] == [trades[3]["id"], trades[4]["id"]]


def test_withdrawals_halt_state_is_known_after_an_edge_restart(env: Env) -> None:
    """The status summary's withdrawalsHalted is not only this edge's memory of the last event: a
    restarted edge reads the state from the core's status or the ledger's copy of the flag."""

    async def ledger_flag() -> str | None:
        conn = await asyncpg.connect(env.pg_dsn())
        try:
            v = await conn.fetchval("SELECT value FROM ledger_core_flags WHERE name = 'withdrawals_halt'")
            return None if v is None else str(v)
        finally:
            await conn.close()

    for on in (True, False):
        r = env.admin("POST", "/v1/admin/withdrawals/halt", {"on": on, "reason": "state drill", "ticket": "INC-9"})
        assert r.status_code == 200 and r.json()["withdrawalsHalted"] is on, r.text
        deadline = time.monotonic() + 30
        while asyncio.run(ledger_flag()) != ("on" if on else "off"):
            assert time.monotonic() < deadline, "the ledger did not record the flag"
            time.sleep(0.2)
        env.restart_edge()
        st = env.admin("GET", "/v1/admin/status")
        assert st.status_code == 200, st.text
        assert st.json()["withdrawalsHalted"] is on
