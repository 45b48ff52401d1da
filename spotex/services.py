"""The spotex services the supervisor starts, in start order.

Each later capability registers its service here (this is the one list), and provides
``run(ctx)`` in its own package; ``spotex serve NAME`` runs it in a child process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from spotex.config import Config

__all__ = ["SERVICES", "ServiceSpec", "enabled_services"]


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    entry: str  # "package.module:function", an async function taking a ServiceContext
    enabled: Callable[[Config, bool], bool] = lambda cfg, demo: True
    start_timeout_s: float = 30.0


SERVICES: list[ServiceSpec] = [
    ServiceSpec("core", "spotex.runners:run_core"),
    # A warm standby: tails the journal and takes over when the leader's lease expires.
    ServiceSpec("core-standby", "spotex.runners:run_core_standby", enabled=lambda cfg, demo: cfg.core.standby),
    ServiceSpec("ledger", "ledger.service:run"),
    # The demo trader: funded accounts, a market maker and takers over the real command path.
    ServiceSpec("demo", "spotex.demo:run", enabled=lambda cfg, demo: demo and cfg.demo.enabled),
    ServiceSpec("exporter", "jobs.exporter:run"),
    ServiceSpec("jobs", "jobs.scheduler:run"),
    ServiceSpec("edge", "edge.service:run"),
]


def enabled_services(cfg: Config, *, demo: bool) -> list[ServiceSpec]:
    return [s for s in SERVICES if s.enabled(cfg, demo)]


def get_service(name: str) -> ServiceSpec:
    for s in SERVICES:
        if s.name == name:
            return s
    raise KeyError(name)
