"""Shared fixtures: a real PostgreSQL for the whole test session, a fresh schema state per test.

``TEST_DATABASE_URL`` (a server we may create databases on) is used when set: the session gets
its own new database there, dropped at the end. Otherwise the embedded PostgreSQL starts in a
temporary directory. Tests that stop or kill PostgreSQL always start their own server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import trio

from tickguard.storage import Database, migrate, open_database


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _scratch_dir(label: str) -> Path:
    # Directly under the system's temporary directory, not pytest's: as root, the embedded
    # PostgreSQL runs as its own user and must reach its data directory, while every pytest
    # session (including one a test starts) resets pytest's base directory to mode 0700.
    return Path(tempfile.mkdtemp(prefix=f"tickguard-{label[:40]}-"))


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory per test that the embedded server's own user can reach."""
    path = _scratch_dir(request.node.name)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """The URL of a migrated database that belongs to this test session."""
    server = os.environ.get("TEST_DATABASE_URL")
    if server:
        name = f"tickguard_test_{uuid.uuid4().hex[:12]}"
        asyncio.run(_admin(server, f'CREATE DATABASE "{name}"'))
        url = _with_database(server, name)
        try:
            trio.run(_migrate, url)
            yield url
        finally:
            asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    else:
        from tickguard.storage.embedded import embedded_postgres

        scratch = _scratch_dir("session-db")
        try:
            with embedded_postgres(scratch / "pgdata") as url:
                trio.run(_migrate, url)
                yield url
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


async def _migrate(url: str) -> None:
    async with open_database(url) as db:
        await migrate(db)


@pytest.fixture
async def own_database(database_url: str) -> AsyncIterator[str]:
    """A new, empty database on the session's server, for one subprocess test (the processes
    migrate it themselves)."""
    name = f"tickguard_fault_{uuid.uuid4().hex[:10]}"
    async with open_database(database_url) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(database_url, name)
    finally:
        async with open_database(database_url) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A pool on the session's database, with every table emptied first."""
    async with open_database(database_url, timeout=10.0) as database:
        await database.execute("TRUNCATE positions, events, user_seq, watermarks, engine_leases")
        yield database


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# Redis (storage/bus.py): TEST_REDIS_URL or a redis-server of the test's own.
from redis_server import own_redis, redis_url  # noqa: E402,F401
