"""``spotex``: the one CLI that reaches every part of the exchange.

Errors are one line on stderr and a non-zero exit: 1 for a failure, 2 for bad usage (click),
3 for a production guardrail refusal.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from spotex.config import Config, ConfigError, load_config, masked
from spotex.paths import DataDir, resolve_data_dir

__all__ = ["ServiceContext", "main"]

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAIL = 1
EXIT_GUARDRAIL = 3


def fail(msg: str, code: int = EXIT_FAIL) -> NoReturn:
    click.echo(f"spotex: {msg}", err=True)
    sys.exit(code)


@dataclass(frozen=True)
class Env:
    cfg: Config
    data: DataDir


def _load(data_dir: str | None, config: str | None) -> Env:
    cfg_path = config or os.environ.get("SPOTEX_CONFIG")
    if cfg_path is None:
        # A spotex.toml inside the data dir is picked up by itself.
        candidate = resolve_data_dir(data_dir) / "spotex.toml"
        if candidate.exists():
            cfg_path = str(candidate)
    try:
        cfg = load_config(cfg_path)
    except ConfigError as exc:
        fail(str(exc))
    return Env(cfg, DataDir(resolve_data_dir(data_dir, cfg.data_dir)))


def stack_options(fn: F) -> F:
    fn = click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
                      help="TOML config file (default: SPOTEX_CONFIG, else DATA_DIR/spotex.toml).")(fn)
    fn = click.option("--data-dir", "data_dir", type=click.Path(file_okay=False), default=None,
                      help="Stack data directory (default: SPOTEX_DATA_DIR, config data_dir, ./.spotex).")(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spotex")
def main() -> None:
    """spotex: a spot crypto exchange run from the terminal."""


# ---------------------------------------------------------------------------------------------
# up / down / status
# ---------------------------------------------------------------------------------------------


def _guardrails_or_exit(cfg: Config, services: tuple[str, ...]) -> None:
    from spotex.guardrails import check_all

    refusals = check_all(cfg, services)
    if refusals:
        for r in refusals:
            click.echo(f"spotex: {r}", err=True)
        sys.exit(EXIT_GUARDRAIL)


@main.command()
@stack_options
@click.option("--detach", is_flag=True, help="Start in the background and return once healthy.")
@click.option("--no-demo", is_flag=True, help="Do not fund demo accounts or run the demo trader.")
@click.option("--timeout", default=90.0, show_default=True, help="Seconds to wait for a detached stack.")
def up(data_dir: str | None, config: str | None, detach: bool, no_demo: bool, timeout: float) -> None:
    """Start NATS, PostgreSQL, the Kafka broker and the spotex services."""
    from spotex.guardrails import SERVICE_NAMES
    from spotex.supervisor import StartupError, Supervisor

    env = _load(data_dir, config)
    demo = env.cfg.demo.enabled and not no_demo
    _guardrails_or_exit(env.cfg, SERVICE_NAMES)
    env.data.ensure()
    if detach:
        _up_detached(env, demo, config, timeout)
        return

    sup = Supervisor(env.cfg, env.data, demo=demo)

    def ready(s: Supervisor) -> None:
        click.echo(f"spotex is up (data dir {env.data.root}); Ctrl-C stops it.")
        for c in s.components:
            click.echo(f"  {c.name:<10} {c.endpoint}")

    try:
        asyncio.run(sup.run_forever(ready))
    except StartupError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass
    click.echo("spotex stopped.")


@main.command()
@stack_options
@click.option("--no-demo", is_flag=True, help="Do not fund demo accounts or run the demo trader.")
@click.pass_context
def run(ctx: click.Context, data_dir: str | None, config: str | None, no_demo: bool) -> None:
    """`make run`: start the stack and open the cockpit on top; leaving the cockpit stops the stack.

    Without a terminal (or before the cockpit is installed) it runs `up` in the foreground."""
    try:
        importlib.import_module("cockpit.app")
        has_cockpit = True
    except ModuleNotFoundError:
        has_cockpit = False
    if not (has_cockpit and sys.stdin.isatty() and sys.stdout.isatty()):
        ctx.invoke(up, data_dir=data_dir, config=config, detach=False, no_demo=no_demo, timeout=90.0)
        return
    ctx.invoke(up, data_dir=data_dir, config=config, detach=True, no_demo=no_demo, timeout=120.0)
    try:
        ctx.invoke(main.commands["cockpit"], data_dir=data_dir, config=config)
    finally:
        ctx.invoke(down, data_dir=data_dir, config=config, timeout=60.0)


def _up_detached(env: Env, demo: bool, config: str | None, timeout: float) -> None:
    from spotex.supervisor import pid_alive

    state = env.data.read_state()
    if state and pid_alive(state.get("supervisor_pid")) and state.get("phase") in ("starting", "running"):
        fail(f"a stack is already running on {env.data.root} (supervisor pid {state['supervisor_pid']})")
    argv = [sys.executable, "-m", "spotex", "up", "--data-dir", str(env.data.root)]
    if config:
        argv += ["--config", config]
    if not demo:
        argv.append("--no-demo")
    started = time.time()
    with open(env.data.logs / "supervisor.log", "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = env.data.read_state() or {}
        fresh = state.get("supervisor_pid") == proc.pid and state.get("updated_at", 0) >= started * 1000 - 1000
        if fresh and state.get("phase") == "running":
            click.echo(f"spotex is up in the background (supervisor pid {proc.pid}, data dir {env.data.root}).")
            click.echo("  spotex status   spotex cockpit   spotex down")
            return
        if proc.poll() is not None:
            err = state.get("error") if fresh else None
            fail(err or f"supervisor exited with code {proc.returncode}; see {env.data.logs / 'supervisor.log'}")
        time.sleep(0.2)
    proc.terminate()
    fail(f"stack not running after {timeout:.0f}s; see {env.data.logs / 'supervisor.log'}")


async def _collect_status(env: Env) -> dict[str, Any]:
    from spotex.embedded import check_http, check_kafka, check_nats, check_postgres
    from spotex.supervisor import pid_alive, resolve_endpoints

    state = env.data.read_state() or {}
    sup_pid = state.get("supervisor_pid")
    sup_alive = pid_alive(sup_pid) and state.get("phase") in ("starting", "running")
    ep = resolve_endpoints(env.cfg, env.data)
    comps_state: dict[str, Any] = state.get("components", {})
    order = state.get("order") or ["nats", "postgres", "kafka"]

    async def one(name: str) -> dict[str, Any]:
        info = comps_state.get(name, {})
        pid = info.get("pid")
        external = bool(info.get("external", False))
        row: dict[str, Any] = {
            "name": name,
            "kind": info.get("kind", "infra"),
            "pid": pid if pid_alive(pid) else None,
            "endpoint": info.get("endpoint"),
            "external": external,
            "restarts": info.get("restarts", 0),
        }
        if not sup_alive:
            row.update(healthy=False, reason="stack not running")
            return row
        if not external and not pid_alive(pid):
            row.update(healthy=False, reason="process not running")
            return row
        if name == "nats":
            reason = await check_nats(ep.nats_url, ep.nats_monitor)
        elif name == "postgres":
            reason = await check_postgres(ep.pg_admin_dsn)
        elif name == "kafka":
            reason = await check_kafka(ep.kafka_bootstrap)
        else:
            reason = await check_http(f"{info.get('endpoint')}/readyz")
        row.update(healthy=reason is None, reason=reason)
        return row

    rows = await asyncio.gather(*(one(n) for n in order))
    return {
        "healthy": bool(sup_alive and rows and all(r["healthy"] for r in rows)),
        "data_dir": str(env.data.root),
        "env": env.cfg.env,
        "supervisor": {"pid": sup_pid if sup_alive else None, "phase": state.get("phase", "stopped"),
                       "error": state.get("error")},
        "components": rows,
    }


@main.command()
@stack_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object with a top-level \"healthy\".")
def status(data_dir: str | None, config: str | None, as_json: bool) -> None:
    """Every component with pid, endpoint, and whether it is healthy (and why not)."""
    env = _load(data_dir, config)
    report = asyncio.run(_collect_status(env))
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
    else:
        sup = report["supervisor"]
        click.echo(f"stack {report['data_dir']}: {'HEALTHY' if report['healthy'] else 'NOT HEALTHY'}"
                   f" (supervisor {sup['pid'] or '-'}, {sup['phase']})")
        if sup.get("error"):
            click.echo(f"  last error: {sup['error']}")
        for r in report["components"]:
            mark = "ok " if r["healthy"] else "BAD"
            why = "" if r["healthy"] else f"  ({r['reason']})"
            click.echo(f"  {mark} {r['name']:<10} pid {r['pid'] or '-':<8} {r['endpoint'] or '-'}{why}")
    sys.exit(0 if report["healthy"] else 1)


@main.command()
@stack_options
@click.option("--timeout", default=60.0, show_default=True)
def down(data_dir: str | None, config: str | None, timeout: float) -> None:
    """Stop a detached stack and every process it started."""
    from spotex.supervisor import pid_alive

    env = _load(data_dir, config)
    state = env.data.read_state()
    if not state:
        click.echo(f"no stack has run on {env.data.root}")
        return
    sup = int(state.get("supervisor_pid") or 0)
    if sup and pid_alive(sup):
        os.kill(sup, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(sup) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(sup):
            os.kill(sup, signal.SIGKILL)
    # Whatever the supervisor could not stop (it was killed, or timed out) goes now.
    leftovers = []
    for name, info in (state.get("components") or {}).items():
        pid = info.get("pid")
        if pid and pid_alive(pid):
            leftovers.append(name)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if leftovers:
        click.echo(f"killed leftover processes: {', '.join(leftovers)}", err=True)
    click.echo(f"spotex stopped ({env.data.root}).")


# ---------------------------------------------------------------------------------------------
# config, db, serve
# ---------------------------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command("show")
@stack_options
def config_show(data_dir: str | None, config: str | None) -> None:
    """The effective configuration (file + SPOTEX_* overrides), secrets masked."""
    env = _load(data_dir, config)
    out = masked(env.cfg)
    out["data_dir"] = str(env.data.root)
    click.echo(json.dumps(out, indent=2, sort_keys=True))


@main.group("db")
def db_group() -> None:
    """Database administration."""


@db_group.command("migrate")
@stack_options
@click.option("--dsn", default=None, help="Override the database DSN.")
def db_migrate(data_dir: str | None, config: str | None, dsn: str | None) -> None:
    """Apply the ledger's versioned SQL migrations (safe to re-run)."""
    from ledger.migrate import MigrationError, migrate
    from spotex.supervisor import resolve_endpoints

    env = _load(data_dir, config)
    target = dsn or resolve_endpoints(env.cfg, env.data).pg_dsn
    try:
        applied = asyncio.run(migrate(target))
    except (MigrationError, OSError) as exc:
        fail(f"migrate: {exc}")
    click.echo(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")


@dataclass(frozen=True)
class ServiceContext:
    """What a service process gets: config, data dir, resolved endpoints, its probe port."""

    name: str
    cfg: Config
    data: DataDir
    endpoints: Any
    probe_port: int


@main.command()
@click.argument("name")
@stack_options
def serve(name: str, data_dir: str | None, config: str | None) -> None:
    """Run one spotex service in the foreground (the supervisor uses this)."""
    from core.obs import configure_logging
    from spotex.guardrails import check
    from spotex.services import get_service
    from spotex.supervisor import resolve_endpoints

    env = _load(data_dir, config)
    refusals = check(env.cfg, name)
    if refusals:
        for r in refusals:
            click.echo(f"spotex: {r}", err=True)
        sys.exit(EXIT_GUARDRAIL)
    try:
        spec = get_service(name)
    except KeyError:
        fail(f"unknown service {name!r}")
    configure_logging(name, env.cfg.log_level)
    module, _, func = spec.entry.partition(":")
    entry = getattr(importlib.import_module(module), func)
    port = int(os.environ.get("SPOTEX_PROBE_PORT", "0"))
    ctx = ServiceContext(name, env.cfg, env.data, resolve_endpoints(env.cfg, env.data), port)
    try:
        import uvloop

        uvloop.run(entry(ctx))
    except KeyboardInterrupt:
        pass


@main.group("guardrails")
def guardrails_group() -> None:
    """Production start-up guardrails (seed §4.4)."""


@guardrails_group.command("check")
@stack_options
@click.option("--service", "services", multiple=True, help="Check only these services.")
def guardrails_check(data_dir: str | None, config: str | None, services: tuple[str, ...]) -> None:
    """Print each refusal the current config would cause; exit 3 if any."""
    from spotex.guardrails import SERVICE_NAMES, check_all

    env = _load(data_dir, config)
    refusals = check_all(env.cfg, services or SERVICE_NAMES)
    for r in refusals:
        click.echo(f"spotex: {r}")
    if refusals:
        sys.exit(EXIT_GUARDRAIL)
    click.echo(f"guardrails_ok=true env={env.cfg.env}")


def _register_plugins() -> None:
    """Command groups owned by other packages attach themselves here."""
    for mod in ("spotex.cli_core", "spotex.cli_bench", "spotex.cli_drill", "spotex.cli_keys", "spotex.cli_ledger",
                "spotex.cli_cockpit", "spotex.cli_jobs", "spotex.cli_smoke", "spotex.cli_load", "spotex.cli_admin",
                "spotex.cli_change", "spotex.cli_policy", "spotex.cli_verify", "spotex.cli_access"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        m.register(main)


_register_plugins()


if __name__ == "__main__":
    main()
