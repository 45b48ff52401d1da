"""Deterministic simulation: seeded command streams, crashes at random points, recovery must give
the uninterrupted run's state hash and event streams (no gap, no duplicate)."""

from __future__ import annotations

import logging

import pytest

from core import sim
from core.node import CoreNode
from core.recovery import NodeState


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("core").setLevel(logging.CRITICAL)


@pytest.mark.parametrize("block", range(4))
def test_200_seeds_recover_to_the_uninterrupted_hash(block: int) -> None:
    failed = []
    for seed in range(block * 50, block * 50 + 50):
        r = sim.run_seed(seed, 200)
        assert r.crashes, f"seed {seed} injected no crash"
        if not r.ok:
            failed.append((seed, r.crashes, r.problems))
    assert failed == []


@pytest.mark.parametrize("point", sim.CRASH_POINTS)
def test_every_crash_point_is_survived(point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sim, "CRASH_POINTS", (point,))
    for seed in range(5):
        r = sim.run_seed(1000 + seed, 200, crashes=2)
        assert r.ok, (seed, r.crashes, r.problems)
        assert set(r.crashes) <= {point}


def test_sim_catches_double_apply_of_redelivered_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mutation check: without the redelivery dedupe, a crash after publishing re-applies a batch.
    monkeypatch.setattr(sim, "CRASH_POINTS", ("after_publish",))
    monkeypatch.setattr(NodeState, "seen", lambda self, src: False)
    results = [sim.run_seed(s, 200, crashes=1) for s in range(5)]
    assert any(not r.ok for r in results)


def test_sim_catches_missing_republish(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mutation check: a recovered leader that does not republish leaves a gap on EVT.
    monkeypatch.setattr(sim, "CRASH_POINTS", ("after_wal_commit",))

    async def no_republish(self: CoreNode, token: int) -> None:
        self.token = token
        await self.catch_up()
        assert self.bus is not None
        await self.bus.prepare_leader(sorted(self.engine.stream_seqs()))

    monkeypatch.setattr(CoreNode, "become_leader", no_republish)
    results = []
    for s in range(5):
        try:
            results.append(sim.run_seed(s, 200, crashes=1).ok)
        except AssertionError:
            results.append(False)  # the memory bus itself refuses a gap
    assert not all(results)
