"""The per-symbol watermarks: the last Coinbase trade judged with its closes committed.

``advance`` is persistence's (it runs inside the caller's transaction, or on its own);
``read`` is the recovery's. A watermark only moves forward: an older trade id never lowers it.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from tickguard.domain import Watermark
from tickguard.storage.db import Reader

# Also a step of the close statement (storage/writes.py), so that a close and its watermark are
# one statement: parameters $1-$3 there become that statement's own.
ADVANCE_SQL = """
INSERT INTO watermarks (symbol, last_trade_id, last_trade_time)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[])
ON CONFLICT (symbol) DO UPDATE
   SET last_trade_id = EXCLUDED.last_trade_id, last_trade_time = EXCLUDED.last_trade_time,
       updated_at = now()
 WHERE watermarks.last_trade_id < EXCLUDED.last_trade_id
"""


def latest(marks: Sequence[Watermark]) -> list[Watermark]:
    """The highest watermark of each symbol in ``marks`` (one row per symbol per statement)."""
    best: dict[str, Watermark] = {}
    for mark in marks:
        if mark.symbol not in best or best[mark.symbol].trade_id < mark.trade_id:
            best[mark.symbol] = mark
    return sorted(best.values(), key=lambda m: m.symbol)  # a fixed row-lock order


async def advance(conn: asyncpg.Connection, marks: Sequence[Watermark]) -> None:
    """Move each symbol's watermark forward to the given trade (never backward). Runs on the
    caller's connection, so inside its transaction when it has one."""
    rows = latest(marks)
    if rows:
        await conn.execute(
            ADVANCE_SQL,
            [m.symbol for m in rows],
            [m.trade_id for m in rows],
            [m.time for m in rows],
        )


async def read(db: Reader, symbol: str) -> Watermark | None:
    """The symbol's watermark, or None before its first (no trade judged since issue 14)."""
    row = await db.fetchrow(
        "SELECT last_trade_id, last_trade_time FROM watermarks WHERE symbol = $1", symbol
    )
    if row is None:
        return None
    return Watermark(symbol, int(row["last_trade_id"]), row["last_trade_time"])
