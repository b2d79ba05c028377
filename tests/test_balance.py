"""The balancer's rule (issue 18): each engine's fair share of the partitions, bounded moves.

``fair_share`` is pure; these tests play rounds of it for several members against one shared
ownership table (what the lease rows would say) and check that 1, 2 and 3 members settle on an
even split with every partition held exactly once, and that a join moves at most ``moves``
partitions per member and round.
"""

from __future__ import annotations

import random

import pytest

from tickguard.actors.balance import fair_share


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
