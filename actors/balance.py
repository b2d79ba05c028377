"""The balancer: which partitions this engine process should hold (issue 18, stage 3).

Every engine announces itself (``storage.members``) and, once per lease-keeper round, decides
its fair share: with N live members and P partitions, at most ``ceil(P/N)`` (exactly that for
the first ``P mod N`` members in name order, one less for the others). It keeps what it
holds up to that share, takes free or expired partitions up to it, and releases the excess, at
most ``moves`` a round, so a join or a leave moves partitions a few at a time. Every engine runs
the same rule on the same survey, so 2 or 3 engines settle on an even split (P=8: 4/4, 3/3/2)
and each partition ends up held exactly once (the lease rows decide who really holds it).

The rule is the pure ``fair_share``; ``Balancer`` wraps it with the survey for the keeper's
``LeaseConfig.balancer`` hook. It never acquires or releases anything itself.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence

import attrs

from tickguard.storage import Database, members

log = logging.getLogger(__name__)

MOVES_PER_ROUND = 4  # partitions released per keeper round, at most (bounded moves)


def fair_share(
    me: str,
    live: Sequence[str],
    partitions: int,
    held: Collection[int],
    taken: Mapping[int, str],
    *,
    moves: int = MOVES_PER_ROUND,
) -> list[int]:
    """The partitions ``me`` should hold, given the live members, what it ``held``s and what
    the others hold (``taken``: partition -> owner).

    With N members and P partitions, the first ``P mod N`` members (in name order) have a share
    of ``ceil(P/N)``, the others ``floor(P/N)``: the shares add up to P. A member takes free
    partitions up to its share; it keeps what it holds up to ``ceil(P/N)``, and down to its
    share only while another member holds fewer than ``floor(P/N)`` and nothing is free (so a
    holder is not displaced without need: with one partition, a leader stays the leader). The
    excess goes at most ``moves`` a round, the least preferred first, and nothing is taken
    meanwhile. Each member prefers the partitions from its own offset of the ring on, so
    members asking at once mostly ask for different ones."""
    ring = sorted(set(live) | {me})
    n = len(ring)
    rank = ring.index(me)
    floor, ceil = partitions // n, -(-partitions // n)
    share = floor + (1 if rank < partitions % n else 0)
    offset = rank * partitions // n

    def preference(partition: int) -> int:
        return (partition - offset) % partitions

    mine = sorted((p for p in set(held) if 0 <= p < partitions), key=preference)
    others = {p: o for p, o in taken.items() if 0 <= p < partitions and p not in set(mine)}
    free = sorted(
        (p for p in range(partitions) if p not in others and p not in set(mine)), key=preference
    )
    counts = {m: 0 for m in ring if m != me}
    for owner in others.values():
        if owner in counts:
            counts[owner] += 1
    hungry = not free and any(c < floor for c in counts.values())
    limit = share if hungry else ceil
    keep, excess = mine[:limit], mine[limit:]
    if excess:
        return sorted(keep + excess[: max(0, len(excess) - moves)])
    return sorted(keep + free[: max(0, share - len(keep))])


@attrs.define
class Balancer:
    """The keeper's ``balancer`` hook: ``plan`` announces this engine and returns what it
    should hold; ``leave`` withdraws it on the way out. Both raise ``DatabaseUnavailable``."""

    db: Database
    owner: str
    partitions: int
    ttl_ms: int
    moves: int = MOVES_PER_ROUND
    members_seen: int = 0  # live members at the last survey (for /ready)

    async def plan(self, held: Collection[int], *, timeout: float | None = None) -> list[int]:
        survey = await members.survey(
            self.db, self.owner, self.ttl_ms, self.partitions, timeout=timeout
        )
        if len(survey.members) != self.members_seen:
            log.info("engine members: %s", ", ".join(survey.members))
        self.members_seen = len(survey.members)
        return fair_share(
            self.owner, survey.members, self.partitions, held, survey.taken, moves=self.moves
        )

    async def leave(self, *, timeout: float | None = None) -> None:
        await members.withdraw(self.db, self.owner, timeout=timeout)
