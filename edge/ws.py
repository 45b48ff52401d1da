"""The public WebSocket API (``/v1/ws``): market-data fan-out and private account channels.

Protocol (docs/ws.md is the reference): client ops ``SUB``/``UNSUB``/``RESUME``/``PING``/``LOGON``;
server frames ``{"type","channel","symbol","seq","prevSeq","ts","data"}``.

How it stays cheap (one ASGI ``send`` costs ~40 us here):

- Every update is encoded ONCE per channel (a channel is ``trades|book|ticker|candles`` x symbol x
  depth/interval), appended to the channel's pending list and to its resume ring.
- A flush task wakes when anything is pending, waits ``flush_ms`` to let a batch form, then joins
  each channel's pending frames into one blob of pre-framed WebSocket bytes (server frames are
  unmasked, so a frame is just a 2-10 byte header + the JSON). Connections with the same subscriptions
  form a group: the group's blobs are joined once and the same buffer is written to each member, one
  write per connection per flush. Under load a flush carries more frames, so the write count follows
  the number of connections, not the number of frames.
- The raw path uses the asyncio transport of the ASGI server's protocol (uvicorn's three WebSocket
  implementations all expose it); under a server that does not, each connection falls back to a
  bounded queue drained by ``send`` calls. A connection with nothing buffered in its transport is
  written with ``os.write`` during the flush (uvloop's ``write`` only queues, and runs every send later
  in one callback with the GIL held); with many such sockets a helper thread writes half of them, so
  the kernel's per-send work (most of a flush's cost) runs on two cores.

Backpressure: a connection whose kernel+transport backlog exceeds ``lag_bytes`` is LAGGING: its
frames are dropped (counted per channel), and once the backlog drains it gets, per affected channel,
``Missed`` (reason ``LAGGING``, the seq range) and, for book/ticker/candles, a fresh ``Snapshot``;
trades are never conflated and never dropped silently (the client can ``RESUME`` them from the
ring). A connection lagging for longer than ``slow_close_s`` (or lagging ``slow_episodes`` times in a
minute) is closed with 4001 ``SLOW_CONSUMER`` after a ``Shutdown`` frame.

Overload mode (``edge.ws_overload_mode`` or :meth:`WsHub.set_overload`): book, ticker and candle
channels are conflated — latest state only, flushed every ``conflate_ms`` — and the default book
depth drops to ``edge.ws_overload_depth``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import asgi
from prometheus_client import Counter, Gauge, Histogram

from core.aio import stop_tasks
from core.wire import (
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderRejected,
    Side,
    TradeExecuted,
)
from edge.marketdata import (
    BOOK_DEPTHS,
    INTERVALS,
    MarketData,
    MarketUpdate,
    OpenOrder,
    TradeRow,
    book_json,
    candle_json,
    ticker_json,
    trade_json,
)
from spotex.config import EdgeSection

__all__ = ["PRIVATE_CHANNELS", "PUBLIC_CHANNELS", "LocalEdge", "WsHub", "WsLimits", "ws_frame"]

log = logging.getLogger("spotex.edge.ws")

PUBLIC_CHANNELS = ("trades", "book", "ticker", "candles")
PRIVATE_CHANNELS = ("orders", "fills", "balances")
WS_PATH = "/v1/ws"

WS_CLIENTS = Gauge("ws_connected_clients", "Connected WebSocket clients")
WS_FRAMES = Counter("ws_frames_out_total", "WebSocket frames written to clients")
WS_WRITES = Counter("ws_writes_total", "Socket writes (each carries one or more frames)")
WS_DROPPED = Counter("ws_dropped_frames_total", "Frames not delivered to a lagging client", ["channel"])
WS_CLOSE = Counter("ws_close_total", "WebSocket connections closed, by reason", ["reason"])
WS_BACKLOG_MAX = Gauge("ws_backlog_bytes_max", "Largest outbound backlog of one connection at the last flush")
WS_BACKLOG_TOTAL = Gauge("ws_backlog_bytes_total", "Outbound backlog summed over connections at the last flush")
WS_RESUME_GAPS = Counter("ws_resume_gaps", "RESUME requests whose lastSeq was no longer in the buffer")
WS_ERRORS = Counter("ws_errors_total", "Error frames sent, by code", ["code"])
WS_FLUSH = Histogram("ws_flush_seconds", "Duration of one fan-out flush (all connections)",
                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
WS_OVERLOAD = Gauge("ws_overload_mode", "1 while book/ticker/candle conflation is on")
WS_PUBLISH_LAG = Histogram("ws_trade_publish_lag_seconds",
                           "Trade event time to the end of the flush that wrote it to every subscriber (per flush, "
                           "the oldest trade in it)", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


_CFG = EdgeSection()  # the defaults of the edge.ws_* configuration, the one place they are set
_CONFIG_KEY = {"overload": "ws_overload_mode"}  # every other limit <name> is the key edge.ws_<name>


class WsLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The hub's limits; ``from_config`` takes each from the ``edge.ws_<name>`` config field. The
    defaults are the config's (docs/ws.md, "Limits and errors")."""

    max_connections_per_ip: int = _CFG.ws_max_connections_per_ip
    max_subscriptions: int = _CFG.ws_max_subscriptions
    commands_per_s: float = _CFG.ws_commands_per_s
    commands_burst: int = _CFG.ws_commands_burst
    heartbeat_s: float = _CFG.ws_heartbeat_s
    flush_ms: float = _CFG.ws_flush_ms
    conflate_ms: float = _CFG.ws_conflate_ms
    lag_bytes: int = _CFG.ws_lag_bytes  # backlog that makes a connection LAGGING
    sndbuf_bytes: int = _CFG.ws_sndbuf_bytes  # kernel send buffer per connection (0 = the OS default, autotuned)
    resume_bytes: int = _CFG.ws_resume_bytes  # backlog below which it recovers
    slow_close_s: float = _CFG.ws_slow_close_s
    slow_episodes: int = _CFG.ws_slow_episodes
    close_grace_s: float = _CFG.ws_close_grace_s  # a closing client's time to read its backlog + Shutdown + close
    ring_frames: int = _CFG.ws_ring_frames  # resume buffer per channel
    fallback_queue: int = 2_048  # frames, when the raw transport is not available (not configurable)
    # Sockets written straight from the flush (os.write, GIL released) by the loop thread plus this
    # many helper threads, so the kernel's per-send work runs on several cores; 0 = one core only.
    write_threads: int = _CFG.ws_write_threads
    direct_min: int = 1_024  # connections in one flush before the helper threads are used (not configurable)
    default_depth: int = _CFG.ws_default_depth
    overload_depth: int = _CFG.ws_overload_depth
    overload: bool = _CFG.ws_overload_mode

    @classmethod
    def from_config(cls, cfg: Any) -> WsLimits:
        """From a Config (or its EdgeSection); a limit without a config key keeps its default."""
        if cfg is None:
            return cls()
        if isinstance(cfg, WsLimits):
            return cfg
        edge = getattr(cfg, "edge", cfg)
        kw: dict[str, Any] = {}
        for f in cls.__struct_fields__:  # fallback_queue and direct_min have no config key
            v = getattr(edge, _CONFIG_KEY.get(f, f"ws_{f}"), None)
            if v is not None:
                kw[f] = v
        return cls(**kw)


def ws_frame(payload: bytes) -> bytes:
    """An unmasked, final text frame (RFC 6455 §5.2) around ``payload``."""
    n = len(payload)
    if n < 126:
        return b"\x81" + bytes((n,)) + payload
    if n < 65_536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def _payload(type_: str, channel: str | None, symbol: str | None, seq: int | None, prev: int | None, ts: int,
             data: Any) -> bytes:
    return _enc.encode({"type": type_, "channel": channel, "symbol": symbol, "seq": seq, "prevSeq": prev,
                        "ts": ts, "data": data})


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


Key = tuple[str, Any, Any]  # (channel, symbol or account, depth / interval / None)


class _Channel:
    __slots__ = (
        "conf_book",
        "conf_candles",
        "dirty",
        "groups",
        "key",
        "last_seq",
        "new_subs",
        "oldest_ts",
        "pending",
        "pending_seqs",
        "ring",
        "subs",
        "view_asks",
        "view_bids",
    )

    def __init__(self, key: Key, last_seq: int, ring: int) -> None:
        self.key = key
        self.subs: set[_Conn] = set()
        self.new_subs: dict[_Conn, int] = {}  # joined while frames were pending: skip that many
        self.pending: list[bytes] = []
        self.pending_seqs: list[int] = []
        self.ring: deque[tuple[int, int, bytes]] = deque(maxlen=ring)  # (seq, prevSeq, payload)
        self.last_seq = last_seq
        self.conf_book: dict[tuple[Side, int], int] = {}
        self.dirty = False
        self.conf_candles: dict[int, Any] = {}
        self.view_bids: set[int] = set()
        self.view_asks: set[int] = set()
        self.groups: set[_Group] = set()  # subscription groups that include this channel
        self.oldest_ts = 0  # event time (ms) of the oldest pending trade frame, for the publish-lag metric

    def push(self, seq: int, payload: bytes, *, keep: bool = True) -> None:
        if keep:
            self.ring.append((seq, self.last_seq, payload))
        self.pending.append(payload)
        self.pending_seqs.append(seq)
        self.last_seq = seq

    def covers(self, last_seq: int) -> bool:
        """Can the frames after ``last_seq`` be replayed from the ring?"""
        if last_seq == self.last_seq:
            return True
        return bool(self.ring) and self.ring[0][1] <= last_seq < self.last_seq


class _Group:
    """Connections with exactly the same subscriptions. They receive the same bytes in every flush,
    so the group's frames are joined once and the same buffer is written to each member."""

    __slots__ = ("chans", "conns", "keys")

    def __init__(self, keys: frozenset[Key], chans: list[_Channel]) -> None:
        self.keys = keys
        self.chans = chans
        self.conns: set[_Conn] = set()


class _Conn:
    __slots__ = (
        "closed",
        "fd",
        "frames",
        "group",
        "id",
        "ip",
        "lag_since",
        "lag_times",
        "lagging",
        "logon_pending",
        "missed",
        "out",
        "out_n",
        "out_seqs",
        "principal",
        "queue",
        "send",
        "sender",
        "subs",
        "tok_ts",
        "tokens",
        "transport",
    )

    def __init__(self, cid: int, ip: str, send: Callable[[Any], Awaitable[None]], transport: Any) -> None:
        self.id = cid
        self.ip = ip
        self.send = send
        self.transport = transport
        self.out: list[bytes] = []
        self.out_seqs: list[tuple[_Channel, int, int, int]] = []  # (channel, first, last, count)
        self.subs: set[Key] = set()
        self.lagging = False
        self.lag_since = 0.0
        self.lag_times: deque[float] = deque(maxlen=16)
        self.missed: dict[Key, list[int]] = {}  # key -> [first seq, last seq, frames]
        self.tokens = 0.0
        self.tok_ts = 0.0
        self.principal: Any = None
        self.closed = False
        self.queue: asyncio.Queue[bytes | None] | None = None
        self.sender: asyncio.Task[None] | None = None
        self.frames = 0
        self.out_n = 0
        self.logon_pending = False
        self.group: _Group | None = None
        self.fd = -1  # the socket's descriptor, for direct writes (-1: only through the transport)

    def backlog(self) -> int:
        if self.transport is not None:
            try:
                return int(self.transport.get_write_buffer_size())
            except Exception:
                return 0
        return self.queue.qsize() if self.queue is not None else 0


def _transport_of(send: Any, depth: int = 0) -> Any:
    """The asyncio transport behind an ASGI ``send``: uvicorn's ``send`` is a bound method of its
    protocol (which holds ``transport``); Litestar's middleware wraps it in closures, so those are
    unwrapped too (a few levels at most). None when it cannot be found: the queue fallback is used."""
    owner = getattr(send, "__self__", None)
    tr = getattr(owner, "transport", None)
    if tr is not None and hasattr(tr, "write") and hasattr(tr, "get_write_buffer_size"):
        return tr
    if depth >= 4:
        return None
    for cell in getattr(send, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:
            continue
        if callable(inner):
            tr = _transport_of(inner, depth + 1)
            if tr is not None:
                return tr
    return None


def _write_many(items: list[tuple[_Conn, bytes]]) -> list[int]:
    """Bytes the kernel took per item (0 when the socket buffer is full, -1 on an error)."""
    out: list[int] = []
    write = os.write
    for conn, data in items:
        try:
            out.append(write(conn.fd, data))
        except BlockingIOError:
            out.append(0)
        except OSError:
            out.append(-1)
    return out


class WsHub:
    """WebSocket fan-out. ``WsHub(md, cfg, verifier)``; ``handlers()`` gives the Litestar route."""

    def __init__(self, md: MarketData, cfg: Any = None, verifier: Any = None) -> None:
        self.md = md
        self.limits = WsLimits.from_config(cfg)
        self.verifier = verifier
        self.overload = self.limits.overload
        WS_OVERLOAD.set(1 if self.overload else 0)
        self.conns: set[_Conn] = set()
        self.by_ip: dict[str, int] = {}
        self.channels: dict[Key, _Channel] = {}
        self.dirty_channels: set[_Channel] = set()
        self.groups: dict[frozenset[Key], _Group] = {}
        self.stats: dict[str, int] = {"frames_out": 0, "bytes_out": 0, "writes": 0, "dropped": 0, "resume_gaps": 0,
                                      "closes": 0,
                                      "slow_consumer_closes": 0, "missed_notices": 0, "direct_writes": 0,
                                      "helper_flushes": 0}
        self.closes: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._next_id = 0
        self._running = False
        self._last_conflate = 0.0
        self._private_n = 0
        self._lagging = 0  # connections currently LAGGING
        self._closing: set[_Conn] = set()
        self._pool: Any = None
        self.flush_times: deque[float] = deque(maxlen=4096)
        self.publish_lags: deque[float] = deque(maxlen=4096)  # seconds, per flush that carried trades
        md.listeners.append(self._on_update)
        for s in md.symbols():
            self._channel(("trades", s, None))

    # ---- lifecycle ------------------------------------------------------------------------------

    def handlers(self) -> list[Any]:
        hub = self

        @asgi(WS_PATH, copy_scope=False)
        async def ws_endpoint(scope: Any, receive: Any, send: Any) -> None:
            await hub.serve(scope, receive, send)

        return [ws_endpoint]

    async def start(self) -> None:
        # The projections may have been restored from a snapshot after this hub was built: channels
        # nobody has used yet take the projection's current seqs.
        for ch in self.channels.values():
            name, sym, param = ch.key
            if ch.ring or ch.subs or name in PRIVATE_CHANNELS or not self.md.has(sym):
                continue
            if name == "trades":
                tr = self.md.trades(sym, 1)
                ch.last_seq = tr[0].seq if tr else 0
            elif name == "book":
                snap = self.md.book(sym, param)
                ch.last_seq = snap.seq
                ch.view_bids, ch.view_asks = {p for p, _ in snap.bids}, {p for p, _ in snap.asks}
        self._running = True
        if self.limits.write_threads > 0 and self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.limits.write_threads, thread_name_prefix="ws-write")
        self._tasks = [asyncio.create_task(self._flush_loop(), name="ws-flush"),
                       asyncio.create_task(self._heartbeat_loop(), name="ws-heartbeat")]

    async def stop(self) -> None:
        """Shutdown frame to everyone, then close each connection (1001)."""
        self._running = False
        await stop_tasks(self._tasks)
        self._tasks = []
        await asyncio.gather(*(self._close(c, 1001, "SHUTDOWN") for c in list(self.conns)),
                             return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def set_overload(self, on: bool) -> None:
        """Runtime toggle (admin API): conflate book/ticker/candles and lower the default depth."""
        if on == self.overload:
            return
        self.overload = on
        WS_OVERLOAD.set(1 if on else 0)
        log.warning("ws overload mode %s", "ON" if on else "OFF")
        self._wake.set()

    @property
    def default_depth(self) -> int:
        return self.limits.overload_depth if self.overload else self.limits.default_depth

    def status(self) -> dict[str, Any]:
        backlogs = [c.backlog() for c in self.conns]
        return {"clients": len(self.conns), "overload": self.overload, "default_depth": self.default_depth,
                "channels": len(self.channels), "backlog_max": max(backlogs, default=0),
                "lagging": sum(1 for c in self.conns if c.lagging), "closes": dict(self.closes), **self.stats}

    # ---- connection handling --------------------------------------------------------------------

    async def serve(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "websocket":
            await send({"type": "http.response.start", "status": 426,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"code":"UPGRADE_REQUIRED"}'})
            return
        msg = await receive()
        if msg.get("type") != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        ip = (scope.get("client") or ("?", 0))[0]
        self._next_id += 1
        conn = _Conn(self._next_id, ip, send, _transport_of(send))
        if conn.transport is not None:
            # Small frames must not wait for Nagle + the peer's delayed ACK (~40 ms on loopback).
            # A bounded kernel buffer keeps the backlog where the hub can see it (an autotuned one
            # grows to megabytes per connection and hides a stalled reader).
            with contextlib.suppress(Exception):
                import socket

                sock = conn.transport.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.limits.sndbuf_bytes:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.sndbuf_bytes)
                conn.fd = int(sock.fileno())
        conn.tokens = float(self.limits.commands_burst)
        conn.tok_ts = time.monotonic()
        if conn.transport is None:
            conn.queue = asyncio.Queue(maxsize=self.limits.fallback_queue)
            conn.sender = asyncio.create_task(self._sender(conn))
        if self.by_ip.get(ip, 0) >= self.limits.max_connections_per_ip:
            self._error(conn, "TOO_MANY_CONNECTIONS",
                        f"at most {self.limits.max_connections_per_ip} connections per IP")
            await self._close(conn, 1008, "TOO_MANY_CONNECTIONS", registered=False)
            return
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        self.conns.add(conn)
        WS_CLIENTS.set(len(self.conns))
        reason = "CLIENT"
        try:
            while not conn.closed:
                msg = await receive()
                t = msg.get("type")
                if t == "websocket.receive":
                    text = msg.get("text")
                    if text is None:
                        text = (msg.get("bytes") or b"").decode("utf-8", "replace")
                    await self._on_text(conn, text)
                elif t == "websocket.disconnect":
                    break
        except Exception as exc:  # connection reset and the like
            reason = "ERROR"
            log.debug("ws %d: %r", conn.id, exc)
        finally:
            if not conn.closed:
                conn.closed = True
                self._count_close(reason)
            self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        if conn.lagging:
            conn.lagging = False
            self._lagging -= 1
        n = self.by_ip.get(conn.ip, 1) - 1
        if n <= 0:
            self.by_ip.pop(conn.ip, None)
        else:
            self.by_ip[conn.ip] = n
        for key in conn.subs:
            ch = self.channels.get(key)
            if ch is not None:
                ch.subs.discard(conn)
                ch.new_subs.pop(conn, None)
        conn.subs.clear()
        self._regroup(conn)
        if conn.sender is not None:
            conn.sender.cancel()
        WS_CLIENTS.set(len(self.conns))

    def _regroup(self, conn: _Conn) -> None:
        """Move ``conn`` to the group of its current subscription set (none when it has none)."""
        old = conn.group
        keys = frozenset(conn.subs) if not conn.closed and conn in self.conns else frozenset()
        if old is not None and old.keys == keys:
            return
        if old is not None:
            old.conns.discard(conn)
            if not old.conns:
                del self.groups[old.keys]
                for ch in old.chans:
                    ch.groups.discard(old)
        conn.group = None
        if not keys:
            return
        g = self.groups.get(keys)
        if g is None:
            g = self.groups[keys] = _Group(keys, [self.channels[k] for k in keys])
            for ch in g.chans:
                ch.groups.add(g)
        g.conns.add(conn)
        conn.group = g

    def _count_close(self, reason: str) -> None:
        WS_CLOSE.labels(reason).inc()
        self.closes[reason] = self.closes.get(reason, 0) + 1
        self.stats["closes"] += 1

    async def _close(self, conn: _Conn, code: int, reason: str, *, registered: bool = True) -> None:
        """Server-initiated close: a Shutdown frame first, always."""
        if conn.closed:
            return
        conn.closed = True
        self._count_close(reason)
        self._write_now(conn, [_payload("Shutdown", None, None, None, None, _now_ms(),
                                        {"code": code, "reason": reason})], force=True)
        try:
            await asyncio.wait_for(conn.send({"type": "websocket.close", "code": code, "reason": reason}),
                                   self.limits.close_grace_s)
        except Exception:
            if conn.transport is not None:
                with contextlib.suppress(Exception):
                    conn.transport.abort()
        self._closing.discard(conn)
        if registered:
            self._forget(conn)

    async def _sender(self, conn: _Conn) -> None:
        q = conn.queue
        assert q is not None
        with contextlib.suppress(Exception):
            while True:
                p = await q.get()
                if p is None:
                    return
                await conn.send({"type": "websocket.send", "text": p.decode()})

    def _write_now(self, conn: _Conn, payloads: list[bytes], *, force: bool = False) -> None:
        """Direct write of control/snapshot frames (ahead of the next flush)."""
        if not payloads or (conn.closed and not force):
            return
        if conn.transport is not None:
            data = b"".join(ws_frame(p) for p in payloads)
            self.stats["bytes_out"] += len(data)
            with contextlib.suppress(Exception):
                conn.transport.write(data)
        elif conn.queue is not None:
            for p in payloads:
                with contextlib.suppress(asyncio.QueueFull):
                    conn.queue.put_nowait(p)
        n = len(payloads)
        conn.frames += n
        self.stats["frames_out"] += n
        self.stats["writes"] += 1
        WS_FRAMES.inc(n)
        WS_WRITES.inc()

    def _error(self, conn: _Conn, code: str, detail: str, op: Any = None) -> None:
        WS_ERRORS.labels(code).inc()
        data: dict[str, Any] = {"code": code, "detail": detail}
        if op is not None:
            data["op"] = op
        self._write_now(conn, [_payload("Error", None, None, None, None, _now_ms(), data)])

    # ---- client ops -----------------------------------------------------------------------------

    def _take_token(self, conn: _Conn) -> bool:
        now = time.monotonic()
        lim = self.limits
        conn.tokens = min(float(lim.commands_burst), conn.tokens + (now - conn.tok_ts) * lim.commands_per_s)
        conn.tok_ts = now
        if conn.tokens < 1.0:
            return False
        conn.tokens -= 1.0
        return True

    async def _on_text(self, conn: _Conn, text: str) -> None:
        if not self._take_token(conn):
            self._error(conn, "RATE_LIMITED", f"at most {self.limits.commands_per_s:g} ops/s per connection")
            return
        try:
            req = _dec.decode(text)
        except msgspec.DecodeError:
            self._error(conn, "BAD_REQUEST", "frames must be JSON objects")
            return
        if not isinstance(req, dict):
            self._error(conn, "BAD_REQUEST", "frames must be JSON objects")
            return
        op = req.get("op")
        if op == "PING":
            self._write_now(conn, [_payload("Pong", None, None, None, None, _now_ms(), {"id": req.get("id")})])
        elif op == "SUB" or op == "RESUME":
            self._sub(conn, req, op)
        elif op == "UNSUB":
            self._unsub(conn, req)
        elif op == "LOGON":
            await self._logon(conn, req)
        else:
            self._error(conn, "BAD_REQUEST", "op must be SUB, UNSUB, RESUME, PING or LOGON", op)

    def _key(self, conn: _Conn, req: dict[str, Any], op: str) -> Key | None:
        channel = req.get("channel")
        if channel in PRIVATE_CHANNELS:
            if conn.principal is None:
                self._error(conn, "AUTH_REQUIRED", "LOGON before subscribing to private channels", op)
                return None
            return (channel, conn.principal.account_id, None)
        if channel not in PUBLIC_CHANNELS:
            self._error(conn, "UNKNOWN_CHANNEL", f"channel must be one of {list(PUBLIC_CHANNELS + PRIVATE_CHANNELS)}",
                        op)
            return None
        symbol = req.get("symbol")
        if not isinstance(symbol, str) or not self.md.has(symbol):
            self._error(conn, "UNKNOWN_SYMBOL", f"{symbol!r} is not a listed market", op)
            return None
        if channel == "book":
            depth = req.get("depth")
            if depth is None:
                depth = self.default_depth
            if depth not in BOOK_DEPTHS or isinstance(depth, bool):
                self._error(conn, "INVALID_DEPTH", f"depth must be one of {list(BOOK_DEPTHS)}", op)
                return None
            return ("book", symbol, depth)
        if channel == "candles":
            interval = req.get("interval", "1m")
            if interval not in INTERVALS:
                self._error(conn, "INVALID_INTERVAL", f"interval must be one of {list(INTERVALS)}", op)
                return None
            return ("candles", symbol, interval)
        return (channel, symbol, None)

    def _channel(self, key: Key) -> _Channel:
        ch = self.channels.get(key)
        if ch is None:
            name, sym, param = key
            last = 0
            if name == "trades":
                tr = self.md.trades(sym, 1)
                last = tr[0].seq if tr else 0
            elif name == "book":
                snap = self.md.book(sym, param)
                last = snap.seq
                ch_bids, ch_asks = snap.bids, snap.asks
            elif name in ("ticker", "candles"):
                last = self.md.seq(sym)
            ch = self.channels[key] = _Channel(key, last, self.limits.ring_frames)
            if name in PRIVATE_CHANNELS:
                self._private_n += 1
            if name == "book":
                ch.view_bids = {p for p, _ in ch_bids}
                ch.view_asks = {p for p, _ in ch_asks}
                self.md.tracked_depths.add(param)
        return ch

    def _sub(self, conn: _Conn, req: dict[str, Any], op: str) -> None:
        key = self._key(conn, req, op)
        if key is None:
            return
        backlog, mark = conn.backlog(), self._lag_mark(conn)
        if conn.lagging or backlog > mark:
            # The answer (a Snapshot, or a RESUME replay of up to ring_frames frames) is written at once,
            # past the flush's backpressure: a client that does not read could otherwise make the server
            # buffer a replay per command until the slow-consumer close. It can retry once it has read.
            self._error(conn, "BACKLOG_FULL", f"{backlog} unread on this connection (limit {mark}); "
                        f"{op} is answered once they are read", op)
            return
        if key not in conn.subs and len(conn.subs) >= self.limits.max_subscriptions:
            self._error(conn, "TOO_MANY_SUBSCRIPTIONS", f"at most {self.limits.max_subscriptions} per connection", op)
            return
        # A different depth or interval of the same channel and symbol replaces the old one.
        for old in [k for k in conn.subs if k[0] == key[0] and k[1] == key[1] and k != key]:
            self._drop_sub(conn, old)
        ch = self._channel(key)
        conn.subs.add(key)
        ch.subs.add(conn)
        self._regroup(conn)
        if ch.pending:
            ch.new_subs[conn] = len(ch.pending)  # those are older than what we send now
        conn.missed.pop(key, None)
        if op == "RESUME":
            last = req.get("lastSeq")
            if not isinstance(last, int) or isinstance(last, bool) or last < 0:
                self._error(conn, "BAD_REQUEST", "RESUME needs an integer lastSeq >= 0", op)
                return
            if key[0] in PRIVATE_CHANNELS:
                # No replay buffer for account channels: their Snapshot is the full state, always sent.
                if last != ch.last_seq:
                    self._write_now(conn, [_payload("Missed", key[0], None, ch.last_seq, last, _now_ms(),
                                                    {"reason": "HISTORY_GAP", "lastSeq": last,
                                                     "oldestSeq": ch.last_seq})])
                    self.stats["resume_gaps"] += 1
                    WS_RESUME_GAPS.inc()
                self._write_now(conn, [self._snapshot(ch)])
                return
            if ch.covers(last):
                self._write_now(conn, [p for s, _prev, p in ch.ring if s > last])
                return
            self.stats["resume_gaps"] += 1
            WS_RESUME_GAPS.inc()
            oldest = ch.ring[0][1] if ch.ring else ch.last_seq
            self._write_now(conn, [_payload("Missed", key[0], self._sym(key), ch.last_seq, last, _now_ms(),
                                            {"reason": "HISTORY_GAP", "lastSeq": last, "oldestSeq": oldest})])
        self._write_now(conn, [self._snapshot(ch)])

    @staticmethod
    def _sym(key: Key) -> Any:
        return None if key[0] in PRIVATE_CHANNELS else key[1]

    def _unsub(self, conn: _Conn, req: dict[str, Any]) -> None:
        channel, symbol = req.get("channel"), req.get("symbol")
        keys = [k for k in conn.subs if k[0] == channel and (k[1] == symbol or channel in PRIVATE_CHANNELS)]
        if not keys:
            self._error(conn, "NOT_SUBSCRIBED", f"not subscribed to {channel} {symbol}", "UNSUB")
            return
        for k in keys:
            self._drop_sub(conn, k)
        self._regroup(conn)

    def _drop_sub(self, conn: _Conn, key: Key) -> None:
        conn.subs.discard(key)
        ch = self.channels.get(key)
        if ch is not None:
            ch.subs.discard(conn)
            ch.new_subs.pop(conn, None)

    async def _logon(self, conn: _Conn, req: dict[str, Any]) -> None:
        """``{"op":"LOGON","apiKey","ts","signature"}``: the signature is the REST one over
        ``GET\\n/v1/ws\\n<ts>\\n`` (empty body), checked by the edge's RequestVerifier."""
        if self.verifier is None:
            self._error(conn, "AUTH_UNAVAILABLE", "private channels are not enabled on this edge", "LOGON")
            return
        try:
            ts = None if req.get("ts") is None else str(req["ts"])
            p = await self.verifier.verify(api_key=req.get("apiKey"), ts=ts,
                                           signature=req.get("signature"), method="GET", path_with_query=WS_PATH,
                                           body=b"", required_scope="read")
        except Exception as exc:
            self._error(conn, getattr(exc, "code", "AUTH_FAILED"), getattr(exc, "detail", "authentication failed"),
                        "LOGON")
            return
        conn.principal = p
        self._write_now(conn, [_payload("Snapshot", "logon", None, None, None, _now_ms(),
                                        {"accountId": p.account_id, "scopes": sorted(p.scopes)})])

    # ---- snapshots ------------------------------------------------------------------------------

    def _snapshot(self, ch: _Channel) -> bytes:
        name, sym, param = ch.key
        md = self.md
        if name == "book":
            snap = md.book(sym, param)
            data = book_json(md, snap)
            data["depth"] = param
            return _payload("Snapshot", "book", sym, ch.last_seq, None, _now_ms(), data)
        if name == "trades":
            f = md.formatter(sym)
            return _payload("Snapshot", "trades", sym, ch.last_seq, None, _now_ms(),
                            {"trades": [trade_json(f, t) for t in md.trades(sym, 50)]})
        if name == "ticker":
            return _payload("Snapshot", "ticker", sym, ch.last_seq, None, _now_ms(),
                            ticker_json(md.formatter(sym), md.ticker(sym)))
        if name == "candles":
            f = md.formatter(sym)
            return _payload("Snapshot", "candles", sym, ch.last_seq, None, _now_ms(),
                            {"interval": param, "candles": [candle_json(f, c) for c in md.candles(sym, param, 10)]})
        if name == "balances":
            return _payload("Snapshot", "balances", None, ch.last_seq, None, _now_ms(),
                            {"balances": [{"asset": a, "available": v[0], "hold": v[1]}
                                          for a, v in sorted(md.balances_of(sym).items())]})
        if name == "orders":
            return _payload("Snapshot", "orders", None, ch.last_seq, None, _now_ms(),
                            {"orders": [self._open_order_json(o) for o in md.open_orders_of(sym)],
                             "engineSeqs": {s: md.seq(s) for s in md.symbols()}})
        return _payload("Snapshot", name, None, ch.last_seq, None, _now_ms(), {})

    @staticmethod
    def _open_order_json(o: OpenOrder) -> dict[str, Any]:
        """The orders channel speaks the wire's integer fields (ticks, lots), like its update frames."""
        filled = o.qty_lots - o.remaining_lots
        return {"order_id": o.order_id, "account_id": o.account_id, "client_order_id": o.client_order_id,
                "symbol": o.symbol, "side": o.side, "type": "LIMIT", "tif": "GTC", "price_ticks": o.price_ticks,
                "qty_lots": o.qty_lots, "filled_qty_lots": filled, "remaining_qty_lots": o.remaining_lots,
                "status": "PARTIALLY_FILLED" if filled else "ACCEPTED", "engineSeq": o.seq, "ts": o.ts_ms}

    # ---- updates from the projections -----------------------------------------------------------

    def _on_update(self, upd: MarketUpdate) -> None:
        sym = upd.symbol
        chans = self.channels
        if not self.md.ready.is_set():
            # Rebuilding from history: no client can be waiting for these frames; only keep the
            # channels' seqs current (a RESUME into that history gets HISTORY_GAP + Snapshot).
            for ch in chans.values():
                name, csym, _param = ch.key
                if csym != sym:
                    continue
                if name == "trades" and upd.trades:
                    ch.last_seq = upd.trades[-1].seq
                elif name == "book" and upd.changes:
                    ch.last_seq = upd.book_seq
            return
        if upd.trades:
            ch = chans.get(("trades", sym, None)) or self._channel(("trades", sym, None))
            if not ch.pending:
                ch.oldest_ts = upd.trades[0].ts_ms
            f = self.md.formatter(sym)
            for t in upd.trades:
                ch.push(t.seq, _payload("TradeExecuted", "trades", sym, t.seq, ch.last_seq, t.ts_ms, trade_json(f, t)))
            self.dirty_channels.add(ch)
        if upd.changes:
            for d in BOOK_DEPTHS:
                bch = chans.get(("book", sym, d))
                if bch is not None:
                    self._book_update(bch, upd, d)
        if upd.ticker_changed:
            tch = chans.get(("ticker", sym, None))
            if tch is not None and tch.subs:
                tch.dirty = True
                self.dirty_channels.add(tch)
        if upd.candles:
            for name, row in upd.candles:
                cch = chans.get(("candles", sym, name))
                if cch is not None and cch.subs:
                    cch.conf_candles[row.open_ms] = row
                    cch.dirty = True
                    self.dirty_channels.add(cch)
        if self._private_n:
            self._private(upd)
        if self.dirty_channels:
            self._wake.set()

    def _book_update(self, ch: _Channel, upd: MarketUpdate, depth: int) -> None:
        """The depth-limited view's changes: changed levels inside the new top-``depth``, levels that
        left it (sent as removed, so a client's copy is exactly the top ``depth``) and levels that
        entered it (sent with their quantity)."""
        book = self.md._market(upd.symbol).book
        new_b = book.top_bid_prices(depth)
        new_a = book.top_ask_prices(depth)
        nb, na = set(new_b), set(new_a)
        changed_b = {p for s, p, _ in upd.changes if s is Side.BUY}
        changed_a = {p for s, p, _ in upd.changes if s is Side.SELL}
        out_b: dict[int, int] = {}
        out_a: dict[int, int] = {}
        for view, new, changed, out, levels in ((ch.view_bids, nb, changed_b, out_b, book.bids),
                                                (ch.view_asks, na, changed_a, out_a, book.asks)):
            for p in view - new:
                out[p] = 0
            for p in new:
                if p not in view or p in changed:
                    out[p] = levels[p]
        ch.view_bids, ch.view_asks = nb, na
        if not out_b and not out_a:
            return
        if not ch.subs and not ch.ring:
            ch.last_seq = upd.book_seq
            return
        if self.overload:
            for p, q in out_b.items():
                ch.conf_book[(Side.BUY, p)] = q
            for p, q in out_a.items():
                ch.conf_book[(Side.SELL, p)] = q
            ch.dirty = True
            self.dirty_channels.add(ch)
            return
        if ch.conf_book:  # overload was just switched off: send the conflated rest first
            self._materialize(ch, upd.ts_ms)
        f = self.md.formatter(upd.symbol)
        data = {"bids": [[f.price(p), f.qty(q)] for p, q in out_b.items()],
                "asks": [[f.price(p), f.qty(q)] for p, q in out_a.items()], "checksum": upd.checksum}
        ch.push(upd.book_seq, _payload("OrderbookUpdated", "book", upd.symbol, upd.book_seq, ch.last_seq, upd.ts_ms,
                                       data))
        self.dirty_channels.add(ch)

    @staticmethod
    def _push_private(ch: _Channel, type_: str, symbol: str | None, ts: int, data: Any) -> None:
        """Private channels carry events of several markets (each with its own engine seq), so their
        ``seq`` is the channel's own frame counter: ``prevSeq`` is always ``seq - 1`` and the Snapshot
        carries the current counter, so a client sees any gap. The engine seq is ``data.engineSeq``."""
        seq = ch.last_seq + 1
        ch.push(seq, _payload(type_, ch.key[0], symbol, seq, ch.last_seq, ts, data), keep=False)

    def _private(self, upd: MarketUpdate) -> None:
        chans = self.channels
        touched: dict[int, set[str]] = {}
        for e in upd.events:
            moves = getattr(e, "moves", None)
            if moves:
                for mv in moves:
                    if ("balances", mv.account_id, None) in chans:
                        touched.setdefault(mv.account_id, set()).add(mv.asset)
            if isinstance(e, (OrderAccepted, OrderCanceled, OrderAmended, OrderRejected)):
                ch = chans.get(("orders", e.account_id, None))
                if ch is not None:
                    data = msgspec.to_builtins(e)
                    data.pop("moves", None)
                    data["engineSeq"] = e.seq
                    self._push_private(ch, type(e).__name__, e.symbol, e.occurred_at, data)
                    self.dirty_channels.add(ch)
            elif isinstance(e, TradeExecuted):
                for acct, role, oid, rem in ((e.taker_account_id, "TAKER", e.taker_order_id, e.taker_remaining_lots),
                                             (e.maker_account_id, "MAKER", e.maker_order_id, e.maker_remaining_lots)):
                    och = chans.get(("orders", acct, None))
                    if och is not None:
                        self._push_private(och, "OrderFilled", e.symbol, e.occurred_at,
                                           {"order_id": oid, "account_id": acct, "symbol": e.symbol,
                                            "trade_id": e.trade_id, "role": role, "price_ticks": e.price_ticks,
                                            "qty_lots": e.qty_lots, "remaining_qty_lots": rem,
                                            "status": "PARTIALLY_FILLED" if rem else "FILLED", "engineSeq": e.seq})
                        self.dirty_channels.add(och)
                    ch = chans.get(("fills", acct, None))
                    if ch is not None:
                        f = self.md.formatter(e.symbol)
                        row = TradeRow(e.trade_id, e.seq, e.price_ticks, e.qty_lots, e.quote_amount,
                                       str(e.taker_side), e.occurred_at)
                        data = {**trade_json(f, row), "role": role, "engineSeq": e.seq,
                                "orderId": e.taker_order_id if role == "TAKER" else e.maker_order_id,
                                "fee": str(e.taker_fee if role == "TAKER" else e.maker_fee),
                                "feeAsset": e.taker_fee_asset if role == "TAKER" else e.maker_fee_asset}
                        self._push_private(ch, "TradeExecuted", e.symbol, e.occurred_at, data)
                        self.dirty_channels.add(ch)
        for acct, assets in touched.items():
            ch = chans[("balances", acct, None)]
            bal = self.md.balances_of(acct)
            self._push_private(ch, "BalanceUpdated", None, upd.ts_ms,
                               {"engineSeq": upd.seq, "symbol": upd.symbol,
                                "balances": [{"asset": a, "available": bal[a][0], "hold": bal[a][1]}
                                             for a in sorted(assets) if a in bal]})
            self.dirty_channels.add(ch)

    # ---- flushing -------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        lim = self.limits
        while self._running:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=lim.conflate_ms / 1000)
            except TimeoutError:
                pass
            self._wake.clear()
            if lim.flush_ms > 0:
                await asyncio.sleep(lim.flush_ms / 1000)
            t0 = time.perf_counter()
            try:
                self.flush()
            except Exception:
                log.exception("ws flush failed")
            dt = time.perf_counter() - t0
            WS_FLUSH.observe(dt)
            self.flush_times.append(dt)

    def _materialize(self, ch: _Channel, now_ms: int) -> None:
        name, sym, param = ch.key
        ch.dirty = False
        md = self.md
        if name == "book":
            if not ch.conf_book:
                return
            f = md.formatter(sym)
            snap_seq = md.book(sym, 1).seq
            bids = [[f.price(p), f.qty(q)] for (s, p), q in ch.conf_book.items() if s is Side.BUY]
            asks = [[f.price(p), f.qty(q)] for (s, p), q in ch.conf_book.items() if s is Side.SELL]
            ch.conf_book = {}
            cs = md._market(sym).checksum
            ch.push(snap_seq, _payload("OrderbookUpdated", "book", sym, snap_seq, ch.last_seq, now_ms,
                                       {"bids": bids, "asks": asks, "checksum": cs, "conflated": True}))
        elif name == "ticker":
            t = md.ticker(sym)
            ch.push(t.seq, _payload("TickerUpdated", "ticker", sym, t.seq, ch.last_seq, t.ts_ms,
                                    ticker_json(md.formatter(sym), t)))
        elif name == "candles":
            f = md.formatter(sym)
            seq = md.seq(sym)
            for _open, row in sorted(ch.conf_candles.items()):
                ch.push(seq, _payload("CandleUpdated", "candles", sym, seq, ch.last_seq, now_ms,
                                      {"interval": param, **candle_json(f, row)}))
            ch.conf_candles = {}

    def flush(self) -> None:
        """Write everything pending: one blob per channel, one buffer per subscription group, one
        write per connection.

        The per-connection work is the hot path (10,000 connections x every flush). Connections with
        the same subscriptions form a group (:class:`_Group`) and get the same bytes, so the join is
        done once per group and each healthy member costs one backlog check and one
        ``transport.write`` of the shared buffer, with no per-connection allocation. Connections that
        need more (lagging, closing, just subscribed with frames to skip, the queue fallback) take the
        general path (:meth:`_write_out`). Metrics are updated once per flush."""
        now = time.monotonic()
        now_ms = _now_ms()
        lim = self.limits
        conflate_due = not self.overload or (now - self._last_conflate) * 1000 >= lim.conflate_ms
        if conflate_due and self.overload:
            self._last_conflate = now
        keep_dirty: set[_Channel] = set()
        ready: dict[_Channel, tuple[bytes, list[bytes], list[int], tuple[_Channel, int, int, int]]] = {}
        special: dict[_Conn, dict[_Channel, int]] = {}  # just subscribed: frames of the channel to skip
        for ch in self.dirty_channels:
            if ch.dirty:
                state_channel = ch.key[0] in ("ticker", "candles") or (ch.key[0] == "book" and self.overload)
                if state_channel and not conflate_due:
                    keep_dirty.add(ch)
                else:
                    self._materialize(ch, now_ms)
            if not ch.pending:
                continue
            pending, seqs = ch.pending, ch.pending_seqs
            ch.pending, ch.pending_seqs = [], []
            if not ch.subs:
                ch.new_subs.clear()
                continue
            ready[ch] = (b"".join([ws_frame(p) for p in pending]), pending, seqs,
                         (ch, seqs[0], seqs[-1], len(pending)))
            if ch.new_subs:
                for conn, skip in ch.new_subs.items():
                    special.setdefault(conn, {})[ch] = skip
                ch.new_subs.clear()
        self.dirty_channels = keep_dirty
        if keep_dirty:
            self._wake.set()
        oldest = min((ch.oldest_ts for ch in ready if ch.key[0] == "trades"), default=0)
        frames = writes = nbytes = backlog_max = backlog_total = 0
        lag_bytes = lim.lag_bytes
        slow: list[_Conn] = []
        direct: list[tuple[_Conn, bytes]] = []
        groups = {g for ch in ready for g in ch.groups}
        for g in groups:
            parts: list[bytes] = []
            metas: list[tuple[_Channel, int, int, int]] = []
            n = 0
            for ch in g.chans:
                r = ready.get(ch)
                if r is not None:
                    parts.append(r[0])
                    metas.append(r[3])
                    n += r[3][3]
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            size = len(data)
            for conn in g.conns:
                tr = conn.transport
                if tr is None or conn.lagging or conn.closed or (special and conn in special):
                    self._stage(conn, g, ready, special.get(conn))
                    slow.append(conn)
                    continue
                b = tr.get_write_buffer_size()
                if b > lag_bytes:
                    conn.out.append(data)
                    conn.out_seqs.extend(metas)
                    conn.out_n += n
                    slow.append(conn)
                    continue
                if b == 0 and conn.fd >= 0 and not tr.is_closing():
                    # A closing transport may have closed its descriptor already (and the number
                    # be reused by a new connection): only an open one is written directly.
                    direct.append((conn, data))
                else:
                    tr.write(data)
                conn.frames += n
                frames += n
                nbytes += size
                writes += 1
                backlog_total += b
                if b > backlog_max:
                    backlog_max = b
        if direct:
            self._write_direct(direct)
        for conn in slow:
            b = self._write_out(conn, now)
            backlog_total += b
            if b > backlog_max:
                backlog_max = b
        if self._lagging:
            # Lagging connections that got nothing this round still need to recover or be closed.
            done = set(slow)
            for conn in [c for c in self.conns if c.lagging and c not in done]:
                self._write_out(conn, now)
        st = self.stats
        st["frames_out"] += frames
        st["writes"] += writes
        st["bytes_out"] += nbytes
        if frames:
            WS_FRAMES.inc(frames)
            WS_WRITES.inc(writes)
        WS_BACKLOG_MAX.set(backlog_max)
        WS_BACKLOG_TOTAL.set(backlog_total)
        if oldest:
            lag = max(0.0, (_now_ms() - oldest) / 1000)
            self.publish_lags.append(lag)
            WS_PUBLISH_LAG.observe(lag)

    def _write_direct(self, items: list[tuple[_Conn, bytes]]) -> None:
        """Write to sockets whose transport has nothing buffered, with ``os.write`` (which releases the
        GIL), half on this thread and half on a helper thread when there are many: the kernel's
        per-send work (most of a flush's cost) then runs on two cores. The event loop waits here,
        so nothing else can write to or close these sockets meanwhile; whatever the kernel did not
        take goes through the transport afterwards, behind the bytes already sent (order kept)."""
        pool = self._pool
        if pool is not None and len(items) >= self.limits.direct_min:
            half = len(items) // 2
            self.stats["helper_flushes"] += 1
            fut = pool.submit(_write_many, items[half:])
            first = _write_many(items[:half])
            sent = first + fut.result()
        else:
            sent = _write_many(items)
        self.stats["direct_writes"] += len(items)
        for (conn, data), n in zip(items, sent, strict=True):
            if n == len(data):
                continue
            tr = conn.transport
            with contextlib.suppress(Exception):
                # n < 0: an error (reset, broken pipe): the transport's own write reports it and closes.
                tr.write(data if n <= 0 else memoryview(data)[n:])

    @staticmethod
    def _stage(conn: _Conn, g: _Group,
               ready: dict[_Channel, tuple[bytes, list[bytes], list[int], tuple[_Channel, int, int, int]]],
               skips: dict[_Channel, int] | None) -> None:
        """This flush's frames for one connection on the general path (conn.out / out_seqs)."""
        for ch in g.chans:
            r = ready.get(ch)
            if r is None:
                continue
            blob, pending, seqs, meta = r
            n = meta[3]
            skip = skips.get(ch, 0) if skips else 0
            if skip >= n:
                continue
            if conn.transport is None:
                conn.out.extend(pending[skip:])
            else:
                conn.out.append(blob if not skip else b"".join([ws_frame(p) for p in pending[skip:]]))
            conn.out_seqs.append(meta if not skip else (ch, seqs[skip], seqs[-1], n - skip))
            conn.out_n += n - skip

    def _write_out(self, conn: _Conn, now: float) -> int:
        """The general path: lag detection and recovery, the fallback queue."""
        lim = self.limits
        backlog = conn.backlog()
        out, seqs = conn.out, conn.out_seqs
        conn.out, conn.out_seqs = [], []
        n = conn.out_n
        conn.out_n = 0
        if conn.closed:
            return backlog
        if conn.lagging:
            if backlog <= (lim.resume_bytes if conn.transport is not None else lim.fallback_queue // 4):
                conn.lagging = False
                self._lagging -= 1
                self._recover(conn)
            else:
                self._drop(conn, seqs)
                if now - conn.lag_since > lim.slow_close_s:
                    self._slow(conn)
                return backlog
        elif backlog > self._lag_mark(conn):
            self._set_lagging(conn, now)
            self._drop(conn, seqs)
            recent = sum(1 for t in conn.lag_times if now - t < 60)
            if recent >= lim.slow_episodes:
                self._slow(conn)
            return backlog
        if not out:
            return backlog
        if conn.transport is not None:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.stats["bytes_out"] += len(data)
            try:
                conn.transport.write(data)
            except Exception:
                return backlog
        else:
            q = conn.queue
            assert q is not None
            for p in out:
                try:
                    q.put_nowait(p)
                except asyncio.QueueFull:
                    self._set_lagging(conn, now)
                    break
        conn.frames += n
        self.stats["frames_out"] += n
        self.stats["writes"] += 1
        WS_FRAMES.inc(n)
        WS_WRITES.inc()
        return backlog

    def _lag_mark(self, conn: _Conn) -> int:
        """The backlog (``_Conn.backlog``: bytes on a raw transport, frames in the fallback queue)
        above which a connection is LAGGING."""
        lim = self.limits
        return lim.lag_bytes if conn.transport is not None else lim.fallback_queue // 2

    def _set_lagging(self, conn: _Conn, now: float) -> None:
        if not conn.lagging:
            conn.lagging = True
            self._lagging += 1
            conn.lag_since = now
            conn.lag_times.append(now)

    def _drop(self, conn: _Conn, seqs: list[tuple[_Channel, int, int, int]]) -> None:
        for ch, first, last, n in seqs:
            m = conn.missed.get(ch.key)
            if m is None:
                conn.missed[ch.key] = [first, last, n]
            else:
                m[1] = last
                m[2] += n
            self.stats["dropped"] += n
            WS_DROPPED.labels(ch.key[0]).inc(n)

    def _recover(self, conn: _Conn) -> None:
        """Back under the low watermark: tell what was missed, re-snapshot state channels."""
        frames: list[bytes] = []
        for key, (first, last, n) in conn.missed.items():
            if key not in conn.subs:
                continue
            ch = self.channels.get(key)
            if ch is None:
                continue
            frames.append(_payload("Missed", key[0], self._sym(key), last, first, _now_ms(),
                                   {"reason": "LAGGING", "fromSeq": first, "toSeq": last, "frames": n}))
            self.stats["missed_notices"] += 1
            if key[0] != "trades" and key[0] not in PRIVATE_CHANNELS:
                frames.append(self._snapshot(ch))
                if ch.pending:
                    ch.new_subs[conn] = len(ch.pending)
        conn.missed.clear()
        self._write_now(conn, frames)

    def _slow(self, conn: _Conn) -> None:
        if conn in self._closing or conn.closed:
            return
        self._closing.add(conn)
        self.stats["slow_consumer_closes"] += 1
        asyncio.get_running_loop().create_task(self._close(conn, 4001, "SLOW_CONSUMER"))

    async def _heartbeat_loop(self) -> None:
        while self._running:
            await asyncio.sleep(self.limits.heartbeat_s)
            p = _payload("Heartbeat", None, None, None, None, _now_ms(), None)
            for conn in list(self.conns):
                if not conn.lagging and not conn.closed:
                    self._write_now(conn, [p])


class LocalEdge:
    """A minimal Litestar app serving the market-data routes and ``/v1/ws`` under uvicorn, in this
    event loop, on a loopback port: for tests, drills and the benchmark (edge/app.py mounts the same
    handlers in the real edge service)."""

    def __init__(self, md: MarketData, hub: WsHub, host: str = "127.0.0.1", port: int = 0) -> None:
        self.md, self.hub, self.host, self.port = md, hub, host, port
        self.server: Any = None
        self._task: asyncio.Task[Any] | None = None
        self._sock: Any = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    async def start(self) -> LocalEdge:
        import socket

        import uvicorn
        from litestar import Litestar

        from edge.marketdata import marketdata_routes

        app = Litestar(route_handlers=[*marketdata_routes(self.md), *self.hub.handlers()], logging_config=None)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(4096)
        self.port = sock.getsockname()[1]
        self._sock = sock
        config = uvicorn.Config(app, log_level="warning", lifespan="off", ws_per_message_deflate=False,
                                ws_ping_interval=None, access_log=False, backlog=4096)
        self.server = uvicorn.Server(config)
        await self.hub.start()
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        for _ in range(500):
            if self.server.started:
                break
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        await self.hub.stop()
        if self.server is not None:
            self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
