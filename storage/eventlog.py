"""The event log (issue 17): reading it back, and pruning what retention lets go.

Every state change's event stays in ``events`` after publication (migration 006): the rendered
``message`` (the exact WebSocket text) and, beside it, ``source`` and ``trade_id``; the
``event_log`` view adds ``payload``, the body as JSONB, for SQL reads.
These reads serve ``/ws?since=SEQ`` (a user's events after a seq, in seq order, a bounded page
at a time) and ``GET /api/positions/{id}/events`` (one position's lifecycle); later roles
(gateways, engines learning of creates) read the same way. ``prune_closed`` is the one write
here: only the persistence actor calls it.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import attrs

from tickguard.domain import EventSource, EventType
from tickguard.storage.db import Database, Reader

# A replay or audit page: bounded memory per call, whatever the user's history.
DEFAULT_PAGE = 500


@attrs.frozen
class LoggedEvent:
    """One row of the event log; ``message`` is the text sessions receive (its body, parsed,
    is what the ``event_log`` view calls ``payload``)."""

    id: int
    user_id: str
    seq: int
    type: EventType
    source: EventSource
    trade_id: int | None
    position_id: uuid.UUID
    created_at: datetime
    message: str


_SELECT = "SELECT id, user_id, seq, type, source, trade_id, position_id, created_at, message"


def _logged(row: Any) -> LoggedEvent:
    return LoggedEvent(
        id=row["id"],
        user_id=row["user_id"],
        seq=row["seq"],
        type=row["type"],
        source=row["source"],
        trade_id=row["trade_id"],
        position_id=row["position_id"],
        created_at=row["created_at"],
        message=row["message"],
    )


async def user_events_after(
    db: Reader, user_id: str, after: int, *, through: int | None = None, limit: int = DEFAULT_PAGE
) -> list[LoggedEvent]:
    """Up to ``limit`` events of ``user_id`` with ``after < seq`` (and ``seq <= through`` when
    given), in seq order: one page of a replay; the next page starts after the last seq."""
    rows = await db.fetch(
        f"""{_SELECT} FROM events
             WHERE user_id = $1 AND seq > $2 AND ($3::bigint IS NULL OR seq <= $3)
             ORDER BY seq LIMIT $4""",
        user_id,
        after,
        through,
        limit,
    )
    return [_logged(r) for r in rows]


async def count_user_events(db: Reader, user_id: str, after: int, through: int) -> int:
    """How many of ``user_id``'s events with ``after < seq <= through`` are still in the log
    (``through - after`` exactly when none was pruned: seqs are gap-free per user)."""
    found = await db.fetchval(
        "SELECT count(*) FROM events WHERE user_id = $1 AND seq > $2 AND seq <= $3",
        user_id,
        after,
        through,
    )
    return int(found)


async def position_events(
    db: Reader, user_id: str, position_id: uuid.UUID, *, limit: int = 1000
) -> list[LoggedEvent]:
    """The events of ``user_id``'s position ``position_id``, oldest first (someone else's
    position has none: the audit route answers 404 for it, as for an unknown id)."""
    rows = await db.fetch(
        f"""{_SELECT} FROM events WHERE position_id = $1 AND user_id = $2
             ORDER BY seq LIMIT $3""",
        position_id,
        user_id,
        limit,
    )
    return [_logged(r) for r in rows]


async def prune_closed(db: Database, older_than: timedelta, *, limit: int = 10_000) -> int:
    """Delete up to ``limit`` events of positions closed more than ``older_than`` ago; returns
    how many were deleted (call again while it returns ``limit``).

    A position's events go together, only once it is closed (an open position's never), and
    only once all of them were published (the outbox still needs an unpublished one). A
    statement's ``limit`` may split one position's events over two calls.
    """
    deleted = await db.fetchval(
        """WITH gone AS (
             DELETE FROM events WHERE id IN (
               SELECT e.id FROM events e JOIN positions p ON p.id = e.position_id
                WHERE p.status = 'closed' AND p.closed_at < now() - $1::interval
                  AND NOT EXISTS (SELECT 1 FROM events u
                                   WHERE u.position_id = p.id AND u.published_at IS NULL)
                LIMIT $2)
             RETURNING 1)
           SELECT count(*) FROM gone""",
        older_than,
        limit,
        timeout=max(db.timeout, 60.0),  # a scan of a large log, off every request's path
    )
    return int(deleted)


def replay_complete(after: int, through: int, found: int) -> bool:
    """Whether a replay of ``(after, through]`` that found ``found`` events lost none."""
    return found == through - after
