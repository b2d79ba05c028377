"""The persistence actor: the only writer of position state, and the outbox's publisher.

Receives ``CreateRequest`` and ``CloseRequest`` (from web and engines) on its mailbox. Whatever
has queued up while it was busy is handled together: all creates in one transaction, all
closes of one source as one atomic batch (DESIGN.md invariants 1 and 2), so load turns into
fewer, larger transactions. A reply always means "committed" (or is an error / FAILED outcome).

After a commit it hands the committed events to fanout in commit order, then tells the symbol's
engine (``Track`` after the created event is queued, invariant 9; ``Untrack`` on every close),
answers the requests, and has the events marked published: a create's in line (the creates
arriving meanwhile form the next group), a close's in the background (a task of its own marks
everything queued in one statement, so a cascade's next transaction never waits for it); a mark
not written only republishes those events, which fanout drops. On start, and
after any database error (the commit may have happened with its acknowledgement lost), it first
publishes every event still marked unpublished, so no committed event is lost; fanout drops an
event it already delivered (by per-user ``seq``), so none is delivered twice.

It never waits on a WebSocket, an engine or the feed: fanout and engine mailboxes are unbounded.

It also keeps the event log bounded (issue 17): with ``event_retention`` set, a task of its own
deletes, every ``prune_interval_s``, the events of positions closed longer ago than that
(never an open position's, never an unpublished one): the actor stays the only writer.

Behind a fence (issue 18: this process's engines own partitions by lease), ``config.fence``
guards the engines' closes and watermarks: those of a partition whose lease this process no
longer holds are answered FENCED (counted, never retried) and change nothing. Closes from the
API (a user's manual close) need no lease and are never fenced.

One bad request never takes it down (invariant 13): a group that fails for any reason other
than the database being away is retried one request at a time, and the request that still
fails alone is answered ``WriteRejected``; everyone else's writes go on.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol

import attrs
import trio

from tickguard.actors import faults as fault_points
from tickguard.actors.faults import FaultPoints
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import (
    AdvanceWatermark,
    CloseOrder,
    CloseOutcome,
    CloseRequest,
    CloseResult,
    CreateRequest,
    Event,
    EventSource,
    FanoutMessage,
    PersistenceRequest,
    Position,
    Track,
    Untrack,
    Watermark,
    WriteRejected,
)
from tickguard.storage import Database, DatabaseUnavailable, eventlog, writes
from tickguard.storage.writes import Fence

log = logging.getLogger("tickguard.actors.persistence")


# Outcomes of a close that did not commit: a later piece's watermark must not pass them.
_NOT_COMMITTED = frozenset({CloseOutcome.FAILED, CloseOutcome.FENCED})


class EngineInboxes(Protocol):
    """Where Track/Untrack go: the supervisor's per-symbol engine registry."""

    def send(self, symbol: str, message: Track | Untrack) -> None: ...


@attrs.frozen
class PersistenceConfig:
    max_open_per_user: int = 1000
    max_batch: int = 2000  # requests grouped into one round
    # Closes per transaction: a 100k-position stop cascade commits in pieces that each finish
    # well inside the database call's timeout, and fanout delivers one piece while the next
    # one commits.
    close_chunk: int = 2500
    # Event-log retention (EVENT_RETENTION_DAYS): None keeps every event.
    event_retention: timedelta | None = None
    prune_interval_s: float = 3600.0
    prune_batch: int = 10_000  # events deleted per statement
    # The engines' leases (issue 18): None is the single process, where nothing is fenced.
    fence: Fence | None = None


@attrs.define
class PersistenceStats:
    transactions: int = 0
    requests: int = 0
    closes_by_reason: dict[str, int] = attrs.field(factory=dict)
    db_errors: int = 0
    rejected: int = 0  # requests answered WriteRejected
    watermark_writes: int = 0  # watermarks advanced on their own (nothing triggered)
    events_pruned: int = 0  # event-log rows deleted by retention
    closes_fenced: int = 0  # engine closes refused: their partition's lease is not ours
    watermarks_fenced: int = 0  # watermarks skipped for the same reason


async def run(
    inbox: Mailbox[PersistenceRequest],
    db: Database,
    fanout: Mailbox[FanoutMessage],
    engines: EngineInboxes,
    *,
    config: PersistenceConfig = PersistenceConfig(),
    stats: PersistenceStats | None = None,
    faults: FaultPoints | None = None,
    stopping: trio.Event | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled, or until ``stopping`` is set and the mailbox is drained."""
    stats = stats or PersistenceStats()
    actor = _Persistence(inbox, db, fanout, engines, config, stats, faults)
    await actor.recover_outbox()  # raises DatabaseUnavailable: the supervisor retries us
    async with trio.open_nursery() as nursery:
        if config.event_retention is not None:
            nursery.start_soon(prune_event_log, db, config, stats)
        nursery.start_soon(actor.mark_forever)
        task_status.started()
        while True:
            if stopping is not None and stopping.is_set() and inbox.pending() == 0:
                await actor.flush_marks()
                nursery.cancel_scope.cancel()
                return
            batch = await actor.next_batch(stopping)
            if batch:
                await actor.handle(batch)


async def prune_event_log(db: Database, config: PersistenceConfig, stats: PersistenceStats) -> None:
    """Every ``config.prune_interval_s`` (first at start), delete the events of positions closed
    longer than ``config.event_retention`` ago, a bounded statement at a time. A database
    error skips this round (the next one catches up); it never stops the actor."""
    assert config.event_retention is not None
    while True:
        try:
            while True:
                deleted = await eventlog.prune_closed(
                    db, config.event_retention, limit=config.prune_batch
                )
                stats.events_pruned += deleted
                if deleted:
                    log.info("pruned %d events of long-closed positions", deleted)
                if deleted < config.prune_batch:
                    break
        except DatabaseUnavailable as exc:
            log.warning("event-log pruning skipped: %s", exc)
        await trio.sleep(config.prune_interval_s)


class _Persistence:
    def __init__(
        self,
        inbox: Mailbox[PersistenceRequest],
        db: Database,
        fanout: Mailbox[FanoutMessage],
        engines: EngineInboxes,
        config: PersistenceConfig,
        stats: PersistenceStats,
        faults: FaultPoints | None,
    ) -> None:
        self.inbox = inbox
        self.db = db
        self.fanout = fanout
        self.engines = engines
        self.config = config
        self.stats = stats
        self.faults = faults
        self.outbox_dirty = False
        # Events handed to fanout, not yet marked published: ``mark_forever`` marks them in the
        # background, so the next transaction never waits for that round trip.
        self.unmarked: list[int] = []
        self._marks_due = trio.Event()
        self._marking = trio.Lock()

    async def next_batch(self, stopping: trio.Event | None) -> list[PersistenceRequest]:
        """Wait for one request (or for ``stopping``), then take whatever else is queued."""
        batch: list[PersistenceRequest] = []
        if stopping is None:
            batch.append(await self.inbox.receive())
        else:
            async with trio.open_nursery() as nursery:

                async def first() -> None:
                    batch.append(await self.inbox.receive())
                    nursery.cancel_scope.cancel()

                async def stop() -> None:
                    await stopping.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(first)
                nursery.start_soon(stop)
        while batch and len(batch) < self.config.max_batch:
            try:
                batch.append(self.inbox.receive_nowait())
            except trio.WouldBlock:
                break
        return batch

    async def handle(self, batch: list[PersistenceRequest]) -> None:
        if self.outbox_dirty:
            await self.recover_outbox_quietly()
        creates = [r for r in batch if isinstance(r, CreateRequest)]
        closes = [r for r in batch if isinstance(r, CloseRequest)]
        marks = [r.mark for r in batch if isinstance(r, AdvanceWatermark)]
        if creates:
            await self.create(creates)
        for source in ("api", "engine"):
            group = [r for r in closes if r.source == source]
            if group:
                await self.close(group)
        if marks:
            await self.advance(marks)

    async def advance(self, marks: Sequence[Watermark]) -> None:
        """Write watermarks whose windows triggered nothing. Lost if the database is away: a
        later one advances past it, and a stale watermark only makes a recovery fetch more."""
        try:
            fenced = await writes.advance_watermarks(self.db, marks, fence=self.config.fence)
        except DatabaseUnavailable as exc:
            self.database_failed(exc)
            return
        self.stats.watermark_writes += 1
        self.stats.watermarks_fenced += fenced

    async def create(self, requests: Sequence[CreateRequest]) -> None:
        try:
            results, events = await writes.create_positions(
                self.db, [r.new for r in requests], max_open_per_user=self.config.max_open_per_user
            )
        except DatabaseUnavailable as exc:
            self.database_failed(exc)
            for request in requests:
                self.inbox.answer(request, exc)
            return
        except Exception as exc:  # noqa: BLE001 - isolated below, never swallowed
            await self.isolate(requests, self.create, exc)
            return
        self.committed(len(requests))
        await fault_points.hit(self.faults, "persistence.after_commit")
        self.publish(events)
        for result in results:
            if not isinstance(result, Exception) and result.created:
                self.engines.send(result.position.symbol, Track(result.position))
        for request, result in zip(requests, results, strict=True):
            self.inbox.answer(request, result)
        # Creates mark in line: the creates that arrive meanwhile form the next, larger group.
        # In the background, the groups halved and a create cost 12% more CPU (issue 16,
        # docs/DECISIONS.md); a cascade's closes mark in the background, off their chain.
        await self.mark(events, now=True)

    async def isolate(
        self,
        requests: Sequence[Any],
        handle: Callable[[Sequence[Any]], Awaitable[None]],
        exc: Exception,
    ) -> None:
        """A group failed with ``exc`` (nothing of it committed): redo it one request at a time,
        so that only the request that fails alone is answered with an error."""
        if len(requests) > 1:
            for request in requests:
                await handle([request])
            return
        self.stats.rejected += 1
        log.error("request rejected: %s: %s", type(exc).__name__, exc, exc_info=exc)
        self.inbox.answer(requests[0], WriteRejected(f"{type(exc).__name__}: {exc}"))

    async def close(self, requests: Sequence[CloseRequest]) -> None:
        orders = [order for r in requests for order in r.orders]
        marks = [r.watermark for r in requests if r.watermark is not None]
        results: list[CloseResult] = []
        chunk = self.config.close_chunk
        for start in range(0, len(orders), chunk):
            piece = orders[start : start + chunk]
            # The watermarks commit with the last piece, and only if no earlier order failed or
            # was fenced (the lease can be taken again, with a new token, between two pieces):
            # a watermark never passes a close that did not commit.
            last = start + chunk >= len(orders)
            clean = all(r.outcome not in _NOT_COMMITTED for r in results)
            try:
                closed, events = await self.close_piece(
                    piece, requests[0].source, marks if last and clean else ()
                )
            except DatabaseUnavailable as exc:
                self.database_failed(exc)
                # This piece and the ones after it did not commit (or their acknowledgement was
                # lost: then the retry answers already_closed and the outbox has the events).
                results += [CloseResult(o.position_id, CloseOutcome.FAILED) for o in orders[start:]]
                break
            self.stats.transactions += 1
            await fault_points.hit(self.faults, "persistence.after_commit")
            self.publish(events)
            log_closes(closed, requests[0].source)
            for result in closed:
                if result.outcome is CloseOutcome.FENCED:
                    self.stats.closes_fenced += 1
                if result.outcome is CloseOutcome.CLOSED and result.position is not None:
                    self.untrack(result.position)
                    reason = result.position.close_reason or "unknown"
                    self.stats.closes_by_reason[reason] = (
                        self.stats.closes_by_reason.get(reason, 0) + 1
                    )
            results += closed
            await self.mark(events)
        self.stats.requests += len(requests)
        start = 0
        for request in requests:
            end = start + len(request.orders)
            self.inbox.answer(request, tuple(results[start:end]))
            start = end

    async def close_piece(
        self,
        piece: Sequence[CloseOrder],
        source: EventSource,
        marks: Sequence[Watermark] = (),
    ) -> tuple[list[CloseResult], list[Event]]:
        """Close ``piece`` (and advance ``marks``) in one transaction; if it fails for a reason
        other than the database being away, close its orders one by one so that only an order
        that fails alone is answered FAILED (and logged); the marks are then not written.
        Engine closes go behind ``config.fence``; the API's never do."""
        fence = self.config.fence if source == "engine" else None
        try:
            return await writes.close_positions(
                self.db, piece, source=source, watermarks=marks, fence=fence
            )
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - isolated below, never swallowed
            if len(piece) == 1:
                self.stats.rejected += 1
                log.error("close rejected: %s: %s", type(exc).__name__, exc, exc_info=exc)
                return [CloseResult(piece[0].position_id, CloseOutcome.FAILED)], []
        results: list[CloseResult] = []
        events: list[Event] = []
        for order in piece:
            closed, written = await self.close_piece([order], source)
            results += closed
            events += written
        return results, events

    def untrack(self, position: Position) -> None:
        self.engines.send(position.symbol, Untrack(position.id))

    def publish(self, events: Sequence[Event]) -> None:
        for event in events:
            self.fanout.send_nowait(event)

    async def mark(self, events: Sequence[Event], *, now: bool = False) -> None:
        """Queue published events to be marked published: ``mark_forever`` writes them in the
        background, or (``now``) this call does, with everything queued so far."""
        await fault_points.hit(self.faults, "persistence.before_mark_published")
        if events:
            self.unmarked += [e.id for e in events]
            if now:
                await self.flush_marks()
            else:
                self._marks_due.set()

    async def mark_forever(self) -> None:
        """Mark what ``mark`` queued, everything queued so far in one statement, until
        cancelled (a mark lost that way only republishes those events after a restart, and
        fanout or the session's seq floor drops them)."""
        while True:
            await self._marks_due.wait()
            self._marks_due = trio.Event()
            await self.flush_marks()

    async def flush_marks(self) -> None:
        """Mark every queued event published; returns once none is queued or in flight. When
        the database is away they stay unpublished there: the next request recovers the
        outbox (republishes and marks them; fanout drops what it already delivered)."""
        async with self._marking:
            ids, self.unmarked = self.unmarked, []
            if not ids:
                return
            try:
                await writes.mark_published(self.db, ids)
            except DatabaseUnavailable as exc:
                self.database_failed(exc)

    def committed(self, requests: int) -> None:
        self.stats.transactions += 1
        self.stats.requests += requests

    def database_failed(self, exc: DatabaseUnavailable) -> None:
        self.stats.db_errors += 1
        self.outbox_dirty = True
        log.warning("database unavailable: %s", exc)

    async def recover_outbox(self) -> None:
        """Publish every committed event not yet marked published, oldest first.

        Created positions among them are tracked again, closed ones untracked: their commit
        acknowledgement may have been lost, so nobody told fanout or the engine.
        """
        while True:
            events = await writes.unpublished_events(self.db)
            if not events:
                break
            created = [e for e in events if e.type == "position.created"]
            closed = [e for e in events if e.type == "position.closed"]
            self.publish(events)
            for position in await _positions_of(self.db, created):
                if position.status == "open":
                    self.engines.send(position.symbol, Track(position))
            for position in await _positions_of(self.db, closed):
                self.untrack(position)
            await writes.mark_published(self.db, [e.id for e in events])
            log.info("published %d events from the outbox", len(events))
        self.unmarked = []
        self.outbox_dirty = False

    async def recover_outbox_quietly(self) -> None:
        try:
            await self.recover_outbox()
        except DatabaseUnavailable as exc:
            self.database_failed(exc)


# Up to this many closes committed together are logged one INFO line each; a larger batch (a
# stop cascade) is one INFO line with its counts, and each close at DEBUG, so that a 100k
# cascade does not write 100k INFO lines while the engine waits for the writer.
CLOSES_LOGGED_EACH = 10


def log_closes(results: Sequence[CloseResult], source: EventSource) -> None:
    """Log the positions that one committed transaction closed (see ``CLOSES_LOGGED_EACH``)."""
    closed = [
        r.position for r in results if r.outcome is CloseOutcome.CLOSED and r.position is not None
    ]
    if not closed:
        return
    each = logging.INFO if len(closed) <= CLOSES_LOGGED_EACH else logging.DEBUG
    if each == logging.DEBUG:
        counts = Counter(f"{p.symbol} {p.close_reason}" for p in closed)
        log.info(
            "closed %d positions (source %s): %s",
            len(closed),
            source,
            ", ".join(f"{what} x{n}" for what, n in sorted(counts.items())),
        )
    if log.isEnabledFor(each):
        for p in closed:
            log.log(
                each,
                "closed position %s %s %s at %s (source %s)",
                p.id,
                p.symbol,
                p.close_reason,
                # Without the column's trailing zeros: 66000, not 66000.00000000.
                "?" if p.close_price is None else f"{p.close_price.normalize():f}",
                source,
            )


async def _positions_of(db: Database, events: Sequence[Event]) -> list[Position]:
    return await writes.positions_by_id(db, [e.position_id for e in events if e.position_id])
