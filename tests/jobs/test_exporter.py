"""The exporter against the real nats-server and Tansu broker, faults through the fault proxy."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import nats

from jobs.exporter import Exporter, ExporterOptions
from jobs.verify_export import verify
from runbooks.kafka_drills import proxied_broker
from spotex.testing import RunningServer
from tests.jobs.evtgen import EvtWriter


async def _until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out: {what}")


def _short(rep: dict[str, Any]) -> str:
    """The verify report's loss figures first, so a failure names what went missing."""
    keys = ("missing", "missing_by_stream", "missing_sample", "unexpected", "unexpected_sample", "in_flight",
            "ack_floor", "evt_last_seq", "evt_events", "kafka_records")
    return json.dumps({k: rep.get(k) for k in keys})


def _opts(nats_url: str, bootstrap: str, **kw: Any) -> tuple[ExporterOptions, str]:
    tag = uuid.uuid4().hex[:8]
    return ExporterOptions(nats_url=nats_url, bootstrap=bootstrap, durable=f"exp-{tag}", topic_prefix=f"t{tag}",
                           partitions=2, request_timeout_ms=2000, retry_backoff_max_ms=1000,
                           monitor_every_s=0.3, **kw), f"t{tag}"


async def _caught_up(exp: Exporter, nc: Any, timeout: float = 40) -> None:
    async def done() -> bool:
        from nats.js.errors import NotFoundError

        try:
            info = await nc.jetstream().consumer_info("EVT", exp.opts.durable)
        except NotFoundError:  # being re-created by a rewind
            return False
        return int(info.num_pending) + int(info.num_ack_pending) == 0

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await done():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"exporter not caught up: {exp.status()}")


def test_exports_every_event_with_ids_in_headers(nats_srv: RunningServer, kafka_srv: RunningServer) -> None:
    async def go() -> None:
        from aiokafka import AIOKafkaConsumer

        nc = await nats.connect(nats_srv.url)
        w = EvtWriter(nc.jetstream())
        await w.setup()
        s = f"AA{uuid.uuid4().hex[:4].upper()}-USDT"
        await w.publish(s, 300)
        opts, prefix = _opts(nats_srv.url, kafka_srv.url)
        exp = Exporter(opts)
        await exp.connect_nats()
        task = asyncio.create_task(exp.run())
        try:
            await _caught_up(exp, nc)
            rep = await verify(nats_srv.url, kafka_srv.url, prefix, durable=opts.durable)
            assert rep["missing"] == 0 and rep["unexpected"] == 0, _short(rep)
            assert rep["duplicates"] == 0, rep
            assert exp.status()["exported_seq"][s] == 300
            c = AIOKafkaConsumer(f"{prefix}.trades", bootstrap_servers=kafka_srv.url, auto_offset_reset="earliest",
                                 enable_auto_commit=False)
            await c.start()
            try:
                batch = await c.getmany(timeout_ms=5000)
                recs = [m for ms in batch.values() for m in ms if m.key == s.encode()]
            finally:
                await c.stop()
            assert recs
            # The key's partition is the one Kafka's default (murmur2) partitioner gives it, as a
            # per-record producer would have chosen, and a partition holds the symbol's events in
            # EVT order.
            from aiokafka.partitioner import DefaultPartitioner

            assert {m.partition for m in recs} == {DefaultPartitioner()(s.encode(), [0, 1], [0, 1])}
            seqs = [int(dict(m.headers)["spotex-seq"]) for m in recs]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
            m = recs[0]
            h = {k: v.decode() for k, v in m.headers}
            body = json.loads(m.value)
            assert body["t"] == "TradeExecuted" and h["spotex-type"] == "TradeExecuted"
            assert h["spotex-event-id"] == body["event_id"] and int(h["spotex-seq"]) == body["seq"]
            assert h["spotex-stream"] == s == body["symbol"]
        finally:
            exp.stopping.set()
            await task
            await nc.close()

    asyncio.run(go())


def test_waits_after_a_short_fetch_so_one_round_exports_many_messages(nats_srv: RunningServer,
                                                                      kafka_srv: RunningServer) -> None:
    """With batch_wait_ms the exporter waits after a fetch that did not fill its batch: messages the
    core publishes one at a time meanwhile go out in one round (fetch, produce, acks)."""
    async def go() -> None:
        nc = await nats.connect(nats_srv.url)
        w = EvtWriter(nc.jetstream())
        await w.setup()
        s = f"AW{uuid.uuid4().hex[:4].upper()}-USDT"
        opts, _ = _opts(nats_srv.url, kafka_srv.url, batch_wait_ms=1000)
        exp = Exporter(opts)
        await exp.connect_nats()
        task = asyncio.create_task(exp.run())
        try:
            await w.publish(s, 3, per_msg=3)
            await _until(lambda: exp.exported_seq.get(s) == 3, 30, "the first message exported")
            for _ in range(12):  # one message at a time, inside the exporter's wait
                await w.publish(s, 3, per_msg=3)
                await asyncio.sleep(0.01)
            await _caught_up(exp, nc)
            assert exp.exported_seq[s] == 39
            assert exp.status()["rounds"] <= 4, exp.status()
        finally:
            exp.stopping.set()
            await task
            await nc.close()

    asyncio.run(go())


def test_verify_counts_unacknowledged_events_in_flight_not_missing(nats_srv: RunningServer,
                                                                   kafka_srv: RunningServer) -> None:
    """Events the exporter has not acknowledged yet are not owed to Kafka: with its durable consumer
    verify counts them in flight; without it (the whole of EVT owed) they are missing."""

    async def go() -> None:
        nc = await nats.connect(nats_srv.url)
        w = EvtWriter(nc.jetstream())
        await w.setup()
        s = f"IF{uuid.uuid4().hex[:4].upper()}-USDT"
        opts, prefix = _opts(nats_srv.url, kafka_srv.url)
        exp = Exporter(opts)
        await exp.connect_nats()
        task = asyncio.create_task(exp.run())
        try:
            await w.publish(s, 40)
            await _caught_up(exp, nc)
        finally:
            exp.stopping.set()
            await task
        await w.publish(s, 30)  # after the exporter stopped: never exported
        try:
            rep = await verify(nats_srv.url, kafka_srv.url, prefix, durable=opts.durable)
            assert rep["missing"] == 0 and rep["unexpected"] == 0, _short(rep)
            assert rep["in_flight"] >= 30 and rep["ack_floor"] < rep["evt_last_seq"], _short(rep)
            whole = await verify(nats_srv.url, kafka_srv.url, prefix)
            assert whole["ack_floor"] is None and whole["missing_by_stream"].get(s) == 30, _short(whole)
        finally:
            await nc.jetstream().delete_consumer("EVT", opts.durable)
            await nc.close()

    asyncio.run(go())


def test_partition_backlog_grows_then_drains(nats_srv: RunningServer, tmp_path: Path) -> None:
    async def go() -> None:
        nc = await nats.connect(nats_srv.url)
        w = EvtWriter(nc.jetstream())
        await w.setup()
        s = f"PP{uuid.uuid4().hex[:4].upper()}-USDT"
        async with proxied_broker(tmp_path) as b:
            opts, prefix = _opts(nats_srv.url, b.bootstrap)
            exp = Exporter(opts)
            await exp.connect_nats()
            task = asyncio.create_task(exp.run())
            try:
                await w.publish(s, 100)
                await _caught_up(exp, nc)
                b.proxy.partition()
                await w.publish(s, 200)
                await _until(lambda: not exp.reachable, 15, "broker seen unreachable")
                await _until(lambda: exp.backlog > 0, 10, "backlog visible")
                assert exp.status()["produce_errors"] >= 0
                b.proxy.heal()
                await _caught_up(exp, nc, 60)
                await _until(lambda: exp.reachable, 10, "reachable again")
                rep = await verify(nats_srv.url, b.bootstrap, prefix, durable=opts.durable)
                assert rep["missing"] == 0 and rep["unexpected"] == 0, _short(rep)
            finally:
                exp.stopping.set()
                await task
        await nc.close()

    asyncio.run(go())


async def _settled_after(exp: Exporter, nc: Any, t: float, timeout: float = 60) -> None:
    """Caught up, and a loss check begun after wall time ``t`` confirmed Kafka holds everything."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exp.confirmed_since(t):
            await _caught_up(exp, nc, timeout)
            if exp.confirmed_since(t):
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"exporter did not settle: {exp.status()}")


def test_broker_restart_reexports_nothing_missing(nats_srv: RunningServer, tmp_path: Path) -> None:
    """The broker restarts empty while EVT grows: exactly one re-export, nothing missing after."""

    async def go() -> None:
        nc = await nats.connect(nats_srv.url)
        w = EvtWriter(nc.jetstream())
        await w.setup()
        s = f"BB{uuid.uuid4().hex[:4].upper()}-USDT"
        async with proxied_broker(tmp_path) as b:
            opts, prefix = _opts(nats_srv.url, b.bootstrap)
            exp = Exporter(opts)
            await exp.connect_nats()
            task = asyncio.create_task(exp.run())
            try:
                await w.publish(s, 100)
                await _caught_up(exp, nc)
                await b.stop()
                await w.publish(s, 100)
                await _until(lambda: not exp.reachable, 15, "broker seen down")
                await b.start()
                up = time.time()
                await _settled_after(exp, nc, up)
                assert exp.rewinds == 1, exp.status()
                rep = await verify(nats_srv.url, b.bootstrap, prefix, durable=opts.durable)
                assert rep["missing"] == 0 and rep["unexpected"] == 0, _short(rep)
                await asyncio.sleep(opts.loss_check_every_s + 1)  # later periodic checks find nothing lost
                assert exp.rewinds == 1 and exp.loss_checks >= 2, exp.status()
            finally:
                exp.stopping.set()
                await task
        await nc.close()

    asyncio.run(go())


def test_restart_unseen_by_monitor_is_still_detected(nats_srv: RunningServer, tmp_path: Path) -> None:
    """The monitor never sees the broker down (it checks once an hour here): a produce failure or
    the periodic loss check still finds the loss before the export goes on, and EVT is re-exported."""

    async def go() -> None:
        nc = await nats.connect(nats_srv.url)
        w = EvtWriter(nc.jetstream())
        await w.setup()
        s = f"UU{uuid.uuid4().hex[:4].upper()}-USDT"
        async with proxied_broker(tmp_path) as b:
            opts, prefix = _opts(nats_srv.url, b.bootstrap, loss_check_every_s=1.0)
            opts = msgspec.structs.replace(opts, monitor_every_s=3600.0)
            exp = Exporter(opts)
            await exp.connect_nats()
            task = asyncio.create_task(exp.run())
            try:
                await _until(lambda: exp.epoch_offset is not None, 30, "epoch written")
                await w.publish(s, 20)
                await _caught_up(exp, nc)
                await b.stop()
                await b.start()
                up = time.time()
                await w.publish(s, 400)
                await _until(lambda: exp.rewinds >= 1, 60, f"loss detected {exp.status()}")
                await _settled_after(exp, nc, up)
                rep = await verify(nats_srv.url, b.bootstrap, prefix, durable=opts.durable)
                assert rep["missing"] == 0 and rep["unexpected"] == 0, _short(rep)
            finally:
                exp.stopping.set()
                await task
        await nc.close()

    asyncio.run(go())


def test_epoch_gives_away_an_emptied_broker_refilled_past_the_marks(nats_srv: RunningServer, tmp_path: Path) -> None:
    """After a restart, other records filled every partition past the offsets Kafka acked to us:
    end offsets alone look intact; the vanished epoch record still reports the loss."""

    async def go() -> None:
        from aiokafka import AIOKafkaProducer

        nc = await nats.connect(nats_srv.url)
        w = EvtWriter(nc.jetstream())
        await w.setup()
        s = f"EE{uuid.uuid4().hex[:4].upper()}-USDT"
        async with proxied_broker(tmp_path) as b:
            opts, _ = _opts(nats_srv.url, b.bootstrap)
            exp = Exporter(opts)
            await exp.connect_nats()
            task = asyncio.create_task(exp.run())
            await w.publish(s, 20)
            await _caught_up(exp, nc)
            exp.stopping.set()
            await task
            marks = dict(exp.acked_mark)
            assert marks and exp.epoch_offset is not None
            assert await exp.loss_check() is False  # intact before the restart
            await b.stop()
            await b.start()
            p = AIOKafkaProducer(bootstrap_servers=b.bootstrap, acks="all")
            await p.start()
            try:
                for (topic, part), off in marks.items():
                    for _ in range(off + 3):
                        await p.send_and_wait(topic, b"{}", partition=part)
            finally:
                await p.stop()
            ends = await exp.end_offsets()
            assert all(ends.get(k, 0) > off for k, off in marks.items()), (ends, marks)
            assert await exp.loss_check() is True
        await nc.close()

    asyncio.run(go())


def test_poison_message_is_skipped_not_fatal(nats_srv: RunningServer, kafka_srv: RunningServer) -> None:
    """An EVT message that is not a list of events is counted and skipped; the events around it
    are still exported and the exporter keeps running."""

    async def go() -> None:
        from prometheus_client import REGISTRY

        nc = await nats.connect(nats_srv.url)
        js = nc.jetstream()
        w = EvtWriter(js)
        await w.setup()
        s = f"PP{uuid.uuid4().hex[:4].upper()}-USDT"
        await w.publish(s, 20)
        before = REGISTRY.get_sample_value("exporter_undecodable_messages_total") or 0.0
        await js.publish("evt._poison", b"\x05not-events")
        await w.publish(s, 20)
        opts, _ = _opts(nats_srv.url, kafka_srv.url)
        exp = Exporter(opts)
        await exp.connect_nats()
        task = asyncio.create_task(exp.run())
        try:
            await _caught_up(exp, nc)
            assert not task.done()
            assert exp.status()["exported_seq"][s] == 40
            assert REGISTRY.get_sample_value("exporter_undecodable_messages_total") == before + 1
        finally:
            exp.stopping.set()
            await task
            await nc.close()

    asyncio.run(go())
