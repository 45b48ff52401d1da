"""JetStream layout shared by every component: stream names, subjects and the lease bucket.

Subjects:
- ``cmd.<symbol>`` / ``cmd._sys``: commands to the core leader (stream CMD), ``Nats-Msg-Id`` is the
  client's idempotency key so a retried publish inside the duplicate window is dropped by the server.
- ``evt.<stream>``: events, one subject per symbol plus ``evt._sys`` (stream EVT), ``Nats-Msg-Id`` is
  ``<stream>:<seq>``; the core publishes with ``Nats-Expected-Last-Subject-Sequence`` so only one
  writer can extend a symbol's log.
- KV bucket ``core_lease``: the leader lease; its revision is the fencing token.
- KV bucket ``symbol_throttle``: per-symbol limits on new orders per second that every edge enforces
  (key ``<symbol>.<layer>``, layer ``operator`` or ``policy``, value a JSON :class:`SymbolThrottle`;
  a deleted key is no throttle). Written by the edge's admin API and by the jobs service's
  settlement-lag policy, each after its audit entry; watched by every edge (docs/api.md).

Durability per stream. SEQ (the journal) and EVT are written with the server's default persistence
(with ``sync_interval: always``, fsynced before the PubAck) and the core writes one message per
batch to each, so their fsyncs are group commits. CMD takes one message per trader command, so a
synchronous fsync per message would cap intake at the disk's fsync rate (~460 msgs/s measured here
under load, against ~7,700 with asynchronous persistence: docs/performance.md). CMD therefore uses
``persist_mode: async`` (nats-server >= 2.12, R1 streams) by default: a PubAck no longer promises
the command survives a power failure of the NATS host. That promise is not one the API makes: a
trader's order counts only once the core has sequenced it (journal + WAL, both fsynced) and its
events are on EVT; a command lost before that never executed, and the trader saw a timeout with
``executionStatus: UNKNOWN`` and finds nothing by client order id. ``cmd_persist="sync"`` restores
the fsync per command. The mode is fixed when a stream is created; an existing CMD stream keeps its.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "CMD_PREFIX",
    "EVT_PREFIX",
    "H_FIRST",
    "H_LAST",
    "H_NODE",
    "H_TOKEN",
    "LEASE_BUCKET",
    "SYS_STREAM",
    "THROTTLE_BUCKET",
    "THROTTLE_LAYERS",
    "SymbolThrottle",
    "cmd_subject",
    "decode_setting",
    "ensure_streams",
    "evt_last_seqs",
    "evt_subject",
    "last_messages",
    "read_settings",
    "read_values",
    "setting_for_key",
    "throttle_bucket",
    "throttle_key",
]

CMD_PREFIX = "cmd"
EVT_PREFIX = "evt"
SYS_STREAM = "_sys"
LEASE_BUCKET = "core_lease"
# Headers of every SEQ and EVT message the core publishes: the seqs it carries, the writer's token.
H_FIRST, H_LAST, H_TOKEN, H_NODE = "Spotex-First-Seq", "Spotex-Last-Seq", "Spotex-Fencing-Token", "Spotex-Node"
THROTTLE_BUCKET = "symbol_throttle"
ThrottleLayer = Literal["operator", "policy"]
THROTTLE_LAYERS: tuple[ThrottleLayer, ...] = ("operator", "policy")


def cmd_subject(symbol: str | None) -> str:
    return f"{CMD_PREFIX}.{symbol or SYS_STREAM}"


def evt_subject(stream: str) -> str:
    return f"{EVT_PREFIX}.{stream}"


async def last_messages(js: Any, stream: str, subjects_filter: str) -> dict[str, Any]:
    """subject -> its last message in ``stream`` (a ``RawStreamMsg``), for every subject matching
    ``subjects_filter``: the stream's info lists the subjects, then each one's last message is read."""
    from nats.js.errors import NotFoundError

    info = await js.stream_info(stream, subjects_filter=subjects_filter)
    out: dict[str, Any] = {}
    for subject in sorted(info.state.subjects or {}):
        try:
            out[subject] = await js.get_last_msg(stream, subject)
        except NotFoundError:
            continue
    return out


async def evt_last_seqs(js: Any, evt_stream: str = "EVT", prefix: str = EVT_PREFIX) -> dict[str, int]:
    """Stream -> the engine's last published seq (``Spotex-Last-Seq`` of the subject's last message)."""
    plen = len(prefix) + 1
    return {subject[plen:]: int((msg.headers or {}).get(H_LAST, 0))
            for subject, msg in (await last_messages(js, evt_stream, f"{prefix}.>")).items()}


async def ensure_streams(
    js: Any,
    *,
    cmd_stream: str = "CMD",
    evt_stream: str = "EVT",
    duplicate_window_s: int = 120,
    replicas: int = 1,
    lease_ttl_s: float = 3.0,
    cmd_max_age_s: float = 86_400.0,
    cmd_persist: str = "async",
) -> None:
    """Create (or update) the CMD and EVT streams and the lease bucket. Safe to re-run."""
    from nats.js.api import KeyValueConfig, PersistMode, RetentionPolicy, StorageType, StreamConfig

    if cmd_persist not in ("async", "sync"):
        raise ValueError(f"cmd_persist must be 'async' or 'sync', not {cmd_persist!r}")

    window = float(duplicate_window_s)
    cmd = StreamConfig(
        name=cmd_stream,
        subjects=[f"{CMD_PREFIX}.>"],
        storage=StorageType.FILE,
        # Kept for a day (forensic bundles: seed §3.1), not removed on ack as a work queue would.
        retention=RetentionPolicy.LIMITS,
        max_age=cmd_max_age_s,
        duplicate_window=window,
        num_replicas=replicas,
        # Asynchronous persistence is for single-replica streams only (a replicated CMD is durable by quorum).
        persist_mode=PersistMode.ASYNC if cmd_persist == "async" and replicas == 1 else None,
    )
    evt = StreamConfig(
        name=evt_stream,
        subjects=[f"{EVT_PREFIX}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        duplicate_window=window,
        num_replicas=replicas,
        allow_direct=True,
    )
    for cfg in (cmd, evt):
        try:
            await js.add_stream(cfg)
        except Exception as exc:  # exists with another config: update what may be updated
            if "already in use" in str(exc) or "exists" in str(exc):
                # The persistence mode cannot change after creation: keep whatever the stream has.
                info = await js.stream_info(cfg.name)
                cfg.persist_mode = info.config.persist_mode
                await js.update_stream(cfg)
            else:
                raise
    try:
        await js.key_value(LEASE_BUCKET)
    except Exception:
        await js.create_key_value(
            KeyValueConfig(bucket=LEASE_BUCKET, history=1, ttl=lease_ttl_s, storage=StorageType.FILE,
                           replicas=replicas)
        )


class SymbolThrottle(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """One layer of a symbol's throttle (the value in ``symbol_throttle``). The edge enforces the
    strictest layer present: ``orders_per_s`` refill, ``burst`` capacity, per edge process."""

    symbol: str
    layer: ThrottleLayer
    orders_per_s: int
    burst: int
    actor: str
    reason: str
    ticket: str
    audit_seq: int
    set_at_ms: int


def throttle_key(symbol: str, layer: str) -> str:
    return f"{symbol}.{layer}"


async def throttle_bucket(js: Any, *, replicas: int = 1) -> Any:
    """The ``symbol_throttle`` KV bucket, created on first use (file storage, last 10 revisions per
    key kept for forensics). Safe to call from several processes at once."""
    from nats.js.api import KeyValueConfig, StorageType
    from nats.js.errors import BucketNotFoundError, NotFoundError

    try:
        return await js.key_value(THROTTLE_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_key_value(KeyValueConfig(bucket=THROTTLE_BUCKET, history=10, storage=StorageType.FILE,
                                                        replicas=replicas))


_DEC = msgspec.json.Decoder(SymbolThrottle)


def decode_setting(raw: bytes) -> SymbolThrottle | None:
    """A stored layer, or None when the value is not a valid one (logged, then ignored: a corrupt
    value must not take every edge down; the audit chain says who wrote what)."""
    try:
        s = _DEC.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if s.orders_per_s < 1 or s.burst < 1:
        return None
    return s


async def read_values(js: Any, keys: str = ">") -> dict[str, tuple[bytes, int]]:
    """key -> (raw value, KV revision): the ``symbol_throttle`` bucket's current content (or the keys
    matching ``keys``, e.g. ``"*.policy"``; deleted keys left out; no keys, or no bucket yet, is an
    empty dict).

    Not read with a one-shot KV watch: nats-py's watcher puts its "no more entries" marker first
    when the consumer's info says nothing is pending and no entry has reached the client yet, and
    the server can send that info before the entries it has already pushed, so a busy process read
    an empty or partial bucket (seen in CI: the admin listing missing a throttle that was set; the
    same read decides a clear's THROTTLE_NOT_SET and the settlement-lag job's view of its own layer).
    Instead the stream says which keys exist and each key's last message is read (:func:`last_messages`);
    a key deleted meanwhile is skipped, one created meanwhile is not seen yet."""
    from nats.js.errors import NotFoundError
    from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

    prefix = f"$KV.{THROTTLE_BUCKET}."
    try:
        last = await last_messages(js, f"KV_{THROTTLE_BUCKET}", prefix + keys)
    except NotFoundError:  # the bucket is created by its first writer
        return {}
    return {subject[len(prefix):]: (msg.data, int(msg.seq)) for subject, msg in last.items()
            if msg.data and (msg.headers or {}).get(KV_OP) not in (KV_DEL, KV_PURGE)}


def setting_for_key(key: str, raw: bytes) -> SymbolThrottle | None:
    """The layer stored under ``key`` (``<symbol>.<layer>``), or None when the key is not a throttle
    key or the value is invalid or names another symbol or layer than its key."""
    symbol, _, layer = key.rpartition(".")
    s = decode_setting(raw)
    if s is None or not symbol or s.symbol != symbol or s.layer != layer:
        return None
    return s


async def read_settings(js: Any, keys: str = ">") -> dict[str, dict[str, tuple[SymbolThrottle, int]]]:
    """symbol -> layer -> (setting, KV revision) from :func:`read_values`; invalid entries left out."""
    out: dict[str, dict[str, tuple[SymbolThrottle, int]]] = {}
    for key, (raw, revision) in (await read_values(js, keys)).items():
        s = setting_for_key(key, raw)
        if s is not None:
            out.setdefault(s.symbol, {})[s.layer] = (s, revision)
    return out
