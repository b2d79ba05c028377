"""The close statement writes its events itself (storage/writes.py ``_CLOSE_SQL``, issue 16):
PostgreSQL numbers them and renders their text. What it writes must be exactly what the Python
path wrote: the message byte for byte ``wire.event_message`` of the closed row (odd user ids,
prices with trailing zeros or below 10^-6, a recovered close), each user's seqs gap-free after
their earlier events, event ids rising with each user's seqs (the outbox and the log tail read
by id), and the structured columns (source, trade id)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from tickguard.domain import CloseOrder, CloseOutcome, Event, NewPosition, Watermark
from tickguard.storage import Database, writes
from tickguard.wire import event_message

USERS = ["alice", 'bob "the" \\ builder', "zoë ✓", "tab\there", "u-" + "x" * 60]
# (entry, stop, take): the stop is the close level below.
LEVELS = [
    ("100", "99.90000000", "110"),
    ("0.00000100", "0.00000012", None),
    ("65000.5", "64999.99999999", "70000"),
    ("1000", "1E+3", None),
]


async def _open(db: Database, n_per_user: int) -> list[tuple[uuid.UUID, str, Decimal]]:
    """Positions for every user (each user also gets a created event: seqs start above 0)."""
    requests = [
        NewPosition(
            user,
            "BTC-USD",
            "long",
            Decimal(entry),
            None if take is None else Decimal(take),
            Decimal(stop) if Decimal(stop) < Decimal(entry) else None,
        )
        for user in USERS
        for entry, stop, take in LEVELS * n_per_user
    ]
    results, events = await writes.create_positions(db, requests, max_open_per_user=10_000)
    await writes.mark_published(db, [e.id for e in events])
    opened = []
    for result, (_, stop, _) in zip(results, LEVELS * n_per_user * len(USERS), strict=True):
        assert not isinstance(result, Exception)
        opened.append((result.position.id, result.position.user_id, Decimal(stop)))
    return opened


async def test_closed_events_are_what_the_python_encoder_writes(db: Database) -> None:
    opened = await _open(db, n_per_user=5)
    at = datetime(2026, 12, 2, 10, 15, 30, 123456, tzinfo=UTC)
    orders = [
        CloseOrder(
            pid,
            stop,
            "stop_loss" if i % 3 else "take_profit",
            triggered_at=at + timedelta(microseconds=i),
            recovered=i % 4 == 0,
            trade_id=None if i % 5 == 0 else 1000 + i,
        )
        for i, (pid, _, stop) in enumerate(opened)
    ]
    orders.append(CloseOrder(uuid.uuid4(), Decimal(1), "stop_loss"))  # not found
    results, events = await writes.close_positions(db, orders, source="engine")

    assert [r.position_id for r in results] == [o.position_id for o in orders]
    assert [r.outcome for r in results] == [CloseOutcome.CLOSED] * len(opened) + [
        CloseOutcome.NOT_FOUND
    ]
    by_position = {e.position_id: e for e in events}
    assert len(by_position) == len(events) == len(opened)
    for order, result in zip(orders[:-1], results[:-1], strict=True):
        event = by_position[order.position_id]
        assert result.position is not None
        assert event.type == "position.closed"
        assert event.user_id == result.position.user_id
        assert event.message == event_message(
            "position.closed", "engine", event.seq, result.position, recovered=order.recovered
        )
    _assert_numbered(events, first_seq=len(LEVELS) * 5 + 1)

    rows = await db.fetch(
        "SELECT id, user_id, seq, type, position_id, message, source, trade_id FROM events"
        " WHERE type = 'position.closed' ORDER BY id"
    )
    assert [(r["id"], r["seq"], r["message"]) for r in rows] == [
        (e.id, e.seq, e.message) for e in sorted(events, key=lambda e: e.id)
    ]
    trade_ids = {o.position_id: o.trade_id for o in orders}
    assert all(r["source"] == "engine" for r in rows)
    assert all(r["trade_id"] == trade_ids[r["position_id"]] for r in rows)
    counters = {r["user_id"]: r["seq"] for r in await db.fetch("SELECT * FROM user_seq")}
    assert counters == {u: len(LEVELS) * 5 * 2 for u in USERS}


async def test_a_manual_close_and_a_repeated_id_number_their_events_in_order(
    db: Database,
) -> None:
    """Source ``api`` with a user check; an id twice in one batch closes once (its second order
    answers ALREADY_CLOSED and writes nothing); another user's id is NOT_FOUND for this one."""
    opened = await _open(db, n_per_user=1)
    mine = [(pid, stop) for pid, user, stop in opened if user == "alice"]
    theirs = next(pid for pid, user, _ in opened if user != "alice")
    orders = [CloseOrder(pid, Decimal("105"), "manual", user_id="alice") for pid, _ in mine]
    orders.insert(1, orders[0])
    orders.append(CloseOrder(theirs, Decimal("105"), "manual", user_id="alice"))
    results, events = await writes.close_positions(db, orders, source="api")

    outcomes = [r.outcome for r in results]
    assert outcomes[0] is CloseOutcome.CLOSED
    assert outcomes[1] is CloseOutcome.ALREADY_CLOSED
    assert outcomes[2:-1] == [CloseOutcome.CLOSED] * (len(mine) - 1)
    assert outcomes[-1] is CloseOutcome.NOT_FOUND
    assert len(events) == len(mine)
    closed = {r.position_id: r.position for r in results if r.outcome is CloseOutcome.CLOSED}
    for event in events:
        position = closed[event.position_id]
        assert position is not None
        assert event.message == event_message("position.closed", "api", event.seq, position)
    _assert_numbered(events, first_seq=len(LEVELS) + 1)


def _assert_numbered(events: list[Event], *, first_seq: int) -> None:
    """The list in position-id order (persistence publishes it in that order, users
    interleaved), and each user's events in it with ids rising and seqs consecutive from
    ``first_seq``."""
    assert [e.position_id for e in events] == sorted(
        (e.position_id for e in events), key=lambda pid: pid.int if pid else 0
    )
    by_user: dict[str, list[Event]] = {}
    for event in events:
        by_user.setdefault(event.user_id, []).append(event)
    for user_events in by_user.values():
        seqs = [e.seq for e in user_events]
        assert seqs == list(range(first_seq, first_seq + len(seqs)))
        assert [e.id for e in user_events] == sorted(e.id for e in user_events)


async def test_one_close_alone_uses_its_own_statement_and_writes_the_same(db: Database) -> None:
    """A batch of one order (a tick's close) goes through the one-row form of the statement:
    the same outcome, message, seq and columns as in a batch, watermark included."""
    opened = await _open(db, n_per_user=1)
    at = datetime(2026, 12, 2, 10, 15, 30, 999999, tzinfo=UTC)
    for i, (pid, user, stop) in enumerate(opened):
        recovered = i % 2 == 0
        order = CloseOrder(pid, stop, "stop_loss", triggered_at=at, recovered=recovered, trade_id=i)
        mark = Watermark("BTC-USD", 100 + i, at)
        [result], [event] = await writes.close_positions(
            db, [order], source="engine", watermarks=[mark]
        )
        assert result.outcome is CloseOutcome.CLOSED and result.position is not None
        assert event.message == event_message(
            "position.closed", "engine", event.seq, result.position, recovered=recovered
        )
        assert event.user_id == user and event.position_id == pid
        row = await db.fetchrow("SELECT seq, trade_id, source FROM events WHERE id = $1", event.id)
        assert (row["seq"], row["trade_id"], row["source"]) == (event.seq, i, "engine")
        watermark = await db.fetchval(
            "SELECT last_trade_id FROM watermarks WHERE symbol = 'BTC-USD'"
        )
        assert watermark == 100 + i
    [again], events = await writes.close_positions(db, [order], source="engine")
    assert again.outcome is CloseOutcome.ALREADY_CLOSED and events == []
