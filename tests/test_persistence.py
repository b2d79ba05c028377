"""The persistence actor on a real PostgreSQL: commits, grouping, ordering, outbox recovery."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import trio

from tickguard.actors import persistence
from tickguard.actors.faults import FaultPoints, InjectedFault
from tickguard.actors.mailbox import ActorUnavailable, Mailbox, ask
from tickguard.actors.messages import (
    CloseOrder,
    CloseOutcome,
    CloseRequest,
    CreateRequest,
    CreateResult,
    Event,
    NewPosition,
    Track,
    Untrack,
)
from tickguard.storage import Database


class RecordingEngines:
    """The engine registry's interface, recording what persistence sends and what fanout
    already had queued at that moment."""

    def __init__(self, fanout: Mailbox[Any]) -> None:
        self.fanout = fanout
        self.sent: list[tuple[str, Track | Untrack, int]] = []

    def send(self, symbol: str, message: Track | Untrack) -> None:
        self.sent.append((symbol, message, self.fanout.pending()))


def new(user: str = "alice") -> NewPosition:
    return NewPosition(user, "BTC-USD", "long", Decimal("100"), Decimal("110"), Decimal("90"))


def drain(box: Mailbox[Any]) -> list[Any]:
    out = []
    while True:
        try:
            out.append(box.receive_nowait())
        except trio.WouldBlock:
            return out


async def create(inbox: Mailbox[Any], position: NewPosition) -> CreateResult:
    return await ask(inbox, lambda r: CreateRequest(position, r), timeout=10)


async def test_create_commits_then_publishes_then_tracks(db: Database) -> None:
    inbox: Mailbox[Any] = Mailbox("persistence")
    fanout: Mailbox[Any] = Mailbox("fanout")
    engines = RecordingEngines(fanout)
    async with trio.open_nursery() as nursery:
        await nursery.start(persistence.run, inbox, db, fanout, engines)
        result = await create(inbox, new())
        # Marking published follows the reply; wait for it (hang guard, not a timing claim).
        with trio.fail_after(10):
            while await db.fetchval("SELECT count(*) FROM events WHERE published_at IS NULL"):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert result.created and result.position.status == "open"
    assert await db.fetchval("SELECT count(*) FROM positions") == 1
    [event] = drain(fanout)
    assert isinstance(event, Event) and event.type == "position.created" and event.seq == 1
    [(symbol, track, queued_before)] = engines.sent
    assert symbol == "BTC-USD" and isinstance(track, Track)
    assert queued_before == 1  # the created event was already queued for fanout (invariant 9)


async def test_fifty_concurrent_closes_close_once(db: Database) -> None:
    inbox: Mailbox[Any] = Mailbox("persistence")
    fanout: Mailbox[Any] = Mailbox("fanout")
    engines = RecordingEngines(fanout)
    outcomes: list[CloseOutcome] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(persistence.run, inbox, db, fanout, engines)
        position = (await create(inbox, new())).position

        async def close_it() -> None:
            [result] = await ask(
                inbox,
                lambda r: CloseRequest(
                    (CloseOrder(position.id, Decimal("105"), "manual", user_id="alice"),),
                    "api",
                    r,
                ),
                timeout=10,
            )
            outcomes.append(result.outcome)

        async with trio.open_nursery() as closers:
            for _ in range(50):
                closers.start_soon(close_it)
        nursery.cancel_scope.cancel()
    assert outcomes.count(CloseOutcome.CLOSED) == 1
    assert outcomes.count(CloseOutcome.ALREADY_CLOSED) == 49
    closed = [e for e in drain(fanout) if e.type == "position.closed"]
    assert len(closed) == 1
    assert await db.fetchval("SELECT count(*) FROM events WHERE type='position.closed'") == 1
    assert [type(m).__name__ for _, m, _ in engines.sent] == ["Track", "Untrack"]


async def test_crash_after_commit_publishes_each_event_once_after_restart(db: Database) -> None:
    inbox: Mailbox[Any] = Mailbox("persistence")
    fanout: Mailbox[Any] = Mailbox("fanout")
    engines = RecordingEngines(fanout)
    faults = FaultPoints()
    faults.raise_at("persistence.after_commit")
    with pytest.raises(ExceptionGroup) as crashed:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: persistence.run(
                    inbox, db, fanout, engines, faults=faults, task_status=task_status
                )
            )
            with pytest.raises(ActorUnavailable):
                async with trio.open_nursery() as caller:

                    async def request() -> None:
                        await create(inbox, new())

                    caller.start_soon(request)
                    # The actor dies holding the request; the supervisor's duty, done here:
                    await trio.testing.wait_all_tasks_blocked()
    assert crashed.group_contains(InjectedFault)
    inbox.fail_in_flight()
    await trio.testing.wait_all_tasks_blocked()
    # The row committed, but nobody was told.
    assert await db.fetchval("SELECT count(*) FROM positions") == 1
    assert drain(fanout) == [] and engines.sent == []
    async with trio.open_nursery() as nursery:
        await nursery.start(persistence.run, inbox, db, fanout, engines)
        nursery.cancel_scope.cancel()
    events = drain(fanout)
    assert [(e.type, e.seq) for e in events] == [("position.created", 1)]
    assert [type(m).__name__ for _, m, _ in engines.sent] == ["Track"]
    assert await db.fetchval("SELECT count(*) FROM events WHERE published_at IS NULL") == 0


async def test_a_large_close_batch_commits_in_chunks_and_answers_every_id(db: Database) -> None:
    inbox: Mailbox[Any] = Mailbox("persistence")
    fanout: Mailbox[Any] = Mailbox("fanout")
    stats = persistence.PersistenceStats()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: persistence.run(
                inbox,
                db,
                fanout,
                RecordingEngines(fanout),
                config=persistence.PersistenceConfig(close_chunk=3),
                stats=stats,
                task_status=task_status,
            )
        )
        ids = [(await create(inbox, new())).position.id for _ in range(8)]
        before = stats.transactions
        orders = tuple(CloseOrder(i, Decimal("90"), "stop_loss") for i in [*ids, ids[0]])
        results = await ask(inbox, lambda r: CloseRequest(orders, "engine", r), timeout=10)
        nursery.cancel_scope.cancel()
    assert [r.position_id for r in results] == [*ids, ids[0]]
    assert [r.outcome for r in results] == [CloseOutcome.CLOSED] * 8 + [CloseOutcome.ALREADY_CLOSED]
    assert stats.transactions - before == 3  # 9 orders, 3 per transaction
    closed = [e for e in drain(fanout) if e.type == "position.closed"]
    assert sorted(e.position_id for e in closed) == sorted(ids)


async def test_marks_are_written_in_the_background_and_flushed_when_stopping(
    db: Database,
) -> None:
    """The outbox mark is not in the path of the next transaction (a task of its own writes it)
    but is never lost to a clean stop: persistence stopping with marks queued writes them
    before it returns, so the next start has nothing to republish."""
    inbox: Mailbox[Any] = Mailbox("persistence")
    fanout: Mailbox[Any] = Mailbox("fanout")
    engines = RecordingEngines(fanout)
    stopping = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: persistence.run(
                    inbox, db, fanout, engines, stopping=stopping, task_status=task_status
                )
            )
            results = []
            for _ in range(3):
                results.append(await create(inbox, new()))
            # Another close and the stop, queued together: the stop comes once it is handled.
            pid = results[0].position.id
            inbox.send_nowait(CloseRequest((CloseOrder(pid, Decimal("95"), "manual"),), "api"))
            stopping.set()
    assert [e.seq for e in drain(fanout)] == [1, 2, 3, 4]
    assert await db.fetchval("SELECT count(*) FROM events") == 4
    assert await db.fetchval("SELECT count(*) FROM events WHERE published_at IS NULL") == 0
