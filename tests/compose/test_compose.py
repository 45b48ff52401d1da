"""There is no Docker engine here, so the compose file is checked structurally: every service,
command, config file and port it names exists in the project."""

from __future__ import annotations

import re
from pathlib import Path

import click
import yaml

from spotex.cli import main as cli
from spotex.config import load_config
from spotex.guardrails import SERVICE_NAMES, check_all

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"


def _compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def test_deployment_has_every_part_of_the_brief() -> None:
    services = _compose()["services"]
    expected = {"nats-1", "nats-2", "nats-3", "postgres", "redpanda", "core-leader", "core-standby",
                "edge-1", "edge-2", "ledger", "exporter", "jobs"}
    assert expected <= set(services)


def _spotex_services(doc: dict) -> dict[str, dict]:
    return {n: s for n, s in doc["services"].items() if s.get("image") == "spotex:latest"}


def test_every_spotex_command_exists_in_the_cli() -> None:
    doc = _compose()
    spotex = _spotex_services(doc)
    assert len(spotex) >= 8
    served = set()
    for name, svc in spotex.items():
        argv = svc["command"]
        group: click.Command = cli
        for word in argv:
            if isinstance(group, click.Group) and word in group.commands:
                group = group.commands[word]
            else:
                break
        assert group is not cli, f"{name}: {argv} is not a spotex command"
        if argv[0] == "serve":
            assert argv[1] in SERVICE_NAMES, f"{name}: unknown service {argv[1]}"
            served.add(argv[1])
    # Every production service is deployed; the demo trader never is.
    assert served == set(SERVICE_NAMES) - {"demo"}


def test_every_mounted_file_exists() -> None:
    doc = _compose()
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("./"):
                assert (COMPOSE / src).exists(), f"{name}: {src} missing"
            else:
                assert src in doc["volumes"], f"{name}: named volume {src} not declared"
    build = doc["x-spotex"]["build"]
    dockerfile = (COMPOSE / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile.exists()
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"


def test_ports_agree_with_the_configs() -> None:
    doc = _compose()
    cfg = load_config(COMPOSE / "spotex.production.toml", environ={})
    for name in ("edge-1", "edge-2"):
        container_port = int(doc["services"][name]["ports"][0].split(":")[1])
        assert container_port == cfg.edge.port
    probe = doc["x-spotex"]["environment"]["SPOTEX_PROBE_PORT"]
    assert f"127.0.0.1:{probe}/readyz" in " ".join(doc["x-spotex"]["healthcheck"]["test"])
    for i in (1, 2, 3):
        conf = (COMPOSE / "nats" / f"nats-{i}.conf").read_text()
        assert "listen: 0.0.0.0:4222" in conf and "http: 0.0.0.0:8222" in conf
        assert f"nats-{i}:4222" in cfg.nats.url  # type: ignore[operator]
        routes = set(re.findall(r"nats-route://(nats-\d):6222", conf))
        assert routes == {"nats-1", "nats-2", "nats-3"}
    host, port = cfg.kafka.bootstrap.split(":")  # type: ignore[union-attr]
    assert host in doc["services"] and f"0.0.0.0:{port}" in " ".join(doc["services"][host]["command"])


def test_production_config_passes_the_guardrails_with_its_secrets() -> None:
    env = {"SPOTEX_POSTGRES__DSN": "postgresql://spotex:x@postgres:5432/spotex",
           "SPOTEX_SECURITY__ADMIN_KEYS": '{"' + "cd" * 32 + '": ["admin"]}'}
    cfg = load_config(COMPOSE / "spotex.production.toml", environ=env)
    assert cfg.production
    assert check_all(cfg) == []
