"""Session-wide real servers: started once on free ports in a temporary directory, stopped after."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spotex.testing import RunningServer, kafka_server, nats_server, new_database, postgres_server


@pytest.fixture(scope="session")
def nats_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with nats_server(tmp_path_factory.mktemp("nats")) as srv:
        yield srv


@pytest.fixture(scope="session")
def pg_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with postgres_server(tmp_path_factory.mktemp("pg")) as srv:
        yield srv


@pytest.fixture(scope="session")
def kafka_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with kafka_server(tmp_path_factory.mktemp("kafka")) as srv:
        yield srv


@pytest.fixture
def pg_dsn(pg_srv: RunningServer) -> str:
    """A fresh, empty database on the session's PostgreSQL."""
    return new_database(pg_srv.url)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "stack"
