"""``spotex export verify``: read the Kafka topics back and compare them with EVT.

Every event on EVT must be in Kafka (``missing`` = 0). A record written twice (a retried produce,
a re-export after a broker lost data) is reported as a duplicate: expected and harmless for
consumers that dedupe on ``spotex-event-id`` (docs/kafka.md), but counted so it stays visible.
Records in Kafka that EVT does not have (``unexpected``) would mean a foreign or stale writer.

On a live exchange EVT keeps growing while the topics are read back. Given the exporter's durable
consumer, only the events it has acknowledged (EVT messages up to its ack floor) are owed to Kafka;
the ones after it are still on their way and are counted as ``in_flight``, not as missing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from core.wire import decode_events
from jobs.exporter import topics

__all__ = ["evt_event_ids", "kafka_event_ids", "verify"]


async def evt_event_ids(nats_url: str, evt_stream: str = "EVT", durable: str | None = None
                        ) -> tuple[dict[str, tuple[str, int]], set[str], dict[str, Any]]:
    """Every event on EVT as event_id -> (stream, seq); the ids after ``durable``'s ack floor (not
    yet owed to Kafka); and where the read stopped (EVT's last message, the ack floor)."""
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(nats_url)
    out: dict[str, tuple[str, int]] = {}
    in_flight: set[str] = set()
    bound: dict[str, Any] = {"evt_last_seq": None, "ack_floor": None}
    try:
        js = nc.jetstream()
        info = await js.stream_info(evt_stream)
        last = int(info.state.last_seq)
        floor = last
        if durable is not None:
            # Read after EVT's last seq: a floor read later can only be further on.
            with contextlib.suppress(NotFoundError):  # no such consumer: every event is owed
                floor = int((await js.consumer_info(evt_stream, durable)).ack_floor.stream_seq or 0)
                bound["ack_floor"] = floor
        bound["evt_last_seq"] = last
        for seq in range(int(info.state.first_seq), last + 1):
            try:
                msg = await js.get_msg(evt_stream, seq, direct=True)
            except NotFoundError:
                continue
            if msg.data:
                for e in decode_events(msg.data):
                    out[e.event_id] = (e.symbol, e.seq)
                    if seq > floor:
                        in_flight.add(e.event_id)
    finally:
        await nc.close()
    return out, in_flight, bound


async def kafka_event_ids(bootstrap: str, prefix: str, timeout_s: float = 30.0) -> tuple[collections.Counter[str], int]:
    """Counter of spotex-event-id over every record of the export topics, and the record count."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                         request_timeout_ms=10_000)
    counts: collections.Counter[str] = collections.Counter()
    records = 0
    await asyncio.wait_for(c.start(), 15)
    try:
        tps = [TopicPartition(t, p) for t in topics(prefix) for p in sorted(c.partitions_for_topic(t) or set())]
        if not tps:
            return counts, 0
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        left = {tp for tp, end in ends.items() if end > 0}
        deadline = time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            batch = await c.getmany(*left, timeout_ms=1000, max_records=10_000)
            for tp, msgs in batch.items():
                for m in msgs:
                    records += 1
                    eid = dict(m.headers or ()).get("spotex-event-id")
                    counts[eid.decode() if eid else f"<no-id:{tp.topic}/{tp.partition}/{m.offset}>"] += 1
            # By position, not by the last record's offset: a partition can have offset gaps.
            for tp in list(left):
                if await c.position(tp) >= ends[tp]:
                    left.discard(tp)
        if left:
            raise TimeoutError(f"could not read to the end of {sorted(str(t) for t in left)}")
    finally:
        await c.stop()
    return counts, records


async def verify(nats_url: str, bootstrap: str, prefix: str = "spotex", evt_stream: str = "EVT",
                 sample: int = 20, durable: str | None = None) -> dict[str, Any]:
    """Compare EVT with the topics; with ``durable`` (the exporter's consumer) only what it has
    acknowledged must be in Kafka."""
    t0 = time.perf_counter()
    expected, in_flight, bound = await evt_event_ids(nats_url, evt_stream, durable)
    counts, records = await kafka_event_ids(bootstrap, prefix)
    missing = [e for e in expected if e not in counts and e not in in_flight]
    dups = {e: n for e, n in counts.items() if n > 1}
    unexpected = [e for e in counts if e not in expected]
    missing_by_stream: collections.Counter[str] = collections.Counter(expected[e][0] for e in missing)
    return {
        "ok": not missing and not unexpected,
        "evt_events": len(expected),
        "in_flight": sum(1 for e in in_flight if e not in counts),
        **bound,
        "kafka_records": records,
        "kafka_distinct_event_ids": len(counts),
        "missing": len(missing),
        "missing_by_stream": dict(missing_by_stream),
        "missing_sample": sorted(missing, key=lambda e: expected[e])[:sample],
        "duplicates": sum(n - 1 for n in dups.values()),
        "duplicate_event_ids": len(dups),
        "duplicate_sample": sorted(dups)[:sample],
        "unexpected": len(unexpected),
        "unexpected_sample": unexpected[:sample],
        "topics": topics(prefix),
        "seconds": round(time.perf_counter() - t0, 3),
    }
