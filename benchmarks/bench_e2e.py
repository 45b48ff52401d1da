"""End to end over REST: signed POST /v1/orders -> edge -> JetStream -> core -> EVT -> ack.

``run(orders, concurrency, rate, data_dir)`` uses a running stack in ``data_dir`` or starts one in a
temporary directory (``spotex up --detach --no-demo``), creates two funded accounts with keys, and
sends alternating non-crossing limit orders from ``concurrency`` connections (paced to ``rate``
orders/s when given). Latency is request start to response end at the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run"]


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


async def _drive(edge: str, nats_url: str, keys: list[dict[str, Any]], orders: int, concurrency: int,
                 rate: float | None) -> dict[str, Any]:
    import httpx
    import nats

    from core.bus import cmd_subject
    from core.wire import Deposit, encode_request
    from edge.auth import signed_headers

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
    counter = iter(range(orders))
    t_start = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            if rate:
                due = t_start + i / rate
                d = due - time.perf_counter()
                if d > 0:
                    await asyncio.sleep(d)
            k = keys[i % len(keys)]
            buy = i % 2 == 0
            price = f"{(39000 + (i % 500)) if buy else (42000 + (i % 500))}.00"
            body = json.dumps({"symbol": "BTC-USDT", "side": "BUY" if buy else "SELL", "price": price,
                               "quantity": "0.001"}).encode()
            h = signed_headers(k["api_key"], k["secret"], "POST", "/v1/orders", body)
            h["content-type"] = "application/json"
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/orders", content=body, headers=h)
                ok = r.status_code == 201
            except Exception:
                ok = False
            lat.append((time.perf_counter() - t0) * 1000)
            if not ok:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=edge, limits=limits, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t_start
    return {"orders": orders, "concurrency": concurrency, "rate": rate, "seconds": round(wall, 3),
            "orders_per_s": round(orders / wall, 1), "p50_ms": round(_pct(lat, 0.50), 3),
            "p99_ms": round(_pct(lat, 0.99), 3), "max_ms": round(max(lat) if lat else 0, 3),
            "errors": errors, "error_rate": round(errors / max(1, orders), 6)}


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
        comps = {c["name"]: c["endpoint"] for c in st.status()["components"]}
        keys = []
        for acct in (900_001, 900_002, 900_003, 900_004):
            res = st.cli("keys", "create", "--account", str(acct), "--scopes", "read,trade", "--json", check=True)
            keys.append(json.loads(res.stdout))
        return asyncio.run(_drive(comps["edge"], comps["nats"], keys, orders, concurrency, rate))
