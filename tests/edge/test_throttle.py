"""Per-symbol order throttle (seed §3.2): the token bucket in-process, then over the real stack: the
admin API sets and clears it (audited), the edge refuses new orders over it with 429 SYMBOL_THROTTLED
(Binance facade -1015) while cancels pass, a restarted edge still enforces it, and the settlement_lag
job sets and lifts its own throttle and never an operator's."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import math
import os
import signal
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from core.bus import SymbolThrottle, throttle_key
from edge.errors import SpotexError
from edge.throttle import ThrottleBook
from tests.edge.stackenv import USD, Env

SYM = "SOL-USDT"  # no other edge test trades it, so its book stays simple
ADMIN = f"/v1/admin/symbols/{SYM}/throttle"


# --- in process: the book and its buckets (a manual clock, no sleeping) --------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _setting(layer: str, rate: int, burst: int, symbol: str = SYM) -> bytes:
    s = SymbolThrottle(symbol=symbol, layer=layer, orders_per_s=rate, burst=burst,  # type: ignore[arg-type]
                       actor="t", reason="r", ticket="T-1", audit_seq=1, set_at_ms=0)
    return msgspec.json.encode(s)


def test_book_enforces_the_strictest_layer_and_retunes_without_a_fresh_burst() -> None:
    clock = _Clock()
    book = ThrottleBook(clock=clock)
    book.check(SYM)  # nothing set: never refused
    book.apply(throttle_key(SYM, "operator"), _setting("operator", 10, 3))
    for _ in range(3):
        book.check(SYM)
    with pytest.raises(SpotexError) as ei:
        book.check(SYM)
    assert ei.value.code == "SYMBOL_THROTTLED" and ei.value.status == 429
    assert ei.value.headers["Retry-After"] == "1" and ei.value.execution_status == "NOT_EXECUTED"
    clock.t += 0.1  # one token back at 10/s
    book.check(SYM)
    with pytest.raises(SpotexError):
        book.check(SYM)
    # A stricter policy layer wins; tightening keeps the (empty) bucket, it does not refill it.
    book.apply(throttle_key(SYM, "policy"), _setting("policy", 1, 5))
    eff = book.effective(SYM)
    assert eff is not None and (eff.layer, eff.orders_per_s, eff.burst) == ("policy", 1, 5)
    with pytest.raises(SpotexError) as ei:
        book.check(SYM)
    assert ei.value.headers["Retry-After"] == "1"
    clock.t += 1.0
    book.check(SYM)
    # Deleting the policy layer leaves the operator's; deleting that too lifts the throttle.
    book.apply(throttle_key(SYM, "policy"), None)
    eff = book.effective(SYM)
    assert eff is not None and eff.layer == "operator"
    book.apply(throttle_key(SYM, "operator"), None)
    assert book.effective(SYM) is None and book.snapshot() == {}
    for _ in range(100):
        book.check(SYM)
    assert book.drops[SYM] == 3
    # Only other symbols' orders: a throttle is per symbol.
    book.apply(throttle_key("BTC-USDT", "operator"), _setting("operator", 1, 1, "BTC-USDT"))
    book.check("BTC-USDT")
    book.check(SYM)
    with pytest.raises(SpotexError):
        book.check("BTC-USDT")


def test_book_ignores_keys_and_values_that_are_not_a_throttle() -> None:
    book = ThrottleBook(clock=_Clock())
    book.apply("SOL-USDT.someone", _setting("operator", 1, 1))
    book.apply(throttle_key(SYM, "operator"), b"not json")
    book.apply(throttle_key(SYM, "operator"), _setting("operator", 0, 1))
    book.apply(throttle_key(SYM, "policy"), _setting("operator", 1, 1))  # layer does not match the key
    book.apply(throttle_key(SYM, "operator"), _setting("operator", 1, 1, "BTC-USDT"))  # symbol does not match
    assert book.settings == {}
    book.check(SYM)


# --- over the real stack ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(edge_env: Env) -> Iterator[Env]:
    yield edge_env
    # Leave the shared stack without throttles, whatever a test did.
    edge_env.admin("POST", ADMIN + "/clear", {"layer": "all", "reason": "test cleanup", "ticket": "T-CLEAN"})


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = dict(r.json())
    assert body["code"] == code, body
    return body


def _order(env: Env, k: dict[str, Any], n: int, idem: str | None = None) -> httpx.Response:
    body = {"symbol": SYM, "side": "BUY", "price": "100.000", "quantity": "0.10", "clientOrderId": f"thr-{n}"}
    return env.req(k, "POST", "/v1/orders", body, {"Idempotency-Key": idem} if idem else None)


def _until_throttled(env: Env, k: dict[str, Any], start: int, limit: int = 15) -> tuple[list[dict[str, Any]],
                                                                                        httpx.Response | None, float]:
    """Place orders one after another until one is refused; (accepted, the refusal, seconds taken)."""
    accepted: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for i in range(limit):
        r = _order(env, k, start + i)
        if r.status_code == 429:
            return accepted, r, time.monotonic() - t0
        assert r.status_code == 201, r.text
        accepted.append(r.json())
    return accepted, None, time.monotonic() - t0


def _audit(env: Env, limit: int = 20) -> list[dict[str, Any]]:
    r = env.admin("GET", f"/v1/admin/audit?limit={limit}")
    assert r.status_code == 200, r.text
    return list(r.json())


def _drops(env: Env) -> float:
    text = httpx.get(env.edge + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("edge_symbol_throttle_drops_total{") and f'symbol="{SYM}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _binance_order(env: Env, k: dict[str, Any], n: int) -> httpx.Response:
    q = urllib.parse.urlencode({"symbol": "SOLUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC",
                                "quantity": "0.10", "price": "100.000", "newClientOrderId": f"thr-b-{n}",
                                "timestamp": str(time.time_ns() // 1_000_000)})
    sig = hmac.new(k["secret"].encode(), q.encode(), hashlib.sha256).hexdigest()
    return httpx.post(f"{env.edge}/api/v3/order?{q}&signature={sig}", headers={"X-MBX-APIKEY": k["api_key"]},
                      timeout=10)


async def test_read_settings_gives_the_buckets_content_without_a_watch(nats_srv: Any) -> None:
    """read_settings lists the keys from the stream and reads each one: deleted and invalid values
    (and one naming another symbol than its key) are left out, a subject filter reads one layer, an
    empty bucket is an empty dict. Read many times right after writes, as the admin listing and the
    settlement-lag job do (the one-shot watch it replaced could report the bucket empty then)."""
    import nats

    from core.bus import THROTTLE_BUCKET, read_settings, throttle_bucket

    nc = await nats.connect(nats_srv.url)
    try:
        js = nc.jetstream()
        with contextlib.suppress(Exception):
            await js.delete_key_value(THROTTLE_BUCKET)
        assert await read_settings(js) == {}
        kv = await throttle_bucket(js)
        for rnd in range(20):
            rev_op = await kv.put(throttle_key("AAA-USDT", "operator"), _setting("operator", 100 + rnd, 10, "AAA-USDT"))
            rev_pol = await kv.put(throttle_key("AAA-USDT", "policy"), _setting("policy", 5, 5, "AAA-USDT"))
            await kv.put(throttle_key("BBB-USDT", "policy"), _setting("policy", 7, 7, "BBB-USDT"))
            await kv.delete(throttle_key("BBB-USDT", "policy"))
            await kv.put(throttle_key("CCC-USDT", "operator"), b"not a throttle")
            await kv.put(throttle_key("DDD-USDT", "operator"), _setting("operator", 1, 1, "AAA-USDT"))  # not its key's
            got = await read_settings(js)
            assert set(got) == {"AAA-USDT"} and set(got["AAA-USDT"]) == {"operator", "policy"}, got
            assert got["AAA-USDT"]["operator"][0].orders_per_s == 100 + rnd
            assert (got["AAA-USDT"]["operator"][1], got["AAA-USDT"]["policy"][1]) == (rev_op, rev_pol)
            policy = await read_settings(js, "*.policy")
            assert {sym: set(layers) for sym, layers in policy.items()} == {"AAA-USDT": {"policy"}}
    finally:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_key_value(THROTTLE_BUCKET)
        await nc.close()


@pytest.mark.slow
def test_admin_throttle_is_audited_enforced_cancels_pass_and_it_survives_an_edge_restart(env: Env) -> None:
    k = env.key(2101)
    env.fund(2101, {"USDT": 1_000_000 * USD})

    # Bad input is a clear 4xx and nothing is audited for it.
    _problem(env.admin("POST", ADMIN, {"ordersPerSecond": 1, "ticket": "T-1"}), 400, "AUDIT_REASON_REQUIRED")
    _problem(env.admin("POST", ADMIN, {"ordersPerSecond": 1, "reason": "x"}), 400, "AUDIT_TICKET_REQUIRED")
    _problem(env.admin("POST", ADMIN, {"ordersPerSecond": 0, "reason": "x", "ticket": "T-1"}), 400, "VALIDATION")
    _problem(env.admin("POST", "/v1/admin/symbols/NOPE-USDT/throttle",
                       {"ordersPerSecond": 1, "reason": "x", "ticket": "T-1"}), 404, "NOT_FOUND")
    _problem(env.admin("POST", ADMIN + "/clear", {"reason": "x", "ticket": "T-1"}), 404, "THROTTLE_NOT_SET")
    _problem(env.admin("POST", ADMIN + "/clear", {"layer": "bogus", "reason": "x", "ticket": "T-1"}), 400,
             "VALIDATION")

    # Set (operator layer): audited before it takes effect, and the stored setting names its entry.
    r = env.admin("POST", ADMIN, {"ordersPerSecond": 1, "burst": 2, "reason": "settlement lag INC-9",
                                  "ticket": "INC-9"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["ordersPerSecond"] == 1 and got["burst"] == 2 and got["effective"]["layer"] == "operator"
    entry = next(e for e in _audit(env) if e["seq"] == got["auditSeq"])
    assert entry["action"] == "SetSymbolThrottle" and entry["ticket"] == "INC-9"
    assert entry["params"] == {"symbol": SYM, "layer": "operator", "orders_per_s": 1, "burst": 2}
    listed = env.admin("GET", "/v1/admin/throttles").json()["throttles"][SYM]
    assert listed["layers"]["operator"]["auditSeq"] == got["auditSeq"]
    assert listed["enforced"]["ordersPerSecond"] == 1

    # Enforced: at 1/s with a burst of 2, at most 2 + (elapsed seconds) orders pass before a refusal.
    drops0 = _drops(env)
    accepted, refused, took = _until_throttled(env, k, 0)
    assert refused is not None, f"{len(accepted)} orders in {took:.1f}s, none throttled"
    assert len(accepted) <= 2 + math.ceil(took), (len(accepted), took)
    body = _problem(refused, 429, "SYMBOL_THROTTLED")
    assert body["executionStatus"] == "NOT_EXECUTED" and SYM in body["detail"]
    assert int(refused.headers["retry-after"]) >= 1

    # Cancels pass while new orders are refused: alternate them; every cancel succeeds.
    throttled_idem = None
    refusals = 0
    for i, o in enumerate(accepted):
        r = env.req(k, "DELETE", f"/v1/orders/{o['orderId']}")
        assert r.status_code == 200 and r.json()["status"] == "CANCELED", r.text
        idem = f"thr-idem-{time.time_ns()}"
        r = _order(env, k, 100 + i, idem)
        if r.status_code == 429:
            refusals += 1
            throttled_idem = (100 + i, idem)
        else:
            assert r.status_code == 201, r.text
            assert env.req(k, "DELETE", f"/v1/orders/{r.json()['orderId']}").status_code == 200
    assert refusals >= 1 and throttled_idem is not None
    assert _drops(env) >= drops0 + 1 + refusals

    # The Binance facade answers Binance's "too many new orders": 429, -1015, Retry-After.
    for n in range(15):
        rb = _binance_order(env, k, n)
        if rb.status_code == 429:
            break
        assert rb.status_code == 200, rb.text
        assert env.req(k, "DELETE", f"/v1/orders/{rb.json()['orderId']}").status_code == 200
    assert rb.status_code == 429 and rb.json()["code"] == -1015, rb.text
    assert int(rb.headers["retry-after"]) >= 1

    # A restarted edge loads the throttle from the bucket before it is ready, and enforces it.
    env.restart_edge()
    listed = env.admin("GET", "/v1/admin/throttles").json()["throttles"][SYM]
    assert listed["enforced"] == {"ordersPerSecond": 1, "burst": 2, "layer": "operator", "drops": 0}
    accepted, refused, took = _until_throttled(env, k, 200)
    assert refused is not None and len(accepted) <= 2 + math.ceil(took), (len(accepted), took)
    _problem(refused, 429, "SYMBOL_THROTTLED")
    for o in accepted:
        assert env.req(k, "DELETE", f"/v1/orders/{o['orderId']}").status_code == 200

    # Clear: audited; then orders flow again, and the throttled request's Idempotency-Key was not
    # burnt by its 429 (a retry executes, it does not replay the refusal).
    r = env.admin("POST", ADMIN + "/clear", {"reason": "lag recovered INC-9", "ticket": "INC-9"})
    assert r.status_code == 200 and r.json()["cleared"] == ["operator"] and r.json()["effective"] is None, r.text
    entry = next(e for e in _audit(env) if e["seq"] == r.json()["auditSeq"])
    assert entry["action"] == "ClearSymbolThrottle" and entry["params"]["layers"] == ["operator"]
    assert SYM not in env.admin("GET", "/v1/admin/throttles").json()["throttles"]
    n, idem = throttled_idem
    r = _order(env, k, n, idem)
    assert r.status_code == 201, r.text
    ids = [r.json()["orderId"]]
    for i in range(6):
        r = _order(env, k, 300 + i)
        assert r.status_code == 201, r.text
        ids.append(r.json()["orderId"])
    for oid in ids:
        assert env.req(k, "DELETE", f"/v1/orders/{oid}").status_code == 200


@pytest.mark.slow
def test_settlement_lag_job_sets_and_lifts_its_throttle_and_never_an_operators(env: Env, tmp_path: Path) -> None:
    from jobs.checks import POLICY_ACTOR
    from jobs.scheduler import close_context, make_context, open_context, run_job
    from spotex.config import load_config

    k = env.key(2102)
    env.fund(2102, {"USDT": 1_000_000 * USD})
    r = _order(env, k, 900)  # the symbol has events on EVT, so the job sees its stream
    assert r.status_code == 201, r.text
    assert env.req(k, "DELETE", f"/v1/orders/{r.json()['orderId']}").status_code == 200
    r = env.admin("POST", ADMIN, {"ordersPerSecond": 1000, "reason": "operator's own", "ticket": "INC-10"})
    assert r.status_code == 200, r.text

    base = load_config(None)

    def cfg(warn: int, t2: int, t3: int) -> Any:
        return msgspec.structs.replace(base, ledger=msgspec.structs.replace(
            base.ledger, lag_warn_seq=warn, lag_throttle_seq=t2, lag_halt_seq=t3),
            jobs=msgspec.structs.replace(base.jobs, lag_throttle_orders_per_s=2))

    async def run(c: Any, tmp: Path) -> dict[str, Any]:
        ctx = make_context(c, tmp, pg_dsn=env.pg_dsn(), nats_url=env.nats, evidence_dir=tmp / "ev")
        closers = await open_context(ctx)
        try:
            return await run_job(ctx, "settlement_lag", trigger="manual")
        finally:
            await close_context(closers)

    # The scheduled job (default thresholds) would lift the test's policy throttle at its next
    # minute: hold the jobs service still while the test drives the job itself.
    jobs_pid = int(env.component("jobs")["pid"])
    os.kill(jobs_pid, signal.SIGSTOP)
    tmp = tmp_path
    try:
        # T2 = 0: every traded symbol is "at T2" (lag >= 0); T3 out of reach, so no mode change.
        res = asyncio.run(run(cfg(0, 0, 10**12), tmp))
        pol = res["output"]["policy"]
        assert res["outcome"] == "violation" and res["output"]["recommended_action"] == "THROTTLE"
        mine = [a for a in pol["actions"] if a["symbol"] == SYM]
        assert [(a["kind"], a["to"], a["orders_per_s"]) for a in mine] == [("throttle", "THROTTLE", 2)], pol
        assert pol["throttled"][SYM] == 2 and pol["imposed"] == {} and not pol["throttle_unapplied"]
        entry = next(e for e in _audit(env, 50) if e["seq"] == mine[0]["audit_seq"])
        assert entry["actor"] == POLICY_ACTOR and entry["action"] == "SetSymbolThrottle"
        assert entry["params"]["layer"] == "policy" and entry["params"]["symbol"] == SYM
        listed = env.admin("GET", "/v1/admin/throttles").json()["throttles"][SYM]
        assert set(listed["layers"]) == {"operator", "policy"}
        assert listed["layers"]["policy"]["actor"] == POLICY_ACTOR
        # The edge learned it from its watch (not from this process) and enforces the stricter layer.
        assert listed["enforced"]["ordersPerSecond"] == 2 and listed["enforced"]["layer"] == "policy"
        accepted, refused, took = _until_throttled(env, k, 910)
        assert refused is not None and len(accepted) <= 2 + 2 * math.ceil(took), (len(accepted), took)
        for o in accepted:
            assert env.req(k, "DELETE", f"/v1/orders/{o['orderId']}").status_code == 200

        # Re-run at the same level: nothing to do (no duplicate audit entries).
        again = asyncio.run(run(cfg(0, 0, 10**12), tmp))
        assert [a for a in again["output"]["policy"]["actions"] if a["symbol"] == SYM] == []

        # Recovered (lag below the warn level): the job lifts its own layer, the operator's stays.
        res = asyncio.run(run(cfg(10**9, 10**10, 10**11), tmp))
        pol = res["output"]["policy"]
        mine = [a for a in pol["actions"] if a["symbol"] == SYM]
        assert [(a["kind"], a["to"]) for a in mine] == [("throttle", "UNTHROTTLED")], pol
        assert res["outcome"] == "ok" and pol["throttled"] == {}
        entry = next(e for e in _audit(env, 50) if e["seq"] == mine[0]["audit_seq"])
        assert entry["actor"] == POLICY_ACTOR and entry["action"] == "ClearSymbolThrottle"
        listed = env.admin("GET", "/v1/admin/throttles").json()["throttles"][SYM]
        assert set(listed["layers"]) == {"operator"} and listed["enforced"]["ordersPerSecond"] == 1000
    finally:
        os.kill(jobs_pid, signal.SIGCONT)
        asyncio.run(run(cfg(10**9, 10**10, 10**11), tmp))  # lift whatever the policy layer still holds
        env.admin("POST", ADMIN + "/clear", {"layer": "all", "reason": "test cleanup", "ticket": "T-CLEAN"})
