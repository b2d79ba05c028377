"""How a positions row becomes a ``Position``: the column list every query selects, in
``Position``'s field order; and ``POSITION_JSON``, the SQL that has PostgreSQL write a row as
the API's Position object directly (the list reads pass that text through undecoded).

``POSITION_JSON`` is byte for byte what ``wire.position_to_json`` + ``wire.dumps`` write for
the same row (tests/test_json_sql.py compares the two on many values): keys in the same
order, no spaces, ``null`` for NULL, strings escaped by ``to_json``, timestamps as
``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC with the microseconds truncated (``isoformat`` with
``timespec="milliseconds"`` truncates too), and prices as ``wire.plain_decimal`` leaves them
and Python's ``str(Decimal)`` (which msgspec writes) spells them: no trailing zeros, and in
exponent form below 10^-6 (``0.00000012`` is ``1.2E-7``; NUMERIC(18,8) has no value large
enough for ``str`` to use an exponent there).
"""

from __future__ import annotations

from typing import Any

from tickguard.domain import (
    Position,
)

COLUMNS = (
    "id, user_id, symbol, side, entry_price, take_profit, stop_loss, status, close_price, "
    "close_reason, created_at, updated_at, closed_at, triggered_at"
)


P_COLUMNS = ", ".join(f"p.{c.strip()}" for c in COLUMNS.split(","))


def to_position(row: Any) -> Position:
    """A ``Position`` from a row that has the columns of ``COLUMNS``, in that order (the
    order of ``Position``'s fields: positional is several times faster than by name, and an
    engine start converts 100,000 rows)."""
    return Position(*row[:_FIELDS])


_FIELDS = len(COLUMNS.split(","))


def _sql_price(column: str) -> str:
    """SQL text of a NUMERIC column as a JSON number spelled as ``str(plain_decimal(v))``."""
    trimmed = f"trim_scale(abs({column}))"
    # Below 10^-6 Python writes d.dddE-n: the significant digits after "0.", and the exponent
    # of the first one.
    digits = f"ltrim(split_part({trimmed}::text, '.', 2), '0')"
    exponent = f"(length({digits}) - 1 - scale({trimmed}))"
    tiny = (
        f"CASE WHEN {column} < 0 THEN '-' ELSE '' END || left({digits}, 1)"
        f" || CASE WHEN length({digits}) > 1 THEN '.' || substr({digits}, 2) ELSE '' END"
        f" || 'E' || {exponent}::text"
    )
    return (
        f"CASE WHEN {column} IS NULL THEN 'null'"
        f" WHEN {column} <> 0 AND abs({column}) < 0.000001 THEN {tiny}"
        f" ELSE trim_scale({column})::text END"
    )


def _sql_time(column: str) -> str:
    return (
        f"CASE WHEN {column} IS NULL THEN 'null' ELSE "
        f"'\"' || to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        " || '\"' END"
    )


def _sql_text(column: str) -> str:
    return f"coalesce(to_json({column})::text, 'null')"


_JSON_FIELDS = (
    ("id", "'\"' || id::text || '\"'"),
    ("userId", _sql_text("user_id")),
    ("symbol", _sql_text("symbol")),
    ("side", _sql_text("side")),
    ("entryPrice", _sql_price("entry_price")),
    ("takeProfit", _sql_price("take_profit")),
    ("stopLoss", _sql_price("stop_loss")),
    ("status", _sql_text("status")),
    ("closePrice", _sql_price("close_price")),
    ("closeReason", _sql_text("close_reason")),
    ("createdAt", _sql_time("created_at")),
    ("updatedAt", _sql_time("updated_at")),
    ("closedAt", _sql_time("closed_at")),
    ("triggeredAt", _sql_time("triggered_at")),
)

# One positions row (unqualified column names) as the API's Position object, JSON text.
POSITION_JSON = (
    "'{' || "
    + " || ',' || ".join(f"'\"{key}\":' || ({expr})" for key, expr in _JSON_FIELDS)
    + " || '}'"
)
