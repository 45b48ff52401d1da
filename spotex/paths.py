"""Where a stack keeps its data, and the small JSON files the supervisor records there."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["DataDir", "free_port", "port_in_use", "resolve_data_dir"]


def resolve_data_dir(flag: str | None, config_value: str | None = None) -> Path:
    """--data-dir, else SPOTEX_DATA_DIR, else the config's data_dir, else ./.spotex."""
    raw = flag or os.environ.get("SPOTEX_DATA_DIR") or config_value or ".spotex"
    return Path(raw).expanduser().resolve()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


class DataDir:
    """Layout of one stack's data directory. Several stacks run side by side in different ones."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> DataDir:
        for d in (self.run, self.logs, self.nats, self.core, self.build):
            d.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def nats(self) -> Path:
        return self.root / "nats"

    @property
    def postgres(self) -> Path:
        return self.root / "postgres"

    @property
    def core(self) -> Path:
        return self.root / "core"

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def config_file(self) -> Path:
        return self.root / "spotex.toml"

    @property
    def state_file(self) -> Path:
        return self.run / "state.json"

    @property
    def ports_file(self) -> Path:
        return self.run / "ports.json"

    @property
    def lock_file(self) -> Path:
        return self.run / "supervisor.lock"

    def read_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def write_state(self, state: dict[str, Any]) -> None:
        _write_json_atomic(self.state_file, state)

    def read_ports(self) -> dict[str, int]:
        try:
            data = json.loads(self.ports_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return {k: int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def write_ports(self, ports: dict[str, int]) -> None:
        _write_json_atomic(self.ports_file, ports)
