"""The edge's end-to-end tests share one real stack (starting one costs tens of seconds), stopped after the
last test of tests/edge."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.edge.stackenv import Env, edge_stack


@pytest.fixture(scope="package")
def edge_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with edge_stack(tmp_path_factory.mktemp("edge") / "stack") as env:
        yield env
