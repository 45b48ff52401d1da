"""Shared pieces of the runbook-as-code drills: a stack to run against, evidence files, load.

Every drill writes its evidence under ``build/runbooks/<drill>/`` (status-before.json,
status-after.json, a summary JSON) and prints ``key=value`` lines ending with its success line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotex.config import Config, load_config
from spotex.paths import DataDir
from spotex.supervisor import Endpoints, resolve_endpoints

__all__ = ["Drill", "LoadResult", "drill_stack", "journal_commands", "publish_load", "service_status",
           "stream_messages", "wait_until"]


def _cli(data_dir: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotex", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class Drill:
    name: str
    data_dir: Path
    cfg: Config
    out_dir: Path
    lines: list[str] = field(default_factory=list)

    @property
    def data(self) -> DataDir:
        return DataDir(self.data_dir)

    @property
    def endpoints(self) -> Endpoints:
        return resolve_endpoints(self.cfg, self.data)

    def status(self, label: str) -> dict[str, Any]:
        res = _cli(self.data_dir, "status", "--json")
        report = json.loads(res.stdout) if res.stdout.strip() else {"healthy": False, "error": res.stderr}
        (self.out_dir / f"status-{label}.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        return dict(report)

    def emit(self, key: str, value: Any) -> None:
        text = json.dumps(value) if isinstance(value, (dict, list)) else (
            ("true" if value else "false") if isinstance(value, bool) else str(value))
        line = f"{key}={text}"
        self.lines.append(line)
        print(line, flush=True)

    def write(self, name: str, data: dict[str, Any]) -> Path:
        path = self.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        return path

    def component(self, name: str) -> dict[str, Any]:
        state = self.data.read_state() or {}
        return dict((state.get("components") or {}).get(name) or {})


@contextlib.contextmanager
def drill_stack(name: str, data_dir: str | None = None, out_dir: str | None = None,
                config: str | None = None) -> Iterator[Drill]:
    """Use the stack running on ``data_dir``, or start a fresh one (no demo) in a temp dir."""
    out = Path(out_dir or os.environ.get("SPOTEX_RUNBOOK_OUT") or f"build/runbooks/{name}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config or os.environ.get("SPOTEX_CONFIG"))
    own = None
    if data_dir:
        d = Path(data_dir).resolve()
        if _cli(d, "status", "--json").returncode != 0:
            raise SystemExit(f"spotex: no healthy stack on {d} (start one with spotex up --detach)")
    else:
        own = tempfile.mkdtemp(prefix=f"spotex-drill-{name}-")
        d = Path(own)
        res = _cli(d, "up", "--detach", "--no-demo")
        if res.returncode != 0:
            import shutil

            logs = d / "logs"
            for log in sorted(logs.glob("*.log")) if logs.exists() else []:
                shutil.copy2(log, out / f"failed-start-{log.name}")
            shutil.rmtree(own, ignore_errors=True)
            raise SystemExit(f"spotex: could not start a stack for the drill: {res.stderr.strip()} "
                             f"(logs copied to {out})")
    try:
        yield Drill(name, d, cfg, out)
    finally:
        if own is not None:
            _cli(d, "down")
            import shutil

            shutil.rmtree(own, ignore_errors=True)


@dataclass
class LoadResult:
    sent: int = 0
    acked: list[str] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0


async def publish_load(nats_url: str, cmds: list[Any], rate: float, prefix: str,
                       stop: asyncio.Event | None = None) -> LoadResult:
    """Publish commands to CMD at ``rate``/s with unique ids; 'acked' are those JetStream stored."""
    import nats

    from core.bus import cmd_subject
    from core.wire import encode_request

    res = LoadResult()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    t0 = time.perf_counter()
    pending: list[tuple[str, Any]] = []
    try:
        for i, cmd in enumerate(cmds):
            if stop is not None and stop.is_set():
                break
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            mid = f"{prefix}-{i}"
            try:
                fut = await js.publish_async(cmd_subject(getattr(cmd, "symbol", None)), encode_request(cmd),
                                             headers={"Nats-Msg-Id": mid})
                pending.append((mid, fut))
                res.sent += 1
            except Exception:
                res.errors += 1
            if len(pending) >= 256:
                await _settle(pending, res)
        await _settle(pending, res)
    finally:
        res.seconds = time.perf_counter() - t0
        await nc.close()
    return res


async def _settle(pending: list[tuple[str, Any]], res: LoadResult) -> None:
    for mid, fut in pending:
        try:
            await asyncio.wait_for(fut, 10)
            res.acked.append(mid)
        except Exception:
            res.errors += 1
    pending.clear()


async def stream_messages(nats_url: str, stream: str) -> list[bytes]:
    """Every message body of a JetStream stream, in order."""
    import nats

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    out: list[bytes] = []
    try:
        info = await js.stream_info(stream)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append(msg.data or b"")
    finally:
        await nc.close()
    return out


async def journal_commands(nats_url: str) -> list[Any]:
    """Every journal record on SEQ, in order."""
    from core.node import JOURNAL_STREAM
    from core.recovery import decode_journal

    return [r for data in await stream_messages(nats_url, JOURNAL_STREAM) for r in decode_journal(data)]


async def service_status(url: str) -> dict[str, Any] | None:
    """GET <probe>/status of a service, None if it does not answer."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=2) as client:
            r = await client.get(f"{url}/status")
            if r.status_code == 200:
                return dict(r.json())
    except httpx.HTTPError:
        return None
    return None


async def wait_until(pred: Any, timeout: float, what: str | None = None, every: float = 0.25) -> Any:
    """Poll the async ``pred`` until it returns something truthy (returned). At the timeout: raise
    ``RuntimeError("timed out waiting for <what>")``, or return None when ``what`` is None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = await pred()
        if v:
            return v
        await asyncio.sleep(every)
    if what is None:
        return None
    raise RuntimeError(f"timed out waiting for {what}")
