"""Real servers for tests and drills: nats-server, PostgreSQL and the Kafka broker on free ports in
a temporary directory, started from the same specs the supervisor uses, and a whole stack brought
up through ``spotex up --detach`` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotex.embedded import (
    ProcSpec,
    check_kafka,
    check_nats,
    check_postgres,
    ensure_database,
    kafka_spec,
    nats_spec,
    postgres_prepare,
    postgres_spec,
)
from spotex.paths import free_port

__all__ = ["RunningServer", "Stack", "kafka_server", "nats_server", "postgres_server", "spotex_cli", "stack"]


@dataclass
class RunningServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, Any]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _popen(spec: ProcSpec, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(spec.argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **spec.env}, user=spec.user)


def _wait(check: Any, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    reason = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        reason = asyncio.run(check())
        if reason is None:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not healthy after {timeout}s: {reason}")


@contextlib.contextmanager
def nats_server(tmp: Path) -> Iterator[RunningServer]:
    port, mon = free_port(), free_port()
    spec, _ = nats_spec(tmp / "nats", port, mon)
    log = tmp / "nats.log"
    proc = _popen(spec, log)
    url = f"nats://127.0.0.1:{port}"
    srv = RunningServer(url, proc, log, {"monitor": f"http://127.0.0.1:{mon}", "port": port})
    try:
        _wait(lambda: check_nats(url, srv.extra["monitor"]), proc, "nats-server", 15)
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def postgres_server(tmp: Path) -> Iterator[RunningServer]:
    pgdata = tmp / "pg"
    run_as = postgres_prepare(pgdata)
    port = free_port()
    spec = postgres_spec(pgdata, port, run_as)
    log = tmp / "postgres.log"
    proc = _popen(spec, log)
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    srv = RunningServer(admin, proc, log, {"port": port})
    try:
        _wait(lambda: check_postgres(admin), proc, "postgres", 60)
        yield srv
    finally:
        srv.stop(signal.SIGINT)


def new_database(admin_dsn: str, prefix: str = "t") -> str:
    """Create an empty database on the server; returns its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    asyncio.run(ensure_database(admin_dsn, name))
    return admin_dsn.rsplit("/", 1)[0] + "/" + name


@contextlib.contextmanager
def kafka_server(tmp: Path) -> Iterator[RunningServer]:
    port = free_port()
    spec = kafka_spec(port)
    log = tmp / "kafka.log"
    proc = _popen(spec, log)
    bootstrap = f"127.0.0.1:{port}"
    srv = RunningServer(bootstrap, proc, log, {"port": port})
    try:
        _wait(lambda: check_kafka(bootstrap), proc, "kafka broker", 15)
        yield srv
    finally:
        srv.stop()


def spotex_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0,
               check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process, as an operator would."""
    full_env = {**os.environ, **(env or {})}
    res = subprocess.run([sys.executable, "-m", "spotex", *args], capture_output=True, text=True,
                         env=full_env, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"spotex {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


@dataclass
class Stack:
    data_dir: Path
    env: dict[str, str]

    def cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return spotex_cli(*args, "--data-dir", str(self.data_dir), env=self.env, **kw)

    def status(self) -> dict[str, Any]:
        res = self.cli("status", "--json")
        return dict(json.loads(res.stdout))

    @property
    def ports(self) -> dict[str, int]:
        return dict(json.loads((self.data_dir / "run" / "ports.json").read_text()))

    def endpoint(self, name: str) -> str:
        for c in self.status()["components"]:
            if c["name"] == name:
                return str(c["endpoint"])
        raise KeyError(name)


@contextlib.contextmanager
def stack(data_dir: Path, *, demo: bool = False, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """The whole stack through the same supervisor code `spotex up` uses."""
    st = Stack(data_dir, dict(env or {}))
    args = ["up", "--detach"] + ([] if demo else ["--no-demo"])
    st.cli(*args, check=True, timeout=180)
    try:
        yield st
    finally:
        st.cli("down", timeout=120)
