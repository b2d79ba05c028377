"""The engine actor's protocol, with a small persistence stand-in answering over the Mailbox.

The stand-in keeps rows in a dict and answers CloseRequests the way persistence does
(closed / already_closed / not_found / failed); end-to-end tests with the real persistence
actor and PostgreSQL live elsewhere. Time is a MockClock, so backoffs cost nothing.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from positions_factory import open_position

from tickguard.actors import engine
from tickguard.actors.candles import Candle
from tickguard.actors.engine import EngineConfig, EngineStats
from tickguard.actors.mailbox import ActorUnavailable, Mailbox
from tickguard.actors.messages import (
    AdvanceWatermark,
    CloseOrder,
    CloseOutcome,
    CloseRequest,
    CloseResult,
    Position,
    Track,
    Untrack,
    Watermark,
)
from tickguard.actors.recovery import Trade, candle_window, trade_window
from tickguard.actors.triggers import Trigger
from tickguard.actors.window import TickWindow, WindowSlot

SYMBOL = "BTC-USD"
T0 = datetime(2024, 1, 1, tzinfo=UTC)
CONFIG = EngineConfig(close_timeout_s=5, retry_base_s=1, retry_max_s=8, load_timeout_s=5)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def at(second: int) -> datetime:
    return T0 + timedelta(seconds=second)


def position(
    side: str = "long",
    *,
    sl: str | None = None,
    tp: str | None = None,
    created: int = 0,
    symbol: str = SYMBOL,
) -> Position:
    return open_position(side, sl=sl, tp=tp, created_at=at(created), symbol=symbol)


class Persistence:
    """The rows, and a task answering CloseRequests on a Mailbox like the persistence actor."""

    def __init__(self, *positions: Position) -> None:
        self.rows: dict[uuid.UUID, Position] = {p.id: p for p in positions}
        self.mailbox: Mailbox[CloseRequest] = Mailbox("persistence")
        self.load_calls: list[str] = []
        self.fail: dict[uuid.UUID, int] = {}  # id -> how many times to answer FAILED
        self.fenced: set[uuid.UUID] = set()  # ids answered FENCED (the lease is not ours)
        self.errors: list[BaseException] = []  # answer whole requests with these, in turn
        self.silent = 0  # how many requests to take and never answer
        self._seen_send, self.seen = trio.open_memory_channel[tuple[float, CloseRequest]](math.inf)
        self.marks: list[Watermark] = []  # watermarks advanced on their own (issue 14)
        self.gate: trio.Semaphore | None = None  # if set: one release answers one request
        self.on_request: Callable[[CloseRequest], None] | None = None  # checks, before answering

    async def load_open(self, symbol: str) -> AsyncIterator[list[Position]]:
        self.load_calls.append(symbol)
        # Two pages, as storage.loading.open_positions would send them.
        rows = [p for p in self.rows.values() if p.symbol == symbol and p.status == "open"]
        yield rows[: len(rows) // 2]
        yield rows[len(rows) // 2 :]

    async def serve(self) -> None:
        while True:
            request = await self.mailbox.receive()
            if isinstance(request, AdvanceWatermark):
                self.marks.append(request.mark)
                continue
            self._seen_send.send_nowait((trio.current_time(), request))
            if self.on_request is not None:
                self.on_request(request)
            if self.gate is not None:
                await self.gate.acquire()
            if self.silent:
                self.silent -= 1
                self.mailbox.settle(request)
            elif self.errors:
                self.mailbox.answer(request, self.errors.pop(0))
            else:
                self.mailbox.answer(request, tuple(self._close(o) for o in request.orders))

    def _close(self, order: CloseOrder) -> CloseResult:
        if self.fail.get(order.position_id, 0) > 0:
            self.fail[order.position_id] -= 1
            return CloseResult(order.position_id, CloseOutcome.FAILED)
        if order.position_id in self.fenced:
            return CloseResult(order.position_id, CloseOutcome.FENCED)
        row = self.rows.get(order.position_id)
        if row is None:
            return CloseResult(order.position_id, CloseOutcome.NOT_FOUND)
        if row.status == "closed":
            return CloseResult(order.position_id, CloseOutcome.ALREADY_CLOSED, row)
        row = attrs.evolve(row, status="closed", close_price=order.price, close_reason=order.reason)
        self.rows[row.id] = row
        return CloseResult(order.position_id, CloseOutcome.CLOSED, row)

    async def next_request(self) -> tuple[float, CloseRequest]:
        with trio.fail_after(60):
            return await self.seen.receive()

    async def no_request_for(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            _, request = await self.seen.receive()
            pytest.fail(f"unexpected request {ids(request)}")


def ids(request: CloseRequest) -> set[uuid.UUID]:
    return {o.position_id for o in request.orders}


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a condition, with a deadline.

    Polls in virtual time (MockClock): wait_all_tasks_blocked would starve the autojump when
    the condition needs a backoff to elapse.
    """
    with trio.fail_after(60):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.001)


@attrs.define
class Harness:
    db: Persistence
    slot: WindowSlot
    inbox: Mailbox[Track | Untrack]
    stats: EngineStats
    scope: trio.CancelScope | None = None
    feed: Mailbox[Any] = attrs.field(factory=lambda: Mailbox("feed"))
    config: EngineConfig = CONFIG
    # position id -> the watermark of the window that triggers it (tests of the watermark rule)
    triggered: dict[uuid.UUID, Watermark] = attrs.field(factory=dict)

    def tick(self, price: str, second: int) -> None:
        self.slot.put(Decimal(price), second, at(second))

    def triggered_by(self, mark: Watermark) -> set[uuid.UUID]:
        """The positions triggered by windows up to ``mark``'s trade."""
        return {pid for pid, w in self.triggered.items() if w.trade_id <= mark.trade_id}


@asynccontextmanager
async def engine_running(
    *positions: Position, config: EngineConfig = CONFIG
) -> AsyncIterator[Harness]:
    db = Persistence(*positions)
    h = Harness(db, WindowSlot(SYMBOL), Mailbox("engine"), EngineStats(), config=config)
    db.on_request = partial(watermark_behind_commits, h)  # a no-op unless h.triggered is set
    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.serve)
        h.scope = await start_engine(nursery, h)
        yield h
        nursery.cancel_scope.cancel()


async def start_engine(nursery: trio.Nursery, h: Harness) -> trio.CancelScope:
    """Start (or restart) the engine in its own cancel scope, as the supervisor would."""

    async def supervised(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await inner.start(
                    partial(
                        engine.run,
                        SYMBOL,
                        h.slot,
                        h.inbox,
                        h.db.mailbox,
                        h.db.load_open,
                        config=h.config,
                        stats=h.stats,
                        feed=h.feed,
                    )
                )
                task_status.started(scope)

    return await nursery.start(supervised)


async def test_loads_at_start_and_sends_a_window_s_triggers_as_one_batch(autojump_clock) -> None:
    falling = [position(sl="90") for _ in range(3)]
    short_tp = position("short", tp="89")
    safe = position(sl="80", tp="120")
    async with engine_running(*falling, short_tp, safe) as h:
        assert h.db.load_calls == [SYMBOL]
        assert h.stats.positions_open == 5
        h.tick("95", 1)
        h.tick("88", 2)  # one window: low 88, last trade at second 2
        _, request = await h.db.next_request()
        assert request.source == "engine"
        assert ids(request) == {p.id for p in [*falling, short_tp]}
        by_id = {o.position_id: o for o in request.orders}
        for p in falling:
            # The window's last trade (id 2) is recorded as the close's trade (issue 17).
            assert by_id[p.id] == CloseOrder(
                p.id, Decimal("90"), "stop_loss", triggered_at=at(2), trade_id=2
            )
        assert by_id[short_tp.id] == CloseOrder(
            short_tp.id, Decimal("89"), "take_profit", triggered_at=at(2), trade_id=2
        )
        await until(lambda: h.stats.closes_confirmed == 4)
        assert (h.stats.stop_losses, h.stats.take_profits, h.stats.positions_open) == (3, 1, 1)
        assert h.stats.closes_pending == 0
        assert h.db.rows[safe.id].status == "open"


async def test_a_start_up_backlog_never_closes_a_position_younger_than_its_first_trade(
    autojump_clock,
) -> None:
    """Invariant 10 when the engine starts: the slot has gathered ticks while no engine took
    them (e.g. the first create on a symbol starts its engine, which loads that very position).
    An extreme from before a loaded position, merged with later ticks, must not close it; the
    positions older than the whole backlog are judged by it."""
    old = position(sl="90", created=0)
    young = position(sl="90", created=5)  # created after the backlog's first (extreme) trade
    db = Persistence(old, young)
    h = Harness(db, WindowSlot(SYMBOL), Mailbox("engine"), EngineStats())
    h.tick("85", 3)  # the extreme: before `young` existed
    h.tick("95", 6)  # merged into the same window, after it
    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.serve)
        h.scope = await start_engine(nursery, h)
        _, request = await h.db.next_request()
        assert ids(request) == {old.id}
        assert request.orders[0].triggered_at == at(6)
        h.tick("89", 7)  # a live window after `young` existed: it closes
        _, request = await h.db.next_request()
        assert ids(request) == {young.id}
        nursery.cancel_scope.cancel()


class GatedLoad(Persistence):
    """Persistence whose load_open waits for ``loading_may_end`` after its first page."""

    def __init__(self, *positions: Position) -> None:
        super().__init__(*positions)
        self.loading = trio.Event()
        self.loading_may_end = trio.Event()

    async def load_open(self, symbol: str) -> AsyncIterator[list[Position]]:
        async for page in super().load_open(symbol):
            yield page
            self.loading.set()
            await self.loading_may_end.wait()


async def test_a_stop_crossed_while_the_engine_loads_closes_the_position_that_started_it(
    autojump_clock,
) -> None:
    """The first create on a symbol starts its engine, which loads that very position. Ticks
    put during the load are newer than it: they are not merged with the older backlog (whose
    first trade predates the position), so the stop they cross closes it."""
    old = position(sl="90", created=0)
    young = position(sl="90", created=5)
    db = GatedLoad(old, young)
    h = Harness(db, WindowSlot(SYMBOL), Mailbox("engine"), EngineStats())
    h.tick("85", 3)  # before `young` existed: closes only `old`
    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.serve)
        nursery.start_soon(start_engine, nursery, h)
        await db.loading.wait()
        h.tick("89", 6)  # during the load, after `young` existed
        db.loading_may_end.set()
        _, request = await h.db.next_request()  # both backlog windows, judged in one go
        assert {(o.position_id, o.triggered_at) for o in request.orders} == {
            (old.id, at(3)),
            (young.id, at(6)),
        }
        nursery.cancel_scope.cancel()


async def test_only_failed_ids_are_retried_with_backoff(autojump_clock) -> None:
    a, b, c = (position(sl="90") for _ in range(3))
    async with engine_running(a, b, c) as h:
        h.db.fail[a.id] = 2
        h.tick("90", 1)
        t1, first = await h.db.next_request()
        assert ids(first) == {a.id, b.id, c.id}
        t2, second = await h.db.next_request()
        assert ids(second) == {a.id}
        assert t2 - t1 == pytest.approx(CONFIG.retry_base_s)
        t3, third = await h.db.next_request()
        assert ids(third) == {a.id}
        assert t3 - t2 == pytest.approx(2 * CONFIG.retry_base_s)
        await h.db.no_request_for(100)
        assert all(h.db.rows[p.id].status == "closed" for p in (a, b, c))
        assert (h.stats.closes_confirmed, h.stats.close_failures) == (3, 2)
        assert h.stats.closes_pending == 0


async def test_backoff_is_capped(autojump_clock) -> None:
    a = position(sl="90")
    async with engine_running(a) as h:
        h.db.fail[a.id] = 6
        h.tick("90", 1)
        times = [(await h.db.next_request())[0] for _ in range(7)]
        gaps = [round(later - earlier, 6) for earlier, later in zip(times, times[1:], strict=False)]
        assert gaps == [1, 2, 4, 8, 8, 8]


async def test_already_closed_and_not_found_are_not_retried(autojump_clock) -> None:
    closed_elsewhere, deleted, fresh = (position(sl="90") for _ in range(3))
    async with engine_running(closed_elsewhere, deleted, fresh) as h:
        # After the engine loaded them: a manual close commits, a row disappears.
        h.db.rows[closed_elsewhere.id] = attrs.evolve(closed_elsewhere, status="closed")
        del h.db.rows[deleted.id]
        h.tick("85", 1)
        _, request = await h.db.next_request()
        assert ids(request) == {closed_elsewhere.id, deleted.id, fresh.id}
        await h.db.no_request_for(100)
        assert (h.stats.closes_confirmed, h.stats.closes_lost_race) == (1, 2)
        assert h.stats.close_failures == 0


async def test_a_fenced_close_is_final_counted_and_not_retried(autojump_clock) -> None:
    fenced, fresh = position(sl="90"), position(sl="90")
    async with engine_running(fenced, fresh) as h:
        h.db.fenced.add(fenced.id)  # another engine holds the symbol's lease now (issue 18)
        h.tick("85", 1)
        _, request = await h.db.next_request()
        assert ids(request) == {fenced.id, fresh.id}
        await h.db.no_request_for(100)
        assert (h.stats.closes_confirmed, h.stats.closes_fenced) == (1, 1)
        assert (h.stats.closes_lost_race, h.stats.close_failures, h.stats.closes_pending) == (
            0,
            0,
            0,
        )
        assert h.db.rows[fenced.id].status == "open"


@pytest.mark.parametrize("failure", ["actor_unavailable", "error_answer", "no_answer"])
async def test_a_request_that_fails_as_a_whole_is_retried(autojump_clock, failure) -> None:
    a, b = position(sl="90"), position("short", sl="95")
    async with engine_running(a, b) as h:
        if failure == "actor_unavailable":
            h.db.errors.append(ActorUnavailable("persistence restarted"))
        elif failure == "error_answer":
            h.db.errors.append(RuntimeError("database unavailable"))
        else:
            h.db.silent = 1
        h.tick("90", 1)
        h.tick("95", 2)
        t1, first = await h.db.next_request()
        t2, second = await h.db.next_request()
        assert ids(first) == ids(second) == {a.id, b.id}
        waited = CONFIG.retry_base_s + (CONFIG.close_timeout_s if failure == "no_answer" else 0)
        assert t2 - t1 == pytest.approx(waited)
        await until(lambda: h.stats.closes_confirmed == 2)
        await h.db.no_request_for(100)


async def test_windows_and_tracks_flow_while_a_close_is_pending(autojump_clock) -> None:
    a = position(sl="90")
    b = position(sl="80", created=3)
    async with engine_running(a) as h:
        h.db.silent = 1  # the first request hangs until its timeout
        h.tick("90", 1)
        t1, first = await h.db.next_request()
        assert ids(first) == {a.id}
        for second, price in enumerate(["85", "84", "83"], start=2):
            h.tick(price, second)
            await until(lambda n=second: h.stats.windows_judged == n)
        assert h.stats.stop_losses == 1  # a was not judged again while its close is pending
        await h.inbox.send(Track(a))  # nor re-inserted by a late Track
        h.db.rows[b.id] = b  # committed, then tracked
        await h.inbox.send(Track(b))
        await until(lambda: h.stats.positions_open == 1)
        h.tick("79", 5)
        await until(lambda: h.stats.stop_losses == 2)
        assert trio.current_time() - t1 < CONFIG.close_timeout_s  # all while the request hung
        sent_after: list[uuid.UUID] = []
        while len(sent_after) < 2:
            _, request = await h.db.next_request()
            sent_after.extend(o.position_id for o in request.orders)
        assert sorted(sent_after) == sorted([a.id, b.id])  # each once more, no duplicates
        await until(lambda: h.stats.closes_confirmed == 2)


async def test_track_judges_the_pending_window_before_inserting(autojump_clock) -> None:
    # The position's created_at (second 0) is before the pending trade (second 10), as with a
    # clock skew between us and Coinbase: only the Track-first rule keeps that price from
    # closing it. Trio's scheduler picks either task first, so repeat.
    for _ in range(24):
        async with engine_running() as h:
            p = position(sl="90", created=0)
            h.tick("80", 10)
            h.inbox.send_nowait(Track(p))
            await until(lambda: h.stats.positions_open == 1 and h.stats.windows_judged == 1)
            h.tick("95", 11)
            await until(lambda: h.stats.windows_judged == 2)
            assert h.stats.stop_losses == 0
            h.tick("90", 12)
            _, request = await h.db.next_request()
            assert request.orders == (
                CloseOrder(p.id, Decimal("90"), "stop_loss", None, at(12), trade_id=12),
            )


async def test_a_trade_older_than_the_position_never_closes_it(autojump_clock) -> None:
    async with engine_running() as h:
        p = position(sl="90", created=100)
        await h.inbox.send(Track(p))
        await until(lambda: h.stats.positions_open == 1)
        h.tick("80", 40)  # the ticker right after a subscription ack: an old last trade
        await until(lambda: h.stats.windows_judged == 1)
        assert h.stats.stop_losses == 0
        h.tick("85", 100)
        _, request = await h.db.next_request()
        assert ids(request) == {p.id}


async def test_untrack_removes(autojump_clock) -> None:
    a, b = position(sl="90"), position(sl="90")
    async with engine_running(a, b) as h:
        await h.inbox.send(Untrack(a.id))
        await until(lambda: h.stats.positions_open == 1)
        h.tick("85", 1)
        _, request = await h.db.next_request()
        assert ids(request) == {b.id}


async def test_tracks_and_untracks_queued_by_the_thousand_all_take_effect(autojump_clock) -> None:
    """A cascade's Untracks (and a burst of creates' Tracks) queue up faster than the engine
    takes them; it handles them in runs without a schedule point each (``INBOX_DRAIN``): every
    one of them counts, in order, and windows are still judged in between."""
    n = 3 * engine.INBOX_DRAIN + 7
    kept = [position(sl="90") for _ in range(n)]
    gone = [position(sl="90") for _ in range(n)]
    async with engine_running() as h:
        for p in gone:
            h.inbox.send_nowait(Track(p))
        for p, q in zip(gone, kept, strict=True):
            h.inbox.send_nowait(Untrack(p.id))
            h.inbox.send_nowait(Track(q))
        h.tick("95", 1)  # taken while the inbox is worked through
        await until(lambda: h.inbox.pending() == 0 and h.stats.windows_judged >= 1)
        await until(lambda: h.stats.positions_open == n)
        h.tick("85", 2)
        closed: set[uuid.UUID] = set()
        while len(closed) < n:
            _, request = await h.db.next_request()
            closed |= ids(request)
        assert closed == {p.id for p in kept}


async def test_untrack_drops_a_pending_retry(autojump_clock) -> None:
    a = position(sl="90")
    async with engine_running(a) as h:
        h.db.fail[a.id] = 1
        h.tick("85", 1)
        await h.db.next_request()
        await until(lambda: h.stats.close_failures == 1)
        await h.inbox.send(Untrack(a.id))  # closed by another path meanwhile
        await until(lambda: h.stats.closes_pending == 0)
        await h.db.no_request_for(100)


async def test_a_restarted_engine_reloads_open_positions(autojump_clock) -> None:
    a, b = position(sl="90"), position(sl="90")
    async with engine_running(a) as h:
        assert h.scope is not None
        h.scope.cancel()  # the engine stops (a crash, as the supervisor sees it)
        await until(lambda: h.db.mailbox.pending() == 0)
        h.db.rows[b.id] = b  # created while the engine was down: no Track for it
        async with trio.open_nursery() as nursery:
            await start_engine(nursery, h)
            assert h.db.load_calls == [SYMBOL, SYMBOL]
            assert h.stats.starts == 2 and h.stats.positions_open == 2
            h.tick("85", 1)
            _, request = await h.db.next_request()
            assert ids(request) == {a.id, b.id}
            nursery.cancel_scope.cancel()


async def test_stopping_hands_over_unanswered_closes(autojump_clock) -> None:
    a, b = position(sl="90"), position(sl="90")
    db = Persistence(a, b)
    h = Harness(db, WindowSlot(SYMBOL), Mailbox("engine"), EngineStats())
    db.fail[a.id] = 1
    async with trio.open_nursery() as nursery:
        serving = trio.CancelScope()

        async def serve() -> None:
            with serving:
                await db.serve()

        nursery.start_soon(serve)
        engine_scope = await start_engine(nursery, h)
        h.tick("85", 1)
        await until(lambda: h.stats.close_failures == 1 and h.stats.closes_confirmed == 1)
        serving.cancel()  # persistence stops answering: a's retry is still waiting
        h.tick("80", 2)
        engine_scope.cancel()
    handed = db.mailbox.receive_nowait()
    assert handed.reply is None and handed.source == "engine"
    assert handed.orders == (CloseOrder(a.id, Decimal("90"), "stop_loss", None, at(1), trade_id=1),)
    assert h.stats.handed_over == 1 and h.stats.closes_pending == 0
    with pytest.raises(trio.WouldBlock):
        db.mailbox.receive_nowait()


async def test_load_open_that_hangs_fails_the_start(autojump_clock) -> None:
    async def hanging(symbol: str) -> AsyncIterator[list[Position]]:
        yield []
        await trio.sleep_forever()

    with pytest.raises(trio.TooSlowError):
        await engine.run(
            SYMBOL, WindowSlot(SYMBOL), Mailbox("e"), Mailbox("p"), hanging, config=CONFIG
        )


async def test_stopping_hands_over_a_batch_still_in_flight(autojump_clock) -> None:
    a = position(sl="90")
    db = Persistence(a)
    h = Harness(db, WindowSlot(SYMBOL), Mailbox("engine"), EngineStats())
    db.silent = 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.serve)
        engine_scope = await start_engine(nursery, h)
        h.tick("85", 1)
        _, request = await db.next_request()  # taken by persistence, never answered
        engine_scope.cancel()
        await until(lambda: h.stats.handed_over == 1)
        _, handed = await db.next_request()
        assert handed.reply is None and handed.orders == request.orders
        await until(lambda: db.rows[a.id].status == "closed")
        nursery.cancel_scope.cancel()


def feed_commands(h: Harness) -> list[tuple[str, str]]:
    out = []
    while True:
        try:
            command = h.feed.receive_nowait()
        except trio.WouldBlock:
            return out
        out.append((type(command).__name__, command.symbol))


async def test_the_feed_lets_a_symbol_go_when_its_last_position_closes(autojump_clock) -> None:
    a = position(sl="90")
    async with engine_running(a) as h:
        b = position(sl="80", created=1)
        await h.inbox.send(Untrack(a.id))  # closed manually: nothing left to watch
        await until(lambda: h.stats.positions_open == 0)
        await h.inbox.send(Track(b))  # a new position: watch the symbol again
        await until(lambda: h.stats.positions_open == 1)
        await h.inbox.send(Track(position(sl="70", created=2)))  # not idle before: no message
        await until(lambda: h.stats.positions_open == 2)
        assert feed_commands(h) == [("Unwatch", SYMBOL), ("Watch", SYMBOL)]


# ---------------------------------------------------------------- watermarks (issue 14)
async def test_a_quiet_window_advances_the_watermark_at_most_once_per_interval(
    autojump_clock,
) -> None:
    async with engine_running(position(sl="90")) as h:
        h.tick("100", 1)
        await trio.sleep(0.1)
        h.tick("101", 2)
        await until(lambda: len(h.db.marks) == 1)
        assert h.db.marks == [Watermark(SYMBOL, 2, at(2))]
        await trio.sleep(5 * CONFIG.watermark_interval_s)
        assert len(h.db.marks) == 1  # nothing judged since: nothing written
        h.tick("102", 3)
        await until(lambda: len(h.db.marks) == 2)
        assert h.db.marks[-1] == Watermark(SYMBOL, 3, at(3))


async def test_a_close_carries_the_watermark_and_a_failing_close_holds_it_back(
    autojump_clock,
) -> None:
    a, b = position(sl="90"), position(sl="80")
    async with engine_running(a, b) as h:
        h.tick("90", 1)
        _, first = await h.db.next_request()
        assert first.watermark == Watermark(SYMBOL, 1, at(1))  # commits with the close
        h.db.fail[b.id] = 3
        h.tick("80", 2)
        _, failed = await h.db.next_request()
        assert failed.watermark == Watermark(SYMBOL, 2, at(2))  # not committed: FAILED
        h.tick("100", 3)  # quiet, but b's close is still being retried
        await trio.sleep(3 * CONFIG.watermark_interval_s)
        retries = [(await h.db.next_request())[1] for _ in range(3)]
        # Each retry holds every unanswered close, so it may carry the latest watermark.
        assert [r.watermark for r in retries] == [Watermark(SYMBOL, 3, at(3))] * 3
        await until(lambda: h.db.rows[b.id].status == "closed")
        await trio.sleep(3 * CONFIG.watermark_interval_s)
        assert h.db.marks == []  # never written on its own while b's close was failing


async def test_a_position_tracked_during_a_recovery_joins_after_the_held_windows(
    autojump_clock,
) -> None:
    """Invariant 10 across a hold: a live window queued behind a recovery holds a price from
    before the position existed; it is judged before the position joins the index."""
    async with engine_running(position(sl="10")) as h:
        hold = h.slot.hold(0, 3)
        h.slot.put(Decimal("100"), 3, at(3), alone=True)
        h.slot.put(Decimal("80"), 4, at(4))
        h.slot.put(Decimal("100"), 8, at(8))  # merged with the 80 at 4: last_time 8
        late = position(sl="90", created=5)
        h.db.rows[late.id] = late
        h.inbox.send_nowait(Track(late))
        await trio.sleep(1)
        h.slot.deliver(hold, [])
        h.slot.release(hold)
        await until(lambda: h.stats.windows_judged >= 2)
        await trio.sleep(1)
        assert h.stats.positions_open == 2 and h.db.rows[late.id].status == "open"
        h.tick("89", 9)  # after it existed: closes it
        await until(lambda: h.db.rows[late.id].status == "closed")


def test_a_close_records_its_windows_trade_but_a_candles_none() -> None:
    """The event log's ``trade_id`` (issue 17): a window's last trade; none for a candle."""
    trigger = Trigger(uuid.uuid4(), "alice", "stop_loss", Decimal("90"))
    live = TickWindow.of(Decimal("86"), 76, at(1)).merge(Decimal("85"), 77, at(1))
    assert [o.trade_id for o in engine._orders([trigger], live, "level")] == [77]
    recovered = trade_window(Trade(78, Decimal("84"), at(2)))
    assert [o.trade_id for o in engine._orders([trigger], recovered, "trade")] == [78]
    minute = Candle(at(60), Decimal("80"), Decimal("95"), Decimal("85"))
    candle = candle_window(minute, 78)
    assert [o.trade_id for o in engine._orders([trigger], candle, "level")] == [None]


# ------------------------------------------------------- adaptive close batches (issue 16)
BATCHES = attrs.evolve(CONFIG, first_batch=4, batch_growth=2, max_batch=16)


def many(n: int, sl: str = "90") -> list[Position]:
    return [position(sl=sl) for _ in range(n)]


def watermark_behind_commits(h: Harness, request: CloseRequest) -> None:
    """A request's watermark never passes a close that is not committed (the stand-in's rows)
    or in this very request: every order triggered up to the watermark's trade is one of them."""
    mark = request.watermark
    if mark is None:
        return
    in_request = ids(request)
    for row in h.db.rows.values():
        if row.stop_loss is not None and row.status == "open" and row.id not in in_request:
            assert row.id not in h.triggered_by(mark), f"{row.id} is behind {mark}"


async def requests_until_all_closed(h: Harness, positions: list[Position]) -> list[CloseRequest]:
    """Every request sent until ``positions`` are closed (the stand-in checks each against the
    watermark rule as it takes it, before answering: ``engine_running``)."""
    requests = []
    with trio.fail_after(60):
        while True:
            try:
                _, request = h.db.seen.receive_nowait()
            except trio.WouldBlock:
                if all(h.db.rows[p.id].status == "closed" for p in positions):
                    return requests
                await trio.sleep(0.001)  # virtual time (MockClock)
                continue
            requests.append(request)


async def test_a_cascade_s_first_request_is_small_and_the_next_ones_grow_to_the_cap(
    autojump_clock,
) -> None:
    cascade = many(40)
    async with engine_running(*cascade, config=BATCHES) as h:
        h.triggered = {p.id: Watermark(SYMBOL, 1, at(1)) for p in cascade}
        h.tick("85", 1)  # one window triggers all 40
        requests = await requests_until_all_closed(h, cascade)
        assert [len(r.orders) for r in requests] == [4, 8, 16, 12]
        # Only the request that holds the last of them carries the window's watermark.
        assert [r.watermark for r in requests] == [None, None, None, Watermark(SYMBOL, 1, at(1))]
        sent = [o.position_id for r in requests for o in r.orders]
        assert sorted(sent) == sorted(p.id for p in cascade)  # each close sent once
        await until(lambda: h.stats.closes_confirmed == 40)
        assert h.stats.closes_pending == 0 and h.stats.close_failures == 0
        await h.db.no_request_for(10)


async def test_closes_ready_while_one_commits_go_next_in_a_batch_twice_as_large(
    autojump_clock,
) -> None:
    first, later = many(3, sl="90"), many(30, sl="80")
    async with engine_running(*first, *later, config=BATCHES) as h:
        h.db.gate = trio.Semaphore(0)
        h.triggered = {p.id: Watermark(SYMBOL, 1, at(1)) for p in first} | {
            p.id: Watermark(SYMBOL, 2, at(2)) for p in later
        }
        h.tick("89", 1)
        _, one = await h.db.next_request()
        assert ids(one) == {p.id for p in first} and one.watermark == Watermark(SYMBOL, 1, at(1))
        h.tick("79", 2)  # 30 more while the first request is in flight
        await trio.sleep(1)
        await h.db.no_request_for(1)  # one request in flight at a time
        assert h.stats.closes_pending == 33
        sizes = []
        for _ in range(3):
            h.db.gate.release()
            _, request = await h.db.next_request()
            watermark_behind_commits(h, request)
            sizes.append((len(request.orders), request.watermark))
        h.db.gate.release()
        # 2 x 3 = 6, then 12, then what is left (12 < the cap of 16); the watermark of the
        # second window only on the request that holds the last of its closes.
        assert sizes == [(6, None), (12, None), (12, Watermark(SYMBOL, 2, at(2)))]
        await until(lambda: all(h.db.rows[p.id].status == "closed" for p in later))
        await h.db.no_request_for(10)


async def test_a_failed_close_holds_the_watermark_back_across_split_batches(
    autojump_clock,
) -> None:
    cascade = many(20)
    async with engine_running(*cascade, config=BATCHES) as h:
        h.triggered = {p.id: Watermark(SYMBOL, 1, at(1)) for p in cascade}
        h.db.gate = trio.Semaphore(0)
        h.tick("85", 1)
        _, first = await h.db.next_request()
        assert len(first.orders) == 4 and first.watermark is None
        failing = first.orders[0].position_id
        h.db.fail[failing] = 2  # in the first batch: FAILED twice, then closes
        for _ in range(100):
            h.db.gate.release()
        requests = [first, *await requests_until_all_closed(h, cascade)]
        marked = [r for r in requests if r.watermark is not None]
        # No request carries the watermark while the failed close waits outside it; the ones
        # that do hold that close (its retries), and the failed ones did not advance it.
        assert marked and all(failing in ids(r) for r in marked)
        assert [len(r.orders) for r in requests[:3]] == [4, 8, 8]
        assert h.stats.close_failures == 2
        await until(lambda: h.stats.closes_confirmed == 20)


async def test_after_a_cascade_the_next_one_starts_small_again(autojump_clock) -> None:
    one, two = many(40, sl="90"), many(10, sl="80")
    async with engine_running(*one, *two, config=BATCHES) as h:
        h.triggered = {p.id: Watermark(SYMBOL, 1, at(1)) for p in one} | {
            p.id: Watermark(SYMBOL, 2, at(2)) for p in two
        }
        h.tick("85", 1)
        assert [len(r.orders) for r in await requests_until_all_closed(h, one)] == [4, 8, 16, 12]
        await trio.sleep(5)  # idle: nothing ready, nothing in flight
        h.tick("75", 2)
        assert [len(r.orders) for r in await requests_until_all_closed(h, two)] == [4, 6]


async def test_a_cascade_handed_over_on_stop_sends_every_unanswered_close_once(
    autojump_clock,
) -> None:
    cascade = many(30)
    db = Persistence(*cascade)
    db.gate = trio.Semaphore(0)
    h = Harness(db, WindowSlot(SYMBOL), Mailbox("engine"), EngineStats(), config=BATCHES)
    async with trio.open_nursery() as nursery:
        serving = trio.CancelScope()

        async def serve() -> None:
            with serving:
                await db.serve()

        nursery.start_soon(serve)
        engine_scope = await start_engine(nursery, h)
        h.tick("85", 1)
        _, first = await db.next_request()
        assert len(first.orders) == 4
        serving.cancel()  # the first request is never answered
        engine_scope.cancel()
    handed = db.mailbox.receive_nowait()
    assert handed.reply is None
    # The batch in flight and the 26 still ready, in one fire-and-forget request.
    assert sorted(o.position_id for o in handed.orders) == sorted(p.id for p in cascade)
    assert handed.watermark == Watermark(SYMBOL, 1, at(1))
    assert h.stats.handed_over == 30


async def test_default_batches_grow_eightfold_up_to_the_close_chunk(autojump_clock) -> None:
    cascade = many(3000)
    async with engine_running(*cascade, config=attrs.evolve(CONFIG, max_batch=1500)) as h:
        h.tick("85", 1)
        requests = await requests_until_all_closed(h, cascade)
        # 128, then 8 x 128 = 1,024, then the cap, then what is left.
        assert [len(r.orders) for r in requests] == [128, 1024, 1500, 348]
        assert [r.watermark is not None for r in requests] == [False, False, False, True]


async def test_a_position_tracked_late_is_judged_against_the_windows_after_its_creation(
    autojump_clock,
) -> None:
    """Split roles (issue 17): the Track of a position created by an api process arrives
    through the event log, after windows newer than the position were judged. With catch-up
    the engine judges it against those windows (and only those: an older extreme never closes
    it, invariant 10); without catch-up (one process) it waits for the next window."""
    late = position(sl="90", created=5)
    older_extreme = position(sl="84", created=5)
    config = attrs.evolve(CONFIG, catch_up_windows=8)
    async with engine_running(config=config) as h:
        h.tick("80", 3)  # before both existed
        await until(lambda: h.stats.windows_judged == 1)
        h.tick("89", 6)  # after: crosses `late`'s stop, not `older_extreme`'s
        await until(lambda: h.stats.windows_judged == 2)
        await h.inbox.send(Track(late))
        await h.inbox.send(Track(older_extreme))
        _, request = await h.db.next_request()
        assert list(request.orders) == [
            CloseOrder(late.id, Decimal("90"), "stop_loss", triggered_at=at(6), trade_id=6)
        ]
        await until(lambda: h.stats.caught_up_closes == 1)
        assert h.stats.positions_open == 1  # older_extreme is watched, not closed
    async with engine_running() as h:
        h.tick("89", 6)
        await until(lambda: h.stats.windows_judged == 1)
        await h.inbox.send(Track(late))
        await until(lambda: h.stats.positions_open == 1)
        await h.db.no_request_for(10)
        assert h.stats.caught_up_closes == 0
