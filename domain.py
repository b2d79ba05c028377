"""The domain's values: positions, close orders and their outcomes, committed events.

Plain frozen values shared by every layer (actors exchange them, storage reads and writes
them, web renders them); they import nothing of tickguard, so no layer depends on another
through them.
"""

from __future__ import annotations

import enum
import uuid
import zlib
from datetime import datetime
from decimal import Decimal
from typing import Literal

import attrs

Side = Literal["long", "short"]
Status = Literal["open", "closed"]
CloseReason = Literal["take_profit", "stop_loss", "manual", "system"]
EventSource = Literal["api", "engine"]
EventType = Literal["position.created", "position.closed"]


@attrs.frozen
class Position:
    """One row of the positions table, as the database returned it."""

    id: uuid.UUID
    user_id: str
    symbol: str
    side: Side
    entry_price: Decimal
    take_profit: Decimal | None
    stop_loss: Decimal | None
    status: Status
    close_price: Decimal | None
    close_reason: CloseReason | None
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None
    triggered_at: datetime | None = None


@attrs.frozen
class NewPosition:
    """A validated request to open a position (prices already checked against the bracket)."""

    user_id: str
    symbol: str
    side: Side
    entry_price: Decimal
    take_profit: Decimal | None
    stop_loss: Decimal | None
    idempotency_key: str | None = None
    # sha256 of the request as sent (web.routes.fingerprint): a replay of the key must match.
    fingerprint: str | None = None


@attrs.frozen
class CloseOrder:
    """Close one position at ``price`` for ``reason``.

    ``user_id`` restricts the close to that user's position (manual closes); engines leave it
    None. ``triggered_at`` is the Coinbase trade time that triggered an automatic close;
    ``recovered`` marks a close judged from trades fetched over REST after a gap (issue 14).
    ``trade_id`` is the Coinbase trade id ending the window that triggered an automatic close
    (the event log records it, issue 17); None for manual closes.
    """

    position_id: uuid.UUID
    price: Decimal
    reason: CloseReason
    user_id: str | None = None
    triggered_at: datetime | None = None
    recovered: bool = False
    trade_id: int | None = None


@attrs.frozen
class Watermark:
    """The last Coinbase trade of ``symbol`` whose window was judged and whose resulting
    closes committed (issue 14): gap recovery fetches the trades after it."""

    symbol: str
    trade_id: int
    time: datetime


class CloseOutcome(enum.Enum):
    """What happened to one id of a close batch (DESIGN.md invariant 2)."""

    CLOSED = "closed"
    ALREADY_CLOSED = "already_closed"
    NOT_FOUND = "not_found"
    FAILED = "failed"
    # The order's partition is not held with the token its writer holds (another engine took
    # it over, or the lease expired): nothing changed, and it is not retried (issue 18).
    FENCED = "fenced"


@attrs.frozen
class CloseResult:
    """The outcome for one CloseOrder; ``position`` is the row after the close when CLOSED,
    the current row when ALREADY_CLOSED, else None."""

    position_id: uuid.UUID
    outcome: CloseOutcome
    position: Position | None = None


@attrs.frozen
class CreateResult:
    """The committed position; ``created`` is False when an Idempotency-Key matched an
    earlier request and no new row was written."""

    position: Position
    created: bool = True


@attrs.frozen
class Event:
    """A committed change, as written to the outbox and pushed to the user's sessions.

    ``message`` is the JSON text sent on the WebSocket (type, source, seq, position).
    """

    id: int
    user_id: str
    seq: int
    type: EventType
    message: str
    position_id: uuid.UUID | None = None


def partition_of(symbol: str, partitions: int) -> int:
    """The engine partition (0..partitions-1) that owns ``symbol`` (issue 18).

    The same in every process and every Python run: CRC-32 of the UTF-8 symbol, never
    ``hash()`` (salted per process). Lives here, beside the values, because both the engines
    (``actors.partitions``) and the fenced writes (``storage.writes``) need it.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    return zlib.crc32(symbol.encode("utf-8")) % partitions
