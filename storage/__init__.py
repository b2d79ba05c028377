"""Database access: the only package that imports asyncpg or trio-asyncio.

``open_database`` is the runtime (asyncio loop + pool) that ``main()`` enters around the tree;
everything else calls the plain Trio functions of ``tickguard.storage.positions`` with the
``Database`` it yields.
"""

from tickguard.storage.db import Database, DatabaseUnavailable, open_database, open_pool
from tickguard.storage.migrate import migrate
from tickguard.storage.positions import BadCursor, OpenPositionLimit

__all__ = [
    "BadCursor",
    "Database",
    "DatabaseUnavailable",
    "OpenPositionLimit",
    "migrate",
    "open_database",
    "open_pool",
]
