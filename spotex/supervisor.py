"""The supervisor behind ``spotex up``: the one place that starts components.

Order: nats-server (JetStream) -> PostgreSQL -> Kafka-compatible broker -> the spotex services.
Each step waits for a health check with a timeout and fails with one line naming what failed.
Stop (Ctrl-C, SIGTERM, ``spotex down``) goes in reverse order and leaves no process behind:
children get SIGTERM, then SIGKILL after a grace period, and are started with a parent-death
signal so even a SIGKILLed supervisor does not leave orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotex.config import Config
from spotex.embedded import (
    ProcSpec,
    check_http,
    check_kafka,
    check_nats,
    check_postgres,
    ensure_database,
    kafka_spec,
    nats_spec,
    postgres_prepare,
    postgres_spec,
)
from spotex.paths import DataDir, free_port, port_in_use

__all__ = ["Endpoints", "StartupError", "Supervisor", "allocate_ports", "pid_alive", "resolve_endpoints"]

log = logging.getLogger("spotex.supervisor")


class StartupError(Exception):
    """A component failed to start; str() is the one line shown to the operator."""


@dataclass(frozen=True)
class Endpoints:
    nats_url: str
    nats_monitor: str | None
    pg_dsn: str
    pg_admin_dsn: str
    kafka_bootstrap: str
    service_ports: dict[str, int]

    def probe_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.service_ports[service]}"


def _pick(ports: dict[str, int], key: str, configured: int) -> int:
    if configured:
        return configured
    recorded = ports.get(key)
    if recorded and not port_in_use(recorded):
        return recorded
    return free_port()


def allocate_ports(cfg: Config, data: DataDir, services: list[str]) -> dict[str, int]:
    """Ports for every embedded server and service: configured ones as given, others free ones,
    reusing what an earlier run on this data dir recorded so endpoints stay stable."""
    recorded = data.read_ports()
    ports: dict[str, int] = {}
    configured: dict[str, int] = {}
    if cfg.nats.url is None:
        configured["nats"] = cfg.nats.port
        configured["nats_monitor"] = cfg.nats.monitor_port
    if cfg.postgres.dsn is None:
        configured["postgres"] = cfg.postgres.port
    if cfg.kafka.bootstrap is None:
        configured["kafka"] = cfg.kafka.port
    for svc in services:
        configured[svc] = cfg.edge.port if svc == "edge" else 0
    for key, conf in configured.items():
        if conf and port_in_use(conf):
            raise StartupError(f"{key}: port {conf} on 127.0.0.1 is already in use (set in config)")
        port = _pick(recorded, key, conf)
        while port in ports.values():
            port = free_port()
        ports[key] = port
    data.write_ports({**recorded, **ports})
    return ports


def resolve_endpoints(cfg: Config, data: DataDir) -> Endpoints:
    ports = data.read_ports()
    nats_url = cfg.nats.url or f"nats://127.0.0.1:{ports.get('nats', 4222)}"
    monitor = None if cfg.nats.url else f"http://127.0.0.1:{ports.get('nats_monitor', 8222)}"
    if cfg.postgres.dsn:
        dsn = cfg.postgres.dsn
        admin = dsn
    else:
        base = f"postgresql://postgres@127.0.0.1:{ports.get('postgres', 5432)}"
        dsn = f"{base}/{cfg.postgres.database}"
        admin = f"{base}/postgres"
    kafka = cfg.kafka.bootstrap or f"127.0.0.1:{ports.get('kafka', 9092)}"
    reserved = {"nats", "nats_monitor", "postgres", "kafka"}
    return Endpoints(nats_url, monitor, dsn, admin, kafka, {k: v for k, v in ports.items() if k not in reserved})


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def _set_pdeathsig() -> None:
    # Runs in the child between fork and exec (after any setuid): die with the supervisor.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


HealthCheck = Callable[[], Awaitable[str | None]]


@dataclass
class Component:
    name: str
    kind: str  # "infra" | "service"
    endpoint: str
    health: HealthCheck
    spec: ProcSpec | None = None  # None: external, we only watch it
    start_timeout_s: float = 30.0
    stop_signal: int = signal.SIGTERM
    prepare: Callable[[], Awaitable[None]] | None = None
    after_start: Callable[[], Awaitable[None]] | None = None
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    log_path: Path | None = None
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def external(self) -> bool:
        return self.spec is None


class Supervisor:
    def __init__(self, cfg: Config, data: DataDir, *, demo: bool = True, services: list[Any] | None = None,
                 restart_children: bool = True) -> None:
        from spotex.services import enabled_services

        self.cfg = cfg
        self.data = data.ensure()
        self.demo = demo
        self.service_specs = services if services is not None else enabled_services(cfg, demo=demo)
        self.restart_children = restart_children
        self.components: list[Component] = []
        self.phase = "init"
        self.error: str | None = None
        self._stopping = False
        self._lock_fd: int | None = None
        self.endpoints: Endpoints | None = None

    # -- locking and state -------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        fd = os.open(self.data.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            state = self.data.read_state() or {}
            raise StartupError(
                f"a stack is already running on {self.data.root} (supervisor pid {state.get('supervisor_pid', '?')})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_state(self) -> None:
        comps = {}
        for c in self.components:
            comps[c.name] = {
                "kind": c.kind,
                "endpoint": c.endpoint,
                "external": c.external,
                "pid": c.proc.pid if c.proc is not None and c.proc.returncode is None else None,
                "restarts": c.restarts,
                "log": str(c.log_path) if c.log_path else None,
            }
        self.data.write_state(
            {
                "supervisor_pid": os.getpid(),
                "phase": self.phase,
                "error": self.error,
                "updated_at": int(time.time() * 1000),
                "env": self.cfg.env,
                "demo": self.demo,
                "order": [c.name for c in self.components],
                "components": comps,
            }
        )

    # -- plan --------------------------------------------------------------------------------
    def plan(self) -> list[Component]:
        cfg, data = self.cfg, self.data
        ports = allocate_ports(cfg, data, [s.name for s in self.service_specs])
        ep = self.endpoints = resolve_endpoints(cfg, data)
        comps: list[Component] = []

        async def nats_health() -> str | None:
            return await check_nats(ep.nats_url, ep.nats_monitor)

        async def setup_streams() -> None:
            import nats

            from core.bus import ensure_streams

            nc = await nats.connect(ep.nats_url, connect_timeout=5, max_reconnect_attempts=3)
            try:
                await ensure_streams(
                    nc.jetstream(),
                    cmd_stream=cfg.nats.cmd_stream,
                    evt_stream=cfg.nats.evt_stream,
                    duplicate_window_s=cfg.nats.duplicate_window_s,
                    lease_ttl_s=cfg.core.lease_ttl_ms / 1000,
                    cmd_persist=cfg.nats.cmd_persist,
                )
            finally:
                await nc.close()

        if cfg.nats.url is None:
            spec, _ = nats_spec(data.nats, ports["nats"], ports["nats_monitor"], cfg.nats.sync_interval)
            comps.append(Component("nats", "infra", ep.nats_url, nats_health, spec, 15.0, after_start=setup_streams))
        else:
            comps.append(Component("nats", "infra", ep.nats_url, nats_health, None, 15.0, after_start=setup_streams))

        async def pg_health() -> str | None:
            return await check_postgres(ep.pg_admin_dsn)

        async def pg_setup() -> None:
            if cfg.postgres.dsn is None:
                await ensure_database(ep.pg_admin_dsn, cfg.postgres.database)
            from ledger.migrate import migrate

            await migrate(ep.pg_dsn)

        if cfg.postgres.dsn is None:
            pgdata = data.postgres
            holder: dict[str, Any] = {}

            async def pg_prepare() -> None:
                run_as = await asyncio.to_thread(postgres_prepare, pgdata)
                pg = postgres_spec(pgdata, ports["postgres"], run_as)
                holder["c"].spec.argv[:] = pg.argv
                holder["c"].spec.user = pg.user

            comp = Component("postgres", "infra", _mask_dsn(ep.pg_dsn), pg_health, ProcSpec([]), 60.0,
                             stop_signal=signal.SIGINT, prepare=pg_prepare, after_start=pg_setup)
            holder["c"] = comp
            comps.append(comp)
        else:
            comps.append(Component("postgres", "infra", _mask_dsn(ep.pg_dsn), pg_health, None, 15.0,
                                   after_start=pg_setup))

        async def kafka_health() -> str | None:
            return await check_kafka(ep.kafka_bootstrap)

        kspec = kafka_spec(ports["kafka"], cfg.kafka.storage) if cfg.kafka.bootstrap is None else None
        comps.append(Component("kafka", "infra", ep.kafka_bootstrap, kafka_health, kspec, 15.0))

        for svc in self.service_specs:
            url = ep.probe_url(svc.name)

            def make_health(u: str) -> HealthCheck:
                async def h() -> str | None:
                    return await check_http(f"{u}/readyz")

                return h

            argv = [sys.executable, "-m", "spotex", "serve", svc.name, "--data-dir", str(data.root)]
            env = {"SPOTEX_PROBE_PORT": str(ports[svc.name])}
            comps.append(Component(svc.name, "service", url, make_health(url), ProcSpec(argv, env=env),
                                   svc.start_timeout_s))
        self.components = comps
        return comps

    # -- process control ---------------------------------------------------------------------
    async def _spawn(self, c: Component) -> None:
        assert c.spec is not None
        c.log_path = self.data.logs / f"{c.name}.log"
        logf = open(c.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        env = {**os.environ, **c.spec.env}
        env.setdefault("SPOTEX_DATA_DIR", str(self.data.root))
        nice = self.cfg.processes.nice.get(c.name, 0)

        def preexec() -> None:  # in the child, between fork and exec
            _set_pdeathsig()
            if nice:
                os.nice(nice)
        try:
            c.proc = await asyncio.create_subprocess_exec(
                *c.spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=c.spec.cwd,
                user=c.spec.user,
                preexec_fn=preexec,
            )
        finally:
            logf.close()
        log.info("started", extra={"component": c.name, "pid": c.proc.pid, **({"nice": nice} if nice else {})})

    async def _wait_healthy(self, c: Component) -> None:
        deadline = time.monotonic() + c.start_timeout_s
        reason: str | None = "not checked"
        while time.monotonic() < deadline:
            if c.proc is not None and c.proc.returncode is not None:
                raise StartupError(
                    f"{c.name}: exited with code {c.proc.returncode} during start-up (log: {c.log_path})"
                )
            reason = await c.health()
            if reason is None:
                return
            await asyncio.sleep(0.1)
        raise StartupError(f"{c.name}: not healthy after {c.start_timeout_s:.0f}s: {reason}")

    async def start_component(self, c: Component) -> None:
        if c.prepare is not None:
            try:
                await c.prepare()
            except Exception as exc:
                raise StartupError(f"{c.name}: preparation failed: {type(exc).__name__}: {exc}") from exc
        if c.spec is not None:
            await self._spawn(c)
        await self._wait_healthy(c)
        if c.after_start is not None:
            try:
                await c.after_start()
            except StartupError:
                raise
            except Exception as exc:
                raise StartupError(f"{c.name}: set-up failed: {type(exc).__name__}: {exc}") from exc
        if c.spec is not None:
            c.watcher = asyncio.create_task(self._watch(c))
        self.write_state()

    async def _watch(self, c: Component) -> None:
        assert c.proc is not None
        backoff = 0.5
        while True:
            code = await c.proc.wait()
            if self._stopping:
                return
            log.warning("component exited", extra={"component": c.name, "code": code})
            if not self.restart_children:
                self.write_state()
                return
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            backoff = min(backoff * 2, 10.0)
            c.restarts += 1
            try:
                await self._spawn(c)
                await self._wait_healthy(c)
                backoff = 0.5
            except StartupError as exc:
                log.error("restart failed", extra={"component": c.name, "error": str(exc)})
            self.write_state()

    async def stop_component(self, c: Component, grace_s: float = 15.0) -> None:
        if c.watcher is not None:
            c.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await c.watcher
        p = c.proc
        if p is None or p.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(c.stop_signal)
        try:
            await asyncio.wait_for(p.wait(), grace_s)
        except TimeoutError:
            log.warning("killing component after grace period", extra={"component": c.name})
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._acquire_lock()
        self.phase = "starting"
        try:
            self.plan()
            self.write_state()
            for c in self.components:
                await self.start_component(c)
        except BaseException as exc:
            self.error = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
            self.phase = "failed"
            await self.stop(final_phase="failed")
            raise
        self.phase = "running"
        self.write_state()

    async def stop(self, final_phase: str = "stopped") -> None:
        self._stopping = True
        if self.phase != "failed":
            self.phase = "stopping"
        self.write_state()
        for c in reversed(self.components):
            await self.stop_component(c)
        self.phase = final_phase
        self.write_state()
        self._release_lock()

    async def run_forever(self, ready: Callable[[Supervisor], None] | None = None) -> None:
        """Start everything, then wait for SIGINT/SIGTERM and stop in reverse order."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        if ready is not None:
            ready(self)
        await stop.wait()
        await self.stop()


def _mask_dsn(dsn: str) -> str:
    from core.obs import redact

    return str(redact(dsn))
