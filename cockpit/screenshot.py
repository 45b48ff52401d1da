"""A screenshot of the cockpit on a running stack (the README's picture of the overview).

``python -m cockpit.screenshot --data-dir D --out docs/img/cockpit-overview.png [--tab overview]
[--operator-key FILE]`` runs the app headless against the stack (with the key's roles from the
stack's config, as ``spotex cockpit``), waits until the dashboards have live values (a few poll
rounds), and writes an SVG, or a PNG when the name ends in ``.png`` (needs CairoSVG).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from cockpit.app import TABS, CockpitApp
from cockpit.signing import OperatorKey, load_operator_key
from cockpit.sources import HttpPoller

__all__ = ["screenshot"]


async def screenshot(data_dir: Path, out: Path, *, tab: str = "overview", size: tuple[int, int] = (150, 62),
                     rounds: int = 6, timeout_s: float = 60.0, key: OperatorKey | None = None,
                     roles: frozenset[str] = frozenset()) -> Path:
    app = CockpitApp(HttpPoller(data_dir, key=key), roles=roles, poll_interval=1.0)
    async with app.run_test(size=size) as pilot:
        for _ in range(int(timeout_s / 0.25)):
            if app.polls >= rounds and app.model.values.get("eng_tps") is not None:
                break
            await pilot.pause(0.25)
        else:
            raise SystemExit(f"no live values from the stack in {data_dir} after {timeout_s:.0f}s")
        await pilot.press(str(TABS.index(tab) + 1))
        await pilot.pause(0.5)
        svg = app.export_screenshot(title="spotex cockpit")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        try:
            import cairosvg
        except ImportError:
            raise SystemExit("a PNG needs CairoSVG (pip install cairosvg); or write an .svg") from None

        cairosvg.svg2png(bytestring=svg.encode(), write_to=str(out), output_width=size[0] * 10)
    else:
        out.write_text(svg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tab", default="overview", choices=TABS)
    p.add_argument("--operator-key", default=None, help="file with the hex Ed25519 private key")
    a = p.parse_args()
    key = load_operator_key(a.operator_key)
    roles: frozenset[str] = frozenset()
    if key is not None:
        from spotex.cli import _load

        roles = frozenset(_load(str(a.data_dir), None).cfg.security.admin_keys.get(key.public_hex, []))
    print(asyncio.run(screenshot(a.data_dir, a.out, tab=a.tab, key=key, roles=roles)))


if __name__ == "__main__":
    main()
