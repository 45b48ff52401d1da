"""Signed-request authentication for traders (HMAC-SHA256 and Ed25519 API keys, plus Binance's
query-string signing) and for operators (Ed25519 keys with roles).

The native scheme (brief §4): headers ``X-API-KEY``, ``X-TS`` (epoch ms) and ``X-SIGNATURE`` over
the exact bytes ``METHOD "\\n" PATH_WITH_QUERY "\\n" X-TS "\\n" BODY``:

- HMAC keys: lowercase or uppercase hex of HMAC-SHA256(secret, signing string), the secret used as
  its UTF-8 bytes (what every Binance-style client does).
- Ed25519 keys: the 64-byte signature in hex or base64 (standard or URL-safe, padding optional).

Checks, in order: headers present and parseable, timestamp inside the skew window, key known and
not revoked, signature valid (constant-time), not a replay of an accepted (key, signature) inside
the window, scope. Every failure raises :class:`~edge.errors.SpotexError` with a stable code and
counts ``auth_fail_total{reason}``.

The replay cache is in-process: a replay sent to another edge replica is not caught by this
process. docs/security.md says what a multi-replica deployment adds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import heapq
import hmac
import os
import re
import secrets
import string
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import asyncpg
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import Counter

from core.keys import load_public_key, raw_public_key
from edge.errors import BinanceError, SpotexError
from spotex.config import EdgeSection, SecuritySection

__all__ = [
    "OPERATOR_ROLES",
    "SCOPES",
    "ApiKeyInfo",
    "CreatedKey",
    "KeyLookup",
    "KeyStore",
    "OperatorIdentity",
    "OperatorKeyStore",
    "OperatorVerifier",
    "Principal",
    "ReplayCache",
    "RequestVerifier",
    "ResolvedKey",
    "SecretBox",
    "binance_payload",
    "binance_signature",
    "ed25519_signature",
    "hmac_signature",
    "load_public_key",
    "path_with_query",
    "require_role",
    "require_scope",
    "signed_headers",
    "signing_string",
]

SCOPES = ("read", "trade")
OPERATOR_ROLES = ("viewer", "operator", "approver", "admin")
KeyKind = Literal["hmac", "ed25519"]

BINANCE_DEFAULT_RECV_WINDOW_MS = 5_000
BINANCE_MAX_RECV_WINDOW_MS = 60_000
BINANCE_MAX_AHEAD_MS = 1_000

AUTH_FAIL = Counter("auth_fail", "Rejected authentication attempts, by reason", ["reason"])
REPLAY_DETECT = Counter("replay_detect", "Signed requests rejected as replays")
REPLAY_EVICT = Counter("replay_cache_evict", "Live replay-cache entries evicted because the cache was full")

_ALNUM = string.ascii_letters + string.digits
_API_KEY_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")  # as the api_keys table's CHECK
_OPERATOR_KEY_RE = re.compile(r"[0-9a-f]{64}")
_TS_MAX_DIGITS = 15


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _fail(code: str, detail: str | None = None) -> SpotexError:
    AUTH_FAIL.labels(code.removeprefix("AUTH_").lower()).inc()
    return SpotexError(code, detail=detail)


def _binance_fail(bcode: int, msg: str, code: str, status: int = 400) -> BinanceError:
    AUTH_FAIL.labels(code.removeprefix("AUTH_").lower()).inc()
    return BinanceError(bcode, msg, code, status=status)


# --- signing -------------------------------------------------------------------------------------

def path_with_query(raw_path: bytes | str, query_string: bytes | str = b"") -> str:
    """The PATH_WITH_QUERY that was signed: the raw request target as sent (ASGI ``raw_path`` and
    ``query_string``), never a decoded or re-encoded form."""
    # surrogateescape: any byte the client sent survives the round trip back to bytes in signing_string.
    p = raw_path.decode("utf-8", "surrogateescape") if isinstance(raw_path, bytes) else raw_path
    q = query_string.decode("utf-8", "surrogateescape") if isinstance(query_string, bytes) else query_string
    return f"{p}?{q}" if q else p


def signing_string(method: str, path_with_query: str, ts: str | int, body: bytes | str) -> bytes:
    """``METHOD\\nPATH_WITH_QUERY\\nX-TS\\nBODY`` as bytes; the body is the raw request body."""
    b = body.encode() if isinstance(body, str) else body
    return f"{method.upper()}\n{path_with_query}\n{ts}\n".encode("utf-8", "surrogateescape") + b


def hmac_signature(secret: str | bytes, message: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def ed25519_signature(private_key: Ed25519PrivateKey, message: bytes,
                      encoding: Literal["hex", "base64"] = "hex") -> str:
    sig = private_key.sign(message)
    return sig.hex() if encoding == "hex" else base64.b64encode(sig).decode()


def signed_headers(api_key: str, credential: str | bytes | Ed25519PrivateKey, method: str, path_with_query: str,
                   body: bytes | str = b"", ts_ms: int | None = None) -> dict[str, str]:
    """Client side of the native scheme: the three auth headers (for SDKs, load tools and tests)."""
    ts = str(_now_ms() if ts_ms is None else ts_ms)
    msg = signing_string(method, path_with_query, ts, body)
    if isinstance(credential, Ed25519PrivateKey):
        sig = ed25519_signature(credential, msg)
    else:
        sig = hmac_signature(credential, msg)
    return {"X-API-KEY": api_key, "X-TS": ts, "X-SIGNATURE": sig}


def binance_payload(query_string: str, body: bytes | str = b"") -> tuple[str, str | None]:
    """Binance's signed payload ``totalParams = query_string + body`` (no separator) with the
    ``signature`` parameter removed from wherever it was, and that signature (URL-decoded).

    The remaining parameters keep their exact bytes: Binance clients sign the encoded string they
    send, so re-encoding would break valid signatures."""
    b = body.decode("utf-8", "surrogateescape") if isinstance(body, bytes) else body
    signature: str | None = None

    def strip(raw: str) -> str:
        nonlocal signature
        if not raw:
            return raw
        kept = []
        for part in raw.split("&"):
            if part.startswith("signature="):
                signature = urllib.parse.unquote_plus(part[len("signature="):])
            else:
                kept.append(part)
        return "&".join(kept)

    return strip(query_string) + strip(b), signature


def binance_signature(secret: str | bytes, query_string: str, body: bytes | str = b"") -> str:
    """Client side of Binance signing, for tests and tools: hex HMAC-SHA256 over ``query_string + body``."""
    payload, _ = binance_payload(query_string, body)
    return hmac_signature(secret, payload.encode("utf-8", "surrogateescape"))


def _decode_signature(sig: str, kind: KeyKind) -> bytes | None:
    """Signature bytes, or None when it is not valid hex (HMAC) / hex or base64 (Ed25519)."""
    s = sig.strip()
    if kind == "hmac":
        if len(s) != 64:
            return None
        try:
            return bytes.fromhex(s)
        except ValueError:
            return None
    if len(s) == 128:
        try:
            return bytes.fromhex(s)
        except ValueError:
            pass
    try:
        raw = base64.b64decode(s.replace("-", "+").replace("_", "/") + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 64 else None


def _parse_ts(ts: str) -> int | None:
    t = ts.strip()
    if not t.isascii() or not t.isdigit() or len(t) > _TS_MAX_DIGITS:
        return None
    return int(t)


# --- replay cache --------------------------------------------------------------------------------

class ReplayCache:
    """Bounded set of accepted (key, signature) pairs, each kept until its timestamp leaves the window.

    Sized for the worst case of ``max accepted req/s x 2 x window``; when full, the entry closest to
    expiry is evicted (counted in ``replay_cache_evict_total``) rather than refusing traffic.
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._seen: dict[tuple[str, bytes], int] = {}
        self._heap: list[tuple[int, str, bytes]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def _purge(self, now_ms: int) -> None:
        heap, seen = self._heap, self._seen
        while heap and heap[0][0] <= now_ms:
            exp, k, s = heapq.heappop(heap)
            if seen.get((k, s)) == exp:
                del seen[(k, s)]

    def check_and_add(self, key_id: str, signature: bytes, expires_at_ms: int, now_ms: int) -> bool:
        """True (and remembered) the first time; False for a replay that has not expired."""
        self._purge(now_ms)
        k = (key_id, signature)
        if k in self._seen:
            return False
        while len(self._seen) >= self.max_entries and self._heap:
            exp, kk, ss = heapq.heappop(self._heap)
            if self._seen.get((kk, ss)) == exp:
                del self._seen[(kk, ss)]
                REPLAY_EVICT.inc()
        self._seen[k] = expires_at_ms
        heapq.heappush(self._heap, (expires_at_ms, key_id, signature))
        return True


# --- secrets at rest -----------------------------------------------------------------------------

class SecretBox:
    """AES-256-GCM for HMAC secrets at rest. The additional data binds a ciphertext to its api key.

    Several keys may be loaded (rotation): new secrets use ``primary``; old rows decrypt with the key
    named by their ``enc_key_id`` until :meth:`KeyStore.reencrypt_all` moves them.
    """

    def __init__(self, keys: Mapping[str, bytes], primary: str) -> None:
        if primary not in keys:
            raise ValueError("primary key id is not among the keys")
        for kid, k in keys.items():
            if len(k) != 32:
                raise ValueError(f"master key {kid!r} must be 32 bytes")
        self._aead = {kid: AESGCM(k) for kid, k in keys.items()}
        self.primary = primary

    @staticmethod
    def key_id_for(key: bytes) -> str:
        return "k" + hashlib.sha256(b"spotex-secretbox\0" + key).hexdigest()[:12]

    @classmethod
    def from_key(cls, key: bytes) -> SecretBox:
        kid = cls.key_id_for(key)
        return cls({kid: key}, kid)

    @classmethod
    def generate(cls) -> SecretBox:
        return cls.from_key(AESGCM.generate_key(bit_length=256))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, create: bool = False) -> SecretBox:
        """Keys from a file of hex lines (the first is primary). ``create`` writes a new random key
        with mode 0600 when the file does not exist (dev data dirs); production mounts the file
        from its secret manager."""
        p = Path(path)
        if not p.exists() and create:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(AESGCM.generate_key(bit_length=256).hex() + "\n")
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if not lines:
            raise ValueError(f"{p}: no master key")
        try:
            keys = [bytes.fromhex(ln) for ln in lines]
        except ValueError:
            raise ValueError(f"{p}: master keys must be hex") from None
        ids = [cls.key_id_for(k) for k in keys]
        return cls(dict(zip(ids, keys, strict=True)), ids[0])

    def encrypt(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        nonce = os.urandom(12)
        return self.primary, nonce + self._aead[self.primary].encrypt(nonce, plaintext, aad)

    def decrypt(self, key_id: str, blob: bytes, aad: bytes) -> bytes:
        aead = self._aead.get(key_id)
        if aead is None:
            raise KeyError(f"master key {key_id!r} is not loaded")
        return aead.decrypt(blob[:12], blob[12:], aad)


# --- trader keys ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """What may be listed and shown: never the secret."""

    api_key: str
    account_id: int
    kind: KeyKind
    scopes: frozenset[str]
    label: str
    created_at_ms: int
    revoked_at_ms: int | None = None
    public_key_hex: str | None = None


@dataclass(frozen=True, slots=True)
class CreatedKey:
    info: ApiKeyInfo
    secret: str | None  # the HMAC secret, returned once and never again; None for Ed25519 keys

    @property
    def api_key(self) -> str:
        return self.info.api_key


@dataclass(frozen=True, slots=True)
class ResolvedKey:
    info: ApiKeyInfo
    hmac_secret: bytes | None = field(default=None, repr=False)
    public_key: Ed25519PublicKey | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated trader request."""

    api_key: str
    account_id: int
    scopes: frozenset[str]
    kind: KeyKind


class KeyLookup(Protocol):
    async def get(self, api_key: str) -> ResolvedKey | None: ...


def _check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    s = frozenset(scopes)
    if not s or not s <= set(SCOPES):
        raise ValueError(f"scopes must be a non-empty subset of {SCOPES}, got {sorted(s)}")
    return s


class KeyStore:
    """Trader API keys in PostgreSQL with a small in-process cache.

    Positive entries live ``cache_ttl_s``, negative ones (unknown keys) ``negative_ttl_s`` so a flood
    of garbage keys does not reach the database. A revoke invalidates this process at once and, via
    ``NOTIFY spotex_api_keys``, every other process that called :meth:`start_listener`; without the
    listener another process notices within ``cache_ttl_s``.
    """

    CHANNEL = "spotex_api_keys"

    def __init__(self, pool: asyncpg.Pool, box: SecretBox, *, cache_ttl_s: float = 30.0,
                 negative_ttl_s: float = 5.0, max_cached: int = 100_000,
                 clock: Callable[[], float] = time.monotonic, clock_ms: Callable[[], int] = _now_ms) -> None:
        self._pool = pool
        self._box = box
        self._ttl = cache_ttl_s
        self._neg_ttl = negative_ttl_s
        self._max = max_cached
        self._clock = clock
        self._clock_ms = clock_ms
        self._cache: dict[str, tuple[float, ResolvedKey | None]] = {}
        self._inflight: dict[str, asyncio.Future[ResolvedKey | None]] = {}
        self._listen_conn: Any = None

    async def create(self, account_id: int, scopes: Iterable[str] = ("read",), *, label: str = "",
                     ed25519_public_key: bytes | str | Ed25519PublicKey | None = None) -> CreatedKey:
        """A new key. HMAC (default): the returned ``secret`` is shown once and stored only encrypted.
        Ed25519: pass the client's public key; nothing secret is stored or returned."""
        sc = _check_scopes(scopes)
        api_key = "".join(secrets.choice(_ALNUM) for _ in range(64))
        now = self._clock_ms()
        secret: str | None = None
        kid: str | None = None
        blob: bytes | None = None
        pub: bytes | None = None
        kind: KeyKind
        if ed25519_public_key is None:
            kind = "hmac"
            secret = "".join(secrets.choice(_ALNUM) for _ in range(64))
            kid, blob = self._box.encrypt(secret.encode(), api_key.encode())
        else:
            kind = "ed25519"
            pub = raw_public_key(load_public_key(ed25519_public_key))
        await self._pool.execute(
            """INSERT INTO api_keys (api_key, account_id, kind, scopes, label, secret_enc, enc_key_id, public_key,
                                     created_at_ms)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            api_key, account_id, kind, sorted(sc), label, blob, kid, pub, now)
        self._cache.pop(api_key, None)
        info = ApiKeyInfo(api_key, account_id, kind, sc, label, now, None, pub.hex() if pub else None)
        return CreatedKey(info, secret)

    @staticmethod
    def _info(r: Mapping[str, Any]) -> ApiKeyInfo:
        pub = r["public_key"]
        return ApiKeyInfo(r["api_key"], r["account_id"], r["kind"], frozenset(r["scopes"]), r["label"],
                          r["created_at_ms"], r["revoked_at_ms"], bytes(pub).hex() if pub is not None else None)

    async def list(self, account_id: int | None = None, *, include_revoked: bool = False) -> list[ApiKeyInfo]:
        rows = await self._pool.fetch(
            """SELECT api_key, account_id, kind, scopes, label, public_key, created_at_ms, revoked_at_ms
               FROM api_keys
               WHERE ($1::bigint IS NULL OR account_id = $1) AND ($2 OR revoked_at_ms IS NULL)
               ORDER BY created_at_ms, api_key""",
            account_id, include_revoked)
        return [self._info(r) for r in rows]

    async def revoke(self, api_key: str, *, account_id: int | None = None) -> bool:
        """Revoke a key (optionally only if it belongs to ``account_id``); False if none was active."""
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                """UPDATE api_keys SET revoked_at_ms = $2
                   WHERE api_key = $1 AND revoked_at_ms IS NULL AND ($3::bigint IS NULL OR account_id = $3)
                   RETURNING 1""",
                api_key, self._clock_ms(), account_id)
            if done:
                await conn.execute("SELECT pg_notify($1, $2)", self.CHANNEL, api_key)
        self.invalidate(api_key)
        return bool(done)

    async def reencrypt_all(self) -> int:
        """Re-encrypt HMAC secrets under the primary master key (after a rotation); returns how many."""
        n = 0
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT api_key, secret_enc, enc_key_id FROM api_keys WHERE kind = 'hmac' AND enc_key_id <> $1 "
                "FOR UPDATE", self._box.primary)
            for r in rows:
                aad = r["api_key"].encode()
                plain = self._box.decrypt(r["enc_key_id"], bytes(r["secret_enc"]), aad)
                kid, blob = self._box.encrypt(plain, aad)
                await conn.execute("UPDATE api_keys SET secret_enc = $2, enc_key_id = $3 WHERE api_key = $1",
                                   r["api_key"], blob, kid)
                n += 1
        return n

    def invalidate(self, api_key: str | None = None) -> None:
        if api_key is None:
            self._cache.clear()
        else:
            self._cache.pop(api_key, None)

    async def start_listener(self) -> None:
        """Hold one pool connection listening for revocations from other processes."""
        if self._listen_conn is not None:
            return
        conn = await self._pool.acquire()

        def on_notify(_c: Any, _pid: int, _channel: str, payload: str) -> None:
            self.invalidate(payload)

        await conn.add_listener(self.CHANNEL, on_notify)
        self._listen_conn = (conn, on_notify)

    async def close(self) -> None:
        if self._listen_conn is not None:
            conn, cb = self._listen_conn
            self._listen_conn = None
            try:
                await conn.remove_listener(self.CHANNEL, cb)
            finally:
                await self._pool.release(conn)

    async def get(self, api_key: str) -> ResolvedKey | None:
        if not _API_KEY_RE.fullmatch(api_key):
            return None  # cannot exist; never cached, so junk cannot fill the cache
        hit = self._cache.get(api_key)
        now = self._clock()
        if hit is not None and hit[0] > now:
            return hit[1]
        fut = self._inflight.get(api_key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[api_key] = fut
        try:
            resolved = await self._load(api_key)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            self._inflight.pop(api_key, None)
        fut.set_result(resolved)
        if len(self._cache) >= self._max:
            for k in list(self._cache)[: max(1, self._max // 10)]:
                del self._cache[k]
        self._cache[api_key] = (self._clock() + (self._ttl if resolved else self._neg_ttl), resolved)
        return resolved

    async def _load(self, api_key: str) -> ResolvedKey | None:
        r = await self._pool.fetchrow(
            """SELECT api_key, account_id, kind, scopes, label, secret_enc, enc_key_id, public_key,
                      created_at_ms, revoked_at_ms
               FROM api_keys WHERE api_key = $1 AND revoked_at_ms IS NULL""", api_key)
        if r is None:
            return None
        info = self._info(r)
        if info.kind == "hmac":
            try:
                secret = self._box.decrypt(r["enc_key_id"], bytes(r["secret_enc"]), api_key.encode())
            except (InvalidTag, KeyError):
                # A row we cannot decrypt is unusable, never a reason to accept anything.
                return None
            return ResolvedKey(info, hmac_secret=secret)
        return ResolvedKey(info, public_key=load_public_key(bytes(r["public_key"])))


def require_scope(principal: Principal, scope: str) -> None:
    """Raise AUTH_SCOPE unless the key has ``scope``. Scopes are explicit: ``trade`` does not imply ``read``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    if scope not in principal.scopes:
        raise _fail("AUTH_SCOPE", f"this API key lacks the {scope!r} scope")


def _verify_sig(resolved: ResolvedKey, sig: bytes, message: bytes) -> bool:
    if resolved.hmac_secret is not None:
        expected = hmac.new(resolved.hmac_secret, message, hashlib.sha256).digest()
        return hmac.compare_digest(expected, sig)
    if resolved.public_key is not None:
        try:
            resolved.public_key.verify(sig, message)
        except InvalidSignature:
            return False
        return True
    return False


class RequestVerifier:
    """Verifies trader requests: the native header scheme and the Binance facade's."""

    def __init__(self, keys: KeyLookup, *, skew_window_ms: int = 5_000, replay: ReplayCache | None = None,
                 clock_ms: Callable[[], int] = _now_ms) -> None:
        if skew_window_ms <= 0:
            raise ValueError("skew_window_ms must be positive")
        self.keys = keys
        self.skew_window_ms = skew_window_ms
        self.replay = replay if replay is not None else ReplayCache()
        self._clock_ms = clock_ms

    @classmethod
    def from_config(cls, keys: KeyLookup, edge: EdgeSection, **kw: Any) -> RequestVerifier:
        return cls(keys, skew_window_ms=edge.skew_window_ms, **kw)

    async def verify(self, *, api_key: str | None, ts: str | None, signature: str | None, method: str,
                     path_with_query: str, body: bytes | str = b"", required_scope: str | None = None,
                     now_ms: int | None = None) -> Principal:
        """Authenticate one request from its three header values and raw target and body."""
        if not api_key or not ts or not signature:
            raise _fail("AUTH_MISSING", "X-API-KEY, X-TS and X-SIGNATURE are required")
        ts_ms = _parse_ts(ts)
        if ts_ms is None:
            raise _fail("AUTH_MALFORMED", "X-TS must be integer epoch milliseconds")
        now = self._clock_ms() if now_ms is None else now_ms
        if abs(now - ts_ms) > self.skew_window_ms:
            raise _fail("AUTH_TIMESTAMP_SKEW",
                        f"X-TS is {now - ts_ms} ms from server time {now}; window is {self.skew_window_ms} ms")
        resolved = await self.keys.get(api_key)
        if resolved is None:
            raise _fail("AUTH_UNKNOWN_KEY")
        sig = _decode_signature(signature, resolved.info.kind)
        if sig is None:
            raise _fail("AUTH_MALFORMED", "X-SIGNATURE must be hex (HMAC) or hex/base64 (Ed25519)")
        if not _verify_sig(resolved, sig, signing_string(method, path_with_query, ts.strip(), body)):
            raise _fail("AUTH_BAD_SIGNATURE")
        if not self.replay.check_and_add(api_key, sig, ts_ms + self.skew_window_ms + 1, now):
            REPLAY_DETECT.inc()
            raise _fail("AUTH_REPLAY")
        p = Principal(api_key, resolved.info.account_id, resolved.info.scopes, resolved.info.kind)
        if required_scope is not None:
            require_scope(p, required_scope)
        return p

    async def verify_binance(self, api_key: str | None, query_string: str, body: bytes | str = b"",
                             now_ms: int | None = None, *, required_scope: str | None = None) -> Principal:
        """Binance SIGNED endpoint security: ``X-MBX-APIKEY`` = ``api_key``, ``timestamp`` and optional
        ``recvWindow`` parameters, ``signature`` = hex HMAC-SHA256(secret, query_string + body) (an
        Ed25519 key signs the same payload, base64). Raises :class:`BinanceError` with Binance's codes."""
        if not api_key or not _API_KEY_RE.fullmatch(api_key):
            raise _binance_fail(-2014, "API-key format invalid.", "AUTH_MISSING", 401)
        payload, signature = binance_payload(query_string, body)
        b = body.decode("utf-8", "surrogateescape") if isinstance(body, bytes) else body
        params: dict[str, list[str]] = {}
        for raw in (query_string, b):
            for k, v in urllib.parse.parse_qsl(raw, keep_blank_values=True):
                params.setdefault(k, []).append(v)
        for name in ("timestamp", "recvWindow", "signature"):
            if len(params.get(name, ())) > 1:
                raise _binance_fail(-1101, f"Duplicate values for parameter '{name}'.", "AUTH_MALFORMED")
        if not signature:
            raise _binance_fail(-1102, "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.",
                                "AUTH_MISSING")
        ts_raw = params.get("timestamp", [""])[0]
        ts_ms = _parse_ts(ts_raw) if ts_raw else None
        if ts_ms is None:
            raise _binance_fail(-1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.",
                                "AUTH_MISSING")
        rw_raw = params.get("recvWindow", [""])[0]
        recv_window = BINANCE_DEFAULT_RECV_WINDOW_MS
        if rw_raw:
            rw = _parse_ts(rw_raw)
            if rw is None:
                raise _binance_fail(-1100, "Illegal characters found in parameter 'recvWindow'.", "AUTH_MALFORMED")
            if rw > BINANCE_MAX_RECV_WINDOW_MS or rw == 0:
                raise _binance_fail(-1131, "recvWindow must be less than 60000", "AUTH_MALFORMED")
            recv_window = rw
        now = self._clock_ms() if now_ms is None else now_ms
        if ts_ms >= now + BINANCE_MAX_AHEAD_MS:
            raise _binance_fail(-1021, "Timestamp for this request was 1000ms ahead of the server's time.",
                                "AUTH_TIMESTAMP_SKEW")
        if now - ts_ms > recv_window:
            raise _binance_fail(-1021, "Timestamp for this request is outside of the recvWindow.",
                                "AUTH_TIMESTAMP_SKEW")
        resolved = await self.keys.get(api_key)
        if resolved is None:
            raise _binance_fail(-2015, "Invalid API-key, IP, or permissions for action.", "AUTH_UNKNOWN_KEY", 401)
        sig = _decode_signature(signature, resolved.info.kind)
        if sig is None or not _verify_sig(resolved, sig, payload.encode("utf-8", "surrogateescape")):
            raise _binance_fail(-1022, "Signature for this request is not valid.", "AUTH_BAD_SIGNATURE")
        if not self.replay.check_and_add(api_key, sig, ts_ms + recv_window + 1, now):
            REPLAY_DETECT.inc()
            raise _binance_fail(-1022, "Signature for this request was already used (replay); sign a new request.",
                                "AUTH_REPLAY")
        if required_scope is not None and required_scope not in resolved.info.scopes:
            raise _binance_fail(-2015, "Invalid API-key, IP, or permissions for action.", "AUTH_SCOPE", 401)
        return Principal(api_key, resolved.info.account_id, resolved.info.scopes, resolved.info.kind)


# --- operators -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OperatorIdentity:
    key_hex: str  # lowercase hex of the Ed25519 public key
    name: str
    roles: frozenset[str]
    source: Literal["config", "db"]

    @property
    def actor(self) -> str:
        """How the audit chain names this operator."""
        return f"{self.name}:{self.key_hex[:16]}"


def _check_roles(roles: Iterable[str]) -> frozenset[str]:
    r = frozenset(roles)
    bad = r - set(OPERATOR_ROLES)
    if bad:
        raise ValueError(f"unknown operator roles {sorted(bad)}; known: {OPERATOR_ROLES}")
    return r


def require_role(identity: OperatorIdentity, *roles: str) -> None:
    """Raise AUTH_ROLE unless the operator holds one of ``roles``.

    Roles are not a hierarchy (separation of duties: an ``admin`` is not automatically an
    ``approver``); the one exception is ``viewer``, which any role satisfies.
    """
    if not roles:
        raise ValueError("require_role needs at least one role")
    _check_roles(roles)
    if identity.roles & set(roles):
        return
    if "viewer" in roles and identity.roles:
        return
    raise _fail("AUTH_ROLE", f"operator {identity.name} needs one of the roles {sorted(roles)}")


class OperatorKeyStore:
    """Operator keys from config (``security.admin_keys``: hex public key -> roles) and the
    ``operator_keys`` table. Config decides a config key's roles; the table adds keys and can revoke
    any key, config ones included, without a redeploy. An active ``jit_grants`` row adds its role to a
    known key until it expires or is revoked (edge/access.py); a cached identity never outlives a grant."""

    def __init__(self, config_keys: Mapping[str, Sequence[str]] | None = None, pool: asyncpg.Pool | None = None,
                 *, cache_ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 clock_ms: Callable[[], int] = _now_ms) -> None:
        self._config: dict[str, frozenset[str]] = {}
        for key, roles in (config_keys or {}).items():
            hexkey = raw_public_key(load_public_key(key)).hex()
            self._config[hexkey] = _check_roles(roles)
        self._pool = pool
        self._ttl = cache_ttl_s
        self._clock = clock
        self._clock_ms = clock_ms
        self._cache: dict[str, tuple[float, OperatorIdentity | None]] = {}

    @classmethod
    def from_config(cls, security: SecuritySection, pool: asyncpg.Pool | None = None, **kw: Any) -> OperatorKeyStore:
        kw.setdefault("cache_ttl_s", security.operator_cache_ttl_s)
        return cls(security.admin_keys, pool, **kw)

    async def add(self, public_key: bytes | str | Ed25519PublicKey, name: str,
                  roles: Iterable[str]) -> OperatorIdentity:
        if self._pool is None:
            raise RuntimeError("operator keys can only be added with a database")
        r = _check_roles(roles)
        if not name.strip():
            raise ValueError("operator key needs a name")
        hexkey = raw_public_key(load_public_key(public_key)).hex()
        await self._pool.execute(
            """INSERT INTO operator_keys (public_key_hex, name, roles, created_at_ms) VALUES ($1, $2, $3, $4)
               ON CONFLICT (public_key_hex) DO UPDATE
               SET name = EXCLUDED.name, roles = EXCLUDED.roles, revoked_at_ms = NULL""",
            hexkey, name, sorted(r), self._clock_ms())
        self._cache.pop(hexkey, None)
        got = await self.get(hexkey)
        assert got is not None
        return got

    async def revoke(self, public_key_hex: str) -> bool:
        if self._pool is None:
            raise RuntimeError("operator keys can only be revoked with a database")
        hexkey = raw_public_key(load_public_key(public_key_hex)).hex()
        done = await self._pool.fetchval(
            """INSERT INTO operator_keys (public_key_hex, name, roles, created_at_ms, revoked_at_ms)
               VALUES ($1, 'revoked-config-key', '{}', $2, $2)
               ON CONFLICT (public_key_hex) DO UPDATE SET revoked_at_ms = EXCLUDED.revoked_at_ms
               WHERE operator_keys.revoked_at_ms IS NULL
               RETURNING 1""", hexkey, self._clock_ms())
        self._cache.pop(hexkey, None)
        return bool(done)

    async def list(self) -> list[OperatorIdentity]:
        keys = set(self._config)
        if self._pool is not None:
            keys |= {r["public_key_hex"] for r in await self._pool.fetch("SELECT public_key_hex FROM operator_keys")}
        out = []
        for k in sorted(keys):
            ident = await self.get(k)
            if ident is not None:
                out.append(ident)
        return out

    async def get(self, key_hex: str) -> OperatorIdentity | None:
        k = key_hex.strip().lower()
        if not _OPERATOR_KEY_RE.fullmatch(k):
            return None
        hit = self._cache.get(k)
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        ident = await self._load(k)
        ttl = self._ttl
        if ident is not None and self._pool is not None:  # JIT grants (edge/access.py): roles until they expire
            ident, jit_ttl = await self._with_jit(ident)
            ttl = min(ttl, jit_ttl)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[k] = (self._clock() + ttl, ident)
        return ident

    async def _with_jit(self, ident: OperatorIdentity) -> tuple[OperatorIdentity, float]:
        """``ident`` plus the roles of its active JIT grants, and how long (s) that stays true."""
        assert self._pool is not None
        now = self._clock_ms()
        try:
            rows = await self._pool.fetch(
                """SELECT role, expires_at_ms FROM jit_grants
                   WHERE public_key_hex = $1 AND revoked_at_ms IS NULL AND expires_at_ms > $2""", ident.key_hex, now)
        except asyncpg.UndefinedTableError:  # a database before migration 0007
            return ident, self._ttl
        if not rows:
            return ident, self._ttl
        ttl = (min(r["expires_at_ms"] for r in rows) - now) / 1000
        return replace(ident, roles=ident.roles | {r["role"] for r in rows}), ttl

    async def _load(self, k: str) -> OperatorIdentity | None:
        row = None
        if self._pool is not None:
            row = await self._pool.fetchrow(
                "SELECT name, roles, revoked_at_ms FROM operator_keys WHERE public_key_hex = $1", k)
        if row is not None and row["revoked_at_ms"] is not None:
            return None
        if k in self._config:
            return OperatorIdentity(k, f"op-{k[:12]}", self._config[k], "config")
        if row is not None:
            return OperatorIdentity(k, row["name"], frozenset(row["roles"]), "db")
        return None


class OperatorVerifier:
    """Verifies Ed25519-signed operator requests: same signing string and checks as traders'."""

    def __init__(self, store: OperatorKeyStore, *, skew_window_ms: int = 5_000, replay: ReplayCache | None = None,
                 clock_ms: Callable[[], int] = _now_ms) -> None:
        self.store = store
        self.skew_window_ms = skew_window_ms
        self.replay = replay if replay is not None else ReplayCache(max_entries=10_000)
        self._clock_ms = clock_ms

    async def verify_operator_request(self, *, key: str | None, ts: str | None, signature: str | None, method: str,
                                      path_with_query: str, body: bytes | str = b"",
                                      required_role: str | None = None, now_ms: int | None = None) -> OperatorIdentity:
        """``key`` is the operator's hex public key (the request's X-API-KEY on admin routes)."""
        if not key or not ts or not signature:
            raise _fail("AUTH_MISSING", "operator key, X-TS and X-SIGNATURE are required")
        ts_ms = _parse_ts(ts)
        if ts_ms is None:
            raise _fail("AUTH_MALFORMED", "X-TS must be integer epoch milliseconds")
        now = self._clock_ms() if now_ms is None else now_ms
        if abs(now - ts_ms) > self.skew_window_ms:
            raise _fail("AUTH_TIMESTAMP_SKEW",
                        f"X-TS is {now - ts_ms} ms from server time {now}; window is {self.skew_window_ms} ms")
        ident = await self.store.get(key)
        if ident is None:
            raise _fail("AUTH_UNKNOWN_KEY", "unknown or revoked operator key")
        sig = _decode_signature(signature, "ed25519")
        if sig is None:
            raise _fail("AUTH_MALFORMED", "X-SIGNATURE must be a hex or base64 Ed25519 signature")
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(ident.key_hex))
        try:
            pub.verify(sig, signing_string(method, path_with_query, ts.strip(), body))
        except InvalidSignature:
            raise _fail("AUTH_BAD_SIGNATURE") from None
        if not self.replay.check_and_add(ident.key_hex, sig, ts_ms + self.skew_window_ms + 1, now):
            REPLAY_DETECT.inc()
            raise _fail("AUTH_REPLAY")
        if required_role is not None:
            require_role(ident, required_role)
        return ident
