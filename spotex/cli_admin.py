"""``spotex admin ...``: operator actions through the edge's signed admin API, from a terminal; and
``spotex logs pii-scan``, the PII/secrets gate over a stack's logs (``jobs.pii_scan``).

``spotex admin break-glass enable|status|disable`` (seed §4.0 ``./scripts/break_glass.sh``) signs each
request with the operator's Ed25519 key exactly as the cockpit does (``cockpit.signing``; the key from
``--operator-key FILE`` or ``SPOTEX_OPERATOR_KEY``). The edge authenticates the key, checks its role
(``operator`` to change, any role to read) and appends the change to the admin audit chain in the same
transaction. Output: ``break_glass_*=`` lines; ``--json`` prints the edge's answer. Errors: one line
``spotex: ...`` and exit 1.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

__all__ = ["register"]


def _edge_url(data_dir: str | None, config: str | None, edge_url: str | None) -> str:
    from spotex.cli import _load, fail

    if edge_url:
        return edge_url.rstrip("/")
    env = _load(data_dir, config)
    port = env.data.read_ports().get("edge")
    if not port:
        fail(f"no edge recorded in {env.data.root} (is the stack up? or give --edge-url)")
    return f"http://127.0.0.1:{port}"


def _call(url: str, key_file: str | None, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One signed request; the edge's JSON answer, or a one-line failure."""
    import httpx

    from cockpit.signing import load_operator_key
    from spotex.cli import fail

    try:
        key = load_operator_key(key_file)
    except (OSError, ValueError) as exc:
        fail(f"operator key: {exc}")
    if key is None:
        fail("an operator key is needed: --operator-key FILE or SPOTEX_OPERATOR_KEY (hex Ed25519 private key)")
    raw = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
    headers = key.headers(method, path, raw)
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        r = httpx.request(method, url + path, content=raw, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        fail(f"edge unreachable at {url}: {type(exc).__name__}: {exc}")
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code >= 400:
        if isinstance(data, dict):
            fail(f"{method} {path} refused: {r.status_code} {data.get('code') or data.get('title')}: "
                 f"{data.get('detail') or ''}".rstrip(": "))
        fail(f"{method} {path} refused: {r.status_code} {r.text.strip()[:200]}")
    return data


def _iso(ms: int | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else "-"


def _print(state: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(state, sort_keys=True))
        return
    click.echo(f"break_glass_active={'true' if state.get('active') else 'false'}")
    for k in ("actor", "reason", "ticket", "remaining_s", "audit_seq", "disabled_by"):
        v = state.get(k)
        click.echo(f"break_glass_{k}={'-' if v is None else v}")
    click.echo(f"break_glass_enabled_at={_iso(state.get('enabled_at_ms'))}")
    click.echo(f"break_glass_expires_at={_iso(state.get('expires_at_ms'))}")
    if state.get("disabled_at_ms"):
        click.echo(f"break_glass_disabled_at={_iso(state.get('disabled_at_ms'))}")


def _required(actor: str | None, reason: str | None, verb: str) -> tuple[str, str]:
    from spotex.cli import fail

    if not actor or not actor.strip():
        fail(f"break-glass {verb} needs --actor (the on-call operator)")
    if not reason or not reason.strip():
        fail(f"break-glass {verb} needs --reason (the incident, or why it is resolved)")
    return actor.strip(), reason.strip()


def _with_actor(reason: str, actor: str) -> str:
    # The audit chain's actor is the signing key's identity (authenticated); the on-call name the
    # runbook asks for goes into the audited reason next to it.
    return f"{reason} [oncall: {actor}]"


def register(main: click.Group) -> None:
    from spotex.cli import stack_options

    register_logs(main)

    def _opts(f: Any) -> Any:
        f = click.option("--json", "as_json", is_flag=True, help="Print the edge's answer as JSON.")(f)
        f = click.option("--edge-url", default=None, help="The edge's base URL (default: the data dir's edge).")(f)
        f = click.option("--operator-key", "operator_key", type=click.Path(dir_okay=False), default=None,
                         help="File with the operator's hex Ed25519 private key (default: SPOTEX_OPERATOR_KEY).")(f)
        return stack_options(f)

    @main.group("admin")
    def admin() -> None:
        """Operator actions through the edge's signed, audited admin API."""

    @admin.group("break-glass")
    def break_glass() -> None:
        """Break-glass: a time-boxed emergency window, every change in the audit chain."""

    @break_glass.command("enable")
    @_opts
    @click.option("--ttl-sec", "ttl_sec", type=int, default=None, help="Window length in seconds (1 s .. 4 h).")
    @click.option("--actor", default=None, help="The on-call operator (recorded in the audited reason).")
    @click.option("--reason", default=None, help="The incident (required).")
    @click.option("--ticket", default=None, help="Incident ticket (optional: omitted -> BREAK-GLASS-NO-TICKET).")
    def enable(data_dir: str | None, config: str | None, operator_key: str | None, edge_url: str | None,
               as_json: bool, ttl_sec: int | None, actor: str | None, reason: str | None,
               ticket: str | None) -> None:
        """Enable break-glass for --ttl-sec seconds (role operator)."""
        from spotex.cli import fail

        who, why = _required(actor, reason, "enable")
        if ttl_sec is None:
            fail("break-glass enable needs --ttl-sec (seconds, 1 .. 14400)")
        url = _edge_url(data_dir, config, edge_url)
        state = _call(url, operator_key, "POST", "/v1/admin/break-glass/enable",
                      {"reason": _with_actor(why, who), "ticket": ticket, "ttl_s": ttl_sec})
        _print(state, as_json)

    @break_glass.command("status")
    @_opts
    def status(data_dir: str | None, config: str | None, operator_key: str | None, edge_url: str | None,
               as_json: bool) -> None:
        """Show whether break-glass is active, who enabled it, why, and until when (any role)."""
        state = _call(_edge_url(data_dir, config, edge_url), operator_key, "GET", "/v1/admin/break-glass")
        _print(state, as_json)

    @break_glass.command("disable")
    @_opts
    @click.option("--actor", default=None, help="The on-call operator (recorded in the audited reason).")
    @click.option("--reason", default=None, help="Why it is over (required).")
    @click.option("--ticket", default=None, help="Incident ticket (optional).")
    def disable(data_dir: str | None, config: str | None, operator_key: str | None, edge_url: str | None,
                as_json: bool, actor: str | None, reason: str | None, ticket: str | None) -> None:
        """Disable break-glass now (role operator); a no-op, not audited, when it is not active."""
        who, why = _required(actor, reason, "disable")
        url = _edge_url(data_dir, config, edge_url)
        state = _call(url, operator_key, "POST", "/v1/admin/break-glass/disable",
                      {"reason": _with_actor(why, who), "ticket": ticket})
        _print(state, as_json)


def register_logs(main: click.Group) -> None:
    from spotex.cli import stack_options

    @main.group("logs")
    def logs() -> None:
        """The stack's log files."""

    @logs.command("pii-scan")
    @stack_options
    @click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
    @click.option("--out", default="build/security/pii-log-scan.json", show_default=True,
                  help="Evidence JSON (every finding, redacted).")
    def pii_scan(data_dir: str | None, config: str | None, paths: tuple[Path, ...], out: str) -> None:
        """Seed §4.0 PII log scan gate: every log line against the PII/secrets policy (docs/security.md).
        PATHS: files or directories (default: the data dir's logs/). Exit 1 on any finding."""
        from jobs.pii_scan import scan_paths
        from spotex.cli import _load, fail

        targets = list(paths) or [_load(data_dir, config).data.logs]
        try:
            res = scan_paths(targets)
        except (FileNotFoundError, PermissionError) as exc:
            fail(f"pii scan: {exc}")
        if res.files == 0:
            fail(f"pii scan: no log files under {', '.join(str(t) for t in targets)}")
        for f in res.findings:
            click.echo(str(f))
        evidence = Path(out)
        evidence.parent.mkdir(parents=True, exist_ok=True)
        evidence.write_text(json.dumps({"targets": [str(t) for t in targets], "files": res.files, "lines": res.lines,
                                        "findings": [f.to_dict() for f in res.findings], "ok": res.ok},
                                       indent=2, sort_keys=True))
        click.echo(f"pii_log_scan_files={res.files}")
        click.echo(f"pii_log_scan_lines={res.lines}")
        click.echo(f"pii_log_scan_findings={len(res.findings)}")
        click.echo(f"pii_log_scan_ok={'true' if res.ok else 'false'}")
        if not res.ok:
            sys.exit(1)
