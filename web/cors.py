"""CORS for the browser app: ``CORS_ORIGIN`` (one origin, a list, or ``*``) and preflight.

A matching ``Origin`` gets ``Access-Control-Allow-Origin`` on every response, errors
included (added by ``web.edge``, the one ASGI layer every response passes, from
``CorsPolicy.response_headers``: issue 16, a Quart ``after_request`` hook cost more); a
preflight (``OPTIONS`` with ``Access-Control-Request-Method``) on a known route is answered
204 at once. Other origins get no CORS headers, so the browser blocks them.
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

    def response_headers(
        self, origin: str | None, method: str, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """Add to a response's (ASGI) ``headers`` what answers a request with this ``Origin``
        (None: absent) and method: ``Vary: Origin`` unless any origin is allowed, and for an
        allowed origin ``Access-Control-Allow-Origin`` and the exposed headers, plus the
        preflight's allowed methods, headers and max age for ``OPTIONS``."""
        if not self.any_origin:
            _add_vary_origin(headers)
        allowed = self.allow_origin(origin)
        if allowed is None:
            return
        headers.append((b"access-control-allow-origin", allowed.encode("latin-1")))
        headers.append((b"access-control-expose-headers", _EXPOSED))
        if method == "OPTIONS":
            headers.extend(_PREFLIGHT)


_EXPOSED = EXPOSED_HEADERS.encode("ascii")
_PREFLIGHT = (
    (b"access-control-allow-methods", ALLOWED_METHODS.encode("ascii")),
    (b"access-control-allow-headers", ALLOWED_HEADERS.encode("ascii")),
    (b"access-control-max-age", PREFLIGHT_MAX_AGE.encode("ascii")),
)


def _add_vary_origin(headers: list[tuple[bytes, bytes]]) -> None:
    """``Vary: Origin``, merged into a ``Vary`` header the response already has."""
    for n, (name, value) in enumerate(headers):
        if name.lower() == b"vary":
            if b"origin" not in value.lower() and value.strip() != b"*":
                headers[n] = (name, value + b", Origin")
            return
    headers.append((b"vary", b"Origin"))


def install(app: QuartTrio) -> None:
    """Answer preflights on known routes (their CORS headers are added by ``web.edge``, as on
    every response: ``CorsPolicy.response_headers``)."""

    @app.before_request
    async def _preflight() -> Response | None:
        if (
            request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
            and request.url_rule is not None
        ):
            return Response(b"", status=204)
        return None
