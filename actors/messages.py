"""The messages actors exchange over memory channels.

No actor reads another actor's state: everything crosses a channel as one of these values, or
as one of the domain values (``tickguard.domain``, re-exported here for the actors' use). A
request that wants an answer carries a one-slot reply channel (``reply``); the receiver sends
exactly one value on it, or an exception instance when it failed.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Literal

import attrs
import trio

from tickguard.actors.session_queue import SessionQueue
from tickguard.actors.window import Hold
from tickguard.domain import (
    CloseOrder,
    CloseOutcome,
    CloseReason,
    CloseResult,
    CreateResult,
    Event,
    EventSource,
    EventType,
    NewPosition,
    Position,
    Side,
    Status,
    Watermark,
)

__all__ = [
    "AdvanceWatermark",
    "RecoverGap",
    "Watermark",
    "CloseOrder",
    "CloseOutcome",
    "CloseReason",
    "CloseRequest",
    "CloseResult",
    "CreateRequest",
    "CreateResult",
    "Event",
    "FanoutMessage",
    "FeedCommand",
    "EventSource",
    "EventType",
    "Join",
    "Leave",
    "NewPosition",
    "PersistenceRequest",
    "Position",
    "Side",
    "Status",
    "SubscribeOutcome",
    "Track",
    "Untrack",
    "Unwatch",
    "Watch",
    "Pin",
    "Drop",
    "WriteRejected",
]


class WriteRejected(Exception):
    """This request failed on its own (not because the database is away); nothing of it was
    written. The web answers it 500; it never reaches other requests of the same group."""


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
    # engine only: every window up to this trade was judged and everything it triggered is in
    # this request; it advances in the closes' transaction (issue 14).
    watermark: Watermark | None = None


@attrs.frozen
class AdvanceWatermark:
    """engine → persistence, fire-and-forget: every window up to ``mark`` was judged and every
    close it triggered is answered; write it (a write of its own, rate-limited by the engine)."""

    mark: Watermark
    reply: None = None


@attrs.frozen(eq=False)
class RecoverGap:
    """feed → recovery: fetch the trades of ``hold`` (a gap the feed found in its slot),
    deliver them into it and release it."""

    hold: Hold


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


@attrs.frozen
class Pin:
    """engine role → feed: the products to keep subscribed whatever the engines watch (the
    ``COINBASE_PRODUCTS`` of the partitions this process owns, issue 18); replaces the feed's
    configured ones."""

    products: frozenset[str]


@attrs.frozen
class Drop:
    """engine role → feed: these symbols' partitions went to another engine: unsubscribe now
    (no linger), ignore their tickers until watched again, and forget their last trade, so a
    later subscription recovers from the durable watermark (issue 18)."""

    symbols: frozenset[str]


@attrs.frozen(eq=False)
class Join:
    """/ws → fanout: deliver this user's events to ``queue`` from now on."""

    queue: SessionQueue


@attrs.frozen(eq=False)
class Leave:
    """/ws → fanout: the session ended; stop delivering to it."""

    queue: SessionQueue


# What each actor's mailbox carries.
PersistenceRequest = CreateRequest | CloseRequest | AdvanceWatermark
FanoutMessage = Event | Join | Leave
FeedCommand = Watch | Unwatch | Pin | Drop
