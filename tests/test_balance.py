"""The balancer's rule (issue 18): each engine's fair share of the partitions, bounded moves.

``fair_share`` is pure; these tests play rounds of it for several members against one shared
ownership table (what the lease rows would say) and check that 1, 2 and 3 members settle on an
even split with every partition held exactly once, and that a join moves at most ``moves``
partitions per member and round.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from tickguard.actors import lease
from tickguard.actors.balance import Balancer, fair_share
from tickguard.storage import Database, leases, members


def settle(
    members: list[str],
    partitions: int,
    owners: dict[int, str],
    *,
    moves: int = 4,
    rounds: int = 40,
    seed: int = 0,
) -> tuple[dict[int, str], int]:
    """Rounds of every member (in a random order each round) asking for its share and taking
    what is free; returns the final owners and the most partitions one member released in one
    round."""
    rng = random.Random(seed)
    most_released = 0
    for _ in range(rounds):
        for me in rng.sample(members, len(members)):
            held = {p for p, o in owners.items() if o == me}
            taken = {p: o for p, o in owners.items() if o != me}
            wanted = set(fair_share(me, members, partitions, held, taken, moves=moves))
            released = held - wanted
            most_released = max(most_released, len(released))
            for p in released:
                del owners[p]
            for p in wanted - held:
                if p not in owners:  # the lease row decides: only a free one is taken
                    owners[p] = me
    return owners, most_released


@pytest.mark.parametrize("partitions", [1, 8, 64])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_members_settle_on_an_even_split_with_every_partition_held_once(
    partitions: int, count: int
) -> None:
    members = [f"engine-{i}" for i in range(count)]
    owners, _ = settle(members, partitions, {})
    assert sorted(owners) == list(range(partitions))  # every partition held, once (a dict)
    counts = [sum(1 for o in owners.values() if o == m) for m in members]
    share = -(-partitions // count)
    assert max(counts) <= share
    assert sum(counts) == partitions
    if partitions >= count:
        assert max(counts) - min(counts) <= 1, counts


def test_a_join_moves_partitions_a_few_per_round_and_a_leave_hands_them_all_over() -> None:
    owners, _ = settle(["a"], 64, {})
    assert set(owners.values()) == {"a"}
    owners, most = settle(["a", "b"], 64, owners, moves=4)
    assert most <= 4
    assert sorted(owners) == list(range(64))
    assert sorted(owners.values()).count("a") == 32
    # "b" is gone (its leases expired): "a" takes everything back.
    owners = {p: o for p, o in owners.items() if o == "a"}
    owners, _ = settle(["a"], 64, owners)
    assert set(owners.values()) == {"a"} and len(owners) == 64


def test_over_share_takes_nothing_and_releases_the_least_preferred_first() -> None:
    # "a" holds all 8 and "b" joined: share 4, at most 2 released this round, nothing taken.
    wanted = fair_share("a", ["a", "b"], 8, set(range(8)), {}, moves=2)
    assert len(wanted) == 6
    # "b" asks for free ones from its own end of the ring first (offset 4).
    assert fair_share("b", ["a", "b"], 8, set(), {0: "a", 1: "a"}) == [4, 5, 6, 7]
    # Out-of-range partitions (a smaller ENGINE_PARTITIONS than before) are never wanted.
    assert fair_share("a", ["a"], 2, {0, 5}, {}) == [0, 1]


def test_one_partition_stays_with_its_holder_when_another_member_joins() -> None:
    # Stage 2: "b" holds the lease; "a" (first by name, share 1) joins: nobody moves.
    assert fair_share("b", ["a", "b"], 1, {0}, {}) == [0]
    assert fair_share("a", ["a", "b"], 1, set(), {0: "b"}) == []
    # Once "b" is gone (its lease expired), "a" takes it.
    assert fair_share("a", ["a"], 1, set(), {}) == [0]


def test_a_member_below_its_floor_makes_the_others_give_up_their_extra() -> None:
    # P=64, N=3: shares 22/21/21. "c" holds 20 and nothing is free: "a" (share 22) keeps 22,
    # "b" (share 21) gives one up.
    owners = {p: ("a" if p < 22 else "b" if p < 44 else "c") for p in range(64)}
    b_held = {p for p, o in owners.items() if o == "b"}
    taken = {p: o for p, o in owners.items() if o != "b"}
    assert len(fair_share("b", ["a", "b", "c"], 64, b_held, taken)) == 21


# --- on a real PostgreSQL: members, and keepers balancing through it ---


@pytest.fixture
async def bdb(db: Database) -> AsyncIterator[Database]:
    await db.execute("TRUNCATE engine_leases, engine_members")
    yield db


async def test_survey_announces_counts_live_members_and_names_what_others_hold(
    bdb: Database,
) -> None:
    assert await leases.acquire(bdb, [1, 2], "b", 60_000) == {1: 1, 2: 1}
    await members.survey(bdb, "b", 60_000, 4)
    seen = await members.survey(bdb, "a", 60_000, 4)
    assert seen.members == ("a", "b") and dict(seen.taken) == {1: "b", 2: "b"}
    # Its own leases are not "taken"; a member that stopped renewing drops out.
    assert dict((await members.survey(bdb, "b", 1, 4)).taken) == {}
    await trio.sleep(0.05)
    assert (await members.survey(bdb, "a", 60_000, 4)).members == ("a",)
    await members.withdraw(bdb, "a")
    assert (await members.survey(bdb, "c", 60_000, 4)).members == ("c",)


async def test_keepers_with_balancers_split_evenly_and_take_all_back_when_one_leaves(
    bdb: Database,
) -> None:
    ttl_ms = 900

    def keeper(owner: str) -> tuple[lease.LeaseConfig, lease.LeaseState]:
        config = lease.LeaseConfig(
            owner=owner,
            partitions=8,
            ttl_ms=ttl_ms,
            balancer=Balancer(bdb, owner, 8, ttl_ms, moves=2),
        )
        return config, lease.LeaseState()

    async def until(condition: Any) -> None:
        with trio.fail_after(30):  # a hang guard, not a speed bound
            while not condition():  # noqa: ASYNC110 (the keepers signal nobody)
                await trio.sleep(0.05)

    a_config, a = keeper("a")
    b_config, b = keeper("b")
    async with trio.open_nursery() as nursery:
        await nursery.start(lease.run, bdb, a_config, a)
        await until(lambda: len(a.held) == 8)
        b_scope = trio.CancelScope()
        nursery.start_soon(_run_keeper, bdb, b_config, b, b_scope)
        await until(lambda: len(a.held) == 4 and len(b.held) == 4)
        assert set(a.held).isdisjoint(b.held)
        owners = await leases.owners(bdb)
        assert sorted(o for o, _, _ in owners.values()) == ["a"] * 4 + ["b"] * 4
        b_scope.cancel()  # a graceful stop: b releases and leaves at once
        await until(lambda: len(a.held) == 8)
        nursery.cancel_scope.cancel()


async def _run_keeper(
    db: Database, config: lease.LeaseConfig, state: lease.LeaseState, scope: trio.CancelScope
) -> None:
    with scope:
        await lease.run(db, config, state)
