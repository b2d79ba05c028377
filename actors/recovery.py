"""Gap recovery (issue 14): the trades a disconnect or a restart hid, fetched over REST.

The feed finds a gap when a subscription's first ticker is past the last trade it put (or
at start-up, when it has put nothing yet). It places a ``Hold`` in the symbol's WindowSlot and
sends ``RecoverGap`` here. This actor reads the symbol's durable watermark, pages
``GET /products/{id}/trades`` back from the first live trade to the watermark (newest first,
cursor ``after`` = older), and delivers one window per missed trade, oldest first, into the
hold; then it releases the hold. The engine judges them before any later live window, so the
crossing trade a disconnect hid still closes a stop, at its trade time (invariant 10 holds per
trade: one trade per window).

A gap too long to page through within ``max_pages`` is judged from 1-minute candles in the
middle (``actors/candles.py``) with its edges judged from trades: ``edge_pages`` pages of the
trades right after the watermark and of those right before the first live trade. A candle is
one window whose low/high are the minute's and whose first and last times are both the
minute's start, so the engine's cutoff (a window closes only positions created at or before
its last time) spares every position created during the minute: a trade inside it may predate
the position (invariant 10). Its trade ids are the last trade judged before it, so the
watermark never passes a trade that no window judged; the close of a candle carries
``"recovered": true`` and, having no trade of its own (``count`` 0), closes at the level
whatever ``GAP_FILL`` says. A gap whose time span (the watermark's trade to the first live
trade) exceeds ``max_gap_s`` (``RECOVERY_MAX_GAP_S``) is not judged at all.

It never blocks the feed (the feed only sends) and holds the engine back only for the
recovery's duration: a recovery that cannot finish within ``give_up_s`` (REST down, database
away), a gap longer than ``max_gap_s``, or one whose REST answers no retry can fix is released
unjudged, so live ticks are judged again; each such gap is flagged: logged once, kept per
symbol in ``RecoveryStats.unjudged`` for /ready and counted per symbol and reason for
/metrics. 429 and 5xx answers are retried with exponential backoff and full jitter, never
sooner than the server's ``Retry-After``.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import attrs
import httpx
import trio

from tickguard.actors import candles
from tickguard.actors.backoff import full_jitter
from tickguard.actors.candles import Candle, MarketDataUnreadable, check_answered
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import RecoverGap, Watermark
from tickguard.actors.products import USER_AGENT
from tickguard.actors.window import TickWindow, WindowSlots
from tickguard.storage import DatabaseUnavailable

log = logging.getLogger(__name__)

# A symbol's watermark (None before its first), read from the database.
ReadWatermark = Callable[[str], Awaitable[Watermark | None]]

# Why a gap was released unjudged: longer than ``max_gap_s``; not recovered within
# ``give_up_s``; an answer no retry can fix (a 4xx); its start no longer listed over REST.
UnjudgedReason = Literal["too_long", "gave_up", "refused", "unlisted"]
UNJUDGED_REASONS: tuple[UnjudgedReason, ...] = ("too_long", "gave_up", "refused", "unlisted")


@attrs.frozen
class RecoveryConfig:
    """Where trades are read and how hard to try (seconds)."""

    rest_url: str = "https://api.exchange.coinbase.com"
    page_limit: int = 1000  # trades per request (Coinbase's maximum)
    max_pages: int = 100  # a gap needing more is judged from candles between its edges
    edge_pages: int = 1  # pages of trades judged at each edge of a gap judged from candles
    max_gap_s: float = 604_800.0  # RECOVERY_MAX_GAP_S: a longer gap is flagged, not judged
    retry_base_s: float = 0.5
    retry_max_s: float = 10.0
    request_timeout_s: float = 10.0
    give_up_s: float = 120.0  # one gap's recovery, retries included
    # Coinbase's public endpoints allow about 10 requests/s per address (bursts of 15): the
    # recovery stays under it, with a burst for the usual short gap's few requests.
    rest_rate_per_s: float = 8.0
    rest_burst: int = 8
    seed: int | None = None  # reproducible backoff jitter in tests


@attrs.frozen
class UnjudgedGap:
    """A gap released without judging it: which trades, when, and why."""

    symbol: str
    reason: UnjudgedReason
    detail: str
    after: int | None  # the last trade judged before it (None: unknown)
    before: int  # the first live trade after it
    start: datetime | None  # the time of trade ``after`` (None: unknown)
    end: datetime | None  # the time of trade ``before`` (None: unknown)

    @property
    def seconds(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return round((self.end - self.start).total_seconds(), 3)

    def describe(self) -> str:
        trades = "trades before" if self.after is None else f"trades {self.after + 1}.."
        span = "" if self.seconds is None else f", {self.start} to {self.end} ({self.seconds} s)"
        return f"{trades}{self.before - 1}{span}"

    def report(self) -> dict[str, Any]:
        """JSON-ready, for /ready."""
        return {
            "reason": self.reason,
            "detail": self.detail,
            "after_trade_id": self.after,
            "before_trade_id": self.before,
            "from": None if self.start is None else _iso(self.start),
            "to": None if self.end is None else _iso(self.end),
            "seconds": self.seconds,
        }


@attrs.define
class RecoveryStats:
    """Counters for /metrics and tests."""

    gaps: int = 0  # holds received
    recovered: int = 0  # gaps whose missed trades were delivered (possibly none)
    trades: int = 0  # trades delivered
    candles: int = 0  # candle windows delivered (gaps too long to page through)
    requests: int = 0  # REST requests sent
    retries: int = 0  # of them answered 429/5xx or failed on the network
    abandoned: int = 0  # gaps released unjudged (flagged: see ``unjudged``)
    last_error: str | None = None
    # The last gap released unjudged, per symbol (for /ready)...
    unjudged: dict[str, UnjudgedGap] = attrs.field(factory=dict)
    # ...and how many, per (symbol, reason) (for /metrics).
    unjudged_counts: dict[tuple[str, UnjudgedReason], int] = attrs.field(factory=dict)

    def unjudged_report(self) -> dict[str, dict[str, Any]]:
        """Per symbol: its last unjudged gap and how many it had; JSON-ready, for /ready."""
        report = {}
        for symbol, gap in sorted(self.unjudged.items()):
            count = sum(n for (s, _), n in self.unjudged_counts.items() if s == symbol)
            report[symbol] = {**gap.report(), "count": count}
        return report


def _iso(time: datetime) -> str:
    return time.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TradesUnreadable(MarketDataUnreadable):
    """A trades page could not be used."""


class GapNotJudged(Exception):
    """This gap is released unjudged, for ``reason``."""

    def __init__(self, reason: UnjudgedReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


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
    check_answered(response, TradesUnreadable)
    try:
        return response.json()
    except ValueError as exc:  # a body cut short, or not JSON
        raise TradesUnreadable(f"GET /products/{symbol}/trades answered bad JSON: {exc}") from None


@attrs.define
class _Gap:
    """What one recovery learns about its gap as it goes (reported if it is not judged)."""

    symbol: str
    after: int | None  # the last trade judged before the gap (None: unknown)
    before: int  # the first live trade after it
    start: datetime | None = None  # the time of trade ``after``
    end: datetime | None = None  # the time of trade ``before``

    def seen(self, trades: list[Trade]) -> None:
        """Learn the gap's end times from listed trades (oldest first)."""
        for trade in trades:
            if trade.trade_id == self.after and self.start is None:
                self.start = trade.time
            elif trade.trade_id == self.before:
                self.end = trade.time
        if self.end is None and trades:
            self.end = trades[-1].time  # the first live trade is not listed yet: the last one

    def unjudged(self, reason: UnjudgedReason, detail: str) -> UnjudgedGap:
        return UnjudgedGap(
            self.symbol, reason, detail, self.after, self.before, self.start, self.end
        )


def trade_window(trade: Trade) -> TickWindow:
    """One recovered trade's own window."""
    return attrs.evolve(TickWindow.of(trade.price, trade.trade_id, trade.time), recovered=True)


def candle_window(candle: Candle, trade_id: int) -> TickWindow:
    """One recovered minute's window. Both times are the minute's start: the engine closes only
    positions created at or before a window's last time, and a trade inside the minute may be
    older than a position created during it (invariant 10). ``trade_id`` is the last trade
    judged before the candle: the watermark never moves past a trade no window judged. No
    trade of its own (count 0): under ``GAP_FILL=trade`` it closes at the level."""
    return TickWindow(
        low=candle.low,
        high=candle.high,
        last=candle.close,
        count=0,
        first_trade_id=trade_id,
        last_trade_id=trade_id,
        first_time=candle.start,
        last_time=candle.start,
        recovered=True,
    )


class RequestPacer:
    """A token bucket: at most ``burst`` requests at once, then ``rate_per_s`` on average."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.interval = 1.0 / rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._stamp: float | None = None

    async def wait(self) -> None:
        """Take one token, sleeping until one is there."""
        now = trio.current_time()
        if self._stamp is not None:
            refill = (now - self._stamp) / self.interval
            self._tokens = min(float(self.burst), self._tokens + refill)
        self._stamp = now
        if self._tokens < 1.0:
            await trio.sleep((1.0 - self._tokens) * self.interval)
            self._stamp = trio.current_time()
            self._tokens = 1.0
        self._tokens -= 1.0


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
        self.pacer = RequestPacer(config.rest_rate_per_s, config.rest_burst)

    async def handle(self, request: RecoverGap) -> None:
        """Recover one gap; the hold is released whatever happens (cancellation included)."""
        hold = request.hold
        slot = self.slots.get(hold.symbol)
        gap = _Gap(hold.symbol, hold.after, hold.before)
        self.stats.gaps += 1
        try:
            with trio.move_on_after(self.config.give_up_s) as scope:
                windows = await self.missed(gap)
            if scope.cancelled_caught:
                self.abandon(
                    gap.unjudged("gave_up", f"not recovered within {self.config.give_up_s} s")
                )
                return
            slot.deliver(hold, windows)
            trades = [w for w in windows if w.count]
            self.stats.trades += len(trades)
            self.stats.candles += len(windows) - len(trades)
            self.stats.recovered += 1
            if windows:
                log.info(
                    "recovery: %s: %d missed trades and %d candles (after trade %d, before %d) "
                    "handed to the engine",
                    hold.symbol,
                    len(trades),
                    len(windows) - len(trades),
                    gap.after,
                    gap.before,
                )
        except GapNotJudged as exc:
            self.abandon(gap.unjudged(exc.reason, exc.detail))
        except MarketDataUnreadable as exc:  # an answer no retry can fix (4xx)
            self.abandon(gap.unjudged("refused", str(exc)))
        finally:
            slot.release(hold)

    def abandon(self, gap: UnjudgedGap) -> None:
        """Flag ``gap``: logged once, kept for /ready, counted for /metrics."""
        stats = self.stats
        stats.abandoned += 1
        stats.last_error = f"{gap.symbol}: {gap.detail}"
        stats.unjudged[gap.symbol] = gap
        key = (gap.symbol, gap.reason)
        stats.unjudged_counts[key] = stats.unjudged_counts.get(key, 0) + 1
        # Too long is the operator's setting doing its job; the others are failures.
        log.log(
            logging.WARNING if gap.reason == "too_long" else logging.ERROR,
            "recovery: %s: gap not judged (%s): %s; a stop crossed in it stays open",
            gap.symbol,
            gap.detail,
            gap.describe(),
        )

    async def missed(self, gap: _Gap) -> list[TickWindow]:
        """The windows of the trades strictly between the watermark (or ``gap.after``, if
        later) and ``gap.before``, oldest first: one per trade, or, for a gap too long to page
        through, the trades of its edges and a candle per minute between them. Empty when the
        symbol has no watermark yet. Raises ``GapNotJudged``."""
        mark = await self.retrying(lambda: self.read_watermark(gap.symbol))
        if mark is not None and (gap.after is None or mark.trade_id >= gap.after):
            gap.after, gap.start = mark.trade_id, mark.time
        after, before = gap.after, gap.before
        if after is None or before - after <= 1:
            return []
        config = self.config
        # Trade ids count per product: the pages the gap needs, were every id a trade.
        needed = -(-(before - after) // config.page_limit)
        pages = config.max_pages if needed <= config.max_pages else config.edge_pages
        # From the first live trade itself (its time ends the gap), back towards the watermark.
        listed = await self.trades_back(gap.symbol, after, before + 1, pages)
        if not listed:
            raise GapNotJudged("unlisted", f"no trade before {before} is listed")
        gap.seen(listed)
        missed = [t for t in listed if after < t.trade_id < before]
        if listed[0].trade_id <= after + 1:  # every trade of the gap, in order
            if gap.start is None and missed:
                gap.start = missed[0].time
            self.check_span(gap)
            return [trade_window(t) for t in missed]
        # Too long to page through (or its first trades are no longer listed): what was read
        # is the trailing edge (only the first live trade, when that is all there is).
        until = missed[0] if missed else listed[0]
        return await self.with_candles(gap, after, until, missed)

    async def with_candles(
        self, gap: _Gap, after: int, until: Trade, trail: list[Trade]
    ) -> list[TickWindow]:
        """The windows of a gap too long to page through: the trades right after the
        watermark, a candle per minute from the last of them to ``until`` (the first trade of
        ``trail``, the trades right before the first live trade), then ``trail``."""
        if gap.start is not None:
            self.check_span(gap)  # before reading more
        config = self.config
        cursor = min(after + config.edge_pages * config.page_limit, until.trade_id)
        listed = await self.trades_back(gap.symbol, after, cursor, config.edge_pages)
        unbroken = bool(listed) and listed[0].trade_id <= after + 1
        gap.seen(listed)
        lead = [t for t in listed if after < t.trade_id < until.trade_id]
        if gap.start is None:
            if not lead:
                raise GapNotJudged("unlisted", f"the trades after {after} are not listed")
            gap.start = lead[0].time
        self.check_span(gap)
        if not (lead and unbroken):
            # Nothing listed right after the watermark, or a hole in what is: candles from
            # the watermark's minute on, and no trade window may move the watermark past
            # the hole before they are judged.
            lead, since = [], gap.start
        else:
            since = lead[-1].time
        last_judged = lead[-1].trade_id if lead else after
        minutes: dict[datetime, Candle] = {}
        for start, end in candles.ranges(since, until.time):
            found = await self.retrying(
                functools.partial(self.fetch_candles, gap.symbol, start, end)
            )
            minutes.update((c.start, c) for c in found)
        return [
            *(trade_window(t) for t in lead),
            *(candle_window(minutes[m], last_judged) for m in sorted(minutes)),
            *(trade_window(t) for t in trail),
        ]

    def check_span(self, gap: _Gap) -> None:
        """``GapNotJudged`` when the gap lasted longer than ``max_gap_s``."""
        if gap.start is None or gap.end is None:
            return
        if (gap.end - gap.start).total_seconds() > self.config.max_gap_s:
            raise GapNotJudged(
                "too_long", f"longer than RECOVERY_MAX_GAP_S ({self.config.max_gap_s:g} s)"
            )

    async def trades_back(self, symbol: str, after: int, cursor: int, pages: int) -> list[Trade]:
        """The listed trades with ``after <= trade_id < cursor``, oldest first, paged back
        from ``cursor`` until trade ``after + 1``, the oldest trade listed, or ``pages``
        pages. They are all of them when the first is ``after + 1`` or older."""
        found: list[Trade] = []
        for _ in range(pages):
            page: list[Trade] = await self.retrying(functools.partial(self.page, symbol, cursor))
            found += [t for t in page if after <= t.trade_id < cursor]
            oldest = min((t.trade_id for t in page), default=None)
            if oldest is None or oldest <= after + 1:
                break
            cursor = oldest
        found.sort(key=lambda t: t.trade_id)
        return found

    async def fetch_candles(self, symbol: str, start: datetime, end: datetime) -> list[Candle]:
        await self.pacer.wait()
        return await candles.fetch(self.client, symbol, start, end)

    async def page(self, symbol: str, older_than: int) -> list[Trade]:
        await self.pacer.wait()
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
            except MarketDataUnreadable as exc:
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
