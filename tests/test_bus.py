"""The Redis bus (storage/bus.py) against a real redis-server: wake-ups reach a subscriber,
prices round-trip exactly, and an outage neither raises nor hangs where it must not.

Topics and keys carry a random suffix: with ``TEST_REDIS_URL`` the server may be shared.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from decimal import Decimal

import pytest
import trio
import trio_asyncio
from redis_server import RedisServer
from tcp_proxy import running_proxy

from tickguard.storage.bus import PRICE_PREFIX, Bus, BusTiming, BusUnavailable, open_bus

GUARD_S = 30.0
# Short, so that an outage test reconnects quickly; not a speed assertion.
QUICK = BusTiming(call_s=1.0, idle_s=1.0, backoff_base_s=0.05, backoff_max_s=0.2)


def _topic() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


class Subscriber:
    """Iterates ``bus.wakeups(topic)`` in a task; counts the yields and signals each one."""

    def __init__(self) -> None:
        self.yields = 0
        self._changed = trio.Event()

    async def run(self, bus: Bus, topic: str) -> None:
        async with aclosing(bus.wakeups(topic)) as wakeups:  # type: ignore[type-var]
            async for _ in wakeups:
                self.yields += 1
                self._changed.set()
                self._changed = trio.Event()

    async def wait_for(self, yields: int) -> None:
        with trio.fail_after(GUARD_S):
            while self.yields < yields:
                await self._changed.wait()


@asynccontextmanager
async def bus_on(url: str, timing: BusTiming = QUICK) -> AsyncIterator[Bus]:
    async with trio_asyncio.open_loop(), open_bus(url, timing) as bus:
        yield bus


async def test_a_wake_reaches_the_subscriber(redis_url: str) -> None:
    topic = _topic()
    async with bus_on(redis_url) as bus, trio.open_nursery() as nursery:
        subscriber = Subscriber()
        nursery.start_soon(subscriber.run, bus, topic)
        await subscriber.wait_for(1)  # subscribed (the yield after subscribing)
        await bus.wake(topic)
        await subscriber.wait_for(2)
        await bus.wake(_topic())  # another topic wakes nobody here
        await bus.wake(topic)
        await subscriber.wait_for(3)
        assert subscriber.yields == 3
        assert bus.stats.published == 3
        assert bus.stats.publish_failures == 0
        assert bus.stats.reconnects == 0
        nursery.cancel_scope.cancel()


async def test_two_subscribers_each_get_the_wake(redis_url: str) -> None:
    topic = _topic()
    async with bus_on(redis_url) as bus, trio.open_nursery() as nursery:
        first, second = Subscriber(), Subscriber()
        nursery.start_soon(first.run, bus, topic)
        nursery.start_soon(second.run, bus, topic)
        await first.wait_for(1)
        await second.wait_for(1)
        await bus.wake(topic)
        await first.wait_for(2)
        await second.wait_for(2)
        nursery.cancel_scope.cancel()


async def test_a_price_round_trips_exactly(redis_url: str) -> None:
    symbol = f"TEST-{uuid.uuid4().hex[:8]}"
    async with bus_on(redis_url) as bus:
        assert await bus.get_price(symbol) is None
        await bus.set_price(symbol, Decimal("65000.123456789"))
        price = await bus.get_price(symbol)
        assert isinstance(price, Decimal)
        assert str(price) == "65000.123456789"
        await bus.set_price(symbol, Decimal("0.00000001"))
        assert await bus.get_price(symbol) == Decimal("0.00000001")
        with pytest.raises(ValueError):
            await bus.set_price(symbol, Decimal("NaN"))
        with pytest.raises(ValueError):
            await bus.set_price(symbol, 1.5)  # type: ignore[arg-type]
        # The server may be shared (TEST_REDIS_URL): leave no key behind.
        await trio_asyncio.aio_as_trio(bus._client.delete)(PRICE_PREFIX + symbol)
        assert await bus.get_price(symbol) is None


async def test_redis_killed_and_restarted_mid_subscription(own_redis: RedisServer) -> None:
    topic = _topic()
    symbol = f"TEST-{uuid.uuid4().hex[:8]}"
    async with bus_on(own_redis.url) as bus, trio.open_nursery() as nursery:
        subscriber = Subscriber()
        nursery.start_soon(subscriber.run, bus, topic)
        await subscriber.wait_for(1)
        await bus.set_price(symbol, Decimal("1.5"))

        await trio.to_thread.run_sync(own_redis.stop)
        with trio.fail_after(GUARD_S):  # hang guard: each call is bounded by call_s
            await bus.wake(topic)  # neither raises nor hangs
            await bus.wake(topic)
            await bus.set_price(symbol, Decimal("2"))
            with pytest.raises(BusUnavailable):
                await bus.get_price(symbol)
        assert bus.stats.publish_failures == 3
        assert bus.stats.published == 0
        yields_while_down = subscriber.yields

        await trio.to_thread.run_sync(own_redis.start)  # same port, empty (nothing saved)
        await subscriber.wait_for(yields_while_down + 1)  # subscribed again
        assert bus.stats.reconnects >= 1
        await bus.wake(topic)
        await subscriber.wait_for(yields_while_down + 2)
        assert bus.stats.published == 1
        assert await bus.get_price(symbol) is None  # the restarted server kept nothing
        nursery.cancel_scope.cancel()


async def test_a_bus_opens_while_redis_is_down(own_redis: RedisServer) -> None:
    """Start-up does not wait for Redis: the subscriber keeps trying and gets there."""
    topic = _topic()
    await trio.to_thread.run_sync(own_redis.stop)
    async with bus_on(own_redis.url) as bus, trio.open_nursery() as nursery:
        subscriber = Subscriber()
        nursery.start_soon(subscriber.run, bus, topic)
        with trio.fail_after(GUARD_S):
            while bus.stats.reconnects < 2:  # it tried, failed and tried again
                await trio.sleep(0.01)
        assert subscriber.yields == 0
        await trio.to_thread.run_sync(own_redis.start)
        await subscriber.wait_for(1)
        await bus.wake(topic)
        await subscriber.wait_for(2)
        nursery.cancel_scope.cancel()


async def test_wakeups_is_cancellable_while_waiting(redis_url: str) -> None:
    async with bus_on(redis_url) as bus:
        subscriber = Subscriber()
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(subscriber.run, bus, _topic())
                await subscriber.wait_for(1)
                nursery.cancel_scope.cancel()
        assert subscriber.yields == 1


async def test_a_subscription_that_stops_answering_is_dropped_and_made_again(
    redis_url: str,
) -> None:
    """Through a proxy that holds all traffic (the socket stays open, nothing comes back): the
    unanswered ping drops the subscription, and once traffic flows it subscribes again."""
    host, port = redis_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    topic = _topic()
    timing = BusTiming(call_s=0.5, idle_s=0.2, backoff_base_s=0.05, backoff_max_s=0.2)
    async with running_proxy(host, int(port)) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        async with bus_on(url, timing) as bus, trio.open_nursery() as nursery:
            subscriber = Subscriber()
            nursery.start_soon(subscriber.run, bus, topic)
            await subscriber.wait_for(1)
            proxy.hold()
            with trio.fail_after(GUARD_S):
                while bus.stats.reconnects < 1:
                    await trio.sleep(0.01)
            proxy.release()
            await subscriber.wait_for(2)  # subscribed again
            await bus.wake(topic)
            await subscriber.wait_for(3)
            nursery.cancel_scope.cancel()
