"""Idempotency-Key semantics against a real PostgreSQL, including concurrent identical requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from edge.errors import SpotexError
from edge.idempotency import (
    Claim,
    IdempotencyStore,
    StoredResponse,
    canonical_body,
    fingerprint,
    run,
    validate_key,
)
from ledger.migrate import migrate

API = "K" * 64
PATH = "/v1/orders"
BODY = b'{"symbol":"BTC-USDT","side":"BUY","qty":"0.01","price":"100.50"}'
FP = fingerprint("POST", PATH, BODY, API)
OK = StoredResponse(201, b'{"orderId":"1","status":"ACCEPTED"}',
                    {"Content-Type": "application/json", "X-Request-Id": "r1", "Date": "x", "RateLimit-Remaining": "3"})


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate(pg_dsn)
    p = await asyncpg.create_pool(pg_dsn, min_size=2, max_size=10)
    yield p
    await p.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(pool: asyncpg.Pool, clock: Clock) -> IdempotencyStore:
    return IdempotencyStore(pool, ttl_ms=24 * 3600 * 1000, lease_ms=30_000, clock_ms=clock)


async def expect(code: str, coro: object) -> SpotexError:
    with pytest.raises(SpotexError) as ei:
        await coro  # type: ignore[misc]
    assert ei.value.code == code, ei.value
    return ei.value


def test_key_format() -> None:
    assert validate_key(None) is None
    assert validate_key("a") == "a"
    assert validate_key("A-z_0.9:" + "x" * 120) == "A-z_0.9:" + "x" * 120  # 128 chars
    for bad in ("", "x" * 129, "has space", "a/b", "émoji", "a\nb", "a,b"):
        with pytest.raises(SpotexError) as ei:
            validate_key(bad)
        assert ei.value.code == "IDEMPOTENCY_KEY_INVALID" and ei.value.status == 400


def test_fingerprint_canonicalises_json_only() -> None:
    same = b'{ "price": "100.50", "qty":"0.01",\n "side":"BUY", "symbol":"BTC-USDT" }'
    assert fingerprint("post", PATH, same, API) == FP
    assert fingerprint("POST", PATH, BODY.replace(b"0.01", b"0.02"), API) != FP
    assert fingerprint("DELETE", PATH, BODY, API) != FP
    assert fingerprint("POST", PATH + "?x=1", BODY, API) != FP
    assert fingerprint("POST", PATH, BODY, "L" * 64) != FP
    # Numbers keep their written form; duplicate keys and non-JSON are compared byte for byte.
    assert canonical_body(b'{"a": 1.50}') == b'json:{"a":1.50}'
    assert canonical_body(b'{"a":1,"a":2}') == b'raw:{"a":1,"a":2}'
    assert canonical_body(b"symbol=BTC&x=1") == b"raw:symbol=BTC&x=1"
    assert canonical_body(b"  ") == b"" == canonical_body("")
    nested = canonical_body('{"b":[1,{"d":null,"c":true}],"a":"é"}')
    assert nested == 'json:{"a":"é","b":[1,{"c":true,"d":null}]}'.encode()
    # Field boundaries cannot be shifted.
    assert fingerprint("POST", "/ab", b"", API) != fingerprint("POST", "/a", b"b", API)


async def test_first_request_claims_then_replays_original(store: IdempotencyStore) -> None:
    claim = await store.begin(API, "order-1", FP)
    assert isinstance(claim, Claim) and claim.attempt == 1
    assert await store.complete(claim, OK) is True
    again = await store.begin(API, "order-1", FP)
    assert isinstance(again, StoredResponse) and again.replayed
    assert again.status == 201 and again.body == OK.body
    assert again.headers == {"Content-Type": "application/json", "X-Request-Id": "r1", "Idempotent-Replayed": "true"}
    assert await store.complete(claim, OK) is False  # already completed


async def test_conflict_and_in_progress(store: IdempotencyStore) -> None:
    other = fingerprint("POST", PATH, BODY.replace(b"BUY", b"SELL"), API)
    claim = await store.begin(API, "k1", FP)
    assert isinstance(claim, Claim)
    e = await expect("IDEMPOTENCY_IN_PROGRESS", store.begin(API, "k1", FP))
    assert e.status == 409 and e.headers == {"Retry-After": "1"}
    await expect("IDEMPOTENCY_CONFLICT", store.begin(API, "k1", other))
    await store.complete(claim, OK)
    e = await expect("IDEMPOTENCY_CONFLICT", store.begin(API, "k1", other))
    assert e.status == 409
    await expect("IDEMPOTENCY_KEY_INVALID", store.begin(API, "bad key", FP))


async def test_scoped_per_api_key(store: IdempotencyStore) -> None:
    other_api = "L" * 64
    a = await store.begin(API, "same", FP)
    b = await store.begin(other_api, "same", fingerprint("POST", PATH, BODY, other_api))
    assert isinstance(a, Claim) and isinstance(b, Claim)


async def test_concurrent_identical_requests_execute_once(store: IdempotencyStore) -> None:
    executed = 0
    gate = asyncio.Event()

    async def handler() -> StoredResponse:
        nonlocal executed
        executed += 1
        await gate.wait()
        return OK

    async def attempt() -> StoredResponse | SpotexError:
        try:
            return await run(store, API, "race-1", FP, handler)
        except SpotexError as exc:
            return exc

    tasks = [asyncio.create_task(attempt()) for _ in range(25)]
    for _ in range(200):  # wait until all but the winner have been refused
        if sum(t.done() for t in tasks) == 24:
            break
        await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert executed == 1
    winners = [r for r in results if isinstance(r, StoredResponse)]
    refused = [r for r in results if isinstance(r, SpotexError)]
    assert len(winners) == 1 and not winners[0].replayed
    assert len(refused) == 24 and {r.code for r in refused} == {"IDEMPOTENCY_IN_PROGRESS"}
    # Once complete, concurrent retries all get the stored original.
    replays = await asyncio.gather(*(store.begin(API, "race-1", FP) for _ in range(25)))
    assert all(isinstance(r, StoredResponse) and r.replayed and r.body == OK.body for r in replays)


async def test_concurrent_different_payloads_one_wins_rest_conflict(store: IdempotencyStore) -> None:
    fps = [fingerprint("POST", PATH, BODY.replace(b"0.01", f"0.0{i}".encode()), API) for i in range(1, 10)]

    async def attempt(fp: str) -> Claim | StoredResponse | SpotexError:
        try:
            return await store.begin(API, "race-2", fp)
        except SpotexError as exc:
            return exc

    results = await asyncio.gather(*(attempt(fp) for fp in fps))
    assert sum(isinstance(r, Claim) for r in results) == 1
    assert {r.code for r in results if isinstance(r, SpotexError)} == {"IDEMPOTENCY_CONFLICT"}


async def test_release_lets_a_retry_run(store: IdempotencyStore) -> None:
    claim = await store.begin(API, "k2", FP)
    assert isinstance(claim, Claim)
    assert await store.release(claim) is True
    assert await store.release(claim) is False
    again = await store.begin(API, "k2", FP)
    assert isinstance(again, Claim) and again.token != claim.token


async def test_stale_claim_taken_over_once(store: IdempotencyStore, clock: Clock) -> None:
    dead = await store.begin(API, "k3", FP)
    assert isinstance(dead, Claim)
    clock.ms += 29_999
    await expect("IDEMPOTENCY_IN_PROGRESS", store.begin(API, "k3", FP))
    clock.ms += 1  # lease over: the edge that held it is presumed gone

    async def attempt() -> Claim | StoredResponse | SpotexError:
        try:
            return await store.begin(API, "k3", FP)
        except SpotexError as exc:
            return exc

    results = await asyncio.gather(*(attempt() for _ in range(10)))
    claims = [r for r in results if isinstance(r, Claim)]
    assert len(claims) == 1 and claims[0].attempt == 2
    assert {r.code for r in results if isinstance(r, SpotexError)} == {"IDEMPOTENCY_IN_PROGRESS"}
    # A different payload is still a conflict, stale or not.
    await expect("IDEMPOTENCY_CONFLICT", store.begin(API, "k3", fingerprint("GET", PATH, b"", API)))
    # The old holder can no longer complete; the new one can.
    assert await store.complete(dead, OK) is False
    assert await store.complete(claims[0], OK) is True


async def test_expiry_and_purge(store: IdempotencyStore, clock: Clock, pool: asyncpg.Pool) -> None:
    for i in range(5):
        c = await store.begin(API, f"old-{i}", FP)
        assert isinstance(c, Claim)
        await store.complete(c, OK)
    clock.ms += 24 * 3600 * 1000  # 24 h later
    fresh = await store.begin(API, "fresh", FP)
    assert isinstance(fresh, Claim)
    # An expired key is free again, even for a different payload.
    reused = await store.begin(API, "old-0", fingerprint("DELETE", "/v1/orders/1", b"", API))
    assert isinstance(reused, Claim)
    assert await store.purge_expired(batch=2) == 4
    assert await pool.fetchval("SELECT count(*) FROM idempotency_keys") == 2
    assert await store.purge_expired() == 0


async def test_run_helper_stores_definitive_results_only(store: IdempotencyStore) -> None:
    calls: list[str] = []

    async def reject() -> StoredResponse:
        calls.append("reject")
        return StoredResponse(422, b'{"code":"INSUFFICIENT_FUNDS"}', {"Content-Type": "application/problem+json"})

    first = await run(store, API, "r1", FP, reject)
    second = await run(store, API, "r1", FP, reject)
    assert first.status == second.status == 422 and second.replayed and calls == ["reject"]

    async def timeout() -> StoredResponse:
        calls.append("timeout")
        return StoredResponse(504, b'{"code":"UPSTREAM_TIMEOUT"}')

    await run(store, API, "r2", FP, timeout)
    await run(store, API, "r2", FP, timeout)
    assert calls.count("timeout") == 2  # unknown outcome: not stored, the retry runs again

    async def boom() -> StoredResponse:
        calls.append("boom")
        raise RuntimeError("lost connection")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            await run(store, API, "r3", FP, boom)
    assert calls.count("boom") == 2
    await run(store, API, None, FP, reject)  # no key: no idempotency
    assert calls.count("reject") == 2


def test_store_rejects_ttl_not_above_lease(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError):
        IdempotencyStore(pool, ttl_ms=1000, lease_ms=1000)
