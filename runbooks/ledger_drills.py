"""Ledger drills: seed §4.1 "Ledger only" and the exactly-once million.

``spotex drill ledger-kill-recover``: against a whole stack (``spotex up``), trades keep flowing
while the ledger service is kill -9'd; the supervisor restarts it with the same durable consumer;
once it has caught up, every trade the core published is in the ledger exactly once
(``ledger_duplicate_rows=0``, ``ledger_trade_rows`` = the trades generated), the invariants pass
(``ok=true``) and the ledger's balances equal the core's. Success line ``ledger_kill_recover_ok=true``.

``spotex drill exactly-once-million [--trades N]``: on a scratch NATS + PostgreSQL, N distinct
trades (a synthetic but well-formed feed, see ``benchmarks/bench_settlement.py``; the real core
would need minutes to produce a million) flow through the real ledger service in a child process
that is kill -9'd at >= 10 random points while redelivery is forced (acks dropped at random with a
short ack wait, and the durable consumer re-created to replay EVT from its first message). Then:
zero duplicates, zero gaps, balances equal the generator's model of the core, every
EngineCheckpoint matched. Plus the origin's variant: one TradeExecuted delivered many times
concurrently (as EVT messages to the consumer and as direct concurrent settlements) applies exactly
once. Success line ``exactly_once_million_ok=true``; evidence JSON under build/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runbooks.common import Drill, publish_load, wait_until

__all__ = ["exactly_once_million", "ledger_kill_recover"]


async def _evt_trades(js: Any, evt_stream: str) -> tuple[set[tuple[str, int]], dict[str, int], int]:
    """Every TradeExecuted on EVT as (symbol, trade_id); each stream's last seq; trades seen twice."""
    from core.wire import TradeExecuted, decode_events

    trades: set[tuple[str, int]] = set()
    last: dict[str, int] = {}
    twice = 0
    info = await js.stream_info(evt_stream)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(evt_stream, seq)
        for e in decode_events(msg.data):
            last[e.symbol] = max(last.get(e.symbol, 0), e.seq)
            if isinstance(e, TradeExecuted):
                key = (e.symbol, e.trade_id)
                twice += key in trades
                trades.add(key)
    return trades, last, twice


async def _book_counts(pool: Any) -> dict[str, Any]:
    async with pool.acquire() as c:
        rows = await c.fetchval("SELECT count(*) FROM ledger_trades")
        distinct = await c.fetchval("SELECT count(*) FROM (SELECT DISTINCT symbol, trade_id FROM ledger_trades) t")
        jdup = await c.fetchval("SELECT count(*) - count(DISTINCT (stream, seq)) FROM ledger_journal")
        applied = {r["stream"]: r["last_seq"] for r in await c.fetch(
            "SELECT stream, last_seq FROM ledger_consumer_checkpoint")}
        stopped = [r["stream"] for r in await c.fetch(
            "SELECT stream FROM ledger_consumer_checkpoint WHERE state = 'stopped'")]
        ck = {r["status"]: r["n"] for r in await c.fetch(
            "SELECT status, count(*) AS n FROM ledger_engine_checkpoints GROUP BY 1")}
    return {"trade_rows": int(rows), "duplicate_rows": int(rows - distinct + jdup), "applied": applied,
            "stopped_streams": stopped, "checkpoints": ck}


# --------------------------------------------------------------------------------------------------
# seed §4.1 Ledger only


async def _core_balances(nc: Any, subject: str, accounts: list[int]) -> dict[tuple[int, str, str], int]:
    import msgspec

    out: dict[tuple[int, str, str], int] = {}
    for a in accounts:
        resp = await nc.request(subject, msgspec.msgpack.encode({"op": "balances", "account_id": a}), timeout=5)
        data = msgspec.msgpack.decode(resp.data)
        if isinstance(data, dict) and "error" in data:
            raise RuntimeError(f"core query: {data['error']}")
        for asset, b in (data or {}).items():
            av, ho = (b["available"], b["hold"]) if isinstance(b, dict) else (b[1], b[2])
            if av:
                out[(a, asset, "available")] = int(av)
            if ho:
                out[(a, asset, "hold")] = int(ho)
    return out


async def ledger_kill_recover(d: Drill, commands: int = 3000, rate: float = 600.0, seed: int = 3,
                              kills: int = 1) -> bool:
    import asyncpg
    import nats

    from core.sim import generate
    from ledger.invariants import run_invariants
    from ledger.reconcile import engine_seqs

    d.status("before")
    ep = d.endpoints
    comp = d.component("ledger")
    if not comp.get("pid"):
        raise RuntimeError("no ledger service in this stack")

    await wait_until(lambda: d.ready("ledger"), 60, "the ledger service")
    cmds = generate(seed, commands)
    load = asyncio.create_task(publish_load(ep.nats_url, cmds, rate, f"ledger-kill-{int(time.time())}"))
    killed: list[dict[str, Any]] = []
    rng = random.Random(seed)
    for i in range(kills):
        # Kill somewhere in the middle of the load, while trades keep flowing.
        await asyncio.sleep(commands / rate * rng.uniform(0.2, 0.6) / kills)
        # Its status after the restart shows (by its lag) that trades kept flowing.
        killed.append({**await d.kill9("ledger"), "n": i + 1})
    result = await load
    nc = await nats.connect(ep.nats_url)
    js = nc.jetstream()
    pool = await asyncpg.create_pool(ep.pg_dsn, min_size=1, max_size=4)
    try:
        async def caught_up() -> bool:
            eng = await engine_seqs(js, d.cfg.nats.evt_stream)
            have = (await _book_counts(pool))["applied"]
            return bool(eng) and all(have.get(s, 0) >= v for s, v in eng.items())

        await wait_until(caught_up, 120, "the ledger to catch up with EVT")
        evt_trades, _last, evt_twice = await _evt_trades(js, d.cfg.nats.evt_stream)
        counts = await _book_counts(pool)
        async with pool.acquire() as c:
            rows = await c.fetch("SELECT symbol, trade_id FROM ledger_trades")
            accounts = sorted({r["account_id"] for r in await c.fetch(
                "SELECT DISTINCT account_id FROM ledger_accounts WHERE account_id <> 0")})
            ours = {(r["account_id"], r["asset"], r["bucket"]): int(r["balance"]) for r in await c.fetch(
                "SELECT account_id, asset, bucket, balance FROM ledger_accounts "
                "WHERE account_id <> 0 AND balance <> 0")}
        ledger_trades = {(r["symbol"], r["trade_id"]) for r in rows}
        missing = len(evt_trades - ledger_trades)
        extra = len(ledger_trades - evt_trades)
        theirs = await _core_balances(nc, d.cfg.core.query_subject, accounts)
        balance_diffs = sorted(str(k) for k in set(ours) | set(theirs) if ours.get(k, 0) != theirs.get(k, 0))
        inv = await run_invariants(pool, full=True)
        latches = {r["symbol"]: r["mode"] for r in await pool.fetch("SELECT symbol, mode FROM ledger_latches "
                                                                    "WHERE engaged")}
    finally:
        await pool.close()
        await nc.close()
    ok = (counts["duplicate_rows"] == 0 and counts["trade_rows"] == len(evt_trades) and missing == 0 and extra == 0
          and inv.ok and not balance_diffs and not counts["stopped_streams"] and len(evt_trades) > 0
          and len(killed) == kills and evt_twice == 0)
    after = d.status("after")
    summary = {
        "drill": "ledger-kill-recover", "kills": killed, "commands_sent": result.sent,
        "commands_acked": len(result.acked), "publish_errors": result.errors,
        "generated_trades": len(evt_trades), "ledger_trade_rows": counts["trade_rows"],
        "ledger_duplicate_rows": counts["duplicate_rows"], "missing_trades": missing, "extra_trades": extra,
        "balance_differences_vs_core": balance_diffs[:50], "engine_checkpoints": counts["checkpoints"],
        "invariants": inv.to_dict(), "latches_engaged": latches, "stack_healthy_after": after.get("healthy"),
        "ledger_kill_recover_ok": ok,
    }
    d.write("ledger-kill-recover-summary.json", summary)
    d.emit("ledger_kills", len(killed))
    d.emit("generated_trades", len(evt_trades))
    d.emit("ledger_trade_rows", counts["trade_rows"])
    d.emit("ledger_duplicate_rows", counts["duplicate_rows"])
    d.emit("ledger_missing_trades", missing)
    d.emit("balances_equal_core", not balance_diffs)
    d.emit("ok", inv.ok)
    d.emit("ledger_kill_recover_ok", ok)
    return ok


# --------------------------------------------------------------------------------------------------
# exactly once, a million times


class _LedgerProc:
    """The ledger service as a child process that can be kill -9'd and restarted."""

    def __init__(self, nats_url: str, dsn: str, log: Path, *, ack_wait_s: float, drop_acks: float) -> None:
        self.argv = [sys.executable, "-m", "ledger.service", "--nats-url", nats_url, "--pg-dsn", dsn,
                     "--no-reconcile", "--ack-wait-s", str(ack_wait_s), "--chaos-drop-ack-ratio", str(drop_acks),
                     "--log-level", "WARNING"]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.starts += 1

    def kill9(self) -> int:
        assert self.proc is not None
        pid = self.proc.pid
        os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        return pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _run_million(out: Path, nats_url: str, dsn: str, trades: int, kills: int, seed: int,
                       dup_deliveries: int) -> dict[str, Any]:
    import asyncpg
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from benchmarks.bench_settlement import SyntheticFeed, publish_feed
    from core.bus import ensure_streams
    from core.wire import TradeExecuted
    from ledger.invariants import run_invariants
    from ledger.migrate import migrate
    from ledger.settlement import Book, Delivery

    rng = random.Random(seed)
    await migrate(dsn)
    nc = await nats.connect(nats_url)
    js = nc.jetstream(timeout=30)
    await ensure_streams(js)
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=20)
    feed = SyntheticFeed(trades, seed=seed, checkpoint_every=max(1_000, trades // 20))
    t0 = time.perf_counter()
    # Small runs are paced over ~20 s so that the kills land while trades are still flowing (each
    # restart takes about a second); a large run is paced by its own generation.
    approx_events = trades + 3 * 200 * 2 + 10
    pace = None if trades >= 100_000 else approx_events / 20.0
    publisher = asyncio.create_task(publish_feed(js, feed.messages(), rate=pace))
    ledger = _LedgerProc(nats_url, dsn, out / "ledger-service.log", ack_wait_s=2.0, drop_acks=0.02)
    ledger.start()

    async def settled() -> int:
        async with pool.acquire() as c:
            return int(await c.fetchval("SELECT coalesce(sum(last_seq), 0) FROM ledger_consumer_checkpoint"))

    # Kill points: spread over the run by progress (events settled), never two at the same point.
    points = sorted(rng.sample(range(approx_events // 50, approx_events * 9 // 10), kills))
    kill_log: list[dict[str, Any]] = []
    replays = 0
    prev_at = -1
    for i, point in enumerate(points):
        # Each kill lands after the restarted process has settled something: mid-run, not mid-start.
        point = max(point, prev_at + 1)

        async def reached(p: int = point) -> bool:
            at = await settled()
            # A small run may settle everything before all its kills: the rest then land at the end.
            return at >= p or (publisher.done() and at >= sum(feed.seqs.values()))

        await wait_until(reached, max(300.0, trades / 500), f"settled events >= {point}", every=0.02)
        await asyncio.sleep(rng.uniform(0, 0.3))  # somewhere inside a batch, not on a boundary
        at = await settled()
        pid = ledger.kill9()
        prev_at = at
        entry: dict[str, Any] = {"n": i + 1, "pid": pid, "settled_events_at_kill": at,
                                 "while_trades_flowing": not publisher.done()}
        if i % 3 == 1:
            # Forced redelivery: the durable consumer replays EVT from its first message.
            with contextlib.suppress(Exception):
                await js.delete_consumer("EVT", "ledger")
            await js.add_consumer("EVT", ConsumerConfig(
                durable_name="ledger", filter_subject="evt.>", ack_policy=AckPolicy.EXPLICIT, ack_wait=2.0,
                max_deliver=-1, max_ack_pending=20_000, deliver_policy=DeliverPolicy.ALL))
            entry["forced_full_redelivery"] = True
            replays += 1
        kill_log.append(entry)
        await asyncio.sleep(rng.uniform(0.05, 0.5))  # trades keep arriving while it is down
        ledger.start()
    await publisher
    total_events = sum(feed.seqs.values())
    expected = dict(feed.seqs)

    async def done() -> bool:
        async with pool.acquire() as c:
            have = {r["stream"]: r["last_seq"] for r in await c.fetch(
                "SELECT stream, last_seq FROM ledger_consumer_checkpoint")}
        return all(have.get(s, 0) >= v for s, v in expected.items())

    await wait_until(done, max(300.0, trades / 300), "the ledger to settle everything")
    drain_s = time.perf_counter() - t0

    # The origin's variant: one trade delivered many times at once.
    dup = feed.trade()  # (counted in feed.balance_events: the journal must hold it once)
    dup_delivery = Delivery(dup.symbol, 0, [dup])
    from core.wire import encode_events

    headers = {"Spotex-First-Seq": str(dup.seq), "Spotex-Last-Seq": str(dup.seq), "Spotex-Fencing-Token": "1"}
    futs = [await js.publish_async(f"evt.{dup.symbol}", encode_events([dup]),
                                   headers={**headers, "Nats-Msg-Id": f"dup-{dup.seq}-{k}"})
            for k in range(dup_deliveries)]
    direct = [Book(pool) for _ in range(16)]
    results = await asyncio.gather(*futs, *(direct[k % 16].settle([dup_delivery]) for k in range(dup_deliveries)))
    outs: list[Any] = list(results[dup_deliveries:])
    expected[dup.symbol] = dup.seq
    await wait_until(done, 120, "the duplicated trade to be settled")
    await asyncio.sleep(1.0)  # let the consumer chew through every copy
    ledger.stop()

    async with pool.acquire() as c:
        rows = await c.fetchval("SELECT count(*) FROM ledger_trades")
        distinct = await c.fetchval("SELECT count(*) FROM (SELECT DISTINCT symbol, trade_id FROM ledger_trades) t")
        jdup = await c.fetchval("SELECT count(*) - count(DISTINCT (stream, seq)) FROM ledger_journal")
        dup_rows = await c.fetchval("SELECT count(*) FROM ledger_journal WHERE stream = $1 AND seq = $2",
                                    dup.symbol, dup.seq)
        per_stream = {r["stream"]: (r["n"], r["lo"], r["hi"]) for r in await c.fetch(
            "SELECT stream, count(*) AS n, min(seq) AS lo, max(seq) AS hi FROM ledger_journal GROUP BY stream")}
        applied = {r["stream"]: r["last_seq"] for r in await c.fetch(
            "SELECT stream, last_seq FROM ledger_consumer_checkpoint")}
        ck = {r["status"]: r["n"] for r in await c.fetch(
            "SELECT status, count(*) AS n FROM ledger_engine_checkpoints GROUP BY 1")}
        alerts = await c.fetchval("SELECT count(*) FROM ledger_alerts")
        ours = {(r["account_id"], r["asset"], r["bucket"]): int(r["balance"]) for r in await c.fetch(
            "SELECT account_id, asset, bucket, balance FROM ledger_accounts WHERE balance <> 0")}
    inv = await run_invariants(pool, full=True, record=False)
    await pool.close()
    await nc.close()
    model = {k: v for k, v in feed.balances.items() if v}
    balance_diffs = sorted(str(k) for k in set(model) | set(ours) if model.get(k, 0) != ours.get(k, 0))
    # Gaps: every stream applied to its end, and the journal holds exactly one row per balance event
    # the generator produced (unique (stream, seq), so the count proves none is missing).
    gaps = []
    for s, last in expected.items():
        n = per_stream.get(s, (0, 0, 0))[0]
        if applied.get(s, 0) != last or n != feed.balance_events.get(s, 0):
            gaps.append({"stream": s, "applied": applied.get(s, 0), "expected_last": last, "journal_rows": n,
                         "expected_rows": feed.balance_events.get(s, 0)})
    dup_ok = dup_rows == 1 and sum(o.trades for o in outs) <= 1 and isinstance(dup, TradeExecuted)
    ok = (rows == trades + 1 and distinct == rows and jdup == 0 and not gaps and not balance_diffs and inv.ok
          and set(ck) == {"match"} and len(kill_log) >= kills and alerts == 0 and dup_ok)
    return {
        "drill": "exactly-once-million", "trades": trades, "kills": kill_log, "kill_count": len(kill_log),
        "forced_full_redeliveries": replays, "ledger_starts": ledger.starts, "events": total_events,
        "seconds": round(drain_s, 1), "ledger_trade_rows": rows, "duplicates": int(rows - distinct + jdup),
        "gaps": gaps, "balances_equal_core": not balance_diffs, "balance_differences": balance_diffs[:50],
        "engine_checkpoints": ck, "alerts": alerts, "invariants": inv.to_dict(),
        "duplicate_delivery": {"deliveries": dup_deliveries * 2, "journal_rows": dup_rows,
                               "direct_settlements_applied": sum(o.trades for o in outs)},
        "exactly_once_million_ok": ok,
    }


def exactly_once_million(out_dir: str | None = None, trades: int = 1_000_000, kills: int = 10, seed: int = 7,
                         dup_deliveries: int = 1_000) -> bool:
    """Run the drill on a scratch NATS + PostgreSQL; print key=value lines; write the evidence."""
    from spotex.testing import nats_server, new_database, postgres_server

    out = Path(out_dir or os.environ.get("SPOTEX_RUNBOOK_OUT") or "build/runbooks/exactly-once-million").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="spotex-eom-"))
    (tmp / "n").mkdir()
    (tmp / "p").mkdir()
    try:
        with nats_server(tmp / "n") as ns, postgres_server(tmp / "p") as ps:
            dsn = new_database(ps.url, "eom")
            summary = asyncio.run(_run_million(out, ns.url, dsn, trades, kills, seed, dup_deliveries))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (out / "exactly-once-million-summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True,
                                                                      default=str))
    for k in ("trades", "kill_count", "forced_full_redeliveries", "ledger_trade_rows", "duplicates",
              "balances_equal_core", "seconds"):
        v = summary[k]
        print(f"{k}={('true' if v else 'false') if isinstance(v, bool) else v}", flush=True)
    print(f"gaps={len(summary['gaps'])}", flush=True)
    print(f"duplicate_delivery_journal_rows={summary['duplicate_delivery']['journal_rows']}", flush=True)
    print(f"evidence={out / 'exactly-once-million-summary.json'}", flush=True)
    ok = bool(summary["exactly_once_million_ok"])
    print(f"exactly_once_million_ok={'true' if ok else 'false'}", flush=True)
    return ok
