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

__all__ = ["Drill", "LoadResult", "Trader", "drill_stack", "jobs_context", "journal_commands", "publish_load",
           "service_status", "stream_messages", "wait_until"]


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

    def conclude(self, summary_file: str, ok_key: str, steps: dict[str, bool], order: tuple[str, ...],
                 action: str, success_line: str, **extra: Any) -> bool:
        """The end of a step-by-step drill: the summary (``ok_key``, per-step results, failed steps,
        ``recommended_action`` and ``extra``) and the lines ``<ok_key without _ok>_<step>=``,
        ``failed_step_count=``, ``recommended_action=`` and the success line. Returns the verdict."""
        failed = [k for k in order if not steps.get(k)]
        ok = not failed
        self.write(summary_file, {ok_key: ok, "recommended_action": action,
                                  "steps": {k: bool(steps.get(k)) for k in order}, "failed_steps": failed,
                                  "failed_step_count": len(failed), **extra})
        prefix = ok_key.removesuffix("_ok")
        for k in order:
            self.emit(f"{prefix}_{k}", bool(steps.get(k)))
        self.emit("failed_step_count", len(failed))
        self.emit("recommended_action", action)
        self.emit(success_line, ok)
        return ok

    def component(self, name: str) -> dict[str, Any]:
        state = self.data.read_state() or {}
        return dict((state.get("components") or {}).get(name) or {})

    async def ready(self, name: str) -> dict[str, Any] | None:
        """The component's /status while it runs and answers (``{"ready": true}`` for a service
        with no /status, such as the edge, once its /readyz answers 200), else None."""
        import httpx

        c = self.component(name)
        if not (c.get("endpoint") and c.get("pid")):
            return None
        status = await service_status(c["endpoint"])
        if status is not None:
            return status
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                return {"ready": True} if (await client.get(f"{c['endpoint']}/readyz")).status_code == 200 else None
        except httpx.HTTPError:
            return None

    async def kill9(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """kill -9 the component and wait for the supervisor to restart it and for it to answer
        /status. Returns the pid killed, the seconds until it answered again, and that status."""
        import signal

        c = self.component(name)
        if not c.get("pid"):
            raise RuntimeError(f"no {name} service in this stack")
        pid, restarts, at = int(c["pid"]), int(c.get("restarts", 0)), time.time()
        os.kill(pid, signal.SIGKILL)

        async def restarted() -> dict[str, Any] | None:
            return await self.ready(name) if int(self.component(name).get("restarts", 0)) > restarts else None

        status = await wait_until(restarted, timeout, f"the supervisor to restart the {name}")
        return {"pid": pid, "at": at, "restarted_after_s": round(time.time() - at, 2), "status_after_restart": status}


def _keep_logs(data_dir: Path, out: Path, prefix: str) -> None:
    """Copy a private stack's service logs into the evidence directory before the stack is deleted."""
    import shutil

    logs = data_dir / "logs"
    for log in sorted(logs.glob("*.log")) if logs.exists() else []:
        with contextlib.suppress(OSError):
            shutil.copy2(log, out / f"{prefix}{log.name}")


@contextlib.contextmanager
def drill_stack(name: str, data_dir: str | None = None, out_dir: str | None = None,
                config: str | None = None) -> Iterator[Drill]:
    """Use the stack running on ``data_dir``, or start a fresh one (no demo) in a temp dir. A fresh
    stack's service logs are kept in the evidence directory (``stack-logs/``) when it is torn down,
    so a failed drill can be diagnosed after its stack is gone."""
    import shutil

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
            _keep_logs(d, out, "failed-start-")
            shutil.rmtree(own, ignore_errors=True)
            raise SystemExit(f"spotex: could not start a stack for the drill: {res.stderr.strip()} "
                             f"(logs copied to {out})")
    try:
        yield Drill(name, d, cfg, out)
    finally:
        if own is not None:
            _cli(d, "down")
            (out / "stack-logs").mkdir(exist_ok=True)
            _keep_logs(d, out / "stack-logs", "")
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


async def jobs_context(d: Drill, **kw: Any) -> tuple[Any, list[Any]]:
    """The scheduled checks' context (PostgreSQL pool, JetStream, evidence dir) on the drill's stack,
    and what to close after (``jobs.scheduler.close_context``)."""
    from jobs.scheduler import make_context, open_context

    ep = d.endpoints
    try:
        edge: str | None = ep.probe_url("edge") + "/metrics"
    except KeyError:
        edge = None
    ctx = make_context(d.cfg, d.data_dir, pg_dsn=ep.pg_dsn, nats_url=ep.nats_url, edge_metrics_url=edge,
                       evidence_dir=d.out_dir, **kw)
    return ctx, await open_context(ctx)


class Trader:
    """A funded trader with an Ed25519 API key, placing signed REST orders through the real edge to
    observe what the policy does to new orders and cancels."""

    def __init__(self, http: Any, key: str, pk: Any, account_id: int = 0, tag: str = "drill") -> None:
        self.http, self.key, self.pk = http, key, pk
        self.account_id, self.tag = account_id, tag
        self.n = self.last_ts = 0

    @classmethod
    async def create(cls, d: Drill, pool: Any, nats_url: str, edge_url: str) -> Trader:
        import secrets

        import httpx
        import nats
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from core.bus import cmd_subject
        from core.wire import Deposit, encode_request
        from edge.app import master_key_path
        from edge.auth import KeyStore, SecretBox

        acct = 3_500_000_000 + secrets.randbelow(10**8)
        box = SecretBox.from_file(master_key_path(d.cfg, d.data_dir), create=not d.cfg.production)
        pk = Ed25519PrivateKey.generate()
        pub = pk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
        ck = await KeyStore(pool, box).create(acct, ["read", "trade"], label=d.name, ed25519_public_key=pub)
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            quotes = {m.quote for m in d.cfg.markets}
            for a in d.cfg.assets:
                if a.symbol in quotes:
                    await js.publish(cmd_subject(None), encode_request(Deposit(
                        account_id=acct, asset=a.symbol, amount=10**9 * 10**a.decimals, reference=f"{d.name}-{acct}")),
                        headers={"Nats-Msg-Id": f"{d.name}-fund-{acct}-{a.symbol}"})
        finally:
            await nc.close()
        return cls(httpx.AsyncClient(base_url=edge_url, timeout=15), ck.api_key, pk, acct, d.name)

    async def close(self) -> None:
        await self.http.aclose()

    async def req(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        from edge.auth import signed_headers

        raw = json.dumps(body).encode() if body is not None else b""
        # Each request signed anew with its own timestamp, as a client's retry is: two identical
        # requests in the same millisecond would carry the same signature (AUTH_REPLAY).
        self.last_ts = max(int(time.time() * 1000), self.last_ts + 1)
        h = signed_headers(self.key, self.pk, method, path, raw, ts_ms=self.last_ts)
        h["content-type"] = "application/json"
        return await self.http.request(method, path, content=raw, headers={**h, **(headers or {})})

    async def plan(self, symbol: str) -> tuple[str, str]:
        """(price, quantity) of a small post-only BUY that rests: at the best bid, else a tick under
        the best ask; worth about twice the minimum notional."""
        from decimal import ROUND_CEILING, Decimal

        mkt = next(m for m in (await self.http.get("/v1/markets")).json() if m["symbol"] == symbol)
        book = (await self.http.get(f"/v1/markets/{symbol}/orderbook", params={"depth": 20})).json()
        tick, lot = Decimal(mkt["tickSize"]), Decimal(mkt["lotSize"])
        if book.get("bids"):
            price = Decimal(book["bids"][0][0])
        elif book.get("asks"):
            price = Decimal(book["asks"][0][0]) - tick
        else:
            price = Decimal(100)
        price = price.quantize(tick)
        qty = max(lot, (Decimal(mkt["minNotional"]) * 2 / price / lot).to_integral_value(ROUND_CEILING) * lot)
        return str(price), str(qty)

    def order_body(self, symbol: str, plan: tuple[str, str], client_order_id: str | None = "") -> dict[str, Any]:
        """A resting post-only BUY; a fresh client order id unless one is given (None: no id)."""
        if client_order_id == "":
            self.n += 1
            client_order_id = f"{self.tag}-{self.n}"
        body = {"symbol": symbol, "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "postOnly": True,
                "price": plan[0], "quantity": plan[1]}
        return body if client_order_id is None else {**body, "clientOrderId": client_order_id}

    async def order(self, symbol: str, plan: tuple[str, str], *, body: dict[str, Any] | None = None,
                    idempotency_key: str | None = None) -> tuple[int, str | None, Any]:
        """(HTTP status, problem code or None, body); the body also carries ``_replayed`` (the
        Idempotent-Replayed header) and, on a refusal, ``_retry_after``."""
        hdrs = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        r = await self.req("POST", "/v1/orders", body or self.order_body(symbol, plan), headers=hdrs)
        out = r.json()
        out["_replayed"] = r.headers.get("idempotent-replayed") == "true"
        if r.status_code >= 400:
            out["_retry_after"] = r.headers.get("retry-after")
        return r.status_code, (out.get("code") if r.status_code >= 400 else None), out

    async def cancel(self, order_id: int) -> int:
        return int((await self.req("DELETE", f"/v1/orders/{order_id}")).status_code)

    async def cancel_outcome(self, order_id: int) -> str:
        """``canceled``; ``filled`` when the order traded away before the cancel arrived (the market
        is live: that is not a refusal, and the order's own status says so); else what refused it
        (the problem code, or the HTTP status)."""
        r = await self.req("DELETE", f"/v1/orders/{order_id}")
        if r.status_code == 200:
            return "canceled"
        code = str(r.json().get("code") or r.status_code)
        if code == "ORDER_ALREADY_CLOSED":
            g = await self.req("GET", f"/v1/orders/{order_id}")
            if g.status_code == 200 and g.json().get("status") == "FILLED":
                return "filled"
        return code

    async def probe(self, symbol: str, want: str, timeout: float = 20.0, limit: int = 40) -> dict[str, Any]:
        """Place orders on ``symbol`` until one is refused with ``want``; cancel what rested (each
        cancel must pass). A SYMBOL_THROTTLED while looking for something else waits Retry-After.
        ``cancels_ok`` counts the cancels not refused: canceled, or filled by the live market before
        the cancel arrived (``cancel_outcomes`` says which)."""
        plan = await self.plan(symbol)
        out: dict[str, Any] = {"symbol": symbol, "want": want, "seen": False, "orders": 0, "statuses": {},
                               "cancels": 0, "cancels_ok": 0, "cancel_outcomes": {},
                               "price": plan[0], "quantity": plan[1]}
        resting: list[int] = []
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        while time.monotonic() < deadline and out["orders"] < limit and not out["seen"]:
            status, code, body = await self.order(symbol, plan)
            out["orders"] += 1
            label = code or str(status)
            out["statuses"][label] = out["statuses"].get(label, 0) + 1
            if status == 201 and body.get("status") in ("NEW", "PARTIALLY_FILLED"):
                resting.append(int(body["orderId"]))
            if code == want:
                out["seen"] = True
                out["after_s"] = round(time.monotonic() - t0, 3)
                out["detail"] = body.get("detail")
                out["retry_after"] = body.get("_retry_after")
            elif code == "SYMBOL_THROTTLED":
                await asyncio.sleep(1.0)
        for oid in resting:
            out["cancels"] += 1
            outcome = await self.cancel_outcome(oid)
            out["cancel_outcomes"][outcome] = out["cancel_outcomes"].get(outcome, 0) + 1
            out["cancels_ok"] += outcome in ("canceled", "filled")
        return out

    async def burst(self, symbol: str, n: int) -> dict[str, Any]:
        """``n`` orders back to back (then canceled): none may be refused by a throttle or a halt."""
        statuses: dict[str, int] = {}
        resting: list[int] = []
        plan = await self.plan(symbol)
        for _ in range(n):
            status, code, body = await self.order(symbol, plan)
            statuses[code or str(status)] = statuses.get(code or str(status), 0) + 1
            if status == 201 and body.get("status") in ("NEW", "PARTIALLY_FILLED"):
                resting.append(int(body["orderId"]))
        ok = [await self.cancel(oid) == 200 for oid in resting]
        blocked = sum(statuses.get(c, 0) for c in ("SYMBOL_THROTTLED", "MARKET_HALTED", "CANCEL_ONLY"))
        return {"symbol": symbol, "orders": n, "statuses": statuses, "accepted": statuses.get("201", 0),
                "cancels_ok": all(ok), "flowing": blocked == 0 and statuses.get("201", 0) > 0}
