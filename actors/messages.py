"""The frozen values that actors exchange over memory channels.

No actor reads another actor's state: everything crosses a channel as one of these values.
A request that wants an answer carries a one-slot reply channel (``reply``); the receiver
sends exactly one value on it, or an exception instance when it failed.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, Literal

import attrs
import trio

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


@attrs.frozen
class CloseOrder:
    """Close one position at ``price`` for ``reason``.

    ``user_id`` restricts the close to that user's position (manual closes); engines leave it
    None. ``triggered_at`` is the Coinbase trade time that triggered an automatic close.
    """

    position_id: uuid.UUID
    price: Decimal
    reason: CloseReason
    user_id: str | None = None
    triggered_at: datetime | None = None


class CloseOutcome(enum.Enum):
    """What happened to one id of a close batch (DESIGN.md invariant 2)."""

    CLOSED = "closed"
    ALREADY_CLOSED = "already_closed"
    NOT_FOUND = "not_found"
    FAILED = "failed"


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


@attrs.frozen(eq=False)
class CreateRequest:
    """web → persistence. The reply gets a CreateResult or an exception instance."""

    new: NewPosition
    reply: trio.MemorySendChannel[Any]


@attrs.frozen(eq=False)
class CloseRequest:
    """web or engine → persistence. The reply gets a tuple of CloseResult (one per order,
    in order) or an exception instance."""

    orders: tuple[CloseOrder, ...]
    source: EventSource
    reply: trio.MemorySendChannel[Any] | None = None


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


@attrs.frozen
class Track:
    """persistence → engine[symbol]: watch this open position (sent after its created event
    is queued for fanout, DESIGN.md invariant 9)."""

    position: Position


@attrs.frozen
class Untrack:
    """persistence → engine[symbol]: this position closed (by any path); stop watching it."""

    position_id: uuid.UUID


@attrs.frozen
class SubscribeOutcome:
    """The feed's answer to ``Watch``: accepted, rejected (with Coinbase's reason), or pending
    (no connection right now: the symbol is subscribed once one is up)."""

    status: Literal["accepted", "rejected", "pending"]
    reason: str | None = None

    ACCEPTED: ClassVar[SubscribeOutcome]
    PENDING: ClassVar[SubscribeOutcome]

    @classmethod
    def rejected(cls, reason: str) -> SubscribeOutcome:
        return cls("rejected", reason)


SubscribeOutcome.ACCEPTED = SubscribeOutcome("accepted")
SubscribeOutcome.PENDING = SubscribeOutcome("pending")


@attrs.frozen(eq=False)
class Watch:
    """engine, web or supervisor → feed: ensure ``symbol`` is subscribed. The reply (if any)
    gets a ``SubscribeOutcome``."""

    symbol: str
    reply: trio.MemorySendChannel[Any] | None = None


@attrs.frozen
class Unwatch:
    """engine → feed: the last open position on ``symbol`` closed: unsubscribe after the
    feed's linger time unless a ``Watch`` comes first. Ignored for the always-subscribed
    products."""

    symbol: str


FeedCommand = Watch | Unwatch
