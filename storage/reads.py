"""The reads the API serves: a user's positions (paged by keyset cursors), one position, and
the latest event ``seq`` a WebSocket session starts from. Nothing here writes.

The list pages come two ways: as ``Position`` values (``list_positions``, ``list_closed``), and
as the JSON text of the API's Position objects written by PostgreSQL (``list_positions_json``,
``list_closed_json``, see ``rows.POSITION_JSON``), which the HTTP handlers pass through without
decoding a row. Both take the same query, so both give the same page and cursor."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from tickguard.domain import (
    Position,
)
from tickguard.storage.db import Reader
from tickguard.storage.errors import BadCursor
from tickguard.storage.rows import COLUMNS, POSITION_JSON, to_position


async def latest_seq(db: Reader, user_id: str) -> int:
    """The user's latest event number (0 before the first event)."""
    seq = await db.fetchval("SELECT seq FROM user_seq WHERE user_id = $1", user_id)
    return int(seq or 0)


async def latest_seqs(db: Reader, user_ids: Sequence[str]) -> dict[str, int]:
    """The latest event number of each of ``user_ids`` (0 before a user's first event), in
    one query on one pool connection. Raises ``DatabaseUnavailable`` like every call."""
    wanted = list(dict.fromkeys(user_ids))
    rows = await db.fetch(
        "SELECT user_id, seq FROM user_seq WHERE user_id = ANY($1::text[])", wanted
    )
    seqs = dict.fromkeys(wanted, 0)
    seqs.update((row["user_id"], int(row["seq"])) for row in rows)
    return seqs


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_CURSOR = re.compile(r"([0-9]{1,16})\.([0-9a-f]{32})")


def _encode_cursor(moment: datetime, position_id: uuid.UUID) -> str:
    """``<microseconds since the epoch>.<uuid hex>``: web.schemas.CURSOR_PATTERN."""
    micros = (moment - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}.{position_id.hex}"


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The keyset position of a cursor of ``_encode_cursor``'s shape (every such string is a
    valid position: 16 digits of microseconds stay within year 2286). Raises ``BadCursor``
    for anything else, whatever its bytes."""
    match = _CURSOR.fullmatch(cursor) if isinstance(cursor, str) else None
    if match is None:
        raise BadCursor("cursor is not valid")
    moment = _EPOCH + timedelta(microseconds=int(match.group(1)))
    return moment, uuid.UUID(hex=match.group(2))


# The page queries: ``{columns}`` is filled in with what each way selects; the positions
# query's arguments are named too (``{user}``…), so that a batch can fill them from its rows.
_POSITIONS_PAGE = """SELECT {columns} FROM positions
    WHERE user_id = {user} AND ({status}::text IS NULL OR status = {status})
      AND ({at}::timestamptz IS NULL OR (created_at, id) < ({at}, {id}::uuid))
    ORDER BY created_at DESC, id DESC LIMIT {fetch}"""
_LIST_POSITIONS = _POSITIONS_PAGE.format_map(
    {"user": "$1", "status": "$2", "at": "$3", "id": "$4", "fetch": "$5", "columns": "{columns}"}
)
_LIST_CLOSED = """SELECT {columns} FROM positions
    WHERE user_id = $1 AND status = 'closed'
      AND ($2::timestamptz IS NULL OR (closed_at, id) < ($2, $3::uuid))
    ORDER BY closed_at DESC, id DESC LIMIT $4"""

# One row for a whole page: the first ``limit`` rows' JSON objects joined by commas (NULL when
# there is none), how many rows the query gave (``limit + 1`` when there is a next page), and
# the keyset of the ``limit``-th row, which the next page's cursor names.
_JSON_PAGE = """SELECT string_agg(json, ',' ORDER BY n) FILTER (WHERE n <= {limit}) AS body,
       count(*) AS rows,
       (array_agg(at) FILTER (WHERE n = {limit}))[1] AS last_at,
       (array_agg(id) FILTER (WHERE n = {limit}))[1] AS last_id
  FROM ({query}) AS page"""


def _json_page_query(query: str, order: str, limit: str) -> str:
    columns = f"row_number() OVER (ORDER BY {order}) AS n, {order.split()[0]} AS at, id, " + (
        f"{POSITION_JSON} AS json"
    )
    return _JSON_PAGE.format(limit=limit, query=query.format(columns=columns))


# Many users' pages in one query (issue 16: web.batched reads the pages asked for at the same
# moment together): one request per row of the arrays, each page a lateral subquery, in order.
_PAGE_ARGS = {"user": "q.user_id", "status": "q.status", "at": "q.after_at", "id": "q.after_id"}
_LIST_POSITIONS_JSON = f"""SELECT page.* FROM
    unnest($1::text[], $2::text[], $3::timestamptz[], $4::uuid[], $5::int[])
      WITH ORDINALITY AS q(user_id, status, after_at, after_id, lim, k)
    CROSS JOIN LATERAL ({
    _json_page_query(
        _POSITIONS_PAGE.format_map({**_PAGE_ARGS, "fetch": "q.lim + 1", "columns": "{columns}"}),
        "created_at DESC, id DESC",
        "q.lim",
    )
}) AS page
  ORDER BY q.k"""
_LIST_CLOSED_JSON = _json_page_query(_LIST_CLOSED, "closed_at DESC, id DESC", "$5")


def _json_result(row: Any, limit: int) -> tuple[str, str | None]:
    more = row["rows"] > limit
    cursor = _encode_cursor(row["last_at"], row["last_id"]) if more and row["last_at"] else None
    return row["body"] or "", cursor


@attrs.frozen
class PageAsk:
    """One ``GET /api/positions`` page: whose, which status (None: all), how many, and after
    which keyset (a decoded cursor; None: the first page)."""

    user_id: str
    status: str | None
    limit: int
    after: tuple[datetime, uuid.UUID] | None = None

    @classmethod
    def of(cls, user_id: str, status: str | None, limit: int, cursor: str | None) -> PageAsk:
        """The ask for a page named by a client's cursor; raises ``BadCursor``."""
        return cls(user_id, status, limit, _decode_cursor(cursor) if cursor else None)


async def list_positions_json_many(
    db: Reader, asks: Sequence[PageAsk]
) -> list[tuple[str, str | None]]:
    """``list_positions_json`` for many pages in one query, in the order asked."""
    rows = await db.fetch(
        _LIST_POSITIONS_JSON,
        [a.user_id for a in asks],
        [a.status for a in asks],
        [a.after[0] if a.after else None for a in asks],
        [a.after[1] if a.after else None for a in asks],
        [a.limit for a in asks],
    )
    return [_json_result(row, ask.limit) for row, ask in zip(rows, asks, strict=True)]


async def list_positions_json(
    db: Reader, user_id: str, status: str | None, limit: int, cursor: str | None
) -> tuple[str, str | None]:
    """``list_positions`` as the JSON text of the page's Position objects, comma-separated
    (``""`` for an empty page), and the same next-page cursor."""
    ask = PageAsk.of(user_id, status, limit, cursor)
    return (await list_positions_json_many(db, [ask]))[0]


async def list_closed_json(
    db: Reader, user_id: str, limit: int, cursor: str | None
) -> tuple[str, str | None]:
    """``list_closed`` as JSON text and cursor, like ``list_positions_json``."""
    after = _decode_cursor(cursor) if cursor else None
    row = await db.fetchrow(
        _LIST_CLOSED_JSON,
        user_id,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
        limit,
    )
    return _json_result(row, limit)


async def list_positions(
    db: Reader, user_id: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Position], str | None]:
    """The user's positions, newest ``created_at`` first, and the cursor of the next page."""
    after = _decode_cursor(cursor) if cursor else None
    rows = await db.fetch(
        _LIST_POSITIONS.format(columns=COLUMNS),
        user_id,
        status,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    page = [to_position(r) for r in rows[:limit]]
    more = len(rows) > limit
    return page, (_encode_cursor(page[-1].created_at, page[-1].id) if more else None)


async def list_closed(
    db: Reader, user_id: str, limit: int, cursor: str | None
) -> tuple[list[Position], str | None]:
    """The user's closed positions, newest ``closed_at`` first, and the next page's cursor."""
    after = _decode_cursor(cursor) if cursor else None
    rows = await db.fetch(
        _LIST_CLOSED.format(columns=COLUMNS),
        user_id,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    page = [to_position(r) for r in rows[:limit]]
    more = len(rows) > limit
    last = page[-1] if page else None
    return page, (
        _encode_cursor(last.closed_at, last.id) if more and last and last.closed_at else None
    )


async def get_position(db: Reader, user_id: str, position_id: uuid.UUID) -> Position | None:
    """That user's position with that id (someone else's is None, as if it did not exist)."""
    row = await db.fetchrow(
        f"SELECT {COLUMNS} FROM positions WHERE id = $1 AND user_id = $2", position_id, user_id
    )
    return None if row is None else to_position(row)
