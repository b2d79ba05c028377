"""A request id for every HTTP request (and WebSocket session), in its logs and its response.

``install(app)`` wraps the app's ASGI entry point. For each connection it takes the client's
``X-Request-Id`` when it is sane (1-128 characters of ``[A-Za-z0-9._-]``, so it cannot forge
log lines or bloat them) and otherwise makes a new one, sets ``tickguard.logs.REQUEST_ID``
for everything that runs while the request is handled (the handler and every task it starts),
and echoes the id in the HTTP response's ``X-Request-Id`` header. When the response is done it
logs one access line at DEBUG on ``tickguard.web.access`` (method, path, status, duration).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable

from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPResponseStartEvent,
    HTTPScope,
    Scope,
)
from quart import Quart

from tickguard.logs import REQUEST_ID

HEADER = "X-Request-Id"
_HEADER_KEY = HEADER.lower().encode("ascii")
_SANE = re.compile(rb"[A-Za-z0-9._-]{1,128}")

access_log = logging.getLogger("tickguard.web.access")

AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


def new_request_id() -> str:
    """A fresh id: 32 hex characters, unique enough to grep for."""
    return uuid.uuid4().hex


def request_id_from(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The first ``X-Request-Id`` of an ASGI header list if it is sane, else None."""
    for name, value in headers:
        if name.lower() == _HEADER_KEY:
            return value.decode("ascii") if _SANE.fullmatch(value) else None
    return None


class RequestIds:
    """ASGI middleware: sets the request id around ``app`` and echoes it on HTTP responses.

    Never changes anything but the response's headers; other scope types (lifespan) pass
    through untouched.
    """

    def __init__(self, app: AsgiApp) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"]) or new_request_id()
        token = REQUEST_ID.set(request_id)
        try:
            if scope["type"] == "http":
                await self._http(scope, receive, send, request_id)
            else:
                await self.app(scope, receive, send)
        finally:
            REQUEST_ID.reset(token)

    async def _http(
        self,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        request_id: str,
    ) -> None:
        started = time.perf_counter()
        status: int | None = None

        async def send_with_id(message: ASGISendEvent) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message["headers"] if h[0].lower() != _HEADER_KEY]
                headers.append((_HEADER_KEY, request_id.encode("ascii")))
                echoed = HTTPResponseStartEvent(
                    type="http.response.start", status=message["status"], headers=headers
                )
                if "trailers" in message:
                    echoed["trailers"] = message["trailers"]
                message = echoed
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.debug(
                "%s %s %s %.1fms",
                scope["method"],
                scope["path"],
                status if status is not None else "-",
                (time.perf_counter() - started) * 1000,
            )


def install(app: Quart) -> None:
    """Wrap ``app``'s ASGI entry point with ``RequestIds`` (call once, in ``create_app``)."""
    app.asgi_app = RequestIds(app.asgi_app)  # type: ignore[method-assign]
