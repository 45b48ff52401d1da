"""A TCP fault proxy (asyncio): put it between a client and a server to cause network faults.

Modes, switchable at any time (from tests through ``FaultProxy``, from a shell through the control
port that ``spotex faultproxy`` opens):

- ``pass``: forward bytes (optionally with ``latency_ms`` added per chunk, each direction, and a
  ``bandwidth_bps`` cap per connection and direction);
- ``blackhole``: a partition: existing connections stay open but nothing is forwarded either way,
  and new connections are accepted and then hang (what a silently dropping firewall looks like);
- ``refuse``: new connections are closed at once, existing ones are cut (the port is "down");
- ``reset``: a one-shot action that aborts every open connection with a TCP RST and leaves the mode
  unchanged.

Control protocol: one JSON object per line on the control port, answered by one JSON line with the
current state. ``{"op": "set", "mode": "blackhole"}``, ``{"op": "set", "latency_ms": 200}``,
``{"op": "set", "bandwidth_bps": 10000}``, ``{"op": "reset"}``, ``{"op": "status"}``.

Kafka note: a Kafka client connects to the address the broker *advertises*, so a proxy in front
of a broker only sees the traffic when the broker advertises the proxy's address (the drills run
their broker with ``--advertised-listener-url`` set to the proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from core.aio import stop_tasks

__all__ = ["FaultProxy", "ProxyState", "control"]

log = logging.getLogger("jobs.faultproxy")

MODES = ("pass", "blackhole", "refuse")


@dataclass
class ProxyState:
    mode: str = "pass"
    latency_ms: float = 0.0
    bandwidth_bps: int = 0  # 0: unlimited
    connections: int = 0
    accepted: int = 0
    resets: int = 0
    refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    mode_since: float = field(default_factory=time.time)


class FaultProxy:
    def __init__(self, listen_host: str, listen_port: int, target_host: str, target_port: int, *,
                 control_port: int | None = None) -> None:
        self.listen_host, self.listen_port = listen_host, listen_port
        self.target_host, self.target_port = target_host, target_port
        self.control_port = control_port
        self.state = ProxyState()
        self._server: asyncio.AbstractServer | None = None
        self._control: asyncio.AbstractServer | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._open = asyncio.Event()  # set while forwarding is allowed (not blackholed)
        self._open.set()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port)
        self.listen_port = int(self._server.sockets[0].getsockname()[1])
        if self.control_port is not None:
            self._control = await asyncio.start_server(self._control_conn, "127.0.0.1", self.control_port)
            self.control_port = int(self._control.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        for srv in (self._server, self._control):
            if srv is not None:
                srv.close()
        self.reset()
        await stop_tasks(list(self._tasks))
        for srv in (self._server, self._control):
            if srv is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(srv.wait_closed(), 2)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # ------------------------------------------------------------------------------------------
    # faults

    def set(self, *, mode: str | None = None, latency_ms: float | None = None,
            bandwidth_bps: int | None = None) -> ProxyState:
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}")
            if mode != self.state.mode:
                self.state.mode_since = time.time()
            self.state.mode = mode
            if mode == "blackhole":
                self._open.clear()
            else:
                self._open.set()
            if mode == "refuse":
                self.reset()
        if latency_ms is not None:
            self.state.latency_ms = max(0.0, float(latency_ms))
        if bandwidth_bps is not None:
            self.state.bandwidth_bps = max(0, int(bandwidth_bps))
        log.info("fault proxy state", extra={"state": asdict(self.state)})
        return self.state

    def partition(self) -> ProxyState:
        return self.set(mode="blackhole")

    def heal(self) -> ProxyState:
        return self.set(mode="pass", latency_ms=0, bandwidth_bps=0)

    def reset(self) -> int:
        """Abort every open connection with RST (SO_LINGER 0); returns how many were cut."""
        n = 0
        for client, upstream in list(self._conns):
            for w in (client, upstream):
                if w is None:
                    continue
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
            n += 1
        self._conns.clear()
        self.state.resets += n
        self.state.connections = 0
        return n

    # ------------------------------------------------------------------------------------------
    # forwarding

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.state.accepted += 1
        if self.state.mode == "refuse":
            self.state.refused += 1
            writer.transport.abort()
            return
        entry: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        self._conns.add(entry)
        self.state.connections = len(self._conns)
        try:
            await self._open.wait()  # a blackholed connect hangs like a SYN into a dropping firewall
            if entry not in self._conns:
                return
            ureader, uwriter = await asyncio.open_connection(self.target_host, self.target_port)
        except (OSError, asyncio.CancelledError):
            self._drop(entry)
            writer.transport.abort()
            return
        self._conns.discard(entry)
        entry = (writer, uwriter)
        self._conns.add(entry)
        up = self._spawn(self._pipe(reader, uwriter, "up"))
        down = self._spawn(self._pipe(ureader, writer, "down"))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            for w in (writer, uwriter):
                with contextlib.suppress(Exception):
                    w.close()
            self._drop(entry)

    def _drop(self, entry: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]) -> None:
        self._conns.discard(entry)
        self.state.connections = len(self._conns)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(65536)
                if not data:
                    with contextlib.suppress(Exception):
                        writer.write_eof()
                    return
                await self._open.wait()  # held (not dropped) while partitioned, as TCP would retransmit
                if self.state.latency_ms:
                    await asyncio.sleep(self.state.latency_ms / 1000)
                bw = self.state.bandwidth_bps
                view = memoryview(data)
                while view:
                    chunk = view[: max(1, bw // 20)] if bw else view
                    writer.write(chunk)
                    await writer.drain()
                    if bw:
                        await asyncio.sleep(len(chunk) / bw)
                    view = view[len(chunk):]
                if direction == "up":
                    self.state.bytes_up += len(data)
                else:
                    self.state.bytes_down += len(data)

    # ------------------------------------------------------------------------------------------
    # control port

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op", "status")
        if op == "set":
            self.set(mode=req.get("mode"), latency_ms=req.get("latency_ms"), bandwidth_bps=req.get("bandwidth_bps"))
        elif op == "reset":
            self.reset()
        elif op == "partition":
            self.partition()
        elif op == "heal":
            self.heal()
        elif op != "status":
            return {"ok": False, "error": f"unknown op {op!r}"}
        return {"ok": True, "listen": self.address, "target": f"{self.target_host}:{self.target_port}",
                **asdict(self.state)}

    async def _control_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    resp = self.handle(json.loads(line))
                except (ValueError, TypeError) as exc:
                    resp = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(resp).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def control(port: int, req: dict[str, Any], host: str = "127.0.0.1") -> dict[str, Any]:
    """Send one request to a running proxy's control port; returns its answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        writer.write(json.dumps(req).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        return dict(json.loads(line))
    finally:
        writer.close()
