"""Production start-up guardrails (seed §4.4): fail closed on unsafe configuration.

With ``env = "production"`` (or ``SPOTEX_ENV=production``) each service refuses to start when a
setting it depends on is unsafe. Every refusal is one line naming the service and the reason;
the CLI exits non-zero.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from spotex.config import Config

__all__ = ["SERVICE_NAMES", "Refusal", "check", "check_all"]

SERVICE_NAMES = ("core", "core-standby", "edge", "ledger", "exporter", "jobs", "demo")


class Refusal(str):
    """One guardrail refusal line."""


def _is_loopback(host: str | None) -> bool:
    if not host:
        return True
    if host in ("localhost", "localhost.localdomain"):
        return True
    # Literals only: no DNS is asked at start-up, a name is taken as a real host.
    try:
        return ipaddress.ip_address(host).is_loopback or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host.endswith(".localhost")


def _hosts(url: str) -> list[str | None]:
    hosts: list[str | None] = []
    for part in url.split(","):
        part = part.strip()
        if "://" not in part:
            part = "tcp://" + part
        hosts.append(urlsplit(part).hostname)
    return hosts


def _nats(cfg: Config) -> list[str]:
    if cfg.nats.url is None:
        return ["embedded nats-server is for development; set nats.url to the production NATS cluster"]
    if any(_is_loopback(h) for h in _hosts(cfg.nats.url)):
        return [f"nats.url points at a loopback address ({cfg.nats.url}); core endpoints must be real hosts"]
    return []


def _postgres(cfg: Config) -> list[str]:
    if cfg.postgres.dsn is None:
        return ["embedded PostgreSQL is for development; set postgres.dsn to the production database"]
    host = urlsplit(cfg.postgres.dsn).hostname
    if _is_loopback(host):
        return ["postgres.dsn points at a loopback address; the ledger database must be a real host"]
    return []


def _kafka(cfg: Config) -> list[str]:
    if cfg.kafka.bootstrap is None:
        return ["embedded Kafka broker is for development; set kafka.bootstrap to the production brokers"]
    if any(_is_loopback(h) for h in _hosts(cfg.kafka.bootstrap)):
        return [f"kafka.bootstrap points at a loopback broker ({cfg.kafka.bootstrap})"]
    return []


def _admin(cfg: Config) -> list[str]:
    if not cfg.security.admin_keys:
        return ["no operator keys configured (security.admin_keys is empty); admin actions would be unverifiable"]
    return []


def _latch(cfg: Config) -> list[str]:
    out = []
    if not cfg.security.latch_approval_enabled:
        out.append("reconciliation latch approval is disabled (security.latch_approval_enabled = false)")
    if not cfg.ledger.latch_requires_second_approver:
        out.append("latch release without a distinct second approver (ledger.latch_requires_second_approver = false)")
    return out


def _demo(cfg: Config) -> list[str]:
    if cfg.demo.enabled:
        return ["demo funding is enabled (demo.enabled = true); it mints balances"]
    return []


def _policy(cfg: Config) -> list[str]:
    from jobs.policy import startup_problem  # the signed policy bundle (docs/policy.md)

    problem = startup_problem(cfg)
    return [problem] if problem else []


_CHECKS = {
    "core": (_nats, _demo),
    "core-standby": (_nats, _demo),
    # The demo trader mints balances: it never runs in production.
    "demo": (_demo,),
    "edge": (_nats, _admin, _demo),
    "ledger": (_nats, _postgres, _latch, _demo),
    "exporter": (_nats, _kafka),
    "jobs": (_nats, _postgres, _admin, _policy),
}


def check(cfg: Config, service: str) -> list[Refusal]:
    """The refusal lines for one service; empty when it may start (always empty outside production)."""
    if not cfg.production:
        return []
    reasons: list[str] = []
    for fn in _CHECKS.get(service, (_nats,)):
        for r in fn(cfg):
            if r not in reasons:
                reasons.append(r)
    return [Refusal(f"refusing to start {service} in production: {r}") for r in reasons]


def check_all(cfg: Config, services: tuple[str, ...] = SERVICE_NAMES) -> list[Refusal]:
    out: list[Refusal] = []
    for s in services:
        out.extend(check(cfg, s))
    return out
