"""``Idempotency-Key`` for POST and DELETE, stored in PostgreSQL per API key.

Flow for the app (one request):

1. ``key = validate_key(headers.get("Idempotency-Key"))`` (400 IDEMPOTENCY_KEY_INVALID);
   no key means no idempotency.
2. ``fp = fingerprint(method, path_with_query, body, api_key)``.
3. ``got = await store.begin(api_key, key, fp)``:
   - a :class:`StoredResponse` -> the original result: send it again (it carries
     ``Idempotent-Replayed: true``);
   - a :class:`Claim` -> this request owns the key: execute it, then
     ``await store.complete(claim, response)`` for a definitive outcome (executed, or rejected by
     the core), or ``await store.release(claim)`` when the outcome is UNKNOWN or the request never
     reached the core, so the client's retry runs again (the command keeps the same key as its
     ``Nats-Msg-Id``, so the bus and the core dedupe a command that did get through);
   - raises 409 IDEMPOTENCY_CONFLICT (same key, different fingerprint) or 409
     IDEMPOTENCY_IN_PROGRESS with ``Retry-After`` (the original is still running: we answer at once
     rather than hold a worker waiting for it).

:func:`run` wraps the three steps around a handler.

Race safety: the claim is one ``INSERT ... ON CONFLICT DO NOTHING``; the losers read the winner's
row. An in-progress claim has a lease (``lease_ms``): if its edge died, a retry with the same
fingerprint takes the claim over once the lease ran out (a conditional UPDATE, so exactly one
retry wins). Records expire after ``ttl_ms`` (24 h) and :meth:`IdempotencyStore.purge_expired`
deletes them.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg

from edge.errors import SpotexError

__all__ = [
    "DEFAULT_LEASE_MS",
    "DEFAULT_TTL_MS",
    "Claim",
    "IdempotencyStore",
    "StoredResponse",
    "canonical_body",
    "fingerprint",
    "run",
    "validate_key",
]

DEFAULT_TTL_MS = 24 * 3600 * 1000
DEFAULT_LEASE_MS = 60_000
_KEY_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Headers that describe this response on the wire or this moment, not the result: never replayed.
_VOLATILE_HEADERS = frozenset({
    "date", "content-length", "connection", "keep-alive", "transfer-encoding", "set-cookie", "retry-after",
    "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "idempotent-replayed", "server",
})
REPLAYED_HEADER = "Idempotent-Replayed"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def validate_key(key: str | None) -> str | None:
    """The key, None when absent, or 400 IDEMPOTENCY_KEY_INVALID."""
    if key is None:
        return None
    if not _KEY_RE.fullmatch(key):
        raise SpotexError("IDEMPOTENCY_KEY_INVALID",
                          detail="Idempotency-Key must be 1-128 characters of [A-Za-z0-9._:-]")
    return key


class _Dup(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Dup
    return d


def _canon(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + _canon(v[k]) for k in sorted(v)) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_canon(x) for x in v) + "]"
    if isinstance(v, Decimal):
        return str(v)
    return json.dumps(v, ensure_ascii=False)


def canonical_body(body: bytes | str) -> bytes:
    """JSON bodies in canonical form (sorted keys, no whitespace, numbers as written) so that
    reformatting a retry does not look like a different request; anything else (and JSON with
    duplicate keys, whose meaning depends on the parser) byte for byte."""
    raw = body.encode() if isinstance(body, str) else body
    if not raw.strip():
        return b""
    try:
        doc = json.loads(raw, object_pairs_hook=_pairs, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, _Dup):
        return b"raw:" + raw
    return b"json:" + _canon(doc).encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def fingerprint(method: str, path_with_query: str, body: bytes | str, api_key: str) -> str:
    """sha256 (hex) over method, path with query, canonical body and api key, length-prefixed so
    no two different tuples can collide by shifting bytes between fields."""
    h = hashlib.sha256()
    for part in (method.upper().encode(), path_with_query.encode("utf-8", "surrogateescape"), canonical_body(body),
                 api_key.encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Claim:
    """Ownership of one (api key, Idempotency-Key) while the request executes."""

    api_key: str
    key: str
    fingerprint: str
    token: str
    attempt: int


class IdempotencyStore:
    def __init__(self, pool: asyncpg.Pool, *, ttl_ms: int = DEFAULT_TTL_MS, lease_ms: int = DEFAULT_LEASE_MS,
                 in_progress_retry_after_s: int = 1, clock_ms: Callable[[], int] = _now_ms) -> None:
        if ttl_ms <= lease_ms:
            raise ValueError("ttl_ms must exceed lease_ms")
        self._pool = pool
        self.ttl_ms = ttl_ms
        self.lease_ms = lease_ms
        self.retry_after_s = in_progress_retry_after_s
        self._clock_ms = clock_ms

    async def begin(self, api_key: str, key: str, fp: str) -> Claim | StoredResponse:
        """Claim the key for this request, or return the stored result; see the module docstring."""
        validate_key(key)
        now = self._clock_ms()
        token = secrets.token_hex(16)
        async with self._pool.acquire() as conn:
            got = await conn.fetchval(
                """INSERT INTO idempotency_keys
                       (api_key, idem_key, fingerprint, state, claim_token, created_at_ms, locked_until_ms,
                        expires_at_ms)
                   VALUES ($1, $2, $3, 'in_progress', $4, $5, $6, $7)
                   ON CONFLICT (api_key, idem_key) DO NOTHING
                   RETURNING 1""",
                api_key, key, fp, token, now, now + self.lease_ms, now + self.ttl_ms)
            if got:
                return Claim(api_key, key, fp, token, 1)
            # An expired record is as good as none: take it over (one winner, by the row lock).
            took = await conn.fetchval(
                """UPDATE idempotency_keys
                   SET fingerprint = $3, state = 'in_progress', claim_token = $4, attempts = 1, status = NULL,
                       body = NULL, headers = NULL, created_at_ms = $5, locked_until_ms = $6,
                       completed_at_ms = NULL, expires_at_ms = $7
                   WHERE api_key = $1 AND idem_key = $2 AND expires_at_ms <= $5
                   RETURNING 1""",
                api_key, key, fp, token, now, now + self.lease_ms, now + self.ttl_ms)
            if took:
                return Claim(api_key, key, fp, token, 1)
            row = await conn.fetchrow(
                """SELECT fingerprint, state, status, body, headers, locked_until_ms, attempts
                   FROM idempotency_keys WHERE api_key = $1 AND idem_key = $2""", api_key, key)
            if row is None:  # purged between our statements: start over
                return await self.begin(api_key, key, fp)
            if row["fingerprint"] != fp:
                raise SpotexError("IDEMPOTENCY_CONFLICT",
                                  detail="this Idempotency-Key was used for a different request")
            if row["state"] == "completed":
                headers = dict(json.loads(row["headers"]))
                headers[REPLAYED_HEADER] = "true"
                return StoredResponse(row["status"], bytes(row["body"]), headers, replayed=True)
            if row["locked_until_ms"] <= now:
                # The owner's lease ran out (its edge died or hung): let this retry take over.
                attempt = await conn.fetchval(
                    """UPDATE idempotency_keys
                       SET claim_token = $4, attempts = attempts + 1, locked_until_ms = $5
                       WHERE api_key = $1 AND idem_key = $2 AND fingerprint = $3 AND state = 'in_progress'
                             AND locked_until_ms <= $6
                       RETURNING attempts""",
                    api_key, key, fp, token, now + self.lease_ms, now)
                if attempt:
                    return Claim(api_key, key, fp, token, int(attempt))
            raise SpotexError("IDEMPOTENCY_IN_PROGRESS",
                              detail="the original request with this Idempotency-Key is still executing",
                              headers={"Retry-After": str(self.retry_after_s)})

    async def complete(self, claim: Claim, response: StoredResponse) -> bool:
        """Store the result for replays. False if the claim was lost (lease expired and taken over);
        the response is then still the right one to send to this caller."""
        headers = {k: v for k, v in response.headers.items() if k.lower() not in _VOLATILE_HEADERS}
        done = await self._pool.fetchval(
            """UPDATE idempotency_keys
               SET state = 'completed', status = $4, body = $5, headers = $6::jsonb, completed_at_ms = $7
               WHERE api_key = $1 AND idem_key = $2 AND claim_token = $3 AND state = 'in_progress'
               RETURNING 1""",
            claim.api_key, claim.key, claim.token, response.status, response.body, json.dumps(headers),
            self._clock_ms())
        return bool(done)

    async def release(self, claim: Claim) -> bool:
        """Give the key up without a result, so a retry executes again."""
        done = await self._pool.fetchval(
            """DELETE FROM idempotency_keys
               WHERE api_key = $1 AND idem_key = $2 AND claim_token = $3 AND state = 'in_progress'
               RETURNING 1""", claim.api_key, claim.key, claim.token)
        return bool(done)

    async def purge_expired(self, *, batch: int = 10_000, now_ms: int | None = None) -> int:
        """Delete expired records in batches (short transactions); returns how many."""
        now = self._clock_ms() if now_ms is None else now_ms
        total = 0
        while True:
            n = await self._pool.fetchval(
                """WITH gone AS (
                       DELETE FROM idempotency_keys WHERE ctid IN (
                           SELECT ctid FROM idempotency_keys WHERE expires_at_ms <= $1 LIMIT $2)
                       RETURNING 1)
                   SELECT count(*) FROM gone""", now, batch)
            total += int(n)
            if n < batch:
                return total


async def run(store: IdempotencyStore, api_key: str, key: str | None, fp: str,
              handler: Callable[[], Awaitable[StoredResponse]],
              *, store_if: Callable[[StoredResponse], bool] = lambda r: r.status < 500) -> StoredResponse:
    """Execute ``handler`` at most once per (api_key, key, fingerprint).

    Results for which ``store_if`` is true are kept for replay (default: anything below 500, i.e.
    executed orders and definitive rejects); others, and exceptions, release the key so the client
    may retry. So a handler returns the problem response of a definitive reject (it is replayed)
    and raises only when the outcome is unknown. Without a key the handler just runs.
    """
    if key is None:
        return await handler()
    got = await store.begin(api_key, key, fp)
    if isinstance(got, StoredResponse):
        return got
    try:
        resp = await handler()
    except BaseException:
        await store.release(got)
        raise
    if store_if(resp):
        await store.complete(got, resp)
    else:
        await store.release(got)
    return resp

