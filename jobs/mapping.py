"""``spotex mapping check``: one definition of every market across the exchange (seed §4.0 mapping integrity).

A market is defined once, in the matching engine (its ``AddMarket`` is in the WAL); every other
service maps decimal prices and quantities to the engine's integer ticks and lots with its own copy
of that definition, taken from the configuration. If they differ (a tick or lot size changed in the
config after the market was added, a partial deploy), orders are mis-scaled silently. The check
compares, per market and field:

- ``config`` vs ``core``: the configuration given to this command (``market_configs``) against the
  engine's own definitions (core query ``markets``); the core also logs and reports
  (``status.market_mismatch``) the difference for the configuration it was started with;
- ``config`` vs ``edge``: against what the running edge serves on ``/v1/markets`` (its own config);
- ``edge_guard``: markets the running edge itself found differing from the engine and refuses new
  orders on (``409 MARKET_MAPPING_MISMATCH``, ``edge_market_mapping_mismatch``);
- ``config`` vs ``ledger``: base and quote of ``ledger_markets`` (settled from ``MarketAdded``).

A market the engine does not know yet is ``pending`` (the core adds configured markets at start),
not a mismatch. ``recommended_action``: NONE, or HOLD_DEPLOY_FIX_CONFIG (make the configuration
match the engine's definitions again; a market's definition cannot be changed in place).
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["mapping_report"]


async def mapping_report(cfg: Any, *, nats_url: str, pg_dsn: str | None, edge_url: str | None) -> dict[str, Any]:
    import msgspec

    from core.wire import amount_to_minor, market_config_diff
    from spotex.config import market_configs

    ours = {m.symbol: m for m in market_configs(cfg)}
    mismatches: list[dict[str, Any]] = []
    sources: dict[str, Any] = {}

    def differ(where: str, symbol: str, field: str, config: Any, other: Any) -> None:
        mismatches.append({"where": where, "symbol": symbol, "field": field, "config": config, "other": other})

    # the engine
    engine: dict[str, dict[str, Any]] | None = None
    try:
        import nats

        nc = await nats.connect(nats_url, connect_timeout=3, max_reconnect_attempts=0)
        try:
            resp = await nc.request(cfg.core.query_subject, msgspec.msgpack.encode({"op": "markets"}), timeout=3)
            engine = {v["symbol"]: v for v in msgspec.msgpack.decode(resp.data)}
        finally:
            await nc.close()
    except Exception as exc:
        sources["core"] = f"unavailable: {type(exc).__name__}: {exc}"
    pending: list[str] = []
    if engine is not None:
        sources["core"] = "ok"
        for sym, m in ours.items():
            if sym not in engine:
                pending.append(sym)
                continue
            for field, (a, b) in market_config_diff(m, engine[sym]).items():
                differ("core", sym, field, a, b)
        for sym in sorted(set(engine) - set(ours)):
            differ("core", sym, "symbol", None, "listed by the engine, not configured")

    # the running edge
    guard: dict[str, Any] = {}
    if edge_url:
        try:
            import httpx

            async with httpx.AsyncClient(base_url=edge_url, timeout=5) as c:
                served = {x["symbol"]: x for x in (await c.get("/v1/markets")).json()}
                metrics = (await c.get("/metrics")).text
            sources["edge"] = "ok"
            dec = {a.symbol: a.decimals for a in cfg.assets}
            for sym, m in ours.items():
                x = served.get(sym)
                if x is None:
                    differ("edge", sym, "symbol", sym, "not served")
                    continue
                want = {"base": m.base, "quote": m.quote, "tickSize": m.tick_size, "lotSize": m.lot_size,
                        "baseScale": m.base_scale, "quoteScale": m.quote_scale, "priceBandBps": m.price_band_bps,
                        "makerFeeBps": m.maker_fee_bps, "takerFeeBps": m.taker_fee_bps}
                for field, v in want.items():
                    if x.get(field) != v:
                        differ("edge", sym, field, v, x.get(field))
                if amount_to_minor(str(x.get("minNotional", "0")), dec[m.quote]) != m.min_notional:
                    differ("edge", sym, "minNotional", m.min_notional, x.get("minNotional"))
            for line in metrics.splitlines():
                if line.startswith("edge_market_mapping_mismatch "):
                    guard["markets_refused"] = int(float(line.split()[1]))
        except Exception as exc:
            sources["edge"] = f"unavailable: {type(exc).__name__}: {exc}"

    # the ledger
    if pg_dsn:
        try:
            import asyncpg

            conn = await asyncpg.connect(pg_dsn, timeout=5)
            try:
                rows = {r["symbol"]: r for r in await conn.fetch("SELECT symbol, base, quote FROM ledger_markets")}
            finally:
                await conn.close()
            sources["ledger"] = "ok"
            for sym, m in ours.items():
                r = rows.get(sym)
                if r is None:
                    continue  # settled once the core has added it
                for field in ("base", "quote"):
                    if r[field] not in (getattr(m, field), ""):
                        differ("ledger", sym, field, getattr(m, field), r[field])
        except Exception as exc:
            sources["ledger"] = f"unavailable: {type(exc).__name__}: {exc}"

    ok = not mismatches and sources.get("core") == "ok"
    return {
        "mapping_integrity_ok": ok,
        "at_ms": time.time_ns() // 1_000_000,
        "markets": sorted(ours),
        "pending": pending,
        "mismatches": mismatches,
        "mismatched_markets": sorted({m["symbol"] for m in mismatches}),
        "edge_guard": guard,
        "sources": sources,
        "recommended_action": "NONE" if ok else ("HOLD_DEPLOY_FIX_CONFIG" if mismatches else "INVESTIGATE_CORE"),
    }
