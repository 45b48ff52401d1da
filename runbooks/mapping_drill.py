"""``spotex drill mapping-integrity-failure`` (seed §4.0 "Mapping integrity failure drill").

A market's definition drifting between the engine and a service that converts decimals with its own
copy (docs/architecture.md decision 10), made to happen for real on a private stack started from a
configuration file the drill owns:

- ``baseline``: `spotex mapping check` passes; a funded trader's order on the drilled market rests.
- ``detected_before_deploy``: a configuration with the market's lot size ten times larger is checked
  before it is deployed: mismatches against the engine and the running edge, HOLD_DEPLOY_FIX_CONFIG.
- ``edge_refuses_drifted_market``: that configuration deployed anyway (the file rewritten, the edge
  kill -9'd and restarted by the supervisor with it): new orders on the market are refused
  ``409 MARKET_MAPPING_MISMATCH``, the resting order's cancel passes, another market still trades,
  and the check (with the deployed file) reports the engine mismatch and the edge's guard.
- ``repaired``: the file restored and the edge restarted again: the check passes and the market
  trades.

Evidence under ``build/runbooks/mapping-integrity-failure/``: the configurations, status-before/after,
``mapping-check-*.json`` per phase and ``mapping-integrity-summary.json`` (``mapping_integrity_ok``,
steps, ``failed_step_count``, ``recommended_action``). Success line
``runbook_mapping_integrity_failure_ok=true``.
"""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from runbooks.common import Drill, Trader, wait_until

__all__ = ["STEPS", "config_toml", "mapping_integrity_failure"]

STEPS = ("baseline", "detected_before_deploy", "edge_refuses_drifted_market", "repaired")


def config_toml(cfg: Any, *, lot_size: dict[str, str] | None = None) -> str:
    """The configuration's assets and markets as TOML, with some markets' lot size replaced."""
    lines: list[str] = []
    for a in cfg.assets:
        lines += ["[[assets]]", f'symbol = "{a.symbol}"', f"decimals = {a.decimals}", ""]
    for m in cfg.markets:
        lot = (lot_size or {}).get(m.symbol, m.lot_size)
        lines += ["[[markets]]", f'symbol = "{m.symbol}"', f'base = "{m.base}"', f'quote = "{m.quote}"',
                  f'tick_size = "{m.tick_size}"', f'lot_size = "{lot}"', f'min_notional = "{m.min_notional}"',
                  f"price_band_bps = {m.price_band_bps}", f"maker_fee_bps = {m.maker_fee_bps}",
                  f"taker_fee_bps = {m.taker_fee_bps}", ""]
    return "\n".join(lines)


async def mapping_integrity_failure(d: Drill, config_file: Path, symbol: str | None = None) -> bool:
    from jobs.mapping import mapping_report
    from runbooks.common import jobs_context
    from spotex.config import load_config

    before = d.status("before")
    sym = symbol or d.cfg.markets[0].symbol
    other = next(m.symbol for m in d.cfg.markets if m.symbol != sym)
    original = config_file.read_text()
    m = next(x for x in d.cfg.markets if x.symbol == sym)
    drifted_lot = str(Decimal(m.lot_size) * 10)
    drifted = config_toml(d.cfg, lot_size={sym: drifted_lot})
    (d.out_dir / "config-drifted.toml").write_text(drifted)
    drifted_cfg = load_config(d.out_dir / "config-drifted.toml")
    ep = d.endpoints
    edge_url = ep.probe_url("edge")
    steps: dict[str, bool] = {}
    probes: dict[str, Any] = {"symbol": sym, "other_symbol": other, "lot_size": m.lot_size,
                              "drifted_lot_size": drifted_lot}
    timeline: list[dict[str, Any]] = []
    t0 = time.monotonic()

    def mark(event: str, **kw: Any) -> None:
        timeline.append({"t_s": round(time.monotonic() - t0, 3), "event": event, **kw})

    async def check(cfg: Any, label: str) -> dict[str, Any]:
        rep = await mapping_report(cfg, nats_url=ep.nats_url, pg_dsn=ep.pg_dsn, edge_url=edge_url)
        d.write(f"mapping-check-{label}.json", rep)
        mark(f"check_{label}", ok=rep["mapping_integrity_ok"], mismatched=rep["mismatched_markets"])
        return rep

    ctx, closers = await jobs_context(d)
    trader: Trader | None = None
    restored = True
    try:
        trader = await Trader.create(d, ctx.pool, ep.nats_url, edge_url)
        plan = await trader.plan(sym)
        s0, c0, a0 = await trader.order(sym, plan, idempotency_key=f"map-{uuid.uuid4().hex[:8]}")
        rep0 = await check(d.cfg, "baseline")
        probes["baseline_order"] = [s0, c0]
        steps["baseline"] = rep0["mapping_integrity_ok"] and s0 == 201

        rep1 = await check(drifted_cfg, "before-deploy")
        where = {(x["where"], x["field"]) for x in rep1["mismatches"] if x["symbol"] == sym}
        steps["detected_before_deploy"] = (not rep1["mapping_integrity_ok"] and rep1["mismatched_markets"] == [sym]
                                           and ("core", "lot_size") in where and ("edge", "lotSize") in where
                                           and rep1["recommended_action"] == "HOLD_DEPLOY_FIX_CONFIG")

        config_file.write_text(drifted)
        restored = False
        k1 = await d.kill9("edge")
        mark("edge_restarted_drifted", after_s=k1["restarted_after_s"])
        s1, c1, b1 = await trader.order(sym, (plan[0], str(Decimal(plan[1]) * 10)))
        cancel = await trader.cancel(int(a0["orderId"])) if s0 == 201 and a0.get("orderId") else 0
        other_plan = await trader.plan(other)
        s2, c2, a2 = await trader.order(other, other_plan)
        if s2 == 201 and a2.get("orderId"):
            await trader.cancel(int(a2["orderId"]))

        async def guarded() -> dict[str, Any] | None:
            r = await check(drifted_cfg, "deployed")
            return r if r["edge_guard"].get("markets_refused", 0) >= 1 else None

        rep2 = await wait_until(guarded, 15, None, 0.5) or await check(drifted_cfg, "deployed")
        core_fields = {x["field"] for x in rep2["mismatches"] if x["where"] == "core" and x["symbol"] == sym}
        probes["deployed"] = {"order": [s1, c1, b1.get("detail")], "cancel_resting": cancel,
                              "other_market_order": [s2, c2], "edge_guard": rep2["edge_guard"],
                              "core_mismatch_fields": sorted(core_fields)}
        steps["edge_refuses_drifted_market"] = (s1 == 409 and c1 == "MARKET_MAPPING_MISMATCH" and cancel == 200
                                                and s2 == 201 and "lot_size" in core_fields
                                                and rep2["edge_guard"].get("markets_refused", 0) >= 1)

        config_file.write_text(original)
        restored = True
        k2 = await d.kill9("edge")
        mark("edge_restarted_repaired", after_s=k2["restarted_after_s"])
        rep3 = await check(d.cfg, "repaired")
        s3, c3, a3 = await trader.order(sym, plan)
        if s3 == 201 and a3.get("orderId"):
            await trader.cancel(int(a3["orderId"]))
        probes["repaired"] = {"order": [s3, c3], "edge_guard": rep3["edge_guard"]}
        steps["repaired"] = rep3["mapping_integrity_ok"] and s3 == 201 and rep3["edge_guard"].get(
            "markets_refused", 0) == 0
    finally:
        if not restored:  # never leave the stack on the drifted configuration
            config_file.write_text(original)
            try:
                await d.kill9("edge")
            except Exception as exc:
                mark("restore_failed", error=str(exc))
        if trader is not None:
            await trader.close()
        from jobs.scheduler import close_context

        await close_context(closers)
    after = d.status("after")
    failed = [k for k in STEPS if not steps.get(k)]
    ok = not failed
    action = "NONE" if ok else ("BLOCK_DEPLOYS_INVESTIGATE_MAPPING_CHECK" if "detected_before_deploy" in failed
                                else "HALT_MARKET_INVESTIGATE_EDGE_GUARD" if "edge_refuses_drifted_market" in failed
                                else "INVESTIGATE")
    return d.conclude("mapping-integrity-summary.json", "mapping_integrity_ok", steps, STEPS, action,
                      "runbook_mapping_integrity_failure_ok", probes=probes, timeline=timeline,
                      config_file=str(config_file), stack_healthy_before=before.get("healthy"),
                      stack_healthy_after=after.get("healthy"))


def run(out: str | None, symbol: str | None) -> bool:
    """A private stack started from a configuration file this drill owns (it rewrites that file)."""
    import asyncio
    import os

    from runbooks.common import drill_stack
    from spotex.config import load_config

    name = "mapping-integrity-failure"
    out_dir = Path(out or os.environ.get("SPOTEX_RUNBOOK_OUT") or f"build/runbooks/{name}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = out_dir / "config-deployed.toml"
    cfg_file.write_text(config_toml(load_config(os.environ.get("SPOTEX_CONFIG"))))
    (out_dir / "config-original.toml").write_text(cfg_file.read_text())
    old = os.environ.get("SPOTEX_CONFIG")
    os.environ["SPOTEX_CONFIG"] = str(cfg_file)  # the stack's services (and restarts) read this file
    try:
        with drill_stack(name, None, str(out_dir), config=str(cfg_file)) as d:
            return bool(asyncio.run(mapping_integrity_failure(d, cfg_file, symbol)))
    finally:
        if old is None:
            os.environ.pop("SPOTEX_CONFIG", None)
        else:
            os.environ["SPOTEX_CONFIG"] = old
