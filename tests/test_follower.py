"""The follower actor (actors/follower.py) against the real PostgreSQL (and Redis for wake-ups):
each committed event delivered exactly once, by wake-up, by poll, and after an outage.

Delivery is waited for under a hang guard; no test asserts how fast it came. A wake-up test
polls once an hour, so only the wake-up can deliver within its guard.
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio
from tcp_proxy import running_proxy

from tickguard.actors import follower
from tickguard.actors.follower import FollowerStats
from tickguard.domain import NewPosition
from tickguard.storage import Database, open_pool, writes
from tickguard.storage.bus import BusTiming, open_bus
from tickguard.storage.tail import LogTail, TailEvent

GUARD_S = 60.0
HOURLY = 3600.0  # a poll that never comes within a test


async def _create(db: Database, user: str = "alice", n: int = 1) -> list[int]:
    request = NewPosition(
        user_id=user,
        symbol="BTC-USD",
        side="long",
        entry_price=Decimal("100"),
        take_profit=Decimal("110"),
        stop_loss=Decimal("90"),
    )
    _, events = await writes.create_positions(db, [request] * n, max_open_per_user=10_000)
    return [e.id for e in events]


class Delivered:
    def __init__(self) -> None:
        self.batches: list[list[TailEvent]] = []

    def __call__(self, batch: list[TailEvent]) -> None:
        self.batches.append(batch)

    @property
    def ids(self) -> list[int]:
        return [e.id for batch in self.batches for e in batch]

    async def wait_for(self, want: list[int]) -> None:
        with trio.fail_after(GUARD_S):
            while not set(want) <= set(self.ids):
                await trio.sleep(0.01)


async def test_events_are_delivered_by_poll_without_redis(db: Database) -> None:
    before = await _create(db, n=2)
    delivered, stats = Delivered(), FollowerStats()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda **kw: follower.run(db, delivered, poll_s=0.02, stats=stats, **kw)
        )
        written = await _create(db, "alice", n=3) + await _create(db, "bob", n=2)
        await delivered.wait_for(written)
        written += await _create(db, "alice")
        await delivered.wait_for(written)
        nursery.cancel_scope.cancel()
    assert Counter(delivered.ids) == Counter(written)  # each once, nothing from before start
    assert not set(before) & set(delivered.ids)
    assert all(batch for batch in delivered.batches)  # never an empty delivery
    assert stats.events == len(written) == 6
    assert stats.woken == 0 and stats.failures == 0
    assert stats.lag_s is not None


async def test_events_are_delivered_by_wake_up(db: Database, redis_url: str) -> None:
    topic = f"test-{id(db)}-events"
    delivered, stats = Delivered(), FollowerStats()
    # The db fixture's asyncio loop (trio-asyncio) carries the bus too: one loop per run.
    async with open_bus(redis_url, BusTiming(idle_s=1.0)) as bus, trio.open_nursery() as nursery:
        await nursery.start(
            lambda **kw: follower.run(
                db, delivered, wakeups=bus.wakeups(topic), poll_s=HOURLY, stats=stats, **kw
            )
        )
        with trio.fail_after(GUARD_S):  # the subscription's first yield is a wake-up too
            while stats.woken < 1:
                await trio.sleep(0.01)
        written = await _create(db, n=2)
        await bus.wake(topic)
        await delivered.wait_for(written)
        more = await _create(db, "bob")
        await bus.wake(topic)
        await delivered.wait_for(more)
        nursery.cancel_scope.cancel()
    assert Counter(delivered.ids) == Counter(written + more)
    assert stats.woken >= 2


async def test_delivery_resumes_after_the_database_was_unreachable(
    db: Database, database_url: str
) -> None:
    """The follower reads through a proxy that is cut for a while (a partition); writes go
    on meanwhile. Every event is delivered once, after the partition heals."""
    parts = urlsplit(database_url)
    if not parts.hostname or not parts.port:
        pytest.skip("the database is not on TCP (embedded PostgreSQL): no proxy to cut")
    delivered, stats = Delivered(), FollowerStats()
    async with running_proxy(parts.hostname, parts.port) as proxy:
        proxied = urlunsplit(
            parts._replace(netloc=parts.netloc.replace(f":{parts.port}", f":{proxy.port}"))
        )
        async with open_pool(proxied, timeout=2.0) as reader, trio.open_nursery() as nursery:
            await nursery.start(
                lambda **kw: follower.run(reader, delivered, poll_s=0.05, stats=stats, **kw)
            )
            first = await _create(db, n=2)
            await delivered.wait_for(first)
            proxy.cut()
            during = await _create(db, "bob", n=3)  # written while the follower cannot read
            with trio.fail_after(GUARD_S):
                while stats.failures < 2:
                    await trio.sleep(0.01)
            assert not set(during) & set(delivered.ids)
            proxy.heal()
            await delivered.wait_for(during)
            after = await _create(db, "carol")
            await delivered.wait_for(after)
            nursery.cancel_scope.cancel()
    assert Counter(delivered.ids) == Counter(first + during + after)
    assert stats.failures >= 2


async def test_a_failing_deliver_ends_the_follower(db: Database) -> None:
    def deliver(batch: list[TailEvent]) -> None:
        raise RuntimeError("boom")

    with trio.fail_after(GUARD_S), pytest.raises(ExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda **kw: follower.run(db, deliver, poll_s=0.02, **kw))
            await _create(db)
    assert caught.group_contains(RuntimeError, match="boom")


async def test_a_restarted_follower_subscribes_again_with_the_same_wakeups(
    db: Database, redis_url: str
) -> None:
    """The supervisor hands the same ``bus.wakeups(topic)`` to every run of the follower."""
    topic = f"test-{id(db)}-restart"
    async with open_bus(redis_url, BusTiming(idle_s=1.0)) as bus:
        wakeups = bus.wakeups(topic)
        delivered: list[int] = []
        for _ in range(2):
            stats, batches = FollowerStats(), Delivered()
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(follower.run, db, batches, wakeups=wakeups, poll_s=HOURLY, stats=stats)
                )
                with trio.fail_after(GUARD_S):
                    while stats.woken < 1:  # subscribed
                        await trio.sleep(0.01)
                written = await _create(db)
                await bus.wake(topic)
                await batches.wait_for(written)
                nursery.cancel_scope.cancel()
            delivered += batches.ids
            assert stats.woken >= 2
        assert len(delivered) == 2


async def test_a_restarted_follower_with_the_callers_tail_misses_nothing_committed_between(
    db: Database,
) -> None:
    """The supervisor keeps one ``LogTail`` across restarts: what commits while no follower
    runs is delivered by the next run (a new tail would start after it and never see it)."""
    tail, delivered = LogTail(), Delivered()
    written: list[int] = []
    for run_number in range(2):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(follower.run, db, delivered, poll_s=0.02, tail=tail))
            if run_number == 0:
                written += await _create(db)
                await delivered.wait_for(written)
            else:
                await delivered.wait_for(written)  # including the one below
            nursery.cancel_scope.cancel()
        if run_number == 0:
            written += await _create(db, "bob")  # between the runs
    assert Counter(delivered.ids) == Counter(written)
