"""The durable watermark (issue 14) on the real database: it commits with the close batch that
carries it, never with a batch that did not commit, and never moves backward."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from tickguard.domain import CloseOrder, CloseOutcome, NewPosition, Watermark
from tickguard.storage import Database, DatabaseUnavailable, watermarks, writes

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def mark(trade_id: int, symbol: str = "BTC-USD") -> Watermark:
    return Watermark(symbol, trade_id, T0 + timedelta(seconds=trade_id))


async def open_one(db: Database) -> NewPosition:
    new = NewPosition("alice", "BTC-USD", "long", Decimal("100"), None, Decimal("90"))
    results, _ = await writes.create_positions(db, [new], max_open_per_user=10)
    return results[0].position  # type: ignore[union-attr]


async def test_a_watermark_commits_with_the_closes_and_never_moves_back(db: Database) -> None:
    assert await watermarks.read(db, "BTC-USD") is None  # none before the first
    position = await open_one(db)
    order = CloseOrder(position.id, Decimal("90"), "stop_loss", triggered_at=T0, recovered=True)
    results, events = await writes.close_positions(
        db, [order], source="engine", watermarks=[mark(7), mark(5), mark(3, "ETH-USD")]
    )
    assert results[0].outcome is CloseOutcome.CLOSED
    assert '"recovered":true' in events[0].message
    assert await watermarks.read(db, "BTC-USD") == mark(7)  # the highest of the batch
    assert await watermarks.read(db, "ETH-USD") == mark(3, "ETH-USD")
    await writes.advance_watermarks(db, [mark(6)])
    assert await watermarks.read(db, "BTC-USD") == mark(7)  # an older trade never lowers it
    await writes.advance_watermarks(db, [mark(9)])
    assert await watermarks.read(db, "BTC-USD") == mark(9)


async def test_a_batch_that_does_not_commit_leaves_the_watermark(db: Database) -> None:
    await writes.advance_watermarks(db, [mark(4)])
    position = await open_one(db)
    order = CloseOrder(position.id, Decimal("90"), "stop_loss", triggered_at=T0)
    with pytest.raises(DatabaseUnavailable):
        # A deadline the transaction cannot meet: it rolls back as a whole.
        await db.run(_slow_close, [order], [mark(8)], timeout=0.2)
    assert await watermarks.read(db, "BTC-USD") == mark(4)
    current = await writes.positions_by_id(db, [position.id])
    assert current[0].status == "open"


async def _slow_close(conn, orders, marks):  # type: ignore[no-untyped-def]
    async with conn.transaction():
        await writes._close(conn, orders, "engine", marks)
        await conn.execute("SELECT pg_sleep(2)")
