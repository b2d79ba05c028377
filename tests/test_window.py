"""The window slot: conflation on put, swap on take, and the stale ticker kept apart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import attrs
import trio
import trio.testing

from tickguard.actors.window import TickWindow, WindowSlot

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(second: int) -> datetime:
    return T0 + timedelta(seconds=second)


def test_ticks_between_takes_merge_into_one_window() -> None:
    slot = WindowSlot("BTC-USD")
    for i, price in enumerate(["100", "97.5", "103", "101"]):
        slot.put(Decimal(price), 10 + i, at(i))
    window = slot.take_nowait()
    assert window is not None
    assert (window.low, window.high, window.last) == (
        Decimal("97.5"),
        Decimal("103"),
        Decimal("101"),
    )
    assert (window.count, window.first_trade_id, window.last_trade_id) == (4, 10, 13)
    assert (window.first_time, window.last_time) == (at(0), at(3))
    assert slot.take_nowait() is None
    assert slot.last_price == Decimal("101")


def test_a_tick_put_alone_is_never_merged_with_fresh_ticks() -> None:
    slot = WindowSlot("ETH-USD")
    slot.put(Decimal("3000"), 1, at(0))
    slot.put(Decimal("2000"), 2, at(-300), alone=True)  # the last trade, five minutes old
    slot.put(Decimal("2990"), 3, at(1))
    slot.put(Decimal("2995"), 4, at(2))
    windows = []
    while (window := slot.take_nowait()) is not None:
        windows.append(window)
    assert [(w.low, w.high, w.count, w.last_time) for w in windows] == [
        (Decimal("3000"), Decimal("3000"), 1, at(0)),
        (Decimal("2000"), Decimal("2000"), 1, at(-300)),
        (Decimal("2990"), Decimal("2995"), 2, at(2)),
    ]


def test_a_cut_keeps_the_pending_window_apart_from_later_ticks() -> None:
    slot = WindowSlot("BTC-USD")
    slot.cut()  # nothing pending: a no-op
    slot.put(Decimal("100"), 1, at(0))
    slot.put(Decimal("90"), 2, at(1))
    slot.cut()
    slot.put(Decimal("95"), 3, at(2))
    slot.put(Decimal("96"), 4, at(3))
    windows = []
    while (window := slot.take_nowait()) is not None:
        windows.append(window)
    assert [(w.low, w.high, w.count, w.first_time) for w in windows] == [
        (Decimal("90"), Decimal("100"), 2, at(0)),
        (Decimal("95"), Decimal("96"), 2, at(2)),
    ]


async def test_take_waits_for_a_tick() -> None:
    slot = WindowSlot("BTC-USD")
    taken = []

    async def engine() -> None:
        taken.append(await slot.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine)
        await trio.testing.wait_all_tasks_blocked()
        assert taken == []
        slot.put(Decimal("5"), 1, at(0))
    assert [w.last for w in taken] == [Decimal("5")]


def recovered(price: str, trade_id: int) -> TickWindow:
    return attrs.evolve(TickWindow.of(Decimal(price), trade_id, at(trade_id)), recovered=True)


def test_a_hold_keeps_later_windows_back_until_its_recovered_windows_are_taken() -> None:
    slot = WindowSlot("BTC-USD")
    slot.put(Decimal("100"), 1, at(1))
    hold = slot.hold(1, 5)
    slot.put(Decimal("101"), 5, at(5), alone=True)  # the first live ticker after the gap
    slot.put(Decimal("102"), 6, at(6))
    slot.put(Decimal("103"), 7, at(7))
    first = slot.take_nowait()
    assert first is not None and first.last_trade_id == 1  # put before the hold
    assert slot.take_nowait() is None and slot.held  # the recovery is still running
    slot.deliver(hold, [recovered("90", 2), recovered("95", 3)])
    taken = [slot.take_nowait(), slot.take_nowait()]
    assert [(w.last_trade_id, w.recovered) for w in taken if w] == [(2, True), (3, True)]
    assert slot.take_nowait() is None  # delivered, not yet released: more may come
    slot.deliver(hold, [recovered("99", 4)])
    slot.release(hold)
    assert not slot.held
    rest = [slot.take_nowait() for _ in range(3)]
    assert [(w.first_trade_id, w.last_trade_id) for w in rest if w] == [(4, 4), (5, 5), (6, 7)]
    assert slot.take_nowait() is None


async def test_take_wakes_when_the_hold_is_released() -> None:
    slot = WindowSlot("BTC-USD")
    hold = slot.hold(None, 9)
    slot.put(Decimal("100"), 9, at(9), alone=True)
    taken: list[TickWindow] = []

    async def taker() -> None:
        taken.append(await slot.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        await trio.testing.wait_all_tasks_blocked()
        assert taken == []  # held
        slot.release(hold)  # nothing was missed (no watermark yet)
    assert [w.last_trade_id for w in taken] == [9]


def test_then_runs_once_everything_queued_before_it_is_taken() -> None:
    slot = WindowSlot("BTC-USD")
    assert slot.then(lambda: None) is False  # nothing pending: the caller acts at once
    calls: list[str] = []
    hold = slot.hold(0, 3)
    slot.put(Decimal("100"), 3, at(3))
    assert slot.then(lambda: calls.append("watch")) is True
    slot.put(Decimal("101"), 4, at(4))  # after the marker: a window of its own
    slot.release(hold)
    first = slot.take_nowait()
    assert first is not None and first.last_trade_id == 3 and calls == []
    second = slot.take_nowait()
    assert calls == ["watch"]
    assert second is not None and (second.first_trade_id, second.last_trade_id) == (4, 4)
