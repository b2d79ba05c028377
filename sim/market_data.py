"""Coinbase's public REST market data, answered from the trades the simulator published:
``GET /products``, ``GET /products/{id}``, ``GET /products/{id}/trades`` and
``GET /products/{id}/candles`` (COINBASE.md, "Recovering what a disconnect hid").

Pure functions of the products and the query: no I/O, no clock but the ``now`` given.
Errors are answered as Coinbase does: ``{"message": ...}`` with 400 or 404.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import attrs

from tickguard.sim.products import Product
from tickguard.sim.wire import dumps_exact, parse_time

MAX_LIMIT = 1000
MAX_CANDLES = 300
GRANULARITIES = (60, 300, 900, 3600, 21600, 86400)


@attrs.frozen
class Answer:
    """An HTTP answer: status, JSON body text, extra headers."""

    status: int
    body: str
    headers: tuple[tuple[str, str], ...] = ()


def _json(status: int, value: object, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    return Answer(status, json.dumps(value), headers)


def _message(status: int, message: str) -> Answer:
    return _json(status, {"message": message})


NOT_FOUND = _message(404, "NotFound")


def answer(
    products: Mapping[str, Product], path: str, query: Mapping[str, str], now: datetime
) -> Answer | None:
    """The answer to ``GET path?query``, or None when ``path`` is not a market-data route."""
    parts = path.strip("/").split("/")
    if parts[0] != "products" or len(parts) > 3:
        return None
    if len(parts) == 1:
        return _json(200, [p.to_json() for p in products.values()])
    product = products.get(parts[1])
    if product is None:
        return NOT_FOUND
    if len(parts) == 2:
        return _json(200, product.to_json())
    if parts[2] == "trades":
        return trades(product, query)
    if parts[2] == "candles":
        return candles(product, query, now)
    return NOT_FOUND


def _int(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise ValueError(f"Invalid {name}")
    return int(raw)


def trades(product: Product, query: Mapping[str, str]) -> Answer:
    """Newest first; ``after`` pages to older trades, ``before`` to newer ones (trade ids);
    ``limit`` 1..1000 (default 1000). ``CB-BEFORE`` / ``CB-AFTER`` carry the page's newest and
    oldest trade id, the cursors for the next request."""
    try:
        after, before = _int(query, "after"), _int(query, "before")
        limit = _int(query, "limit")
    except ValueError as exc:
        return _message(400, str(exc))
    limit = MAX_LIMIT if limit is None else limit
    if not 1 <= limit <= MAX_LIMIT:
        return _message(400, f"limit must be between 1 and {MAX_LIMIT}")
    if before is not None and after is None:
        # The trades just after the cursor (the oldest newer ones), still listed newest first.
        newer = list(product.trades_between(before, before + limit + 1))
        page = newer[-limit:]
    else:
        older_than = after if after is not None else product.trade_id + 1
        newer_than = before if before is not None else -1
        page = []
        for trade in product.trades_between(newer_than, older_than):
            page.append(trade)
            if len(page) == limit:
                break
    headers: tuple[tuple[str, str], ...] = ()
    if page:
        headers = (("CB-BEFORE", str(page[0].trade_id)), ("CB-AFTER", str(page[-1].trade_id)))
    return _json(200, [t.to_json() for t in page], headers)


def candles(product: Product, query: Mapping[str, str], now: datetime) -> Answer:
    """At most 300 rows ``[time, low, high, open, close, volume]``, newest first, one per
    ``granularity`` seconds that saw a trade in ``[start, end)`` (default: the last 300)."""
    try:
        granularity = _int(query, "granularity") or 60
    except ValueError as exc:
        return _message(400, str(exc))
    if granularity not in GRANULARITIES:
        return _message(400, "Unsupported granularity")
    try:
        end = parse_time(query["end"]) if query.get("end") else now
        start = (
            parse_time(query["start"])
            if query.get("start")
            else end - timedelta(seconds=granularity * MAX_CANDLES)
        )
    except ValueError:
        return _message(400, "Invalid start or end time")
    if end < start:
        return _message(400, "start must be before end")
    if (end - start).total_seconds() / granularity > MAX_CANDLES:
        return _message(
            400,
            "granularity too small for the requested time range. "
            f"Count of aggregations requested exceeds {MAX_CANDLES}",
        )
    lo, hi = start.timestamp(), end.timestamp()
    buckets: dict[int, list[Decimal]] = {}  # bucket -> [low, high, open, close, volume]
    for trade in product.history:  # oldest first: the first trade seen opens its bucket
        at = trade.time.timestamp()
        if not lo <= at < hi:
            continue
        bucket = int(at // granularity) * granularity
        row = buckets.get(bucket)
        if row is None:
            buckets[bucket] = [trade.price, trade.price, trade.price, trade.price, trade.size]
        else:
            row[0] = min(row[0], trade.price)
            row[1] = max(row[1], trade.price)
            row[3] = trade.price
            row[4] += trade.size
    rows = [[bucket, *buckets[bucket]] for bucket in sorted(buckets, reverse=True)]
    return Answer(200, dumps_exact(rows[:MAX_CANDLES]))


def utc_now() -> datetime:
    return datetime.now(UTC)
