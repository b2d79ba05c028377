"""CORS for the browser app: ``CORS_ORIGIN`` (one origin, a list, or ``*``) and preflight.

A matching ``Origin`` gets ``Access-Control-Allow-Origin`` on every response, errors
included; a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) on a known route
is answered 204 at once. Other origins get no CORS headers, so the browser blocks them.
"""

from __future__ import annotations

from quart import Response, request
from quart_trio import QuartTrio

ALLOWED_METHODS = "GET, POST, PATCH, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-Id"
EXPOSED_HEADERS = "Retry-After, Idempotent-Replayed, X-Request-Id, X-Feed-Status, WWW-Authenticate"
PREFLIGHT_MAX_AGE = "600"


def install(app: QuartTrio, origins: tuple[str, ...]) -> None:
    """Answer preflights and add CORS headers for ``origins`` (lower-case, or ``("*",)``)."""
    any_origin = "*" in origins
    allowed = frozenset(origins)

    def allow_origin(origin: str | None) -> str | None:
        if origin is None:
            return None
        if any_origin:
            return "*"
        return origin if origin.lower() in allowed else None

    @app.before_request
    async def _preflight() -> Response | None:
        if (
            request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
            and request.url_rule is not None
        ):
            return Response(b"", status=204)
        return None

    @app.after_request
    async def _headers(response: Response) -> Response:
        origin = allow_origin(request.headers.get("Origin"))
        if not any_origin:
            response.vary.add("Origin")
        if origin is None:
            return response
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        return response
