"""``GET /health``'s answer, written without the framework's request machinery (issue 16).

Liveness is what load balancers and monitors ask most often, and its answer needs nothing of a
request context: no route lookup, hooks, identity or body. ``web.edge`` answers a plain
``GET /health`` without a body with ``health_body`` and ``response_headers``: the same response
the ``/health`` route writes, with the same headers in the same order (``Content-Type``,
``Content-Length``, then CORS's ``Vary`` and ``Access-Control-*`` for a listed ``Origin``; the
edge then adds ``X-Request-Id``). Anything else (``HEAD``, another method, a request with a
body, another path) goes to the app, so 405s, early-answer closes and the route itself behave
as they did.
"""

from __future__ import annotations

from datetime import UTC, datetime

from tickguard.web.cors import CorsPolicy
from tickguard.wire import dumps, iso_millis

PATH = "/health"
_JSON = (b"content-type", b"application/json")


def health_body() -> bytes:
    """The liveness body: ``{"ok":true,"service":"tickguard","timestamp":"…Z"}``."""
    now = datetime.now(UTC)
    return dumps({"ok": True, "service": "tickguard", "timestamp": iso_millis.__wrapped__(now)})


def response_headers(
    body: bytes, cors: CorsPolicy, request_headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The route's response headers for ``body``, as ASGI pairs, for a request with these
    (lower-case) headers."""
    origin = next((value for name, value in request_headers if name == b"origin"), None)
    return [_JSON, (b"content-length", str(len(body)).encode()), *cors.raw_headers(origin)]
