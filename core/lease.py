"""Leader lease in a JetStream KV bucket; the revision at acquisition is the fencing token.

The bucket has a TTL (``lease_ttl_ms``): a leader renews with a compare-and-set on the revision it
last saw; if it stops renewing (crash, SIGSTOP, partition) the entry expires and a standby's
``create`` succeeds with a higher revision. Revisions only grow, so a stale leader's token is always
lower than the current one: the engine rejects its commands with ``FENCING_TOKEN`` and JetStream
rejects its event publishes (``Nats-Expected-Last-Subject-Sequence``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Lease", "LeaseInfo", "LeaseLost"]

log = logging.getLogger("core.lease")

LEASE_KEY = "leader"


class LeaseLost(Exception):
    """The lease was taken over or expired; the holder must stop writing at once."""


@dataclass(frozen=True)
class LeaseInfo:
    node: str
    token: int
    revision: int
    acquired_ms: int


class Lease:
    def __init__(self, kv: Any, node: str) -> None:
        self.kv = kv
        self.node = node
        self.token: int | None = None
        self.revision: int | None = None
        self.acquired_ms = 0
        self.last_renew_mono = 0.0

    @property
    def held(self) -> bool:
        return self.token is not None

    def _value(self, token: int) -> bytes:
        return json.dumps({"node": self.node, "token": token, "acquired_ms": self.acquired_ms}).encode()

    async def try_acquire(self) -> bool:
        """Create the lease entry if nobody holds it. Returns True when we are now the leader."""
        from nats.js.errors import KeyWrongLastSequenceError

        self.acquired_ms = int(time.time() * 1000)
        try:
            rev = await self.kv.create(LEASE_KEY, self._value(0))
        except KeyWrongLastSequenceError:
            return False
        # The token is the creation revision; write it into the value so observers can read it.
        try:
            rev2 = await self.kv.update(LEASE_KEY, self._value(rev), last=rev)
        except KeyWrongLastSequenceError:
            return False
        self.token, self.revision = rev, rev2
        self.last_renew_mono = time.monotonic()
        log.info("lease acquired", extra={"node": self.node, "fencing_token": rev})
        return True

    async def renew(self) -> None:
        """Compare-and-set on our last revision; raises LeaseLost if someone else holds it now."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        if self.token is None or self.revision is None:
            raise LeaseLost("not the leader")
        try:
            self.revision = await self.kv.update(LEASE_KEY, self._value(self.token), last=self.revision)
        except (KeyWrongLastSequenceError, KeyNotFoundError) as exc:
            token = self.token
            self.token = self.revision = None
            raise LeaseLost(f"lease lost (token {token}): {type(exc).__name__}") from exc
        self.last_renew_mono = time.monotonic()

    async def release(self) -> None:
        if self.token is None or self.revision is None:
            return
        try:
            await self.kv.delete(LEASE_KEY, last=self.revision)
        except Exception as exc:  # expired or taken already: nothing to release
            log.info("lease release skipped", extra={"reason": type(exc).__name__})
        self.token = self.revision = None

    async def current(self) -> LeaseInfo | None:
        """Who holds the lease now, as seen in the bucket."""
        from nats.js.errors import KeyDeletedError, KeyNotFoundError

        try:
            entry = await self.kv.get(LEASE_KEY)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if not entry.value:
            return None
        data = json.loads(entry.value)
        return LeaseInfo(data["node"], int(data["token"]), int(entry.revision or 0), int(data.get("acquired_ms", 0)))
