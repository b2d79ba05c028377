"""``GET /health`` answered before the framework's request machinery (issue 16).

Liveness is what load balancers and monitors ask most often, and its answer needs nothing of a
request context: no route lookup, hooks, identity or body. ``HealthAnswer`` is an ASGI
middleware (inside ``web.request_ids``, so the request id, its echo and the access line stay)
that writes the same response the ``/health`` route writes, with the same headers in the same
order (``Content-Type``, ``Content-Length``, then CORS's ``Vary`` and
``Access-Control-*`` for a listed ``Origin``), for a plain ``GET /health`` without a body.
Anything else (``HEAD``, another method, a request with a body, another path) goes to the app
as before, so 405s, early-answer closes and the route itself behave as they did.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from tickguard.web.cors import CorsPolicy
from tickguard.web.early_answer import has_body
from tickguard.wire import dumps, iso_millis

PATH = "/health"
_JSON = (b"content-type", b"application/json")


def health_body() -> bytes:
    """The liveness body: ``{"ok":true,"service":"tickguard","timestamp":"…Z"}``."""
    now = datetime.now(UTC)
    return dumps({"ok": True, "service": "tickguard", "timestamp": iso_millis.__wrapped__(now)})


def _origin(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"origin":
            return value
    return None


class HealthAnswer:
    """Wraps an ASGI app; answers a plain ``GET /health`` itself (see the module docstring)."""

    def __init__(self, app: Any, cors: CorsPolicy) -> None:
        self.app = app
        self.cors = cors

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "GET"
            or has_body(list(scope["headers"]))
        ):
            await self.app(scope, receive, send)
            return
        body = health_body()
        headers = [_JSON, (b"content-length", str(len(body)).encode())]
        headers += self.cors.raw_headers(_origin(list(scope["headers"])))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
