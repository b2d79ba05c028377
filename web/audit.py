"""``GET /api/positions/{id}/events`` (issue 17): one position's lifecycle from the event log.

The same identity and ownership rules as ``GET /api/positions/{id}``: the acting user comes from
the token or ``userId``, and someone else's position is 404, as if it did not exist. The
answer lists the position's events oldest first: who or what made each change (``source``),
at which Coinbase trade for an engine close (``tradeId``), when it committed, and the event
body exactly as sessions received it (``event``). Events of a position closed longer ago than
``EVENT_RETENTION_DAYS`` may have been pruned: the list is then empty.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from quart import Blueprint, Response, current_app, request

from tickguard.storage import eventlog, reads
from tickguard.storage.eventlog import LoggedEvent
from tickguard.web.errors import ApiError
from tickguard.web.identity import acting_user, with_token_user
from tickguard.web.json import json_response
from tickguard.web.schemas import UserQuery, structure
from tickguard.web.services import services_of
from tickguard.wire import iso_millis, loads

audit = Blueprint("audit", __name__)

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def position_id_of(raw: str) -> uuid.UUID:
    """The path id as a UUID; 400 when malformed, as on ``GET /api/positions/{id}``."""
    if not _UUID.fullmatch(raw):
        message = "id must be a UUID."
        raise ApiError(400, message, {"id": message})
    return uuid.UUID(raw)


def event_to_json(event: LoggedEvent) -> dict[str, Any]:
    """One audit entry (camelCase, like every API body)."""
    return {
        "seq": event.seq,
        "type": event.type,
        "source": event.source,
        "tradeId": event.trade_id,
        "createdAt": iso_millis(event.created_at),
        "event": loads(event.message),
    }


@audit.get("/api/positions/<position_id>/events")
async def position_events(position_id: str) -> Response:
    services = services_of(current_app)
    pid = position_id_of(position_id)
    query = structure(UserQuery, with_token_user(request.args.to_dict()))
    user = acting_user(query.user_id)
    if await reads.get_position(services.db, user, pid) is None:
        raise ApiError(404, "Position not found.")
    events = await eventlog.position_events(services.db, user, pid)
    return json_response({"data": [event_to_json(e) for e in events]})
