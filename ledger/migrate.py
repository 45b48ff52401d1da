"""Versioned SQL migrations (``ledger/migrations/NNNN_name.sql``), applied in order, once each.

Safe to re-run and to run concurrently: a transaction-level advisory lock serialises runners and
``schema_migrations`` records what is applied, with each file's sha256 so an edited migration
that was already applied is an error instead of a silent drift.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import asyncpg

__all__ = ["MigrationError", "migrate", "migration_files"]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_LOCK_KEY = 0x5B07E1  # advisory lock id for migrations


class MigrationError(Exception):
    pass


def migration_files() -> list[tuple[int, str, Path]]:
    out = []
    for p in sorted(MIGRATIONS_DIR.glob("*.sql")):
        num, _, name = p.stem.partition("_")
        if not num.isdigit():
            raise MigrationError(f"migration file name must start with a number: {p.name}")
        out.append((int(num), name, p))
    versions = [v for v, _, _ in out]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return out


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations; returns the names of the ones applied now."""
    applied_now: list[str] = []
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       sha256 text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            rows = await conn.fetch("SELECT version, sha256 FROM schema_migrations")
            done = {r["version"]: r["sha256"] for r in rows}
            for version, name, path in migration_files():
                sql = path.read_text()
                digest = hashlib.sha256(sql.encode()).hexdigest()
                if version in done:
                    if done[version] != digest:
                        raise MigrationError(f"migration {path.name} changed after it was applied")
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, sha256) VALUES ($1, $2, $3)", version, name, digest
                )
                applied_now.append(path.name)
    finally:
        await conn.close()
    return applied_now
