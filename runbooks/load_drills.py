"""The load harness (seed §7) and the load regression drill (seed §4.3).

Both drive the trader mix of ``spotex bench e2e`` (:func:`benchmarks.bench_e2e.drive`: signed REST
orders, 70% resting limits, 20% crossing IOCs, 10% cancels, over keep-alive connections with the lean
client) through the whole stack, and at the same time hold ``ws_subscribers`` WebSocket connections
on the traded market (trades + book(20) + ticker of BTC-USDT), counting every frame they receive
(``ws_messages``). Each trader connection signs with its own API key of a fresh funded account, so
the edge's per-key rate limits of a production config are not what is measured.

Figures of a profile: ``order_tps`` (orders answered per second of wall time), ``order_p50_ms`` /
``order_p99_ms`` (request start to response end at the client), ``order_error_rate`` (answers that
are neither 2xx nor, for a cancel racing a fill, 404/409, plus lost connections, over orders sent),
``ws_messages`` (frames received by the subscribers while the orders ran, plus a 1 s drain), the
machine's load average before and after, and the raw bench dict.

Thresholds are the safety budgets (``jobs/checks.py`` ``DEFAULT_BUDGETS``, or the ``[jobs]
budgets_file``): the budgets whose evidence is ``load-regression/load-all-latest.json`` name a field
``profiles.<profile>.<figure>``, an op and a limit. The drill evaluates them through the same
``safety_budget`` job the scheduler runs (stored in ``job_runs``); the smoke evaluates the
``load-smoke`` ones with the same ``evaluate_budgets``.

``spotex drill load-regression`` (``./runbooks/load_regression.sh``): the profiles ``load-smoke``,
``load-10k``, ``load-50k`` in one pass on one stack; evidence ``load-all-<stamp>.json`` and
``load-all-latest.json`` (figures, thresholds and pass/fail per profile), ``safety-budget-*.json``,
``status-before.json`` / ``status-after.json``; success line ``runbook_load_regression_ok=true``.
``--scale`` shrinks every profile (tests use 0.01) and ``--profiles`` picks some: such a run checks
the harness, and its evidence says ``full_size=false``, which the ``load_full_size`` budget of the
scheduled safety budget rejects as release evidence.

``RUNBOOK_ALLOW_BUDGET_FAIL=true`` (the seed's "gateway-only dry-run"): everything runs and is
recorded the same way, budget violations included (``budget_ok=false`` with each violation in the
evidence and on stdout), but they do not fail the drill: it exits 0 with
``runbook_load_regression_ok=true`` and ``load_budget_enforced=false``. It still fails when the
harness itself did not work (a profile that could not send its orders, evidence not written, the
budget evaluation erroring). Use it on a machine whose timings say nothing about the build (a shared
runner, a laptop) to prove the path from the gateway down still takes the load; it is not release
evidence.

``spotex load smoke`` (``./scripts/load_smoke.sh``): the ``load-smoke`` profile alone, written to
``build/load/load-smoke.json`` with the seed's key fields at the top level (``order_p99_ms``,
``order_error_rate``, ``order_tps``, ``ws_messages``), thresholds and ``pass``; exits 1 on a
threshold violation ("block release and investigate"), with ``load_smoke_ok=true`` on success.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from runbooks.common import Drill

__all__ = ["LOAD_EVIDENCE", "PROFILES", "Profile", "load_regression", "load_smoke", "profile_budgets"]

LOAD_EVIDENCE = "load-all-latest.json"
SYMBOL = "BTC-USDT"
# The bench's price levels (resting 39,000-39,499 / 42,000-42,499, crossing at 42,600 / 38,900) are
# inside the 10% band only while the market's last trade is in this range (or there is none).
PRICE_RANGE = (38_800.0, 43_000.0)


@dataclass(frozen=True)
class Profile:
    name: str
    orders: int
    concurrency: int
    ws_subscribers: int
    rate: float | None = None  # None: flat out (closed loop over ``concurrency`` connections)

    def scaled(self, scale: float) -> Profile:
        if scale == 1:
            return self
        return Profile(self.name, max(20, round(self.orders * scale)), min(self.concurrency, 16),
                       min(self.ws_subscribers, 4), self.rate)


PROFILES: dict[str, Profile] = {
    "load-smoke": Profile("load-smoke", 120, 8, 4),
    "load-10k": Profile("load-10k", 10_000, 32, 8),
    "load-50k": Profile("load-50k", 50_000, 64, 8),
}


def load_budget_list(cfg: Any) -> list[dict[str, Any]]:
    """The budgets that judge load evidence (their evidence names ``load-all-latest.json``)."""
    from jobs.checks import load_budgets

    return [b for b in load_budgets(getattr(cfg.jobs, "budgets_file", None))
            if str(b.get("evidence", "")).endswith(LOAD_EVIDENCE)]


def profile_budgets(budgets: list[dict[str, Any]], profile: str) -> list[dict[str, Any]]:
    """The budgets on one profile's figures, with the field relative to the profile."""
    prefix = f"profiles.{profile}."
    return [{**b, "field": b["field"][len(prefix):]} for b in budgets if str(b.get("field", "")).startswith(prefix)]


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _endpoint(status: dict[str, Any], name: str) -> str:
    for c in status.get("components") or []:
        if c.get("name") == name and c.get("endpoint"):
            return str(c["endpoint"])
    raise SystemExit(f"spotex: the stack reports no {name} endpoint (spotex status --json)")


async def _traders(d: Drill, edge: str, count: int) -> list[dict[str, Any]]:
    """``count`` fresh accounts, each with an HMAC key (read, trade), funded on CMD and confirmed
    funded through the edge before the load starts."""
    import asyncpg
    import httpx
    import nats

    from benchmarks.httpload import Conn
    from core.bus import cmd_subject
    from core.wire import Deposit, encode_request
    from edge.app import master_key_path
    from edge.auth import KeyStore, SecretBox, signed_headers

    ep = d.endpoints
    base = 5_000_000_000 + secrets.randbelow(10**8) * 100
    box = SecretBox.from_file(master_key_path(d.cfg, d.data_dir), create=not d.cfg.production)
    pool = await asyncpg.create_pool(ep.pg_dsn, min_size=1, max_size=2)
    try:
        store = KeyStore(pool, box)
        keys: list[dict[str, Any]] = []
        for i in range(count):
            ck = await store.create(base + i, ["read", "trade"], label="load-drill")
            keys.append({"api_key": ck.api_key, "secret": ck.secret, "account_id": base + i})
    finally:
        await pool.close()
    # 10^15 minor units (10^7 of an 8-decimal asset) each: far more than any profile spends.
    nc = await nats.connect(ep.nats_url)
    try:
        js = nc.jetstream()
        for k in keys:
            for asset in ("USDT", "BTC"):
                await js.publish(cmd_subject(None), encode_request(Deposit(
                    account_id=k["account_id"], asset=asset, amount=10**15, reference=f"load-drill-{k['account_id']}")),
                    headers={"Nats-Msg-Id": f"load-drill-fund-{k['account_id']}-{asset}"})
    finally:
        await nc.close()
    deadline = time.monotonic() + 60
    conn = Conn(edge)
    try:
        for k in keys:
            while True:
                h = signed_headers(k["api_key"], k["secret"], "GET", "/v1/account/balances", b"")
                status, body = await conn.request("GET", "/v1/account/balances", h)
                if status == 200:
                    have = {b["asset"] for b in json.loads(body).get("balances", []) if b.get("available") not in
                            (None, "0", "0.00000000")}
                    if {"USDT", "BTC"} <= have:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"spotex: account {k['account_id']} not funded within 60 s "
                                     f"(last answer {status}: {body[:200]!r})")
                await asyncio.sleep(0.2)
    finally:
        await conn.close()
    async with httpx.AsyncClient(base_url=edge, timeout=10) as http:
        r = await http.get(f"/v1/markets/{SYMBOL}/trades", params={"limit": 1})
        last = (r.json().get("trades") or [None])[0] if r.status_code == 200 else None
    if last is not None and not PRICE_RANGE[0] <= float(last["price"]) <= PRICE_RANGE[1]:
        raise SystemExit(f"spotex: {SYMBOL} last traded at {last['price']}; the load mix's prices need it within "
                         f"{PRICE_RANGE[0]:.0f}-{PRICE_RANGE[1]:.0f} or untraded (run the drill on its own stack)")
    return keys


async def _subscriber(ws_url: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    import websockets

    async with websockets.connect(ws_url, max_size=None) as ws:
        for sub in ({"op": "SUB", "channel": "trades", "symbol": SYMBOL},
                    {"op": "SUB", "channel": "book", "symbol": SYMBOL, "depth": 20},
                    {"op": "SUB", "channel": "ticker", "symbol": SYMBOL}):
            await ws.send(json.dumps(sub))
        counts["connected"] = counts.get("connected", 0) + 1
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.25)
            except TimeoutError:
                continue
            except websockets.ConnectionClosed as exc:
                counts["closed_early"] = counts.get("closed_early", 0) + 1
                counts[f"close_{exc.code}"] = counts.get(f"close_{exc.code}", 0) + 1
                return
            data = json.loads(raw)
            for frame in data if isinstance(data, list) else [data]:
                counts["frames"] = counts.get("frames", 0) + 1
                t = str(frame.get("type", "?")) if isinstance(frame, dict) else "?"
                counts[f"type_{t}"] = counts.get(f"type_{t}", 0) + 1


async def run_profile(edge: str, nats_url: str, keys: list[dict[str, Any]], p: Profile) -> dict[str, Any]:
    """One profile: the orders through ``bench_e2e.drive`` and the WS subscribers at the same time."""
    from benchmarks.bench_e2e import drive

    ws_url = "ws" + edge[len("http"):] + "/v1/ws"
    stop = asyncio.Event()
    counts: dict[str, int] = {}
    subs = [asyncio.create_task(_subscriber(ws_url, stop, counts)) for _ in range(p.ws_subscribers)]
    for _ in range(100):  # subscribed (snapshots arrive) before the first order
        if counts.get("connected", 0) >= p.ws_subscribers or any(t.done() for t in subs):
            break
        await asyncio.sleep(0.05)
    la_before = _loadavg()
    frames_before = counts.get("frames", 0)
    try:
        raw = await drive(edge, nats_url, keys, p.orders, p.concurrency, p.rate, fund=False)
        await asyncio.sleep(1.0)  # the last trades' frames
    finally:
        stop.set()
        results = await asyncio.gather(*subs, return_exceptions=True)
    ws_errors = [f"{type(r).__name__}: {r}"[:200] for r in results if isinstance(r, BaseException)]
    sent = sum(raw["mix"].values())
    return {
        "profile": p.name, "orders": p.orders, "concurrency": p.concurrency, "rate": p.rate,
        "orders_sent": sent, "order_tps": raw["orders_per_s"], "order_p50_ms": raw["p50_ms"],
        "order_p99_ms": raw["p99_ms"], "order_max_ms": raw["max_ms"], "order_errors": raw["errors"],
        "order_error_rate": raw["error_rate"], "seconds": raw["seconds"],
        "ws_subscribers": p.ws_subscribers, "ws_connected": counts.get("connected", 0),
        "ws_messages": counts.get("frames", 0), "ws_messages_before_orders": frames_before,
        "ws_trade_frames": counts.get("type_TradeExecuted", 0), "ws_missed": counts.get("type_Missed", 0),
        "ws_closed_early": counts.get("closed_early", 0), "ws_errors": ws_errors,
        "ws_lost": counts.get("type_Missed", 0) + counts.get("closed_early", 0) + len(ws_errors)
        + p.ws_subscribers - counts.get("connected", 0),
        "ws_frames_by_type": {k[5:]: v for k, v in sorted(counts.items()) if k.startswith("type_")},
        "load_avg_before": la_before, "load_avg_after": _loadavg(), "raw": raw,
    }


def _judge(budgets: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each threshold with the value the budget evaluation read and its verdict."""
    by_name = {r["name"]: r for r in results}
    out = []
    for b in budgets:
        r = by_name.get(b["name"]) or {}
        out.append({"budget": b["name"], "field": b["field"], "op": b.get("op", "=="), "limit": b.get("limit"),
                    "value": r.get("value"), "ok": bool(r.get("ok")), "reason": r.get("reason")})
    return out


def _violation_text(v: dict[str, Any], budgets: list[dict[str, Any]]) -> str:
    """``LIMIT_BREACHED:order_p99_ms=312.5 (limit <= 250):BLOCK_RELEASE``; for missing or unreadable
    evidence the reason and the file."""
    b = next((x for x in budgets if x["name"] == v["name"]), {})
    if v.get("reason") == "LIMIT_BREACHED":
        what = f"{str(b.get('field', '?')).rsplit('.', 1)[-1]}={v.get('value')} (limit {v.get('op')} {v.get('limit')})"
    else:
        what = str(v.get("file") or v.get("evidence"))
    return f"{v.get('reason')}:{what}:{v.get('recommended_action')}"


def _stamp() -> str:
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + f"-{int(now * 1000) % 1000:03d}"


def _allow_budget_fail() -> bool:
    return os.environ.get("RUNBOOK_ALLOW_BUDGET_FAIL", "").strip().lower() in ("1", "true", "yes", "on")


async def load_regression(d: Drill, scale: float = 1.0, profiles: tuple[str, ...] = ()) -> bool:
    from jobs.scheduler import close_context, make_context, open_context, run_job

    names = list(profiles) or list(PROFILES)
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise SystemExit(f"spotex: unknown profile(s) {', '.join(unknown)} (known: {', '.join(PROFILES)})")
    if not 0 < scale <= 1:
        raise SystemExit(f"spotex: --scale must be in (0, 1], got {scale}")
    allow = _allow_budget_fail()
    full_size = scale == 1 and names == list(PROFILES)
    plan = [PROFILES[n].scaled(scale) for n in names]
    before = d.status("before")
    edge = _endpoint(before, "edge")
    keys = await _traders(d, edge, max(p.concurrency for p in plan))
    results: dict[str, Any] = {}
    for p in plan:
        results[p.name] = await run_profile(edge, d.endpoints.nats_url, keys, p)
        r = results[p.name]
        d.emit(p.name.replace("-", "_"), f"orders={r['orders_sent']} tps={r['order_tps']} p99_ms={r['order_p99_ms']} "
                                 f"error_rate={r['order_error_rate']} ws_messages={r['ws_messages']}")
    stamp = _stamp()
    doc: dict[str, Any] = {
        "kind": "load-regression", "at": time.time(), "stamp": stamp, "scale": scale, "full_size": full_size,
        "profiles_run": names, "allow_budget_fail": allow, "profiles": results,
        # run-wide key fields: the worst profile's (lowest rate, highest p99 / error rate), WS summed
        "order_tps": min(r["order_tps"] for r in results.values()),
        "order_p99_ms": max(r["order_p99_ms"] for r in results.values()),
        "order_error_rate": max(r["order_error_rate"] for r in results.values()),
        "ws_messages": sum(r["ws_messages"] for r in results.values()),
        "ws_trade_frames": sum(r["ws_trade_frames"] for r in results.values()),
        "ws_lost": sum(r["ws_lost"] for r in results.values()),
        "load_avg": _loadavg(),
    }
    d.write(LOAD_EVIDENCE, doc)

    # The budgets on this run: those of the profiles run, the run-wide ones, and load_full_size only
    # for a full-size run (a scaled run is a harness check; the scheduled budget still rejects it).
    # Evidence rewritten to this drill's own directory, so --out elsewhere judges this run's file.
    budgets = []
    for b in load_budget_list(d.cfg):
        f = str(b.get("field", ""))
        if f.startswith("profiles.") and f.split(".")[1] not in names:
            continue
        if f == "full_size" and not full_size:
            continue
        budgets.append({**b, "evidence": f"{d.out_dir.name}/{LOAD_EVIDENCE}"})
    budgets_file = d.write("load-budgets.json", {"budgets": budgets})
    ep = d.endpoints
    ctx = make_context(d.cfg, d.data_dir, pg_dsn=ep.pg_dsn, nats_url=None, evidence_dir=d.out_dir,
                       budgets_file=str(budgets_file))
    closers = await open_context(ctx)
    try:
        budget = await run_job(ctx, "safety_budget", trigger="drill")
    finally:
        await close_context(closers)
    out = budget["output"]
    budget_ok = bool(out.get("budget_ok")) and budget["outcome"] == "ok"
    for name, r in results.items():
        judged = _judge([b for b in budgets if str(b.get("field", "")).startswith(f"profiles.{name}.")],
                        out.get("results", []))
        r["thresholds"] = judged
        r["pass"] = bool(judged) and all(j["ok"] for j in judged)
    budget_files = sorted(p.name for p in d.out_dir.glob("safety-budget-*.json"))
    harness_ok = (budget["outcome"] in ("ok", "violation") and bool(budget_files) and bool(budgets)
                  and all(r["orders_sent"] == r["orders"] for r in results.values()))
    after = d.status("after")
    ok = harness_ok and (budget_ok or allow)
    doc.update({
        "thresholds_source": getattr(d.cfg.jobs, "budgets_file", None) or "jobs.checks.DEFAULT_BUDGETS",
        "budget": {"outcome": budget["outcome"], "run_id": budget["run_id"], "budget_ok": budget_ok,
                   "violation_count": out.get("violation_count"), "violations": out.get("violations", []),
                   "recommended_action": out.get("recommended_action"),
                   "evidence": budget_files[-1] if budget_files else None},
        "budget_enforced": not allow, "harness_ok": harness_ok, "pass": budget_ok,
        "stack_healthy_before": bool(before.get("healthy")), "stack_healthy_after": bool(after.get("healthy")),
        "load_regression_ok": ok,
    })
    d.write(f"load-all-{stamp}.json", doc)
    d.write(LOAD_EVIDENCE, doc)
    for name, r in results.items():
        d.emit(f"{name.replace('-', '_')}_pass", r["pass"])
    d.emit("load_full_size", full_size)
    d.emit("budget_ok", budget_ok)
    d.emit("violation_count", out.get("violation_count"))
    for v in out.get("violations", []):
        d.emit(f"violation_{v['name']}", _violation_text(v, budgets))
    d.emit("load_budget_enforced", not allow)
    d.emit("load_all_evidence", f"load-all-{stamp}.json")
    d.emit("safety_budget_evidence", budget_files[-1] if budget_files else "")
    d.emit("runbook_load_regression_ok", ok)
    return ok


async def load_smoke(d: Drill, orders: int = 120, concurrency: int = 8, ws_subscribers: int = 4) -> bool:
    from jobs.checks import evaluate_budgets

    p = Profile("load-smoke", orders, concurrency, ws_subscribers)
    before = d.status("before")
    edge = _endpoint(before, "edge")
    keys = await _traders(d, edge, concurrency)
    r = await run_profile(edge, d.endpoints.nats_url, keys, p)
    doc: dict[str, Any] = {"kind": "load-smoke", "at": time.time(), **r}
    path = d.write("load-smoke.json", doc)
    # The load-smoke profile's budgets and the run-wide WS ones (not load_full_size: that judges the drill).
    all_load = load_budget_list(d.cfg)
    budgets = [{**b, "evidence": path.name} for b in profile_budgets(all_load, "load-smoke") + [
        b for b in all_load if not str(b.get("field", "")).startswith("profiles.") and b.get("field") != "full_size"]]
    res = evaluate_budgets(budgets, [d.out_dir], time.time())
    judged = _judge(budgets, res["results"])
    ok = bool(budgets) and res["budget_ok"] and r["orders_sent"] == orders
    doc.update({"thresholds": judged, "violations": res["violations"], "pass": ok,
                "thresholds_source": getattr(d.cfg.jobs, "budgets_file", None) or "jobs.checks.DEFAULT_BUDGETS"})
    d.write("load-smoke.json", doc)
    d.status("after")
    for k in ("order_tps", "order_p99_ms", "order_error_rate", "ws_messages"):
        d.emit(k, r[k])
    for v in res["violations"]:
        d.emit(f"violation_{v['name']}", _violation_text(v, budgets))
    d.emit("load_smoke_evidence", str(path))
    d.emit("load_smoke_ok", ok)
    return ok
