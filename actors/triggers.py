"""One symbol's open positions in sorted trigger indexes, and the TP/SL rule (inv. 4, 5, 10).

Pure: no I/O, no clock, no Trio. ``TriggerIndex.judge`` finds the positions a window closes in
O(log n + k) for k triggered positions, however many are open; ``judge_linear`` is the old
backend's per-position loop, kept as the oracle for tests and the benchmark.

The rule, per window: long SL if ``low <= stop_loss``, long TP if ``high >= take_profit``;
short SL if ``high >= stop_loss``, short TP if ``low <= take_profit``; bounds inclusive; stop
loss wins when both trigger; the close price is the level. A position created after the
window's last trade (``created_at > window.last_time``) is not judged by that window.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Literal

import attrs
from sortedcontainers import SortedList

from tickguard.actors.messages import Position, Side
from tickguard.actors.window import TickWindow

TriggerReason = Literal["stop_loss", "take_profit"]


@attrs.frozen
class Trigger:
    """A position that a window closed: why, and at which level (the close price)."""

    position_id: uuid.UUID
    user_id: str
    reason: TriggerReason
    price: Decimal


@attrs.frozen(weakref_slot=False)
class _Watched:
    """What the index keeps of a position: only the fields the rule reads (memory per position)."""

    position_id: uuid.UUID
    user_id: str
    side: Side
    take_profit: Decimal | None
    stop_loss: Decimal | None
    created_at: datetime


class _AfterEveryId:
    """Sorts after every position id, so ``(level, AFTER)`` sits after all entries at ``level``.

    UUID comparisons with a foreign type return NotImplemented, so Python asks this object.
    """

    def __lt__(self, other: object) -> bool:
        return False

    def __gt__(self, other: object) -> bool:
        return True


_AFTER = _AfterEveryId()

# Entries of the four indexes: (level, position_id). The id breaks ties, so removing one of many
# positions at the same level stays O(log n).
_Entry = tuple[Decimal, uuid.UUID]


class TriggerIndex:
    """One symbol's open positions, indexed by level in four sorted lists.

    ``long_sl`` and ``short_tp`` trigger from their high end (level >= window low);
    ``long_tp`` and ``short_sl`` from their low end (level <= window high). A window therefore
    reads only the entries it triggers, plus the few it skips because they are newer than it.
    """

    def __init__(self, positions: Iterable[Position] = ()) -> None:
        self._watched: dict[uuid.UUID, _Watched] = {}
        self._long_sl: SortedList = SortedList()
        self._long_tp: SortedList = SortedList()
        self._short_sl: SortedList = SortedList()
        self._short_tp: SortedList = SortedList()
        self.add_many(positions)

    def __len__(self) -> int:
        return len(self._watched)

    def __contains__(self, position_id: object) -> bool:
        return position_id in self._watched

    def __iter__(self) -> Iterator[uuid.UUID]:
        return iter(list(self._watched))

    def add(self, position: Position) -> None:
        """Watch an open position; a position already watched is replaced by this version.

        Raises ValueError for a position that is not open: only open positions can trigger.
        A position with neither take-profit nor stop-loss is counted but never triggers.
        """
        watched = _watch(position)
        self.remove(position.id)
        self._watched[position.id] = watched
        sl_list, tp_list = self._lists_for(watched.side)
        if watched.stop_loss is not None:
            sl_list.add((watched.stop_loss, watched.position_id))
        if watched.take_profit is not None:
            tp_list.add((watched.take_profit, watched.position_id))

    def add_many(self, positions: Iterable[Position]) -> None:
        """``add`` for a whole load (an engine's start): sorts each index once instead of
        inserting one by one. Same rules; the last version of a repeated id wins."""
        load = Load()
        load.add(positions)
        self.add_load(load)

    def add_load(self, load: Load) -> None:
        """``add_many`` for what a ``Load`` gathered (page by page), sorted once."""
        latest = load.taken()
        for position_id in latest:
            self.remove(position_id)
        long_sl: list[_Entry] = []
        long_tp: list[_Entry] = []
        short_sl: list[_Entry] = []
        short_tp: list[_Entry] = []
        for w in latest.values():
            sl_entries, tp_entries = (
                (long_sl, long_tp) if w.side == "long" else (short_sl, short_tp)
            )
            if w.stop_loss is not None:
                sl_entries.append((w.stop_loss, w.position_id))
            if w.take_profit is not None:
                tp_entries.append((w.take_profit, w.position_id))
        self._watched.update(latest)
        self._long_sl.update(long_sl)
        self._long_tp.update(long_tp)
        self._short_sl.update(short_sl)
        self._short_tp.update(short_tp)

    def remove(self, position_id: uuid.UUID) -> bool:
        """Stop watching a position; returns False when it was not watched (not an error:
        an Untrack may arrive for a position a window already closed)."""
        watched = self._watched.pop(position_id, None)
        if watched is None:
            return False
        sl_list, tp_list = self._lists_for(watched.side)
        if watched.stop_loss is not None:
            sl_list.remove((watched.stop_loss, position_id))
        if watched.take_profit is not None:
            tp_list.remove((watched.take_profit, position_id))
        return True

    def judge(self, window: TickWindow, *, created_before: datetime | None = None) -> list[Trigger]:
        """The positions this window closes (stop losses first), removed from the index.

        Reads O(log n + k + s) entries: k triggered, s crossed but created after the window's
        last trade (those stay, for a later window). Never judges a position twice: a triggered
        position is gone from the index until someone adds it again. ``created_before``
        narrows the window to positions created before that time (an engine's start-up backlog,
        whose extremes may be older than a position loaded just now).
        """
        cutoff = window.last_time if created_before is None else created_before
        low, high = window.low, window.high
        stops: dict[uuid.UUID, Trigger] = {}
        takes: dict[uuid.UUID, Trigger] = {}
        self._hits(_from_low(self._long_sl, low), cutoff, "stop_loss", stops)
        self._hits(_to_high(self._short_sl, high), cutoff, "stop_loss", stops)
        self._hits(_to_high(self._long_tp, high), cutoff, "take_profit", takes)
        self._hits(_from_low(self._short_tp, low), cutoff, "take_profit", takes)
        triggers = list(stops.values())
        triggers.extend(t for pid, t in takes.items() if pid not in stops)  # stop loss wins
        for trigger in triggers:
            self.remove(trigger.position_id)
        return triggers

    def _hits(
        self,
        entries: Iterable[_Entry],
        cutoff: datetime,
        reason: TriggerReason,
        into: dict[uuid.UUID, Trigger],
    ) -> None:
        for level, position_id in entries:
            watched = self._watched[position_id]
            if watched.created_at > cutoff:
                continue  # invariant 10: this window's trades are all older than the position
            into[position_id] = Trigger(position_id, watched.user_id, reason, level)

    def _lists_for(self, side: Side) -> tuple[SortedList, SortedList]:
        """(stop-loss list, take-profit list) of one side."""
        if side == "long":
            return self._long_sl, self._long_tp
        return self._short_sl, self._short_tp


class Load:
    """Positions gathered for one bulk add, keeping only what the rule reads, so that a
    start-up can read its rows page by page and drop each page before the next."""

    def __init__(self) -> None:
        self._latest: dict[uuid.UUID, _Watched] = {}

    def add(self, positions: Iterable[Position]) -> None:
        """Gather open positions (the last version of a repeated id wins); raises
        ValueError for one that is not open."""
        for position in positions:
            self._latest[position.id] = _watch(position)

    def taken(self) -> dict[uuid.UUID, _Watched]:
        """Everything gathered, emptying the load."""
        latest, self._latest = self._latest, {}
        return latest


def _watch(position: Position) -> _Watched:
    if position.status != "open":
        raise ValueError(f"position {position.id} is {position.status}, not open")
    return _Watched(
        position.id,
        position.user_id,
        "long" if position.side == "long" else "short",  # a shared literal, not the row's str
        position.take_profit,
        position.stop_loss,
        position.created_at,
    )


def _from_low(entries: SortedList, low: Decimal) -> Iterable[_Entry]:
    """Entries with level >= low; the last-entry check makes the common no-hit case O(1)."""
    if not entries or entries[-1][0] < low:
        return ()
    hits: Iterable[_Entry] = entries.irange(minimum=(low,))  # sortedcontainers is untyped
    return hits


def _to_high(entries: SortedList, high: Decimal) -> Iterable[_Entry]:
    """Entries with level <= high; the first-entry check makes the common no-hit case O(1)."""
    if not entries or entries[0][0] > high:
        return ()
    hits: Iterable[_Entry] = entries.irange(maximum=(high, _AFTER))
    return hits


def judge_linear(positions: Iterable[Position], window: TickWindow) -> list[Trigger]:
    """The brute-force rule: every open position checked one by one (the old backend's loop).

    O(n) per window; used as the oracle in tests and as the baseline in bench/. Removes
    nothing: the caller drops the triggered positions from its own collection.
    """
    triggers: list[Trigger] = []
    for p in positions:
        if p.status != "open" or p.created_at > window.last_time:
            continue
        sl, tp = p.stop_loss, p.take_profit
        if p.side == "long":
            stop = sl is not None and window.low <= sl
            take = tp is not None and window.high >= tp
        else:
            stop = sl is not None and window.high >= sl
            take = tp is not None and window.low <= tp
        if stop and sl is not None:
            triggers.append(Trigger(p.id, p.user_id, "stop_loss", sl))
        elif take and tp is not None:
            triggers.append(Trigger(p.id, p.user_id, "take_profit", tp))
    return triggers
