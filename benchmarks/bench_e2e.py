"""End to end over REST: signed POST /v1/orders -> edge -> JetStream -> core -> EVT -> ack.

``run(orders, concurrency, rate, data_dir)`` uses a running stack in ``data_dir`` or starts one in a
temporary directory (``spotex up --detach --no-demo``), creates four funded accounts with keys, and
drives ``concurrency`` keep-alive connections (paced to ``rate`` orders/s when given) with the
trader mix of the issue: 70% resting limit orders on both sides, 20% marketable IOC orders that
trade against them, 10% cancels of the connection's own resting orders (a cancel that finds its
order already filled, 404/409, is an answer, not an error). Latency is request start to response
end at the client. The client is ``benchmarks/httpload.py`` (one prepared write per request), not
httpx, whose ~1 ms of client CPU per request made the client the bottleneck on this machine.

``cpu_ms_per_order`` is each stack component's CPU time over the run (the process and its live
children, e.g. PostgreSQL's backends) divided by the orders, plus ``stack`` (their sum) and
``client`` (this process): the figure that does not depend on what else the machine runs, and
whose sum says what rate two cores can carry at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.httpload import Conn, HttpError

__all__ = ["drive", "run"]


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants; 0 if it is gone."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def cpu_per_order(pids: dict[str, int], before: dict[str, float], orders: int,
                  client_s: float) -> dict[str, float]:
    """CPU ms per order by component since ``before`` (from ``{name: _cpu_s(pid)}``)."""
    out = {name: round((_cpu_s(pid) - before[name]) * 1000 / max(1, orders), 3) for name, pid in pids.items()}
    out["stack"] = round(sum(out.values()), 3)
    out["client"] = round(client_s * 1000 / max(1, orders), 3)
    return out


async def drive(edge: str, nats_url: str, keys: list[dict[str, Any]], orders: int, concurrency: int,
                rate: float | None, fund: bool = True) -> dict[str, Any]:
    """Drive the trader mix against ``edge``; order ``i`` is signed with ``keys[i % len(keys)]`` (dicts with
    ``api_key``, ``secret``, ``account_id``). ``fund=False``: the caller funded the accounts already."""
    import nats

    from core.bus import cmd_subject
    from core.wire import Deposit, encode_request
    from edge.auth import signed_headers

    if fund:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        for k in keys:
            for asset in ("USDT", "BTC"):
                await js.publish(cmd_subject(None), encode_request(Deposit(account_id=k["account_id"], asset=asset,
                                                                           amount=10**8 * 10**9)),
                                 headers={"Nats-Msg-Id": f"bench-{k['api_key'][:8]}-{asset}-{time.time_ns()}"})
        await nc.close()
        await asyncio.sleep(0.5)
    lat: list[float] = []
    errors = 0
    kinds = {"rest": 0, "cross": 0, "cancel": 0}
    counter = iter(range(orders))
    # Crossing orders repeat their body, so each carries a client order id: two identical signed
    # requests of one key in the same millisecond are a replay, which the edge refuses (401).
    run = f"{time.time_ns() // 1_000_000 % 10**9:x}"
    t_start = time.perf_counter()

    async def worker(w: int) -> None:
        nonlocal errors
        conn = Conn(edge)
        resting: list[int] = []  # this worker's orders that may still rest: cancel targets
        try:
            for i in counter:
                if rate:
                    due = t_start + i / rate
                    d = due - time.perf_counter()
                    if d > 0:
                        await asyncio.sleep(d)
                k = keys[i % len(keys)]
                slot = i % 10
                if slot == 9 and resting:  # 10%: cancel one of our resting orders
                    kind, method, path, body = "cancel", "DELETE", f"/v1/orders/{resting.pop(0)}", b""
                elif slot in (7, 8):  # 20%: marketable IOC that trades with the resting side, inside the
                    # market's 10% price band of the last trade wherever on the book that was
                    buy = slot == 7
                    kind, method, path = "cross", "POST", "/v1/orders"
                    body = json.dumps({"symbol": "BTC-USDT", "side": "BUY" if buy else "SELL",
                                       "price": "42600.00" if buy else "38900.00", "quantity": "0.001",
                                       "timeInForce": "IOC", "clientOrderId": f"x{run}-{i}"}).encode()
                else:  # 70%: resting limit orders on both sides, never crossing each other
                    buy = i % 2 == 0
                    price = f"{(39000 + (i % 500)) if buy else (42000 + (i % 500))}.00"
                    kind, method, path = "rest", "POST", "/v1/orders"
                    body = json.dumps({"symbol": "BTC-USDT", "side": "BUY" if buy else "SELL", "price": price,
                                       "quantity": "0.001"}).encode()
                if kind == "cancel":
                    k = owner[path]
                h = signed_headers(k["api_key"], k["secret"], method, path, body)
                if body:
                    h["Content-Type"] = "application/json"
                t0 = time.perf_counter()
                try:
                    status, data = await conn.request(method, path, h, body)
                    # a cancel racing a crossing order can find its target already filled: 409 is an answer
                    ok = status in (200, 201) or (kind == "cancel" and status in (404, 409))
                except HttpError:
                    ok, status, data = False, 0, b""
                lat.append((time.perf_counter() - t0) * 1000)
                kinds[kind] += 1
                if not ok:
                    errors += 1
                    if len(samples) < 5:
                        samples.append(f"{kind} {status} {data[:200]!r}")
                elif kind == "rest":
                    oid = int(json.loads(data)["orderId"])
                    owner[f"/v1/orders/{oid}"] = k
                    resting.append(oid)
        finally:
            await conn.close()

    owner: dict[str, dict[str, Any]] = {}
    samples: list[str] = []
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t_start
    return {"orders": orders, "concurrency": concurrency, "rate": rate, "seconds": round(wall, 3),
            "orders_per_s": round(orders / wall, 1), "p50_ms": round(_pct(lat, 0.50), 3),
            "p99_ms": round(_pct(lat, 0.99), 3), "max_ms": round(max(lat) if lat else 0, 3),
            "errors": errors, "error_rate": round(errors / max(1, orders), 6), "mix": kinds,
            "error_samples": samples}


def run(orders: int, concurrency: int, rate: float | None = None, data_dir: str | None = None) -> dict[str, Any]:
    from spotex.testing import Stack, stack

    with contextlib.ExitStack() as es:
        if data_dir is not None:
            st = Stack(Path(data_dir), {})
        else:
            tmp = es.enter_context(tempfile.TemporaryDirectory(prefix="spotex-bench-e2e-"))
            # Rate limits are per key; the benchmark measures the pipeline, not the limiter.
            st = es.enter_context(stack(Path(tmp) / "stack", env={"SPOTEX_EDGE__RATE_LIMIT_PER_S": "1000000",
                                                                   "SPOTEX_EDGE__RATE_LIMIT_BURST": "1000000"}))
        components = st.status()["components"]
        comps = {c["name"]: c["endpoint"] for c in components}
        pids = {c["name"]: int(c["pid"]) for c in components if c.get("pid") and not c.get("external")}
        keys = []
        for acct in (900_001, 900_002, 900_003, 900_004):
            res = st.cli("keys", "create", "--account", str(acct), "--scopes", "read,trade", "--json", check=True)
            keys.append(json.loads(res.stdout))
        before = {name: _cpu_s(pid) for name, pid in pids.items()}
        c0 = time.process_time()
        out = asyncio.run(drive(comps["edge"], comps["nats"], keys, orders, concurrency, rate))
        # Funding (a few deposits) is inside the window: negligible next to thousands of orders.
        out["cpu_ms_per_order"] = cpu_per_order(pids, before, orders, time.process_time() - c0)
        return out
