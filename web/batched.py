"""Reads for many waiting requests in one query: the pattern of ``SeqReader`` (hardening
finding 6) and of ``GET /api/positions`` (issue 16), in one place.

Each database call costs the request path a crossing into asyncio (trio-asyncio), a pool
acquire and release, and a round trip, however small the answer; under load the requests
waiting at the same moment can share them. ``BatchedReads(read)`` has no background task: a
caller that finds fewer than ``max_in_flight`` reads in progress leads one, taking everyone
waiting (up to ``max_batch``), and calls ``read(keys)`` once; the others wait for it. When a
read ends, the first caller still waiting leads the next one. Callers that arrive while reads
run go into a later read, so every answer comes from a query that started after its caller
asked (a client reads its own writes). With one read in flight (the default) the database
runs one batch's query at a time while the next batch gathers; with two, a second query can
run on another core meanwhile (the page reads: with one, the server waited on PostgreSQL a
third of the time under load, issue 16).

A read that fails with ``DatabaseUnavailable`` fails everyone in it. Any other failure is
taken as one caller's input upsetting a query that serves many (invariant 13: one request may
fail only itself): each caller of that batch then reads alone and gets its own answer or its
own error.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

from tickguard.storage import DatabaseUnavailable

K = TypeVar("K")
V = TypeVar("V")


class _Ask(Generic[K, V]):
    """One caller's wait for its answer."""

    def __init__(self, key: K) -> None:
        self.key = key
        self.done = False
        self.gone = False  # its caller stopped waiting (cancelled)
        self.value: V | None = None
        self.error: Exception | None = None
        self.alone = False  # its batch failed for another reason: read it by itself
        self.wake = trio.Event()

    def answer(self, value: V) -> None:
        self.done, self.value = True, value
        self.wake.set()

    def fail(self, error: Exception) -> None:
        self.done, self.error = True, error
        self.wake.set()


class BatchedReads(Generic[K, V]):
    """``get(key)`` answered by ``read(keys)`` calls shared between the callers waiting at
    the same moment; see the module docstring. ``read`` returns one value per key, in order."""

    def __init__(
        self,
        read: Callable[[list[K]], Awaitable[Sequence[V]]],
        *,
        max_batch: int,
        max_in_flight: int = 1,
    ) -> None:
        self._read = read
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._waiting: dict[_Ask[K, V], None] = {}  # an ordered set: oldest first
        self._in_flight = 0  # reads running
        self.reads = 0  # queries made
        self.answered = 0  # callers answered by them

    async def get(self, key: K) -> V:
        """``key``'s value, read after this call began. Raises what its read raised."""
        ask: _Ask[K, V] = _Ask(key)
        self._waiting[ask] = None
        try:
            while not ask.done:
                if ask.alone:
                    return (await self._read([key]))[0]
                # Lead a read only while still waiting: another leader may have taken this
                # ask into its batch at the checkpoint before its query.
                if ask in self._waiting and self._in_flight < self._max_in_flight:
                    await self._read_batch()
                    continue
                ask.wake = trio.Event()
                await ask.wake.wait()
        finally:
            if not ask.done:  # cancelled while waiting: leave the queue, let the next lead
                ask.gone = True
                self._waiting.pop(ask, None)
                self._hand_over()
        if ask.error is not None:
            raise ask.error
        return ask.value  # type: ignore[return-value]

    async def _read_batch(self) -> None:
        self._in_flight += 1
        try:
            # Callers arriving at this very moment join this read rather than the next.
            await trio.lowlevel.checkpoint()
            batch = list(itertools.islice(self._waiting, self._max_batch))
            if not batch:  # a read that started at the same moment took them all
                return
            for ask in batch:
                del self._waiting[ask]
            self._hand_over()  # what is left may start another read meanwhile
            try:
                values = await self._read([ask.key for ask in batch])
            except DatabaseUnavailable as exc:
                for ask in batch:
                    ask.fail(exc)
            except Exception as exc:
                # Someone's input upset the shared query: each reads alone (the module
                # docstring). A single caller's read is already alone: the error is its own.
                if len(batch) == 1:
                    batch[0].fail(exc)
                else:
                    for ask in batch:
                        ask.alone = True
                        ask.wake.set()
            except BaseException:
                # The leading caller was cancelled (its client left): the others wait again.
                self._waiting = dict.fromkeys(
                    itertools.chain((a for a in batch if not (a.done or a.gone)), self._waiting)
                )
                raise
            else:
                self.reads += 1
                self.answered += len(batch)
                for ask, value in zip(batch, values, strict=True):
                    ask.answer(value)
        finally:
            self._in_flight -= 1
            self._hand_over()

    def _hand_over(self) -> None:
        """Wake the oldest waiting caller to lead the next read, if another may run."""
        if self._in_flight < self._max_in_flight and self._waiting:
            next(iter(self._waiting)).wake.set()
