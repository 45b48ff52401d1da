from __future__ import annotations

import asyncio
import gc
import json
import logging
import time

from core.obs import JsonFormatter, ProbeServer, freeze_heap, loop_lag_monitor, redact
from spotex.embedded import check_http


def test_redact_masks_secret_keys_and_values() -> None:
    data = {
        "dsn": "postgresql://u:pw@h/db",
        "nested": {"api_key": "k", "note": "mail bob@example.com now"},
        "url": "nats://user:pass@nats:4222",
        "sig": "ab" * 32,
        "qty": 5,
    }
    out = redact(data)
    assert out["dsn"] == "***"
    assert out["nested"]["api_key"] == "***"
    assert "bob@example.com" not in out["nested"]["note"]
    assert out["url"] == "nats://***:***@nats:4222"
    assert out["sig"] == "***"
    assert out["qty"] == 5


def test_public_keys_stay_readable() -> None:
    h = "ab" * 32
    out = redact({"fencing_token": 7, "state_hash": h, "nested": {"token": "t", "sig": h}})
    assert out["fencing_token"] == 7 and out["state_hash"] == h
    assert out["nested"] == {"token": "***", "sig": "***"}


def test_json_formatter_redacts_extras() -> None:
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "login from %s", ("alice@example.com",), None)
    rec.password = "p4ss"
    line = json.loads(JsonFormatter("edge").format(rec))
    assert line["service"] == "edge" and line["level"] == "INFO"
    assert "alice@example.com" not in line["msg"]
    assert line["password"] == "***"


async def test_probe_server_ready_and_not_ready() -> None:
    state = {"reason": "postgres: connection refused"}

    async def dep() -> str | None:
        return state["reason"]

    srv = ProbeServer("127.0.0.1", 0, service="t", readiness=[("db", dep)])
    port = await srv.start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert await check_http(base + "/healthz") is None
        reason = await check_http(base + "/readyz")
        assert reason is not None and "503" in reason and "connection refused" in reason
        state["reason"] = None
        assert await check_http(base + "/readyz") is None
        assert await check_http(base + "/metrics") is None
        missing = await check_http(base + "/nope")
        assert missing is not None and "404" in missing
    finally:
        await srv.stop()
    await asyncio.sleep(0)


async def test_loop_lag_monitor_sees_a_blocked_loop() -> None:
    """A callback that holds the loop for 80 ms makes the monitor's next wakeup at least 60 ms late
    (it blocks somewhere inside one 20 ms sleep)."""
    seen: list[float] = []
    stop = asyncio.Event()
    mon = asyncio.create_task(loop_lag_monitor(0.02, stop, seen.append))
    await asyncio.sleep(0.1)
    idle = list(seen)
    assert idle  # it samples
    await asyncio.sleep(0.005)
    time.sleep(0.08)  # blocks the loop, as a long callback would
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(mon, 1)
    assert max(seen[len(idle):]) >= 0.05


async def test_probe_server_exports_the_loop_lag() -> None:
    srv = ProbeServer("127.0.0.1", 0, service="t")
    port = await srv.start()
    try:
        await asyncio.sleep(0.3)  # one sample (every 0.25 s)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = (await reader.read()).decode()
        writer.close()
        assert "event_loop_lag_seconds_count" in body
    finally:
        await srv.stop()
    assert srv._lag is None


def test_freeze_heap_freezes_and_sets_only_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        freeze_heap(logging.getLogger("test"), "test", gen0_threshold=before[0] * 3 + 1)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (before[0] * 3 + 1, before[1], before[2])
        freeze_heap(logging.getLogger("test"), "test")  # 0: the thresholds stay as they are
        assert gc.get_threshold() == (before[0] * 3 + 1, before[1], before[2])
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def test_gc_timer_reports_each_generations_pause_time_and_worst_pause() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from core.obs import _GcTimer

    timer = _GcTimer()
    reg = CollectorRegistry()
    reg.register(timer)
    gc.callbacks.append(timer)
    try:
        junk = []
        for _ in range(2000):  # cycles only the collector can free
            a: list[object] = []
            a.append(a)
            junk.append(a)
        del junk, a
        gc.collect()
    finally:
        gc.callbacks.remove(timer)
    assert timer.total_s[2] > 0 and 0 < timer.max_s[2] <= timer.total_s[2]
    text = generate_latest(reg).decode()
    assert f'python_gc_pause_seconds_total{{generation="2"}} {timer.total_s[2]!r}' in text
    assert f'python_gc_pause_max_seconds{{generation="2"}} {timer.max_s[2]!r}' in text
    assert 'python_gc_pause_seconds_total{generation="0"}' in text
