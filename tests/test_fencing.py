"""Fenced closes and watermarks (issue 18) on a real PostgreSQL: an engine that lost its lease
closes nothing and writes no watermark; the new owner's closes work; a close and a concurrent
takeover are ordered by the lease row's FOR SHARE lock; each position closes exactly once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import trio

from tickguard.actors import persistence
from tickguard.actors.faults import FaultPoints
from tickguard.actors.mailbox import Mailbox, ask
from tickguard.actors.messages import (
    AdvanceWatermark,
    CloseOrder,
    CloseOutcome,
    CloseRequest,
    CloseResult,
    NewPosition,
    Position,
    Track,
    Untrack,
    Watermark,
)
from tickguard.storage import Database, leases, writes
from tickguard.storage.writes import Fence

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def ldb(db: Database) -> AsyncIterator[Database]:
    await db.execute("TRUNCATE engine_leases")
    yield db


async def open_positions(db: Database, n: int, symbol: str = "BTC-USD") -> list[Position]:
    new = NewPosition("alice", symbol, "long", Decimal("100"), Decimal("110"), Decimal("90"))
    results, _ = await writes.create_positions(db, [new] * n, max_open_per_user=10_000)
    return [r.position for r in results]  # type: ignore[union-attr]


def stop(position: Position) -> CloseOrder:
    return CloseOrder(position.id, Decimal("90"), "stop_loss", triggered_at=NOW, trade_id=7)


async def closed_events(db: Database) -> int:
    return int(await db.fetchval("SELECT count(*) FROM events WHERE type = 'position.closed'"))


async def take_over(db: Database, owner: str, ttl_ms: int = 60_000) -> dict[int, int]:
    """Acquire partition 0 as soon as its lease expires (hang guard: 10 s)."""
    with trio.fail_after(10):
        while not (got := await leases.acquire(db, [0], owner, ttl_ms)):
            await trio.sleep(0.05)
    return got


async def test_a_lost_lease_closes_nothing_and_the_new_owner_closes(ldb: Database) -> None:
    [p] = await open_positions(ldb, 1)
    assert await leases.acquire(ldb, [0], "A", 600) == {0: 1}
    assert await take_over(ldb, "B") == {0: 2}
    a, b = Fence({0: 1}, 1), Fence({0: 2}, 1)

    [result], events = await writes.close_positions(ldb, [stop(p)], source="engine", fence=a)
    assert result == CloseResult(p.id, CloseOutcome.FENCED) and events == []
    assert await ldb.fetchval("SELECT status FROM positions WHERE id = $1", p.id) == "open"
    assert await closed_events(ldb) == 0

    [result], events = await writes.close_positions(ldb, [stop(p)], source="engine", fence=b)
    assert result.outcome is CloseOutcome.CLOSED and len(events) == 1
    assert await closed_events(ldb) == 1
    # A fence that holds no partition, or a lease released, fences too.
    [q] = await open_positions(ldb, 1)
    [result], _ = await writes.close_positions(ldb, [stop(q)], source="engine", fence=Fence({}, 1))
    assert result.outcome is CloseOutcome.FENCED
    await leases.release(ldb, {0: 2}, "B")
    [result], _ = await writes.close_positions(ldb, [stop(q)], source="engine", fence=b)
    assert result.outcome is CloseOutcome.FENCED
    # An unknown id is NOT_FOUND whatever the fence; without a fence nothing is checked.
    missing = CloseOrder(uuid.uuid4(), Decimal("90"), "stop_loss")
    [result], _ = await writes.close_positions(ldb, [missing], source="engine", fence=b)
    assert result.outcome is CloseOutcome.NOT_FOUND
    [result], _ = await writes.close_positions(ldb, [stop(q)], source="engine")
    assert result.outcome is CloseOutcome.CLOSED


async def test_each_order_gets_its_partition_s_outcome(ldb: Database) -> None:
    """Two partitions, one held: in one batch, the held partition's orders close and the other
    partition's are fenced; each id keeps its own outcome, in order (invariant 2)."""
    from tickguard.actors.partitions import partition_of

    symbols = {partition_of(s, 2): s for s in ("BTC-USD", "ETH-USD", "SOL-USD", "DOGE-USD")}
    assert set(symbols) == {0, 1}
    mine = await open_positions(ldb, 3, symbols[0])
    theirs = await open_positions(ldb, 2, symbols[1])
    assert await leases.acquire(ldb, [0], "A", 60_000) == {0: 1}
    assert await leases.acquire(ldb, [1], "B", 60_000) == {1: 1}
    orders = [stop(p) for p in (mine[0], theirs[0], mine[1], mine[1], theirs[1], mine[2])]
    results, events = await writes.close_positions(
        ldb, orders, source="engine", fence=Fence({0: 1, 1: 7}, 2)
    )
    assert [r.outcome for r in results] == [
        CloseOutcome.CLOSED,
        CloseOutcome.FENCED,
        CloseOutcome.CLOSED,
        CloseOutcome.ALREADY_CLOSED,
        CloseOutcome.FENCED,
        CloseOutcome.CLOSED,
    ]
    assert [r.position_id for r in results] == [o.position_id for o in orders]
    assert len(events) == 3 and await closed_events(ldb) == 3
    assert await ldb.fetchval("SELECT count(*) FROM positions WHERE status = 'open'") == 2


async def test_racing_owners_close_each_position_exactly_once(ldb: Database) -> None:
    positions = await open_positions(ldb, 40)
    assert await leases.acquire(ldb, [0], "A", 600) == {0: 1}
    assert await take_over(ldb, "B") == {0: 2}
    stale, valid = Fence({0: 1}, 1), Fence({0: 2}, 1)
    outcomes: list[CloseOutcome] = []

    async def close(fence: Fence) -> None:
        for chunk in (positions[:20], positions[20:], positions):
            results, _ = await writes.close_positions(
                ldb, [stop(p) for p in chunk], source="engine", fence=fence
            )
            outcomes.extend(r.outcome for r in results)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for fence in (stale, valid, stale, valid):
                nursery.start_soon(close, fence)
    # 4 racers x 80 orders: each position closed once (by a B racer), never by A.
    assert outcomes.count(CloseOutcome.CLOSED) == 40
    assert outcomes.count(CloseOutcome.FENCED) == 160
    assert outcomes.count(CloseOutcome.ALREADY_CLOSED) == 120
    assert await closed_events(ldb) == 40
    assert await ldb.fetchval("SELECT count(*) FROM positions WHERE status = 'open'") == 0


async def test_a_takeover_waits_for_a_close_that_checked_the_old_token(
    ldb: Database, database_url: str
) -> None:
    """The close's FOR SHARE holds the takeover's UPDATE until the close commits: the close
    commits under token 1, and only then does B get token 2 (never a close under a replaced
    token). Two connections; the order is shown by PostgreSQL's lock wait, not by timing."""
    [p] = await open_positions(ldb, 1)
    assert await leases.acquire(ldb, [0], "A", 1_500) == {0: 1}
    log: list[str] = []

    async def scenario(conn_a: asyncpg.Connection) -> Any:
        conn_b = await asyncpg.connect(database_url)
        try:
            async with conn_a.transaction():
                results, _ = await writes._fenced_close(
                    conn_a, [stop(p)], "engine", [], Fence({0: 1}, 1)
                )
                log.append(f"A checked the lease and closed: {results[0].outcome.value}")
                # Let A's lease expire (the database's clock), then let B try to take over.
                while not await conn_b.fetchval(
                    "SELECT clock_timestamp() > expires_at FROM engine_leases"
                ):
                    await asyncio.sleep(0.05)
                pid_b = conn_b.get_server_pid()
                takeover = asyncio.ensure_future(_take(conn_b))
                while not await conn_a.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE pid = $1 AND wait_event_type = 'Lock'",
                    pid_b,
                ):
                    assert not takeover.done(), takeover.result()
                    await asyncio.sleep(0.02)
                log.append("B waits on the lease row")
                assert not takeover.done()
            log.append("A committed")
            got = await takeover
            log.append(f"B took over with {got}")
        finally:
            await conn_b.close()

    with trio.fail_after(30):
        await ldb.run(scenario, timeout=30)
    assert log == [
        "A checked the lease and closed: closed",
        "B waits on the lease row",
        "A committed",
        "B took over with {0: 2}",
    ]
    assert await ldb.fetchval("SELECT status FROM positions WHERE id = $1", p.id) == "closed"
    assert await closed_events(ldb) == 1


async def _take(conn: asyncpg.Connection) -> dict[int, int]:
    async with conn.transaction():
        return await leases._acquire(conn, [0], "B", 60_000)


async def test_fenced_watermarks_are_skipped(ldb: Database) -> None:
    mark = Watermark("BTC-USD", 42, NOW)
    assert await leases.acquire(ldb, [0], "A", 60_000) == {0: 1}
    stale, valid = Fence({0: 0}, 1), Fence({0: 1}, 1)
    assert await writes.advance_watermarks(ldb, [mark], fence=stale) == 1
    assert await ldb.fetchval("SELECT count(*) FROM watermarks") == 0
    # With a close batch: the fenced close and its mark both change nothing.
    [p] = await open_positions(ldb, 1)
    results, _ = await writes.close_positions(
        ldb, [stop(p)], source="engine", watermarks=[mark], fence=stale
    )
    assert results[0].outcome is CloseOutcome.FENCED
    assert await ldb.fetchval("SELECT count(*) FROM watermarks") == 0
    assert await writes.advance_watermarks(ldb, [mark], fence=valid) == 0
    assert await ldb.fetchval("SELECT last_trade_id FROM watermarks") == 42


class Engines:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Track | Untrack]] = []

    def send(self, symbol: str, message: Track | Untrack) -> None:
        self.sent.append((symbol, message))


async def test_persistence_fences_engine_closes_not_manual_ones(ldb: Database) -> None:
    a, b, c = await open_positions(ldb, 3)
    assert await leases.acquire(ldb, [0], "A", 600) == {0: 1}
    assert await take_over(ldb, "B") == {0: 2}
    inbox: Mailbox[Any] = Mailbox("persistence")
    fanout: Mailbox[Any] = Mailbox("fanout")
    engines = Engines()
    stats = persistence.PersistenceStats()
    config = persistence.PersistenceConfig(fence=Fence({0: 1}, 1))  # A's, replaced by B's
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda **kw: persistence.run(
                inbox, ldb, fanout, engines, config=config, stats=stats, **kw
            )
        )
        engine_results = await ask(
            inbox,
            lambda r: CloseRequest(
                (stop(a), stop(b)),
                source="engine",
                reply=r,
                watermark=Watermark("BTC-USD", 9, NOW),
            ),
            timeout=10,
        )
        manual = CloseOrder(c.id, Decimal("95"), "manual", user_id="alice")
        [manual_result] = await ask(
            inbox, lambda r: CloseRequest((manual,), source="api", reply=r), timeout=10
        )
        inbox.send_nowait(AdvanceWatermark(Watermark("BTC-USD", 10, NOW)))
        with trio.fail_after(10):
            while stats.watermark_writes == 0:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [r.outcome for r in engine_results] == [CloseOutcome.FENCED, CloseOutcome.FENCED]
    assert manual_result.outcome is CloseOutcome.CLOSED
    assert (stats.closes_fenced, stats.watermarks_fenced) == (2, 1)
    assert stats.closes_by_reason == {"manual": 1}
    # Nothing is untracked for a fenced close (the outbox recovery at start re-tracked all 3).
    assert [m for _, m in engines.sent if isinstance(m, Untrack)] == [Untrack(c.id)]
    assert await ldb.fetchval("SELECT count(*) FROM watermarks") == 0
    assert await closed_events(ldb) == 1
    assert await ldb.fetchval("SELECT count(*) FROM positions WHERE status = 'open'") == 2


async def test_a_watermark_never_passes_a_fenced_piece(ldb: Database) -> None:
    """Closes commit in pieces; the fence's tokens are a live view that can change between two
    pieces (the lease taken again). A piece fenced, a later one closed: the request's watermark
    is not written, as after a FAILED piece (invariant 12)."""
    p1, p2 = await open_positions(ldb, 2)
    assert await leases.acquire(ldb, [0], "A", 600) == {0: 1}
    assert await take_over(ldb, "B") == {0: 2}
    tokens = {0: 1}  # A's stale token: the first piece is fenced...
    faults = FaultPoints()

    async def lease_taken_again() -> None:
        tokens[0] = 2  # ...then the view shows the current token before the second piece

    faults.arm("persistence.after_commit", lease_taken_again)
    inbox: Mailbox[Any] = Mailbox("persistence")
    stats = persistence.PersistenceStats()
    config = persistence.PersistenceConfig(close_chunk=1, fence=Fence(tokens, 1))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda **kw: persistence.run(
                inbox,
                ldb,
                Mailbox("fanout"),
                Engines(),
                config=config,
                stats=stats,
                faults=faults,
                **kw,
            )
        )
        results = await ask(
            inbox,
            lambda r: CloseRequest(
                (stop(p1), stop(p2)),
                source="engine",
                reply=r,
                watermark=Watermark("BTC-USD", 9, NOW),
            ),
            timeout=10,
        )
        nursery.cancel_scope.cancel()
    assert [r.outcome for r in results] == [CloseOutcome.FENCED, CloseOutcome.CLOSED]
    assert faults.fired == {"persistence.after_commit": 1}
    assert stats.closes_fenced == 1
    assert await ldb.fetchval("SELECT count(*) FROM watermarks") == 0
