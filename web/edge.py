"""The one ASGI layer around the app: request ids, the access line, early-answer closes and
CORS response headers, in a single wrapper (issue 16: every layer costs each request a
coroutine and a wrapped ``send``; these were three layers and a Quart hook).

For each HTTP request and WebSocket session ``Edge``:

- sets ``tickguard.logs.REQUEST_ID`` to the client's ``X-Request-Id`` when it is sane, else a
  new one (``web.request_ids``), for everything that runs while it is handled, and echoes it
  in the HTTP response's ``X-Request-Id`` header (replacing any the app set);
- logs one access line at DEBUG on ``tickguard.web.access`` when the response is done
  (method, path, status, duration);
- adds the CORS headers for the request's ``Origin`` to every HTTP response, errors included
  (``web.cors.CorsPolicy.response_headers``);
- for plain HTTP, applies ``web.early_answer``'s rules: a response that starts before the
  request body was complete says ``Connection: close``, and the final part of every response
  is sent shielded from cancellation (bounded by ``FINISH_S``).

Every request, ``/health`` included, is answered by the app (Quart's routing and hooks): an
answer written here, below the framework, was measured (``/health`` above B, the bare
framework's rate) and dropped, since the design card has Quart do the routing
(docs/DECISIONS.md).

Lifespan scopes pass through untouched; WebSocket scopes get only the request id.
"""

from __future__ import annotations

import time
from typing import Any, cast

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
)
from quart import Quart

from tickguard.logs import REQUEST_ID
from tickguard.web.cors import CorsPolicy
from tickguard.web.early_answer import FINISH_S, EarlyAnswers
from tickguard.web.request_ids import access_log, new_request_id, sane_request_id

_HEADER_KEY = b"x-request-id"
_CONNECTION_CLOSE = (b"connection", b"close")


class Edge:
    """Wraps an ASGI app; see the module docstring."""

    def __init__(self, app: Any, cors: CorsPolicy) -> None:
        self.app = app
        self.cors = cors

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        # One pass over the request's (lower-case) headers for all this layer reads.
        client_id: str | None = None
        seen_id = body = False
        origin: str | None = None
        for name, value in scope["headers"]:
            if name == _HEADER_KEY:
                if not seen_id:  # the first one counts
                    seen_id, client_id = True, sane_request_id(value)
            elif name == b"content-length":
                body = body or value.strip() != b"0"
            elif name == b"transfer-encoding":
                body = True
            elif name == b"origin" and origin is None:
                origin = value.decode("latin-1")
        request_id = client_id or new_request_id()
        token = REQUEST_ID.set(request_id)
        try:
            if scope["type"] == "http":
                await self._http(scope, body, origin, receive, send, request_id)
            else:
                await self.app(scope, receive, send)
        finally:
            REQUEST_ID.reset(token)

    async def _http(
        self,
        scope: HTTPScope,
        body: bool,
        origin: str | None,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        request_id: str,
    ) -> None:
        started = time.perf_counter()
        status: int | None = None
        complete = not body
        echo = (_HEADER_KEY, request_id.encode("ascii"))
        try:

            async def tracked_receive() -> ASGIReceiveEvent:
                nonlocal complete
                event = await receive()
                message = cast(dict[str, Any], event)
                if message["type"] == "http.request" and not message.get("more_body", False):
                    complete = True
                elif message["type"] == "http.disconnect":
                    complete = True  # nothing more will arrive on this request
                return event

            async def edge_send(event: ASGISendEvent) -> None:
                nonlocal status
                message = cast(dict[str, Any], event)
                kind = message["type"]
                if kind == "http.response.start":
                    status = message["status"]
                    if not complete:
                        # The end of a small body may already wait in the queue for the app's
                        # reader task: let it run once, so that such a request keeps its
                        # connection.
                        for _ in range(4):
                            await trio.lowlevel.checkpoint()
                    out = [h for h in message.get("headers", []) if h[0].lower() != _HEADER_KEY]
                    out.append(echo)
                    self.cors.response_headers(origin, scope["method"], out)
                    if not complete:
                        if not any(name.lower() == b"connection" for name, _ in out):
                            out.append(_CONNECTION_CLOSE)
                        EarlyAnswers.count += 1
                    await send(cast(ASGISendEvent, {**message, "headers": out}))
                    return
                if kind == "http.response.body" and not message.get("more_body", False):
                    # The app's task may be cancelled by the disconnect this very send hands
                    # it.
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + FINISH_S):
                        await send(event)
                    return
                await send(event)

            await self.app(scope, receive if complete else tracked_receive, edge_send)
        finally:
            access_log.debug(
                "%s %s %s %.1fms",
                scope["method"],
                scope["path"],
                status if status is not None else "-",
                (time.perf_counter() - started) * 1000,
            )


def install(app: Quart, cors: CorsPolicy) -> None:
    """Wrap ``app``'s ASGI entry point with ``Edge`` (call once, last, in ``create_app``)."""
    app.asgi_app = Edge(app.asgi_app, cors)  # type: ignore[method-assign]
