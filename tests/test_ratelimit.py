"""web/ratelimit.py: token buckets on trio's clock (MockClock), Retry-After, bounded memory."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
import trio.testing

from tickguard.web.ratelimit import RateLimit, Refusal, address_key


async def test_a_burst_of_twice_the_rate_passes_then_calls_are_refused(
    mock_clock: trio.testing.MockClock,
) -> None:
    limit = RateLimit.per_second(5)
    assert [limit.take("alice") for _ in range(10)] == [None] * 10
    assert limit.take("alice") == Refusal(retry_after=1)
    # Other keys have their own bucket.
    assert limit.take("bob") is None
    # One token back after 1/rate seconds, not before.
    mock_clock.jump(0.19)
    assert limit.take("alice") == Refusal(retry_after=1)
    mock_clock.jump(0.01)
    assert limit.take("alice") is None
    assert limit.take("alice") is not None


async def test_a_refused_call_takes_nothing_and_the_bucket_refills_to_burst_only(
    mock_clock: trio.testing.MockClock,
) -> None:
    limit = RateLimit(rate=1, burst=2)
    assert limit.take("k") is None and limit.take("k") is None
    for _ in range(50):
        assert limit.take("k") == Refusal(retry_after=1)
    mock_clock.jump(1)
    assert limit.take("k") is None
    # A long idle period refills to the burst, never beyond.
    mock_clock.jump(3600)
    assert [limit.take("k") for _ in range(3)] == [None, None, Refusal(retry_after=1)]


async def test_retry_after_is_the_whole_seconds_until_a_token(
    mock_clock: trio.testing.MockClock,
) -> None:
    limit = RateLimit.per_minute(6)  # one token every 10 s, six at once
    assert [limit.take("10.0.0.1") for _ in range(6)] == [None] * 6
    assert limit.take("10.0.0.1") == Refusal(retry_after=10)
    mock_clock.jump(2.5)
    assert limit.take("10.0.0.1") == Refusal(retry_after=8)
    mock_clock.jump(7.5)
    assert limit.take("10.0.0.1") is None


async def test_zero_turns_the_limit_off(mock_clock: trio.testing.MockClock) -> None:
    for limit in (RateLimit.per_second(0), RateLimit.per_minute(0)):
        assert not limit.enabled
        assert all(limit.take("k") is None for _ in range(10_000))
        assert len(limit) == 0


async def test_idle_buckets_are_dropped_once_full_again(
    mock_clock: trio.testing.MockClock,
) -> None:
    limit = RateLimit.per_second(10)  # burst 20; one token back every 0.1 s
    for n in range(1000):
        limit.take(f"user-{n}")
    for _ in range(20):
        limit.take("drained")
    assert len(limit) == 1001
    mock_clock.jump(0.09)
    limit.take("late")
    assert len(limit) == 1002
    # One token taken is back after 0.1 s: those buckets are full, so they go.
    mock_clock.jump(0.01)
    limit.take("late")
    assert len(limit) == 2
    # "drained" took 2 s to refill completely: it goes then, not before.
    mock_clock.jump(1.85)
    limit.take("late")
    assert len(limit) == 2
    mock_clock.jump(0.05)
    limit.take("late")
    assert len(limit) == 1
    # A bucket dropped while full behaves as the full bucket it was.
    assert [limit.take("drained") for _ in range(21)] == [None] * 20 + [Refusal(retry_after=1)]


async def test_max_keys_caps_a_flood_of_distinct_keys(mock_clock: trio.testing.MockClock) -> None:
    limit = RateLimit.per_second(1, max_keys=100)
    for n in range(1000):
        assert limit.take(f"spoofed-{n}") is None
    assert len(limit) == 100


async def test_ten_thousand_keys_stay_under_twenty_megabytes_and_are_returned(
    mock_clock: trio.testing.MockClock,
) -> None:
    # A memory bound, measured with tracemalloc (not a timing assertion).
    limit = RateLimit.per_second(20)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(10_000):
            limit.take(f"user-{n:05d}-{'x' * 40}")
        held = tracemalloc.get_traced_memory()[0] - before
        assert len(limit) == 10_000
        assert held < 20 * 1024 * 1024
        # Idle buckets expire: the memory comes back.
        mock_clock.jump(limit.burst / limit.rate)
        limit.take("one more")
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(limit) == 1
    assert after < held / 10
    print(f"10k buckets: {held / 1e6:.2f} MB held, {after / 1e3:.1f} kB after expiry")


def test_bad_parameters_are_refused() -> None:
    for rate, burst in ((-1, 2), (1, 0.5)):
        with pytest.raises(ValueError):
            RateLimit(rate, burst)


def test_address_keys_group_an_ipv6_host_by_its_64() -> None:
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2:ffff::9") == address_key("2001:db8:1:2::1")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("unix:/run/tickguard.sock") == "unix:/run/tickguard.sock"
