"""``GET /api/positions`` pages read in batches (issue 16).

Under load many clients ask for their open positions at the same moment (the app polls it).
``PageReader`` reads the pages asked for at once in one query
(``storage.reads.list_positions_json_many``: PostgreSQL writes each page's JSON), so they
share one crossing into asyncio, one pool connection and one round trip; see
``web.batched`` for how callers are grouped, and why a caller whose input upsets the shared
query fails alone.
"""

from __future__ import annotations

from quart import Quart

from tickguard.storage import ReadOnlyDatabase
from tickguard.storage.reads import PageAsk, list_positions_json_many
from tickguard.web.batched import BatchedReads

PAGE_READER = "tickguard.page_reader"
# Pages per query: 64 pages of 100 positions are ~2 MB of JSON, read in one round trip.
MAX_BATCH = 64
# Page reads running at once: two, so that PostgreSQL can work on two cores (web.batched).
MAX_IN_FLIGHT = 2


class PageReader(BatchedReads[PageAsk, tuple[str, str | None]]):
    """Position pages (JSON text and next cursor) read for many waiting requests at once."""

    def __init__(
        self,
        db: ReadOnlyDatabase,
        *,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        async def read(asks: list[PageAsk]) -> list[tuple[str, str | None]]:
            return await list_positions_json_many(db, asks)

        super().__init__(read, max_batch=max_batch, max_in_flight=max_in_flight)


def page_reader(app: Quart) -> PageReader:
    reader: PageReader = app.extensions[PAGE_READER]
    return reader
