"""WebSocket drills (seed §3.4 WS fan-out overload, §4.2 WS resume-gap).

The stack has no edge service yet, so each drill runs the edge's market-data projections and
WebSocket hub IN-PROCESS (``edge.ws.LocalEdge``: the same MarketData/WsHub the edge service mounts)
against the stack's NATS: events come from the stack's real core, fed by commands published to CMD.

``spotex drill ws-drop-spike``: a healthy subscriber and a subscriber that stops reading, under
load. Checks: the slow one is closed with 4001 SLOW_CONSUMER after a Shutdown frame and
``ws_close_total{reason="SLOW_CONSUMER"}`` rose; the healthy one got every trade (prevSeq chain
unbroken, same seqs as the projection) and every book checksum verified; overload mode (the runtime
toggle) conflates book/ticker while trades still arrive one by one. Success line
``runbook_ws_drop_spike_ok=true``; evidence ws-drop-smoke.json.

``spotex drill ws-resume-gap-spike``: a subscriber disconnects, trades continue past the resume
buffer, it reconnects with RESUME lastSeq: it must get Missed (HISTORY_GAP) then Snapshot and
``ws_resume_gaps`` must rise; a RESUME inside the buffer must replay without a gap. Success line
``runbook_ws_resume_gap_spike_ok=true``; evidence ws-resume-smoke.json (``gap_recovery.result_type``,
``metrics.ws_resume_gaps``), safety-budget-ws-resume.json (the wsResume check as this drill
evaluates it), status-before.json / status-after.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from typing import Any

from runbooks.common import Drill, publish_load

__all__ = ["ws_drop_spike", "ws_resume_gap_spike"]


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client import REGISTRY

    return float(REGISTRY.get_sample_value(name, labels or {}) or 0.0)


class _Edge:
    def __init__(self, d: Drill, **limits: Any) -> None:
        self.d, self.limits = d, limits
        self.nc: Any = None
        self.md: Any = None
        self.hub: Any = None
        self.edge: Any = None

    async def __aenter__(self) -> _Edge:
        import nats

        from edge.marketdata import MarketData
        from edge.ws import LocalEdge, WsHub, WsLimits
        from spotex.config import market_configs

        self.nc = await nats.connect(self.d.endpoints.nats_url)
        js = self.nc.jetstream()
        self.md = MarketData(market_configs(self.d.cfg))
        await asyncio.wait_for(self.md.start(self.nc, js), 120)
        self.hub = WsHub(self.md, WsLimits(**self.limits), None)
        self.edge = await LocalEdge(self.md, self.hub).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.edge.stop()
        with contextlib.suppress(Exception):
            await self.md.stop()
        await self.nc.close()


def _load(d: Drill, n: int, rate: float, tag: str) -> asyncio.Task[Any]:
    from core.sim import generate

    cmds = generate(int(time.time()) % 10_000, n)
    return asyncio.create_task(publish_load(d.endpoints.nats_url, cmds, rate, f"{tag}-{time.time_ns()}"))


async def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.1)
    return bool(pred())


def _raw_slow_client(port: int, subs: list[dict[str, Any]]) -> socket.socket:
    """A client that completes the handshake, subscribes and then never reads (tiny receive buffer)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    for sub in subs:
        payload = json.dumps(sub).encode()
        s.sendall(b"\x81" + bytes((0x80 | len(payload),)) + b"\x00\x00\x00\x00" + payload)
    return s


def _drain(s: socket.socket) -> bytes:
    s.settimeout(10)
    tail = b""
    with contextlib.suppress(OSError):
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            tail += chunk
    s.close()
    return tail


async def ws_drop_spike(d: Drill, commands: int = 4000, rate: float = 800.0) -> bool:
    import websockets

    from edge.checksum import book_checksum_from_strings

    d.status("before")
    closes_before = _metric("ws_close_total", {"reason": "SLOW_CONSUMER"})
    async with _Edge(d, lag_bytes=16 << 10, resume_bytes=4 << 10, slow_close_s=1.0, conflate_ms=250,
                     sndbuf_bytes=16 << 10) as e:
        sym = "BTC-USDT"
        healthy = await websockets.connect(e.edge.ws_url, max_size=None)
        for sub in ({"op": "SUB", "channel": "trades", "symbol": sym},
                    {"op": "SUB", "channel": "book", "symbol": sym, "depth": 50},
                    {"op": "SUB", "channel": "ticker", "symbol": sym}):
            await healthy.send(json.dumps(sub))
        slow = await asyncio.to_thread(_raw_slow_client, e.edge.port, [
            {"op": "SUB", "channel": "trades", "symbol": sym},
            {"op": "SUB", "channel": "book", "symbol": sym, "depth": 200},
            {"op": "SUB", "channel": "trades", "symbol": "ETH-USDT"},
            {"op": "SUB", "channel": "book", "symbol": "ETH-USDT", "depth": 200}])
        frames: list[dict[str, Any]] = []
        book: dict[str, dict[str, str]] = {"bids": {}, "asks": {}}
        bad_checksums = 0
        checked = 0

        async def reader() -> None:
            nonlocal bad_checksums, checked
            from decimal import Decimal

            with contextlib.suppress(websockets.ConnectionClosed):
                async for raw in healthy:
                    f = json.loads(raw)
                    frames.append(f)
                    if f.get("channel") != "book" or f["type"] not in ("Snapshot", "OrderbookUpdated"):
                        continue
                    if f["type"] == "Snapshot":
                        book["bids"] = dict(f["data"]["bids"])
                        book["asks"] = dict(f["data"]["asks"])
                    else:
                        for side in ("bids", "asks"):
                            for p, q in f["data"][side]:
                                if Decimal(q) == 0:
                                    book[side].pop(p, None)
                                else:
                                    book[side][p] = q
                    bids = sorted(book["bids"].items(), key=lambda kv: Decimal(kv[0]), reverse=True)
                    asks = sorted(book["asks"].items(), key=lambda kv: Decimal(kv[0]))
                    checked += 1
                    if book_checksum_from_strings(bids, asks) != f["data"]["checksum"]:
                        bad_checksums += 1

        rtask = asyncio.create_task(reader())
        load = _load(d, commands, rate, "wsdrop")
        # Once the hub gives up on the slow client, it reads again: backlog, Shutdown, close 4001.
        async def drain_when_closed() -> bytes:
            await _wait(lambda: e.hub.closes.get("SLOW_CONSUMER", 0) >= 1, commands / rate + 30)
            return await asyncio.to_thread(_drain, slow)

        drainer = asyncio.create_task(drain_when_closed())
        # Half way through, the operator switches overload mode on (seed §3.4 step 1-2).
        await asyncio.sleep(commands / rate / 2)
        e.hub.set_overload(True)
        overload_at = len(frames)
        result = await load
        tail = await drainer
        e.hub.set_overload(False)
        await asyncio.sleep(0.5)
        shutdown_seen = b'"type":"Shutdown"' in tail and b"SLOW_CONSUMER" in tail
        close_4001 = b"\x88" in tail and (4001).to_bytes(2, "big") + b"SLOW_CONSUMER" in tail
        trades = [f for f in frames if f["type"] == "TradeExecuted"]
        chain_ok = all(b["prevSeq"] == a["seq"] for a, b in itertools.pairwise(trades))
        md_trades = [t.seq for t in reversed(e.md.trades(sym, 1000))]
        tail_ok = [t["seq"] for t in trades][-len(md_trades):] == md_trades if md_trades else False
        conflated = sum(1 for f in frames[overload_at:] if f["type"] == "OrderbookUpdated"
                        and f["data"].get("conflated"))
        closes_after = _metric("ws_close_total", {"reason": "SLOW_CONSUMER"})
        stats = e.hub.status()
        rtask.cancel()
        await healthy.close()
    ok = (closes_after >= closes_before + 1 and shutdown_seen and close_4001 and chain_ok and tail_ok
          and bad_checksums == 0 and checked > 10 and len(trades) > 0 and conflated > 0 and len(result.acked) > 0)
    after = d.status("after")
    summary = {
        "drill": "ws-drop-spike", "edge": "in-process LocalEdge against the stack's NATS",
        "commands_acked": len(result.acked), "healthy_client": {
            "frames": len(frames), "trades": len(trades), "trade_chain_ok": chain_ok,
            "trades_match_projection": tail_ok, "book_checksums_verified": checked, "bad_checksums": bad_checksums,
            "conflated_book_frames_in_overload": conflated},
        "slow_client": {"shutdown_frame_seen": shutdown_seen, "close_code_4001": close_4001},
        "metrics": {"ws_close_total_slow_consumer": closes_after - closes_before,
                    "ws_dropped_frames_total": stats.get("dropped"), "ws_resume_gaps": stats.get("resume_gaps")},
        "hub": stats, "stack_healthy_after": after.get("healthy"), "runbook_ws_drop_spike_ok": ok,
    }
    d.write("ws-drop-smoke.json", summary)
    d.emit("ws_close_total_slow_consumer", int(closes_after - closes_before))
    d.emit("ws_trades_received", len(trades))
    d.emit("ws_trade_chain_ok", chain_ok)
    d.emit("ws_book_checksums_verified", checked)
    d.emit("ws_conflated_book_frames", conflated)
    d.emit("runbook_ws_drop_spike_ok", ok)
    return ok


async def ws_resume_gap_spike(d: Drill, commands: int = 3000, rate: float = 800.0) -> bool:
    import websockets

    d.status("before")
    gaps_before = _metric("ws_resume_gaps_total")
    ring = 50
    async with _Edge(d, ring_frames=ring) as e:
        sym = "BTC-USDT"
        ws = await websockets.connect(e.edge.ws_url, max_size=None)
        await ws.send(json.dumps({"op": "SUB", "channel": "trades", "symbol": sym}))
        snap = json.loads(await asyncio.wait_for(ws.recv(), 10))
        last_seen = int(snap["seq"] or 0)
        await ws.close()
        # Trades continue while the client is away, far past the resume buffer.
        ch = e.hub.channels[("trades", sym, None)]
        result = await _load(d, commands, rate, "wsgap")
        await _wait(lambda: ch.last_seq > last_seen and len(ch.ring) >= ring, 30)
        ws = await websockets.connect(e.edge.ws_url, max_size=None)
        await ws.send(json.dumps({"op": "RESUME", "channel": "trades", "symbol": sym, "lastSeq": last_seen}))
        got = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
        gap_types = [f["type"] for f in got]
        gap_reason = got[0]["data"].get("reason") if got and got[0]["type"] == "Missed" else None
        snapshot_seq = got[1]["seq"] if len(got) > 1 else None
        # In-buffer resume: the last 10 trades come back, no Missed.
        in_buf_from = ch.ring[-11][0] if len(ch.ring) > 10 else ch.last_seq
        ws2 = await websockets.connect(e.edge.ws_url, max_size=None)
        await ws2.send(json.dumps({"op": "RESUME", "channel": "trades", "symbol": sym, "lastSeq": in_buf_from}))
        replay: list[dict[str, Any]] = []
        with contextlib.suppress(TimeoutError):
            while len(replay) < 10:
                replay.append(json.loads(await asyncio.wait_for(ws2.recv(), 5)))
        in_buf_ok = (len(replay) == 10 and all(f["type"] == "TradeExecuted" for f in replay)
                     and replay[0]["prevSeq"] == in_buf_from)
        await ws.close()
        await ws2.close()
        gaps_after = _metric("ws_resume_gaps_total")
    result_type = "+".join(gap_types)
    ok = (gap_types == ["Missed", "Snapshot"] and gap_reason == "HISTORY_GAP" and gaps_after >= gaps_before + 1
          and in_buf_ok and len(result.acked) > 0 and snapshot_seq is not None and snapshot_seq > last_seen)
    budget = {"check": "wsResume", "pass": ok, "source": "ws-resume-gap-spike drill (in-process evaluation)",
              "ws_resume_gaps_delta": gaps_after - gaps_before, "gap_signalled": gap_types == ["Missed", "Snapshot"],
              "in_buffer_replay_ok": in_buf_ok}
    d.write(f"safety-budget-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json",
            {"checks": {"wsResume": budget}, "ok": ok})
    after = d.status("after")
    d.write("ws-resume-smoke.json", {
        "drill": "ws-resume-gap-spike", "edge": "in-process LocalEdge against the stack's NATS",
        "resume_buffer_frames": ring, "last_seen_seq": last_seen,
        "gap_recovery": {"result_type": result_type, "reason": gap_reason, "snapshot_seq": snapshot_seq},
        "in_buffer_recovery": {"result_type": "Replay" if in_buf_ok else "FAILED", "from_seq": in_buf_from,
                               "frames": len(replay)},
        "metrics": {"ws_resume_gaps": gaps_after, "ws_resume_gaps_delta": gaps_after - gaps_before},
        "commands_acked": len(result.acked), "stack_healthy_after": after.get("healthy"),
        "runbook_ws_resume_gap_spike_ok": ok,
    })
    d.emit("gap_recovery_result_type", result_type)
    d.emit("ws_resume_gaps", int(gaps_after))
    d.emit("in_buffer_resume_ok", in_buf_ok)
    d.emit("runbook_ws_resume_gap_spike_ok", ok)
    return ok
