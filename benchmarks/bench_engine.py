"""Engine in-process benchmark: risk + match + events, mixed order flow over 3 symbols, no I/O.

Flow per command (seeded, deterministic): 40% passive GTC limits, 12% marketable limits (GTC or IOC),
3% market orders by base quantity, 1% market buys by quote amount, 34% cancels, 10% amends (70% size
decrease keeping priority, 30% re-price). 1,000 funded accounts, maker/taker fees, a price band, a
checkpoint (full state hash) every 10,000 commands as in production.

A generating engine runs ahead and records the commands (its flow generator reads that engine to
pick live orders to cancel or amend, like a market maker would); the measured engine then applies
them as the core loop applies a fetched batch: each command is kept as its WAL bytes and the
measured loop decodes ``batch`` (256) of them right before applying them, so the commands are in
cache as they are in the service (a million pre-built command objects read back from DRAM cost a
cache miss per command that the core never pays). By default every command is generated before the
first one is measured (``chunk`` = all): generating a chunk runs a second whole engine and the flow
generator, which evicts the measured engine's books and accounts from the CPU caches, so
interleaving them (``chunk=10_000``, the method before 2026-11-24 session 5) measures the harness
as much as the engine. Determinism makes both engines go through the same states (checked by
comparing state hashes at the end). Only ``Engine.apply`` is timed, per command, with
``time.perf_counter_ns``: ``commands_per_s`` = commands / sum of the timed durations (the two timer
reads per command are included, so it is slightly pessimistic); ``decode_us`` is the mean decode
per command, outside those durations; ``loop_commands_per_s`` is the whole loop timed (decode,
timers and result bookkeeping included); ``cpu_commands_per_s`` divides by the process CPU time of
that loop instead (robust to preemption by other processes, not to cache contention).
``load_avg_1m`` says how busy the machine was: on a shared 2-core box the figures are only
comparable at a similar load.

Usage: ``python -m benchmarks.bench_engine [n] [seed]`` prints one JSON line.

``python -m benchmarks.bench_engine --opcodes [n] [seed]`` counts instead of timing: the bytecodes
the interpreter executes per command (``sys.settrace`` opcode events, per engine function) over the
same flow. Deterministic and independent of the machine's load, so it can tell a 2 % change apart
where CPU-time runs on the shared box vary by 20 %; it says nothing about the cost of allocations
or of C calls (see docs/performance.md for the machine-instruction counts taken with callgrind).
"""

from __future__ import annotations

import gc
import json
import random
import sys
import time
from typing import Any

from core.engine import ENGINE_IMPL, Engine
from core.wire import (
    AddMarket,
    AmendOrder,
    CancelOrder,
    Command,
    Deposit,
    OrderType,
    PlaceOrder,
    SequencedCommand,
    Side,
    TimeInForce,
    TradeExecuted,
    decode_command,
    encode_command,
    market_config,
)

__all__ = ["opcodes", "run"]

SYMBOLS = (
    ("BTC-USDT", "BTC", 6_500_000),
    ("ETH-USDT", "ETH", 350_000),
    ("SOL-USDT", "SOL", 15_000),
)
N_ACCOUNTS = 1_000
FIRST_ACCOUNT = 1_000


class _Flow:
    """Seeded order-flow generator that keeps its own list of resting order ids per symbol."""

    def __init__(self, engine: Engine, seed: int) -> None:
        self.e = engine
        self.rng = random.Random(seed)
        self.mid = {s: p for s, _b, p in SYMBOLS}
        self.live: dict[str, list[int]] = {s: [] for s, _b, _p in SYMBOLS}
        self.n = 0

    def _pick_live(self, sym: str) -> int | None:
        live = self.live[sym]
        rng = self.rng
        for _ in range(4):
            if not live:
                return None
            i = rng.randrange(len(live))
            oid = live[i]
            if self.e.is_open(oid):
                return oid
            live[i] = live[-1]
            live.pop()
        return None

    def next(self, seq: int) -> Command:
        rng = self.rng
        self.n += 1
        sym, _base, _p0 = SYMBOLS[rng.randrange(3)]
        if self.n % 100 == 0:
            for s in self.mid:
                self.mid[s] += rng.randint(-3, 3)
        mid = self.mid[sym]
        acct = FIRST_ACCOUNT + rng.randrange(N_ACCOUNTS)
        r = rng.random()
        side = Side.BUY if rng.random() < 0.5 else Side.SELL
        sign = 1 if side is Side.BUY else -1
        if r < 0.40:
            price = mid - sign * rng.randint(1, 60)
            self.live[sym].append(seq)
            return PlaceOrder(account_id=acct, symbol=sym, client_order_id="", side=side,
                              price_ticks=price, qty_lots=rng.randint(1, 20))
        if r < 0.52:
            price = mid + sign * rng.randint(0, 8)
            tif = TimeInForce.GTC if rng.random() < 0.6 else TimeInForce.IOC
            if tif is TimeInForce.GTC:
                self.live[sym].append(seq)
            return PlaceOrder(account_id=acct, symbol=sym, client_order_id="", side=side, tif=tif,
                              price_ticks=price, qty_lots=rng.randint(1, 30))
        if r < 0.55:
            return PlaceOrder(account_id=acct, symbol=sym, client_order_id="", side=side,
                              type=OrderType.MARKET, qty_lots=rng.randint(1, 30))
        if r < 0.56:
            return PlaceOrder(account_id=acct, symbol=sym, client_order_id="", side=Side.BUY,
                              type=OrderType.MARKET, quote_amount=mid * rng.randint(5, 50) * 10)
        oid = self._pick_live(sym)
        if oid is None:
            return CancelOrder(account_id=acct, symbol=sym, order_id=seq)  # rejected: UNKNOWN_ORDER
        view = self.e.order(oid)
        assert view is not None
        if r < 0.90:
            return CancelOrder(account_id=view.account_id, symbol=sym, order_id=oid)
        if rng.random() < 0.7 or view.price_ticks is None:
            new_qty = max(view.filled_qty_lots + 1, view.qty_lots - rng.randint(1, 5))
            return AmendOrder(account_id=view.account_id, symbol=sym, order_id=oid, new_qty_lots=new_qty)
        sign = 1 if view.side is Side.BUY else -1
        return AmendOrder(account_id=view.account_id, symbol=sym, order_id=oid,
                          new_price_ticks=mid - sign * rng.randint(1, 60))


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def _setup(checkpoint_every: int) -> tuple[Engine, int]:
    e = Engine(checkpoint_every=checkpoint_every)
    seq = 0
    cmds: list[Command] = []
    for sym, base, _p in SYMBOLS:
        cmds.append(AddMarket(config=market_config(
            sym, base, "USDT", base_scale=8, quote_scale=8, tick_size="0.01", lot_size="0.00001",
            price_band_bps=500, maker_fee_bps=10, taker_fee_bps=20,
        )))
    for a in range(FIRST_ACCOUNT, FIRST_ACCOUNT + N_ACCOUNTS):
        cmds.append(Deposit(account_id=a, asset="USDT", amount=10**14))
        for _sym, base, _p in SYMBOLS:
            cmds.append(Deposit(account_id=a, asset=base, amount=10**13))
    for c in cmds:
        seq += 1
        e.apply(SequencedCommand(seq=seq, ts_ms=seq, fencing_token=1, correlation_id="setup", command=c))
    return e, seq


def run(n: int = 1_000_000, seed: int = 1, checkpoint_every: int = 10_000, chunk: int | None = None,
        batch: int = 256) -> dict[str, Any]:
    """Apply ``n`` mixed commands; see the module docstring. Returns one JSON-able dict. ``chunk``:
    commands generated ahead of each measured stretch (None: all ``n`` before measuring); ``batch``:
    commands decoded from their WAL bytes at a time before being applied, as the core's loop does."""
    if chunk is None or chunk <= 0 or chunk > n:
        chunk = n
    batch = max(1, batch)
    gen, seq0 = _setup(checkpoint_every)
    e, seq = _setup(checkpoint_every)
    assert seq == seq0
    flow = _Flow(gen, seed)

    def produce(count: int) -> list[bytes]:
        nonlocal seq0
        out: list[bytes] = []
        for _ in range(count):
            seq0 += 1
            cmd = SequencedCommand(seq=seq0, ts_ms=1_700_000_000_000 + seq0, fencing_token=1,
                                   correlation_id="c", command=flow.next(seq0))
            gen.apply(cmd)
            out.append(encode_command(cmd))
        return out

    # Warm-up: build resting books so the measured flow starts from a realistic state.
    for raw in produce(20_000):
        e.apply(decode_command(raw))
    gc.collect()
    gc.freeze()
    lat = [0] * n
    trades = 0
    events = 0
    perf = time.perf_counter_ns
    apply = e.apply
    decode = decode_command
    i = 0
    wall = 0
    cpu = 0
    decoding = 0
    cpu_clock = time.process_time_ns
    while i < n:
        raws = produce(min(chunk, n - i))
        gc.freeze()  # the generator's objects are the harness's, not the engine's: not for the GC to walk
        c_batch = cpu_clock()
        t_batch = perf()
        for b0 in range(0, len(raws), batch):
            t0 = perf()
            cmds = [decode(r) for r in raws[b0:b0 + batch]]
            decoding += perf() - t0
            for cmd in cmds:
                t0 = perf()
                out = apply(cmd)
                t1 = perf()
                lat[i] = t1 - t0
                i += 1
                events += len(out)
                for ev in out:
                    if type(ev) is TradeExecuted:
                        trades += 1
        wall += perf() - t_batch
        cpu += cpu_clock() - c_batch
    gc.unfreeze()
    if e.state_hash() != gen.state_hash():
        raise AssertionError("replayed engine diverged from the generating engine")
    lat.sort()
    busy = sum(lat)

    def pct(p: float) -> float:
        return round(lat[min(n - 1, int(p * n))] / 1000, 2)

    return {
        "bench": "engine",
        "engine_impl": ENGINE_IMPL,
        "commands": n,
        "commands_per_s": round(n / (busy / 1e9)),
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": round(lat[-1] / 1000, 2),
        "trades": trades,
        "events": events,
        "open_orders_end": e.open_order_count(),
        "decode_us": round(decoding / n / 1000, 3),
        "loop_commands_per_s": round(n / (wall / 1e9)),
        "cpu_commands_per_s": round(n / (cpu / 1e9)),
        "load_avg_1m": _loadavg(),
        "checkpoint_every": checkpoint_every,
        "chunk": chunk,
        "batch": batch,
        "seed": seed,
    }


def opcodes(n: int = 20_000, seed: int = 1, checkpoint_every: int = 10_000) -> dict[str, Any]:
    """Bytecodes executed per command by ``Engine.apply`` over ``n`` commands of the same flow as
    :func:`run` (after the same warm-up), in total and per function. Slow (traced): keep ``n`` small."""
    gen, seq = _setup(checkpoint_every)
    e, _ = _setup(checkpoint_every)
    flow = _Flow(gen, seed)
    cmds: list[SequencedCommand] = []
    for _ in range(20_000 + n):
        seq += 1
        cmd = SequencedCommand(seq=seq, ts_ms=1_700_000_000_000 + seq, fencing_token=1, correlation_id="c",
                               command=flow.next(seq))
        gen.apply(cmd)
        cmds.append(cmd)
    for cmd in cmds[:20_000]:
        e.apply(cmd)
    per_fn: dict[str, int] = {}

    def tracer(frame: Any, event: str, _arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            name = frame.f_code.co_qualname
            per_fn[name] = per_fn.get(name, 0) + 1
        return tracer

    apply = e.apply
    sys.settrace(tracer)
    try:
        for cmd in cmds[20_000:]:
            apply(cmd)
    finally:
        sys.settrace(None)
    if e.state_hash() != gen.state_hash():
        raise AssertionError("replayed engine diverged from the generating engine")
    total = sum(per_fn.values())
    top = sorted(per_fn.items(), key=lambda kv: -kv[1])[:12]
    return {
        "bench": "engine-opcodes",
        "engine_impl": ENGINE_IMPL,
        "commands": n,
        "opcodes_per_command": round(total / n, 1),
        "per_function": {k: round(v / n, 1) for k, v in top},
        "seed": seed,
    }


if __name__ == "__main__":
    _args = [a for a in sys.argv[1:] if a != "--opcodes"]
    _seed = int(_args[1]) if len(_args) > 1 else 1
    if "--opcodes" in sys.argv[1:]:
        print(json.dumps(opcodes(int(_args[0]) if _args else 20_000, _seed)))
    else:
        print(json.dumps(run(int(_args[0]) if _args else 1_000_000, _seed)))
