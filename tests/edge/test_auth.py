"""Signed-request auth against a real PostgreSQL: trader keys (HMAC, Ed25519), the Binance
facade's signing, and operator keys with roles."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import REGISTRY as METRICS

from edge.auth import (
    KeyStore,
    OperatorIdentity,
    OperatorKeyStore,
    OperatorVerifier,
    Principal,
    ReplayCache,
    RequestVerifier,
    SecretBox,
    binance_payload,
    binance_signature,
    ed25519_signature,
    hmac_signature,
    path_with_query,
    require_role,
    require_scope,
    signed_headers,
    signing_string,
)
from edge.errors import (
    REGISTRY,
    BinanceError,
    SpotexError,
    order_rejected,
    problem_type,
    register,
    to_binance,
    to_problem,
)
from ledger.migrate import migrate

NOW = 1_700_000_000_000
PATH = "/v1/orders?symbol=BTC-USDT"
BODY = b'{"symbol":"BTC-USDT","side":"BUY","type":"LIMIT","price":"100.5","qty":"0.01"}'


def metric(name: str, **labels: str) -> float:
    return METRICS.get_sample_value(name, labels) or 0.0


def pub_hex(k: Ed25519PrivateKey) -> str:
    return k.public_key().public_bytes_raw().hex()


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate(pg_dsn)
    p = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
def box() -> SecretBox:
    return SecretBox.generate()


@pytest.fixture
async def store(pool: asyncpg.Pool, box: SecretBox) -> AsyncIterator[KeyStore]:
    ks = KeyStore(pool, box)
    yield ks
    await ks.close()


def verifier(store: KeyStore, **kw: object) -> RequestVerifier:
    return RequestVerifier(store, skew_window_ms=5_000, clock_ms=lambda: NOW, **kw)  # type: ignore[arg-type]


_UNSET = object()


async def call(v: RequestVerifier, api_key: str | None, secret: str | Ed25519PrivateKey, *, method: str = "POST",
               path: str = PATH, body: bytes = BODY, ts: int = NOW, now: int = NOW, hdr_ts: object = _UNSET,
               hdr_sig: object = _UNSET, required_scope: str | None = None) -> Principal:
    """Sign like a client would, optionally replacing the X-TS / X-SIGNATURE header values sent."""
    h = signed_headers(api_key or "x", secret, method, path, body, ts_ms=ts)
    x_ts = h["X-TS"] if hdr_ts is _UNSET else hdr_ts
    x_sig = h["X-SIGNATURE"] if hdr_sig is _UNSET else hdr_sig
    return await v.verify(api_key=api_key, ts=x_ts, signature=x_sig, method=method,  # type: ignore[arg-type]
                          path_with_query=path, body=body, now_ms=now, required_scope=required_scope)


async def expect(code: str, coro: object) -> SpotexError:
    with pytest.raises(SpotexError) as ei:
        await coro  # type: ignore[misc]
    assert ei.value.code == code, ei.value
    return ei.value


# --- signing string ------------------------------------------------------------------------------

def test_signing_string_is_exact_bytes() -> None:
    assert signing_string("post", "/v1/orders?a=1", "123", b'{"x":1}') == b'POST\n/v1/orders?a=1\n123\n{"x":1}'
    assert signing_string("GET", "/v1/account/balances", 5, b"") == b"GET\n/v1/account/balances\n5\n"
    assert path_with_query(b"/v1/orders", b"symbol=BTC-USDT&x=%2F") == "/v1/orders?symbol=BTC-USDT&x=%2F"
    assert path_with_query("/v1/orders", "") == "/v1/orders"


def test_binance_documented_vector() -> None:
    # The example from Binance's SIGNED endpoint documentation.
    secret = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
    qs = ("symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000"
          "&timestamp=1499827319559")
    expected = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
    assert binance_signature(secret, qs) == expected
    # Mixed query string and body: concatenated without a separator.
    mixed = binance_signature(secret, "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC",
                              "quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559")
    assert mixed == "0fd168b8ddb4876a0358a8d14d0c9f3da0e9b20c5d52b2a00fcf7d1c602f9a77"
    payload, sig = binance_payload(qs + "&signature=" + expected)
    assert payload == qs and sig == expected


# --- HMAC keys -----------------------------------------------------------------------------------

async def test_hmac_key_roundtrip_and_secret_encrypted_at_rest(store: KeyStore, pool: asyncpg.Pool) -> None:
    created = await store.create(42, ["read", "trade"], label="bot")
    assert created.secret and len(created.secret) == 64 and len(created.api_key) == 64
    p = await call(verifier(store), created.api_key, created.secret)
    assert p == Principal(created.api_key, 42, frozenset({"read", "trade"}), "hmac")
    row = await pool.fetchrow("SELECT secret_enc, enc_key_id FROM api_keys WHERE api_key = $1", created.api_key)
    assert created.secret.encode() not in bytes(row["secret_enc"])
    # The secret is never listed.
    [info] = await store.list(42)
    assert info.api_key == created.api_key and not hasattr(info, "secret") and info.public_key_hex is None


async def test_uppercase_hex_signature_is_accepted(store: KeyStore) -> None:
    c = await store.create(1, ["trade"])
    assert c.secret is not None
    sig = hmac_signature(c.secret, signing_string("POST", PATH, NOW, BODY)).upper()
    await verifier(store).verify(api_key=c.api_key, ts=str(NOW), signature=sig, method="POST",
                                 path_with_query=PATH, body=BODY, now_ms=NOW)


async def test_missing_and_malformed_headers(store: KeyStore) -> None:
    c = await store.create(1, ["read"])
    assert c.secret is not None
    v = verifier(store)
    before = metric("auth_fail_total", reason="missing")
    await expect("AUTH_MISSING", call(v, None, c.secret))
    await expect("AUTH_MISSING", call(v, c.api_key, c.secret, hdr_ts=None))
    await expect("AUTH_MISSING", call(v, c.api_key, c.secret, hdr_sig=""))
    assert metric("auth_fail_total", reason="missing") == before + 3
    await expect("AUTH_MALFORMED", call(v, c.api_key, c.secret, hdr_ts="17e11"))
    await expect("AUTH_MALFORMED", call(v, c.api_key, c.secret, hdr_ts="-5"))
    await expect("AUTH_MALFORMED", call(v, c.api_key, c.secret, hdr_sig="zz" * 32))
    await expect("AUTH_MALFORMED", call(v, c.api_key, c.secret, hdr_sig="ab" * 31))


async def test_timestamp_skew_window_both_ways(store: KeyStore) -> None:
    c = await store.create(1, ["read"])
    assert c.secret is not None
    v = verifier(store)
    await call(v, c.api_key, c.secret, ts=NOW - 5_000)  # exactly at the window: accepted
    await call(v, c.api_key, c.secret, ts=NOW + 5_000)
    before = metric("auth_fail_total", reason="timestamp_skew")
    e = await expect("AUTH_TIMESTAMP_SKEW", call(v, c.api_key, c.secret, ts=NOW - 5_001))
    assert e.status == 401
    await expect("AUTH_TIMESTAMP_SKEW", call(v, c.api_key, c.secret, ts=NOW + 5_001))
    assert metric("auth_fail_total", reason="timestamp_skew") == before + 2


async def test_unknown_and_revoked_keys(store: KeyStore, box: SecretBox, pool: asyncpg.Pool) -> None:
    c = await store.create(7, ["read"])
    assert c.secret is not None
    v = verifier(store)
    await expect("AUTH_UNKNOWN_KEY", call(v, "A" * 64, c.secret))
    await expect("AUTH_UNKNOWN_KEY", call(v, "short", c.secret))
    await call(v, c.api_key, c.secret)  # now cached
    assert await store.revoke(c.api_key, account_id=8) is False  # not that account's key
    assert await store.revoke(c.api_key) is True
    assert await store.revoke(c.api_key) is False
    await expect("AUTH_UNKNOWN_KEY", call(v, c.api_key, c.secret, ts=NOW - 1))
    assert await store.list(7) == []
    assert [k.revoked_at_ms is not None for k in await store.list(7, include_revoked=True)] == [True]


async def test_bad_signatures(store: KeyStore) -> None:
    c = await store.create(1, ["trade"])
    other = await store.create(2, ["trade"])
    assert c.secret is not None and other.secret is not None
    v = verifier(store)
    before = metric("auth_fail_total", reason="bad_signature")
    h = signed_headers(c.api_key, c.secret, "POST", PATH, BODY, ts_ms=NOW)
    for method, path, body, ts in [
        ("POST", PATH, BODY.replace(b"0.01", b"10.0"), h["X-TS"]),  # body changed
        ("POST", "/v1/orders?symbol=ETH-USDT", BODY, h["X-TS"]),  # query changed
        ("DELETE", PATH, BODY, h["X-TS"]),  # method changed
        ("POST", PATH, BODY, str(NOW - 1)),  # timestamp changed
    ]:
        await expect("AUTH_BAD_SIGNATURE", v.verify(api_key=c.api_key, ts=ts, signature=h["X-SIGNATURE"],
                                                    method=method, path_with_query=path, body=body, now_ms=NOW))
    await expect("AUTH_BAD_SIGNATURE", call(v, c.api_key, other.secret))  # someone else's secret
    assert metric("auth_fail_total", reason="bad_signature") == before + 5


async def test_replay_rejected_within_window(store: KeyStore) -> None:
    c = await store.create(1, ["trade"])
    assert c.secret is not None
    v = verifier(store)
    h = signed_headers(c.api_key, c.secret, "POST", PATH, BODY, ts_ms=NOW)
    kw: dict[str, Any] = {"api_key": c.api_key, "ts": h["X-TS"], "method": "POST", "path_with_query": PATH,
                          "body": BODY}
    await v.verify(signature=h["X-SIGNATURE"], now_ms=NOW, **kw)
    before = metric("replay_detect_total")
    before_fail = metric("auth_fail_total", reason="replay")
    await expect("AUTH_REPLAY", v.verify(signature=h["X-SIGNATURE"], now_ms=NOW + 10, **kw))
    # The same signature in upper case is the same signature.
    await expect("AUTH_REPLAY", v.verify(signature=h["X-SIGNATURE"].upper(), now_ms=NOW + 4_000, **kw))
    assert metric("replay_detect_total") == before + 2
    assert metric("auth_fail_total", reason="replay") == before_fail + 2
    # Once the timestamp is out of the window the request fails on skew, and the entry is gone.
    await expect("AUTH_TIMESTAMP_SKEW", v.verify(signature=h["X-SIGNATURE"], now_ms=NOW + 5_001, **kw))
    v.replay.check_and_add("other", b"x", NOW + 20_000, NOW + 10_000)  # purges expired entries
    assert len(v.replay) == 1
    # A fresh timestamp is a new request.
    await call(v, c.api_key, c.secret, ts=NOW + 1, now=NOW + 2)


async def test_scopes(store: KeyStore) -> None:
    ro = await store.create(1, ["read"])
    assert ro.secret is not None
    v = verifier(store)
    p = await call(v, ro.api_key, ro.secret, required_scope=None)
    require_scope(p, "read")
    e = await expect("AUTH_SCOPE", call(v, ro.api_key, ro.secret, ts=NOW + 1, required_scope="trade"))
    assert e.status == 403
    with pytest.raises(ValueError):
        await store.create(1, [])
    with pytest.raises(ValueError):
        await store.create(1, ["read", "withdraw"])
    with pytest.raises(ValueError):
        require_scope(p, "admin")


async def test_ciphertext_bound_to_its_row_and_master_key(store: KeyStore, pool: asyncpg.Pool) -> None:
    a = await store.create(1, ["read"])
    b = await store.create(2, ["read"])
    assert a.secret is not None
    # Copy a's encrypted secret onto b: decryption fails (the api key is the AEAD's additional data).
    await pool.execute("UPDATE api_keys SET secret_enc = (SELECT secret_enc FROM api_keys WHERE api_key = $1) "
                       "WHERE api_key = $2", a.api_key, b.api_key)
    await expect("AUTH_UNKNOWN_KEY", call(verifier(store), b.api_key, a.secret))
    # A store with another master key cannot use the rows at all.
    other = KeyStore(pool, SecretBox.generate())
    await expect("AUTH_UNKNOWN_KEY", call(verifier(other), a.api_key, a.secret))


async def test_master_key_rotation(pool: asyncpg.Pool, tmp_path: Path) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    old = KeyStore(pool, SecretBox.from_key(old_key))
    c = await old.create(1, ["read"])
    assert c.secret is not None
    f = tmp_path / "master.keys"
    f.write_text(f"{new_key.hex()}\n{old_key.hex()}\n")
    rotated = KeyStore(pool, SecretBox.from_file(f))
    await call(verifier(rotated), c.api_key, c.secret)  # old rows still decrypt
    assert await rotated.reencrypt_all() == 1
    assert await rotated.reencrypt_all() == 0
    only_new = KeyStore(pool, SecretBox.from_key(new_key))
    await call(verifier(only_new), c.api_key, c.secret)


def test_secretbox_file_created_private(tmp_path: Path) -> None:
    f = tmp_path / "secrets" / "edge_master.key"
    b1 = SecretBox.from_file(f, create=True)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    b2 = SecretBox.from_file(f)
    assert b1.primary == b2.primary
    kid, blob = b1.encrypt(b"s3cret", b"k")
    assert b2.decrypt(kid, blob, b"k") == b"s3cret"
    with pytest.raises(FileNotFoundError):
        SecretBox.from_file(tmp_path / "missing.key")
    (tmp_path / "bad.key").write_text("not hex\n")
    with pytest.raises(ValueError):
        SecretBox.from_file(tmp_path / "bad.key")


# --- Ed25519 keys --------------------------------------------------------------------------------

async def test_ed25519_key_hex_and_base64(store: KeyStore, pool: asyncpg.Pool) -> None:
    priv = Ed25519PrivateKey.generate()
    c = await store.create(9, ["trade"], ed25519_public_key=pub_hex(priv))
    assert c.secret is None and c.info.kind == "ed25519" and c.info.public_key_hex == pub_hex(priv)
    v = verifier(store)
    p = await call(v, c.api_key, priv, ts=NOW)  # hex
    assert p.kind == "ed25519" and p.account_id == 9
    msg = signing_string("POST", PATH, NOW + 1, BODY)
    await v.verify(api_key=c.api_key, ts=str(NOW + 1), signature=ed25519_signature(priv, msg, "base64"),
                   method="POST", path_with_query=PATH, body=BODY, now_ms=NOW)
    raw = priv.sign(signing_string("POST", PATH, NOW + 2, BODY))
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    await v.verify(api_key=c.api_key, ts=str(NOW + 2), signature=urlsafe, method="POST", path_with_query=PATH,
                   body=BODY, now_ms=NOW)
    # Replaying the base64 form of an accepted hex signature is still a replay.
    b64_of_first = base64.b64encode(priv.sign(signing_string("POST", PATH, NOW, BODY))).decode()
    await expect("AUTH_REPLAY", v.verify(api_key=c.api_key, ts=str(NOW), signature=b64_of_first, method="POST",
                                         path_with_query=PATH, body=BODY, now_ms=NOW))
    await expect("AUTH_BAD_SIGNATURE", call(v, c.api_key, Ed25519PrivateKey.generate(), ts=NOW + 3))
    await expect("AUTH_MALFORMED", call(v, c.api_key, priv, ts=NOW + 4, hdr_sig="@@not-base64@@"))
    row = await pool.fetchrow("SELECT secret_enc, public_key FROM api_keys WHERE api_key = $1", c.api_key)
    assert row["secret_enc"] is None and bytes(row["public_key"]).hex() == pub_hex(priv)
    with pytest.raises(ValueError):
        await store.create(9, ["read"], ed25519_public_key="abcd")


# --- cache and cross-process revocation ----------------------------------------------------------

async def test_cache_and_revocation_notify_across_processes(pool: asyncpg.Pool, box: SecretBox) -> None:
    t = [0.0]
    a = KeyStore(pool, box)
    b = KeyStore(pool, box, cache_ttl_s=3600, clock=lambda: t[0])
    await b.start_listener()
    try:
        c = await a.create(1, ["read"])
        assert c.secret is not None
        assert await b.get(c.api_key) is not None
        assert await b.get("B" * 40) is None  # negative entry
        await a.revoke(c.api_key)  # another process: b learns it by NOTIFY, not by TTL
        for _ in range(100):
            if await b.get(c.api_key) is None:
                break
            await asyncio.sleep(0.01)
        assert await b.get(c.api_key) is None
    finally:
        await b.close()


async def test_impossible_keys_never_reach_db_or_cache(store: KeyStore) -> None:
    for junk in ("x" * 10_000, "short", "has space in it!!", "é" * 20):
        assert await store.get(junk) is None
    assert store._cache == {}


async def test_raw_non_ascii_target_round_trips(store: KeyStore) -> None:
    c = await store.create(1, ["read"])
    assert c.secret is not None
    raw_path, raw_query = "/v1/markets/ünï".encode(), b"x=\xff\xfe"  # not valid UTF-8 in the query
    pwq = path_with_query(raw_path, raw_query)
    client_bytes = b"GET\n" + raw_path + b"?" + raw_query + b"\n" + str(NOW).encode() + b"\n"
    assert signing_string("GET", pwq, NOW, b"") == client_bytes
    sig = hmac_signature(c.secret, client_bytes)
    await verifier(store).verify(api_key=c.api_key, ts=str(NOW), signature=sig, method="GET",
                                 path_with_query=pwq, now_ms=NOW)


async def test_concurrent_cold_lookups_share_one_query(store: KeyStore) -> None:
    c = await store.create(1, ["read"])
    store.invalidate()
    got = await asyncio.gather(*(store.get(c.api_key) for _ in range(50)))
    assert all(g is got[0] and g is not None for g in got)


# --- replay cache --------------------------------------------------------------------------------

def test_replay_cache_bounded_evicts_soonest_expiring() -> None:
    rc = ReplayCache(max_entries=3)
    before = metric("replay_cache_evict_total")
    assert rc.check_and_add("k", b"1", 100, 0)
    assert rc.check_and_add("k", b"2", 300, 0)
    assert rc.check_and_add("k", b"3", 200, 0)
    assert not rc.check_and_add("k", b"2", 300, 50)
    assert rc.check_and_add("k", b"4", 400, 50)  # full: evicts b"1" (expires first)
    assert len(rc) == 3 and metric("replay_cache_evict_total") == before + 1
    assert rc.check_and_add("k", b"1", 500, 60)
    assert rc.check_and_add("k", b"5", 600, 250)  # b"3" (200) and b"2"... purged by expiry first
    assert not rc.check_and_add("k", b"4", 400, 250)
    with pytest.raises(ValueError):
        ReplayCache(0)


# --- Binance facade ------------------------------------------------------------------------------

def bqs(secret: str, qs: str, body: str = "", *, where: str = "query") -> tuple[str, str]:
    sig = binance_signature(secret, qs, body)
    if where == "query":
        return f"{qs}&signature={sig}" if qs else f"signature={sig}", body
    return qs, f"{body}&signature={sig}"


async def bexpect(bcode: int, coro: object) -> BinanceError:
    with pytest.raises(BinanceError) as ei:
        await coro  # type: ignore[misc]
    assert ei.value.binance_code == bcode, ei.value
    assert to_binance(ei.value) == {"code": bcode, "msg": ei.value.msg}
    return ei.value


async def test_binance_signing_query_body_and_mixed(store: KeyStore) -> None:
    c = await store.create(5, ["read", "trade"])
    assert c.secret is not None
    v = verifier(store)
    base = "symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.01&price=100&newClientOrderId=a%2Fb"
    qs, body = bqs(c.secret, f"{base}&timestamp={NOW}")
    p = await v.verify_binance(c.api_key, qs, body, NOW, required_scope="trade")
    assert p.account_id == 5
    qs, body = bqs(c.secret, "", f"{base}&timestamp={NOW + 1}&recvWindow=10000", where="body")
    await v.verify_binance(c.api_key, qs, body.encode(), NOW)
    qs, body = bqs(c.secret, "symbol=BTCUSDT&side=SELL", f"quantity=1&timestamp={NOW + 2}", where="body")
    await v.verify_binance(c.api_key, qs, body, NOW)


async def test_binance_errors(store: KeyStore) -> None:
    c = await store.create(5, ["read"])
    assert c.secret is not None
    v = verifier(store)
    ok_qs, _ = bqs(c.secret, f"symbol=BTCUSDT&timestamp={NOW}")
    e = await bexpect(-2014, v.verify_binance(None, ok_qs, "", NOW))
    assert e.status == 401 and e.code == "AUTH_MISSING"
    await bexpect(-2014, v.verify_binance("tiny", ok_qs, "", NOW))
    await bexpect(-1102, v.verify_binance(c.api_key, f"symbol=BTCUSDT&timestamp={NOW}", "", NOW))  # no signature
    qs, _ = bqs(c.secret, "symbol=BTCUSDT")
    await bexpect(-1102, v.verify_binance(c.api_key, qs, "", NOW))  # no timestamp
    qs, _ = bqs(c.secret, f"timestamp={NOW}&recvWindow=60001")
    await bexpect(-1131, v.verify_binance(c.api_key, qs, "", NOW))
    qs, _ = bqs(c.secret, f"timestamp={NOW}&recvWindow=abc")
    await bexpect(-1100, v.verify_binance(c.api_key, qs, "", NOW))
    qs, _ = bqs(c.secret, f"timestamp={NOW}&timestamp={NOW}")
    await bexpect(-1101, v.verify_binance(c.api_key, qs, "", NOW))
    # 1000 ms ahead is rejected, 999 ms ahead accepted.
    qs, _ = bqs(c.secret, f"timestamp={NOW + 1000}")
    e = await bexpect(-1021, v.verify_binance(c.api_key, qs, "", NOW))
    assert "ahead" in e.msg and e.code == "AUTH_TIMESTAMP_SKEW"
    qs, _ = bqs(c.secret, f"timestamp={NOW + 999}")
    await v.verify_binance(c.api_key, qs, "", NOW)
    # Default recvWindow 5000; an explicit one up to 60000.
    qs, _ = bqs(c.secret, f"timestamp={NOW - 5001}")
    await bexpect(-1021, v.verify_binance(c.api_key, qs, "", NOW))
    qs, _ = bqs(c.secret, f"timestamp={NOW - 5001}&recvWindow=60000")
    await v.verify_binance(c.api_key, qs, "", NOW)
    qs, _ = bqs(c.secret, f"timestamp={NOW + 1}")
    e = await bexpect(-2015, v.verify_binance("Z" * 64, qs, "", NOW))
    assert e.code == "AUTH_UNKNOWN_KEY"
    await bexpect(-1022, v.verify_binance(c.api_key, qs.replace("timestamp=", "timestamp=0"), "", NOW))
    await bexpect(-1022, v.verify_binance(c.api_key, qs + "&symbol=ETHUSDT", "", NOW))  # unsigned extra param
    await v.verify_binance(c.api_key, qs, "", NOW)
    e = await bexpect(-1022, v.verify_binance(c.api_key, qs, "", NOW + 5))
    assert e.code == "AUTH_REPLAY"
    qs, _ = bqs(c.secret, f"timestamp={NOW + 2}")
    e = await bexpect(-2015, v.verify_binance(c.api_key, qs, "", NOW, required_scope="trade"))
    assert e.code == "AUTH_SCOPE"


async def test_binance_with_ed25519_key(store: KeyStore) -> None:
    priv = Ed25519PrivateKey.generate()
    c = await store.create(3, ["read"], ed25519_public_key=priv.public_key())
    qs = f"timestamp={NOW}"
    sig = base64.b64encode(priv.sign(qs.encode())).decode()
    await verifier(store).verify_binance(c.api_key, f"{qs}&signature={quote(sig, safe='')}", "", NOW)


# --- operators -----------------------------------------------------------------------------------

async def test_operator_requests_and_roles(pool: asyncpg.Pool) -> None:
    op, appr, rogue = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = OperatorKeyStore({pub_hex(op).upper(): ["operator"], pub_hex(appr): ["approver", "viewer"]}, pool)
    ov = OperatorVerifier(keys, clock_ms=lambda: NOW)
    body = b'{"mode":"CANCEL_ONLY","reason":"invariant","ticket":"INC-1"}'
    path = "/v1/admin/symbols/BTC-USDT/mode"

    async def send(priv: Ed25519PrivateKey, ts: int = NOW, **kw: object) -> OperatorIdentity:
        msg = signing_string("POST", path, ts, body)
        return await ov.verify_operator_request(key=pub_hex(priv), ts=str(ts),
                                                signature=ed25519_signature(priv, msg), method="POST",
                                                path_with_query=path, body=body, **kw)  # type: ignore[arg-type]

    ident = await send(op, required_role="operator")
    assert ident.roles == frozenset({"operator"}) and ident.source == "config" and ident.key_hex == pub_hex(op)
    assert ident.actor.startswith("op-")
    e = await expect("AUTH_ROLE", send(op, NOW + 1, required_role="approver"))
    assert e.status == 403
    await expect("AUTH_REPLAY", send(op))
    await expect("AUTH_UNKNOWN_KEY", send(rogue, NOW + 2))
    await expect("AUTH_TIMESTAMP_SKEW", send(op, NOW - 6_000))
    msg = signing_string("POST", path, NOW + 3, body)
    await expect("AUTH_BAD_SIGNATURE", ov.verify_operator_request(
        key=pub_hex(op), ts=str(NOW + 3), signature=ed25519_signature(rogue, msg), method="POST",
        path_with_query=path, body=body))
    await expect("AUTH_MISSING", ov.verify_operator_request(key=None, ts=str(NOW), signature="x", method="POST",
                                                            path_with_query=path, body=body))
    await expect("AUTH_MALFORMED", ov.verify_operator_request(key=pub_hex(op), ts="now", signature="x",
                                                              method="POST", path_with_query=path, body=body))
    # DB-added key; then revoke a config key without a redeploy.
    added = await keys.add(rogue.public_key(), "alice", ["admin"])
    assert added.source == "db" and added.name == "alice"
    assert (await send(rogue, NOW + 4)).roles == frozenset({"admin"})
    with pytest.raises(ValueError):
        await keys.revoke("not-a-key")
    assert await keys.revoke(pub_hex(op)) is True
    assert await keys.revoke(pub_hex(op)) is False
    await expect("AUTH_UNKNOWN_KEY", send(op, NOW + 5))
    assert {i.name for i in await keys.list()} == {"alice", f"op-{pub_hex(appr)[:12]}"}
    # A fresh store (another process) sees the revocation too.
    fresh = OperatorKeyStore({pub_hex(op): ["operator"]}, pool)
    assert await fresh.get(pub_hex(op)) is None


def test_operator_config_validation_and_require_role() -> None:
    k = Ed25519PrivateKey.generate()
    with pytest.raises(ValueError):
        OperatorKeyStore({pub_hex(k): ["superuser"]})
    with pytest.raises(ValueError):
        OperatorKeyStore({"nothex": ["viewer"]})
    admin = OperatorIdentity("a" * 64, "root", frozenset({"admin"}), "config")
    require_role(admin, "admin")
    require_role(admin, "viewer")  # any role can view
    with pytest.raises(SpotexError) as ei:
        require_role(admin, "approver")  # separation of duties: admin is not approver
    assert ei.value.code == "AUTH_ROLE"
    require_role(admin, "approver", "admin")  # any of
    nobody = OperatorIdentity("b" * 64, "x", frozenset(), "db")
    with pytest.raises(SpotexError):
        require_role(nobody, "viewer")
    with pytest.raises(ValueError):
        require_role(admin, "root")


async def test_operator_store_from_config_without_db() -> None:
    from spotex.config import SecuritySection

    k = Ed25519PrivateKey.generate()
    keys = OperatorKeyStore.from_config(SecuritySection(admin_keys={pub_hex(k): ["viewer"]}))
    assert (await keys.get(pub_hex(k))) is not None
    assert (await keys.get("00" * 32)) is None
    with pytest.raises(RuntimeError):
        await keys.revoke(pub_hex(k))
    # security.operator_cache_ttl_s sets how long an identity is trusted (10 s unless configured).
    assert keys._ttl == 10.0
    assert OperatorKeyStore.from_config(SecuritySection(operator_cache_ttl_s=1.5))._ttl == 1.5


# --- errors: problem+json and the code registry ---------------------------------------------------

def test_problem_json_shape() -> None:
    exc = SpotexError("AUTH_BAD_SIGNATURE", detail="nope")
    assert to_problem(exc, "/v1/orders") == {
        "type": "https://spotex.dev/problems/auth-bad-signature", "title": "Bad signature", "status": 401,
        "detail": "nope", "instance": "/v1/orders", "code": "AUTH_BAD_SIGNATURE"}
    assert problem_type("IDEMPOTENCY_KEY_INVALID") == "https://spotex.dev/problems/idempotency-key-invalid"
    # Order calls say whether the order executed; the registry gives the default.
    assert to_problem(SpotexError("INSUFFICIENT_FUNDS"), "/v1/orders", order_call=True)["executionStatus"] == \
        "NOT_EXECUTED"
    assert to_problem(SpotexError("UPSTREAM_TIMEOUT"), "/v1/orders", order_call=True)["executionStatus"] == "UNKNOWN"
    explicit = SpotexError("INTERNAL", execution_status="EXECUTED")
    assert to_problem(explicit, "/x", order_call=True)["executionStatus"] == "EXECUTED"
    # Anything else is an opaque 500: exception text never reaches the client.
    p = to_problem(RuntimeError("password=hunter2"), "/v1/orders")
    assert p["status"] == 500 and p["code"] == "INTERNAL" and "hunter2" not in json.dumps(p)
    with pytest.raises(ValueError):
        SpotexError("NOT_A_REGISTERED_CODE")
    assert SpotexError("NEW_THING", status=418).status == 418
    with pytest.raises(ValueError):
        SpotexError("VALIDATION", execution_status="MAYBE")  # type: ignore[arg-type]
    assert SpotexError("RATE_LIMITED", headers={"Retry-After": "2"}).headers == {"Retry-After": "2"}


def test_registry_rules_and_order_rejects() -> None:
    assert all(400 <= s.status <= 599 for s in REGISTRY.values())
    with pytest.raises(ValueError):
        register("lower_case", 400, "t", "m")
    with pytest.raises(ValueError):
        register("X_OK", 200, "t", "m")
    with pytest.raises(ValueError):
        register("AUTH_MISSING", 400, "t", "m")  # a released code never changes status
    assert order_rejected("INSUFFICIENT_FUNDS").status == 422
    assert order_rejected("MARKET_HALTED").status == 409
    new = order_rejected("SOME_FUTURE_REASON", "core said so")
    assert (new.status, new.code, new.execution_status) == (422, "SOME_FUTURE_REASON", "NOT_EXECUTED")
    assert order_rejected("not a code!").code == "VALIDATION"


def test_binance_error_bodies() -> None:
    assert to_binance(order_rejected("INSUFFICIENT_FUNDS")) == {"code": -2010, "msg": REGISTRY[
        "INSUFFICIENT_FUNDS"].meaning}
    assert to_binance(order_rejected("ORDER_ALREADY_CLOSED"), cancel=True)["code"] == -2011
    assert to_binance(SpotexError("ORDER_NOT_FOUND"))["code"] == -2013
    assert to_binance(SpotexError("ORDER_NOT_FOUND"), cancel=True)["code"] == -2011
    assert to_binance(SpotexError("RATE_LIMITED"))["code"] == -1003
    assert to_binance(SpotexError("UNKNOWN_SYMBOL"))["code"] == -1121
    assert to_binance(KeyError("x"))["code"] == -1000


def test_docs_list_every_error_code() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    missing = [c for c in REGISTRY if f"`{c}`" not in doc]
    assert missing == []
