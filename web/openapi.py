"""``/openapi.json``: the API described from the same attrs classes the handlers structure
requests into (``web.schemas``).

``ROUTES`` lists every route with its request classes and every status it can answer;
``document`` turns that into OpenAPI 3.1, walking the classes' fields. A test checks that every
route the app serves appears here, so the document cannot silently fall behind.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import attrs
from quart import Blueprint, Response, current_app

from tickguard.web import identity, schemas
from tickguard.web.json import json_response
from tickguard.web.services import services_of

openapi = Blueprint("openapi", __name__)

_TIME = schemas.type_schema(datetime)

POSITION: dict[str, Any] = schemas.json_schema(schemas.PositionOut)

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
        "nextCursor": {
            "type": "string",
            "pattern": schemas.CURSOR_PATTERN,
            "description": "Present when more rows exist: pass it back as cursor.",
        },
    },
    "required": ["data"],
}
_EVENTS = {
    "type": "object",
    "properties": {
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "seq": {"type": "integer", "minimum": 1},
                    "type": {"type": "string", "enum": ["position.created", "position.closed"]},
                    "source": {"type": "string", "enum": ["api", "engine"]},
                    "tradeId": {"type": ["integer", "null"]},
                    "createdAt": _TIME,
                    "event": {
                        "type": "object",
                        "description": "The event as sessions received it: type, source, seq, "
                        "recovered (only when true), position (as of the event).",
                        "properties": {"position": {"$ref": "#/components/schemas/Position"}},
                    },
                },
                "required": ["seq", "type", "source", "tradeId", "createdAt", "event"],
            },
        }
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
        "recovery": {
            "type": "object",
            "description": "Gap recovery: per product, the last feed gap flagged and not judged "
            "(reason, trade ids, from/to times, seconds, count); never makes /ready fail.",
        },
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
# Every /api route (web/identity.py): the per-address limit, and the per-user one on writes.
_API = {429: "Rate limit reached (per client address; per user on writes); see Retry-After."}
# Every /api route when AUTH_JWKS_URL is set.
_AUTH = {
    401: "No token, or a token that was refused (WWW-Authenticate says which).",
    403: "userId names another user than the token's sub.",
}
_USER_ID_AUTH = (
    "The acting user. With authentication (AUTH_JWKS_URL set) it may be omitted (it is the "
    "token's sub) and must equal sub when given (403 otherwise); without, it is required and "
    "trusted as sent."
)
# The name of the bearer scheme in components.securitySchemes.
BEARER = "bearer"
_BEARER_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "bearerFormat": "JWT",
    "description": "An RS256 or ES256 JWT of the identity provider at AUTH_JWKS_URL; its sub "
    "is the user. Required on /api/* when AUTH_JWKS_URL is set, not accepted otherwise.",
}


@attrs.frozen
class RouteDoc:
    """One route: what it takes and every status it can answer (status → (description,
    JSON Schema of the body or None for the error body))."""

    method: str
    path: str
    summary: str
    success: tuple[int, str, dict[str, Any]]
    errors: dict[int, str]
    body: type | None = None
    query: type | None = None
    headers: tuple[schemas.Header, ...] = ()
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
        (
            201,
            "Committed (also for an Idempotency-Key replay, with Idempotent-Replayed). "
            "X-Feed-Status (connecting, stale, rejected) when the feed is not live on the symbol.",
            _ONE,
        ),
        {
            **_BODY_ERRORS,
            422: "This Idempotency-Key was used (by this user) with a different body.",
            **_UNAVAILABLE,
        },
        body=schemas.CreatePosition,
        headers=(schemas.IDEMPOTENCY_KEY,),
    ),
    RouteDoc(
        "get",
        "/api/positions",
        "The user's positions, newest createdAt first.",
        (200, "One page.", _PAGE),
        {400: "Invalid query.", **_UNAVAILABLE},
        query=schemas.ListPositionsQuery,
    ),
    RouteDoc(
        "get",
        "/api/positions/closed",
        "The user's closed positions, newest closedAt first.",
        (200, "One page.", _PAGE),
        {400: "Invalid query.", **_UNAVAILABLE},
        query=schemas.ListClosedQuery,
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
        query=schemas.UserQuery,
        path_params=("id",),
    ),
    RouteDoc(
        "get",
        "/api/positions/{id}/events",
        "The position's lifecycle from the event log, oldest first (issue 17): each event's "
        "seq, type, source (api or engine), tradeId (the Coinbase trade of an engine close, "
        "else null), createdAt and event (the body sessions received). Empty once retention "
        "(EVENT_RETENTION_DAYS) pruned a closed position's events.",
        (200, "The events.", _EVENTS),
        {
            400: "Malformed id or query.",
            404: "No position of this user has this id.",
            **_UNAVAILABLE,
        },
        query=schemas.UserQuery,
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
        body=schemas.ClosePosition,
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
        "WebSocket upgrade: the user's events (see API.md). Query: userId; since (an integer "
        ">= 0: first replay the logged events after it; connection.ready then carries "
        "replayComplete). Close codes: 1008 bad userId or since, 1009 frame over 64 KiB, "
        "1013 slow consumer, 1012 gateway restarting, 1001 shutting down, 1011 database "
        "unavailable.",
        (101, "Switching protocols.", _ANY_OBJECT),
        {426: "A plain HTTP request (no WebSocket upgrade)."},
        query=schemas.UserQuery,
    ),
)


def _parameters(route: RouteDoc, auth: bool) -> list[dict[str, Any]]:
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
        for prop in schemas.properties(route.query):
            user = prop.name == identity.USER_ID and _is_api(route.path)
            param: dict[str, Any] = {
                "name": prop.name,
                "in": "query",
                "required": prop.required and not (user and auth),
                "schema": _not_null(prop.schema),
            }
            if prop.default is not None:
                param["schema"]["default"] = prop.default
            if user:
                param["description"] = _USER_ID_AUTH
            elif prop.description:
                param["description"] = prop.description
            params.append(param)
    for header in route.headers:
        params.append(
            {
                "name": header.name,
                "in": "header",
                "required": False,
                "schema": schemas.type_schema(header.kind),
                "description": header.description,
            }
        )
    return params


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a string: its schema without the ``null`` branch."""
    branches = [b for b in schema.get("anyOf", ()) if b != {"type": "null"}]
    return dict(branches[0]) if len(branches) == 1 else dict(schema)


def _is_api(path: str) -> bool:
    return path.startswith("/api/")


def _body_schema(cls: type, auth: bool) -> dict[str, Any]:
    """A request body's schema; its ``userId`` described for both modes, and optional when
    authentication is on."""
    schema = schemas.json_schema(cls)
    if identity.USER_ID in schema["properties"]:
        schema["properties"][identity.USER_ID]["description"] = _USER_ID_AUTH
        if auth:
            schema["required"] = [r for r in schema["required"] if r != identity.USER_ID]
    return schema


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def document(*, auth: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``ROUTES``; ``auth`` when ``AUTH_JWKS_URL`` is set (the
    /api routes then require the bearer scheme and take ``userId`` as optional)."""
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
        api = _is_api(route.path)
        errors = {**route.errors, **(_API if api else {}), **(_AUTH if api and auth else {})}
        for code, text in {**errors, **_COMMON}.items():
            responses[str(code)] = {
                "description": text,
                **_json({"$ref": "#/components/schemas/Error"}),
            }
            if code in (429, 503):
                responses[str(code)]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
            if code == 401:
                responses[str(code)]["headers"] = {
                    "WWW-Authenticate": {"schema": {"type": "string"}}
                }
        operation: dict[str, Any] = {"summary": route.summary, "responses": responses}
        if api:
            # Without authentication the API takes no credentials (the empty requirement).
            operation["security"] = [{BEARER: []}] if auth else [{}]
        params = _parameters(route, auth)
        if params:
            operation["parameters"] = params
        if route.body is not None:
            name = route.body.__name__
            components[name] = _body_schema(route.body, auth)
            operation["requestBody"] = {
                "required": True,
                **_json({"$ref": f"#/components/schemas/{name}"}),
            }
        paths.setdefault(route.path, {})[route.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tickguard",
            "version": "0.1.0",
            "description": "Positions with take-profit/stop-loss, closed server-side. "
            + (
                "Authentication is on: /api/* takes a bearer token whose sub is the user."
                if auth
                else "Authentication is off (AUTH_JWKS_URL unset): userId is trusted as sent, "
                "so the server listens on loopback unless ALLOW_UNAUTHENTICATED=true."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {BEARER: _BEARER_SCHEME},
        },
    }


@openapi.get("/openapi.json")
async def openapi_json() -> Response:
    settings = services_of(current_app).settings
    return json_response(document(auth=settings.auth_jwks_url is not None))
