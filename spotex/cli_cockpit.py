"""``spotex cockpit``: open the Textual cockpit on a running stack (embedded or remote)."""

from __future__ import annotations

import click

__all__ = ["register"]


def register(main: click.Group) -> None:
    from spotex.cli import stack_options

    @main.command("cockpit")
    @stack_options
    @click.option("--edge-url", default=None, help="Remote stack: the edge's base URL (default: the data dir's).")
    @click.option("--operator-key", "operator_key", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="File with the operator's hex Ed25519 private key (default: SPOTEX_OPERATOR_KEY). "
                       "Without it the cockpit is read-only.")
    @click.option("--interval", default=1.0, show_default=True, help="Seconds between poll rounds.")
    def cockpit(data_dir: str | None = None, config: str | None = None, edge_url: str | None = None,
                operator_key: str | None = None, interval: float = 1.0) -> None:
        """The on-call terminal: live dashboards, playbooks, audited emergency controls."""
        from cockpit.app import CockpitApp, jobs_from_config
        from cockpit.signing import load_operator_key
        from cockpit.sources import HttpPoller
        from spotex.cli import _load, fail

        env = _load(data_dir, config)
        try:
            key = load_operator_key(operator_key)
        except (OSError, ValueError) as exc:
            fail(f"operator key: {exc}")
        roles: frozenset[str] = frozenset()
        why = None
        if key is not None:
            roles = frozenset(env.cfg.security.admin_keys.get(key.public_hex, []))
            if not roles:
                why = f"read-only: operator key {key.public_hex[:12]}... has no roles in security.admin_keys"
        poller = HttpPoller(env.data.root, edge_url, key)
        CockpitApp(poller, roles=roles, poll_interval=interval, jobs=jobs_from_config(env.cfg),
                   readonly_reason=why).run()
