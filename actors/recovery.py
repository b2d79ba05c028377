"""Gap recovery (issue 14): the trades a disconnect or a restart hid, fetched over REST.

The feed finds a gap when a subscription's first ticker is past the last trade it put (or
at start-up, when it has put nothing yet). It places a ``Hold`` in the symbol's WindowSlot and
sends ``RecoverGap`` here. This actor reads the symbol's durable watermark, pages
``GET /products/{id}/trades`` back from the first live trade to the watermark (newest first,
cursor ``after`` = older), and delivers one window per missed trade, oldest first, into the
hold; then it releases the hold. The engine judges them before any later live window, so the
crossing trade a disconnect hid still closes a stop, at its trade time (invariant 10 holds per
trade: one trade per window).

It never blocks the feed (the feed only sends) and holds the engine back only for the
recovery's duration: a recovery that cannot finish within ``give_up_s`` (REST down, database
away) or whose gap needs more than ``max_pages`` pages is logged, counted and released
unjudged, so live ticks are judged again. 429 and 5xx answers are retried with exponential
backoff and full jitter, never sooner than the server's ``Retry-After``.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs
import httpx
import trio

from tickguard.actors.backoff import full_jitter
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import RecoverGap, Watermark
from tickguard.actors.products import USER_AGENT
from tickguard.actors.window import TickWindow, WindowSlots
from tickguard.storage import DatabaseUnavailable

log = logging.getLogger(__name__)

# A symbol's watermark (None before its first), read from the database.
ReadWatermark = Callable[[str], Awaitable[Watermark | None]]


@attrs.frozen
class RecoveryConfig:
    """Where trades are read and how hard to try (seconds)."""

    rest_url: str = "https://api.exchange.coinbase.com"
    page_limit: int = 1000  # trades per request (Coinbase's maximum)
    max_pages: int = 100  # a longer gap is flagged and not judged
    retry_base_s: float = 0.5
    retry_max_s: float = 10.0
    request_timeout_s: float = 10.0
    give_up_s: float = 120.0  # one gap's recovery, retries included
    seed: int | None = None  # reproducible backoff jitter in tests


@attrs.define
class RecoveryStats:
    """Counters for /metrics and tests."""

    gaps: int = 0  # holds received
    recovered: int = 0  # gaps whose missed trades were delivered (possibly none)
    trades: int = 0  # trades delivered
    requests: int = 0  # REST requests sent
    retries: int = 0  # of them answered 429/5xx or failed on the network
    abandoned: int = 0  # gaps released unjudged (bound exceeded or gave up)
    last_error: str | None = None


class TradesUnreadable(Exception):
    """A trades page could not be read (status, body or shape). ``retry_after`` is the
    server's ``Retry-After`` in seconds (0 when none); ``retryable`` is False for an answer
    that a retry cannot fix (a 4xx other than 429)."""

    def __init__(self, message: str, *, retry_after: float = 0.0, retryable: bool = True):
        super().__init__(message)
        self.retry_after = retry_after
        self.retryable = retryable


class GapTooLong(Exception):
    """The gap needs more pages than ``max_pages``."""


@attrs.frozen
class Trade:
    trade_id: int
    price: Decimal
    time: datetime


def parse_trades(payload: Any) -> list[Trade]:
    """The trades of one ``/trades`` page; TradesUnreadable when it is not a list of trades."""
    if not isinstance(payload, list):
        raise TradesUnreadable("GET /trades did not answer a list")
    trades = []
    try:
        for item in payload:
            trade_id = item["trade_id"]
            if not isinstance(trade_id, int) or isinstance(trade_id, bool):
                raise TypeError("trade_id is not an integer")
            price = Decimal(str(item["price"]))
            if not price.is_finite() or price <= 0:
                raise ValueError(f"price {price}")
            trades.append(Trade(trade_id, price, datetime.fromisoformat(item["time"])))
    except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
        raise TradesUnreadable(f"GET /trades listed a bad trade: {exc!r}") from None
    return trades


async def fetch_page(client: httpx.AsyncClient, symbol: str, older_than: int, limit: int) -> Any:
    """One page of trades older than ``older_than``, newest first (the JSON payload). Raises
    ``TradesUnreadable`` or ``httpx.HTTPError``."""
    response = await client.get(
        f"/products/{symbol}/trades", params={"after": str(older_than), "limit": str(limit)}
    )
    if response.status_code != 200:
        raw = response.headers.get("Retry-After", "")
        status = response.status_code
        raise TradesUnreadable(
            f"GET /products/{symbol}/trades answered {status}",
            retry_after=float(raw) if raw.isdigit() else 0.0,
            retryable=status == 429 or status >= 500,
        )
    try:
        return response.json()
    except ValueError as exc:  # a body cut short, or not JSON
        raise TradesUnreadable(f"GET /products/{symbol}/trades answered bad JSON: {exc}") from None


class _Recovery:
    def __init__(
        self,
        config: RecoveryConfig,
        client: httpx.AsyncClient,
        slots: WindowSlots,
        read_watermark: ReadWatermark,
        stats: RecoveryStats,
    ) -> None:
        self.config = config
        self.client = client
        self.slots = slots
        self.read_watermark = read_watermark
        self.stats = stats
        self.rng = random.Random(config.seed)

    async def handle(self, request: RecoverGap) -> None:
        """Recover one gap; the hold is released whatever happens (cancellation included)."""
        hold = request.hold
        slot = self.slots.get(hold.symbol)
        self.stats.gaps += 1
        try:
            with trio.move_on_after(self.config.give_up_s) as scope:
                trades = await self.missed(hold.symbol, hold.after, hold.before)
            if scope.cancelled_caught:
                self.abandon(hold.symbol, f"not recovered within {self.config.give_up_s} s")
                return
            slot.deliver(
                hold,
                (
                    attrs.evolve(TickWindow.of(t.price, t.trade_id, t.time), recovered=True)
                    for t in trades
                ),
            )
            self.stats.trades += len(trades)
            self.stats.recovered += 1
            if trades:
                log.info(
                    "recovery: %s: %d missed trades (%d..%d) handed to the engine",
                    hold.symbol,
                    len(trades),
                    trades[0].trade_id,
                    trades[-1].trade_id,
                )
        except GapTooLong as exc:
            self.abandon(hold.symbol, str(exc))
        except TradesUnreadable as exc:  # an answer no retry can fix (a 4xx)
            self.abandon(hold.symbol, str(exc))
        finally:
            slot.release(hold)

    def abandon(self, symbol: str, why: str) -> None:
        self.stats.abandoned += 1
        self.stats.last_error = f"{symbol}: {why}"
        log.error("recovery: %s: gap not judged: %s", symbol, why)

    async def missed(self, symbol: str, after: int | None, before: int) -> list[Trade]:
        """The trades strictly between the watermark (or ``after``, if later) and ``before``,
        oldest first; empty when the symbol has no watermark yet."""
        mark = await self.retrying(lambda: self.read_watermark(symbol))
        if mark is not None:
            after = mark.trade_id if after is None else max(after, mark.trade_id)
        if after is None or before - after <= 1:
            return []
        found: list[Trade] = []
        cursor = before
        for _ in range(self.config.max_pages):
            page: list[Trade] = await self.retrying(functools.partial(self.page, symbol, cursor))
            found += [t for t in page if after < t.trade_id < before]
            oldest = min((t.trade_id for t in page), default=None)
            if oldest is None or oldest <= after + 1:
                found.sort(key=lambda t: t.trade_id)
                return found
            cursor = oldest
        raise GapTooLong(
            f"trades {after + 1}..{before - 1} need more than {self.config.max_pages} pages"
        )

    async def page(self, symbol: str, older_than: int) -> list[Trade]:
        return parse_trades(
            await fetch_page(self.client, symbol, older_than, self.config.page_limit)
        )

    async def retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()`` until it succeeds, backing off after each retryable failure."""
        attempt = 0
        while True:
            self.stats.requests += 1
            try:
                return await call()
            except TradesUnreadable as exc:
                if not exc.retryable:
                    raise
                error: Exception = exc
                retry_after = exc.retry_after
            except (httpx.HTTPError, OSError) as exc:
                error, retry_after = exc, 0.0
            except DatabaseUnavailable as exc:  # reading the watermark
                error, retry_after = exc, 0.0
            self.stats.retries += 1
            self.stats.last_error = f"{type(error).__name__}: {error}"
            delay = full_jitter(
                attempt, self.config.retry_base_s, self.config.retry_max_s, self.rng
            )
            level = logging.WARNING if attempt == 0 else logging.DEBUG
            log.log(level, "recovery: %s; retrying", error)
            attempt += 1
            await trio.sleep(max(delay, retry_after))


async def run(
    config: RecoveryConfig,
    inbox: Mailbox[RecoverGap],
    slots: WindowSlots,
    read_watermark: ReadWatermark,
    *,
    stats: RecoveryStats | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Recover each gap the feed reports, one at a time, until cancelled.

    Receives ``RecoverGap`` from ``inbox``; reads watermarks with ``read_watermark``; delivers
    recovered windows into the hold's slot and releases it (always, also when cancelled or
    failing). Never raises for a network, server or database failure.
    """
    stats = stats if stats is not None else RecoveryStats()
    async with httpx.AsyncClient(
        base_url=config.rest_url,
        timeout=config.request_timeout_s,
        headers={"User-Agent": USER_AGENT},
    ) as client:
        recovery = _Recovery(config, client, slots, read_watermark, stats)
        task_status.started()
        while True:
            request = await inbox.receive()
            await recovery.handle(request)
