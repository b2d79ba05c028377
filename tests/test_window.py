"""The window slot: conflation on put, swap on take, and the stale ticker kept apart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import trio

from tickguard.actors.window import WindowSlot

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
