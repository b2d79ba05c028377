"""The bridge between Trio and asyncpg: plain Trio ``async`` calls, each with a timeout.

asyncpg runs on the asyncio loop that trio-asyncio provides (``open_database`` enters it).
Everyone else calls ``Database`` methods from Trio and never sees asyncio. Every call has a
deadline; a connection whose query was cancelled or timed out is discarded rather than
returned to the pool in an unknown state. Losing the server, a timeout, or a refused connection
all surface as ``DatabaseUnavailable``, which the HTTP layer answers with 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import trio
import trio_asyncio

log = logging.getLogger("tickguard.storage")

T = TypeVar("T")
ConnFn = Callable[..., Awaitable[T]]

# Errors that mean "the database cannot be reached or did not answer", as opposed to a bug or
# a constraint violation (those propagate as they are).
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached, or did not answer within the call's timeout."""


class Database:
    """A pool of asyncpg connections, used from Trio.

    ``timeout`` (seconds) bounds every call, from waiting for a connection to the last row.
    """

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 5.0) -> None:
        self._pool = pool
        self.timeout = timeout

    async def run(self, fn: ConnFn[T], *args: Any, timeout: float | None = None) -> T:
        """Run the asyncio coroutine ``fn(conn, *args)`` on a pooled connection.

        Raises ``DatabaseUnavailable`` when the server is unreachable or the deadline passes.
        """
        deadline = self.timeout if timeout is None else timeout
        try:
            with trio.fail_after(deadline):
                result: T = await trio_asyncio.aio_as_trio(self._on_connection)(fn, *args)
                return result
        except trio.TooSlowError as exc:
            raise DatabaseUnavailable(f"no answer within {deadline:g} s") from exc
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def transaction(self, fn: ConnFn[T], *args: Any, timeout: float | None = None) -> T:
        """Like ``run``, inside one transaction: all of ``fn``'s statements commit or none do."""
        return await self.run(_in_transaction, fn, *args, timeout=timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]:
        return await self.run(_fetch, query, *args, timeout=timeout)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self.run(_fetchrow, query, *args, timeout=timeout)

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self.run(_fetchval, query, *args, timeout=timeout)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        return await self.run(_execute, query, *args, timeout=timeout)

    async def ping(self, timeout: float = 2.0) -> None:
        """Raise ``DatabaseUnavailable`` unless the server answers ``SELECT 1`` in time."""
        await self.fetchval("SELECT 1", timeout=timeout)

    def read_only(self) -> ReadOnlyDatabase:
        """This pool's reading half (for the web)."""
        return ReadOnlyDatabase(self)

    async def _on_connection(self, fn: ConnFn[T], *args: Any) -> T:
        # Runs on the asyncio loop.
        conn = await self._pool.acquire()
        try:
            return await fn(conn, *args)
        except (TimeoutError, asyncio.CancelledError):
            # Cancelled mid-query: its state is unknown, so it never goes back to the pool.
            conn.terminate()
            raise
        finally:
            await self._release(conn)

    async def _release(self, conn: Any) -> None:
        """Give ``conn`` back. Its reset can fail when the server died under it (seen:
        asyncpg's ``InternalClientError`` "cannot switch to state 15; another operation is in
        progress"); asyncpg then terminates the connection, and the failure must not replace
        what ``fn`` did: its own error (the server going away) or its committed result."""
        try:
            await self._pool.release(conn)
        except Exception as exc:
            conn.terminate()
            log.debug("a connection could not be reset and was dropped: %r", exc)


class ReadOnlyDatabase:
    """The reading half of a ``Database``: what the web holds, so that no request handler can
    write (every write goes through the persistence actor, DESIGN.md "Shape"). Same calls,
    timeouts and errors as ``Database``; nothing that executes a statement or a transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.timeout = db.timeout

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]:
        return await self._db.fetch(query, *args, timeout=timeout)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._db.fetchrow(query, *args, timeout=timeout)

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._db.fetchval(query, *args, timeout=timeout)

    async def ping(self, timeout: float = 2.0) -> None:
        await self._db.ping(timeout)


# What a read needs: a ``Database`` or its read-only half.
Reader = Database | ReadOnlyDatabase


async def _in_transaction(conn: asyncpg.Connection, fn: ConnFn[T], *args: Any) -> T:
    async with conn.transaction():
        return await fn(conn, *args)


async def _fetch(conn: asyncpg.Connection, query: str, *args: Any) -> list[Any]:
    return list(await conn.fetch(query, *args))


async def _fetchrow(conn: asyncpg.Connection, query: str, *args: Any) -> Any:
    return await conn.fetchrow(query, *args)


async def _fetchval(conn: asyncpg.Connection, query: str, *args: Any) -> Any:
    return await conn.fetchval(query, *args)


async def _execute(conn: asyncpg.Connection, query: str, *args: Any) -> str:
    return str(await conn.execute(query, *args))


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release, after asyncpg's own (which rolls back a transaction left
    open): nothing more. asyncpg's default sends ``RESET ALL; CLOSE ALL; UNLISTEN *; SELECT
    pg_advisory_unlock_all()`` on every release, a round trip per database call (issue 16),
    for session state that tickguard never creates: no ``SET`` outside a transaction, no
    ``LISTEN``, no cursor outside a transaction, only transaction-scoped advisory locks
    (``tests/test_storage.py`` checks that a failed transaction leaves its connection clean)."""


@asynccontextmanager
async def open_pool(
    dsn: str, *, timeout: float = 5.0, min_size: int = 1, max_size: int = 10
) -> AsyncIterator[Database]:
    """An asyncpg pool as a ``Database``; must run inside ``trio_asyncio.open_loop()``.

    Raises ``DatabaseUnavailable`` when the server cannot be reached within ``timeout``.
    """
    try:
        with trio.fail_after(timeout + 1):
            pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout,
                # No asyncpg timers per call (issue 16, session 5). Each is an asyncio
                # ``call_later`` that trio-asyncio keeps, cancelled, until it would have fired,
                # holding the caller's context (a request and all it built) alive that long:
                # with a statement timer of 30 s and a release timer of 300 s, tens of
                # thousands of finished requests, walked by every full collection.
                # ``Database.run`` bounds every call with a Trio deadline instead (and drops a
                # connection cancelled mid-query); the statement timer would also have cut the
                # longer calls (retention's 60 s) at its own 30 s. Idle connections stay
                # open (the pool is small), and prepared statements are evicted by count only.
                command_timeout=None,
                max_inactive_connection_lifetime=0,
                max_cached_statement_lifetime=0,
                reset=_keep_session,
            )
    except trio.TooSlowError as exc:
        raise DatabaseUnavailable(f"no connection within {timeout:g} s") from exc
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
    try:
        yield Database(pool, timeout=timeout)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5) as scope:
            await trio_asyncio.aio_as_trio(pool.close)()
        if scope.cancelled_caught:
            pool.terminate()


def _ignore_lost_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Keep a connection error nobody waits for from crashing the loop.

    trio-asyncio raises every unhandled asyncio error into its nursery, which would end the
    whole tree. A connection that we terminated (cancelled mid-query) or that the server
    dropped leaves such an error on a future asyncpg no longer awaits: it is expected, and the
    caller has already been told (``DatabaseUnavailable`` or cancellation).
    """
    if isinstance(context.get("exception"), ConnectionError | asyncpg.InterfaceError):
        log.debug("ignored a lost connection's error: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


@asynccontextmanager
async def open_database(
    dsn: str, *, timeout: float = 5.0, min_size: int = 1, max_size: int = 10
) -> AsyncIterator[Database]:
    """The storage runtime: the asyncio loop (trio-asyncio) and the pool, for one ``trio.run``.

    ``main()`` enters this around the whole actor tree.
    """
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_ignore_lost_connections)
        async with open_pool(dsn, timeout=timeout, min_size=min_size, max_size=max_size) as db:
            yield db
