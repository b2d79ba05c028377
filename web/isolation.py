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

It also keeps hypercorn's keep-alive timeout (issue 16), with one timer task per connection
instead of one per request. hypercorn re-arms its idle timer at the end of every response by
*starting a new task* (``TrioSingleTask.restart``: a lock, a ``nursery.start``, a cancelled
old task), from inside the application's final ``send``. quart-trio cancels that very task as
soon as the response is complete, so in a bare quart-trio app the restart is cancelled
half-way: after its first request a keep-alive connection has no idle timer at all and an
idle client holds it forever. Answered in full (``web.edge`` sends an early answer's end
shielded), the restart cost a quarter of a millisecond per request, a third of the
framework's own cost. ``IdleTimer`` arms and disarms by moving one cancel scope's deadline,
with no checkpoint, so a cancellation cannot interrupt it and it costs nothing per request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import hypercorn.trio.run as hypercorn_run
import trio
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger("tickguard.web.isolation")


class ConnectionFailures:
    """How many connections ended with an exception that hypercorn let escape."""

    count: int = 0


class IdleTimer:
    """One connection's keep-alive timer, in place of hypercorn's ``TrioSingleTask``.

    ``restart`` (the connection became idle) sets the deadline ``timeout`` seconds ahead, or to
    now while the server shuts down; ``stop`` (a request began) sets none. Neither awaits
    anything. One watcher task per connection, started by the first ``restart``, waits for the
    deadline or the server's shutdown and then calls ``close`` (the connection's
    ``_idle_timeout``); ``end`` stops it once the connection stopped reading.
    """

    def __init__(self, timeout: float, terminated: Any) -> None:
        self._timeout = timeout
        self._terminated = terminated  # hypercorn's EventWrapper: is_set(), async wait()
        self._deadline = math.inf
        self._scope: trio.CancelScope | None = None
        self._watching = False
        self._ended = False

    async def restart(self, task_group: TaskGroup, close: Callable[[], Awaitable[None]]) -> None:
        self._set(trio.current_time() + (0 if self._terminated.is_set() else self._timeout))
        if not self._watching:
            self._watching = True
            task_group.spawn(self._watch, close)

    async def stop(self) -> None:
        self._set(math.inf)

    def end(self) -> None:
        """The connection stopped reading: nothing is left to time out."""
        self._ended = True
        if self._scope is not None:
            self._scope.cancel()

    def _set(self, deadline: float) -> None:
        self._deadline = deadline
        if self._scope is not None:
            self._scope.deadline = deadline

    async def _watch(self, close: Callable[[], Awaitable[None]]) -> None:
        while not self._ended:
            with trio.CancelScope(deadline=self._deadline) as self._scope:
                if not self._terminated.is_set():
                    await self._terminated.wait()
                    if self._deadline != math.inf:
                        break  # the server shuts down while this connection is idle
                await trio.sleep_forever()  # busy while shutting down: until idle
            if self._ended:
                return
            if trio.current_time() >= self._deadline:
                break  # idle for the whole timeout
        self._scope = None
        await close()


class IsolatedConnection(TCPServer):
    """hypercorn's connection handler, except that its failure ends only itself, and its
    keep-alive timer is an ``IdleTimer``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        timer = IdleTimer(self.config.keep_alive_timeout, self.context.terminated)
        self.idle_task = self.idle_timer = timer  # type: ignore[assignment]

    async def _idle_timeout(self) -> None:
        # What ``IdleTimer`` calls once the connection was idle for the whole timeout (or the
        # server shuts down while it is idle); hypercorn's own waited for the timeout itself.
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    async def _read_data(self) -> None:
        try:
            await super()._read_data()
        finally:
            self.idle_timer.end()

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
