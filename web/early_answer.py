"""An answer sent before the request body was read closes the connection (finding 9).

A 413 (body over 64 KiB), 415, 405 or 404 can be answered while the client is still sending
the body. The connection cannot be reused after that: the rest of the body would be read as
the next request. hypercorn closes such a connection once the response ends, but it does so
inside the application's final ``send``, and Quart cancels that very task as soon as the
disconnect it is handed there arrives. The close was cancelled half-way, the connection was
left open and idle, and a client reusing it (browsers and HTTP client pools do) waited
forever for an answer to its next request.

``EarlyAnswerClose`` is an ASGI middleware around the app for plain HTTP:

- a response that starts before the request body was complete says ``Connection: close``, so
  that the client does not reuse the connection (and h11 marks it as one that must close);
- the final part of every response is sent shielded from cancellation (bounded by
  ``FINISH_S``), so that hypercorn's end-of-response work, which closes or recycles the
  connection, always runs to its end.

WebSocket and lifespan scopes pass through untouched.
"""

from __future__ import annotations

from typing import Any, cast

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

# Bounds the shielded end of one response: hypercorn's own socket writes are shielded too,
# and a peer that stops reading must not hold the task past this.
FINISH_S = 10.0


class EarlyAnswers:
    """How many responses started before their request's body was complete (and so closed
    their connection)."""

    count: int = 0


def has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request with these (lower-case) headers carries a body: a chunked one, or a
    ``Content-Length`` that is not 0 (hypercorn has already rejected malformed ones)."""
    for name, value in headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length" and value.strip() != b"0":
            return True
    return False


class EarlyAnswerClose:
    """Wraps an ASGI app; see the module docstring."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = not has_body(list(scope["headers"]))

        async def tracked_receive() -> ASGIReceiveEvent:
            nonlocal complete
            event = await receive()
            message = cast(dict[str, Any], event)
            if message["type"] == "http.request" and not message.get("more_body", False):
                complete = True
            elif message["type"] == "http.disconnect":
                complete = True  # nothing more will arrive on this request
            return event

        async def guarded_send(event: ASGISendEvent) -> None:
            message = cast(dict[str, Any], event)
            if message["type"] == "http.response.start" and not complete:
                # The end of a small body may already wait in the queue for the app's reader
                # task: let it run once, so that such a request keeps its connection.
                for _ in range(4):
                    await trio.lowlevel.checkpoint()
            if message["type"] == "http.response.start" and not complete:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    headers.append((b"connection", b"close"))
                event = cast(ASGISendEvent, {**message, "headers": headers})
                EarlyAnswers.count += 1
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # The app's task may be cancelled by the disconnect this very send hands it.
                with trio.CancelScope(shield=True, deadline=trio.current_time() + FINISH_S):
                    await send(event)
                return
            await send(event)

        await self.app(scope, tracked_receive, guarded_send)
