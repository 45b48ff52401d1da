"""``spotex smoke g0|g3``: the seed's local smokes (§5 Gate G0, §5.1 Gate G3) as CLI verbs.

Each runs against the stack on ``--data-dir`` when given (it must be healthy), else starts a fresh one
(no demo) in a temporary directory and stops it afterwards, exactly like ``spotex drill``. Prints
``key=value`` lines ending with ``smoke_g0_success=true`` / ``smoke_g3_success=true`` and exits 0 only
when every check passed; evidence under ``build/runbooks/smoke-<gate>/`` (``--out`` to change it).
"""

from __future__ import annotations

import asyncio
import sys

import click

__all__ = ["register"]


def register(main: click.Group) -> None:
    @main.group("smoke")
    def smoke() -> None:
        """Seed §5 / §5.1 smokes: an order through REST, its trade settled in PostgreSQL, WS events."""

    def _run(gate: str, data_dir: str | None, out: str | None, symbol: str | None) -> None:
        from runbooks.common import drill_stack
        from runbooks.smokes import smoke_g0, smoke_g3

        fn = smoke_g0 if gate == "g0" else smoke_g3
        with drill_stack(f"smoke-{gate}", data_dir, out) as d:
            ok = asyncio.run(fn(d, symbol))
        sys.exit(0 if ok else 1)

    def _options(f: click.decorators.FC) -> click.decorators.FC:
        f = click.option("--symbol", default=None, help="Market to trade (default: the first NORMAL one).")(f)
        f = click.option("--out", default=None, help="Evidence directory (default build/runbooks/smoke-<gate>).")(f)
        f = click.option("--data-dir", default=None, help="Run against this running stack (default: start one).")(f)
        return f

    @smoke.command("g0")
    @_options
    def g0(data_dir: str | None, out: str | None, symbol: str | None) -> None:
        """Gate G0: order accepted, trade settled in PostgreSQL, WS TradeExecuted + CandleUpdated."""
        _run("g0", data_dir, out, symbol)

    @smoke.command("g3")
    @_options
    def g3(data_dir: str | None, out: str | None, symbol: str | None) -> None:
        """Gate G3: reserve + settlement append, exactly one trade entry in the ledger, WS events."""
        _run("g3", data_dir, out, symbol)
