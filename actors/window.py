"""The per-symbol tick window and the slot the feed merges it into (DESIGN.md "The window").

The feed calls ``WindowSlot.put`` for every ticker; it never blocks. The engine calls
``await slot.take()``, which waits until at least one tick is pending and then swaps the
whole window out, so no delivered price extreme is skipped however slow the engine is.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime
from decimal import Decimal

import attrs
import trio


@attrs.frozen
class TickWindow:
    """Every ticker of one symbol delivered between two takes, conflated."""

    low: Decimal
    high: Decimal
    last: Decimal
    count: int
    first_trade_id: int
    last_trade_id: int
    first_time: datetime
    last_time: datetime

    @classmethod
    def of(cls, price: Decimal, trade_id: int, time: datetime) -> TickWindow:
        return cls(price, price, price, 1, trade_id, trade_id, time, time)

    def merge(self, price: Decimal, trade_id: int, time: datetime) -> TickWindow:
        """The window extended by one later tick."""
        return TickWindow(
            low=min(self.low, price),
            high=max(self.high, price),
            last=price,
            count=self.count + 1,
            first_trade_id=self.first_trade_id,
            last_trade_id=trade_id,
            first_time=self.first_time,
            last_time=time,
        )


class WindowSlot:
    """One symbol's pending windows: the feed puts, the engine takes.

    Usually one window, into which every tick merges. A tick put ``alone`` (the last-trade
    ticker Coinbase sends right after a subscription ack, possibly minutes old) becomes a window
    of its own, and the ticks after it start a new one: merged with fresh ticks, its old price
    would carry a fresh trade time and could close a position created after it (invariant 10).

    Created by the supervisor, so that a restarted feed or engine finds the same slot.
    """

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self._windows: deque[TickWindow] = deque()
        self._last_alone = False
        self._ready = trio.Event()
        self.last_price: Decimal | None = None
        self.last_time: datetime | None = None

    def put(self, price: Decimal, trade_id: int, time: datetime, *, alone: bool = False) -> None:
        """Merge one ticker into the pending window and wake the engine. Never blocks."""
        if alone or not self._windows or self._last_alone:
            self._windows.append(TickWindow.of(price, trade_id, time))
        else:
            self._windows[-1] = self._windows[-1].merge(price, trade_id, time)
        self._last_alone = alone
        self.last_price = price
        self.last_time = time
        self._ready.set()

    def take_nowait(self) -> TickWindow | None:
        """Swap out the oldest pending window (None when no tick arrived since the last take)."""
        if not self._windows:
            return None
        window = self._windows.popleft()
        if not self._windows:
            self._last_alone = False
            self._ready = trio.Event()
        return window

    async def take(self) -> TickWindow:
        """Wait until at least one tick is pending, then swap the oldest window out."""
        while True:
            window = self.take_nowait()
            if window is not None:
                return window
            await self._ready.wait()


class WindowSlots:
    """Every symbol's slot, created on first use and kept for the life of the process."""

    def __init__(self) -> None:
        self._slots: dict[str, WindowSlot] = {}

    def get(self, symbol: str) -> WindowSlot:
        slot = self._slots.get(symbol)
        if slot is None:
            slot = self._slots[symbol] = WindowSlot(symbol)
        return slot

    def peek(self, symbol: str) -> WindowSlot | None:
        return self._slots.get(symbol)
