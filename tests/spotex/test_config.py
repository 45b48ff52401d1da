from __future__ import annotations

from pathlib import Path

import pytest

from spotex.config import Config, ConfigError, load_config, masked


def test_defaults_are_a_valid_dev_config() -> None:
    cfg = load_config(None, environ={})
    assert cfg.env == "dev"
    assert [m.symbol for m in cfg.markets] == ["BTC-USDT", "ETH-USDT", "SOL-USDT"]
    assert cfg.nats.url is None and cfg.postgres.dsn is None and cfg.kafka.bootstrap is None


def test_toml_then_env_override(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('env = "dev"\n[edge]\nport = 9000\n[postgres]\ndsn = "postgresql://u:pw@db.internal/x"\n')
    cfg = load_config(f, environ={"SPOTEX_EDGE__PORT": "9100", "SPOTEX_DEMO__ENABLED": "false"})
    assert cfg.edge.port == 9100
    assert cfg.demo.enabled is False
    assert cfg.postgres.dsn == "postgresql://u:pw@db.internal/x"


def test_float_fields_take_env_overrides_and_ws_limits_come_from_config(tmp_path: Path) -> None:
    from edge.ws import WsLimits

    f = tmp_path / "c.toml"
    f.write_text("[edge]\nws_max_connections_per_ip = 5\nws_ring_frames = 64\n")
    cfg = load_config(f, environ={"SPOTEX_LEDGER__LAG_BREACH_S": "2.5", "SPOTEX_EDGE__WS_COMMANDS_PER_S": "7",
                                  "SPOTEX_EDGE__WS_SLOW_EPISODES": "9", "SPOTEX_EDGE__WS_OVERLOAD_MODE": "true"})
    assert cfg.ledger.lag_breach_s == 2.5
    lim = WsLimits.from_config(cfg)
    assert (lim.max_connections_per_ip, lim.ring_frames, lim.commands_per_s, lim.slow_episodes, lim.overload) == (
        5, 64, 7.0, 9, True)
    # Unset fields keep the config's defaults, which are WsLimits' own defaults.
    assert WsLimits.from_config(load_config(None, environ={})) == WsLimits()


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.env = "production"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[nats]\nurll = 'x'\n", {}, "urll"),
        ("[edge]\nport = 'eighty'\n", {}, "$.edge.port"),
        ("bogus = 1\n", {}, "bogus"),
        ("", {"SPOTEX_EDGE__PRT": "1"}, "edge.prt"),
        ("", {"SPOTEX_EDGE__PORT": "abc"}, "SPOTEX_EDGE__PORT"),
        ("", {"SPOTEX_DEMO__ENABLED": "maybe"}, "SPOTEX_DEMO__ENABLED"),
        ("env = 'staging'\n", {}, "$.env"),
        ("", {"SPOTEX_LEDGER__LAG_BREACH_S": "soon"}, "SPOTEX_LEDGER__LAG_BREACH_S: expected a number"),
        ("", {"SPOTEX_EDGE__WS_COMMANDS_PER_S": "nan"}, "SPOTEX_EDGE__WS_COMMANDS_PER_S: expected a finite number"),
        ("[edge]\nws_commands_per_s = 0\n", {}, "edge.ws_commands_per_s: must be > 0"),
        ("[edge]\nws_max_subscriptions = 0\n", {}, "edge.ws_max_subscriptions: must be >= 1"),
        ("", {"SPOTEX_EDGE__GC_GEN0_THRESHOLD": "-1"}, "edge.gc_gen0_threshold: must be >= 0"),
        ("", {"SPOTEX_EDGE__KEEP_ALIVE_S": "0"}, "edge.keep_alive_s: must be between 1 and 3600"),
        ("", {"SPOTEX_CORE__REPLAY_EVENTS": "1000"}, "core.replay_events: must be >= 4 * core.fetch_batch (1024)"),
        ("[core]\nfetch_batch = 0\n", {}, "core.fetch_batch: must be >= 1"),
        ("[processes.nice]\nledgr = 10\n", {}, "processes.nice: no component 'ledgr'"),
        ("", {"SPOTEX_PROCESSES__NICE": '{"ledger": 20}'}, "processes.nice.ledger: must be between 0 and 19"),
        ("", {"SPOTEX_PROCESSES__NICE": '{"postgres": -1}'}, "processes.nice.postgres: must be between 0 and 19"),
        ("", {"SPOTEX_SECURITY__OPERATOR_CACHE_TTL_S": "0"}, "security.operator_cache_ttl_s: must be > 0"),
        ("[security]\noperator_cache_ttl_s = 301\n", {}, "security.operator_cache_ttl_s: must be > 0 and <= 300"),
        ("", {"SPOTEX_LEDGER__BATCH_WAIT_MS": "-5"}, "ledger.batch_wait_ms: must be between 0 and 1000"),
        ("[kafka]\nexporter_batch_wait_ms = 5000\n", {}, "kafka.exporter_batch_wait_ms: must be between 0 and 1000"),
        ("[edge]\nws_resume_bytes = 2048\nws_lag_bytes = 1024\n", {}, "edge.ws_resume_bytes (2048) must be below"),
        ("[[markets]]\nsymbol='X-Y'\nbase='X'\nquote='Y'\ntick_size='1'\nlot_size='1'\nmin_notional='1'\n", {},
         "asset 'X'"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, env: dict[str, str], needle: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load_config(f, environ=env)
    assert needle in str(exc.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[edge\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad, environ={})


def test_masked_hides_secrets() -> None:
    cfg = load_config(None, environ={
        "SPOTEX_POSTGRES__DSN": "postgresql://ledger:hunter2@db.internal:5432/spotex",
        "SPOTEX_SECURITY__ADMIN_TOKEN": "tok-123",
        "SPOTEX_JOBS__WEBHOOK_SECRET": "whsec",
    })
    out = masked(cfg)
    text = repr(out)
    assert "hunter2" not in text and "tok-123" not in text and "whsec" not in text
    assert out["postgres"]["dsn"] == "postgresql://***@db.internal:5432/spotex"


def test_every_spotex_variable_the_code_reads_is_config_or_exempt() -> None:
    """A SPOTEX_* variable that steers a tool (SPOTEX_ENGINE, SPOTEX_BIN, ...) must not be taken for a
    config key: the config loader refuses unknown keys, so such a variable would stop every service."""
    import re

    from spotex.config import _ENV_NOT_CONFIG

    root = Path(__file__).resolve().parents[2]
    names: set[str] = set()
    for pkg in ("core", "edge", "ledger", "jobs", "spotex", "cockpit", "runbooks", "scripts", "benchmarks"):
        for f in (root / pkg).rglob("*"):
            if f.suffix in (".py", ".sh") and f.is_file():
                names |= set(re.findall(r"\bSPOTEX_[A-Z][A-Z0-9_]*", f.read_text(errors="replace")))
    for name in sorted(n for n in names if "__" not in n and not n.endswith("_")):
        if name in _ENV_NOT_CONFIG:
            load_config(None, environ={name: "x"})  # ignored by the loader
            continue
        load_config(None, environ={name: "production" if name == "SPOTEX_ENV" else "1"})
