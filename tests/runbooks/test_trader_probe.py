"""The drills' trader tells a cancel the market overtook apart from a refused one.

Under the lag-spike drill's load, a probe order resting at the best bid can trade before the probe
cancels it: the edge then answers ORDER_ALREADY_CLOSED, which is not the policy refusing a cancel.
The race itself is met for real by the drill (tests/runbooks/test_jobs_drills.py); here the
trader's reading of each answer is pinned down, without a stack, on the edge's documented answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runbooks.common import Trader


def _edge(orders: dict[int, tuple[int, dict[str, Any]]], status: dict[int, str]) -> httpx.MockTransport:
    def handle(req: httpx.Request) -> httpx.Response:
        assert req.headers["x-api-key"] == "k" and req.headers["x-signature"]  # each request signed
        oid = int(req.url.path.rsplit("/", 1)[1])
        if req.method == "DELETE":
            code, body = orders[oid]
            return httpx.Response(code, json=body)
        return httpx.Response(200, json={"orderId": str(oid), "status": status[oid]})

    return httpx.MockTransport(handle)


def _closed(detail: str) -> tuple[int, dict[str, Any]]:
    return 409, {"type": "about:blank", "title": "Conflict", "status": 409, "code": "ORDER_ALREADY_CLOSED",
                 "detail": detail}


def test_cancel_outcomes() -> None:
    orders = {
        1: (200, {"orderId": "1", "status": "CANCELED"}),
        2: _closed("the order is FILLED"),  # traded before the cancel arrived
        3: _closed("the order is CANCELED"),  # closed by something else: not ours to call a pass
        4: (429, {"status": 429, "code": "SYMBOL_THROTTLED", "detail": "throttled"}),
        5: (503, {"status": 503}),
    }
    status = {2: "FILLED", 3: "CANCELED"}

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url="http://edge", transport=_edge(orders, status)) as http:
            t = Trader(http, "k", Ed25519PrivateKey.generate(), account_id=7)
            return [await t.cancel_outcome(oid) for oid in sorted(orders)]

    assert asyncio.run(run()) == ["canceled", "filled", "ORDER_ALREADY_CLOSED", "SYMBOL_THROTTLED", "503"]
