"""Database access: the only package that imports asyncpg or trio-asyncio.

``open_database`` is the runtime (asyncio loop + pool) that ``main()`` enters around the tree;
everything else calls plain Trio functions with the ``Database`` it yields, from the module
of its role: ``writes`` (the persistence actor: positions and their outbox events),
``reads`` (the web: lists, one position, the latest seq), ``eventlog`` (the event log read
back: replays and a position's lifecycle; retention), ``loading`` (engines at start),
``tail`` (another process following the log: every committed event once) and ``bus`` (Redis:
wake-ups between processes and last prices, the only other asyncio client).
"""

from tickguard.storage.db import (
    Database,
    DatabaseUnavailable,
    ReadOnlyDatabase,
    open_database,
    open_pool,
)
from tickguard.storage.errors import BadCursor, IdempotencyKeyReused, OpenPositionLimit
from tickguard.storage.migrate import migrate

__all__ = [
    "BadCursor",
    "IdempotencyKeyReused",
    "Database",
    "DatabaseUnavailable",
    "OpenPositionLimit",
    "ReadOnlyDatabase",
    "migrate",
    "open_database",
    "open_pool",
]
