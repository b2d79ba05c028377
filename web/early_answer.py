"""An answer sent before the request body was read closes the connection (finding 9).

A 413 (body over 64 KiB), 415, 405 or 404 can be answered while the client is still sending
the body. The connection cannot be reused after that: the rest of the body would be read as
the next request. hypercorn closes such a connection once the response ends, but it does so
inside the application's final ``send``, and Quart cancels that very task as soon as the
disconnect it is handed there arrives. The close was cancelled half-way, the connection was
left open and idle, and a client reusing it (browsers and HTTP client pools do) waited
forever for an answer to its next request.

``web.edge`` (the one ASGI layer around the app) applies, for plain HTTP:

- a response that starts before the request body was complete says ``Connection: close``, so
  that the client does not reuse the connection (and h11 marks it as one that must close);
- the final part of every response is sent shielded from cancellation (bounded by
  ``FINISH_S``), so that hypercorn's end-of-response work, which closes or recycles the
  connection, always runs to its end.

This module holds ``FINISH_S`` and the ``EarlyAnswers`` count; ``web.edge`` tells whether a
request carries a body (chunked, or a ``Content-Length`` that is not 0).
"""

from __future__ import annotations

# Bounds the shielded end of one response: hypercorn's own socket writes are shielded too,
# and a peer that stops reading must not hold the task past this.
FINISH_S = 10.0


class EarlyAnswers:
    """How many responses started before their request's body was complete (and so closed
    their connection)."""

    count: int = 0
