"""Dependencies point one way (brief §6): core depends on nothing of ours; edge, ledger and jobs
depend on core's public contract; the cockpit talks to services only over their APIs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"core", "edge", "ledger", "jobs", "cockpit", "spotex", "runbooks", "benchmarks"}

# package -> packages of ours it may import
ALLOWED = {
    "core": set(),
    "ledger": {"core", "spotex"},
    # The edge serves the admin API, and latch release and the audit chain are ledger logic.
    "edge": {"core", "spotex", "ledger"},
    "jobs": {"core", "spotex", "ledger"},
    "cockpit": {"spotex"},
}
# The modules of core that other packages may use: the contract and the shared base, never the
# engine's internals.
CORE_PUBLIC = {"core.wire", "core.obs", "core.bus", "core.engine", "core.keys", "core.aio"}
# spotex modules services may use: config, paths and test harness, not the CLI or supervisor.
SPOTEX_LIB = {"spotex.config", "spotex.paths", "spotex.embedded", "spotex.testing", "spotex.cli"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependencies_point_one_way(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for mod in _imports(path):
            top = mod.split(".")[0]
            if top not in OURS or top == package:
                continue
            rel = path.relative_to(ROOT)
            if top not in ALLOWED[package]:
                bad.append(f"{rel}: imports {mod}")
            elif top == "core" and package != "core" and not any(
                    mod == p or mod.startswith(p + ".") for p in CORE_PUBLIC):
                bad.append(f"{rel}: imports core internals {mod}")
            elif top == "spotex" and mod not in SPOTEX_LIB:
                bad.append(f"{rel}: imports {mod} (only spotex's library modules are shared)")
    assert bad == []
