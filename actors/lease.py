"""The lease keeper: holds this process's engine partitions (issue 18) and says which it holds.

An engine process may act on a partition of the symbol space only while it holds that
partition's lease (``storage.leases``). The keeper takes every wanted partition that is free or
expired, renews what it holds every third of the TTL, and publishes the result in a
``LeaseState``: ``held`` (partition -> fencing token) is what this process may act on now, and
``wait_changed`` wakes whoever starts and stops the engines when it changes.

Local safety: a partition whose last successful renewal was sent more than two thirds of the TTL
ago is dropped from ``held`` by the keeper itself, before the database would let another engine
take it, even when the database cannot be reached at all. Fenced writes (``storage.writes``)
cover the rest: a process paused past its TTL closes nothing when it wakes.

It never crashes on a database outage (every statement is bounded well under a renewal period;
it keeps trying). On cancel it releases what it holds (shielded, bounded), so a graceful
shutdown hands over at once instead of after the TTL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

import attrs
import trio

from tickguard.storage import Database, DatabaseUnavailable, leases

log = logging.getLogger(__name__)

# The release on shutdown waits at most this long (seconds); past it the TTL hands over.
RELEASE_TIMEOUT_S = 2.0


class PartitionPlanner(Protocol):
    """Decides, once per keeper round, which partitions this process should hold (issue 18's
    balancer, ``actors.balance.Balancer``). Both calls may raise ``DatabaseUnavailable``;
    ``members_seen`` is how many live engines the last plan counted."""

    members_seen: int

    async def plan(self, held: Collection[int], *, timeout: float | None = None) -> list[int]: ...

    async def leave(self, *, timeout: float | None = None) -> None: ...


@attrs.frozen
class LeaseConfig:
    """``owner`` names this process in the lease rows (unique per process); ``partitions`` is
    ``ENGINE_PARTITIONS``; ``ttl_ms`` is ``ENGINE_LEASE_TTL_MS``. ``wanted`` returns the
    partitions this process should hold; None wants them all. ``balancer`` (issue 18), when
    given, decides instead, each round, from the database (and is told when the keeper stops);
    while the database cannot answer it, the keeper keeps what it holds and takes nothing."""

    owner: str = attrs.field(validator=attrs.validators.min_len(1))
    partitions: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    ttl_ms: int = attrs.field(default=10_000, validator=attrs.validators.gt(0))
    wanted: Callable[[], Sequence[int]] | None = None
    balancer: PartitionPlanner | None = attrs.field(default=None, eq=False)


@attrs.define
class LeaseStats:
    """Counters for /metrics: partitions acquired and lost (a renewal refused, or dropped by
    the local rule), renewals that failed (database away or too slow), what is held now."""

    acquired: int = 0
    lost: int = 0
    renew_failures: int = 0
    held: dict[int, int] = attrs.field(factory=dict)
    members: int | None = None  # live engines the balancer counted (None: no balancer)


class LeaseState:
    """What this process holds now, shared by the keeper (the only writer) and its readers."""

    def __init__(self) -> None:
        self._held: dict[int, int] = {}
        self._view = MappingProxyType(self._held)
        self._changed = trio.Event()

    @property
    def held(self) -> Mapping[int, int]:
        """Partition -> token of every lease held now: a live read-only view (a
        ``storage.writes.Fence`` can hold it and always reads the current tokens)."""
        return self._view

    async def wait_changed(self) -> None:
        """Return after the next change of ``held``."""
        await self._changed.wait()

    def _set(self, held: Mapping[int, int]) -> None:
        if held == self._held:
            return
        self._held.clear()
        self._held.update(held)
        self._changed.set()
        self._changed = trio.Event()


def overdue(renewed_at: Mapping[int, float], now: float, ttl_s: float) -> list[int]:
    """The partitions whose last successful renewal was sent more than ``ttl_s * 2/3`` before
    ``now`` (the keeper's local rule: give them up before the database lets anyone take them)."""
    limit = ttl_s * 2 / 3
    return sorted(p for p, at in renewed_at.items() if now - at >= limit)


async def run(
    db: Database,
    config: LeaseConfig,
    state: LeaseState,
    *,
    stats: LeaseStats | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the wanted leases until cancelled; ``started`` after the first attempt to acquire
    (whether or not it got anything). Never raises ``DatabaseUnavailable``."""
    keeper = _Keeper(db, config, state, stats or LeaseStats())
    try:
        await keeper.round()
        task_status.started()
        while True:
            await keeper.sleep()
            await keeper.round()
    finally:
        await keeper.release_all()


class _Keeper:
    def __init__(
        self, db: Database, config: LeaseConfig, state: LeaseState, stats: LeaseStats
    ) -> None:
        self.db = db
        self.config = config
        self.state = state
        self.stats = stats
        self.ttl_s = config.ttl_ms / 1000
        self.period_s = self.ttl_s / 3
        # Each statement gets well under a period, so a hung one cannot delay the local rule.
        self.timeout_s = self.period_s / 2
        self.held: dict[int, int] = {}
        self.renewed_at: dict[int, float] = {}  # trio time each renewal was SENT

    async def wanted(self) -> list[int]:
        if self.config.balancer is not None:
            try:
                planned: Sequence[int] = await self.config.balancer.plan(
                    list(self.held), timeout=self.timeout_s
                )
                self.stats.members = self.config.balancer.members_seen
            except DatabaseUnavailable as exc:
                log.warning("lease balancing skipped (keeping what is held): %s", exc)
                planned = list(self.held)
        elif self.config.wanted is None:
            return list(range(self.config.partitions))
        else:
            planned = self.config.wanted()
        return sorted({p for p in planned if 0 <= p < self.config.partitions})

    async def round(self) -> None:
        """Renew, drop what is overdue, release what is no longer wanted, acquire the rest."""
        await self.renew()
        self.drop_overdue()
        wanted = await self.wanted()
        unwanted = {p: t for p, t in self.held.items() if p not in wanted}
        if unwanted:
            self.forget(unwanted)
            await self.release(unwanted)
        await self.acquire([p for p in wanted if p not in self.held])
        self.publish()

    async def renew(self) -> None:
        if not self.held:
            return
        sent = trio.current_time()
        try:
            still = await leases.renew(
                self.db, self.held, self.config.owner, self.config.ttl_ms, timeout=self.timeout_s
            )
        except DatabaseUnavailable as exc:
            self.stats.renew_failures += 1
            log.warning("lease renewal failed: %s", exc)
            return
        lost = {p: t for p, t in self.held.items() if still.get(p) != t}
        if lost:
            log.warning("leases lost (taken over or expired): %s", sorted(lost))
            self.stats.lost += len(lost)
            self.forget(lost)
        for partition in still:
            if partition in self.held:
                self.renewed_at[partition] = sent

    def drop_overdue(self) -> None:
        late = overdue(self.renewed_at, trio.current_time(), self.ttl_s)
        if late:
            log.warning("leases dropped: not renewed within 2/3 of the TTL: %s", late)
            self.stats.lost += len(late)
            self.forget({p: self.held[p] for p in late})

    async def acquire(self, partitions: list[int]) -> None:
        if not partitions:
            return
        sent = trio.current_time()
        try:
            got = await leases.acquire(
                self.db, partitions, self.config.owner, self.config.ttl_ms, timeout=self.timeout_s
            )
        except DatabaseUnavailable as exc:
            log.warning("lease acquisition failed: %s", exc)
            return
        if got:
            log.info("leases acquired: %s", got)
        self.stats.acquired += len(got)
        self.held.update(got)
        self.renewed_at.update(dict.fromkeys(got, sent))

    def forget(self, partitions: Mapping[int, int]) -> None:
        """Stop acting on ``partitions`` now: published at once, before any statement that
        could hand them to another engine (a release) or take long (the next acquire)."""
        for partition in partitions:
            self.held.pop(partition, None)
            self.renewed_at.pop(partition, None)
        self.publish()

    def publish(self) -> None:
        self.state._set(self.held)
        self.stats.held = dict(self.held)

    async def sleep(self) -> None:
        """Until the next round, or earlier when a lease would pass the local rule first (the
        drop happens then even if the round's statements are slow)."""
        now = trio.current_time()
        wake = now + self.period_s
        if self.renewed_at:
            wake = min(wake, min(self.renewed_at.values()) + self.ttl_s * 2 / 3)
        with trio.move_on_at(wake):
            await trio.sleep_forever()
        self.drop_overdue()

    async def release(self, partitions: Mapping[int, int]) -> None:
        try:
            await leases.release(self.db, partitions, self.config.owner, timeout=self.timeout_s)
        except DatabaseUnavailable as exc:
            log.warning("lease release failed (they expire by TTL): %s", exc)

    async def release_all(self) -> None:
        """On the way out: nothing is held any more, and the rows are expired for the next
        owner (shielded, bounded; if the database is away they expire by TTL)."""
        held = dict(self.held)
        self.forget(held)
        balancer = self.config.balancer
        if not held and balancer is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT_S):
            try:
                if held:
                    await leases.release(
                        self.db, held, self.config.owner, timeout=RELEASE_TIMEOUT_S
                    )
                    log.info("leases released: %s", sorted(held))
                if balancer is not None:  # the others rebalance at once, not after the TTL
                    await balancer.leave(timeout=RELEASE_TIMEOUT_S)
            except DatabaseUnavailable as exc:
                log.warning("lease release failed (they expire by TTL): %s", exc)
