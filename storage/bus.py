"""The Redis bus (issue 17): wake-ups between role processes, and the last price of each symbol.

When roles run in separate processes, PostgreSQL stays the record (the event log) and Redis
only says "look now": a process that wrote events ``wake``s a topic, the processes following
that topic read the log (``storage.tail``). A lost message costs latency, never an event: the
followers also poll. So nothing here raises for an outage on the paths that must go on
without Redis: ``wake`` and ``set_price`` count the failure and return, ``wakeups`` reconnects
by itself. Only ``get_price``, whose caller asked for an answer, raises ``BusUnavailable``.

redis-py's asyncio client runs on the asyncio loop that trio-asyncio provides (as asyncpg does,
``storage.db``); callers see plain Trio calls, each bounded by a short timeout. redis-py's own
retries are off: one attempt per call, and the reconnect policy is ours.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import attrs
import redis.asyncio as aioredis
import redis.exceptions
import trio
import trio_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger("tickguard.storage.bus")

T = TypeVar("T")

PREFIX = "tickguard:"
PRICE_PREFIX = "tickguard:price:"

# Errors that mean "Redis cannot be reached or did not answer", as opposed to a bug.
_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    asyncio.TimeoutError,
)


class BusUnavailable(Exception):
    """Redis could not be reached, or did not answer within the call's timeout."""


@attrs.define
class BusStats:
    """Counters for /metrics, one set per ``Bus`` (per process)."""

    published: int = 0  # wake-ups Redis accepted
    publish_failures: int = 0  # wake-ups (and prices) lost to an outage
    reconnects: int = 0  # subscriptions attempted again after one failed or was lost
    wakeups: int = 0  # yields of every ``wakeups`` iterator (after subscribing, per message)


@attrs.frozen
class BusTiming:
    """Seconds. ``call_s`` bounds every command; a subscription that heard nothing for
    ``idle_s`` is pinged, and dropped (then reconnected) when the ping gets no answer within
    another ``idle_s``: a server that went away without closing the socket is noticed."""

    call_s: float = 1.0
    idle_s: float = 5.0
    backoff_base_s: float = 0.1  # first wait before subscribing again; doubles per failure
    backoff_max_s: float = 5.0


def _backoff(attempt: int, timing: BusTiming) -> float:
    # storage imports no actor (import contracts), so not actors.backoff: the same formula.
    return float(min(timing.backoff_max_s, timing.backoff_base_s * 2 ** min(attempt, 30)))


class Bus:
    """One per process: a pool of Redis connections, used from Trio (see ``open_bus``)."""

    def __init__(self, client: aioredis.Redis, timing: BusTiming = BusTiming()) -> None:
        self._client = client
        self.timing = timing
        self.stats = BusStats()
        self._publish_down = False  # logs once per outage, not once per wake-up

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, again: bool = False) -> T:
        """Run the asyncio coroutine ``fn(*args)``; ``BusUnavailable`` on outage or timeout.

        ``again``: a command that fails on a lost connection is sent once more (within the
        same deadline). A pooled connection left idle across a restart of Redis is not always
        seen to be dead when it is handed out (seen in tests: "Connection closed by server" on
        the first command after the restart); the failure drops it, the second try connects.
        """
        try:
            with trio.fail_after(self.timing.call_s):
                try:
                    result: T = await trio_asyncio.aio_as_trio(fn)(*args)
                except redis.exceptions.ConnectionError:
                    if not again:
                        raise
                    result = await trio_asyncio.aio_as_trio(fn)(*args)
                return result
        except trio.TooSlowError as exc:
            raise BusUnavailable(f"no answer within {self.timing.call_s:g} s") from exc
        except _UNAVAILABLE as exc:
            raise BusUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _lost(self, what: str, error: BusUnavailable) -> None:
        self.stats.publish_failures += 1
        if not self._publish_down:
            self._publish_down = True
            log.warning("redis unavailable, %s lost until it is back: %s", what, error)

    def _ok(self) -> None:
        if self._publish_down:
            self._publish_down = False
            log.info("redis is back: wake-ups and prices are published again")

    async def wake(self, topic: str) -> None:
        """PUBLISH to ``tickguard:{topic}``. Never raises for an outage and never waits longer
        than ``timing.call_s``: a lost wake-up is counted (``publish_failures``) and the
        followers' poll makes up for it."""
        try:
            await self._call(self._client.publish, PREFIX + topic, "1", again=True)
        except BusUnavailable as exc:
            self._lost("wake-ups are", exc)
            return
        self.stats.published += 1
        self._ok()

    async def set_price(self, symbol: str, price: Decimal) -> None:
        """SET ``tickguard:price:{symbol}`` to the exact decimal text of ``price``. Never
        raises for an outage (counted as a publish failure); ``ValueError`` for a price that is
        not a finite Decimal."""
        if not isinstance(price, Decimal) or not price.is_finite():
            raise ValueError(f"not a finite Decimal price: {price!r}")
        try:
            await self._call(self._client.set, PRICE_PREFIX + symbol, str(price), again=True)
        except BusUnavailable as exc:
            self._lost("prices are", exc)
            return
        self._ok()

    async def get_price(self, symbol: str) -> Decimal | None:
        """The last price set for ``symbol``, exactly; None when none was. Raises
        ``BusUnavailable`` when Redis cannot answer within ``timing.call_s``."""
        value = await self._call(self._client.get, PRICE_PREFIX + symbol, again=True)
        if value is None:
            return None
        try:
            # decode_responses: a str (bytes only if someone changes that).
            return Decimal(value.decode() if isinstance(value, bytes) else value)
        except InvalidOperation as exc:
            raise ValueError(f"{PRICE_PREFIX}{symbol} holds {value!r}, not a price") from exc

    def wakeups(self, topic: str) -> Wakeups:
        """Wake-ups of ``topic``, for as long as the caller iterates.

        Yields once right after each (re)subscription (anything may have been missed while
        unsubscribed), then once per message; messages queued meanwhile coalesce into one
        yield. Survives Redis going away: it subscribes again with backoff, counting
        ``reconnects``, and never raises for an outage. Cancellable at any point.

        Re-iterable: each ``async for`` (``aiter``) is a subscription of its own, so one value
        can be handed to an actor that the supervisor restarts. Close what ``aiter`` gave
        (``contextlib.aclosing``) to give its connection back at once.
        """
        return Wakeups(self, PREFIX + topic)

    async def _wakeups(self, channel: str) -> AsyncGenerator[None, None]:
        failures = 0
        while True:
            pubsub = self._client.pubsub()
            try:
                await self._call(_subscribe, pubsub, channel)
                if failures:
                    log.info("redis subscription to %s is back", channel)
                failures = 0
                self.stats.wakeups += 1
                yield
                async for _ in self._messages(pubsub):
                    self.stats.wakeups += 1
                    yield
            except BusUnavailable as exc:
                if failures == 0:
                    log.warning("redis subscription to %s lost, retrying: %s", channel, exc)
                failures += 1
            finally:
                await self._close_quietly(pubsub)
            self.stats.reconnects += 1
            await trio.sleep(_backoff(failures - 1, self.timing))

    async def _messages(self, pubsub: Any) -> AsyncGenerator[None, None]:
        """One item per batch of published messages; ``BusUnavailable`` when the connection
        is lost or a ping goes unanswered."""
        pinged = False
        while True:
            try:
                with trio.fail_after(self.timing.idle_s + self.timing.call_s):
                    batch = await trio_asyncio.aio_as_trio(_next_batch)(pubsub, self.timing.idle_s)
            except trio.TooSlowError as exc:
                raise BusUnavailable("the subscription did not answer") from exc
            except _UNAVAILABLE as exc:
                raise BusUnavailable(f"{type(exc).__name__}: {exc}") from exc
            if not batch:
                if pinged:
                    raise BusUnavailable(f"no answer to a ping within {self.timing.idle_s:g} s")
                await self._call(pubsub.ping)
                pinged = True
                continue
            pinged = False
            if any(m.get("type") == "message" for m in batch):
                yield None

    async def _close_quietly(self, pubsub: Any) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self.timing.call_s):
            try:
                await trio_asyncio.aio_as_trio(pubsub.aclose)()
            except Exception as exc:  # the connection is gone either way
                log.debug("closing a redis subscription failed: %r", exc)


class Wakeups(AsyncIterator[None]):
    """What ``Bus.wakeups`` returns: ``aiter()`` of it starts a new subscription each time (a
    restarted consumer subscribes again, where a spent generator would end at once);
    ``anext()`` on it directly uses one subscription of its own, made on first use."""

    def __init__(self, bus: Bus, channel: str) -> None:
        self._bus = bus
        self.channel = channel
        self._own: AsyncGenerator[None, None] | None = None

    def __aiter__(self) -> AsyncGenerator[None, None]:
        return self._bus._wakeups(self.channel)

    async def __anext__(self) -> None:
        if self._own is None:
            self._own = self._bus._wakeups(self.channel)
        await self._own.__anext__()

    async def aclose(self) -> None:
        """Close the subscription ``anext()`` made, if any."""
        if self._own is not None:
            await self._own.aclose()
            self._own = None


async def _subscribe(pubsub: Any, channel: str) -> None:
    # Runs on the asyncio loop. Wait for Redis's confirmation: only then is nothing missed.
    await pubsub.subscribe(channel)
    while True:
        message = await pubsub.get_message(timeout=None)
        if message is not None and message.get("type") == "subscribe":
            return


async def _next_batch(pubsub: Any, idle_s: float) -> list[dict[str, Any]]:
    # Runs on the asyncio loop. Wait up to ``idle_s`` for one message, then take whatever else
    # is already queued: a burst of wake-ups becomes one.
    first = await pubsub.get_message(timeout=idle_s)
    if first is None:
        return []
    batch = [first]
    while (more := await pubsub.get_message(timeout=0)) is not None:
        batch.append(more)
    return batch


@asynccontextmanager
async def open_bus(url: str, timing: BusTiming = BusTiming()) -> AsyncIterator[Bus]:
    """A ``Bus`` on the Redis at ``url`` for the block; must run inside
    ``trio_asyncio.open_loop()``. Does not fail when Redis is down: connections are made on
    first use, and each use copes with an outage as its docstring says. Closes them at exit."""
    client = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timing.call_s,
        socket_timeout=max(timing.call_s, timing.idle_s) * 2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        yield Bus(client, timing)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(timing.call_s * 5):
            try:
                await trio_asyncio.aio_as_trio(client.aclose)()
            except Exception as exc:
                log.debug("closing the redis client failed: %r", exc)
