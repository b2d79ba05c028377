"""The fanout actor on its own: memory channels only, no sockets, no database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial

import pytest
import trio
import trio.lowlevel
import trio.testing

from tickguard.actors import fanout
from tickguard.actors.fanout import FanoutConfig
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import Event, Join, Leave, Position
from tickguard.actors.session_queue import SessionClosed, SessionQueue
from tickguard.wire import event_message


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def _event(user: str, seq: int, size: int = 100) -> Event:
    return Event(id=seq, user_id=user, seq=seq, type="position.created", message="x" * size)


async def _drain(session: SessionQueue) -> list[str]:
    """Everything queued right now (the session is not closed)."""
    out = []
    while session.queued_bytes:
        out.append(await session.next_message())
    return out


async def _settle(inbox: Mailbox[object]) -> None:
    """Wait until fanout has taken every queued message and is idle again."""
    with trio.fail_after(5):
        while inbox.pending():
            await trio.lowlevel.checkpoint()
        await trio.testing.wait_all_tasks_blocked()


@pytest.fixture
async def running(
    autojump_clock: trio.testing.MockClock,
) -> AsyncIterator[tuple[Mailbox[object], FanoutConfig]]:
    inbox: Mailbox[object] = Mailbox("fanout")
    config = FanoutConfig(queue_bytes=1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(fanout.run, inbox, config=config))
        yield inbox, config
        nursery.cancel_scope.cancel()


async def test_events_reach_only_their_users_sessions_in_order(
    running: tuple[Mailbox[object], FanoutConfig],
) -> None:
    inbox, _ = running
    alice1, alice2, bob = SessionQueue("alice"), SessionQueue("alice"), SessionQueue("bob")
    for session in (alice1, alice2, bob):
        await inbox.send(Join(session))
    for seq in (1, 2, 3):
        await inbox.send(_event("alice", seq, size=10 + seq))
    await inbox.send(_event("bob", 1, size=50))
    await _settle(inbox)
    assert await _drain(alice1) == ["x" * 11, "x" * 12, "x" * 13]
    assert await _drain(alice2) == ["x" * 11, "x" * 12, "x" * 13]
    assert await _drain(bob) == ["x" * 50]


async def test_slow_session_is_dropped_with_1013_and_the_other_gets_everything(
    running: tuple[Mailbox[object], FanoutConfig],
) -> None:
    inbox, config = running
    slow, fast = SessionQueue("alice"), SessionQueue("alice")
    await inbox.send(Join(slow))
    await inbox.send(Join(fast))
    received: list[str] = []
    for seq in range(1, 31):  # 30 × 100 bytes against a 1000-byte queue
        await inbox.send(_event("alice", seq))
        await _settle(inbox)
        received += await _drain(fast)
    assert len(received) == 30
    assert slow.closed is not None and slow.closed.code == 1013
    assert slow.closed.reason == "slow consumer"
    with pytest.raises(SessionClosed):
        await slow.next_message()
    assert config.stats.dropped_slow == 1
    assert config.stats.sessions == 1


async def test_a_burst_queued_at_once_reaches_every_session_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A burst of events queued before fanout runs, and a Join among them: each is delivered
    once, in order, to the sessions joined before it."""
    async with trio.open_nursery() as nursery:
        inbox: Mailbox[object] = Mailbox("fanout")
        await nursery.start(partial(fanout.run, inbox, config=FanoutConfig()))
        await _burst(inbox)
        nursery.cancel_scope.cancel()


BURST = 512


async def _burst(inbox: Mailbox[object]) -> None:
    early, late = SessionQueue("alice"), SessionQueue("alice")
    n = 2 * BURST + 5
    inbox.send_nowait(Join(early))
    for seq in range(1, n + 1):
        inbox.send_nowait(Event(seq, "alice", seq, "position.created", str(seq)))
        if seq == BURST + 1:
            inbox.send_nowait(Join(late))
    received: dict[SessionQueue, list[str]] = {early: [], late: []}
    with trio.fail_after(5):
        # Until the last event reached the early session (fanout may still hold it when its
        # inbox is already empty), and nothing is left queued.
        while len(received[early]) < n or early.queued_bytes or late.queued_bytes:
            for session, messages in received.items():
                messages += await _drain(session)
            await trio.lowlevel.checkpoint()
    assert received[early] == [str(seq) for seq in range(1, n + 1)]
    assert received[late] == [str(seq) for seq in range(BURST + 2, n + 1)]


async def test_the_queue_bound_counts_utf8_bytes_not_characters(
    running: tuple[Mailbox[object], FanoutConfig],
) -> None:
    inbox, config = running  # a 1000-byte queue
    session = SessionQueue("zoë")
    await inbox.send(Join(session))
    for seq in (1, 2):  # 400 characters, 800 bytes each: the second overflows
        await inbox.send(Event(seq, "zoë", seq, "position.created", "é" * 400))
    await _settle(inbox)
    assert session.closed is not None and session.closed.code == 1013
    assert config.stats.dropped_slow == 1


async def test_the_default_queue_holds_a_10000_position_cascade(
    autojump_clock: trio.testing.MockClock,
) -> None:
    now = datetime.now(UTC)
    position = Position(
        uuid.uuid4(), "u" * 128, "BTC-USD", "long",
        Decimal("65000.12345678"), Decimal("70000.5"), Decimal("60000.25"), "closed",
        Decimal("60000.25"), "stop_loss", now, now, now, now,
    )  # fmt: skip
    message = event_message("position.closed", "engine", 1, position)
    inbox: Mailbox[object] = Mailbox("fanout")
    config = FanoutConfig()
    session = SessionQueue(position.user_id)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(fanout.run, inbox, config=config))
        await inbox.send(Join(session))
        for seq in range(1, 10_001):
            inbox.send_nowait(
                Event(
                    seq,
                    position.user_id,
                    seq,
                    "position.closed",
                    message.replace('"seq":1', f'"seq":{seq}'),
                )
            )
        await _settle(inbox)
        nursery.cancel_scope.cancel()
    assert len(message) >= 550  # the longest userId: a worst-case event
    assert config.stats.dropped_slow == 0 and config.stats.delivered == 10_000


async def test_skip_through_drops_what_the_client_already_has(
    running: tuple[Mailbox[object], FanoutConfig],
) -> None:
    inbox, _ = running
    session = SessionQueue("alice")
    await inbox.send(Join(session))
    for seq in (1, 2, 3):
        await inbox.send(_event("alice", seq, size=seq))
    await _settle(inbox)
    session.skip_through(2)
    assert session.queued_bytes == 3
    await inbox.send(_event("alice", 2, size=20))  # a republished duplicate
    await inbox.send(_event("alice", 4, size=4))
    await _settle(inbox)
    assert await _drain(session) == ["xxx", "xxxx"]


async def test_leave_and_closed_sessions_stop_delivery(
    running: tuple[Mailbox[object], FanoutConfig],
) -> None:
    inbox, config = running
    left, ended, stays = SessionQueue("alice"), SessionQueue("alice"), SessionQueue("alice")
    for session in (left, ended, stays):
        await inbox.send(Join(session))
    await inbox.send(Leave(left))
    ended.close(1000, "bye")
    await inbox.send(_event("alice", 1))
    await _settle(inbox)
    assert left.queued_bytes == 0 and ended.queued_bytes == 0
    assert await _drain(stays) == ["x" * 100]
    assert config.stats.sessions == 1


async def test_a_crashed_fanout_closes_its_sessions_with_1012(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inbox: Mailbox[object] = Mailbox("fanout")
    session = SessionQueue("alice")

    async def crashing(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with pytest.raises(AttributeError):
            await fanout.run(inbox, config=FanoutConfig(), task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(crashing)
        await inbox.send(Join(session))
        # A bug: an event whose message is not text makes the actor raise.
        await inbox.send(Event(1, "alice", 1, "position.created", None))  # type: ignore[arg-type]
    assert session.closed is not None and session.closed.code == 1012
    with pytest.raises(SessionClosed):
        await session.next_message()


async def test_a_cancelled_fanout_closes_its_sessions_with_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inbox: Mailbox[object] = Mailbox("fanout")
    session = SessionQueue("alice")
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(fanout.run, inbox, config=FanoutConfig()))
        await inbox.send(Join(session))
        await _settle(inbox)
        assert session.closed is None
        nursery.cancel_scope.cancel()
    assert session.closed is not None and session.closed.code == 1001


async def test_next_message_waits_until_something_is_pushed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    session = SessionQueue("alice")
    got: list[str] = []

    async def reader() -> None:
        got.append(await session.next_message())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        session.push(1, "hello", 5)
    assert got == ["hello"]
