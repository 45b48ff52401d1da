"""``spotex load smoke``: the seed's load harness (§7), ``build/load/load-smoke.json``."""

from __future__ import annotations

import click

__all__ = ["register"]


def register(main: click.Group) -> None:
    @main.group("load")
    def load() -> None:
        """Load harness: REST orders and WS subscribers through the whole stack, judged by the load budgets."""

    @load.command("smoke")
    @click.option("--data-dir", default=None, help="Run against this running stack (default: start one).")
    @click.option("--out", default="build/load", show_default=True, help="Evidence directory (load-smoke.json).")
    @click.option("--orders", default=120, show_default=True)
    @click.option("--concurrency", default=8, show_default=True, help="Trader connections (one API key each).")
    @click.option("--ws-subscribers", default=4, show_default=True)
    def smoke(data_dir: str | None, out: str, orders: int, concurrency: int, ws_subscribers: int) -> None:
        """Seed §7: order_p99_ms, order_error_rate, order_tps, ws_messages; exit 1 on a threshold violation."""
        from runbooks.load_drills import load_smoke as fn
        from spotex.cli_drill import _run

        if orders < 1 or concurrency < 1 or ws_subscribers < 0:
            raise click.BadParameter("--orders and --concurrency must be >= 1, --ws-subscribers >= 0")
        _run("load-smoke", data_dir, out, fn, orders=orders, concurrency=concurrency, ws_subscribers=ws_subscribers)
