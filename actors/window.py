"""The per-symbol tick window and the slot the feed merges it into (DESIGN.md "The window").

The feed calls ``WindowSlot.put`` for every ticker; it never blocks. The engine calls
``await slot.take()``, which waits until at least one tick is pending and then swaps the
whole window out, so no delivered price extreme is skipped however slow the engine is.

Gap recovery (issue 14): when the feed finds trades it did not see (a reconnect, a start),
it places a ``Hold`` in the slot (never blocking); live ticks keep merging into windows behind
it. The engine takes everything before the hold, then waits until the recovery has delivered
the missed trades' windows into the hold and released it, so recovered trades are judged in
trade order before any later live window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
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
    # Made of trades fetched over REST after a gap (its closes say "recovered": true).
    recovered: bool = False

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


class Hold:
    """A place in a slot's order where a gap's recovered windows go (see ``WindowSlot.hold``)."""

    def __init__(self, symbol: str, after: int | None, before: int) -> None:
        self.symbol = symbol
        self.after = after  # the last trade id the feed put before the gap (None: unknown)
        self.before = before  # the first live trade id after the gap
        self.windows: deque[TickWindow] = deque()
        self.released = False


class _Then:
    """A call to make once every window queued before it has been taken."""

    def __init__(self, call: Callable[[], None]) -> None:
        self.call = call


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
        self._windows: deque[TickWindow | Hold | _Then] = deque()
        self._last_alone = False
        self._ready = trio.Event()
        self.last_price: Decimal | None = None
        self.last_time: datetime | None = None

    def put(self, price: Decimal, trade_id: int, time: datetime, *, alone: bool = False) -> None:
        """Merge one ticker into the pending window and wake the engine. Never blocks."""
        tail = self._windows[-1] if self._windows else None
        if alone or not isinstance(tail, TickWindow) or self._last_alone:
            self._windows.append(TickWindow.of(price, trade_id, time))
        else:
            self._windows[-1] = tail.merge(price, trade_id, time)
        self._last_alone = alone
        self.last_price = price
        self.last_time = time
        self._ready.set()

    def hold(self, after: int | None, before: int) -> Hold:
        """Mark the gap between trade ``after`` and trade ``before`` (the feed, before it puts
        ``before``): windows put from now on wait behind it until ``release``. Never blocks."""
        hold = Hold(self.symbol, after, before)
        self._windows.append(hold)
        return hold

    def deliver(self, hold: Hold, windows: Iterable[TickWindow]) -> None:
        """Queue recovered windows (in trade order) at the hold's place. Never blocks."""
        hold.windows.extend(windows)
        self._ready.set()

    def release(self, hold: Hold) -> None:
        """The recovery of ``hold`` is over (delivered, or given up): what follows is takeable
        once its delivered windows are taken. Idempotent; never blocks."""
        hold.released = True
        self._ready.set()

    def then(self, call: Callable[[], None]) -> bool:
        """Make ``call`` (in the taker's task) once every window pending now has been taken;
        returns False when nothing is pending (the caller acts at once, ``call`` is dropped).
        Ticks put after this start a new window."""
        if not self._windows:
            return False
        self._windows.append(_Then(call))
        return True

    def cut(self) -> None:
        """Ticks put from now on start a new window: what is pending stays apart from them (an
        engine starting marks where its load began, issue 14 follow-up). Never blocks."""
        if self._windows and isinstance(self._windows[-1], TickWindow):
            self._last_alone = True

    @property
    def held(self) -> bool:
        """A recovery not yet released is pending in this slot."""
        return any(isinstance(item, Hold) and not item.released for item in self._windows)

    def take_nowait(self) -> TickWindow | None:
        """Swap out the oldest pending window (None when no tick arrived since the last take,
        or when the oldest is a hold whose recovery is still running)."""
        items = self._windows
        while items:
            head = items[0]
            if isinstance(head, TickWindow):
                items.popleft()
                if not items:
                    self._last_alone = False
                return head
            if isinstance(head, _Then):
                items.popleft()
                head.call()
            elif head.windows:
                return head.windows.popleft()
            elif head.released:
                items.popleft()
            else:
                return None
        self._last_alone = False
        return None

    async def take(self) -> TickWindow:
        """Wait until a window is takeable, then swap the oldest one out."""
        while True:
            window = self.take_nowait()
            if window is not None:
                return window
            # Nothing takeable now; put, deliver and release set the event.
            self._ready = trio.Event()
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

    def items(self) -> list[tuple[str, WindowSlot]]:
        return list(self._slots.items())
