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

import math
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


# Entries of the four indexes: (level, the id as an int, the id). The int breaks ties, so removing
# one of many positions at the same level stays O(log n), and every comparison of two entries
# runs in C (two UUIDs compare through Python's ``UUID.__lt__``: 10,000 stops at one level spent
# most of a cascade's judging there). It is the UUID's own ``int`` attribute: no new object.
_Entry = tuple[Decimal, int, uuid.UUID]

# Sorts after every entry at its level: (level, inf) > (level, any int, ...).
_AFTER = math.inf


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
        key = position.id.int
        if watched.stop_loss is not None:
            sl_list.add((watched.stop_loss, key, position.id))
        if watched.take_profit is not None:
            tp_list.add((watched.take_profit, key, position.id))

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
                sl_entries.append((w.stop_loss, w.position_id.int, w.position_id))
            if w.take_profit is not None:
                tp_entries.append((w.take_profit, w.position_id.int, w.position_id))
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
            sl_list.remove((watched.stop_loss, position_id.int, position_id))
        if watched.take_profit is not None:
            tp_list.remove((watched.take_profit, position_id.int, position_id))
        return True

    def judge(self, window: TickWindow, *, created_before: datetime | None = None) -> list[Trigger]:
        """The positions this window closes (stop losses first), removed from the index.

        Reads O(log n + k + s) entries: k triggered, s crossed but created after the window's
        last trade (those stay, for a later window). Never judges a position twice: a triggered
        position is gone from the index until someone adds it again. ``created_before``
        narrows the window to positions created before that time (an engine's start-up backlog,
        whose extremes may be older than a position loaded just now).

        Removal is in bulk: each list's crossed range is one contiguous slice, deleted at once
        (the s too new ones go back in); then each triggered position's entry on its other
        list, where the window did not cross it, a list at a time.
        """
        cutoff = window.last_time if created_before is None else created_before
        low, high = window.low, window.high
        triggers: list[Trigger] = []
        # Stop losses first: a position that both of its lists trigger is already gone from
        # ``_watched`` when its take-profit entry comes up, so it closes as a stop loss.
        lsl, ssl, ltp, stp = self._long_sl, self._short_sl, self._long_tp, self._short_tp
        long_stops = self._take(lsl, _from_low(lsl, low), cutoff, "stop_loss", triggers)
        short_stops = self._take(ssl, _to_high(ssl, high), cutoff, "stop_loss", triggers)
        long_takes = self._take(ltp, _to_high(ltp, high), cutoff, "take_profit", triggers)
        short_takes = self._take(stp, _from_low(stp, low), cutoff, "take_profit", triggers)
        # The other entry of each: a stop's take-profit outside the crossed range, and every
        # take's stop loss (one the window crossed would have made it a stop).
        _remove_all(ltp, [_tp(w) for w in long_stops if _above(w.take_profit, high)])
        _remove_all(stp, [_tp(w) for w in short_stops if _below(w.take_profit, low)])
        _remove_all(lsl, [_sl(w) for w in long_takes if w.stop_loss is not None])
        _remove_all(ssl, [_sl(w) for w in short_takes if w.stop_loss is not None])
        return triggers

    def _take(
        self,
        entries: SortedList,
        crossed: tuple[int, int],
        cutoff: datetime,
        reason: TriggerReason,
        into: list[Trigger],
    ) -> list[_Watched]:
        """Judge ``entries[start:stop]`` (the range the window crossed): append a ``Trigger``
        to ``into`` for each position it closes, stop watching those, and delete the range in
        one slice, putting back the positions too new to judge. Returns the closed positions.

        An entry whose position is no longer watched was closed by this same window through
        its other list (a stop loss, judged first): it goes with the slice, with no trigger.
        """
        start, stop = crossed
        if start >= stop:
            return []
        watched = self._watched
        closed: list[_Watched] = []
        kept: list[_Entry] = []
        for entry in entries[start:stop]:
            level, _, position_id = entry
            w = watched.pop(position_id, None)
            if w is None:
                continue  # stopped by this window a moment ago
            if w.created_at > cutoff:
                watched[position_id] = w  # invariant 10: the window's trades are all older
                kept.append(entry)
                continue
            into.append(Trigger(position_id, w.user_id, reason, level))
            closed.append(w)
        if len(kept) < stop - start:
            del entries[start:stop]
            entries.update(kept)
        return closed

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


def _remove_all(entries: SortedList, doomed: list[_Entry]) -> None:
    """Remove these entries (all present): one by one when they are few, else by rebuilding the
    list without them, which costs O(len(entries)) = O(8 * len(doomed)) at most."""
    if not doomed:
        return
    if len(doomed) * 8 < len(entries):
        for entry in doomed:
            entries.remove(entry)
        return
    gone = {entry[2] for entry in doomed}
    rest = [entry for entry in entries if entry[2] not in gone]
    entries.clear()
    entries.update(rest)  # already sorted: one pass of C comparisons


def _sl(w: _Watched) -> _Entry:
    assert w.stop_loss is not None
    return (w.stop_loss, w.position_id.int, w.position_id)


def _tp(w: _Watched) -> _Entry:
    assert w.take_profit is not None
    return (w.take_profit, w.position_id.int, w.position_id)


def _above(level: Decimal | None, high: Decimal) -> bool:
    """A level the window's high did not reach (outside ``_to_high``'s range)."""
    return level is not None and level > high


def _below(level: Decimal | None, low: Decimal) -> bool:
    """A level the window's low did not reach (outside ``_from_low``'s range)."""
    return level is not None and level < low


def _from_low(entries: SortedList, low: Decimal) -> tuple[int, int]:
    """The index range of entries with level >= low; the last-entry check makes the common
    no-hit case O(1)."""
    if not entries or entries[-1][0] < low:
        return 0, 0
    start: int = entries.bisect_left((low,))  # sortedcontainers is untyped
    return start, len(entries)


def _to_high(entries: SortedList, high: Decimal) -> tuple[int, int]:
    """The index range of entries with level <= high; the first-entry check makes the common
    no-hit case O(1)."""
    if not entries or entries[0][0] > high:
        return 0, 0
    stop: int = entries.bisect_right((high, _AFTER))
    return 0, stop


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
