"""One WebSocket session's outbound queue: the channel between fanout and the session's task.

Fanout pushes committed events' text into it without ever awaiting a socket; the ``/ws``
endpoint's task pulls from it. Bounded by bytes (DESIGN.md invariant 8): fanout closes an
overflowing queue with 1013. It travels in ``Join``/``Leave`` as a channel handle does (like a
``trio.MemorySendChannel`` in a request): fanout writes to it, the session's task reads it, and
neither reads the other's state through it.
"""

from __future__ import annotations

import collections

import trio


class SessionClosed(Exception):
    """The session was closed; its socket should be closed with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class SessionQueue:
    """One WebSocket session's outbound queue: fanout pushes, the session's own task pulls.

    Nothing here awaits a socket. ``push`` and ``close`` never block; ``next_message`` waits
    for the next queued text or raises ``SessionClosed`` once the session is closed (what was
    still queued is dropped: a closed client resyncs over REST anyway).
    """

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self._queue: collections.deque[tuple[int, str, int]] = collections.deque()
        self._bytes = 0
        self._floor = 0
        self._wake = trio.Event()
        self._closed: SessionClosed | None = None

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def closed(self) -> SessionClosed | None:
        """The close (code and reason) once the session is closed, else None."""
        return self._closed

    def push(self, seq: int, message: str, size: int) -> None:
        """Queue one event's text (``size`` its UTF-8 length); events at or below the floor
        set by ``skip_through`` are dropped, since the client already has them."""
        if self._closed is not None or seq <= self._floor:
            return
        self._queue.append((seq, message, size))
        self._bytes += size
        self._wake.set()

    def skip_through(self, seq: int) -> None:
        """Drop queued events with ``seq <= seq`` and every later push of one.

        The endpoint calls this with the seq it announced in ``connection.ready``: events up to
        there are in the client's REST state, so sending them would duplicate them.
        """
        self._floor = max(self._floor, seq)
        kept = [item for item in self._queue if item[0] > self._floor]
        self._queue = collections.deque(kept)
        self._bytes = sum(size for _, _, size in kept)

    def close(self, code: int, reason: str) -> None:
        """Close the session (the first close wins) and drop its queue. Never blocks."""
        if self._closed is None:
            self._closed = SessionClosed(code, reason)
        self._queue.clear()
        self._bytes = 0
        self._wake.set()

    async def next_message(self) -> str:
        """Wait for the next queued message. Raises ``SessionClosed`` when closed."""
        while True:
            if self._closed is not None:
                raise self._closed
            if self._queue:
                _, message, size = self._queue.popleft()
                self._bytes -= size
                return message
            await self._wake.wait()
            self._wake = trio.Event()
