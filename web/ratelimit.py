"""Token-bucket rate limits keyed by user or client address, with bounded memory.

A ``RateLimit`` holds one bucket per key (a user's ``sub``, a client address): each bucket
refills at ``rate`` tokens per second up to ``burst`` tokens, and a call takes one. A refused
call is told how many whole seconds to wait (the ``Retry-After`` value).

Memory stays bounded without a sweeper task: a bucket that has refilled completely is the same
as no bucket, so buckets are kept in least-recently-used order and every call first drops the
oldest ones that are full again. An idle key therefore costs nothing after ``burst / rate``
seconds, and ``max_keys`` caps what a flood of distinct keys can hold meanwhile (evicting the
least recently used bucket forgets its debt: that key is let through a little early, never
refused wrongly). Time is ``trio.current_time()``, so tests drive it with ``MockClock``.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict

import attrs
import trio

# 10k keys of ~50 characters cost about 2.7 MB (tests/test_ratelimit.py measures it), so the
# cap holds one limit's buckets under about 14 MB whatever a flood of distinct keys does.
DEFAULT_MAX_KEYS = 50_000


@attrs.frozen
class Refusal:
    """A refused call: ``retry_after`` whole seconds (at least 1) until a token is back."""

    retry_after: int


class RateLimit:
    """Token buckets of one kind (say, writes per user), keyed by any string.

    ``rate`` is tokens per second and ``burst`` the bucket size; ``rate`` 0 turns the limit
    off (every call passes, nothing is stored). Not thread-safe; never waits.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if rate < 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be >= 0, burst >= 1 and max_keys >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        # key -> (tokens, time of that count); ordered by last use, oldest first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._peak = 0

    @classmethod
    def per_second(cls, rate: int, *, max_keys: int = DEFAULT_MAX_KEYS) -> RateLimit:
        """``rate`` calls per second with a burst of twice that (DESIGN.md's rule); 0 is off."""
        return cls(rate, max(2 * rate, 1), max_keys=max_keys)

    @classmethod
    def per_minute(cls, count: int, *, max_keys: int = DEFAULT_MAX_KEYS) -> RateLimit:
        """``count`` calls per minute, of which a whole minute's worth may come at once (a
        page that reconnects its sockets after a network blip); 0 is off."""
        return cls(count / 60, max(count, 1), max_keys=max_keys)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        """How many keys currently hold a bucket (full buckets are dropped lazily)."""
        return len(self._buckets)

    def take(self, key: str) -> Refusal | None:
        """Take one token from ``key``'s bucket: None when the call may go ahead, else a
        ``Refusal`` saying how long to wait. A refused call takes nothing."""
        if self.rate == 0:
            return None
        now = trio.current_time()
        self._expire(now)
        held = self._buckets.pop(key, None)
        tokens = self.burst
        if held is not None:
            tokens = min(self.burst, held[0] + (now - held[1]) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            self._cap()
            return None
        self._buckets[key] = (tokens, now)
        return Refusal(retry_after=max(1, math.ceil((1 - tokens) / self.rate)))

    def _expire(self, now: float) -> None:
        # Every bucket is full ``burst / rate`` seconds after its last use at the latest, so
        # stopping at the first one still refilling leaves only keys used within that time.
        while self._buckets:
            key, (tokens, at) = next(iter(self._buckets.items()))
            if tokens + (now - at) * self.rate < self.burst:
                break
            del self._buckets[key]
        # A dict never shrinks its table by itself: copy it once most keys have gone, so the
        # memory a burst of keys took comes back.
        if self._peak > 1024 and len(self._buckets) < self._peak // 4:
            self._buckets = OrderedDict(self._buckets)
            self._peak = len(self._buckets)

    def _cap(self) -> None:
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        self._peak = max(self._peak, len(self._buckets))


def address_key(address: str) -> str:
    """The rate-limit key of a client address: an IPv4 address as is, an IPv6 address by its
    /64 network (one host usually owns a whole /64, so per-address limits would be free to
    dodge otherwise). Anything that is not an IP address (a Unix socket path) is kept as is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
