"""`spotex up/status/down` against the real embedded servers, through the CLI an operator uses."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import psutil

from spotex.supervisor import pid_alive
from spotex.testing import spotex_cli, stack


def _stack_pids(data_dir: Path) -> list[int]:
    state = json.loads((data_dir / "run" / "state.json").read_text())
    pids = [state["supervisor_pid"]]
    pids += [c["pid"] for c in state["components"].values() if c.get("pid")]
    return pids


def _procs_using(data_dir: Path) -> list[str]:
    hits = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(data_dir) in cmd:
            hits.append(f"{p.info['pid']}: {cmd[:120]}")
    return hits


async def _write_marks(nats_url: str, dsn: str) -> None:
    import asyncpg
    import nats

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    # A scratch stream of the test's own: EVT belongs to the core and its consumers.
    await js.add_stream(name="PERSIST_MARK", subjects=["persist.mark"])
    await js.publish("persist.mark", b"mark", headers={"Nats-Msg-Id": "persist-mark"})
    await nc.close()
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE persist_mark (v text); INSERT INTO persist_mark VALUES ('kept')")
    await conn.close()


async def _read_marks(nats_url: str, dsn: str) -> tuple[bytes, str]:
    import asyncpg
    import nats

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    msg = await js.get_last_msg("PERSIST_MARK", "persist.mark")
    await nc.close()
    conn = await asyncpg.connect(dsn)
    v = await conn.fetchval("SELECT v FROM persist_mark")
    await conn.close()
    return msg.data, v


def test_up_status_down_and_data_survives_restart(data_dir: Path) -> None:
    with stack(data_dir) as st:
        started = time.monotonic()
        report = st.status()
        assert report["healthy"] is True, report
        names = [c["name"] for c in report["components"]]
        assert names[:3] == ["nats", "postgres", "kafka"]
        for c in report["components"]:
            assert c["healthy"] and c["pid"] and pid_alive(c["pid"]), c
        assert time.monotonic() - started < 30
        pids = _stack_pids(data_dir)
        nats_url = st.endpoint("nats")
        dsn = st.endpoint("postgres")
        asyncio.run(_write_marks(nats_url, dsn))
        # The serving core froze its heap after recovery and again on taking the lease (the standby
        # only after recovery): no full GC pass over the recovered state on the order path.
        for name, reasons in (("core", ["recovered", "leader"]), ("core-standby", ["recovered"])):
            lines = [json.loads(ln) for ln in (data_dir / "logs" / f"{name}.log").read_text().splitlines()
                     if ln.startswith("{")]
            assert [ln["reason"] for ln in lines if ln.get("msg") == "heap frozen"] == reasons, name
        # A second supervisor on the same data dir is refused, not started twice.
        again = st.cli("up", "--detach", "--no-demo", timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr
    # down leaves no process behind
    for pid in pids:
        assert not pid_alive(pid), pid
    assert _procs_using(data_dir) == []
    down = spotex_cli("status", "--json", "--data-dir", str(data_dir))
    assert down.returncode == 1 and json.loads(down.stdout)["healthy"] is False

    # A second `up` on the same data dir sees the first one's data (JetStream and PostgreSQL). This
    # one lowers the priority of PostgreSQL and the ledger (processes.nice): the supervisor applies
    # it to their processes, PostgreSQL's backends inherit it, the order path keeps its own.
    base = os.nice(0)
    with stack(data_dir, env={"SPOTEX_PROCESSES__NICE": '{"postgres": 7, "ledger": 10}'}) as st:
        data, v = asyncio.run(_read_marks(st.endpoint("nats"), st.endpoint("postgres")))
        assert data == b"mark" and v == "kept"
        by_name = {c["name"]: c["pid"] for c in st.status()["components"]}
        pg = psutil.Process(by_name["postgres"])
        assert pg.nice() == base + 7 and pg.children() and all(k.nice() == base + 7 for k in pg.children())
        assert psutil.Process(by_name["ledger"]).nice() == base + 10
        for name in ("nats", "core", "edge"):
            assert psutil.Process(by_name[name]).nice() == base, name
    assert _procs_using(data_dir) == []


def test_configured_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        started = time.monotonic()
        res = spotex_cli("up", "--detach", "--no-demo", "--data-dir", str(tmp_path / "d"),
                         env={"SPOTEX_NATS__PORT": str(port)}, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip() == f"spotex: nats: port {port} on 127.0.0.1 is already in use (set in config)"
    assert time.monotonic() - started < 20


def test_failing_component_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    # An external PostgreSQL that does not answer: start-up fails naming postgres, and the
    # embedded nats-server it had already started is stopped again.
    d = tmp_path / "d"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    res = spotex_cli("up", "--detach", "--no-demo", "--data-dir", str(d),
                     env={"SPOTEX_POSTGRES__DSN": f"postgresql://postgres@127.0.0.1:{dead}/x"}, timeout=120)
    assert res.returncode == 1
    assert res.stderr.startswith("spotex: postgres: not healthy after")
    assert len(res.stderr.strip().splitlines()) == 1
    time.sleep(0.5)
    assert _procs_using(d) == []


def test_status_without_a_stack(tmp_path: Path) -> None:
    res = spotex_cli("status", "--json", "--data-dir", str(tmp_path))
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert report["healthy"] is False
    assert all(c["reason"] == "stack not running" for c in report["components"])
