"""The demo trader that `spotex up` runs unless --no-demo: funds the demo accounts, quotes both
sides of every market (a market maker) and sends a stream of taker orders, all as ordinary
commands on the CMD stream, so every dashboard and stream has live data within seconds.

Demo funding mints balances from the custody account; production mode refuses it (guardrails).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from spotex.cli import ServiceContext

__all__ = ["DEMO_FIRST_ACCOUNT", "run"]

log = logging.getLogger("spotex.demo")

DEMO_FIRST_ACCOUNT = 1000
START_PRICES = {"BTC": "65000", "ETH": "3200", "SOL": "150"}
FUNDING = {"BTC": "50", "ETH": "500", "SOL": "20000", "USDT": "5000000"}


def _min_lots(m: Any, mid: int) -> int:
    """The fewest lots whose notional at ``mid`` clears the market's minimum."""
    return max(1, int(m.min_notional) // (mid * int(m.quote_per_tick_lot)) + 1)


class DemoTrader:
    def __init__(self, ctx: ServiceContext) -> None:
        from spotex.config import market_configs

        self.ctx = ctx
        self.cfg = ctx.cfg
        self.markets = market_configs(ctx.cfg)
        self.decimals = {a.symbol: a.decimals for a in ctx.cfg.assets}
        self.accounts = [DEMO_FIRST_ACCOUNT + i for i in range(max(2, ctx.cfg.demo.accounts))]
        self.maker = self.accounts[0]
        self.rng = random.Random(int(time.time()))
        self.mids: dict[str, int] = {}
        self.nc: Any = None
        self.js: Any = None
        self.sent = 0
        self.ready = False
        self.stopping = asyncio.Event()

    async def send(self, cmd: Any) -> None:
        from core.bus import cmd_subject
        from core.wire import encode_request

        await self.js.publish(cmd_subject(getattr(cmd, "symbol", None)), encode_request(cmd),
                              headers={"Nats-Msg-Id": f"demo-{uuid.uuid4().hex}"})
        self.sent += 1

    async def query(self, req: dict[str, Any]) -> Any:
        msg = await self.nc.request(self.cfg.core.query_subject, msgspec.msgpack.encode(req), timeout=2)
        return msgspec.msgpack.decode(msg.data)

    async def fund(self) -> None:
        from core.wire import Deposit, amount_to_minor

        for acct in self.accounts:
            have = await self.query({"op": "balances", "account_id": acct})
            for asset, amount in FUNDING.items():
                if asset not in self.decimals:
                    continue
                held = have.get(asset) if isinstance(have, dict) else None
                if held and (held.get("available", 0) + held.get("hold", 0)) > 0:
                    continue  # funded by an earlier run on this data dir
                await self.send(Deposit(account_id=acct, asset=asset,
                                        amount=amount_to_minor(amount, self.decimals[asset]),
                                        reference=f"demo-funding-{acct}-{asset}"))

    def _mid(self, m: Any) -> int:
        from core.wire import price_to_ticks

        if m.symbol not in self.mids:
            self.mids[m.symbol] = price_to_ticks(START_PRICES.get(m.base, "100"), m)
        return self.mids[m.symbol]

    async def quote(self) -> None:
        """Replace the maker's quotes: 5 levels each side around a random-walking mid."""
        from core.wire import CancelAllAccount, PlaceOrder, Side, qty_to_lots

        for m in self.markets:
            mid = self._mid(m)
            step = max(1, mid // 4000)
            mid = max(step * 10, mid + self.rng.randint(-3, 3) * step)
            self.mids[m.symbol] = mid
            await self.send(CancelAllAccount(account_id=self.maker, symbol=m.symbol))
            lot = qty_to_lots(m.lot_size, m)
            base_qty = _min_lots(m, mid) * lot
            for level in range(1, 6):
                for side, px in ((Side.BUY, mid - level * step), (Side.SELL, mid + level * step)):
                    await self.send(PlaceOrder(account_id=self.maker, symbol=m.symbol, client_order_id="",
                                               side=side, price_ticks=px, qty_lots=base_qty * self.rng.randint(1, 4)))

    async def take(self) -> None:
        from core.wire import OrderType, PlaceOrder, Side, TimeInForce

        m = self.rng.choice(self.markets)
        mid = self._mid(m)
        acct = self.rng.choice(self.accounts[1:])
        side = self.rng.choice((Side.BUY, Side.SELL))
        qty = _min_lots(m, mid) * self.rng.randint(1, 3)
        if self.rng.random() < 0.3:
            await self.send(PlaceOrder(account_id=acct, symbol=m.symbol, client_order_id="", side=side,
                                       type=OrderType.MARKET, qty_lots=qty))
        else:
            step = max(1, mid // 4000)
            px = mid + (2 * step if side is Side.BUY else -2 * step)
            await self.send(PlaceOrder(account_id=acct, symbol=m.symbol, client_order_id="", side=side,
                                       tif=TimeInForce.IOC, price_ticks=px, qty_lots=qty))

    async def run(self) -> None:
        import nats

        self.nc = await nats.connect(self.ctx.endpoints.nats_url, name="demo", max_reconnect_attempts=-1)
        self.js = self.nc.jetstream()
        try:
            await self._wait_for_markets()
            await self.fund()
            self.ready = True
            log.info("demo trader running", extra={"accounts": len(self.accounts), "markets": len(self.markets)})
            rate = max(1, self.cfg.demo.orders_per_s)
            next_quote = 0.0
            while not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_quote:
                    await self.quote()
                    next_quote = now + 2.0
                if self.cfg.demo.trader:
                    await self.take()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0 / rate)
        finally:
            await self.nc.close()

    async def _wait_for_markets(self) -> None:
        while not self.stopping.is_set():
            try:
                markets = await self.query({"op": "markets"})
                if isinstance(markets, list) and len(markets) >= len(self.markets):
                    return
            except Exception as exc:  # the core may still be electing a leader
                log.info("waiting for the core", extra={"reason": type(exc).__name__})
            await asyncio.sleep(0.5)


async def run(ctx: ServiceContext) -> None:
    from core.obs import ProbeServer

    demo = DemoTrader(ctx)

    async def ready() -> str | None:
        return None if demo.ready else "funding demo accounts"

    async def status() -> dict[str, Any]:
        return {"sent": demo.sent, "accounts": len(demo.accounts), "ready": demo.ready}

    probe = ProbeServer("127.0.0.1", ctx.probe_port, service="demo", readiness=[("demo", ready)],
                        extra_routes={"/status": status})
    await probe.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, demo.stopping.set)
    try:
        await demo.run()
    finally:
        await probe.stop()
