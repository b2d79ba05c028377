"""The wire format: positions and event messages as JSON with exact decimals, and the
WebSocket close codes. Neutral: storage (the outbox's rendered text), the actors and the web
all use it, and it imports no part of tickguard but the domain values.

Prices are ``Decimal`` end to end; here they become JSON numbers written from the exact
decimal (``65000.5``, never ``65000.499999999``), and JSON read back parses numbers as
``Decimal``. Every HTTP body and WebSocket message goes through ``dumps``/``loads``.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from tickguard.domain import EventSource, EventType, Position

# WebSocket close codes (RFC 6455 and the IANA registry) that tickguard sends; API.md lists
# what each means to a client.
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013

_encoder = msgspec.json.Encoder(decimal_format="number")


# Both run several times for every position written; within one close batch most values repeat
# (one commit time, one trigger time, a few levels), so a small cache saves most of the work.
@functools.lru_cache(maxsize=4096)
def plain_decimal(value: Decimal) -> Decimal:
    """The same number without trailing zeros or an exponent (NUMERIC(18,8) pads to 8 places)."""
    if value == value.to_integral_value():
        return value.quantize(Decimal(1))
    return Decimal(format(value.normalize(), "f"))


@functools.lru_cache(maxsize=4096)
def iso_millis(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and a ``Z``: ``2026-11-24T10:15:30.123Z``."""
    # isoformat is several times faster than strftime, and this runs for every position served.
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text[:-6] + "Z"  # "+00:00" -> "Z"


def _price(value: Decimal | None) -> Decimal | None:
    return None if value is None else plain_decimal(value)


def _time(value: datetime | None) -> str | None:
    return None if value is None else iso_millis(value)


def position_to_json(p: Position) -> dict[str, Any]:
    """The API's Position object (camelCase), ready for ``dumps``."""
    return {
        "id": str(p.id),
        "userId": p.user_id,
        "symbol": p.symbol,
        "side": p.side,
        "entryPrice": plain_decimal(p.entry_price),
        "takeProfit": _price(p.take_profit),
        "stopLoss": _price(p.stop_loss),
        "status": p.status,
        "closePrice": _price(p.close_price),
        "closeReason": p.close_reason,
        "createdAt": iso_millis(p.created_at),
        "updatedAt": iso_millis(p.updated_at),
        "closedAt": _time(p.closed_at),
        "triggeredAt": _time(p.triggered_at),
    }


def event_message(
    type_: EventType, source: EventSource, seq: int, position: Position, *, recovered: bool = False
) -> str:
    """The WebSocket text of one committed event (what the outbox stores and fanout sends).

    ``recovered`` (a close judged from trades fetched after a gap, issue 14) adds
    ``"recovered": true`` next to ``"source"``; other events keep the compatible core's shape.
    """
    body: dict[str, Any] = {"type": type_, "source": source, "seq": seq}
    if recovered:
        body["recovered"] = True
    body["position"] = position_to_json(position)
    return _encoder.encode(body).decode()


def dumps(obj: Any) -> bytes:
    """JSON bytes; Decimal values are written as JSON numbers."""
    return _encoder.encode(obj)


def loads(data: bytes | str) -> Any:
    """Parse JSON with every non-integer number as an exact Decimal (never a float).

    Raises ``ValueError`` for text that is not JSON.
    """
    return json.loads(data, parse_float=Decimal, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON value")
