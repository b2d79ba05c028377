"""The log tail (storage/tail.py): every committed event exactly once, in an order that never
skips one committed late, against the real PostgreSQL.

The horizon (xmin) is the whole server's: another session's open transaction on a shared
server may hold it back for a while, so a test waits for what it expects under a hang guard
and then checks counts; it never asserts that something arrived within a time.
"""

from __future__ import annotations

import uuid
from collections import Counter
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import trio
import trio_asyncio

from tickguard.domain import NewPosition
from tickguard.storage import Database, writes
from tickguard.storage.tail import LogTail, TailEvent, TailNotStarted

GUARD_S = 60.0


def _new(user: str = "alice", symbol: str = "BTC-USD") -> NewPosition:
    return NewPosition(
        user_id=user,
        symbol=symbol,
        side="long",
        entry_price=Decimal("100"),
        take_profit=Decimal("110"),
        stop_loss=Decimal("90"),
    )


async def _create(db: Database, user: str = "alice", n: int = 1) -> list[int]:
    """Create ``n`` positions as persistence does; the ids of their events."""
    _, events = await writes.create_positions(
        db, [_new(user) for _ in range(n)], max_open_per_user=10_000
    )
    return [e.id for e in events]


async def drain(tail: LogTail, db: Database, limit: int = 5000) -> list[TailEvent]:
    """Read until caught up."""
    got: list[TailEvent] = []
    while batch := await tail.read(db, limit=limit):
        assert len(batch) <= limit
        got.extend(batch)
    return got


async def read_until(
    tail: LogTail, db: Database, want: set[int], got: list[TailEvent], limit: int = 5000
) -> None:
    """Drain into ``got`` until every id of ``want`` is in it (the horizon may be held back by
    someone else's transaction on a shared server)."""
    with trio.fail_after(GUARD_S):
        while not want <= {e.id for e in got}:
            got.extend(await drain(tail, db, limit))
            await trio.sleep(0.02)


async def test_read_before_start_is_refused(db: Database) -> None:
    with pytest.raises(TailNotStarted):
        await LogTail().read(db)


async def test_events_committed_before_start_are_not_returned(db: Database) -> None:
    before = await _create(db, n=3)
    tail = LogTail()
    await tail.start(db)
    after = await _create(db, n=2)
    got: list[TailEvent] = []
    await read_until(tail, db, set(after), got)
    got.extend(await drain(tail, db))
    assert sorted(e.id for e in got) == sorted(after)
    assert not {e.id for e in got} & set(before)


async def test_tail_event_fields_are_the_stored_ones(db: Database) -> None:
    tail = LogTail()
    await tail.start(db)
    results, events = await writes.create_positions(
        db, [_new("bob", "ETH-USD")], max_open_per_user=10
    )
    got: list[TailEvent] = []
    await read_until(tail, db, {events[0].id}, got)
    (event,) = got
    assert event.user_id == "bob"
    assert event.symbol == "ETH-USD"
    assert event.type == "position.created"
    assert event.source == "api"
    assert event.seq == events[0].seq
    assert event.position_id == events[0].position_id
    assert event.message == events[0].message  # exactly as stored


async def test_a_transaction_committed_late_is_not_skipped(db: Database, database_url: str) -> None:
    """A writes first (lower event id) and commits last; B writes and commits in between.
    While A is open, neither is returned (A holds xmin below B); after A commits, both are,
    once each."""
    tail = LogTail()
    await tail.start(db)
    conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(database_url)
    try:
        tx = conn.transaction()
        await trio_asyncio.aio_as_trio(tx.start)()
        _, a_events = await trio_asyncio.aio_as_trio(writes._create)(conn, [_new("alice")], 100)
        b_ids = await _create(db, "bob")
        assert b_ids[0] > a_events[0].id  # B: the later id, the earlier commit
        assert await drain(tail, db) == []  # A is open: B is above the horizon too
        assert await drain(tail, db, limit=1) == []
        await trio_asyncio.aio_as_trio(tx.commit)()
    finally:
        await trio_asyncio.aio_as_trio(conn.close)()
    got: list[TailEvent] = []
    want = {a_events[0].id, *b_ids}
    await read_until(tail, db, want, got)
    got.extend(await drain(tail, db))
    assert Counter(e.id for e in got) == Counter(want)  # each exactly once


async def test_a_users_events_come_in_seq_order_when_transaction_ids_disagree(
    db: Database, database_url: str
) -> None:
    """T1 gets its transaction id first but the user's lock last: its event has the lower tx
    and the higher seq. T0, open throughout, holds the horizon between T1 and T2, so T1's event
    is in range and T2's is not: the tail pulls T2's (the lower seq) into the same page, ahead
    of it, and does not return it again when the horizon passes it."""
    aio = trio_asyncio.aio_as_trio
    tail = LogTail()
    await tail.start(db)
    t1 = await aio(asyncpg.connect)(database_url)
    t0 = await aio(asyncpg.connect)(database_url)
    try:
        tx1, tx0 = t1.transaction(), t0.transaction()
        await aio(tx1.start)()
        x1 = int(await aio(t1.fetchval)("SELECT pg_current_xact_id()::text"))
        await aio(tx0.start)()
        x0 = int(await aio(t0.fetchval)("SELECT pg_current_xact_id()::text"))
        (t2_event,) = await _create(db, "alice")  # T2: seq 1, tx above x0, committed
        _, t1_events = await aio(writes._create)(t1, [_new("alice")], 100)  # seq 2, tx x1
        await aio(tx1.commit)()
        assert x1 < x0
        got: list[TailEvent] = []
        await read_until(tail, db, {t1_events[0].id}, got)
        assert [(e.id, e.seq) for e in got] == [(t2_event, 1), (t1_events[0].id, 2)]
        await aio(tx0.commit)()
    finally:
        await aio(t1.close)()
        await aio(t0.close)()
    later = await _create(db, "alice")  # seq 3
    await read_until(tail, db, set(later), got)
    got.extend(await drain(tail, db))
    assert [e.seq for e in got] == [1, 2, 3]  # T2's event was not returned a second time


async def test_a_rolled_back_transaction_leaves_nothing_and_does_not_stall(
    db: Database, database_url: str
) -> None:
    tail = LogTail()
    await tail.start(db)
    conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(database_url)
    try:
        tx = conn.transaction()
        await trio_asyncio.aio_as_trio(tx.start)()
        await trio_asyncio.aio_as_trio(writes._create)(conn, [_new("carol")], 100)
        await trio_asyncio.aio_as_trio(tx.rollback)()
    finally:
        await trio_asyncio.aio_as_trio(conn.close)()
    later = await _create(db, "dave")
    got: list[TailEvent] = []
    await read_until(tail, db, set(later), got)
    got.extend(await drain(tail, db))
    assert [e.user_id for e in got] == ["dave"]


async def test_paging_with_a_small_limit_returns_everything_once_in_order(db: Database) -> None:
    tail = LogTail()
    await tail.start(db)
    written: list[int] = []
    for i in range(6):  # several transactions, several events each, two users
        written += await _create(db, "alice" if i % 2 else "bob", n=5)
    got: list[TailEvent] = []
    await read_until(tail, db, set(written), got, limit=3)
    got.extend(await drain(tail, db, limit=3))
    assert Counter(e.id for e in got) == Counter(written)
    for user in ("alice", "bob"):
        seqs = [e.seq for e in got if e.user_id == user]
        assert seqs == sorted(seqs) and len(seqs) == 15
        assert seqs == list(range(seqs[0], seqs[0] + 15))  # gap-free, in seq order


async def test_many_reads_while_writers_run_never_return_an_event_twice(db: Database) -> None:
    """Concurrent writers of one and several users; a reader reading all the time."""
    tail = LogTail()
    await tail.start(db)
    written: list[int] = []
    got: list[TailEvent] = []
    done = trio.Event()

    async def writer(user: str) -> None:
        for _ in range(15):
            written.extend(await _create(db, user, n=2))

    async def writers() -> None:
        async with trio.open_nursery() as nursery:
            for user in ("u1", "u2", "u3", "u1"):
                nursery.start_soon(writer, user)
        done.set()

    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writers)
            while not done.is_set():
                got.extend(await tail.read(db, limit=7))
                await trio.sleep(0.001)
    await read_until(tail, db, set(written), got, limit=7)
    got.extend(await drain(tail, db))
    assert len(written) == 4 * 15 * 2
    assert Counter(e.id for e in got) == Counter(written)
    for user in ("u1", "u2", "u3"):
        seqs = [e.seq for e in got if e.user_id == user]
        assert seqs == sorted(seqs)  # per user, commit order is seq order


async def test_a_failed_read_moves_nothing(db: Database, database_url: str) -> None:
    """A read that fails (here: the pool is closed under it) leaves the tail where it was."""
    from tickguard.storage import DatabaseUnavailable, open_pool

    tail = LogTail()
    await tail.start(db)
    ids = await _create(db, n=2)
    async with open_pool(database_url) as other:
        pass  # closed: any call on it fails
    with pytest.raises((DatabaseUnavailable, asyncpg.InterfaceError)):
        await tail.read(other)
    got: list[TailEvent] = []
    await read_until(tail, db, set(ids), got)
    assert Counter(e.id for e in got) == Counter(ids)


def test_tail_event_is_a_value() -> None:
    event = TailEvent(1, "u", 1, "position.created", uuid.uuid4(), "BTC-USD", "api", "{}")
    with pytest.raises(AttributeError):
        event.id = 2  # type: ignore[misc]


async def test_migration_007_gives_existing_events_a_tx_and_a_later_tail_skips_them(
    db: Database, database_url: str
) -> None:
    """Events written before migration 007 get its transaction's id; a tail started after
    it returns none of them, and the events written after it."""
    from tickguard.storage import migrate, open_database
    from tickguard.storage.migrate import bundled_migrations

    name = f"tail_{uuid.uuid4().hex[:10]}"
    url = urlunsplit(urlsplit(database_url)._replace(path="/" + name))  # keeps ?host=…
    await db.execute(f'CREATE DATABASE "{name}"')
    try:
        async with open_database(url) as old:
            await migrate(old, [m for m in bundled_migrations() if m.version < 7])
            before = await _create(old, n=3)
            assert (await migrate(old))[0] == 7  # then any later ones
            assert await old.fetchval("SELECT count(*) FROM events WHERE tx IS NULL") == 0
            tail = LogTail()
            await tail.start(old)
            after = await _create(old, n=2)
            got: list[TailEvent] = []
            await read_until(tail, old, set(after), got)
            got.extend(await drain(tail, old))
            assert sorted(e.id for e in got) == sorted(after)
            assert not set(before) & {e.id for e in got}
    finally:
        await db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
