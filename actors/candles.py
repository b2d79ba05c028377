"""Coinbase's 1-minute candles, the recovery's view of a gap too long to page through in trades
(issue 14): ``GET /products/{id}/candles?granularity=60&start=&end=``, at most 300 rows per
request, each ``[time (unix s), low, high, open, close, volume]``, newest first; a minute
without trades has no row.

Pure parsing and the request itself; what a candle means to the engine (one window whose
times are the minute's start) is ``actors/recovery.py``'s. Prices are parsed straight to
``Decimal`` from the JSON text: Coinbase writes them as JSON numbers, never through a float.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs
import httpx

GRANULARITY_S = 60
MAX_PER_REQUEST = 300  # Coinbase answers 400 to a range of more candles than this


class MarketDataUnreadable(Exception):
    """A REST market-data answer could not be used (status, body or shape). ``retry_after``
    is the server's ``Retry-After`` in seconds (0 when none); ``retryable`` is False for an
    answer a retry cannot fix (a 4xx other than 429)."""

    def __init__(self, message: str, *, retry_after: float = 0.0, retryable: bool = True):
        super().__init__(message)
        self.retry_after = retry_after
        self.retryable = retryable


class CandlesUnreadable(MarketDataUnreadable):
    """A candles answer could not be used."""


def check_answered(response: httpx.Response, unreadable: type[MarketDataUnreadable]) -> None:
    """Raise ``unreadable`` for an answer other than 200: retryable on 429 and 5xx, not sooner
    than the server's ``Retry-After``."""
    status = response.status_code
    if status == 200:
        return
    raw = response.headers.get("Retry-After", "")
    raise unreadable(
        f"GET {response.request.url.path} answered {status}",
        retry_after=float(raw) if raw.isdigit() else 0.0,
        retryable=status == 429 or status >= 500,
    )


@attrs.frozen
class Candle:
    """One minute of trades: its start and its extremes (and last price)."""

    start: datetime
    low: Decimal
    high: Decimal
    close: Decimal


def minute_of(time: datetime) -> datetime:
    """The start of the minute ``time`` falls in (UTC)."""
    return time.astimezone(UTC).replace(second=0, microsecond=0)


def ranges(first: datetime, last: datetime) -> Iterator[tuple[datetime, datetime]]:
    """``[start, end)`` request ranges of at most ``MAX_PER_REQUEST`` minutes covering the
    minutes from ``minute_of(first)`` to ``minute_of(last)``, both included, oldest first."""
    start, stop = minute_of(first), minute_of(last) + timedelta(seconds=GRANULARITY_S)
    step = timedelta(seconds=GRANULARITY_S * MAX_PER_REQUEST)
    while start < stop:
        end = min(start + step, stop)
        yield start, end
        start = end


def _price(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise TypeError(f"price {value!r}")
    price = Decimal(value)
    if not price.is_finite() or price <= 0:
        raise ValueError(f"price {price}")
    return price


def parse_candles(text: str | bytes) -> list[Candle]:
    """The candles of one answer body, oldest first; ``CandlesUnreadable`` when it is not a
    list of ``[time, low, high, open, close, volume]`` rows with ``low <= high``."""
    try:
        payload = json.loads(text, parse_float=Decimal)
    except ValueError as exc:  # a body cut short, or not JSON (bad UTF-8 included)
        raise CandlesUnreadable(f"GET /candles answered bad JSON: {exc}") from None
    if not isinstance(payload, list):
        raise CandlesUnreadable("GET /candles did not answer a list")
    candles = []
    try:
        for row in payload:
            if not isinstance(row, list) or len(row) < 5:
                raise TypeError(f"row {row!r}")
            at = row[0]
            if isinstance(at, bool) or not isinstance(at, int):
                raise TypeError(f"time {at!r}")
            low, high, close = _price(row[1]), _price(row[2]), _price(row[4])
            if low > high:
                raise ValueError(f"low {low} above high {high}")
            candles.append(Candle(datetime.fromtimestamp(at, UTC), low, high, close))
    except (TypeError, ValueError, InvalidOperation, OverflowError, OSError) as exc:
        raise CandlesUnreadable(f"GET /candles listed a bad candle: {exc}") from None
    candles.sort(key=lambda c: c.start)
    return candles


def _iso(time: datetime) -> str:
    return time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def fetch(
    client: httpx.AsyncClient, symbol: str, start: datetime, end: datetime
) -> list[Candle]:
    """The 1-minute candles of ``symbol`` starting in ``[start, end)``, oldest first (at most
    ``MAX_PER_REQUEST`` minutes). Raises ``CandlesUnreadable`` or ``httpx.HTTPError``."""
    response = await client.get(
        f"/products/{symbol}/candles",
        params={"granularity": str(GRANULARITY_S), "start": _iso(start), "end": _iso(end)},
    )
    check_answered(response, CandlesUnreadable)
    # Coinbase's range is inclusive of ``end``: a row of the next range is left to that one.
    return [c for c in parse_candles(response.content) if start <= c.start < end]
