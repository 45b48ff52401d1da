"""The core node against a real nats-server with JetStream: leading, restart, standby, fencing."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest

from core.bus import cmd_subject, ensure_streams
from core.node import JOURNAL_STREAM, CoreNode, CoreOptions, FencingError
from core.sim import generate, sim_markets
from core.wire import Command, EngineCheckpoint, TradeExecuted, decode_events, encode_request


def _opts(nats_url: str, d: Path, node: str, **kw: Any) -> CoreOptions:
    base: dict[str, Any] = {"lease_ttl_ms": 1500, "checkpoint_every": 25, "snapshot_every": 10_000,
                            "markets": sim_markets(), "ack_wait_s": 2.0}
    base.update(kw)
    return CoreOptions(node_id=node, nats_url=nats_url, core_dir=str(d / node), **base)


class Env:
    """Fresh, uniquely named streams per test on the session nats-server."""

    def __init__(self, url: str) -> None:
        self.url = url
        tag = uuid.uuid4().hex[:8].upper()
        self.cmd, self.evt = f"CMD_{tag}", f"EVT_{tag}"
        self.nc: Any = None
        self.js: Any = None

    async def __aenter__(self) -> Env:
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        # Each test gets its own streams, journal and lease by deleting the shared ones first.
        for name in ("CMD", "EVT", JOURNAL_STREAM):
            with contextlib.suppress(Exception):
                await self.js.delete_stream(name)
        with contextlib.suppress(Exception):
            await self.js.delete_key_value("core_lease")
        await ensure_streams(self.js, lease_ttl_s=1.5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def send(self, cmds: list[Command], prefix: str) -> None:
        futs = []
        for i, c in enumerate(cmds):
            futs.append(await self.js.publish_async(cmd_subject(getattr(c, "symbol", None)), encode_request(c),
                                                    headers={"Nats-Msg-Id": f"{prefix}-{i}"}))
        await asyncio.gather(*futs)

    async def events(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        sub = await self.js.subscribe("evt.>", ordered_consumer=True)
        info = await self.js.stream_info("EVT")
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=5)
            evs = decode_events(msg.data)
            out.setdefault(evs[0].symbol, []).extend(evs)
        await sub.unsubscribe()
        return out

    async def wait_seq(self, node: CoreNode, seq: int, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while node.engine.last_seq < seq:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"node at {node.engine.last_seq}, expected {seq}")
            await asyncio.sleep(0.05)


def _check_streams(events: dict[str, list[Any]]) -> None:
    for stream, evs in events.items():
        assert [e.seq for e in evs] == list(range(1, len(evs) + 1)), f"{stream} has a gap or duplicate"


async def _start(node: CoreNode) -> asyncio.Task[None]:
    task = asyncio.create_task(node.run())
    for _ in range(200):
        if node.role == "leader" or node.role == "standby":
            break
        await asyncio.sleep(0.02)
    return task


async def test_leader_sequences_restarts_and_resumes_without_gaps(nats_srv: Any, tmp_path: Path) -> None:
    async with Env(nats_srv.url) as env:
        cmds = generate(7, 400)
        node = CoreNode(_opts(env.url, tmp_path, "a"))
        task = await _start(node)
        await env.send(cmds[:200], "x")
        await env.wait_seq(node, 2 + 200)  # two markets, then the commands
        hash1 = node.engine.state_hash()
        node.stopping.set()
        await task
        # A restart on the same data dir recovers the same state and continues.
        node2 = CoreNode(_opts(env.url, tmp_path, "a"))
        task2 = await _start(node2)
        for _ in range(100):
            if node2.role == "leader":
                break
            await asyncio.sleep(0.05)
        assert node2.role == "leader"
        assert node2.engine.state_hash() == hash1
        await env.send(cmds[200:], "y")
        await env.wait_seq(node2, 2 + 400)
        # Redelivered / re-sent ids inside the duplicate window are dropped by JetStream.
        await env.send(cmds[:10], "x")
        await asyncio.sleep(0.3)
        assert node2.engine.last_seq == 402
        node2.stopping.set()
        await task2
        evs = await env.events()
        _check_streams(evs)
        assert any(isinstance(e, TradeExecuted) for e in evs["BTC-USDT"])
        assert any(isinstance(e, EngineCheckpoint) for e in evs["_sys"])


async def test_standby_tracks_takes_over_and_stale_leader_is_fenced(nats_srv: Any, tmp_path: Path) -> None:
    async with Env(nats_srv.url) as env:
        cmds = generate(11, 300)
        leader = CoreNode(_opts(env.url, tmp_path, "a"))
        lt = await _start(leader)
        standby = CoreNode(_opts(env.url, tmp_path, "b"))
        st = await _start(standby)
        assert leader.role == "leader" and standby.role == "standby"
        await env.send(cmds[:150], "p")
        await env.wait_seq(leader, 152)
        await env.wait_seq(standby, 152)
        assert standby.engine.state_hash() == leader.engine.state_hash()
        assert standby.divergence == [] and leader.divergence == []

        # Freeze the leader's lease renewals (as SIGSTOP would) until the standby takes over.
        renew = [t for t in asyncio.all_tasks() if "_renew_loop" in repr(t.get_coro())]
        for t in renew:
            t.cancel()
        for _ in range(200):
            if standby.role == "leader":
                break
            await asyncio.sleep(0.05)
        assert standby.role == "leader"
        assert standby.token is not None and leader.token is not None and standby.token > leader.token
        await env.send(cmds[150:], "q")
        await env.wait_seq(standby, 302)

        # The old leader kept consuming: its next write after the new term's seal is refused. If it
        # happened to fetch nothing, make it try one batch.
        for _ in range(100):
            if leader.fenced:
                break
            await asyncio.sleep(0.05)
        if not leader.fenced:
            with pytest.raises(FencingError):
                await leader.process([(10**9, "stale", cmds[0])])
        assert leader.fenced >= 1
        assert standby.fenced == 0 and standby.role == "leader"
        leader.stopping.set()
        standby.stopping.set()
        await asyncio.gather(lt, st, return_exceptions=True)
        evs = await env.events()
        _check_streams(evs)
        # Zero stale events: EVT holds exactly the events of the committed journal, nothing else.
        assert evs == await _journal_replay(env)
        tokens = {e.fencing_token for es in evs.values() for e in es}
        assert tokens <= {leader.token, standby.token}


async def _journal_replay(env: Env) -> dict[str, list[Any]]:
    from core.engine import Engine
    from core.recovery import decode_journal

    engine = Engine(checkpoint_every=25)
    out: dict[str, list[Any]] = {}
    info = await env.js.stream_info(JOURNAL_STREAM)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await env.js.get_msg(JOURNAL_STREAM, seq)
        for rec in decode_journal(msg.data):
            for e in engine.apply(rec.cmd):
                out.setdefault(e.symbol, []).append(e)
    return out


def test_divergent_checkpoint_is_reported(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    node = CoreNode(_opts("nats://unused", tmp_path, "c"))
    before = REGISTRY.get_sample_value("core_standby_divergence_total") or 0.0
    node._remember([EngineCheckpoint(event_id="_sys:9", symbol="_sys", seq=9, occurred_at=1, correlation_id="",
                                     causation_id="cmd:50", fencing_token=1, last_seq=50, state_hash="aa" * 32,
                                     stream_seqs={}, totals=[])])
    node.note_leader_checkpoint(50, "aa" * 32)
    assert node.divergence == []
    node.note_leader_checkpoint(50, "bb" * 32)  # the leader says otherwise at the same seq
    assert node.divergence == [{"last_seq": 50, "own": "aa" * 32, "leader": "bb" * 32}]
    assert REGISTRY.get_sample_value("core_standby_divergence_total") == before + 1


def test_status_and_recovery_say_which_engine_runs(tmp_path: Path) -> None:
    import core.engine

    node = CoreNode(_opts("nats://unused", tmp_path, "c"))
    node.recover_local()
    try:
        assert node.status()["engine_impl"] == core.engine.ENGINE_IMPL
        assert node.recovered["engine_impl"] == core.engine.ENGINE_IMPL
        assert type(node.engine) is core.engine.Engine
    finally:
        assert node.wal is not None
        node.wal.close()


async def test_cmd_stream_persists_asynchronously_and_keeps_its_mode(nats_srv: Any) -> None:
    """CMD (one message per command) is created with asynchronous persistence; SEQ/EVT keep the
    default (fsync before the ack). Re-running ensure_streams never flips an existing stream's mode,
    which the server would refuse."""
    from nats.js.api import PersistMode

    async with Env(nats_srv.url) as env:
        assert (await env.js.stream_info("CMD")).config.persist_mode == PersistMode.ASYNC
        assert (await env.js.stream_info("EVT")).config.persist_mode in (None, PersistMode.DEFAULT)
        await ensure_streams(env.js, lease_ttl_s=1.5, cmd_persist="sync")  # exists: keeps async
        assert (await env.js.stream_info("CMD")).config.persist_mode == PersistMode.ASYNC
        await env.js.delete_stream("CMD")
        await ensure_streams(env.js, lease_ttl_s=1.5, cmd_persist="sync")
        assert (await env.js.stream_info("CMD")).config.persist_mode in (None, PersistMode.DEFAULT)
        with pytest.raises(ValueError, match="cmd_persist"):
            await ensure_streams(env.js, cmd_persist="fast")
