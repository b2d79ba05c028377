"""One connection's failure stays that connection's (DESIGN.md invariant 13).

hypercorn runs each accepted connection as a ``TCPServer`` task in the server's own nursery, so
an exception that escapes one connection's protocol code ends ``serve`` and every other
connection with it. That happens today with a WebSocket upgrade request followed by a frame in
the same TCP write (h11 ``LocalProtocolError``, upstream issue pgjones/hypercorn#225, still
open; a containment like this one was proposed upstream in #228 and reverted) and with a
reserved-opcode frame racing the ping task (``trio.BusyResourceError``).

``IsolatedConnection`` is hypercorn's own ``TCPServer`` with that one difference: an
``Exception`` out of one connection is logged (one line, no traceback unless debugging) and
counted, the socket is closed by hypercorn's own cleanup, and the server goes on.
Cancellation and ``KeyboardInterrupt`` pass through unchanged. ``install`` makes hypercorn's
trio worker build its connections with it; tickguard's ``serve`` calls it before serving.
"""

from __future__ import annotations

import logging

import hypercorn.trio.run as hypercorn_run
from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger("tickguard.web.isolation")


class ConnectionFailures:
    """How many connections ended with an exception that hypercorn let escape."""

    count: int = 0


class IsolatedConnection(TCPServer):
    """hypercorn's connection handler, except that its failure ends only itself."""

    async def run(self) -> None:
        try:
            await super().run()  # its own ``finally`` closes the socket
        except* Exception as group:
            ConnectionFailures.count += 1
            first = group.exceptions[0]
            log.warning(
                "a connection failed and was closed: %s: %s",
                type(first).__name__,
                first,
                exc_info=group if log.isEnabledFor(logging.DEBUG) else None,
            )


def install() -> None:
    """Make hypercorn's trio worker serve every connection through ``IsolatedConnection``.

    ``hypercorn.trio.run.worker_serve`` looks ``TCPServer`` up in its module when it accepts a
    connection; there is no other hook for a connection's lifetime. Idempotent.
    """
    hypercorn_run.TCPServer = IsolatedConnection  # type: ignore[attr-defined]
