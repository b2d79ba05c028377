"""Every write of position state, with its outbox event: the persistence actor's storage.

Writes (``create_positions``, ``close_positions``) each run as one transaction that changes the
rows AND writes one outbox event per change with the user's next ``seq``, so an event exists
exactly when its change committed (DESIGN.md invariant 1). Only the persistence actor calls
these. Closes are one atomic statement per batch (invariant 2): each id gets its own outcome.
The outbox (``unpublished_events``, ``mark_published``) is how persistence republishes what a
crash or a lost acknowledgement left unpublished.

With a ``Fence`` (issue 18: engines own partitions of the symbol space by lease), an engine's
closes and watermarks first check, in the same transaction, that their partition's lease row
still carries the writer's token and has not expired, and lock it ``FOR SHARE``: a takeover's
UPDATE of that row waits until the close commits, so nothing commits under a token that was
already replaced. Orders of a partition not held are answered ``FENCED`` and change nothing.
Without a fence the statements are exactly those of the single process.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import attrs

from tickguard.domain import (
    CloseOrder,
    CloseOutcome,
    CloseResult,
    CreateResult,
    Event,
    EventSource,
    EventType,
    NewPosition,
    Position,
    Watermark,
    partition_of,
)
from tickguard.storage.db import Database
from tickguard.storage.errors import IdempotencyKeyReused, OpenPositionLimit
from tickguard.storage.rows import COLUMNS, P_COLUMNS, POSITION_JSON, to_position
from tickguard.storage.watermarks import ADVANCE_SQL, advance, latest
from tickguard.wire import event_message


async def _write_events(
    conn: asyncpg.Connection,
    changes: Sequence[tuple[EventType, EventSource, Position]],
    recovered: Collection[uuid.UUID] = (),
    trade_ids: Mapping[uuid.UUID, int] | None = None,
) -> list[Event]:
    """Give each change the next ``seq`` of its user and write its event-log row (positions in
    ``recovered`` were closed from recovered market data: their event says so; ``trade_ids``
    names the Coinbase trade that triggered an engine close).

    The row keeps the rendered ``message`` (the exact WebSocket text) and, beside it, the
    structured columns of the event log (issue 17): ``source`` and ``trade_id`` (the body as
    JSONB is the ``event_log`` view's ``payload``, parsed from ``message`` when read).

    Runs inside the caller's transaction: the counter rows are locked until it commits, which
    keeps ``seq`` gap-free and in commit order per user.
    """
    if not changes:
        return []
    counts = Counter(position.user_id for _, _, position in changes)
    users = sorted(counts)  # a fixed lock order: concurrent writers never deadlock here
    rows = await conn.fetch(
        """INSERT INTO user_seq (user_id, seq)
           SELECT * FROM unnest($1::text[], $2::bigint[])
           ON CONFLICT (user_id) DO UPDATE SET seq = user_seq.seq + EXCLUDED.seq
           RETURNING user_id, seq""",
        users,
        [counts[u] for u in users],
    )
    next_seq = {row["user_id"]: row["seq"] - counts[row["user_id"]] for row in rows}
    seqs, messages = [], []
    for type_, source, position in changes:
        next_seq[position.user_id] += 1
        seq = next_seq[position.user_id]
        seqs.append(seq)
        messages.append(
            event_message(type_, source, seq, position, recovered=position.id in recovered)
        )
    trades = trade_ids or {}
    ids = await conn.fetch(
        """INSERT INTO events
             (user_id, seq, type, position_id, message, source, trade_id)
           SELECT u, s, t, p, m, src, tr
             FROM unnest($1::text[], $2::bigint[], $3::text[], $4::uuid[], $5::text[],
                         $6::text[], $7::bigint[]) AS c(u, s, t, p, m, src, tr)
           RETURNING id""",
        [p.user_id for _, _, p in changes],
        seqs,
        [t for t, _, _ in changes],
        [p.id for _, _, p in changes],
        messages,
        [src for _, src, _ in changes],
        [trades.get(p.id) for _, _, p in changes],
    )
    return [
        Event(id=row["id"], user_id=p.user_id, seq=seq, type=t, message=msg, position_id=p.id)
        for row, (t, _, p), seq, msg in zip(ids, changes, seqs, messages, strict=True)
    ]


async def unpublished_events(db: Database, limit: int = 10_000) -> list[Event]:
    """Committed events not yet marked published, oldest first."""
    rows = await db.fetch(
        """SELECT id, user_id, seq, type, message, position_id FROM events
           WHERE published_at IS NULL ORDER BY id LIMIT $1""",
        limit,
    )
    return [
        Event(r["id"], r["user_id"], r["seq"], r["type"], r["message"], r["position_id"])
        for r in rows
    ]


async def mark_published(db: Database, event_ids: Sequence[int]) -> None:
    """Record that these events were handed to fanout."""
    if event_ids:
        await db.execute(_MARK_PUBLISHED_SQL, list(event_ids))


_MARK_PUBLISHED_SQL = "UPDATE events SET published_at = now() WHERE id = ANY($1::bigint[])"


async def create_positions(
    db: Database, requests: Sequence[NewPosition], *, max_open_per_user: int
) -> tuple[list[CreateResult | Exception], list[Event]]:
    """Insert positions (and their created events) in one transaction.

    Returns one result per request, in order: a ``CreateResult``, an ``OpenPositionLimit`` or
    an ``IdempotencyKeyReused`` instance, and the events written. A request whose
    ``idempotency_key`` matches a committed position of the same user returns that position with
    ``created=False`` when its ``fingerprint`` matches the first request's (or either is
    unknown), and ``IdempotencyKeyReused`` otherwise.
    """
    return await db.transaction(_create, list(requests), max_open_per_user)


async def _create(
    conn: asyncpg.Connection, requests: list[NewPosition], max_open: int
) -> tuple[list[CreateResult | Exception], list[Event]]:
    users = sorted({r.user_id for r in requests})
    # Lock the users' counter rows first: concurrent creates of one user queue here, so the
    # open-position count below cannot be raced.
    await conn.execute(
        """INSERT INTO user_seq (user_id, seq) SELECT unnest($1::text[]), 0
           ON CONFLICT (user_id) DO UPDATE SET seq = user_seq.seq""",
        users,
    )
    open_count = Counter(
        {
            r["user_id"]: r["n"]
            for r in await conn.fetch(
                """SELECT user_id, count(*) AS n FROM positions
                   WHERE status = 'open' AND user_id = ANY($1::text[]) GROUP BY user_id""",
                users,
            )
        }
    )
    keyed = [(r.user_id, r.idempotency_key) for r in requests if r.idempotency_key]
    existing: dict[tuple[str, str], Position] = {}
    prints: dict[tuple[str, str], str | None] = {}
    if keyed:
        rows = await conn.fetch(
            f"""SELECT {COLUMNS}, idempotency_key, request_fingerprint FROM positions
                WHERE (user_id, idempotency_key) IN
                      (SELECT * FROM unnest($1::text[], $2::text[]))""",
            [u for u, _ in keyed],
            [k for _, k in keyed],
        )
        existing = {(r["user_id"], r["idempotency_key"]): to_position(r) for r in rows}
        prints = {(r["user_id"], r["idempotency_key"]): r["request_fingerprint"] for r in rows}

    results: list[CreateResult | Exception | None] = [None] * len(requests)
    accepted: list[tuple[int, NewPosition, uuid.UUID]] = []
    new_by_key: dict[tuple[str, str], int] = {}
    for i, request in enumerate(requests):
        key = (request.user_id, request.idempotency_key) if request.idempotency_key else None
        if key and key in existing:
            if _same_request(prints[key], request.fingerprint):
                results[i] = CreateResult(existing[key], created=False)
            else:
                results[i] = IdempotencyKeyReused(key[1])
        elif key and key in new_by_key:
            continue  # same key twice in one batch: answered from the first below
        elif open_count[request.user_id] >= max_open:
            results[i] = OpenPositionLimit(max_open)
        else:
            open_count[request.user_id] += 1
            accepted.append((i, request, uuid.uuid4()))
            if key:
                new_by_key[key] = i

    created: list[Position] = []
    if accepted:
        rows = await conn.fetch(
            f"""INSERT INTO positions
                  (id, user_id, symbol, side, entry_price, take_profit, stop_loss,
                   idempotency_key, request_fingerprint)
                SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],
                                     $5::numeric[], $6::numeric[], $7::numeric[], $8::text[],
                                     $9::text[])
                RETURNING {COLUMNS}""",
            [pid for _, _, pid in accepted],
            [r.user_id for _, r, _ in accepted],
            [r.symbol for _, r, _ in accepted],
            [r.side for _, r, _ in accepted],
            [r.entry_price for _, r, _ in accepted],
            [r.take_profit for _, r, _ in accepted],
            [r.stop_loss for _, r, _ in accepted],
            [r.idempotency_key for _, r, _ in accepted],
            [r.fingerprint for _, r, _ in accepted],
        )
        by_id = {row["id"]: to_position(row) for row in rows}
        for i, _, pid in accepted:
            results[i] = CreateResult(by_id[pid])
            created.append(by_id[pid])
    for i, request in enumerate(requests):
        if results[i] is None:  # a repeated key within the batch
            j = new_by_key[(request.user_id, request.idempotency_key or "")]
            first = results[j]
            assert isinstance(first, CreateResult)
            if _same_request(requests[j].fingerprint, request.fingerprint):
                results[i] = CreateResult(first.position, created=False)
            else:
                results[i] = IdempotencyKeyReused(request.idempotency_key or "")
    events = await _write_events(conn, [("position.created", "api", p) for p in created])
    return [r for r in results if r is not None], events


def _same_request(first: str | None, again: str | None) -> bool:
    """Whether a replay matches the first request; a row from before fingerprints (None)
    replays as it always did."""
    return first is None or again is None or first == again


# Columns of the close statement's rows: the position as ``COLUMNS`` (``to_position`` reads them
# by place), then its event: id, seq, message.
_EVENT_ID = len(COLUMNS.split(","))

# One round of closes and their events in one statement (issue 16). The UPDATE is invariant 2's;
# then, from what it closed: each user's counter moves on by their count (in user order, the
# lock order of ``_write_events``); each event gets its user's next seq in position-id order,
# an id drawn in that same order (so ids and each user's seqs rise together, as the outbox and
# the log tail need), and its text, byte for byte what ``wire.event_message`` writes for the
# row (``rows.POSITION_JSON``; tests compare the two). Python neither renders the messages nor
# sends them back for an INSERT. The watermarks the closes carry ($9-$11, issue 14) advance in
# the same statement. No step joins two of these intermediate results (their row
# counts are unknown to the planner, which then picks nested loops): the counters are read
# from one JSON object (computed once), the counts through a window.
_ADVANCE_STEP = ADVANCE_SQL.strip().replace("$1", "$9").replace("$2", "$10").replace("$3", "$11")

# The orders: arrays, one element per order; or, for the most common batch (one close, a tick
# to close), one value each. A prepared statement's plan becomes generic after a few runs, and
# a generic plan cannot know an array's length: for arrays it hashes the open positions (fine
# for a cascade's thousands, about 1 ms for one order at 10,000 open), while the one-row form
# always finds its row through the primary key.
_ORDERS = """
  SELECT * FROM unnest($1::uuid[], $2::numeric[], $3::text[], $4::timestamptz[], $5::text[],
                       $6::bool[], $7::bigint[])
           AS c(id, price, reason, at, user_id, recovered, trade_id)"""
_ONE_ORDER = """
  SELECT $1::uuid AS id, $2::numeric AS price, $3::text AS reason, $4::timestamptz AS at,
         $5::text AS user_id, $6::bool AS recovered, $7::bigint AS trade_id"""

_CLOSE_SQL = f"""
WITH c AS ({{orders}}
), closed AS (
  UPDATE positions p
     SET status = 'closed', close_price = c.price, close_reason = c.reason,
         triggered_at = c.at, closed_at = now()
    FROM c
   WHERE p.id = c.id AND p.status = 'open' AND (c.user_id IS NULL OR p.user_id = c.user_id)
  RETURNING {P_COLUMNS}, c.recovered, c.trade_id
), counters AS (
  INSERT INTO user_seq (user_id, seq)
  SELECT user_id, count(*) FROM closed GROUP BY user_id ORDER BY user_id
  ON CONFLICT (user_id) DO UPDATE SET seq = user_seq.seq + EXCLUDED.seq
  RETURNING user_id, seq
), seq_map AS (
  SELECT jsonb_object_agg(user_id, seq) AS seqs FROM counters
), numbered AS (
  SELECT x.*,
         nextval(pg_get_serial_sequence('events', 'id')) AS event_id,
         '{{"type":"position.closed","source":' || to_json($8::text)::text
           || ',"seq":' || x.event_seq
           || CASE WHEN x.recovered THEN ',"recovered":true' ELSE '' END
           || ',"position":' || {POSITION_JSON} || '}}' AS message
    FROM (SELECT closed.*,
                 ((SELECT seqs FROM seq_map) ->> closed.user_id)::bigint
                   - count(*) OVER same_user
                   + row_number() OVER (same_user ORDER BY closed.id) AS event_seq
            FROM closed
          WINDOW same_user AS (PARTITION BY closed.user_id)
           ORDER BY closed.user_id, closed.id) x
), written AS (
  INSERT INTO events (id, user_id, seq, type, position_id, message, source, trade_id)
  SELECT event_id, user_id, event_seq, 'position.closed', id, message, $8::text, trade_id
    FROM numbered
), marks AS (
{_ADVANCE_STEP}
)
SELECT {COLUMNS}, event_id, event_seq, message FROM numbered
"""
_CLOSE_MANY_SQL = _CLOSE_SQL.replace("{orders}", _ORDERS)
_CLOSE_ONE_SQL = _CLOSE_SQL.replace("{orders}", _ONE_ORDER)


@attrs.frozen
class Fence:
    """The leases a writer holds: ``tokens`` maps each partition it holds to its token (it may
    be a live view, e.g. ``actors.lease.LeaseState.held``: it is read once per transaction);
    ``partitions`` is how many partitions the symbol space is cut into."""

    tokens: Mapping[int, int]
    partitions: int


_FENCE_SQL = """
SELECT partition, token, expires_at > now() AS live FROM engine_leases
 WHERE partition = ANY($1::int[])
 ORDER BY partition
   FOR SHARE
"""


async def _valid_partitions(
    conn: asyncpg.Connection, fence: Fence, partitions: Collection[int]
) -> set[int]:
    """Which of ``partitions`` the fence's tokens hold right now; locks their lease rows FOR
    SHARE until the caller's transaction ends (a takeover waits for it)."""
    tokens = dict(fence.tokens)  # one reading, whatever a live view does meanwhile
    wanted = sorted(p for p in set(partitions) if p in tokens)
    if not wanted:
        return set()
    rows = await conn.fetch(_FENCE_SQL, wanted)
    return {int(r["partition"]) for r in rows if r["live"] and r["token"] == tokens[r["partition"]]}


async def close_positions(
    db: Database,
    orders: Sequence[CloseOrder],
    *,
    source: EventSource,
    watermarks: Sequence[Watermark] = (),
    fence: Fence | None = None,
) -> tuple[list[CloseResult], list[Event]]:
    """Close a batch atomically: one UPDATE for every order, one closed event per closed row.

    ``watermarks`` advance in the same transaction (issue 14): they commit exactly when the
    closes their windows triggered do.

    With a ``fence``, an order whose position's symbol is in a partition the fence does not hold
    (token replaced, lease expired) is answered FENCED and changes nothing, and so is skipped a
    watermark of such a symbol; the check and the closes are one transaction (see the module).

    Returns one ``CloseResult`` per order, in order (CLOSED, ALREADY_CLOSED, NOT_FOUND or, with
    a fence, FENCED), and the events written. An id named twice is judged twice, in order, in
    the same transaction: the second sees the first's close (ALREADY_CLOSED). Raises
    ``DatabaseUnavailable`` (the caller reports every id as FAILED and may retry them: a retry
    of a close that did commit answers ALREADY_CLOSED, and its event is in the outbox).
    """
    if fence is not None:
        return await db.transaction(_fenced_close, list(orders), source, list(watermarks), fence)
    if len({o.position_id for o in orders}) == len(orders):
        # One statement does it all, atomically: no BEGIN and COMMIT round trips around it
        # (what it did not close is looked up after it, which a commit does not change).
        return await db.run(_close, list(orders), source, list(watermarks))
    return await db.transaction(_close, list(orders), source, list(watermarks))


async def _fenced_close(
    conn: asyncpg.Connection,
    orders: list[CloseOrder],
    source: EventSource,
    watermarks: list[Watermark],
    fence: Fence,
) -> tuple[list[CloseResult], list[Event]]:
    """``_close`` behind the fence: the partition of each order comes from its position's row
    (its symbol never changes), not from anything the order says."""
    ids = list({o.position_id for o in orders})
    symbols = {
        row["id"]: row["symbol"]
        for row in await conn.fetch(
            "SELECT id, symbol FROM positions WHERE id = ANY($1::uuid[])", ids
        )
    }
    part = {pid: partition_of(symbol, fence.partitions) for pid, symbol in symbols.items()}
    marks = {m.symbol: partition_of(m.symbol, fence.partitions) for m in watermarks}
    valid = await _valid_partitions(conn, fence, [*part.values(), *marks.values()])
    # An id with no row is not fenced: the plain close answers it NOT_FOUND.
    fenced = {pid for pid, p in part.items() if p not in valid}
    allowed = [(i, o) for i, o in enumerate(orders) if o.position_id not in fenced]
    results, events = await _close(
        conn,
        [o for _, o in allowed],
        source,
        [m for m in watermarks if marks[m.symbol] in valid],
    )
    answers = [CloseResult(o.position_id, CloseOutcome.FENCED) for o in orders]
    for (index, _), result in zip(allowed, results, strict=True):
        answers[index] = result
    return answers, events


def _rounds(orders: list[CloseOrder]) -> list[list[tuple[int, CloseOrder]]]:
    """Split orders so that no id appears twice in a round (k-th mention -> round k)."""
    seen: Counter[uuid.UUID] = Counter()
    rounds: list[list[tuple[int, CloseOrder]]] = []
    for index, order in enumerate(orders):
        k = seen[order.position_id]
        seen[order.position_id] += 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append((index, order))
    return rounds


async def _close(
    conn: asyncpg.Connection,
    orders: list[CloseOrder],
    source: EventSource,
    watermarks: list[Watermark],
) -> tuple[list[CloseResult], list[Event]]:
    results: list[CloseResult | None] = [None] * len(orders)
    events: list[Event] = []
    rounds = _rounds(orders) or [[]]
    marks = latest(watermarks)
    for number, round_ in enumerate(rounds, start=1):
        round_.sort(key=lambda item: item[1].position_id)  # a fixed row-lock order
        unique = [order for _, order in round_]
        last = number == len(rounds)  # the watermarks go with the last round
        columns: tuple[Any, ...] = (
            [o.position_id for o in unique],
            [o.price for o in unique],
            [o.reason for o in unique],
            [o.triggered_at for o in unique],
            [o.user_id for o in unique],
            [o.recovered for o in unique],
            [o.trade_id for o in unique],
        )
        statement = _CLOSE_MANY_SQL
        if len(unique) == 1:
            statement, columns = _CLOSE_ONE_SQL, tuple(column[0] for column in columns)
        rows = await conn.fetch(
            statement,
            *columns,
            source,
            [m.symbol for m in marks] if last else [],
            [m.trade_id for m in marks] if last else [],
            [m.time for m in marks] if last else [],
        )
        closed: dict[uuid.UUID, Position] = {}
        for row in rows:
            position = to_position(row)
            closed[position.id] = position
            event_id, seq, message = row[_EVENT_ID], row[_EVENT_ID + 1], row[_EVENT_ID + 2]
            events.append(
                Event(event_id, position.user_id, seq, "position.closed", message, position.id)
            )
        # Published in position-id order: each user's seqs rise (they were drawn in that order)
        # and the users interleave, as the closes did. Grouped by user (id order), a cascade
        # reached each client as one burst at fanout's full rate, and reading clients with a
        # small queue were closed as slow (tests/test_faults.py, the 1013 scenario).
        events.sort(key=_position_order)
        missing = [o.position_id for o in unique if o.position_id not in closed]
        current: dict[uuid.UUID, Position] = {}
        if missing:
            current = {
                row["id"]: to_position(row)
                for row in await conn.fetch(
                    f"SELECT {COLUMNS} FROM positions WHERE id = ANY($1::uuid[])", missing
                )
            }
        for index, order in round_:
            pid = order.position_id
            if pid in closed:
                results[index] = CloseResult(pid, CloseOutcome.CLOSED, closed[pid])
                continue
            row = current.get(pid)
            if row is None or (order.user_id is not None and row.user_id != order.user_id):
                results[index] = CloseResult(pid, CloseOutcome.NOT_FOUND)
            else:
                results[index] = CloseResult(pid, CloseOutcome.ALREADY_CLOSED, row)
    return [r for r in results if r is not None], events


def _position_order(event: Event) -> int:
    assert event.position_id is not None
    return event.position_id.int


async def advance_watermarks(
    db: Database, marks: Sequence[Watermark], *, fence: Fence | None = None
) -> int:
    """Move watermarks forward on their own (windows that triggered nothing), one statement.

    With a ``fence``, the marks of symbols whose partition it does not hold are skipped (the
    check and the write are one transaction). Returns how many marks were skipped so.
    """
    if not marks:
        return 0
    if fence is None:
        await db.run(advance, list(marks))
        return 0
    return await db.transaction(_fenced_advance, list(marks), fence)


async def _fenced_advance(conn: asyncpg.Connection, marks: list[Watermark], fence: Fence) -> int:
    part = {m.symbol: partition_of(m.symbol, fence.partitions) for m in marks}
    valid = await _valid_partitions(conn, fence, part.values())
    allowed = [m for m in marks if part[m.symbol] in valid]
    await advance(conn, allowed)
    return len(marks) - len(allowed)


async def positions_by_id(db: Database, ids: Sequence[uuid.UUID]) -> list[Position]:
    """The rows of these positions as they are now (the outbox's recovery re-tracks and
    untracks them: their commit acknowledgement may have been lost)."""
    if not ids:
        return []
    found = await db.fetch(f"SELECT {COLUMNS} FROM positions WHERE id = ANY($1::uuid[])", list(ids))
    return [to_position(r) for r in found]


# --- Warm-up (issue 16): the close path's statements, run once on a connection at start-up ---


async def warm_up(conn: asyncpg.Connection) -> None:
    """Run every statement of a close on ``conn`` and roll it all back: asyncpg then holds them
    prepared (its statement cache) with their types introspected, and this server process has
    run them on real rows (the ``updated_at`` trigger compiled, the indexes' paths taken), so
    the first close after start-up pays no parse, plan, type look-up or first-run cost.
    Changes nothing: two made-up open positions are inserted and closed (one alone, one with an
    id that does not exist: both forms of the close statement, and the look-up of what it did
    not close), then the created-event insert, a watermark of a made-up symbol and the outbox
    mark, all in a transaction that is rolled back (only the id sequences move on)."""
    now = datetime.now(UTC)
    ghost = Position(
        id=uuid.uuid4(),
        user_id="tickguard-warm-up",
        symbol="WARM-UP",
        side="long",
        entry_price=Decimal(1),
        take_profit=None,
        stop_loss=Decimal("0.5"),
        status="open",
        close_price=None,
        close_reason=None,
        created_at=now,
        updated_at=now,
        closed_at=None,
    )
    twin = attrs.evolve(ghost, id=uuid.uuid4())
    order = CloseOrder(ghost.id, Decimal("0.5"), "stop_loss", triggered_at=now, trade_id=0)
    pair = [
        CloseOrder(twin.id, Decimal("0.5"), "stop_loss", triggered_at=now, trade_id=0),
        CloseOrder(uuid.uuid4(), Decimal("0.5"), "stop_loss", triggered_at=now),
    ]
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(
            """INSERT INTO positions (id, user_id, symbol, side, entry_price, stop_loss)
               SELECT id, $2, $3, 'long', 1, 0.5 FROM unnest($1::uuid[]) AS g(id)""",
            [ghost.id, twin.id],
            ghost.user_id,
            ghost.symbol,
        )
        await _close(conn, [order], "engine", [])  # the one-order statement
        await _close(conn, pair, "engine", [])  # and the one for several
        events = await _write_events(conn, [("position.created", "api", ghost)])
        await advance(conn, [Watermark(ghost.symbol, 0, now)])
        await conn.execute(_MARK_PUBLISHED_SQL, [e.id for e in events])
    finally:
        await transaction.rollback()
