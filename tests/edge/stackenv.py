"""One real stack (`spotex up`) shared by the edge's end-to-end tests, and the helpers they use to
drive it: API keys through the real CLI, deposits over the real command bus, signed requests, and
an edge restart (SIGKILL the edge process, the supervisor brings it back)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.bus import cmd_subject
from core.wire import Deposit, encode_request
from edge.auth import signed_headers
from spotex.testing import Stack, stack

__all__ = ["IP_RATE", "KEY_BURST", "KEY_RATE", "USD", "Env", "edge_stack"]

USD = 10**8
# Deliberately small limits, so the 429 tests can reach them over real HTTP on a loaded machine.
KEY_RATE, KEY_BURST, IP_RATE = 20, 40, 20


def raw_pub(k: Ed25519PrivateKey) -> str:
    return k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


class Env:
    def __init__(self, st: Stack, op: Ed25519PrivateKey) -> None:
        self.st = st
        self.op = op
        self.op_pub = raw_pub(op)
        comps = {c["name"]: c["endpoint"] for c in st.status()["components"]}
        self.edge = comps["edge"]
        self.nats = comps["nats"]

    def key(self, account: int, scopes: str = "read,trade") -> dict[str, Any]:
        res = self.st.cli("keys", "create", "--account", str(account), "--scopes", scopes, "--json", check=True)
        return dict(json.loads(res.stdout))

    def fund(self, account: int, amounts: dict[str, int]) -> None:
        import nats

        async def go() -> None:
            nc = await nats.connect(self.nats)
            js = nc.jetstream()
            for asset, amt in amounts.items():
                cmd = Deposit(account_id=account, asset=asset, amount=amt)
                await js.publish(cmd_subject(None), encode_request(cmd),
                                 headers={"Nats-Msg-Id": f"fund-{account}-{asset}-{time.time_ns()}"})
            await nc.close()

        asyncio.run(go())
        time.sleep(0.3)

    def req(self, key: dict[str, Any], method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None, client: httpx.Client | None = None) -> httpx.Response:
        b = json.dumps(body).encode() if body is not None else b""
        h = signed_headers(key["api_key"], key["secret"], method, path, b)
        h["content-type"] = "application/json"
        h.update(headers or {})
        if client is not None:
            return client.request(method, self.edge + path, content=b, headers=h)
        return httpx.request(method, self.edge + path, content=b, headers=h, timeout=10)

    def admin(self, method: str, path: str, body: Any = None) -> httpx.Response:
        b = json.dumps(body).encode() if body is not None else b""
        h = signed_headers(self.op_pub, self.op, method, path, b)
        h["content-type"] = "application/json"
        return httpx.request(method, self.edge + path, content=b, headers=h, timeout=10)

    def client_from(self, source_ip: str) -> httpx.Client:
        """An HTTP client whose connections come from another loopback address, so its per-IP
        bucket is its own (the edge sees ``source_ip`` as the client)."""
        return httpx.Client(transport=httpx.HTTPTransport(local_address=source_ip), timeout=10)

    def component(self, name: str) -> dict[str, Any]:
        for c in self.st.status()["components"]:
            if c["name"] == name:
                return dict(c)
        raise KeyError(name)

    def pg_dsn(self) -> str:
        from spotex.cli import _load
        from spotex.supervisor import resolve_endpoints

        env = _load(str(self.st.data_dir), None)
        return str(resolve_endpoints(env.cfg, env.data).pg_dsn)

    def settled_fills(self, account: int) -> int:
        """Fills of ``account`` the ledger has committed to ledger_trades (a self-trade counts twice)."""
        import asyncpg

        async def go() -> int:
            conn = await asyncpg.connect(self.pg_dsn())
            try:
                return int(await conn.fetchval(
                    "SELECT (SELECT count(*) FROM ledger_trades WHERE taker_account_id = $1) + "
                    "(SELECT count(*) FROM ledger_trades WHERE maker_account_id = $1)", account))
            finally:
                await conn.close()

        return asyncio.run(go())

    def restart_edge(self, timeout: float = 90.0) -> None:
        """SIGKILL the edge (no graceful anything) and wait until the supervisor has it ready again."""
        c = self.component("edge")
        pid, restarts = int(c["pid"]), int(c.get("restarts", 0))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)
            c = self.component("edge")
            if int(c.get("restarts", 0)) <= restarts or not c.get("pid") or int(c["pid"]) == pid:
                continue
            self.edge = c["endpoint"]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.edge + "/readyz", timeout=2).status_code == 200:
                    return
        raise AssertionError(f"edge not ready again {timeout}s after SIGKILL: {c}")


@contextlib.contextmanager
def edge_stack(data_dir: Path) -> Iterator[Env]:
    op = Ed25519PrivateKey.generate()
    env = {
        "SPOTEX_SECURITY__ADMIN_KEYS": json.dumps({raw_pub(op): ["operator", "approver", "viewer"]}),
        "SPOTEX_EDGE__RATE_LIMIT_PER_S": str(KEY_RATE),
        "SPOTEX_EDGE__RATE_LIMIT_BURST": str(KEY_BURST),
        "SPOTEX_EDGE__IP_RATE_LIMIT_PER_S": str(IP_RATE),
    }
    with stack(data_dir, env=env) as st:
        yield Env(st, op)
