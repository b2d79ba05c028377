"""The trigger index against the brute-force oracle (DESIGN.md invariants 4, 5, 10)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from positions_factory import open_position

from tickguard.actors.messages import Position
from tickguard.actors.triggers import Trigger, TriggerIndex, judge_linear
from tickguard.actors.window import TickWindow, WindowSlot

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


def position(
    side: str = "long",
    *,
    tp: str | Decimal | None = None,
    sl: str | Decimal | None = None,
    created: int = 0,
    user: str = "u1",
    entry: str = "100",
) -> Position:
    return open_position(side, tp=tp, sl=sl, created_at=at(created), user=user, entry=entry)


def window(low: str | Decimal, high: str | Decimal, *, time: int = 10) -> TickWindow:
    low, high = Decimal(low), Decimal(high)
    return TickWindow(low, high, high, 2, 1, 2, at(time), at(time))


def key(triggers: list[Trigger]) -> list[tuple[uuid.UUID, str, str, Decimal]]:
    return sorted((t.position_id, t.user_id, t.reason, t.price) for t in triggers)


# ---- the four rules, one example each, bounds inclusive -------------------------------------


@pytest.mark.parametrize(
    ("side", "tp", "sl", "low", "high", "reason", "price"),
    [
        ("long", None, "90", "90", "95", "stop_loss", "90"),  # low == SL: inclusive
        ("long", None, "90", "85", "95", "stop_loss", "90"),  # gap through: still the level
        ("long", "110", None, "105", "110", "take_profit", "110"),  # high == TP
        ("long", "110", None, "105", "130", "take_profit", "110"),
        ("short", None, "110", "105", "110", "stop_loss", "110"),  # high == SL
        ("short", None, "110", "105", "120", "stop_loss", "110"),
        ("short", "90", None, "90", "95", "take_profit", "90"),  # low == TP
        ("short", "90", None, "80", "95", "take_profit", "90"),
    ],
)
def test_each_rule_closes_at_its_level(side, tp, sl, low, high, reason, price) -> None:
    p = position(side, tp=tp, sl=sl, user="alice")
    index = TriggerIndex([p])
    assert index.judge(window(low, high)) == [Trigger(p.id, "alice", reason, Decimal(price))]
    assert p.id not in index
    assert len(index) == 0


@pytest.mark.parametrize(
    ("side", "tp", "sl", "low", "high"),
    [
        ("long", "110", "90", "90.00000001", "109.99999999"),  # one satoshi inside both
        ("short", "90", "110", "90.00000001", "109.99999999"),
        ("long", None, None, "1", "1000"),  # no levels: never triggers
    ],
)
def test_a_window_inside_the_bracket_closes_nothing(side, tp, sl, low, high) -> None:
    p = position(side, tp=tp, sl=sl)
    index = TriggerIndex([p])
    assert index.judge(window(low, high)) == []
    assert p.id in index


@pytest.mark.parametrize(("side", "tp", "sl"), [("long", "110", "90"), ("short", "90", "110")])
def test_stop_loss_wins_when_both_trigger(side, tp, sl) -> None:
    p = position(side, tp=tp, sl=sl)
    index = TriggerIndex([p])
    assert index.judge(window("90", "110")) == [Trigger(p.id, "u1", "stop_loss", Decimal(sl))]


def test_a_position_is_judged_once() -> None:
    p = position("long", tp="110", sl="90")
    index = TriggerIndex([p])
    assert len(index.judge(window("80", "120"))) == 1
    assert index.judge(window("80", "120")) == []
    assert index.remove(p.id) is False


def test_a_window_older_than_the_position_leaves_it_for_a_later_window() -> None:
    p = position("long", sl="90", created=10)
    index = TriggerIndex([p])
    assert index.judge(window("80", "95", time=9)) == []  # every trade older than the position
    assert p.id in index
    assert index.judge(window("80", "95", time=10)) == [  # same instant: judged
        Trigger(p.id, "u1", "stop_loss", Decimal("90"))
    ]


def test_remove_and_re_add_replace_the_levels() -> None:
    p = position("long", tp="110", sl="90")
    index = TriggerIndex([p])
    assert index.remove(p.id) is True
    assert index.judge(window("80", "120")) == []
    index.add(p)
    moved = attrs.evolve(p, stop_loss=Decimal("50"))
    index.add(moved)  # same id: replaces, does not duplicate
    assert len(index) == 1
    assert index.judge(window("60", "100")) == []
    assert key(index.judge(window("50", "100"))) == key([Trigger(p.id, "u1", "stop_loss", 50)])


def test_add_many_replaces_and_keeps_the_last_version_of_an_id() -> None:
    a, b = position("long", sl="90"), position("short", sl="110")
    index = TriggerIndex([a, b])
    a_lower = attrs.evolve(a, stop_loss=Decimal("80"))
    b_gone, b_back = attrs.evolve(b, stop_loss=None), attrs.evolve(b, stop_loss=Decimal("120"))
    index.add_many([a_lower, b_gone, b_back])
    assert len(index) == 2
    assert index.judge(window("85", "115")) == []
    assert key(index.judge(window("80", "120"))) == key(
        [Trigger(a.id, "u1", "stop_loss", Decimal("80")), Trigger(b.id, "u1", "stop_loss", 120)]
    )


def test_many_positions_at_one_level_all_close_and_only_those() -> None:
    same = [position("long", sl="90") for _ in range(50)]
    other = [position("long", sl="89.99999999") for _ in range(50)]
    index = TriggerIndex(same + other)
    assert {t.position_id for t in index.judge(window("90", "95"))} == {p.id for p in same}
    assert len(index) == 50


@pytest.mark.parametrize("side", ["long", "short"])
def test_too_new_positions_inside_a_crossed_range_stay_in_the_index(side: str) -> None:
    """Invariant 10 inside one crossed range: old and new positions at the same levels are
    interleaved (ids sort at random), the window crosses them all, only the old ones close,
    and the new ones stay watched (their entries are still there: a later window closes them,
    and each can still be removed)."""
    levels = ["90", "91", "92"] if side == "long" else ["110", "109", "108"]
    old = [position(side, sl=lv, tp=None, created=5) for lv in levels for _ in range(40)]
    new = [position(side, sl=lv, created=20) for lv in levels for _ in range(40)]
    outside = [position(side, sl="50" if side == "long" else "150") for _ in range(30)]
    index = TriggerIndex(old + new + outside)
    crossing = window("89", "111", time=10)
    got = index.judge(crossing)
    assert key(got) == key(judge_linear(old + new + outside, crossing))
    assert {t.position_id for t in got} == {p.id for p in old}
    assert len(index) == len(new) + len(outside)
    assert all(p.id in index for p in new)
    index.add_many(_far_away(p) for p in old)  # no entry of theirs was left behind
    assert index.judge(crossing) == []
    later = index.judge(window("89", "111", time=20))
    assert {t.position_id for t in later} == {p.id for p in new}
    assert all(t.reason == "stop_loss" for t in later)
    assert all(index.remove(p.id) for p in old)
    assert set(index) == {p.id for p in outside}
    assert all(index.remove(p.id) for p in outside)
    assert len(index) == 0


@pytest.mark.parametrize("untouched", [0, 500])  # the other list rebuilt, or entries removed
def test_a_triggered_positions_other_entry_goes_too(untouched: int) -> None:
    """Stops whose take-profit the window did not reach, takes whose stop it did not reach, and
    positions crossed at both levels (stop loss wins): after the window, each closed
    position is gone from both of its lists, whatever their size."""
    stops = [position("long", sl="90", tp="120") for _ in range(60)]
    takes = [position("short", sl="130", tp="95") for _ in range(60)]
    both = [position("long", sl="92", tp="98") for _ in range(60)]
    idle = [position(s, sl=sl, tp=tp) for s, sl, tp in [("long", "10", "1000")] * untouched]
    idle += [position(s, sl=sl, tp=tp) for s, sl, tp in [("short", "1000", "10")] * untouched]
    everyone = stops + takes + both + idle
    index = TriggerIndex(everyone)
    crossing = window("89", "99")
    got = index.judge(crossing)
    assert key(got) == key(judge_linear(everyone, crossing))
    assert {t.position_id for t in got if t.reason == "stop_loss"} == {p.id for p in stops + both}
    assert len(index) == len(idle)
    # No entry of a closed position is left behind: watched again with levels far away, none
    # of them closes on the same window (a stale entry would close it at its old level).
    index.add_many(_far_away(p) for p in stops + takes + both)
    assert index.judge(window("89", "130")) == []  # every old level, none of the new ones
    assert {t.position_id for t in index.judge(window("0.00000001", "100000"))} == {
        p.id for p in everyone
    }
    assert len(index) == 0


def _far_away(p: Position) -> Position:
    """The same position with levels no test window reaches."""
    if p.side == "long":
        return attrs.evolve(p, stop_loss=Decimal("0.00000001"), take_profit=Decimal("100000"))
    return attrs.evolve(p, stop_loss=Decimal("100000"), take_profit=Decimal("0.00000001"))


def test_a_closed_position_is_refused() -> None:
    p = position("long", sl="90")
    closed = attrs.evolve(p, status="closed")
    with pytest.raises(ValueError, match="not open"):
        TriggerIndex().add(closed)


# ---- property: indexed == brute force -------------------------------------------------------

# A small grid makes equal-to-boundary values common; the fine values add 8-decimal prices.
GRID = [Decimal(n) for n in range(95, 106)]
prices = st.one_of(
    st.sampled_from(GRID),
    st.sampled_from(GRID),
    st.decimals(min_value=Decimal("94"), max_value=Decimal("106"), places=8),
)
minutes = st.integers(min_value=0, max_value=6)


@st.composite
def positions(draw: st.DrawFn) -> Position:
    side = draw(st.sampled_from(["long", "short"]))
    tp = draw(st.none() | prices)
    sl = draw(st.none() | prices)
    return position(side, tp=tp, sl=sl, created=draw(minutes), user=draw(st.sampled_from("abc")))


ticks = st.tuples(prices, minutes)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("track"), positions()),
        st.tuples(st.just("load"), st.lists(positions(), max_size=5)),
        st.tuples(st.just("untrack"), st.integers(min_value=0, max_value=1000)),
        st.tuples(st.just("tick"), st.lists(ticks, min_size=1, max_size=4)),
        st.tuples(st.just("take"), st.none()),
        st.tuples(st.just("window"), st.tuples(prices, prices, minutes)),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.lists(positions(), max_size=20), operations=ops)
def test_index_agrees_with_the_oracle(initial: list[Position], operations: list) -> None:
    """Random positions, ticks, Track/Untrack and windows: same closes, reasons and prices.

    "tick" merges into a WindowSlot and "take" judges it, as the engine does; "track" first
    judges the pending window, then inserts (invariant 10). "window" is an arbitrary window,
    times not monotonic, prices gapping through both levels.
    """
    index = TriggerIndex(initial)
    oracle = {p.id: p for p in initial}
    slot = WindowSlot("BTC-USD")
    trade_id = 0

    def judge(w: TickWindow | None) -> None:
        if w is None:
            return
        expected = judge_linear(list(oracle.values()), w)
        got = index.judge(w)
        assert key(got) == key(expected)
        assert all(oracle[t.position_id].created_at <= w.last_time for t in got)
        for t in expected:
            del oracle[t.position_id]
        assert len(index) == len(oracle)

    for op, arg in operations:
        if op == "track":
            judge(slot.take_nowait())
            index.add(arg)
            oracle[arg.id] = arg
        elif op == "load":
            index.add_many(arg)
            oracle.update((p.id, p) for p in arg)
        elif op == "untrack":
            if oracle:
                victim = list(oracle)[arg % len(oracle)]
                assert index.remove(victim) is True
                del oracle[victim]
            else:
                assert index.remove(uuid.uuid4()) is False
        elif op == "tick":
            for price, minute in arg:
                trade_id += 1
                slot.put(price, trade_id, at(minute))
        elif op == "take":
            judge(slot.take_nowait())
        else:
            a, b, minute = arg
            judge(window(min(a, b), max(a, b), time=minute))
        assert set(index) == set(oracle)
    judge(slot.take_nowait())
    judge(window("0.00000001", "1000000", time=100))  # everything with a level closes now
    assert all(p.take_profit is None and p.stop_loss is None for p in oracle.values())
