"""Trading core drills (seed §4.1 "Core only", §3.3 split brain).

``spotex drill core-kill-recover``: kill -9 the leading core under load, restart it on the same
data dir: the hash it recovers equals the hash of the WAL it left behind (``core_recovery_hash``),
and every command JetStream acknowledged is sequenced exactly once.

``spotex drill split-brain``: SIGSTOP the leader past its lease, let the standby take over,
SIGCONT the old leader: its writes are refused with FENCING_TOKEN and EVT holds exactly the
events of the committed journal (zero stale events).
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from runbooks.common import Drill, journal_commands, publish_load, service_status, stream_messages, wait_until

__all__ = ["core_kill_recover", "split_brain"]

CORE_NODES = ("core", "core-standby")


async def _roles(d: Drill) -> dict[str, dict[str, Any]]:
    out = {}
    for n in CORE_NODES:
        c = d.component(n)
        if c.get("endpoint"):
            st = await service_status(c["endpoint"])
            if st is not None:
                out[n] = {**st, "pid": c.get("pid"), "restarts": c.get("restarts", 0)}
    return out


async def _leader(d: Drill, timeout: float = 30) -> tuple[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for n, st in (await _roles(d)).items():
            if st.get("role") == "leader":
                return n, st
        await asyncio.sleep(0.2)
    raise RuntimeError("no core node is leading")


async def _wait(pred: Any, timeout: float, what: str) -> Any:
    return await wait_until(pred, timeout, what, every=0.2)


def _exactly_once(acked: list[str], journal: list[Any]) -> tuple[int, int]:
    counts = collections.Counter(r.cmd.correlation_id for r in journal)
    lost = sum(1 for a in acked if counts.get(a, 0) == 0)
    dup = sum(1 for a in acked if counts.get(a, 0) > 1)
    return lost, dup


async def _settled_journal(d: Drill, acked: list[str], timeout: float = 60) -> list[Any]:
    """The journal once every acked command is in it (or the deadline passed: then judge as is)."""
    deadline = time.monotonic() + timeout
    while True:
        journal = await journal_commands(d.endpoints.nats_url)
        have = {r.cmd.correlation_id for r in journal}
        if all(a in have for a in acked) or time.monotonic() > deadline:
            return journal
        await asyncio.sleep(0.5)


async def _converged(d: Drill, journal_last: int) -> bool:
    roles = await _roles(d)
    return len(roles) == len(CORE_NODES) and all(st.get("last_seq") == journal_last for st in roles.values())


def _commands(n: int, seed: int) -> list[Any]:
    from core.sim import generate

    return generate(seed, n)


async def core_kill_recover(d: Drill, commands: int = 3000, rate: float = 600.0, seed: int = 1) -> bool:
    from core.recovery import recover

    d.status("before")
    victim, _ = await _leader(d)
    pid = int(d.component(victim)["pid"])
    restarts_before = int(d.component(victim).get("restarts", 0))
    cmds = _commands(commands, seed)
    load = asyncio.create_task(publish_load(d.endpoints.nats_url, cmds, rate, f"kill-{int(time.time())}"))
    # Let a third of the load through, then kill -9 the leader in the middle of it.
    await asyncio.sleep(commands / rate / 3)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    # Freeze what the dead process left on disk before the supervisor restarts it.
    node_dir = d.data_dir / victim
    frozen = Path(tempfile.mkdtemp(prefix="spotex-precrash-"))
    for sub in ("wal", "snapshots"):
        if (node_dir / sub).exists():
            shutil.copytree(node_dir / sub, frozen / sub, ignore=shutil.ignore_patterns("wal.lock"))
    pre = await asyncio.to_thread(recover, frozen, keep_events=False)
    pre_hash, pre_seq = pre.engine.state_hash(), pre.engine.last_seq
    shutil.rmtree(frozen, ignore_errors=True)

    async def restarted() -> dict[str, Any] | None:
        comp = d.component(victim)
        if int(comp.get("restarts", 0)) <= restarts_before or not comp.get("endpoint"):
            return None
        s = await service_status(comp["endpoint"])
        return s if s and s.get("recovered") and s.get("role") in ("leader", "standby") else None

    back = await _wait(restarted, 60, f"{victim} to restart")
    rec = back["recovered"]
    result = await load
    journal = await _settled_journal(d, result.acked)
    last = journal[-1].cmd.seq if journal else 0
    await _wait(lambda: _converged(d, last), 60, "both core nodes to reach the journal's end")
    lost, dup = _exactly_once(result.acked, journal)
    journal_seqs = [r.cmd.seq for r in journal]
    ok = (rec["state_hash"] == pre_hash and rec["last_seq"] == pre_seq and lost == 0 and dup == 0
          and journal_seqs == list(range(1, len(journal_seqs) + 1)) and len(result.acked) > 0)
    after = d.status("after")
    summary = {
        "drill": "core-kill-recover", "victim": victim, "killed_pid": pid, "killed_at": killed_at,
        "core_precrash_wal_hash": pre_hash, "core_precrash_wal_seq": pre_seq,
        "core_recovery_hash": rec["state_hash"], "core_recovery_seq": rec["last_seq"],
        "recovery_seconds": rec.get("seconds"), "replayed": rec.get("replayed"),
        "commands_sent": result.sent, "commands_acked": len(result.acked), "publish_errors": result.errors,
        "lost_acked_commands": lost, "duplicate_commands": dup, "journal_last_seq": last,
        "stack_healthy_after": after.get("healthy"), "core_kill_recover_ok": ok,
    }
    d.write("core-kill-recover-summary.json", summary)
    for k in ("victim", "core_precrash_wal_hash", "core_recovery_hash", "core_recovery_seq", "commands_acked",
              "lost_acked_commands", "duplicate_commands"):
        d.emit(k, summary[k])
    d.emit("core_recovery_hash_matches", rec["state_hash"] == pre_hash)
    d.emit("core_kill_recover_ok", ok)
    return ok


def _count_fencing(log_path: Path, since_offset: int) -> int:
    try:
        with open(log_path, "rb") as f:
            f.seek(since_offset)
            return sum(1 for line in f if b"FENCING_TOKEN" in line and b"write refused" in line)
    except FileNotFoundError:
        return 0


async def _stop_while_busy(d: Drill, pid: int, timeout: float = 3.0) -> bool:
    """SIGSTOP the leader while it holds delivered-but-unacked commands (a batch in flight), so
    that on SIGCONT it carries on writing as a paused stale leader would. False if it never looked
    busy within ``timeout`` (it is then stopped anyway)."""
    import nats

    nc = await nats.connect(d.endpoints.nats_url)
    js = nc.jetstream()
    busy = False
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await js.consumer_info(d.cfg.nats.cmd_stream, "core")
            if info.num_ack_pending > 0:
                busy = True
                break
    finally:
        os.kill(pid, signal.SIGSTOP)
        await nc.close()
    return busy


async def split_brain(d: Drill, commands: int = 4000, rate: float = 800.0, seed: int = 2,
                      episodes: int = 4) -> bool:
    """Repeat SIGSTOP-past-the-lease episodes until the stale leader's write is refused at least once.
    A stale leader that stands down without writing (its renewal noticed first and nothing was in
    flight) is correct too; it just leaves nothing for the fence to refuse, so we try again."""
    from core.engine import Engine
    from core.wire import decode_events

    d.status("before")
    stop_load = asyncio.Event()
    cmds = _commands(commands, seed)
    load = asyncio.create_task(publish_load(d.endpoints.nats_url, cmds, rate, f"split-{int(time.time())}",
                                            stop_load))
    await asyncio.sleep(1.0)
    runs: list[dict[str, Any]] = []
    fencing = 0
    try:
        for _ in range(episodes):
            old, st = await _leader(d)
            other = next(n for n in CORE_NODES if n != old)
            pid = int(d.component(old)["pid"])
            restarts = int(d.component(old).get("restarts", 0))
            log_path = d.data_dir / "logs" / f"{old}.log"
            log_offset = log_path.stat().st_size if log_path.exists() else 0
            busy = await _stop_while_busy(d, pid)
            stopped_at = time.time()
            try:
                async def taken_over(other: str = other) -> dict[str, Any] | None:
                    s = (await _roles(d)).get(other)
                    return s if s and s.get("role") == "leader" else None

                new = await _wait(taken_over, 30, f"{other} to take over the lease")
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed_at = time.time()

            async def back(old: str = old, restarts: int = restarts) -> bool:
                comp = d.component(old)
                if int(comp.get("restarts", 0)) <= restarts:
                    return False
                s = await service_status(comp.get("endpoint", ""))
                return bool(s and s.get("role") == "standby")

            await _wait(back, 120, f"{old} to come back as a standby")  # a restart recovers + catches up
            refused = _count_fencing(log_path, log_offset)
            fencing += refused
            runs.append({"old_leader": old, "new_leader": other, "old_token": st.get("fencing_token"),
                         "new_token": new.get("fencing_token"), "stopped_while_busy": busy,
                         "sigstop_at": stopped_at, "sigcont_at": resumed_at, "fencing_rejections": refused,
                         "outcome": "write refused: FENCING_TOKEN" if refused else "stood down without writing"})
            if fencing:
                break
    finally:
        stop_load.set()
        result = await load
    journal = await _settled_journal(d, result.acked)
    last = journal[-1].cmd.seq if journal else 0
    await _wait(lambda: _converged(d, last), 60, "both core nodes to reach the journal's end")
    lost, dup = _exactly_once(result.acked, journal)

    # Zero stale events: EVT holds exactly what replaying the committed journal produces.
    engine = Engine(checkpoint_every=d.cfg.core.checkpoint_every_commands)
    expected: dict[str, list[Any]] = {}
    for r in journal:
        for e in engine.apply(r.cmd):
            expected.setdefault(e.symbol, []).append(e)
    actual = await _evt_events(d.endpoints.nats_url, d.cfg.nats.evt_stream, decode_events)
    stale = sum(abs(len(actual.get(s, [])) - len(expected.get(s, []))) for s in set(actual) | set(expected))
    mismatched = sorted(s for s in set(actual) | set(expected) if actual.get(s, []) != expected.get(s, []))
    tokens_grow = all((r["new_token"] or 0) > (r["old_token"] or 0) for r in runs)
    ok = fencing >= 1 and not mismatched and lost == 0 and dup == 0 and tokens_grow
    after = d.status("after")
    summary = {
        "drill": "split-brain", "episodes": runs, "fencing_rejections": fencing, "stale_events_on_evt": stale,
        "mismatched_streams": mismatched, "commands_acked": len(result.acked), "lost_acked_commands": lost,
        "duplicate_commands": dup, "tokens_increase": tokens_grow, "stack_healthy_after": after.get("healthy"),
        "split_brain_ok": ok,
    }
    if fencing == 0:
        summary["reason"] = f"in {len(runs)} episodes the stale leader never wrote after SIGCONT"
    d.write("split-brain-summary.json", summary)
    last_run = runs[-1] if runs else {}
    for k in ("old_leader", "new_leader", "old_token", "new_token"):
        d.emit(k, last_run.get(k))
    d.emit("episodes", len(runs))
    for k in ("fencing_rejections", "stale_events_on_evt", "lost_acked_commands", "duplicate_commands"):
        d.emit(k, summary[k])
    d.emit("split_brain_ok", ok)
    return ok


async def _evt_events(nats_url: str, stream: str, decode: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for data in await stream_messages(nats_url, stream):
        evs = decode(data)
        out.setdefault(evs[0].symbol, []).extend(evs)
    return out
