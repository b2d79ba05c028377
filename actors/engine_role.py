"""The engine role of a split deployment (issues 17 and 18, DESIGN.md "Beyond one process").

The symbol space is cut into ``ENGINE_PARTITIONS`` partitions (``actors.partitions``), each a
PostgreSQL lease row renewed within ``ENGINE_LEASE_TTL_MS`` (``actors.lease``). Every engine
process announces itself and holds its fair share of the partitions (``actors.balance``); an
engine judges a symbol only while it holds that symbol's partition. With one partition (stage
2) one engine leads and the others stand by.

While a process holds at least one partition it runs a *term*: a supervisor of its own with the
engine side of the tree, built afresh, so nothing of an earlier term (windows, indexes, pending
closes) survives into the next one. Inside a term the engines follow ownership (stage 3): when a
partition is gained, the engines of its symbols with open positions start (each loads its
positions; the feed's first ticker is a gap recovered from the durable watermark) and its
``COINBASE_PRODUCTS`` are subscribed; when one is lost (or taken anew with another token), its
engines stop and the feed drops its symbols at once. Log events of symbols not owned are
ignored: their owner reads them from the log too.

    Supervisor "term"
      follower     the event log's tail (started first): creates and manual closes made by api
                   processes, as Track/Untrack for the engines
      persistence  the term's writer: the engines' closes and watermarks, fenced by the term's
                   token (a close the database finds under another token changes nothing)
      notifier     wakes gateways (Redis) after each commit
      feed         the Coinbase connection; recovery fetches a gap's trades (the term's start
                   is a gap: the watermark tells from where)
      engines      one engine per symbol with open positions, loaded when the term starts
      prices       publishes each symbol's last price to Redis (api processes read it for a
                   create without entryPrice)

The term ends when the last partition is lost (cancelled at once: its closes would be fenced
anyway) or when the process stops (drained in order, then the leases are released so the
others take over without waiting for the TTL).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import attrs
import trio

from tickguard.actors import children as children_specs
from tickguard.actors import engine, follower, notifier, persistence, recovery
from tickguard.actors.balance import Balancer
from tickguard.actors.engines import EngineDirectory
from tickguard.actors.faults import FaultPoints
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.lease import LeaseState
from tickguard.actors.mailbox import ActorUnavailable, Mailbox, ask
from tickguard.actors.messages import (
    CloseRequest,
    Drop,
    FanoutMessage,
    FeedCommand,
    PersistenceRequest,
    Pin,
    RecoverGap,
    Track,
    Untrack,
)
from tickguard.actors.partitions import partition_of
from tickguard.actors.supervision import ChildSpec, RestartPolicy, Supervisor
from tickguard.actors.window import WindowSlots
from tickguard.config import Settings
from tickguard.storage import Database, DatabaseUnavailable, loading, writes
from tickguard.storage.bus import Bus
from tickguard.storage.tail import LogTail, TailEvent
from tickguard.storage.writes import Fence

log = logging.getLogger("tickguard.actors.engine_role")

# Stage 2 of the seed's scaling path: one lease covers every symbol (ENGINE_PARTITIONS=1).
LEASE_PARTITIONS = 1
# How many recent windows an engine keeps for positions tracked late (EngineConfig).
CATCH_UP_WINDOWS = 1024
PRICE_INTERVAL_S = 0.25  # last prices are published at most this often
DRAIN_TIMEOUT_S = 10.0  # one empty request through persistence, when partitions move


@attrs.define
class EngineRole:
    """What outlives the terms: counters and states /ready and /metrics read."""

    lease: LeaseState
    partitions: int = LEASE_PARTITIONS  # ENGINE_PARTITIONS
    balancer: Balancer | None = None
    engine_stats: dict[str, engine.EngineStats] = attrs.field(factory=dict)
    persistence_stats: persistence.PersistenceStats = attrs.field(
        factory=persistence.PersistenceStats
    )
    recovery_stats: recovery.RecoveryStats = attrs.field(factory=recovery.RecoveryStats)
    follower_stats: follower.FollowerStats = attrs.field(factory=follower.FollowerStats)
    feed_status: FeedStatus = attrs.field(factory=FeedStatus)
    terms: int = 0
    # The symbols this process owns now: its engines' and its pinned COINBASE_PRODUCTS.
    symbols: tuple[str, ...] = ()

    # The tokens the current term acts on (its fence, and ``owns``): partition -> the token
    # its engines were started under. Kept by the term's ownership task, which follows the
    # keeper's ``held``; the database's fence check covers the moment it takes to follow.
    tokens: dict[int, int] = attrs.field(factory=dict)

    def owns(self, symbol: str) -> bool:
        """Whether this process judges ``symbol`` now (its partition's engines run here)."""
        return partition_of(symbol, self.partitions) in self.tokens

    def report(self) -> dict[str, Any]:
        held = dict(self.lease.held)
        return {
            "engine": {
                "leader": bool(held),
                "partitions": sorted(held),
                "partitionsTotal": self.partitions,
                "members": self.balancer.members_seen if self.balancer is not None else None,
                "terms": self.terms,
                "symbols": sorted(s for s in self.symbols if self.owns(s)) if held else [],
            }
        }


async def run(
    settings: Settings,
    db: Database,
    bus: Bus,
    role: EngineRole,
    *,
    faults: FaultPoints | None = None,
    policy: RestartPolicy = RestartPolicy(),
    recovery_config: recovery.RecoveryConfig | None = None,
    stopping: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold terms while any partition is held, until ``stopping`` is set."""
    task_status.started()
    while not stopping.is_set():
        held = await _lease_or_stop(role.lease, stopping)
        if held is None:
            return
        role.terms += 1
        log.info("engine partitions acquired %s: starting term %d", sorted(held), role.terms)
        lost = await _term(settings, db, bus, role, faults, policy, recovery_config, stopping)
        if lost:
            log.warning("engine partitions all lost: standing by")
        role.symbols = ()


async def _lease_or_stop(lease: LeaseState, stopping: trio.Event) -> dict[int, int] | None:
    """What is held once anything is, or None when ``stopping`` is set first."""
    while not stopping.is_set():
        if lease.held:
            return dict(lease.held)
        with trio.move_on_after(0.05):  # stopping is checked at least this often
            await lease.wait_changed()
    return None


async def _term(
    settings: Settings,
    db: Database,
    bus: Bus,
    role: EngineRole,
    faults: FaultPoints | None,
    policy: RestartPolicy,
    recovery_config: recovery.RecoveryConfig | None,
    stopping: trio.Event,
) -> bool:
    """One term; True when it ended because every partition was lost."""
    slots = WindowSlots()
    persistence_box: Mailbox[PersistenceRequest] = Mailbox("persistence")
    notify_box: Mailbox[FanoutMessage] = Mailbox("notifier")
    feed_box: Mailbox[FeedCommand] = Mailbox("feed")
    recovery_box: Mailbox[RecoverGap] = Mailbox("recovery")
    engines = EngineDirectory(
        db,
        slots,
        persistence_box,
        feed_box,
        engine_config=children_specs.engine_config(settings, catch_up_windows=CATCH_UP_WINDOWS),
        faults=faults,
        stats=role.engine_stats,
        owns=role.owns,
    )
    grace_s = settings.shutdown_grace_ms / 1000
    # A live view: a batch is fenced by the tokens the term acts on when it is written.
    role.tokens.clear()
    fence = Fence(role.tokens, role.partitions)
    # The follower starts first: what commits after its start reaches the engines through it,
    # what committed before is in the database when each engine loads (duplicates are ignored).
    to_intake, from_follower = trio.open_memory_channel[list[TailEvent]](math.inf)
    children = [
        ChildSpec(
            "follower",
            functools.partial(
                follower.run,
                db.read_only(),
                to_intake.send_nowait,
                wakeups=bus.wakeups(notifier.EVENTS_TOPIC),
                stats=role.follower_stats,
                tail=LogTail(),  # a restarted follower goes on from where it was
            ),
        ),
        ChildSpec("intake", functools.partial(_intake, engines, db, from_follower)),
        children_specs.persistence_spec(
            settings,
            db,
            persistence_box,
            notify_box,
            engines,
            stats=role.persistence_stats,
            faults=faults,
            fence=fence,
            prune=False,  # the api processes keep the log bounded
        ),
        ChildSpec("notifier", functools.partial(notifier.run, notify_box, bus)),
        children_specs.feed_spec(
            settings,
            slots,
            feed_box,
            role.feed_status,
            recovery_box,
            faults=faults,
            always=(),  # nothing always subscribed: the owned partitions' products are pinned
        ),
        children_specs.recovery_spec(
            settings,
            db,
            recovery_box,
            slots,
            stats=role.recovery_stats,
            config=recovery_config,
        ),
        ChildSpec("engines", engines.supervisor.run, graceful=True, grace_s=grace_s),
        ChildSpec("prices", functools.partial(_publish_prices, slots, bus, role.owns)),
    ]
    term = Supervisor(
        children,
        policy,
        stop_order=[
            "feed",
            "recovery",
            "follower",
            "intake",
            "engines",
            "persistence",
            "notifier",
            "prices",
        ],
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(term.run)
        lost = trio.Event()
        ownership = _Ownership(
            role, engines, feed_box, persistence_box, settings.coinbase_products, db
        )

        async def watch_lease() -> None:
            await ownership.follow()
            lost.set()

        nursery.start_soon(watch_lease)
        with trio.CancelScope() as waiting:
            nursery.start_soon(_set_when, stopping, waiting)
            await lost.wait()
        if lost.is_set():
            nursery.cancel_scope.cancel()
            return True
        await term.shutdown()
        nursery.cancel_scope.cancel()
    return False


class _Ownership:
    """Makes a term's engines and feed follow the partitions held (the keeper's live view)."""

    def __init__(
        self,
        role: EngineRole,
        engines: EngineDirectory,
        feed_box: Mailbox[FeedCommand],
        persistence_box: Mailbox[PersistenceRequest],
        products: tuple[str, ...],
        db: Database,
        *,
        retry_s: float = 0.5,
    ) -> None:
        self.role = role
        self.engines = engines
        self.feed_box = feed_box
        self.persistence_box = persistence_box
        self.products = products
        self.db = db
        self.retry_s = retry_s
        self.current: dict[int, int] = {}  # what the engines and the feed follow now

    def of(self, symbols: Any, partitions: Any) -> set[str]:
        return {s for s in symbols if partition_of(s, self.role.partitions) in partitions}

    async def follow(self) -> None:
        """Until nothing is held: on every change, stop what was lost, start what was gained."""
        while True:
            held = dict(self.role.lease.held)
            accepted = self.role.tokens
            if not held:
                accepted.clear()
                return
            lost = {p for p, t in self.current.items() if held.get(p) != t}
            gained = {p for p, t in held.items() if self.current.get(p) != t}
            if lost:
                # A partition taken anew (another token) is lost and gained: its engines
                # restart and load again, its symbols are recovered from the watermark.
                for partition in lost:
                    accepted.pop(partition, None)
                stopped = self.of(list(self.engines.mailboxes), lost)
                await self.engines.stop(sorted(stopped))
                self.feed_box.send_nowait(Drop(frozenset(stopped | self.of(self.products, lost))))
                log.info("engine partitions lost %s: stopped %s", sorted(lost), sorted(stopped))
                if stopped:
                    # What the stopped engines handed over is written (and fenced) before a
                    # token of a new holding is accepted: an order of an earlier holding never
                    # commits under a later one.
                    await self.drain_persistence()
            if lost or gained:
                self.feed_box.send_nowait(Pin(frozenset(self.of(self.products, held))))
            if gained:
                accepted.update({p: held[p] for p in gained})
                symbols = await self.open_symbols()
                self.engines.start(sorted(self.of(symbols, gained)))
                log.info("engine partitions gained %s", sorted(gained))
            self.current = held
            self.role.symbols = tuple(
                sorted(set(self.engines.mailboxes) | self.of(self.products, held))
            )
            with trio.move_on_after(0.5):
                await self.role.lease.wait_changed()

    async def drain_persistence(self) -> None:
        """Until every request queued before now has been handled: two empty requests in a
        row (the second is in a later batch, so the first's whole batch is done)."""
        for _ in range(2):
            while True:
                try:
                    await ask(
                        self.persistence_box,
                        lambda reply: CloseRequest((), "engine", reply=reply),
                        DRAIN_TIMEOUT_S,
                    )
                    break
                except (ActorUnavailable, trio.TooSlowError) as exc:
                    log.warning("engine ownership: persistence not drained (%r); again", exc)
                    await trio.sleep(self.retry_s)

    async def open_symbols(self) -> list[str]:
        while True:
            try:
                return await loading.open_symbols(self.db)
            except DatabaseUnavailable as exc:
                log.warning("engine ownership: %s; retrying in %.1f s", exc, self.retry_s)
                await trio.sleep(self.retry_s)


async def _set_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _intake(
    engines: EngineDirectory,
    db: Database,
    batches: trio.MemoryReceiveChannel[list[TailEvent]],
    *,
    retry_s: float = 0.5,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The event log's creates and closes, in log order, as the engines' Track/Untrack.

    A created position is read back from the database (the event names it; the row has every
    field the engine needs) and tracked only while it is still open. A close is passed on only
    to a symbol that has an engine (an Untrack would otherwise start one). A batch is kept
    until it is handed over: a database outage delays it, never drops it.
    """
    task_status.started()
    async for batch in batches:
        created = [e.position_id for e in batch if e.type == "position.created"]
        while True:
            try:
                rows = await writes.positions_by_id(db, created) if created else []
                break
            except DatabaseUnavailable as exc:
                log.warning("engine intake: %s; retrying in %.1f s", exc, retry_s)
                await trio.sleep(retry_s)
        positions = {p.id: p for p in rows}
        for event in batch:
            if event.type == "position.created":
                position = positions.get(event.position_id)
                if position is not None and position.status == "open":
                    engines.send(position.symbol, Track(position))
            elif event.symbol in engines.mailboxes:
                engines.send(event.symbol, Untrack(event.position_id))


async def _publish_prices(
    slots: WindowSlots,
    bus: Bus,
    owns: Callable[[str], bool],
    *,
    interval_s: float = PRICE_INTERVAL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Each owned symbol's last price, to Redis, when it changed (at most every
    ``interval_s``)."""
    task_status.started()
    published: dict[str, Decimal] = {}
    while True:
        for symbol, slot in slots.items():
            if not owns(symbol):
                published.pop(symbol, None)  # published again once owned again
                continue
            price = slot.last_price
            if price is not None and published.get(symbol) != price:
                await bus.set_price(symbol, price)
                published[symbol] = price
        await trio.sleep(interval_s)
