"""The follower actor (issue 17): hands every committed event of the log to its process, once.

When roles run in separate processes, an engine process learns of the positions an api process
created, and a gateway process of every event it must fan out, by following the event log
(``storage.tail``). The follower reads the log until caught up and hands each page to
``deliver``; then it waits for a wake-up (Redis, ``storage.bus``) or ``poll_s``, whichever
comes first, and reads again. The wake-up only saves latency: the poll is what makes a lost
Redis message, or no Redis at all, harmless.

It never writes, and a database outage never ends it: reads are retried with backoff, and the
tail keeps its place, so nothing is skipped nor delivered twice across the outage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import attrs
import trio

from tickguard.actors import backoff
from tickguard.storage.db import DatabaseUnavailable, Reader
from tickguard.storage.tail import DEFAULT_LIMIT, LogTail, TailEvent

log = logging.getLogger(__name__)

RETRY_BASE_S = 0.1  # first wait after a failed read; doubles per failure
RETRY_MAX_S = 5.0


@attrs.define
class FollowerStats:
    """Counters for /metrics; a supervisor may keep one across restarts."""

    starts: int = 0
    reads: int = 0  # pages read, including the empty one that says "caught up"
    events: int = 0  # events delivered
    batches: int = 0  # calls of ``deliver``
    failures: int = 0  # reads (or the start) that failed: the database was unavailable
    woken: int = 0  # rounds begun by a wake-up rather than the poll
    caught_up_at: float | None = None  # time.monotonic() of the last read that found no more

    @property
    def lag_s(self) -> float | None:
        """Seconds since the follower last had read everything up to the log's horizon (small
        while healthy; it grows through a database outage or a backlog). None before the first
        catch-up. A writer transaction that holds the horizon back does not show here."""
        return None if self.caught_up_at is None else time.monotonic() - self.caught_up_at


class _Wake:
    """The flag between the wake-up task and the read loop; replaced at each round."""

    def __init__(self) -> None:
        self.event = trio.Event()


async def run(
    db: Reader,
    deliver: Callable[[list[TailEvent]], None],
    *,
    wakeups: AsyncIterator[None] | None = None,
    poll_s: float = 0.5,
    stats: FollowerStats | None = None,
    limit: int = DEFAULT_LIMIT,
    tail: LogTail | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Follow the event log until cancelled.

    ``tail``, kept by the caller across restarts, makes a restarted follower go on from where
    the crashed one was (started once, never again): no event committed in between is lost.
    Without it each run starts a new tail.

    Starts the tail (events committed before that are not delivered) and only then reports
    started: a caller that loads its state after ``nursery.start`` misses nothing, and drops
    what it sees twice. Then, forever: reads pages of at most ``limit`` events until caught up,
    calling ``deliver(page)`` for each non-empty page in ``(tx, id)`` order (per user, seq
    order); ``deliver`` is synchronous and must not block. Between rounds it waits for the next
    item of ``wakeups`` or ``poll_s``, whichever comes first.

    ``wakeups`` is iterated with ``aiter`` at each start: ``Bus.wakeups(...)`` subscribes again
    for a restarted follower (a plain async generator, spent by the previous run, would give
    no more wake-ups; the poll still delivers).

    ``DatabaseUnavailable`` never ends it (retried with backoff, the tail keeps its place); an
    exception from ``deliver`` or ``wakeups`` does (the supervisor restarts it, from a new start).
    """
    stats = stats if stats is not None else FollowerStats()
    stats.starts += 1
    tail = tail if tail is not None else LogTail()
    outage = _Outage(stats)
    while not tail.started:
        try:
            await tail.start(db)
            break
        except DatabaseUnavailable as exc:
            await outage.failed(exc)
    outage.ended()
    wake = _Wake()
    async with trio.open_nursery() as nursery:
        if wakeups is not None:
            nursery.start_soon(_listen, wakeups, wake)
        task_status.started()
        while True:
            wake.event = trio.Event()  # a wake-up from now on asks for another round
            try:
                await _catch_up(tail, db, deliver, stats, limit)
            except DatabaseUnavailable as exc:
                await outage.failed(exc)
                continue
            outage.ended()
            with trio.move_on_after(poll_s):
                await wake.event.wait()
            if wake.event.is_set():
                stats.woken += 1


async def _catch_up(
    tail: LogTail,
    db: Reader,
    deliver: Callable[[list[TailEvent]], None],
    stats: FollowerStats,
    limit: int,
) -> None:
    while True:
        page = await tail.read(db, limit=limit)
        stats.reads += 1
        if not page:
            stats.caught_up_at = time.monotonic()
            return
        deliver(page)
        stats.batches += 1
        stats.events += len(page)


async def _listen(wakeups: AsyncIterator[None], wake: _Wake) -> None:
    # ``aiter``: a re-iterable source (``storage.bus.Wakeups``) subscribes anew for each run
    # of the follower; a plain iterator is itself.
    iterator = aiter(wakeups)
    try:
        async for _ in iterator:
            wake.event.set()
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await aclose()
    # An iterator that ended leaves the poll alone: the follower goes on without wake-ups.
    log.warning("the follower's wake-ups ended; following the log by polling only")


class _Outage:
    """Backoff between failed reads, and one log line per outage (not one per retry)."""

    def __init__(self, stats: FollowerStats) -> None:
        self._stats = stats
        self._failures = 0

    async def failed(self, error: DatabaseUnavailable) -> None:
        self._stats.failures += 1
        if self._failures == 0:
            log.warning("the follower cannot read the event log, retrying: %s", error)
        delay = backoff.exponential(self._failures, RETRY_BASE_S, RETRY_MAX_S)
        self._failures += 1
        await trio.sleep(delay)

    def ended(self) -> None:
        if self._failures:
            log.info("the follower reads the event log again after %d failures", self._failures)
            self._failures = 0
