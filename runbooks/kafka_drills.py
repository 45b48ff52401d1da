"""Kafka export drills (seed §3.5, §4.12, §4.13).

Both drills run a broker of their own behind the project's fault proxy (``jobs.faultproxy``): a
Kafka client talks to the address the broker *advertises*, so only a broker advertising the proxy's
address sends all its traffic through the proxy. The drill's exporter (durable consumer
``exporter-drill-<name>``, topic prefix ``drill-<name>``) reads the stack's real EVT, while trading
load runs through the stack's real core. The stack's own exporter and broker are untouched.

``spotex drill network-partition``: blackhole the proxy while the exporter exports under load; the
broker must be unreachable through it while it lasts (``during_partition_broker_reachable=false``),
the exporter's backlog must grow, and after healing the backlog drains with every EVT event in
Kafka (``spotex export verify`` logic: missing = 0). Success line ``runbook_network_partition_ok=true``.

``spotex drill redpanda-broker-bounce``: SIGTERM the broker process under load and start it again on
the same port. The embedded broker keeps records in memory, so the restart empties it: the
exporter notices (end offsets below the offsets Kafka had acknowledged) and re-exports EVT from its
first message. Nothing missing downstream means: after recovery, every EVT event is in the broker's
topics again (duplicates allowed and counted; consumers dedupe on ``spotex-event-id``). Success line
``runbook_redpanda_broker_bounce_ok=true``.

Both verify only once the exporter is settled: EVT stopped growing, its backlog is 0, and a loss
check begun after the fault ended confirmed Kafka holds what it acknowledged (``confirmed_since``),
so a re-export cannot still be pending when the drill reads the topics back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runbooks.common import Drill, publish_load

__all__ = ["ProxiedBroker", "network_partition", "proxied_broker", "redpanda_broker_bounce"]


@dataclass
class ProxiedBroker:
    """A Tansu broker on ``broker_port`` that advertises ``proxy.address``; restartable."""

    broker_port: int
    proxy: Any
    log: Path
    storage: str = "memory"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return str(self.proxy.address)

    @property
    def direct(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    def spec_argv(self) -> list[str]:
        from spotex.embedded import kafka_spec

        argv = list(kafka_spec(self.broker_port, self.storage).argv)
        i = argv.index("--advertised-listener-url")
        argv[i + 1] = f"tcp://{self.proxy.address}"
        return argv

    async def start(self, timeout: float = 20.0) -> None:
        from spotex.embedded import check_kafka

        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.spec_argv(), stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"})
        deadline = time.monotonic() + timeout
        reason: str | None = "not started"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kafka broker exited with {self.proc.returncode} (log {self.log})")
            reason = await check_kafka(self.direct)
            if reason is None:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"kafka broker not healthy after {timeout}s: {reason}")

    async def stop(self, timeout: float = 2.0) -> None:
        # Tansu drains open connections on SIGTERM (it keeps acking produces on them); past a short
        # grace the process is killed so the drill's "broker down" is really down.
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            await asyncio.to_thread(p.wait, timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            await asyncio.to_thread(p.wait)


@contextlib.asynccontextmanager
async def proxied_broker(workdir: Path) -> AsyncIterator[ProxiedBroker]:
    from jobs.faultproxy import FaultProxy
    from spotex.paths import free_port

    proxy = await FaultProxy("127.0.0.1", 0, "127.0.0.1", free_port()).start()
    b = ProxiedBroker(proxy.target_port, proxy, workdir / "drill-kafka.log")
    try:
        await b.start()
        yield b
    finally:
        await b.stop()
        await proxy.stop()


def _commands(n: int, seed: int) -> list[Any]:
    from core.sim import generate

    return list(generate(seed, n))


async def _consumer_backlog(js: Any, stream: str, durable: str) -> int | None:
    try:
        info = await js.consumer_info(stream, durable)
    except Exception:
        return None
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def _kafka_fault_drill(d: Drill, name: str, fault: str, commands: int, rate: float, fault_s: float,
                             seed: int) -> bool:
    import nats

    from jobs.exporter import Exporter, ExporterOptions
    from jobs.verify_export import verify
    from spotex.embedded import check_kafka

    before = d.status("before")
    ep = d.endpoints
    tag = f"{name}-{int(time.time())}"
    prefix, durable = f"drill-{tag}", f"exporter-drill-{tag}"
    evt_stream = d.cfg.nats.evt_stream
    nc = await nats.connect(ep.nats_url)
    js = nc.jetstream()
    timeline: list[dict[str, Any]] = []
    during: dict[str, Any] = {"probes": 0, "probe_reachable": 0, "exporter_reachable": 0, "max_backlog": 0,
                              "produced_during": 0}
    t0 = time.monotonic()

    def mark(event: str, **kw: Any) -> None:
        timeline.append({"t_s": round(time.monotonic() - t0, 3), "event": event, **kw})

    verify_rep: dict[str, Any] = {}
    load_res: Any = None
    exp: Exporter | None = None
    try:
        async with proxied_broker(d.out_dir) as b:
            exp = Exporter(ExporterOptions(
                nats_url=ep.nats_url, bootstrap=b.bootstrap, evt_stream=evt_stream, durable=durable,
                topic_prefix=prefix, partitions=d.cfg.kafka.partitions, request_timeout_ms=2000,
                retry_backoff_max_ms=2000, monitor_every_s=0.5, client_id=f"spotex-drill-{name}"))
            await exp.connect_nats()
            task = asyncio.create_task(exp.run())
            mark("exporter_started", bootstrap=b.bootstrap, direct=b.direct, durable=durable, prefix=prefix)
            load = asyncio.create_task(publish_load(ep.nats_url, _commands(commands, seed), rate, tag))
            await asyncio.sleep(min(3.0, commands / rate / 3))
            mark("fault_start", fault=fault, produced=exp.produced)
            produced0 = exp.produced
            if fault == "partition":
                b.proxy.partition()
            else:
                await b.stop()
            end = time.monotonic() + fault_s
            while time.monotonic() < end:
                reason = await check_kafka(b.bootstrap)
                during["probes"] += 1
                during["probe_reachable"] += reason is None
                during["last_probe_error"] = reason
                during["exporter_reachable"] += exp.reachable
                backlog = await _consumer_backlog(js, evt_stream, durable)
                during["max_backlog"] = max(during["max_backlog"], backlog or 0)
                await asyncio.sleep(0.5)
            during["produced_during"] = exp.produced - produced0
            during["produce_errors"] = exp.errors
            during["exporter_last_error"] = exp.last_error
            mark("fault_end", **{k: during[k] for k in ("probes", "probe_reachable", "max_backlog")})
            if fault == "partition":
                b.proxy.heal()
            else:
                await b.start()
            healed_at = time.time()
            load_res = await load
            mark("load_done", sent=load_res.sent, acked=len(load_res.acked), errors=load_res.errors)
            # Caught up: EVT stopped growing (the core drained CMD), nothing pending for the exporter,
            # and a loss check begun after the fault ended found Kafka holding what it acknowledged
            # (else the re-export it triggered must have finished first): only then verify.
            deadline = time.monotonic() + 180
            last_evt, stable = -1, 0
            while time.monotonic() < deadline:
                info = await js.stream_info(evt_stream)
                confirmed = exp.confirmed_since(healed_at)
                backlog = await _consumer_backlog(js, evt_stream, durable)
                stable = stable + 1 if info.state.last_seq == last_evt else 0
                last_evt = info.state.last_seq
                if backlog == 0 and stable >= 4 and exp.reachable and confirmed:
                    break
                await asyncio.sleep(0.5)
            mark("drained", backlog=await _consumer_backlog(js, evt_stream, durable), rewinds=exp.rewinds,
                 confirmed=exp.confirmed_since(healed_at), loss_checks=exp.loss_checks)
            verify_rep = await verify(ep.nats_url, b.bootstrap, prefix, evt_stream, durable=durable)
            mark("verified", missing=verify_rep["missing"], duplicates=verify_rep["duplicates"])
            exp.stopping.set()
            await task
    finally:
        if exp is not None:
            exp.stopping.set()
        with contextlib.suppress(Exception):
            await js.delete_consumer(evt_stream, durable)
        await nc.close()
    after = d.status("after")
    observed = during["probes"] > 0 and during["probe_reachable"] == 0 and during["max_backlog"] > 0
    nothing_missing = bool(verify_rep) and verify_rep["missing"] == 0 and verify_rep["unexpected"] == 0
    trading_ok = load_res is not None and load_res.errors == 0 and len(load_res.acked) == load_res.sent
    ok = observed and nothing_missing and trading_ok
    if ok:
        action = "NONE"
    elif not observed:
        action = "INVESTIGATE_FAULT_INJECTION"  # the fault did not take: the drill proved nothing
    elif not nothing_missing:
        action = "REPLAY_EXPORT_FROM_EVT"  # re-export from the durable position / EVT start, then verify
    else:
        action = "INVESTIGATE_TRADING_PATH"
    key = name.replace("-", "_")
    probe_key = "during_partition_broker_reachable" if fault == "partition" else "during_stop_broker_reachable"
    summary = {
        f"{key}_ok": ok,
        probe_key: during["probe_reachable"] > 0,
        "recommended_action": action,
        "fault": fault, "fault_seconds": fault_s,
        "fault_observed": observed,
        "during": during,
        "nothing_missing_downstream": nothing_missing,
        "verify": verify_rep,
        "trading_unaffected": trading_ok,
        "load": {"sent": load_res.sent if load_res else 0, "acked": len(load_res.acked) if load_res else 0,
                 "errors": load_res.errors if load_res else None},
        "exporter": exp.status() if exp is not None else None,
        "timeline": timeline,
        "stack_healthy_before": before.get("healthy"), "stack_healthy_after": after.get("healthy"),
    }
    d.write(f"{name}-summary.json", summary)
    d.write(f"chaos/{name}-latest.json", summary)
    d.emit(probe_key, summary[probe_key])
    d.emit("fault_observed", observed)
    d.emit("export_backlog_max_during_fault", during["max_backlog"])
    d.emit("export_missing", verify_rep.get("missing"))
    d.emit("export_duplicates", verify_rep.get("duplicates"))
    d.emit("exporter_rewinds", exp.rewinds if exp is not None else 0)
    d.emit("exporter_loss_checks", exp.loss_checks if exp is not None else 0)
    d.emit("recommended_action", action)
    d.emit(f"runbook_{key}_ok", ok)
    allow = os.environ.get(f"RUNBOOK_ALLOW_{'NETWORK_PARTITION' if fault == 'partition' else 'REDPANDA_BOUNCE'}_FAIL")
    return ok or (allow or "").lower() == "true"


async def network_partition(d: Drill, commands: int = 2000, rate: float = 400.0, fault_s: float = 6.0,
                            seed: int = 11) -> bool:
    return await _kafka_fault_drill(d, "network-partition", "partition", commands, rate, fault_s, seed)


async def redpanda_broker_bounce(d: Drill, commands: int = 2000, rate: float = 400.0, fault_s: float = 5.0,
                                 seed: int = 12) -> bool:
    return await _kafka_fault_drill(d, "redpanda-broker-bounce", "bounce", commands, rate, fault_s, seed)
