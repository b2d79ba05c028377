"""An actor's inbox that survives the actor: requests in flight are answered, never left hanging.

The supervisor creates one ``Mailbox`` per actor and keeps it across restarts, so callers
never learn about a restart. A request is any message with a ``reply`` attribute (a one-slot
memory send channel, or None for fire-and-forget). The actor marks a request settled by
answering it through ``answer``; when the actor dies, the supervisor calls ``fail_in_flight``
and every request the actor had taken but not answered gets an ``ActorUnavailable``.
Requests still queued stay queued for the restarted actor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")


class ActorUnavailable(Exception):
    """The actor that held a request died (or stopped) before answering it."""


def answer(request: Any, value: Any) -> None:
    """Send ``value`` (a result or an exception instance) on the request's reply channel.

    Never blocks: the reply channel has one slot and gets exactly one value. A caller that
    gave up waiting has closed its end; that is not an error.
    """
    reply = getattr(request, "reply", None)
    if reply is None:
        return
    try:
        reply.send_nowait(value)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class Mailbox(Generic[T]):
    """A memory channel plus the set of requests the owning actor has taken but not answered."""

    def __init__(self, name: str, capacity: float = math.inf) -> None:
        self.name = name
        self._send, self._receive = trio.open_memory_channel[T](capacity)
        self._in_flight: dict[int, Any] = {}

    # Callers' side.
    async def send(self, message: T) -> None:
        """Queue a message; waits only when the mailbox is bounded and full."""
        await self._send.send(message)

    def send_nowait(self, message: T) -> None:
        """Queue a message; raises ``trio.WouldBlock`` when a bounded mailbox is full."""
        self._send.send_nowait(message)

    # The actor's side.
    async def receive(self) -> T:
        """The next message; a request stays "in flight" until ``settle`` or ``answer``."""
        message = await self._receive.receive()
        self._track(message)
        return message

    def receive_nowait(self) -> T:
        """The next message without waiting; raises ``trio.WouldBlock`` when empty."""
        message = self._receive.receive_nowait()
        self._track(message)
        return message

    def _track(self, message: T) -> None:
        if getattr(message, "reply", None) is not None:
            self._in_flight[id(message)] = message

    def answer(self, request: Any, value: Any) -> None:
        """Answer a request taken from this mailbox and mark it settled."""
        self._in_flight.pop(id(request), None)
        answer(request, value)

    def settle(self, request: Any) -> None:
        """Mark a request settled without answering it here (it was answered elsewhere)."""
        self._in_flight.pop(id(request), None)

    # The supervisor's side.
    def fail_in_flight(self, error: BaseException | None = None) -> int:
        """Answer every request taken but not answered with an error; returns how many."""
        pending = list(self._in_flight.values())
        self._in_flight.clear()
        exc = error or ActorUnavailable(f"{self.name} stopped before answering")
        for request in pending:
            answer(request, exc)
        return len(pending)

    def fail_queued(self, error: BaseException | None = None) -> int:
        """Drain the queue, answering each request with an error (used when the actor is gone
        for good); returns how many messages were dropped."""
        exc = error or ActorUnavailable(f"{self.name} is not running")
        dropped = 0
        while True:
            try:
                message = self._receive.receive_nowait()
            except trio.WouldBlock:
                return dropped
            answer(message, exc)
            dropped += 1

    def pending(self) -> int:
        """Messages queued and not yet received."""
        return self._receive.statistics().current_buffer_used


async def ask(
    mailbox: Mailbox[Any], build: Callable[[trio.MemorySendChannel[Any]], Any], timeout: float
) -> Any:
    """Send the request that ``build(reply)`` makes and wait for its answer.

    Raises the exception instance the actor answered with, ``ActorUnavailable`` when the actor
    died holding it, and ``trio.TooSlowError`` when no answer came within ``timeout`` seconds.
    """
    reply_send, reply_receive = trio.open_memory_channel[Any](1)
    with reply_send, reply_receive:
        with trio.fail_after(timeout):
            await mailbox.send(build(reply_send))
            value = await reply_receive.receive()
    if isinstance(value, BaseException):
        raise value
    return value
