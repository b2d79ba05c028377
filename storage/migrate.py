"""Numbered SQL migrations, applied in order, each in its own transaction.

Applied versions are recorded in ``schema_migrations``. A transaction-scoped advisory lock
serializes concurrent runs: a second process waits for the first, then finds nothing to do.
A database that already holds the old backend's ``positions`` table is adopted: the first
migration only adds what is missing.
"""

from __future__ import annotations

import logging
import re
from importlib import resources

import asyncpg
import attrs

from tickguard.storage.db import Database

log = logging.getLogger("tickguard.storage")

# Any constant; the same in every tickguard process.
MIGRATION_LOCK_KEY = 7_104_201_311


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


def bundled_migrations() -> list[Migration]:
    """The SQL files shipped in ``tickguard/storage/migrations``, in version order."""
    found = []
    for entry in resources.files("tickguard.storage").joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


async def migrate(db: Database, migrations: list[Migration] | None = None) -> list[int]:
    """Apply every migration not yet recorded; returns the versions applied by this call."""
    todo = bundled_migrations() if migrations is None else migrations
    return await db.run(_apply_all, todo, timeout=max(db.timeout, 120.0))


async def _apply_all(conn: asyncpg.Connection, migrations: list[Migration]) -> list[int]:
    applied: list[int] = []
    for migration in migrations:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version INTEGER PRIMARY KEY,
                       name TEXT NOT NULL,
                       applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
            )
            done = await conn.fetchval(
                "SELECT 1 FROM schema_migrations WHERE version = $1", migration.version
            )
            if done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            log.info("applied migration %03d_%s", migration.version, migration.name)
            applied.append(migration.version)
    return applied
