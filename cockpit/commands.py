"""The one command registry: key bindings, the command palette and the help screen all read it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from cockpit.app import CockpitApp

__all__ = ["COMMANDS", "Command", "CommandsProvider", "bindings", "by_id"]


@dataclass(frozen=True)
class Command:
    id: str
    title: str
    key: str | None
    help: str
    control: str | None = None  # the ControlSpec id for operator controls (read-only mode disables them)
    show: bool = True  # shown in the footer


COMMANDS: tuple[Command, ...] = (
    Command("overview", "Overview", "1", "Every seed §2 dashboard as tiles"),
    Command("markets", "Markets", "2", "Per symbol: mode, best bid/ask, last trade, TPS, latch, throttle"),
    Command("ledger", "Ledger & reconciliation", "3", "Lag per symbol, latches, invariant runs, corrections"),
    Command("checks", "Scheduled checks", "4", "Each job's schedule, last run and outcome"),
    Command("audit", "Audit chain", "5", "The admin audit chain, newest first, with its verification state"),
    Command("playbooks", "Playbooks", "6", "Seed §3 incident playbooks with live signals and actions"),
    Command("refresh", "Refresh now", "r", "Poll every source now", show=False),
    Command("set_mode", "Set symbol mode", "m", "SetSymbolMode: CANCEL_ONLY / SOFT_HALT / HARD_HALT / NORMAL",
            control="set_mode"),
    Command("cancel_all", "Cancel all orders of a symbol", "x", "CancelAll(symbol)", control="cancel_all"),
    Command("withdrawals", "Withdrawals halt on/off", "w", "WithdrawalsHalt(on/off)", control="withdrawals"),
    Command("latch_release", "Release reconciliation latch", "l", "Manual release of a symbol's safety latch",
            control="latch_release"),
    Command("break_glass", "Break-glass enable/disable", "b", "Time-limited break-glass access",
            control="break_glass"),
    Command("set_throttle", "Set symbol throttle", "t", "SetSymbolThrottle: limit new orders/s on a symbol "
            "(operator layer; cancels pass)", control="set_throttle"),
    Command("clear_throttle", "Clear symbol throttle", "u", "ClearSymbolThrottle: lift the operator layer, the "
            "settlement-lag policy's, or all", control="clear_throttle"),
    Command("run_check", "Run scheduled check now", "n", "Run the selected scheduled check now", show=False),
    Command("help", "Help", "question_mark", "Every command with its key", show=True),
    Command("quit", "Quit", "q", "Leave the cockpit (the stack keeps running unless `make run` started it)"),
)

_BY_ID = {c.id: c for c in COMMANDS}


def by_id(cid: str) -> Command:
    return _BY_ID[cid]


def key_label(c: Command) -> str:
    return "?" if c.key == "question_mark" else (c.key or "")


def bindings() -> list[Binding]:
    return [Binding(c.key, f"run_command('{c.id}')", c.title.split(" ")[0] if c.control is None else c.title,
                    show=c.show, id=c.id) for c in COMMANDS if c.key]


def iter_commands() -> Iterator[Command]:
    return iter(COMMANDS)


class CommandsProvider(Provider):
    """Command palette entries from the registry."""

    @property
    def _app(self) -> CockpitApp:
        return self.app  # type: ignore[return-value]

    async def discover(self) -> Hits:
        for c in COMMANDS:
            yield DiscoveryHit(c.title, partial(self._app.run_command, c.id), help=c.help)

    async def search(self, query: str) -> AsyncIterator[Hit]:
        matcher = self.matcher(query)
        for c in COMMANDS:
            score = matcher.match(f"{c.title} {c.help}")
            if score > 0:
                yield Hit(score, matcher.highlight(c.title), partial(self._app.run_command, c.id), help=c.help)
