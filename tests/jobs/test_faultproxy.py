"""The fault proxy in front of a real TCP echo server: latency, partition, reset, refuse, bandwidth."""

from __future__ import annotations

import asyncio
import time

import pytest

from jobs.faultproxy import FaultProxy, control


async def _echo_server() -> asyncio.AbstractServer:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _rtt(r: asyncio.StreamReader, w: asyncio.StreamWriter, payload: bytes = b"x") -> float:
    t0 = time.perf_counter()
    w.write(payload)
    await w.drain()
    got = b""
    while len(got) < len(payload):
        got += await r.read(65536)
    return time.perf_counter() - t0


def test_latency_partition_reset_refuse_bandwidth() -> None:
    async def go() -> None:
        srv = await _echo_server()
        port = srv.sockets[0].getsockname()[1]
        async with FaultProxy("127.0.0.1", 0, "127.0.0.1", port, control_port=0) as p:
            r, w = await asyncio.open_connection("127.0.0.1", p.listen_port)
            assert await _rtt(r, w) < 0.1
            p.set(latency_ms=100)
            assert await _rtt(r, w) >= 0.19  # both directions
            p.set(latency_ms=0)
            p.partition()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(_rtt(r, w), 0.5)
            p.heal()  # held bytes are delivered after healing, as TCP would retransmit
            assert await asyncio.wait_for(r.read(10), 2) == b"x"
            assert await _rtt(r, w) < 0.1
            assert p.reset() == 1
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                data = await asyncio.wait_for(r.read(10), 2)
                if not data:
                    raise ConnectionError("closed")
            ans = await control(p.control_port or 0, {"op": "set", "mode": "refuse"})
            assert ans["ok"] and ans["mode"] == "refuse" and ans["resets"] >= 1
            r2, _w2 = await asyncio.open_connection("127.0.0.1", p.listen_port)
            assert await asyncio.wait_for(r2.read(10), 2) == b""
            await control(p.control_port or 0, {"op": "set", "mode": "pass", "bandwidth_bps": 20_000})
            r3, w3 = await asyncio.open_connection("127.0.0.1", p.listen_port)
            took = await _rtt(r3, w3, b"y" * 10_000)
            assert took >= 0.4, took  # 10 kB at 20 kB/s (both directions stream concurrently)
            w3.close()
        srv.close()

    asyncio.run(go())
