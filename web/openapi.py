"""``/openapi.json``: the API described from the same schema tables the handlers validate with.

``ROUTES`` lists every route with its request schemas (objects of ``web.schemas``) and every
status it can answer; ``document`` turns that into OpenAPI 3.1. A test checks that every route
the app serves appears here, so the document cannot silently fall behind.
"""

from __future__ import annotations

from typing import Any

import attrs
from quart import Blueprint, Response

from tickguard.web import schemas
from tickguard.web.json import json_response
from tickguard.web.schemas import Schema

openapi = Blueprint("openapi", __name__)

_UUID = {"type": "string", "format": "uuid"}
_PRICE_OUT = {"type": "number", "description": "Exact decimal, written as a JSON number."}
_NULL_PRICE_OUT = {"anyOf": [_PRICE_OUT, {"type": "null"}]}
_TIME = {"type": "string", "format": "date-time", "example": "2026-11-24T10:15:30.123Z"}
_NULL_TIME = {"anyOf": [_TIME, {"type": "null"}]}

POSITION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "userId": {"type": "string"},
        "symbol": {"type": "string", "example": "BTC-USD"},
        "side": {"type": "string", "enum": ["long", "short"]},
        "entryPrice": _PRICE_OUT,
        "takeProfit": _NULL_PRICE_OUT,
        "stopLoss": _NULL_PRICE_OUT,
        "status": {"type": "string", "enum": ["open", "closed"]},
        "closePrice": _NULL_PRICE_OUT,
        "closeReason": {
            "anyOf": [
                {"type": "string", "enum": ["take_profit", "stop_loss", "manual", "system"]},
                {"type": "null"},
            ]
        },
        "createdAt": _TIME,
        "updatedAt": _TIME,
        "closedAt": _NULL_TIME,
        "triggeredAt": {
            **_NULL_TIME,
            "description": "Coinbase trade time that triggered an engine close.",
        },
    },
    "required": [
        "id",
        "userId",
        "symbol",
        "side",
        "entryPrice",
        "takeProfit",
        "stopLoss",
        "status",
        "closePrice",
        "closeReason",
        "createdAt",
        "updatedAt",
        "closedAt",
    ],
}

ERROR: dict[str, Any] = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "One human-readable sentence."},
        "details": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Field → message, for validation errors.",
        },
    },
    "required": ["error"],
}

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_ONE = {
    "type": "object",
    "properties": {"data": {"$ref": "#/components/schemas/Position"}},
    "required": ["data"],
}
_PAGE = {
    "type": "object",
    "properties": {
        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Position"}},
        "nextCursor": {"type": "string", "description": "Present when more rows exist."},
    },
    "required": ["data"],
}
_HEALTH = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "service": {"type": "string"},
        "timestamp": _TIME,
    },
    "required": ["ok", "service", "timestamp"],
}
_READY = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "database": {"type": "string", "enum": ["ok", "unavailable"]},
        "feed": {"type": "object", "description": "Per product: state and age of last message."},
    },
}

# Statuses every route can answer besides its own.
_COMMON = {
    404: "Unknown route.",
    405: "Method not allowed on this route.",
    500: "Internal error. (details only in the server log)",
}
_BODY_ERRORS = {
    400: "Validation error, or a body that is not JSON.",
    413: "Body larger than 64 KiB.",
    415: "Content-Type is not application/json (parameters such as charset allowed).",
}
_UNAVAILABLE = {503: "Database unavailable (or an actor did not answer); see Retry-After."}


@attrs.frozen
class RouteDoc:
    """One route: what it takes and every status it can answer (status → (description,
    JSON Schema of the body or None for the error body))."""

    method: str
    path: str
    summary: str
    success: tuple[int, str, dict[str, Any]]
    errors: dict[int, str]
    body: Schema | None = None
    query: Schema | None = None
    headers: tuple[schemas.Field, ...] = ()
    path_params: tuple[str, ...] = ()
    media_type: str = "application/json"  # of the success body


ROUTES: tuple[RouteDoc, ...] = (
    RouteDoc("get", "/health", "Liveness.", (200, "The process answers.", _HEALTH), {}),
    RouteDoc(
        "get",
        "/ready",
        "Readiness: 200 when the database answers.",
        (200, "Ready; the body also reports the feed per product.", _READY),
        {503: "The database does not answer (the body still reports the feed)."},
    ),
    RouteDoc(
        "post",
        "/api/positions",
        "Open a position.",
        (201, "Committed (also for an Idempotency-Key replay, with Idempotent-Replayed).", _ONE),
        {**_BODY_ERRORS, **_UNAVAILABLE},
        body=schemas.CREATE_POSITION,
        headers=(schemas.IDEMPOTENCY_KEY,),
    ),
    RouteDoc(
        "get",
        "/api/positions",
        "The user's positions, newest createdAt first.",
        (200, "One page.", _PAGE),
        {400: "Invalid query.", **_UNAVAILABLE},
        query=schemas.LIST_POSITIONS,
    ),
    RouteDoc(
        "get",
        "/api/positions/closed",
        "The user's closed positions, newest closedAt first.",
        (200, "One page.", _PAGE),
        {400: "Invalid query.", **_UNAVAILABLE},
        query=schemas.LIST_CLOSED,
    ),
    RouteDoc(
        "get",
        "/api/positions/{id}",
        "One position of the user.",
        (200, "The position.", _ONE),
        {
            400: "Malformed id or query.",
            404: "No position of this user has this id.",
            **_UNAVAILABLE,
        },
        query=schemas.USER_QUERY,
        path_params=("id",),
    ),
    RouteDoc(
        "post",
        "/api/positions/{id}/close",
        "Close an open position of the user (checks: 400, then 404, then 409).",
        (200, "The closed position.", _ONE),
        {
            **_BODY_ERRORS,
            404: "Position not found (or someone else's).",
            409: "Position is already closed.",
            **_UNAVAILABLE,
        },
        body=schemas.CLOSE_POSITION,
        path_params=("id",),
    ),
    RouteDoc(
        "get",
        "/metrics",
        "Prometheus metrics: ticks, reconnects, window latency, open positions, closes by "
        "reason, WebSocket sessions, dropped slow sessions, database errors.",
        (200, "Prometheus text exposition format.", {"type": "string"}),
        {},
        media_type="text/plain",
    ),
    RouteDoc(
        "get",
        "/openapi.json",
        "This document.",
        (200, "OpenAPI 3.1.", _ANY_OBJECT),
        {},
    ),
    RouteDoc(
        "get",
        "/ws",
        "WebSocket upgrade: the user's events (see API.md). Query: userId. Close codes: 1008 "
        "bad userId, 1009 frame over 64 KiB, 1013 slow consumer, 1012 gateway restarting, "
        "1001 shutting down, 1011 database unavailable.",
        (101, "Switching protocols.", _ANY_OBJECT),
        {426: "A plain HTTP request (no WebSocket upgrade)."},
        query=schemas.USER_QUERY,
    ),
)


def _parameters(route: RouteDoc) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "format": "uuid"},
        }
        for name in route.path_params
    ]
    if route.query is not None:
        for field in route.query.fields:
            param: dict[str, Any] = {
                "name": field.name,
                "in": "query",
                "required": field.required,
                "schema": dict(field.schema),
            }
            if field.default is not None:
                param["schema"]["default"] = field.default
            if field.description:
                param["description"] = field.description
            params.append(param)
    for field in route.headers:
        params.append(
            {
                "name": field.name,
                "in": "header",
                "required": field.required,
                "schema": dict(field.schema),
                "description": field.description,
            }
        )
    return params


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``ROUTES``."""
    paths: dict[str, dict[str, Any]] = {}
    components: dict[str, Any] = {"Position": POSITION, "Error": ERROR}
    for route in ROUTES:
        status, description, body_schema = route.success
        responses: dict[str, Any] = {
            str(status): {
                "description": description,
                "content": {route.media_type: {"schema": body_schema}},
            }
        }
        for code, text in {**route.errors, **_COMMON}.items():
            responses[str(code)] = {
                "description": text,
                **_json({"$ref": "#/components/schemas/Error"}),
            }
            if code == 503:
                responses[str(code)]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
        operation: dict[str, Any] = {"summary": route.summary, "responses": responses}
        params = _parameters(route)
        if params:
            operation["parameters"] = params
        if route.body is not None:
            components[route.body.name] = schemas.json_schema(route.body)
            operation["requestBody"] = {
                "required": True,
                **_json({"$ref": f"#/components/schemas/{route.body.name}"}),
            }
        paths.setdefault(route.path, {})[route.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tickguard",
            "version": "0.1.0",
            "description": "Positions with take-profit/stop-loss, closed server-side. "
            "userId is trusted as sent: bind to localhost until authentication lands.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }


@openapi.get("/openapi.json")
async def openapi_json() -> Response:
    return json_response(document())
