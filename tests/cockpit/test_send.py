"""How the cockpit sends a control: each on a connection of its own.

A fresh-clone run once refused a control with ``not sent: ReadError``: it went out on the pooled
connection of the previous control, seconds old, just as the edge's keep-alive timeout closed it. The
server here plays that race every time: it answers the first request on a connection and closes the
connection when a second one arrives on it, without answering."""

from __future__ import annotations

import asyncio
import json

from cockpit.controls import ControlRequest, control_client, send
from cockpit.signing import OperatorKey


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


async def test_each_control_goes_out_on_a_new_connection() -> None:
    connections: list[int] = []
    answered = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        connections.append(len(connections) + 1)
        if await _read_request(reader) is not None:
            answered += 1
            body = json.dumps({"auditSeq": answered}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                         + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        await _read_request(reader)  # a second request on this connection: closed unanswered
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    key = OperatorKey.from_hex("11" * 32)
    req = ControlRequest("withdrawals", None, "on", "drill", "T-1")
    client = control_client()
    try:
        results = [await send(client, f"http://127.0.0.1:{port}", key, req) for _ in range(3)]
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert [(r.accepted, r.audit_seq) for r in results] == [(True, 1), (True, 2), (True, 3)], results
    assert len(connections) == 3
