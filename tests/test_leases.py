"""Engine leases (issue 18) on a real PostgreSQL: acquire, renew, release, takeover with a new
token; the lease keeper's local safety rule and its release on cancel; stable partitions."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import trio

from tickguard.actors import lease
from tickguard.actors.partitions import partition_of, symbols_of
from tickguard.storage import Database, DatabaseUnavailable, leases


@pytest.fixture
async def ldb(db: Database) -> AsyncIterator[Database]:
    await db.execute("TRUNCATE engine_leases")
    yield db


async def db_now(db: Database) -> Any:
    return await db.fetchval("SELECT now()")


# --- partitions ---


def test_partition_of_is_crc32_mod_n_and_in_range() -> None:
    symbols = [f"SYM{i}-USD" for i in range(200)] + ["BTC-USD", "ÉTH-€"]
    for n in (1, 2, 3, 16):
        for s in symbols:
            p = partition_of(s, n)
            assert p == zlib.crc32(s.encode("utf-8")) % n and 0 <= p < n
    assert {partition_of(s, 4) for s in symbols} == {0, 1, 2, 3}
    assert symbols_of(["BTC-USD", "ETH-USD"], 0, 1) == ["BTC-USD", "ETH-USD"]
    with pytest.raises(ValueError):
        partition_of("BTC-USD", 0)


def test_partition_of_is_the_same_in_another_python_run() -> None:
    symbols = ["BTC-USD", "ETH-USD", "SOL-USD", "DOGE-USD"]
    code = (
        "from tickguard.actors.partitions import partition_of;"
        f"print([partition_of(s, 7) for s in {symbols!r}])"
    )
    here = [partition_of(s, 7) for s in symbols]
    for seed in ("1", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == repr(here)


# --- storage.leases ---


async def test_only_one_owner_acquires(ldb: Database) -> None:
    a = await leases.acquire(ldb, [0, 1], "A", 60_000)
    b = await leases.acquire(ldb, [0, 1], "B", 60_000)
    assert a == {0: 1, 1: 1} and b == {}
    rows = await leases.owners(ldb)
    assert {p: (o, t) for p, (o, t, _) in rows.items()} == {0: ("A", 1), 1: ("A", 1)}
    # Asking again while it is validly ours keeps the token.
    assert await leases.acquire(ldb, [0], "A", 60_000) == {0: 1}


async def test_takeover_only_after_expiry_with_the_next_token(ldb: Database) -> None:
    assert await leases.acquire(ldb, [0], "A", 600) == {0: 1}
    a_expires = (await leases.owners(ldb))[0][2]
    assert await leases.acquire(ldb, [0], "B", 600) == {}
    with trio.fail_after(10):
        while not (got := await leases.acquire(ldb, [0], "B", 60_000)):
            await trio.sleep(0.05)
    assert got == {0: 2}
    owner, token, b_expires = (await leases.owners(ldb))[0]
    assert (owner, token) == ("B", 2)
    # B took it at the database's now (b_expires - ttl), which was not before A's expiry.
    assert b_expires - timedelta(milliseconds=60_000) >= a_expires
    # A's renewal with its old token is refused.
    assert await leases.renew(ldb, {0: 1}, "A", 600) == {}


async def test_renew_needs_the_owner_the_token_and_a_live_lease(ldb: Database) -> None:
    assert await leases.acquire(ldb, [0, 1], "A", 60_000) == {0: 1, 1: 1}
    before = (await leases.owners(ldb))[0][2]
    assert await leases.renew(ldb, {0: 1, 1: 1}, "A", 120_000) == {0: 1, 1: 1}
    assert (await leases.owners(ldb))[0][2] > before
    assert await leases.renew(ldb, {0: 1}, "B", 60_000) == {}  # not the owner
    assert await leases.renew(ldb, {0: 7}, "A", 60_000) == {}  # a stale token
    assert await leases.renew(ldb, {0: 1, 1: 9}, "A", 60_000) == {0: 1}
    # A lapsed lease is lost even though nobody took it: only acquire gets it back, anew.
    await ldb.execute("UPDATE engine_leases SET expires_at = now() - interval '1 s'")
    assert await leases.renew(ldb, {0: 1, 1: 1}, "A", 60_000) == {}
    assert await leases.acquire(ldb, [0], "A", 60_000) == {0: 2}


async def test_release_hands_over_at_once(ldb: Database) -> None:
    assert await leases.acquire(ldb, [0, 1], "A", 60_000) == {0: 1, 1: 1}
    await leases.release(ldb, {0: 1, 1: 5}, "B")  # not B's: nothing happens
    await leases.release(ldb, {1: 5}, "A")  # not this token: nothing happens
    assert await leases.acquire(ldb, [0, 1], "B", 60_000) == {}
    await leases.release(ldb, {0: 1}, "A")
    assert await leases.acquire(ldb, [0, 1], "B", 60_000) == {0: 2}
    rows = await leases.owners(ldb)
    assert rows[0][:2] == ("B", 2) and rows[1][:2] == ("A", 1)


# --- the keeper ---


def test_overdue_is_two_thirds_of_the_ttl_after_the_renewal_was_sent() -> None:
    renewed = {0: 10.0, 1: 12.0, 2: 13.5}
    assert lease.overdue(renewed, 14.0, 6.0) == [0]  # 4.0 s >= 2/3 of 6 s
    assert lease.overdue(renewed, 15.99, 6.0) == [0]
    assert lease.overdue(renewed, 17.4, 6.0) == [0, 1]
    assert lease.overdue({}, 100.0, 6.0) == []


class Outage:
    """The database handle with an off switch: while ``down``, every call raises
    ``DatabaseUnavailable`` as a lost server would (the only double here; the rest is real)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.down = False
        self.calls_refused = 0

    def _check(self) -> None:
        if self.down:
            self.calls_refused += 1
            raise DatabaseUnavailable("test outage")

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return await self.db.fetch(*args, **kwargs)

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return await self.db.execute(*args, **kwargs)

    async def transaction(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return await self.db.transaction(*args, **kwargs)


async def wait_held(state: lease.LeaseState, want: dict[int, int]) -> None:
    with trio.fail_after(10):
        while dict(state.held) != want:
            await state.wait_changed()


async def test_keeper_holds_a_standby_waits_and_a_cancel_hands_over(ldb: Database) -> None:
    a_state, b_state = lease.LeaseState(), lease.LeaseState()
    a_stats, b_stats = lease.LeaseStats(), lease.LeaseStats()
    async with trio.open_nursery() as nursery:
        a_scope = trio.CancelScope()

        async def keeper_a(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with a_scope:
                # A long TTL: B can only get the partition from A's release.
                config = lease.LeaseConfig("A", ttl_ms=60_000)
                await lease.run(ldb, config, a_state, stats=a_stats, task_status=task_status)

        await nursery.start(keeper_a)
        assert dict(a_state.held) == {0: 1} and a_stats.acquired == 1 and a_stats.held == {0: 1}
        b_config = lease.LeaseConfig("B", ttl_ms=600)
        await nursery.start(lambda **kw: lease.run(ldb, b_config, b_state, stats=b_stats, **kw))
        assert dict(b_state.held) == {}
        a_scope.cancel()
        await wait_held(b_state, {0: 2})
        assert dict(a_state.held) == {}
        nursery.cancel_scope.cancel()
    assert b_stats.acquired == 1 and a_stats.lost == 0
    # B's cancel released too.
    owner, token, expires = (await leases.owners(ldb))[0]
    assert (owner, token) == ("B", 2) and expires <= await db_now(ldb)


async def test_keeper_survives_an_outage_and_drops_before_expiry(ldb: Database) -> None:
    flaky = Outage(ldb)
    state, stats = lease.LeaseState(), lease.LeaseStats()
    config = lease.LeaseConfig("A", ttl_ms=3_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda **kw: lease.run(flaky, config, state, stats=stats, **kw))  # type: ignore[arg-type]
        assert dict(state.held) == {0: 1}
        flaky.down = True
        await wait_held(state, {})
        # Dropped locally while the database still says A holds it: nobody else could act yet.
        assert await ldb.fetchval(
            "SELECT owner = 'A' AND token = 1 AND expires_at > now() FROM engine_leases"
        )
        assert await leases.acquire(ldb, [0], "B", 3_000) == {}
        assert stats.renew_failures >= 1 and stats.lost == 1 and stats.held == {}
        # The database comes back: the keeper (still running) takes it again, with the token
        # the row has then (1 if it had not expired yet, 2 if it had).
        flaky.down = False
        with trio.fail_after(10):
            while not state.held:
                await state.wait_changed()
        owner, token, _ = (await leases.owners(ldb))[0]
        assert owner == "A" and dict(state.held) == {0: token} and token in (1, 2)
        nursery.cancel_scope.cancel()
    assert flaky.calls_refused >= 1


async def test_keeper_holds_only_the_wanted_partitions(ldb: Database) -> None:
    wanted = [0, 2]
    state = lease.LeaseState()
    config = lease.LeaseConfig("A", partitions=3, ttl_ms=3_000, wanted=lambda: wanted)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda **kw: lease.run(ldb, config, state, **kw))
        assert dict(state.held) == {0: 1, 2: 1}
        wanted = [2]
        await wait_held(state, {2: 1})
        # Released at once: another engine takes it now, not after the TTL.
        assert await leases.acquire(ldb, [0, 1], "B", 3_000) == {0: 2, 1: 1}
        nursery.cancel_scope.cancel()
