"""``spotex bench ...``: benchmarks, each printing one JSON line of figures (code in benchmarks/)."""

from __future__ import annotations

import json
from typing import Any

import click

__all__ = ["register"]


def _print(result: dict[str, Any]) -> None:
    click.echo(json.dumps(result, sort_keys=True))


def register(main: click.Group) -> None:
    @main.group("bench")
    def bench() -> None:
        """Benchmarks against the brief's targets; one JSON line of figures each."""

    @bench.command("engine")
    @click.option("--commands", default=1_000_000, show_default=True)
    @click.option("--seed", default=1, show_default=True)
    @click.option("--chunk", type=int, default=None,
                  help="Commands generated ahead of each measured stretch (default: all before measuring; "
                       "10000 interleaves the generator as before, with less memory).")
    @click.option("--batch", default=256, show_default=True, type=click.IntRange(min=1),
                  help="Commands decoded from their WAL bytes at a time, right before they are applied.")
    @click.option("--json", "as_json", is_flag=True, help="Accepted for symmetry; output is always one JSON line.")
    def bench_engine(commands: int, seed: int, chunk: int | None, batch: int, as_json: bool) -> None:
        """In-process engine: risk + match + events over a mixed flow, no I/O."""
        from benchmarks.bench_engine import run

        _print(run(commands, seed, chunk=chunk, batch=batch))

    @bench.command("wal")
    @click.option("--commands", default=1_000_000, show_default=True)
    @click.option("--batch", default=256, show_default=True, help="Commands per group commit.")
    @click.option("--payload-bytes", default=100, show_default=True)
    @click.option("--json", "as_json", is_flag=True)
    def bench_wal(commands: int, batch: int, payload_bytes: int, as_json: bool) -> None:
        """Durable core: WAL group commit with real fdatasync."""
        from benchmarks.bench_wal import run

        _print(run(commands, batch, payload_bytes))

    @bench.command("replay")
    @click.option("--records", default=1_000_000, show_default=True)
    @click.option("--seed", default=1, show_default=True)
    @click.option("--replay-events", type=int, default=None,
                  help="Rebuild events for the last N records (default: the core's replay_events, 50000).")
    @click.option("--json", "as_json", is_flag=True)
    def bench_replay(records: int, seed: int, replay_events: int | None, as_json: bool) -> None:
        """Recovery: records/s and seconds to serve again with N records since the last snapshot."""
        from benchmarks.bench_replay import run

        _print(run(records, seed, replay_events=replay_events))

    @bench.command("e2e")
    @click.option("--orders", default=10_000, show_default=True)
    @click.option("--concurrency", default=32, show_default=True)
    @click.option("--rate", type=float, default=None, help="Pace to this many orders/s (default: open loop).")
    @click.option("--stack-dir", default=None, help="Use the running stack in this data dir instead of a fresh one.")
    @click.option("--json", "as_json", is_flag=True)
    def bench_e2e(orders: int, concurrency: int, rate: float | None, stack_dir: str | None, as_json: bool) -> None:
        """End to end over REST: signed POST /v1/orders through JetStream and the core, to the ack."""
        from benchmarks.bench_e2e import run

        _print(run(orders, concurrency, rate, stack_dir))

    @bench.command("settlement")
    @click.option("--trades", default=1_000_000, show_default=True)
    @click.option("--batch-max", default=500, show_default=True, help="Events per PostgreSQL transaction.")
    @click.option("--events-per-msg", default=100, show_default=True, help="Events per EVT message.")
    @click.option("--live-rate", type=float, default=None,
                  help="Publish at this many events/s while settling and measure the settlement lag.")
    @click.option("--json", "as_json", is_flag=True)
    def bench_settlement(trades: int, batch_max: int, events_per_msg: int, live_rate: float | None,
                         as_json: bool) -> None:
        """Ledger: N trades exactly once into PostgreSQL through the real consumer (scratch NATS + PG)."""
        from benchmarks.bench_settlement import run

        _print(run(trades, batch_max=batch_max, events_per_msg=events_per_msg, live_rate=live_rate))

    @bench.command("ws")
    @click.option("--clients", default=10_000, show_default=True)
    @click.option("--sample", default=100, show_default=True, help="Connections that parse and time every frame.")
    @click.option("--step-s", default=3.0, show_default=True, help="Seconds per offered-rate step.")
    @click.option("--drain-ms", default=1000.0, show_default=True,
                  help="Unsampled connections are drained by a sweep over this period instead of epoll "
                       "(stand-ins for remote clients); 0 = every connection event-driven.")
    @click.option("--json", "as_json", is_flag=True)
    def bench_ws(clients: int, sample: int, step_s: float, drain_ms: float, as_json: bool) -> None:
        """WebSocket fan-out: N subscribers (3 symbols, trades + book) on one edge process, loopback."""
        from benchmarks.bench_ws import run

        _print(run(clients, sample=sample, step_s=step_s, drain_ms=drain_ms))
