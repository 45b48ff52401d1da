"""The exporter against the real nats-server and Tansu broker, faults through the fault proxy."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest

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
            rep = await verify(nats_srv.url, kafka_srv.url, prefix)
            assert rep["missing"] == 0 and rep["unexpected"] == 0, rep
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
                rep = await verify(nats_srv.url, b.bootstrap, prefix)
                assert rep["missing"] == 0 and rep["unexpected"] == 0, rep
            finally:
                exp.stopping.set()
                await task
        await nc.close()

    asyncio.run(go())


@pytest.mark.skip(reason="OPEN (issue 7): flaky — after a broker restart the exporter can detect the loss twice and "
                         "the check runs while the second re-export is pending (same bug as the failing "
                         "redpanda-broker-bounce drill; see docs/kafka.md)")
def test_broker_restart_reexports_nothing_missing(nats_srv: RunningServer, tmp_path: Path) -> None:
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
                await _until(lambda: exp.rewinds >= 1, 30, f"re-export after restart {exp.status()}")
                await _caught_up(exp, nc, 60)
                rep = await verify(nats_srv.url, b.bootstrap, prefix)
                assert rep["missing"] == 0 and rep["unexpected"] == 0, rep
            finally:
                exp.stopping.set()
                await task
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
