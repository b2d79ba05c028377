"""What an engine loads when it starts: the open positions of its symbol, a page at a time,
and which symbols have open positions at all. Nothing here writes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from tickguard.domain import (
    Position,
)
from tickguard.storage.db import Database
from tickguard.storage.rows import COLUMNS, to_position

OPEN_PAGE = 20_000


async def open_positions(
    db: Database, symbol: str, page: int = OPEN_PAGE
) -> AsyncIterator[list[Position]]:
    """Every open position on ``symbol`` (an engine's state on start), a page at a time.

    Pages follow ``id`` order (keyset pagination on an index), so the caller can index one page
    and drop its rows before the next: memory at start-up stays near the index's own size.
    Not one snapshot: a position created or closed meanwhile reaches the engine as Track or
    Untrack, which it handles after loading.
    """
    after = uuid.UUID(int=0)
    while True:
        rows = await db.fetch(
            f"""SELECT {COLUMNS} FROM positions
                WHERE symbol = $1 AND status = 'open' AND id > $2 ORDER BY id LIMIT $3""",
            symbol,
            after,
            page,
            timeout=max(db.timeout, 30.0),
        )
        if not rows:
            return
        positions = [to_position(r) for r in rows]
        del rows
        after = positions[-1].id
        full = len(positions) == page
        yield positions
        del positions  # before the next page is fetched: one page's rows at a time
        if not full:
            return


async def open_symbols(db: Database) -> list[str]:
    """The symbols that have at least one open position."""
    rows = await db.fetch("SELECT DISTINCT symbol FROM positions WHERE status = 'open'")
    return sorted(r["symbol"] for r in rows)
