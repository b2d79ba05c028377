"""The engine actor: one per symbol, closes that symbol's positions when a window triggers them.

It owns the symbol's open positions (a ``TriggerIndex``) and nothing else. It takes windows from
its ``WindowSlot`` (never blocking the feed, which only puts), follows Track/Untrack from
persistence, and hands triggered positions to persistence as ``CloseRequest`` batches. Closing
runs in its own task, so a slow or failing persistence never stops the engine from taking
windows; triggered positions stay out of the index while their close is pending, so they are
never judged twice nor sent twice at the same time.

Shutdown and restarts: when the engine is cancelled (or crashes), every close it triggered and
has not seen answered is handed to persistence fire-and-forget (``reply=None``). That includes a
batch whose request was in flight, since the engine cannot tell whether it reached persistence's
mailbox before the cancel; a duplicate is answered ``already_closed`` and emits nothing
(invariant 2). What persistence does not commit before it stops stays open in the database:
it is reloaded on the next start (invariant 6) and closes when a window crosses its level
again; a price that came back inside the bracket meanwhile does not close it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, Literal

import attrs
import trio

from tickguard.actors import backoff
from tickguard.actors import faults as fault_points
from tickguard.actors.faults import FaultPoints
from tickguard.actors.mailbox import Mailbox, ask
from tickguard.actors.messages import (
    AdvanceWatermark,
    CloseOrder,
    CloseOutcome,
    CloseRequest,
    CloseResult,
    FeedCommand,
    PersistenceRequest,
    Position,
    Track,
    Untrack,
    Unwatch,
    Watch,
    Watermark,
)
from tickguard.actors.triggers import Load, Trigger, TriggerIndex, judge_linear
from tickguard.actors.window import TickWindow, WindowSlot

log = logging.getLogger(__name__)

# The symbol's open positions, a page at a time (storage.loading.open_positions).
LoadOpen = Callable[[str], AsyncIterator[list[Position]]]


@attrs.frozen
class EngineConfig:
    """Timing of the engine's round trips to persistence and to the database, in seconds."""

    close_timeout_s: float = 10.0  # one CloseRequest round trip; past it the batch is retried
    retry_base_s: float = 0.5  # first retry delay of a failed close; doubles per attempt
    retry_max_s: float = 30.0  # cap of the retry delay; failed closes are retried forever
    load_timeout_s: float = 30.0  # load_open at start; past it the engine fails (and restarts)
    # A watermark whose windows triggered nothing is written at most this often (issue 14).
    watermark_interval_s: float = 1.0
    # Close price of a recovered trigger: the level, or the recovered trade's price.
    gap_fill: Literal["level", "trade"] = "level"
    # Adaptive close batches (issue 16): a request holds at most ``batch_growth`` times the
    # previous one's closes (at least ``first_batch``, at most ``max_batch``), so the first
    # closes of a stop cascade commit (and reach their users) after a small transaction while
    # the rest queue up. Growing 8x, not 2x: small transactions cost more per close (measured
    # in BENCHMARKS.md), so the batches reach persistence's ``close_chunk`` (2,500) quickly.
    first_batch: int = 128
    batch_growth: int = 8
    max_batch: int = 2500
    # Split roles (issue 17): a Track reaches an engine process through the event log, after
    # windows newer than the position may already have been judged. The engine keeps this many
    # recent windows and judges a tracked position against those made only of trades after its
    # creation before it joins the index. 0 (one process: Track follows the commit at once)
    # keeps none.
    catch_up_windows: int = 0


@attrs.define
class EngineStats:
    """Counters for /metrics; the supervisor keeps one per symbol across engine restarts."""

    starts: int = 0
    positions_open: int = 0  # watched by the index (not counting closes pending)
    windows_judged: int = 0
    ticks_judged: int = 0
    stop_losses: int = 0
    take_profits: int = 0
    closes_pending: int = 0  # triggered, not yet answered closed/already_closed/not_found
    closes_confirmed: int = 0  # persistence answered CLOSED
    closes_lost_race: int = 0  # ALREADY_CLOSED or NOT_FOUND: someone else closed it first
    close_failures: int = 0  # orders answered FAILED, or in a request that failed as a whole
    closes_fenced: int = 0  # FENCED: this process no longer holds the symbol's lease; not retried
    handed_over: int = 0  # orders sent fire-and-forget when the engine stopped
    recovered_windows: int = 0  # windows of trades fetched after a gap (issue 14)
    recovered_closes: int = 0  # triggers judged from them
    caught_up_closes: int = 0  # positions tracked late, closed by a window judged before
    last_window_latency_s: float | None = None  # time spent judging the last window
    last_window_time: datetime | None = None  # its last trade time

    @property
    def triggers(self) -> int:
        return self.stop_losses + self.take_profits


async def run(
    symbol: str,
    slot: WindowSlot,
    inbox: Mailbox[Track | Untrack],
    persistence: Mailbox[PersistenceRequest],
    load_open: LoadOpen,
    *,
    config: EngineConfig = EngineConfig(),
    stats: EngineStats | None = None,
    feed: Mailbox[FeedCommand] | None = None,
    faults: FaultPoints | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the engine of ``symbol`` until cancelled.

    Receives: windows from ``slot`` (take only), Track/Untrack from ``inbox``. Sends:
    CloseRequest batches to ``persistence``. On start it loads the symbol's open positions with
    ``load_open(symbol)`` (bounded by ``config.load_timeout_s``) and only then reports started.
    Never blocks the feed, never writes the database itself, never judges a position against a
    window made only of trades older than it (invariant 10).
    """
    stats = stats if stats is not None else EngineStats()
    closer = _Closer(symbol, persistence, config, stats, faults)
    engine = _Engine(
        symbol, TriggerIndex(), closer, stats, config.gap_fill, config.catch_up_windows
    )
    load = Load()
    # The ticks pending now came before this load began; the ones put during the load may be
    # newer than the position a create started this engine for. Kept apart, each backlog window
    # is judged against the positions older than its own first trade (below), so a stop crossed
    # during the load still closes the position that started the engine.
    slot.cut()
    with trio.fail_after(config.load_timeout_s), _collector_paused():
        # The index keeps only what the rule reads; each page's full rows go before the next,
        # and the indexes are sorted once, at the end.
        async for page in load_open(symbol):
            load.add(engine.watchable(page))
            del page
    engine.watch_load(load)
    # Invariant 10 at start: ticks that piled up in the slot while no engine took them (the
    # symbol had no engine yet, or this one was restarting) can be older than a position loaded
    # just now (an engine started by a create loads that very position). Judge each backlog
    # window only against positions older than its first trade, before any live window.
    while (backlog := slot.take_nowait()) is not None:
        engine.judge(backlog, created_before=backlog.first_time)
    stats.starts += 1
    log.info(
        "engine %s started with %d open position%s",
        symbol,
        stats.positions_open,
        "" if stats.positions_open == 1 else "s",
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(closer.run)
        nursery.start_soon(closer.advance_watermarks)
        nursery.start_soon(_take_windows, slot, engine)
        nursery.start_soon(_follow_inbox, inbox, slot, engine, feed)
        task_status.started()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a start-up builds its index.

    A load creates hundreds of thousands of long-lived objects, and every collection triggered
    meanwhile walks all of them (it doubled the load time of 100,000 positions). Reference
    counting still frees each page; only cycles wait until the collector is back on.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:  # an engine loading concurrently may have paused it first
            gc.enable()


async def _take_windows(slot: WindowSlot, engine: _Engine) -> None:
    while True:
        engine.judge(await slot.take())


# Messages the inbox task handles in a row without a schedule point: persistence sends an
# Untrack for every close, so a cascade's come by the thousand, and each ``receive`` would be
# one trip through the scheduler. Bounded, so that windows are still taken in between.
INBOX_DRAIN = 512


async def _follow_inbox(
    inbox: Mailbox[Track | Untrack],
    slot: WindowSlot,
    engine: _Engine,
    feed: Mailbox[FeedCommand] | None,
) -> None:
    while True:
        _follow(await inbox.receive(), slot, engine, feed)
        for _ in range(INBOX_DRAIN):
            try:
                message = inbox.receive_nowait()
            except trio.WouldBlock:
                break
            _follow(message, slot, engine, feed)


def _follow(
    message: Track | Untrack,
    slot: WindowSlot,
    engine: _Engine,
    feed: Mailbox[FeedCommand] | None,
) -> None:
    """One Track or Untrack (synchronous: nothing runs in between, as if received alone)."""
    # The feed keeps a symbol subscribed while its engine watches anything: the last close
    # lets it go (after the feed's linger), the next Track brings it back. Both come through
    # this one inbox, in order, so a create racing the unsubscribe is never lost.
    was_idle = engine.idle()
    if isinstance(message, Track):
        # Invariant 10: the pending window holds prices from before this position existed;
        # judge it against the positions that were already there, then insert.
        while (pending := slot.take_nowait()) is not None:
            engine.judge(pending)
        # A gap recovery still running holds windows of older prices back: the position
        # joins the index once they (and everything queued before it) are judged.
        position = message.position
        if slot.then(functools.partial(engine.watch_deferred, position.id)):
            engine.defer(position)
        elif not engine.catch_up(position):
            engine.watch(position)
    elif isinstance(message, Untrack):
        engine.unwatch(message.position_id)
    else:
        log.error("engine %s: ignoring unexpected message %r", engine.symbol, message)
    if feed is not None and was_idle != engine.idle():
        feed.send_nowait(Unwatch(engine.symbol) if engine.idle() else Watch(engine.symbol))


class _Engine:
    """The engine's state between awaits: the index and what it hands to the closer."""

    def __init__(
        self,
        symbol: str,
        index: TriggerIndex,
        closer: _Closer,
        stats: EngineStats,
        gap_fill: Literal["level", "trade"] = "level",
        catch_up_windows: int = 0,
    ):
        self.symbol = symbol
        self._index = index
        self._closer = closer
        self._stats = stats
        self._gap_fill = gap_fill
        # Tracked while a recovery held older windows back: watched once those are judged.
        self._deferred: dict[uuid.UUID, Position] = {}
        # The last judged windows, for positions tracked late (EngineConfig.catch_up_windows).
        self._recent: collections.deque[TickWindow] = collections.deque(maxlen=catch_up_windows)

    def catch_up(self, position: Position) -> bool:
        """Judge a newly tracked ``position`` against the recent windows made only of trades
        after it was created (invariant 10), oldest first; True when one triggered it (its
        close is handed to the closer and it is not watched)."""
        if position.symbol != self.symbol or position.status != "open":
            return False
        if position.id in self._index:  # watched already: it saw those windows
            return False
        if position.id in self._closer:
            return True
        for window in self._recent:
            if window.first_time <= position.created_at:
                continue
            triggers = judge_linear([position], window)
            if triggers:
                self._closer.submit(_orders(triggers, window, self._gap_fill))
                self._stats.caught_up_closes += 1
                if triggers[0].reason == "stop_loss":
                    self._stats.stop_losses += 1
                else:
                    self._stats.take_profits += 1
                return True
        return False

    def defer(self, position: Position) -> None:
        """Watch ``position`` later (``watch_deferred``), unless it is untracked first."""
        self._deferred[position.id] = position

    def watch_deferred(self, position_id: uuid.UUID) -> None:
        position = self._deferred.pop(position_id, None)
        if position is not None:
            self.watch(position)

    def watch(self, position: Position) -> None:
        """Insert (or refresh) an open position of this symbol; anything else is ignored."""
        self.watch_all([position])

    def watch_all(self, positions: Iterable[Position]) -> None:
        """``watch`` for several positions, indexed in one pass (TriggerIndex.add_many)."""
        self._index.add_many(self.watchable(positions))
        self._stats.positions_open = len(self._index)

    def watch_load(self, load: Load) -> None:
        """Index what the start-up gathered (TriggerIndex.add_load)."""
        self._index.add_load(load)
        self._stats.positions_open = len(self._index)

    def watchable(self, positions: Iterable[Position]) -> list[Position]:
        """The positions this engine may watch: open, of its symbol, not already triggered."""
        watchable = []
        for position in positions:
            if position.symbol != self.symbol or position.status != "open":
                log.warning(
                    "engine %s: not watching %s (%s, %s)",
                    self.symbol,
                    position.id,
                    position.symbol,
                    position.status,
                )
            elif position.id not in self._closer:  # triggered, close pending: judged once
                watchable.append(position)
        return watchable

    def idle(self) -> bool:
        """Nothing watched (a close still outstanding needs no more prices)."""
        return len(self._index) == 0 and not self._deferred

    def unwatch(self, position_id: uuid.UUID) -> None:
        """The position closed by some path: stop watching it and drop any retry of its close."""
        if self._index.remove(position_id):
            self._stats.positions_open = len(self._index)
        if self._deferred:
            self._deferred.pop(position_id, None)
        self._closer.forget(position_id)

    def judge(self, window: TickWindow, *, created_before: datetime | None = None) -> None:
        """Judge one window and hand what it triggered to the closer, as one batch."""
        started = time.perf_counter()
        triggers = self._index.judge(window, created_before=created_before)
        if self._recent.maxlen:
            self._recent.append(window)
        if triggers:
            self._closer.submit(_orders(triggers, window, self._gap_fill))
        # Everything up to this trade is judged; what it triggered is now the closer's.
        self._closer.judged = Watermark(self.symbol, window.last_trade_id, window.last_time)
        stats = self._stats
        if window.recovered:
            stats.recovered_windows += 1
            stats.recovered_closes += len(triggers)
        stats.windows_judged += 1
        stats.ticks_judged += window.count
        stats.stop_losses += sum(1 for t in triggers if t.reason == "stop_loss")
        stats.take_profits += sum(1 for t in triggers if t.reason == "take_profit")
        stats.positions_open = len(self._index)
        stats.last_window_time = window.last_time
        stats.last_window_latency_s = time.perf_counter() - started


def _orders(
    triggers: Iterable[Trigger], window: TickWindow, gap_fill: Literal["level", "trade"]
) -> list[CloseOrder]:
    """The closes of one window's triggers, at the level; a recovered window of one trade with
    ``gap_fill="trade"`` closes at that trade's price, the first beyond the level. A recovered
    candle (count 0: no trade of its own, actors/recovery.py) closes at the level."""
    at_trade = window.recovered and gap_fill == "trade" and window.count == 1
    at, recovered = window.last_time, window.recovered
    # A recovered candle has no trade of its own (its id is the trade before it).
    trade_id = window.last_trade_id if window.count else None
    if at_trade:
        return [
            CloseOrder(t.position_id, window.last, t.reason, None, at, recovered, trade_id)
            for t in triggers
        ]
    # Positional: a cascade builds 10,000 of these before its first request leaves.
    return [
        CloseOrder(t.position_id, t.price, t.reason, None, at, recovered, trade_id)
        for t in triggers
    ]


class _Closer:
    """Hands triggered closes to persistence, one request at a time, retrying only FAILED ids.

    Each order is in exactly one place: ready (to send), in flight (one request, awaiting its
    reply) or waiting (a failed close, until its backoff is due). Orders that become ready while
    a request is in flight go out in the next request, which holds at most ``batch_growth``
    times as many closes as the previous one (at least ``first_batch``, at most ``max_batch``):
    a stop cascade's first request is small, so its closes commit and reach their users quickly,
    and the batches grow while each one commits. What a request cannot hold stays ready for the
    next one.

    A request carries the watermark of the last judged window only when it holds every close
    not yet answered (nothing ready or waiting outside it), so the watermark never passes a
    close that has not committed.
    """

    def __init__(
        self,
        symbol: str,
        persistence: Mailbox[PersistenceRequest],
        config: EngineConfig,
        stats: EngineStats,
        faults: FaultPoints | None = None,
    ) -> None:
        self._symbol = symbol
        self._persistence = persistence
        self._config = config
        self._stats = stats
        self._faults = faults
        self._ready: dict[uuid.UUID, CloseOrder] = {}
        self._in_flight: dict[uuid.UUID, CloseOrder] = {}
        self._waiting: dict[uuid.UUID, tuple[CloseOrder, float]] = {}  # order, due time
        self._attempts: dict[uuid.UUID, int] = {}
        self._last_batch = 0  # closes in the previous request: the next may hold more
        self._wake = trio.Event()
        self._handed_over = False
        self.judged: Watermark | None = None  # the last window judged (set by the engine)
        self._written: Watermark | None = None  # the last watermark sent to persistence

    def __contains__(self, position_id: object) -> bool:
        return (
            position_id in self._ready
            or position_id in self._in_flight
            or position_id in self._waiting
        )

    def submit(self, orders: Iterable[CloseOrder]) -> None:
        """Queue new closes to send as soon as no request is in flight. Never blocks."""
        for order in orders:
            self._ready[order.position_id] = order
        self._count_pending()
        self._wake.set()
        if self._handed_over:
            # The closer already ended (the engine is going down) while the window task was
            # still judging: nobody will send these, so hand them over now.
            self._hand_over()

    def forget(self, position_id: uuid.UUID) -> None:
        """Drop a close not yet sent or waiting for a retry (the position closed elsewhere).

        A close in flight is left to its reply; if that reply is FAILED, the retry is
        answered already_closed, which is harmless.
        """
        # Most calls find nothing (the Untrack of a close this closer sent): no count then.
        if not (self._ready or self._waiting or self._attempts):
            return
        self._ready.pop(position_id, None)
        self._waiting.pop(position_id, None)
        self._attempts.pop(position_id, None)
        self._count_pending()

    async def run(self) -> None:
        """Send due closes until cancelled; on the way out, hand over what is unanswered."""
        try:
            while True:
                await self._until_due()
                await self._send(self._take_due())
        finally:
            self._hand_over()

    async def _until_due(self) -> None:
        while not self._ready and self._next_due() > trio.current_time():
            self._last_batch = 0  # idle: the next cascade starts with a small request again
            with trio.move_on_at(self._next_due()):
                await self._wake.wait()
            self._wake = trio.Event()

    def _next_due(self) -> float:
        return min((due for _, due in self._waiting.values()), default=math.inf)

    def batch_limit(self) -> int:
        """How many closes the next request may hold: ``batch_growth`` times the previous
        request's, within ``[first_batch, max_batch]``."""
        config = self._config
        grown = config.batch_growth * self._last_batch
        return max(1, min(config.max_batch, max(config.first_batch, grown)))

    def _take_due(self) -> list[CloseOrder]:
        """The next request's closes: due retries first (the oldest), then ready ones in the
        order they were triggered, up to ``batch_limit``; the rest stay where they are."""
        now = trio.current_time()
        limit = self.batch_limit()
        batch: list[CloseOrder] = []
        for position_id, (order, due) in list(self._waiting.items()):
            if len(batch) >= limit:
                break
            if due <= now:
                del self._waiting[position_id]
                batch.append(order)
        for position_id in list(itertools.islice(self._ready, max(0, limit - len(batch)))):
            batch.append(self._ready.pop(position_id))
        self._in_flight = {order.position_id: order for order in batch}
        self._last_batch = len(batch)
        return batch

    def _mark(self) -> Watermark | None:
        """The watermark a request may carry: the last judged window, when the request holds
        every close not yet answered (nothing ready or waiting for a retry outside it)."""
        if self._ready or self._waiting or self.judged is None or self.judged == self._written:
            return None
        return self.judged

    async def advance_watermarks(self) -> None:
        """Every ``watermark_interval_s``, write the watermark of windows that triggered
        nothing (closes carry theirs); only while no close is outstanding."""
        while True:
            await trio.sleep(self._config.watermark_interval_s)
            self._advance_alone()

    def _advance_alone(self) -> None:
        mark = self.judged
        if mark is None or mark == self._written or self._pending():
            return
        try:
            self._persistence.send_nowait(AdvanceWatermark(mark))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return  # a later one advances it
        self._written = mark

    def _pending(self) -> int:
        return len(self._ready) + len(self._in_flight) + len(self._waiting)

    async def _send(self, batch: list[CloseOrder]) -> None:
        orders = tuple(batch)
        mark = self._mark()
        # Outside the try: an injected fault here crashes the engine instead of a retry.
        await fault_points.hit(self._faults, "engine.before_close_batch")
        try:
            results = await ask(
                self._persistence,
                lambda reply: CloseRequest(
                    orders=orders, source="engine", reply=reply, watermark=mark
                ),
                timeout=self._config.close_timeout_s,
            )
            failed = self._settle(orders, results)
            if mark is not None and not failed:
                self._written = mark  # committed with these closes
        # Persistence answered with an error, died holding the request (ActorUnavailable), or
        # did not answer in time (TooSlowError): the whole batch is retried, nothing is lost.
        except Exception as exc:
            log.warning(
                "engine %s: close request of %d failed (%r); retrying",
                self._symbol,
                len(orders),
                exc,
            )
            failed = list(orders)
        await fault_points.hit(self._faults, "engine.after_close_reply")
        self._in_flight = {}
        self._retry_later(failed)
        self._count_pending()

    def _settle(self, orders: tuple[CloseOrder, ...], results: Any) -> list[CloseOrder]:
        """Count the outcomes; returns the orders to retry (FAILED, or missing from the reply)."""
        if not isinstance(results, tuple) or not all(isinstance(r, CloseResult) for r in results):
            raise TypeError(f"a CloseRequest was answered with {type(results).__name__}")
        outcomes = {r.position_id: r.outcome for r in results}
        failed: list[CloseOrder] = []
        for order in orders:
            outcome = outcomes.get(order.position_id, CloseOutcome.FAILED)
            if outcome is CloseOutcome.FAILED:
                failed.append(order)
                continue
            self._attempts.pop(order.position_id, None)
            if outcome is CloseOutcome.CLOSED:
                self._stats.closes_confirmed += 1
            elif outcome is CloseOutcome.FENCED:
                # Final but not a confirmation: the partition's new owner judges the position.
                self._stats.closes_fenced += 1
            else:
                self._stats.closes_lost_race += 1
        return failed

    def _retry_later(self, failed: list[CloseOrder]) -> None:
        now = trio.current_time()
        for order in failed:
            attempt = self._attempts.get(order.position_id, 0) + 1
            self._attempts[order.position_id] = attempt
            delay = backoff.exponential(
                attempt - 1, self._config.retry_base_s, self._config.retry_max_s
            )
            self._waiting[order.position_id] = (order, now + delay)
        self._stats.close_failures += len(failed)

    def _hand_over(self) -> None:
        """Send every unanswered close fire-and-forget; synchronous, so it runs while cancelled."""
        self._handed_over = True
        orders = [*self._in_flight.values(), *self._ready.values()]
        orders.extend(order for order, _ in self._waiting.values())
        self._in_flight, self._ready, self._waiting = {}, {}, {}
        self._count_pending()
        if not orders:
            self._advance_alone()
            return
        mark = None if self.judged == self._written else self.judged
        try:
            self._persistence.send_nowait(
                CloseRequest(tuple(orders), source="engine", watermark=mark)
            )
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.warning(
                "engine %s: could not hand over %d closes (%r); they are redone on next start",
                self._symbol,
                len(orders),
                exc,
            )
            return
        self._stats.handed_over += len(orders)
        log.info("engine %s: handed over %d closes", self._symbol, len(orders))

    def _count_pending(self) -> None:
        self._stats.closes_pending = self._pending()
