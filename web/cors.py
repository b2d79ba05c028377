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


class CorsPolicy:
    """The CORS answer for one ``CORS_ORIGIN`` setting (lower-case origins, or ``("*",)``)."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any_origin = "*" in origins
        self.allowed = frozenset(origins)

    def allow_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for a request's ``Origin`` (None: none)."""
        if origin is None:
            return None
        if self.any_origin:
            return "*"
        return origin if origin.lower() in self.allowed else None


def install(app: QuartTrio, origins: tuple[str, ...]) -> None:
    """Answer preflights and add CORS headers for ``origins`` (lower-case, or ``("*",)``)."""
    policy = CorsPolicy(origins)

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
        origin = policy.allow_origin(request.headers.get("Origin"))
        if not policy.any_origin:
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
