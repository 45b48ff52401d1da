"""A lean HTTP/1.1 keep-alive load client for the benchmarks.

httpx costs about a millisecond of client CPU per request, which on a 2-core machine shared with
the whole stack makes the load client the bottleneck it must not be. This client writes each
request as one prepared buffer (one ``write``, TCP_NODELAY) on a persistent connection and parses
only the status line, ``Content-Length`` and the body: enough for an API that always answers with
a length (uvicorn does).
"""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import urlsplit

__all__ = ["Conn", "HttpError"]


class HttpError(Exception):
    pass


class Conn:
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, base_url: str) -> None:
        u = urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"http://host:port expected, got {base_url!r}")
        self.host = u.hostname
        self.port = u.port or 80
        self._host_header = f"{self.host}:{self.port}".encode()
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._r, self._w = await asyncio.open_connection(self.host, self.port)
        sock = self._w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def request(self, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
        if self._w is None:
            await self._connect()
        assert self._r is not None and self._w is not None
        head = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + self._host_header]
        head += [f"{k}: {v}".encode() for k, v in headers.items()]
        head.append(b"Content-Length: " + str(len(body)).encode())
        self._w.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        try:
            status_line = await self._r.readuntil(b"\r\n")
            status = int(status_line.split(b" ", 2)[1])
            length = 0
            close = False
            while True:
                line = await self._r.readuntil(b"\r\n")
                if line == b"\r\n":
                    break
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value.strip())
                elif lname == b"connection" and value.strip().lower() == b"close":
                    close = True
                elif lname == b"transfer-encoding":
                    raise HttpError("chunked responses are not supported by this client")
            data = await self._r.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            await self.close()
            raise HttpError(f"connection lost: {exc}") from exc
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        w, self._w, self._r = self._w, None, None
        if w is not None:
            w.close()
            try:
                await w.wait_closed()
            except (ConnectionError, OSError):
                pass
