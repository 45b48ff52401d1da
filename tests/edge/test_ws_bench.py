"""`spotex bench ws` at a small size: the load client's two models (every connection event-driven, or
unsampled connections drained by the sweeper outside epoll) must both account for every byte the
server wrote, and the sampled connections must time trades in every step."""

from __future__ import annotations

import pytest

from benchmarks.bench_ws import run


@pytest.mark.parametrize("drain_ms", [0.0, 200.0], ids=["event-driven", "swept"])
def test_bench_ws_client_receives_every_byte(drain_ms: float) -> None:
    res = run(clients=240, sample=12, step_s=0.6, offered=[480, 1440], drain_ms=drain_ms)
    assert res["client_drain_ms"] == drain_ms
    assert res["bytes_out"] > 0
    assert res["bytes_received"] == res["bytes_out"], res
    assert res["bytes_missing_at_clients"] == 0
    assert res["dropped"] == 0
    assert [s["offered_frames_per_s"] for s in res["steps"]] == [480, 1440]
    for step in res["steps"]:
        assert step["frames"] > 0 and step["samples"] > 0, step
