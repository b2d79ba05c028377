"""The engine role of a split deployment (issue 17, DESIGN.md "Beyond one process").

An engine process judges prices only while it holds the engine lease (``actors.lease``): one
PostgreSQL row renewed within ``ENGINE_LEASE_TTL_MS``. A second engine process waits as a
standby and takes over when the lease expires. Each holding is a *term*: a supervisor of its
own with the engine side of the tree, built afresh, so nothing of an earlier term (windows,
indexes, pending closes) survives into the next one:

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

The term ends when the lease is lost (cancelled at once: its closes would be fenced anyway)
or when the process stops (drained in order, then the lease is released so the standby takes
over without waiting for the TTL).
"""

from __future__ import annotations

import functools
import logging
import math
from decimal import Decimal
from typing import Any

import attrs
import trio

from tickguard.actors import children as children_specs
from tickguard.actors import engine, follower, notifier, persistence, recovery
from tickguard.actors.engines import EngineDirectory
from tickguard.actors.faults import FaultPoints
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.lease import LeaseState
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import (
    FanoutMessage,
    FeedCommand,
    PersistenceRequest,
    RecoverGap,
    Track,
    Untrack,
)
from tickguard.actors.supervision import ChildSpec, RestartPolicy, Supervisor
from tickguard.actors.window import WindowSlots
from tickguard.config import Settings
from tickguard.storage import Database, DatabaseUnavailable, writes
from tickguard.storage.bus import Bus
from tickguard.storage.tail import LogTail, TailEvent
from tickguard.storage.writes import Fence

log = logging.getLogger("tickguard.actors.engine_role")

# Stage 2 of the seed's scaling path: one lease covers every symbol (issue 18 splits it).
LEASE_PARTITIONS = 1
# How many recent windows an engine keeps for positions tracked late (EngineConfig).
CATCH_UP_WINDOWS = 1024
PRICE_INTERVAL_S = 0.25  # last prices are published at most this often


@attrs.define
class EngineRole:
    """What outlives the terms: counters and states /ready and /metrics read."""

    lease: LeaseState
    engine_stats: dict[str, engine.EngineStats] = attrs.field(factory=dict)
    persistence_stats: persistence.PersistenceStats = attrs.field(
        factory=persistence.PersistenceStats
    )
    recovery_stats: recovery.RecoveryStats = attrs.field(factory=recovery.RecoveryStats)
    follower_stats: follower.FollowerStats = attrs.field(factory=follower.FollowerStats)
    feed_status: FeedStatus = attrs.field(factory=FeedStatus)
    terms: int = 0
    symbols: tuple[str, ...] = ()  # the symbols the current term's engines own

    def report(self) -> dict[str, Any]:
        held = dict(self.lease.held)
        return {
            "engine": {
                "leader": bool(held),
                "partitions": sorted(held),
                "terms": self.terms,
                "symbols": sorted(self.symbols) if held else [],
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
    """Hold terms while the lease is held, until ``stopping`` is set."""
    task_status.started()
    while not stopping.is_set():
        token = await _lease_or_stop(role.lease, stopping)
        if token is None:
            return
        role.terms += 1
        log.info("engine lease acquired (token %d): starting term %d", token, role.terms)
        lost = await _term(
            settings, db, bus, role, token, faults, policy, recovery_config, stopping
        )
        if lost:
            log.warning("engine lease lost (token %d): standing by", token)
        role.symbols = ()


async def _lease_or_stop(lease: LeaseState, stopping: trio.Event) -> int | None:
    """The token of partition 0 once it is held, or None when ``stopping`` is set first."""
    while not stopping.is_set():
        token = lease.held.get(0)
        if token is not None:
            return token
        with trio.move_on_after(0.05):  # stopping is checked at least this often
            await lease.wait_changed()
    return None


async def _term(
    settings: Settings,
    db: Database,
    bus: Bus,
    role: EngineRole,
    token: int,
    faults: FaultPoints | None,
    policy: RestartPolicy,
    recovery_config: recovery.RecoveryConfig | None,
    stopping: trio.Event,
) -> bool:
    """One term; True when it ended because the lease was lost."""
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
    )
    grace_s = settings.shutdown_grace_ms / 1000
    fence = Fence({0: token}, LEASE_PARTITIONS)
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
            settings, slots, feed_box, role.feed_status, recovery_box, faults=faults
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
        ChildSpec("prices", functools.partial(_publish_prices, slots, bus)),
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
        role.symbols = tuple(engines.mailboxes)
        lost = trio.Event()

        async def watch_lease() -> None:
            while role.lease.held.get(0) == token:
                role.symbols = tuple(engines.mailboxes)
                with trio.move_on_after(0.5):
                    await role.lease.wait_changed()
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
    *,
    interval_s: float = PRICE_INTERVAL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Each symbol's last price, to Redis, when it changed (at most every ``interval_s``)."""
    task_status.started()
    published: dict[str, Decimal] = {}
    while True:
        for symbol, slot in slots.items():
            price = slot.last_price
            if price is not None and published.get(symbol) != price:
                await bus.set_price(symbol, price)
                published[symbol] = price
        await trio.sleep(interval_s)
