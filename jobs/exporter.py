"""The Kafka exporter: EVT (JetStream) -> Kafka topics, at least once, deduplicable by event id.

- A durable pull consumer (default ``exporter``) on ``evt.>``; every event of a message becomes one
  Kafka record (JSON value, key = symbol, headers ``spotex-event-id``, ``spotex-stream``,
  ``spotex-seq``, ``spotex-type``, ``spotex-js-seq``). Topics and the record schema: docs/kafka.md.
- acks=all; a record that fails is retried with exponential backoff (capped) until the broker takes
  it; the JetStream message is acked only once every record made from it was acknowledged by Kafka.
  While retrying, the message is kept in progress so JetStream does not redeliver it elsewhere.
- No transactions and, unless configured, no idempotent producer (the embedded Tansu broker fails
  InitProducerId): a retry can write a record twice. Consumers dedupe on ``spotex-event-id`` and
  order by (symbol, ``spotex-seq``); ``spotex export verify`` counts missing and duplicate ids.
- A broker that lost its data (the embedded broker keeps records in memory, so a restart empties it)
  is detected by a *loss check* that runs only while nothing is in flight (the exporter is the only
  writer of its topics, so the comparison is exact): the epoch record the exporter wrote to
  ``<prefix>.exporter-epochs`` must still be there, and no partition's end offset may be at or below
  an offset Kafka acknowledged. The check is due after any produce failure, after the monitor saw
  the broker unreachable, and every ``loss_check_every_s``; while it is due nothing is produced (a
  broker that restarted empty must not be refilled with new records before the loss is seen). A
  loss makes the exporter re-export EVT from its first message (new durable consumer, new epoch),
  so nothing is missing downstream. At start, empty topics while the durable consumer has already
  acked messages count as a loss too.
- When Kafka is down trading is unaffected: the exporter only reads EVT. Its backlog grows
  (``exporter_backlog_messages``) and drains after recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import msgspec
from prometheus_client import Counter, Gauge, Histogram

from core.aio import stop_tasks
from core.bus import evt_last_seqs
from core.wire import (
    BookDelta,
    CancelAllDone,
    Event,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderRejected,
    TradeExecuted,
    decode_events,
)

__all__ = ["Exporter", "ExporterOptions", "epoch_topic", "record_for", "run", "topic_for",
           "topics"]

log = logging.getLogger("jobs.exporter")


M_PRODUCED = Counter("exporter_records_produced_total", "Records Kafka acknowledged", ["topic"])
M_ERRORS = Counter("exporter_produce_errors_total", "Records whose produce failed (each is retried)", ["error"])
M_RETRIES = Counter("exporter_retries_total", "Batches retried after a produce failure")
M_ACKED = Counter("exporter_messages_acked_total", "EVT messages acked after export")
M_UNDECODABLE = Counter("exporter_undecodable_messages_total",
                        "EVT messages that are not a list of events: logged, terminated, not exported")
M_REWINDS = Counter("exporter_rewinds_total", "Re-exports of EVT from its start after the broker lost data")
M_LOSS_CHECKS = Counter("exporter_loss_checks_total", "Checks that Kafka still holds what it acknowledged",
                        ["result"])
M_REACHABLE = Gauge("exporter_broker_reachable", "1 while the Kafka broker answers metadata requests")
M_BACKLOG = Gauge("exporter_backlog_messages", "EVT messages not yet exported (pending + unacked)")
M_LAG_MS = Gauge("exporter_lag_ms", "Age of the oldest event not yet acknowledged by Kafka (0 when idle)")
M_LAG_SEQ = Gauge("exporter_lag_seq", "Per stream: engine's last seq minus the last exported seq", ["stream"])
M_EXPORTED_SEQ = Gauge("exporter_exported_seq", "Last seq exported per stream", ["stream"])
M_BATCH_S = Histogram("exporter_batch_seconds", "One fetched batch from fetch to JetStream ack",
                      buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30))

_ORDER_EVENTS = (OrderAccepted, OrderRejected, OrderCanceled, OrderAmended, CancelAllDone)
_json = msgspec.json.Encoder()


class ExporterOptions(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    bootstrap: str
    evt_stream: str = "EVT"
    subject_prefix: str = "evt"
    durable: str = "exporter"
    topic_prefix: str = "spotex"
    acks: str = "all"
    enable_idempotence: bool = False
    partitions: int = 3
    fetch_batch: int = 256
    # After a fetch that did not fill fetch_batch, wait this long before the next one, so a round
    # (fetch, produce, acks) carries several EVT messages instead of one: each round costs the
    # exporter and the broker ~1.5 ms of CPU whatever it carries. 0: fetch again at once.
    batch_wait_ms: int = 50
    ack_wait_s: float = 30.0
    request_timeout_ms: int = 5_000
    retry_backoff_min_ms: int = 200
    retry_backoff_max_ms: int = 5_000
    monitor_every_s: float = 1.0
    loss_check_every_s: float = 5.0
    linger_ms: int = 5
    rewind_on_broker_loss: bool = True
    client_id: str = "spotex-exporter"


def topics(prefix: str) -> list[str]:
    return [f"{prefix}.trades", f"{prefix}.orders", f"{prefix}.book", f"{prefix}.events"]


def epoch_topic(prefix: str) -> str:
    """One partition; a record per exporter (re)start or re-export, written only by exporters."""
    return f"{prefix}.exporter-epochs"


def topic_for(evt: Event, prefix: str) -> str:
    if isinstance(evt, TradeExecuted):
        return f"{prefix}.trades"
    if isinstance(evt, _ORDER_EVENTS):
        return f"{prefix}.orders"
    if isinstance(evt, BookDelta):
        return f"{prefix}.book"
    return f"{prefix}.events"


def record_for(evt: Event, prefix: str, js_seq: int) -> tuple[str, bytes, bytes, list[tuple[str, bytes]]]:
    """(topic, key, JSON value, headers) of one event. The value is the event as JSON with its
    type tag ``t``, exactly the wire struct (integers for money, no floats)."""
    headers = [
        ("spotex-event-id", evt.event_id.encode()),
        ("spotex-stream", evt.symbol.encode()),
        ("spotex-seq", str(evt.seq).encode()),
        ("spotex-type", type(evt).__name__.encode()),
        ("spotex-js-seq", str(js_seq).encode()),
    ]
    return topic_for(evt, prefix), evt.symbol.encode(), _json.encode(evt), headers


class _Pending:
    """One fetched EVT message and the records made from it that Kafka has not acknowledged yet."""

    __slots__ = ("last_seq", "msg", "oldest_ms", "records", "stream")

    def __init__(self, msg: Any, records: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]],
                 oldest_ms: int, stream: str, last_seq: int) -> None:
        self.msg = msg
        self.records = records
        self.oldest_ms = oldest_ms
        self.stream = stream
        self.last_seq = last_seq


class Exporter:
    def __init__(self, opts: ExporterOptions) -> None:
        self.opts = opts
        self.nc: Any = None
        self.js: Any = None
        self.psub: Any = None
        self.producer: Any = None
        self.stopping = asyncio.Event()
        self.reachable = False
        self.reachable_since: float | None = None
        self.last_error: str | None = None
        self.produced = 0
        self.errors = 0
        self.acked_msgs = 0
        self.rounds = 0  # fetched batches exported (each: fetch, produce, acks)
        self.rewinds = 0
        self.backlog = 0
        self.lag_ms = 0
        self.lag_seq: dict[str, int] = {}
        self.exported_seq: dict[str, int] = {}
        # (topic, partition) -> offset of the first record Kafka acked in the latest produce round that
        # wrote to it. Not the highest offset: the embedded broker reports a partition's end offset as
        # the last *batch's* base offset + 1, so only a round's first offset is sure to lie below it.
        self.acked_mark: dict[tuple[str, int], int] = {}
        self.epoch_offset: int | None = None  # offset of our record in the epoch topic's partition 0
        self.loss_checks = 0
        self.last_loss_check_at: float | None = None  # wall time of the last check that found no loss
        self._rewind_needed = False
        # (topic, key) -> the partition aiokafka's default partitioner gives the key, for the life of
        # one producer (a new producer reads the topics' partitions again).
        self._partition_of: dict[tuple[str, bytes], int] = {}
        # A loss check is due: nothing is produced until it decided (set on a produce failure, when
        # the monitor sees the broker unreachable, and periodically).
        self._loss_check_due = True
        self._next_loss_check = 0.0
        self._oldest_unacked_ms: int | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------------------------------------
    # connections

    async def connect_nats(self) -> None:
        import nats

        self.nc = await nats.connect(self.opts.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        self.js = self.nc.jetstream()
        await self._bind(rewind=False)

    async def _bind(self, *, rewind: bool) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        if self.psub is not None:
            with contextlib.suppress(Exception):
                await self.psub.unsubscribe()
            self.psub = None
        if rewind:
            with contextlib.suppress(NotFoundError):
                await self.js.delete_consumer(self.opts.evt_stream, self.opts.durable)
        try:
            await self.js.consumer_info(self.opts.evt_stream, self.opts.durable)
        except NotFoundError:
            cfg = ConsumerConfig(
                durable_name=self.opts.durable, filter_subject=f"{self.opts.subject_prefix}.>",
                ack_policy=AckPolicy.EXPLICIT, ack_wait=self.opts.ack_wait_s, max_deliver=-1,
                max_ack_pending=max(1024, self.opts.fetch_batch * 4), deliver_policy=DeliverPolicy.ALL)
            await self.js.add_consumer(self.opts.evt_stream, cfg)
        self.psub = await self.js.pull_subscribe_bind(self.opts.durable, stream=self.opts.evt_stream)

    def _new_producer(self) -> Any:
        from aiokafka import AIOKafkaProducer

        acks: Any = "all" if self.opts.acks == "all" else int(self.opts.acks)
        return AIOKafkaProducer(
            bootstrap_servers=self.opts.bootstrap, client_id=self.opts.client_id, acks=acks,
            enable_idempotence=self.opts.enable_idempotence, request_timeout_ms=self.opts.request_timeout_ms,
            linger_ms=self.opts.linger_ms, retry_backoff_ms=self.opts.retry_backoff_min_ms,
            metadata_max_age_ms=5_000, max_batch_size=256 * 1024)

    async def _ensure_producer(self) -> Any:
        """A started producer; retries with backoff while the broker is unreachable."""
        delay = self.opts.retry_backoff_min_ms / 1000
        while self.producer is None and not self.stopping.is_set():
            p = self._new_producer()
            try:
                await asyncio.wait_for(p.start(), self.opts.request_timeout_ms / 1000 + 1)
                await self._ensure_topics()
                self.producer = p
                log.info("producer started", extra={"bootstrap": self.opts.bootstrap})
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await p.stop()
                self._note_error(exc)
                await self._sleep(delay)
                delay = min(delay * 2, self.opts.retry_backoff_max_ms / 1000)
        return self.producer

    async def _ensure_topics(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.opts.bootstrap,
                                    request_timeout_ms=self.opts.request_timeout_ms)
        try:
            await asyncio.wait_for(admin.start(), self.opts.request_timeout_ms / 1000)
            existing = set(await admin.list_topics())
            want = {t: self.opts.partitions for t in topics(self.opts.topic_prefix)}
            want[epoch_topic(self.opts.topic_prefix)] = 1
            missing = [NewTopic(t, n, 1) for t, n in want.items() if t not in existing]
            if missing:
                with contextlib.suppress(Exception):  # created concurrently by another exporter
                    await admin.create_topics(missing)
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    async def _reset_producer(self) -> None:
        p, self.producer = self.producer, None
        self._partition_of.clear()
        if p is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.stop(), 5)

    def _note_error(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]

    async def _sleep(self, s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), s)

    # ------------------------------------------------------------------------------------------
    # export

    def _prepare(self, msg: Any) -> _Pending:
        evs = decode_events(msg.data)
        js_seq = int(msg.metadata.sequence.stream)
        recs = [record_for(e, self.opts.topic_prefix, js_seq) for e in evs]
        stream = evs[0].symbol if evs else msg.subject[len(self.opts.subject_prefix) + 1:]
        oldest = min((e.occurred_at for e in evs), default=int(time.time() * 1000))
        return _Pending(msg, recs, oldest, stream, evs[-1].seq if evs else 0)

    async def _by_partition(self, producer: Any, pend: list[_Pending]
                            ) -> dict[tuple[str, int], list[tuple[_Pending, int]]]:
        """The records still to send, as (pending, index) per (topic, partition), in EVT order."""
        out: dict[tuple[str, int], list[tuple[_Pending, int]]] = {}
        cache = self._partition_of
        for p in pend:
            for i, (topic, key, _, _) in enumerate(p.records):
                part = cache.get((topic, key))
                if part is None:
                    from aiokafka.partitioner import DefaultPartitioner

                    parts = sorted(await producer.partitions_for(topic))
                    part = cache[(topic, key)] = DefaultPartitioner()(key, parts, parts)
                out.setdefault((topic, part), []).append((p, i))
        return out

    async def export_batch(self, msgs: Sequence[Any]) -> None:
        """Produce every record of ``msgs``; ack each message once all its records are acknowledged."""
        t0 = time.perf_counter()
        self.rounds += 1
        pend: list[_Pending] = []
        for m in msgs:
            try:
                pend.append(self._prepare(m))
            except msgspec.DecodeError as exc:
                # A poison message must not stop the export of everything behind it: it is not an
                # event, so there is nothing to export; it is counted, logged and not redelivered.
                M_UNDECODABLE.inc()
                log.error("undecodable EVT message skipped", extra={
                    "subject": m.subject, "stream_seq": int(m.metadata.sequence.stream), "error": str(exc)})
                await m.term()
        self._oldest_unacked_ms = min((p.oldest_ms for p in pend), default=None)
        delay = self.opts.retry_backoff_min_ms / 1000
        attempt = 0
        while True:
            producer = await self._ensure_producer()
            if producer is None:  # stopping
                return
            # One record batch per (topic, partition) instead of one send per record: aiokafka's
            # per-record path runs its pure-Python murmur2 partitioner, a size estimate, a coroutine
            # and a future for every record. Partitions are those the default partitioner picks for
            # the key (the symbol), so the layout of the topics is what it always was.
            sent: list[tuple[str, list[tuple[_Pending, int]], Any]] = []
            try:
                for (topic, part), members in (await self._by_partition(producer, pend)).items():
                    batch = producer.create_batch()
                    held: list[tuple[_Pending, int]] = []
                    for p, i in members:
                        _, key, value, headers = p.records[i]
                        if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                            sent.append((topic, held, await producer.send_batch(batch, topic, partition=part)))
                            batch, held = producer.create_batch(), []
                            batch.append(timestamp=None, key=key, value=value, headers=headers)  # always fits
                        held.append((p, i))
                    sent.append((topic, held, await producer.send_batch(batch, topic, partition=part)))
            except Exception as exc:
                self._note_error(exc)
                M_ERRORS.labels(type(exc).__name__).inc()
                self.errors += 1
            results = await asyncio.gather(*(f for _, _, f in sent), return_exceptions=True)
            done: dict[int, set[int]] = {}
            first: dict[tuple[str, int], int] = {}
            for (topic, held, _), res in zip(sent, results, strict=True):
                if isinstance(res, BaseException):
                    self._note_error(res)
                    M_ERRORS.labels(type(res).__name__).inc(len(held))
                    self.errors += len(held)
                    continue
                for p, i in held:
                    done.setdefault(id(p), set()).add(i)
                M_PRODUCED.labels(topic).inc(len(held))
                self.produced += len(held)
                tp = (topic, int(res.partition))
                # res.offset is the batch's base offset: its first record's.
                first[tp] = min(first.get(tp, int(res.offset)), int(res.offset))
            self.acked_mark.update(first)
            still: list[_Pending] = []
            for p in pend:
                ok = done.get(id(p), set())
                if ok:
                    p.records = [r for i, r in enumerate(p.records) if i not in ok]
                if p.records:
                    still.append(p)
                    continue
                await p.msg.ack()
                M_ACKED.inc()
                self.acked_msgs += 1
                self.exported_seq[p.stream] = max(self.exported_seq.get(p.stream, 0), p.last_seq)
                M_EXPORTED_SEQ.labels(p.stream).set(self.exported_seq[p.stream])
            pend = still
            if not pend:
                break
            # Part of the batch failed: keep the messages ours, back off, retry what is left. The
            # broker may have restarted empty meanwhile (records it acknowledged are gone): nothing
            # is sent again before the loss check decided; on a loss the batch is abandoned
            # unacked and the re-export from EVT's start covers it.
            attempt += 1
            M_RETRIES.inc()
            self._loss_check_due = True
            for p in pend:
                with contextlib.suppress(Exception):
                    await p.msg.in_progress()
            self._oldest_unacked_ms = min(p.oldest_ms for p in pend)
            log.warning("produce failed, retrying", extra={"attempt": attempt, "records_left": sum(
                len(p.records) for p in pend), "error": self.last_error, "backoff_s": round(delay, 3)})
            if attempt % 5 == 0:  # a producer stuck on a dead connection: start a fresh one
                await self._reset_producer()
            await self._sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.opts.retry_backoff_max_ms / 1000)
            if self.stopping.is_set():
                return
            while self._loss_check_due and not self.stopping.is_set():
                lost = await self.loss_check()
                if lost is None:  # cannot tell yet: the broker does not answer
                    for p in pend:
                        with contextlib.suppress(Exception):
                            await p.msg.in_progress()
                    await self._sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, self.opts.retry_backoff_max_ms / 1000)
                elif lost and self.opts.rewind_on_broker_loss:
                    self._rewind_needed = True
                    self._oldest_unacked_ms = None
                    return
        self._oldest_unacked_ms = None
        M_BATCH_S.observe(time.perf_counter() - t0)

    async def run(self) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        if self.nc is None:
            await self.connect_nats()
        self._tasks.append(asyncio.create_task(self._monitor(), name="exporter-monitor"))
        try:
            await self._ensure_producer()
            if self.opts.rewind_on_broker_loss and await self._startup_lost():
                await self._rewind()
            else:
                await self._new_epoch()
            while not self.stopping.is_set():
                if self._rewind_needed:
                    await self._rewind()
                    continue
                if time.monotonic() >= self._next_loss_check:
                    self._loss_check_due = True
                if self._loss_check_due:
                    lost = await self.loss_check()
                    if lost is None:
                        await self._sleep(self.opts.retry_backoff_min_ms / 1000)
                        continue
                    if lost and self.opts.rewind_on_broker_loss:
                        self._rewind_needed = True
                        continue
                try:
                    msgs = await self.psub.fetch(self.opts.fetch_batch, timeout=1.0)
                except (NatsTimeout, TimeoutError):
                    continue
                except Exception as exc:
                    self._note_error(exc)
                    log.warning("fetch failed", extra={"error": self.last_error})
                    await self._sleep(0.5)
                    with contextlib.suppress(Exception):
                        await self._bind(rewind=False)
                    continue
                await self.export_batch(msgs)
                if self.opts.batch_wait_ms > 0 and len(msgs) < self.opts.fetch_batch:
                    await self._sleep(self.opts.batch_wait_ms / 1000)
        finally:
            await self.close()

    async def close(self) -> None:
        self.stopping.set()
        await stop_tasks(self._tasks)
        self._tasks.clear()
        await self._reset_producer()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None

    # ------------------------------------------------------------------------------------------
    # broker health, lag and data-loss detection

    async def broker_check(self) -> str | None:
        from aiokafka.admin import AIOKafkaAdminClient

        timeout = min(3.0, self.opts.request_timeout_ms / 1000)
        client = AIOKafkaAdminClient(bootstrap_servers=self.opts.bootstrap, request_timeout_ms=int(timeout * 1000))
        try:
            await asyncio.wait_for(client.start(), timeout)
            await asyncio.wait_for(client.describe_cluster(), timeout)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}".strip()
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        return None

    async def end_offsets(self) -> dict[tuple[str, int], int]:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        c = AIOKafkaConsumer(bootstrap_servers=self.opts.bootstrap, enable_auto_commit=False,
                             request_timeout_ms=self.opts.request_timeout_ms)
        try:
            await asyncio.wait_for(c.start(), self.opts.request_timeout_ms / 1000)
            present = await asyncio.wait_for(c.topics(), self.opts.request_timeout_ms / 1000)  # fresh metadata
            tps = []
            for t in [*topics(self.opts.topic_prefix), epoch_topic(self.opts.topic_prefix)]:
                if t not in present:
                    continue
                for part in c.partitions_for_topic(t) or set():
                    tps.append(TopicPartition(t, part))
            if not tps:
                return {}
            ends = await asyncio.wait_for(c.end_offsets(tps), self.opts.request_timeout_ms / 1000)
            return {(tp.topic, tp.partition): int(o) for tp, o in ends.items()}
        finally:
            with contextlib.suppress(Exception):
                await c.stop()

    async def _startup_lost(self) -> bool:
        """At start (no epoch of ours yet): the durable consumer already acked messages but every
        export topic is empty or gone, so the broker lost what this exporter had written."""
        while not self.stopping.is_set():
            try:
                ends = await self.end_offsets()
                info = await self.js.consumer_info(self.opts.evt_stream, self.opts.durable)
                break
            except Exception as exc:
                self._note_error(exc)
                await self._sleep(self.opts.retry_backoff_min_ms / 1000)
        else:
            return False
        acked = int(info.ack_floor.stream_seq or 0)
        data = sum(o for (t, _), o in ends.items() if t != epoch_topic(self.opts.topic_prefix))
        lost = acked > 0 and data == 0
        if lost:
            log.warning("export topics empty but EVT messages were already exported: re-exporting EVT",
                        extra={"acked_stream_seq": acked})
        return lost

    async def loss_check(self) -> bool | None:
        """Does Kafka still hold every record it acknowledged to us? True: data was lost; False:
        intact (the check is no longer due); None: the broker cannot tell now (still due).

        Called only while nothing of ours is in flight, so the end offsets cannot move under the
        comparison: our epoch record (the exact signal of a broker that restarted empty) must still
        be there, and every partition must end past ``acked_mark`` (a partition emptied or
        truncated). A missing topic or partition counts as lost.
        """
        started = time.time()
        try:
            ends = await self.end_offsets()
        except Exception as exc:
            self._note_error(exc)
            M_LOSS_CHECKS.labels("undecided").inc()
            return None
        etp = (epoch_topic(self.opts.topic_prefix), 0)
        gone = {k: off for k, off in self.acked_mark.items() if ends.get(k, 0) <= off}
        if self.epoch_offset is not None and ends.get(etp, 0) <= self.epoch_offset:
            gone[etp] = self.epoch_offset
        self.loss_checks += 1
        self._loss_check_due = False
        self._next_loss_check = time.monotonic() + self.opts.loss_check_every_s
        if gone:
            M_LOSS_CHECKS.labels("lost").inc()
            detail = {f"{t}/{p}": {"end": ends.get((t, p), 0), "acked": o} for (t, p), o in gone.items()}
            log.warning("broker lost exported records%s: %s", ": re-exporting EVT from its start"
                        if self.opts.rewind_on_broker_loss else "", detail, extra={"lost": detail})
            if not self.opts.rewind_on_broker_loss:
                # Nothing to do but say it; do not report the same loss again.
                self.acked_mark = {k: v for k, v in self.acked_mark.items() if k not in gone}
                if etp in gone:
                    self.epoch_offset = None
            return True
        M_LOSS_CHECKS.labels("intact").inc()
        self.last_loss_check_at = started
        return False

    async def _new_epoch(self) -> None:
        """Write our epoch record (partition 0 of the epoch topic) and remember its offset; the
        record vanishing is how a broker that restarted empty is recognised."""
        delay = self.opts.retry_backoff_min_ms / 1000
        body = _json.encode({"durable": self.opts.durable, "client_id": self.opts.client_id,
                             "at_ms": int(time.time() * 1000), "rewinds": self.rewinds})
        while not self.stopping.is_set():
            producer = await self._ensure_producer()
            if producer is None:
                return
            started = time.time()
            try:
                md = await producer.send_and_wait(epoch_topic(self.opts.topic_prefix), body,
                                                  key=self.opts.durable.encode(), partition=0)
            except Exception as exc:
                self._note_error(exc)
                await self._sleep(delay)
                delay = min(delay * 2, self.opts.retry_backoff_max_ms / 1000)
                continue
            self.epoch_offset = int(md.offset)
            self._loss_check_due = False
            self._next_loss_check = time.monotonic() + self.opts.loss_check_every_s
            self.last_loss_check_at = started
            return

    async def _rewind(self) -> None:
        """Re-export EVT from its first message: a new durable consumer (the old one and whatever
        it had delivered and not acked are dropped) and a new epoch on the broker as it is now."""
        self._rewind_needed = False
        self.acked_mark.clear()
        self.epoch_offset = None
        self.rewinds += 1
        M_REWINDS.inc()
        await self._reset_producer()
        while not self.stopping.is_set():
            try:
                await self._bind(rewind=True)
                break
            except Exception as exc:
                self._note_error(exc)
                await self._sleep(self.opts.retry_backoff_min_ms / 1000)
        await self._new_epoch()
        log.warning("re-export of EVT from its start begun", extra={"rewinds": self.rewinds})

    async def _monitor(self) -> None:
        while not self.stopping.is_set():
            reason = await self.broker_check()
            up = reason is None
            if not up:
                self._note_error(RuntimeError(reason))
                # The broker may come back empty: check before producing anything more.
                self._loss_check_due = True
            if up and not self.reachable:
                self.reachable_since = time.time()
            self.reachable = up
            M_REACHABLE.set(1 if up else 0)
            await self._update_lag()
            await self._sleep(self.opts.monitor_every_s)

    async def _update_lag(self) -> None:
        try:
            info = await self.js.consumer_info(self.opts.evt_stream, self.opts.durable)
            self.backlog = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            M_BACKLOG.set(self.backlog)
            ends = await evt_last_seqs(self.js, self.opts.evt_stream, self.opts.subject_prefix)
            for s, last in ends.items():
                # Idle and caught up: whatever is not in exported_seq was exported before a restart.
                done = self.exported_seq.get(s, last if self.backlog == 0 else 0)
                self.lag_seq[s] = max(0, last - done)
                M_LAG_SEQ.labels(s).set(self.lag_seq[s])
        except Exception as exc:
            log.debug("lag update failed", extra={"error": str(exc)})
        oldest = self._oldest_unacked_ms
        self.lag_ms = max(0, int(time.time() * 1000) - oldest) if oldest is not None else 0
        M_LAG_MS.set(self.lag_ms)

    def confirmed_since(self, t: float) -> bool:
        """True once a loss check that started after wall time ``t`` found Kafka intact (or a
        re-export begun after ``t`` wrote a new epoch), with no re-export or check pending: from
        then on, a caught-up backlog means everything up to here is in Kafka."""
        return not self._rewind_needed and not self._loss_check_due and (self.last_loss_check_at or 0.0) > t

    def status(self) -> dict[str, Any]:
        return {
            "durable": self.opts.durable, "bootstrap": self.opts.bootstrap,
            "broker_reachable": self.reachable, "produced": self.produced, "produce_errors": self.errors,
            "acked_messages": self.acked_msgs, "rounds": self.rounds, "backlog_messages": self.backlog,
            "lag_ms": self.lag_ms,
            "lag_seq": dict(self.lag_seq), "exported_seq": dict(self.exported_seq), "rewinds": self.rewinds,
            "rewind_pending": self._rewind_needed, "loss_check_due": self._loss_check_due,
            "loss_checks": self.loss_checks, "last_loss_check_at": self.last_loss_check_at,
            "epoch_offset": self.epoch_offset,
            "last_error": self.last_error, "topics": topics(self.opts.topic_prefix),
        }


def options_from_config(ctx: Any, **over: Any) -> ExporterOptions:
    cfg = ctx.cfg
    k = cfg.kafka
    base: dict[str, Any] = dict(
        nats_url=ctx.endpoints.nats_url, bootstrap=ctx.endpoints.kafka_bootstrap, evt_stream=cfg.nats.evt_stream,
        durable=k.exporter_durable, topic_prefix=k.topic_prefix, acks=k.acks,
        enable_idempotence=k.enable_idempotence, partitions=k.partitions, fetch_batch=k.exporter_fetch_batch,
        batch_wait_ms=k.exporter_batch_wait_ms,
        request_timeout_ms=k.request_timeout_ms, retry_backoff_max_ms=k.retry_backoff_max_ms,
        rewind_on_broker_loss=k.rewind_on_broker_loss)
    base.update(over)
    return ExporterOptions(**base)


async def run(ctx: Any) -> None:
    """The ``exporter`` service (``spotex serve exporter``)."""
    import signal

    from core.obs import ProbeServer

    exp = Exporter(options_from_config(ctx))

    async def ready() -> str | None:
        # Ready means EVT is being consumed; a down broker is reported (not a reason to restart).
        return None if exp.psub is not None else "not bound to EVT"

    async def status() -> dict[str, Any]:
        return exp.status()

    probe = ProbeServer("127.0.0.1", ctx.probe_port, service=ctx.name, readiness=[("evt", ready)],
                        extra_routes={"/status": status})
    await probe.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, exp.stopping.set)
    try:
        await exp.run()
    finally:
        with contextlib.suppress(Exception):
            await probe.stop()
