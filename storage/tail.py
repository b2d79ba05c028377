"""The log tail (issue 17): every committed event, exactly once, for a process that did not
write it.

Engine processes learn of positions an api process created, gateway processes fan events out
to their sessions: both follow the event log with a ``LogTail``. Event ids (bigserial) are
taken at INSERT, not at COMMIT, so a reader that followed ids would pass over a lower id still
uncommitted and never come back for it. Transaction ids give the order that does not skip:
each event row carries its writer's ``tx`` (migration 007), and every transaction whose id is
below a snapshot's ``xmin`` has finished (committed or rolled back). The tail keeps a boundary
B and reads the events with ``B <= tx < xmin``, a page at a time in ``(tx, id)`` order; once
that range is read, B becomes that ``xmin``. An event below B was read once; one at or above
it will be.

Per user, events come in ``seq`` order, which transaction ids alone do not give: a writer's
id is assigned at its first write, before it queues for the user's ``user_seq`` row lock, so
a transaction with a lower id can take the lock later and get the later seqs (seen in tests
with concurrent writers of one user). Since seqs are handed out under that lock, every lower
seq of a user was committed before a higher one is: when a page holds a user's seq ``s``,
that user's events below ``s`` not yet returned are all visible, and the tail pulls them into
the same page (remembering them, so that their turn in ``(tx, id)`` order skips them). A page
is returned sorted by ``(user_id, seq)``.

The price: a long-running writing transaction (anywhere on the server) holds ``xmin`` back, so
the tail lags behind it until it ends. Readers without a transaction id (plain SELECTs) do not.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs

from tickguard.domain import EventSource, EventType
from tickguard.storage.db import Reader

DEFAULT_LIMIT = 5000


@attrs.frozen
class TailEvent:
    """One committed event as the tail reads it: ``symbol`` is its position's, ``message`` the
    rendered JSON exactly as stored (the text sessions receive)."""

    id: int
    user_id: str
    seq: int
    type: EventType
    position_id: uuid.UUID
    symbol: str
    source: EventSource
    message: str


class TailNotStarted(RuntimeError):
    """``LogTail.read`` before ``LogTail.start``."""


# One statement, so that the horizon (xmin) and the rows come from the same snapshot: every
# transaction below that xmin is finished, and its commit is visible to the rows' read. $1 is a
# horizon already taken (the rest of a range being paged) or NULL for a new one. $4, the start
# snapshot, leaves out events that had committed before ``start`` (those above its xmin).
_READ_SQL = """
WITH horizon AS (
  SELECT COALESCE($1::text::xid8, pg_snapshot_xmin(pg_current_snapshot())) AS upto
)
SELECT h.upto::text AS upto, e.tx::text AS tx, e.id, e.user_id, e.seq, e.type,
       e.position_id, e.symbol, e.source, e.message
  FROM horizon h
  LEFT JOIN LATERAL (
    SELECT ev.tx, ev.id, ev.user_id, ev.seq, ev.type, ev.position_id, p.symbol, ev.source,
           ev.message
      FROM events ev JOIN positions p ON p.id = ev.position_id
     WHERE (ev.tx, ev.id) > ($2::text::xid8, $3::bigint) AND ev.tx < h.upto
       AND ($4::text IS NULL OR NOT pg_visible_in_snapshot(ev.tx, $4::text::pg_snapshot))
       AND NOT ev.id = ANY($6::bigint[])
     ORDER BY ev.tx, ev.id
     LIMIT $5
  ) e ON true
 ORDER BY e.tx, e.id
"""

# The events of these users below these seqs that the tail has not returned: after the page's
# last (tx, id) ($3, $4; the range below the boundary $7 is all returned), not pulled before
# ($6), not committed before start ($5).
_PREDECESSORS_SQL = """
SELECT ev.tx::text AS tx, ev.id, ev.user_id, ev.seq, ev.type, ev.position_id, p.symbol,
       ev.source, ev.message
  FROM unnest($1::text[], $2::bigint[]) AS u(user_id, below)
  JOIN events ev ON ev.user_id = u.user_id AND ev.seq < u.below
  JOIN positions p ON p.id = ev.position_id
 WHERE ev.tx >= $7::text::xid8
   AND (ev.tx, ev.id) > ($3::text::xid8, $4::bigint)
   AND NOT ev.id = ANY($6::bigint[])
   AND ($5::text IS NULL OR NOT pg_visible_in_snapshot(ev.tx, $5::text::pg_snapshot))
"""

_START_SQL = "SELECT pg_current_snapshot()::text"


def _snapshot_bounds(snapshot: str) -> tuple[int, int]:
    """``(xmin, xmax)`` of a ``pg_snapshot`` in its text form ``xmin:xmax:xip,...``."""
    xmin, xmax, _ = snapshot.split(":", 2)
    return int(xmin), int(xmax)


class LogTail:
    """A reader's position in the event log: the boundary below which every event was read.

    ``read`` returns the next page of newly visible events (at most ``limit``) and ``[]`` once
    caught up; a caller loops until ``[]`` (each ``[]`` means: every event of every transaction
    that had finished when that read began has been returned). Not safe for two tasks at once:
    one tail, one reader. Database errors (``DatabaseUnavailable``) propagate and leave the
    tail where it was: the failed page is read again by the next call.
    """

    def __init__(self) -> None:
        self._cursor: tuple[int, int] | None = None  # (tx, id) of the last event returned
        self._upto: int | None = None  # the horizon of the range being paged, if any
        self._start_snapshot: str | None = None  # dropped once the boundary passes its xmax
        self._start_xmax = 0
        # Events returned ahead of their (tx, id) turn (a user's lower seqs pulled into a
        # page): (tx, id) -> skipped when their turn comes, forgotten once the cursor passes.
        self._early: set[tuple[int, int]] = set()

    @property
    def started(self) -> bool:
        return self._cursor is not None

    @property
    def boundary(self) -> int | None:
        """Every event with ``tx`` below this was returned (or committed before ``start``)."""
        return None if self._cursor is None or self._upto is not None else self._cursor[0]

    async def start(self, db: Reader) -> None:
        """Set the boundary to the current ``xmin``: events committed before this call are not
        returned, every one committed after it will be."""
        snapshot: str = await db.fetchval(_START_SQL)
        xmin, xmax = _snapshot_bounds(snapshot)
        self._cursor = (xmin, 0)
        self._upto = None
        # Transactions between xmin and xmax that had already committed are in the snapshot;
        # their events came before the start and are left out.
        self._start_snapshot = snapshot if xmax > xmin else None
        self._start_xmax = xmax

    async def read(self, db: Reader, *, limit: int = DEFAULT_LIMIT) -> list[TailEvent]:
        """The next page of newly visible events; ``[]`` when caught up.

        A page is up to ``limit`` events in ``(tx, id)`` order, plus the lower seqs of its
        users not returned yet (see the module's docstring), sorted by ``(user_id, seq)``.
        Raises ``DatabaseUnavailable`` (nothing moves: the next call reads the same page).
        """
        if self._cursor is None:
            raise TailNotStarted("LogTail.read before LogTail.start")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        early_ids = [i for _, i in self._early]
        rows = await db.fetch(
            _READ_SQL,
            None if self._upto is None else str(self._upto),
            str(self._cursor[0]),
            self._cursor[1],
            self._start_snapshot,
            limit,
            early_ids,
        )
        upto = int(rows[0]["upto"])
        found = [r for r in rows if r["id"] is not None]
        pulled: list[Any] = []
        if found:
            last = (int(found[-1]["tx"]), found[-1]["id"])
            below: dict[str, int] = {}
            for r in found:
                below[r["user_id"]] = max(below.get(r["user_id"], 0), r["seq"])
            pulled = await db.fetch(
                _PREDECESSORS_SQL,
                list(below),
                list(below.values()),
                str(last[0]),
                last[1],
                self._start_snapshot,
                early_ids,
                str(self._cursor[0]),
            )
        # Nothing has moved until both statements answered: a failure reads the page again.
        if found:
            self._cursor = last
        self._early.update((int(r["tx"]), r["id"]) for r in pulled)
        if len(found) < limit:
            # The range below ``upto`` is read: it becomes the boundary. xmin never moves back,
            # but a boundary must not either, whatever a server answers.
            self._cursor = (max(upto, self._cursor[0]), 0)
            self._upto = None
            if self._start_snapshot is not None and self._cursor[0] >= self._start_xmax:
                self._start_snapshot = None
        else:
            self._upto = upto  # more of this range may follow: page on under the same horizon
        cursor = self._cursor
        self._early = {e for e in self._early if e > cursor}
        page = [_tail_event(r) for r in (*found, *pulled)]
        page.sort(key=lambda e: (e.user_id, e.seq))
        return page


def _tail_event(row: Any) -> TailEvent:
    return TailEvent(
        id=row["id"],
        user_id=row["user_id"],
        seq=row["seq"],
        type=row["type"],
        position_id=row["position_id"],
        symbol=row["symbol"],
        source=row["source"],
        message=row["message"],
    )
