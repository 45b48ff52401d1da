"""``spotex keys ...`` (trader API keys) and ``spotex audit verify`` (the admin audit chain)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

__all__ = ["register"]


def _env(data_dir: str | None, config: str | None) -> Any:
    from spotex.cli import _load

    return _load(data_dir, config)


def _dsn(env: Any) -> str:
    from spotex.supervisor import resolve_endpoints

    return str(resolve_endpoints(env.cfg, env.data).pg_dsn)


def register(main: click.Group) -> None:
    from spotex.cli import fail, stack_options

    @main.group("keys")
    def keys() -> None:
        """Trader API keys (HMAC or Ed25519), stored in PostgreSQL, secrets encrypted at rest."""

    async def _with_store(env: Any, fn: Any) -> Any:
        import asyncpg

        from edge.app import master_key_path
        from edge.auth import KeyStore, SecretBox

        box = SecretBox.from_file(master_key_path(env.cfg, env.data.root), create=not env.cfg.production)
        pool = await asyncpg.create_pool(_dsn(env), min_size=1, max_size=2)
        try:
            return await fn(KeyStore(pool, box))
        finally:
            await pool.close()

    @keys.command("create")
    @click.option("--account", "account", type=int, required=True, help="Account id the key trades for.")
    @click.option("--scopes", default="read", show_default=True, help="Comma-separated: read,trade.")
    @click.option("--ed25519-pubkey", "pubkey", default=None, help="Hex Ed25519 public key (else an HMAC key).")
    @click.option("--label", default="", help="Free text shown in `keys list`.")
    @click.option("--json", "as_json", is_flag=True)
    @stack_options
    def create(account: int, scopes: str, pubkey: str | None, label: str, as_json: bool, data_dir: str | None,
               config: str | None) -> None:
        """Create a key. An HMAC secret is printed once and never again."""
        env = _env(data_dir, config)
        sc = [s.strip() for s in scopes.split(",") if s.strip()]
        try:
            ck = asyncio.run(_with_store(
                env, lambda ks: ks.create(account, sc, label=label, ed25519_public_key=pubkey)))
        except ValueError as exc:
            fail(str(exc))
        out = {"api_key": ck.api_key, "secret": ck.secret, "account_id": account, "kind": ck.info.kind,
               "scopes": sorted(ck.info.scopes)}
        if as_json:
            click.echo(json.dumps(out, sort_keys=True))
        else:
            for k, v in out.items():
                if v is not None:
                    click.echo(f"{k}={','.join(v) if isinstance(v, list) else v}")

    @keys.command("list")
    @click.option("--account", "account", type=int, default=None)
    @click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
    @click.option("--json", "as_json", is_flag=True)
    @stack_options
    def list_(account: int | None, include_revoked: bool, as_json: bool, data_dir: str | None,
              config: str | None) -> None:
        """List keys (never secrets)."""
        env = _env(data_dir, config)
        rows = asyncio.run(_with_store(env, lambda ks: ks.list(account, include_revoked=include_revoked)))
        data = [{"api_key": r.api_key, "account_id": r.account_id, "kind": r.kind, "scopes": sorted(r.scopes),
                 "label": r.label, "created_at_ms": r.created_at_ms, "revoked_at_ms": r.revoked_at_ms}
                for r in rows]
        if as_json:
            click.echo(json.dumps(data, sort_keys=True))
        else:
            for d in data:
                state = "revoked" if d["revoked_at_ms"] else "active"
                click.echo(f"{d['api_key']}  account={d['account_id']}  {d['kind']}  "
                           f"{','.join(d['scopes'])}  {state}  {d['label']}")

    @keys.command("revoke")
    @click.argument("api_key")
    @stack_options
    def revoke(api_key: str, data_dir: str | None, config: str | None) -> None:
        """Revoke a key (every edge drops it at once via NOTIFY)."""
        env = _env(data_dir, config)
        done = asyncio.run(_with_store(env, lambda ks: ks.revoke(api_key)))
        if not done:
            fail("no active key with that id")
        click.echo("revoked")

    @main.group("audit")
    def audit_group() -> None:
        """The tamper-evident admin audit chain."""

    @audit_group.command("verify")
    @click.option("--require-events", is_flag=True, help="An empty chain is a failure.")
    @click.option("--file", "path", type=click.Path(dir_okay=False), default=None,
                  help="Verify a JSONL export instead of the database.")
    @click.option("--chain", default="admin", show_default=True)
    @click.option("--json", "as_json", is_flag=True)
    @stack_options
    def verify(require_events: bool, path: str | None, chain: str, as_json: bool, data_dir: str | None,
               config: str | None) -> None:
        """Recompute the chain: print the head hash, or the first broken entry and why. Exit 1 if broken."""
        from ledger import audit

        if path is not None:
            res = audit.verify_jsonl(path, require_events=require_events)
        else:
            env = _env(data_dir, config)

            async def go() -> Any:
                import asyncpg

                conn = await asyncpg.connect(_dsn(env), timeout=10)
                try:
                    return await audit.verify_db(conn, chain, require_events=require_events)
                finally:
                    await conn.close()

            try:
                res = asyncio.run(go())
            except OSError as exc:
                fail(f"audit verify: {exc}")
        d = res.to_dict()
        if as_json:
            click.echo(json.dumps(d, sort_keys=True))
        elif res.ok:
            click.echo(f"audit chain OK: {res.count} entries, head {res.head_hash}")
        else:
            click.echo(f"audit chain BROKEN at seq {res.first_bad_seq} ({res.kind}): {res.why}; "
                       f"{res.count} entries verified before it, last good hash {res.head_hash}")
        sys.exit(0 if res.ok else 1)
