"""The storage runtime one ``trio.run`` enters around the tree: the asyncio loop
(trio-asyncio), the pool, and the schema migrated, after waiting for a database that is not
up yet.

The wait says once where it waits and for how long, reports progress at most every
``progress_s``, and ends in ``DatabaseNotReached``, one line that names the database (the
``DATABASE_URL`` variable, without its password) and the time waited.

Once migrated, the pool is warmed (issue 16): ``WARM_CONNECTIONS`` connections are opened at
once and the close path's statements run on each (``writes.warm_up``, rolled back), so the
first close after start-up costs what any other does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import trio

from tickguard.storage import writes
from tickguard.storage.db import Database, DatabaseUnavailable, open_database
from tickguard.storage.migrate import migrate

log = logging.getLogger("tickguard.storage")

PATIENCE_S = 30.0  # how long start-up waits for a database that is not up yet
RETRY_S = 1.0  # between attempts to reach it
PROGRESS_S = 10.0  # at most one "still waiting" line per this many seconds
WARM_CONNECTIONS = 4  # pool connections opened and warmed at start (the pool holds up to 10)


class DatabaseNotReached(DatabaseUnavailable):
    """Start-up gave up waiting for the database; the message names it and the time waited."""

    def __init__(self, where: str, waited_s: float, last_error: BaseException | None) -> None:
        super().__init__(
            f"gave up after waiting {waited_s:.0f} s for the database at {where}"
            f" (last error: {last_error})"
        )
        self.where = where
        self.waited_s = waited_s


@asynccontextmanager
async def open_storage(
    dsn: str,
    *,
    where: str,
    patience_s: float = PATIENCE_S,
    retry_s: float = RETRY_S,
    progress_s: float = PROGRESS_S,
) -> AsyncIterator[Database]:
    """Wait for the database at ``dsn`` (up to ``patience_s``), migrate it, and yield the pool
    on the loop for the block. ``where`` is how log lines and errors name it (e.g.
    ``DATABASE_URL=postgresql://app@db:5432/app``, never with a password).

    Raises ``DatabaseNotReached`` when it did not answer in time; other migration errors as
    they are. Cancellable at any point of the wait (Ctrl-C during start-up).
    """
    await _migrate_when_up(dsn, where, patience_s, retry_s, progress_s)
    async with open_database(dsn) as db:
        await warm_up(db)
        yield db


async def warm_up(db: Database, connections: int = WARM_CONNECTIONS) -> None:
    """Open ``connections`` of the pool's connections together and run the close path's
    statements on each (``writes.warm_up``), so that whichever connection the first close gets
    has them prepared. A failure is logged and start-up goes on: warming only saves time."""
    started = time.perf_counter()
    barrier = asyncio.Barrier(connections)

    async def one(conn: asyncpg.Connection) -> None:
        await writes.warm_up(conn)
        # Hold this connection until every task has one: each warms a different connection.
        await barrier.wait()

    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(db.run, one)
    except* Exception as group:
        failure = _innermost(group)
    if failure is not None:
        log.warning("could not warm the database connections: %s", failure)
        return
    log.info(
        "warmed %d database connections in %.0f ms",
        connections,
        (time.perf_counter() - started) * 1000,
    )


async def _migrate_when_up(
    dsn: str, where: str, patience_s: float, retry_s: float, progress_s: float
) -> None:
    started = trio.current_time()
    attempts = 0
    last_error: BaseException | None = None
    last_report = started
    with trio.move_on_after(patience_s):
        while True:
            try:
                async with open_database(dsn) as db:
                    await migrate(db)
                if attempts:
                    log.info(
                        "the database at %s answered after %.1f s",
                        where,
                        trio.current_time() - started,
                    )
                return
            except* DatabaseUnavailable as group:
                last_error = _innermost(group)
            attempts += 1
            now = trio.current_time()
            if attempts == 1:
                log.warning(
                    "waiting for the database at %s for up to %.0f s (%s)",
                    where,
                    patience_s,
                    last_error,
                )
            elif now - last_report >= progress_s:
                last_report = now
                log.warning(
                    "still waiting for the database at %s: %d attempts in %.0f s (%s)",
                    where,
                    attempts,
                    now - started,
                    last_error,
                )
            await trio.sleep(retry_s)
    raise DatabaseNotReached(where, trio.current_time() - started, last_error)


def _innermost(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
