"""The REST routes of API.md for positions (/health and /ready are ``web.probes``).

Reads go straight to storage; every write is a request to the persistence actor (``ask``),
which commits before it answers. Handlers structure requests into the classes of
``web.schemas`` (the same ones ``/openapi.json`` documents) and raise ``ApiError`` or a known
exception, which ``web.errors`` turns into the JSON error body. Every success body is written
by ``wire``.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from decimal import Decimal
from typing import Any

from quart import Blueprint, Response, current_app, request

from tickguard.actors.mailbox import ask
from tickguard.actors.messages import (
    CloseOrder,
    CloseOutcome,
    CloseRequest,
    CloseResult,
    CreateRequest,
    CreateResult,
    NewPosition,
)
from tickguard.storage import IdempotencyKeyReused, reads
from tickguard.web.errors import ApiError, unavailable
from tickguard.web.identity import acting_user, with_token_user
from tickguard.web.json import json_response, page_bytes, raw_json_response
from tickguard.web.pages import page_reader
from tickguard.web.schemas import (
    IDEMPOTENCY_KEY,
    LIST_BOUND,
    ClosePosition,
    CreatePosition,
    ListClosedQuery,
    ListPositionsQuery,
    UserQuery,
    ValidationError,
    parse_header,
    structure,
)
from tickguard.web.services import AppServices, services_of
from tickguard.web.symbols import SymbolRejected, SymbolUnchecked, ensure_symbol
from tickguard.wire import loads, position_to_json

routes = Blueprint("routes", __name__)

# The exact bracket messages of the earlier backend (API.md "Compatible core").
LONG_TP = "For long positions, takeProfit must be above entryPrice."
SHORT_TP = "For short positions, takeProfit must be below entryPrice."
LONG_SL = "For long positions, stopLoss must be below entryPrice."
SHORT_SL = "For short positions, stopLoss must be above entryPrice."

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _services() -> AppServices:
    return services_of(current_app)


async def _json_body() -> Any:
    """The request body parsed as JSON (numbers as Decimal); 413 beyond 64 KiB, 400 if not
    JSON."""
    data = await request.get_data()  # raises 413 past MAX_CONTENT_LENGTH
    try:
        return loads(data)
    except (ValueError, RecursionError):
        raise ApiError(400, "The request body is not valid JSON.") from None


def _position_id(raw: str) -> uuid.UUID:
    """The path id as a UUID; 400 when malformed (a router converter would make it a 404)."""
    if not _UUID.fullmatch(raw):
        message = "id must be a UUID."
        raise ApiError(400, message, {"id": message})
    return uuid.UUID(raw)


def bracket_error(side: str, entry: Decimal, tp: Decimal | None, sl: Decimal | None) -> str | None:
    """The first broken bracket rule's exact message, or None when the bracket is valid."""
    if side == "long":
        if tp is not None and tp <= entry:
            return LONG_TP
        if sl is not None and sl >= entry:
            return LONG_SL
    else:
        if tp is not None and tp >= entry:
            return SHORT_TP
        if sl is not None and sl <= entry:
            return SHORT_SL
    return None


def _check_bracket(body: CreatePosition, entry: Decimal) -> None:
    problem = bracket_error(body.side, entry, body.take_profit, body.stop_loss)
    if problem is not None:
        field = "takeProfit" if "takeProfit" in problem else "stopLoss"
        raise ApiError(400, problem, {field: problem})


async def _last_price(services: AppServices, symbol: str) -> Decimal | None:
    """The symbol's last traded price: this process's feed, or (api role, issue 17) what the
    owning engine published to Redis."""
    if services.prices is None:
        slot = services.slots.peek(symbol)
        return slot.last_price if slot is not None else None
    try:
        return await services.prices(symbol)
    except Exception as exc:  # Redis away: the price is unknown for now, not a crash
        raise unavailable(f"the last price of {symbol} cannot be read right now") from exc


def fingerprint(body: CreatePosition) -> str:
    """sha256 of the create request as structured, prices in canonical form (so ``"65000.0"``
    and ``65000`` are the same body): what an Idempotency-Key replay must match."""
    parts = [body.user_id, body.symbol, body.side]
    for price in (body.entry_price, body.take_profit, body.stop_loss):
        parts.append("" if price is None else format(price.normalize(), "f"))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


# The feed states of /ready in which nothing watches a symbol's price yet.
_NOT_WATCHING = ("connecting", "stale", "rejected")


def _feed_state(services: AppServices, symbol: str) -> str | None:
    """The feed's state for ``symbol`` when it is not ``live`` (None when live or unknown)."""
    if services.feed_status is None:
        return None
    state = services.feed_status.product_state(symbol) or "connecting"
    return state if state in _NOT_WATCHING else None


@routes.post("/api/positions")
async def create_position() -> Response:
    services = _services()
    body = structure(CreatePosition, with_token_user(await _json_body()))
    user = acting_user(body.user_id)
    raw_key = request.headers.get(IDEMPOTENCY_KEY.name)
    key: str | None = None if raw_key is None else parse_header(IDEMPOTENCY_KEY, raw_key)
    symbol: str = body.symbol
    entry: Decimal | None = body.entry_price
    if entry is not None:
        # A bad bracket is answered before waiting on the feed for the symbol.
        _check_bracket(body, entry)
    try:
        await ensure_symbol(services, symbol)
    except SymbolRejected:
        message = f"Unknown symbol: {symbol} is not a valid product."
        raise ApiError(400, message, {"symbol": message}) from None
    except SymbolUnchecked:
        raise unavailable("Coinbase's product list has not been read yet.") from None
    if entry is None:
        entry = await _last_price(services, symbol)
        if entry is None:
            message = f"entryPrice is required: there is no market price for {symbol} yet."
            raise ApiError(400, message, {"entryPrice": message})
        _check_bracket(body, entry)
    new = NewPosition(
        user_id=user,
        symbol=symbol,
        side=body.side,
        entry_price=entry,
        take_profit=body.take_profit,
        stop_loss=body.stop_loss,
        idempotency_key=key,
        fingerprint=fingerprint(body) if key is not None else None,
    )
    try:
        result: CreateResult = await ask(
            services.persistence,
            lambda reply: CreateRequest(new=new, reply=reply),
            timeout=services.request_timeout,
        )
    except IdempotencyKeyReused:
        message = "This Idempotency-Key was already used with a different request body."
        raise ApiError(422, message, {IDEMPOTENCY_KEY.name: message}) from None
    # A replay answers exactly like the first request did, and says so in a header.
    headers = {} if result.created else {"Idempotent-Replayed": "true"}
    state = _feed_state(services, symbol)
    if state is not None:
        # Committed, but nothing watches the price yet: say so (API.md "Beyond").
        headers["X-Feed-Status"] = state
    return json_response({"data": position_to_json(result.position)}, 201, headers)


@routes.get("/api/positions")
async def list_positions() -> Response:
    query = structure(ListPositionsQuery, with_token_user(request.args.to_dict()))
    user = acting_user(query.user_id)
    ask = reads.PageAsk.of(user, query.status, query.limit or LIST_BOUND, query.cursor)
    # Read together with the other pages asked for at this moment (web.batched).
    body, cursor = await page_reader(current_app).get(ask)
    return _page(body, cursor)


@routes.get("/api/positions/closed")
async def list_closed() -> Response:
    services = _services()
    query = structure(ListClosedQuery, with_token_user(request.args.to_dict()))
    body, cursor = await reads.list_closed_json(
        services.db, acting_user(query.user_id), query.limit or LIST_BOUND, query.cursor
    )
    return _page(body, cursor)


def _page(objects: str, cursor: str | None) -> Response:
    return raw_json_response(page_bytes(objects, cursor))


@routes.get("/api/positions/<position_id>")
async def get_position(position_id: str) -> Response:
    services = _services()
    pid = _position_id(position_id)
    query = structure(UserQuery, with_token_user(request.args.to_dict()))
    position = await reads.get_position(services.db, acting_user(query.user_id), pid)
    if position is None:
        raise ApiError(404, "Position not found.")
    return json_response({"data": position_to_json(position)})


@routes.post("/api/positions/<position_id>/close")
async def close_position(position_id: str) -> Response:
    services = _services()
    # 400 for a malformed id or body comes before any lookup (API.md: 400 → 404 → 409).
    details: dict[str, str] = {}
    try:
        pid = _position_id(position_id)
    except ApiError as bad_id:
        details.update(bad_id.details or {})
    raw = await _json_body()
    body: ClosePosition | None = None
    try:
        body = structure(ClosePosition, with_token_user(raw))
    except ValidationError as bad_body:
        details.update(bad_body.details)
    if details or body is None:
        raise ApiError(400, " ".join(details.values()), details)
    order = CloseOrder(pid, body.close_price, body.reason, user_id=acting_user(body.user_id))
    results: tuple[CloseResult, ...] = await ask(
        services.persistence,
        lambda reply: CloseRequest(orders=(order,), source="api", reply=reply),
        timeout=services.request_timeout,
    )
    result = results[0]
    if result.outcome is CloseOutcome.CLOSED and result.position is not None:
        return json_response({"data": position_to_json(result.position)})
    if result.outcome is CloseOutcome.NOT_FOUND:
        raise ApiError(404, "Position not found.")
    if result.outcome is CloseOutcome.ALREADY_CLOSED:
        raise ApiError(409, "Position is already closed.")
    raise unavailable("The position could not be closed; try again.")
