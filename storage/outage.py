"""Keeping a database outage to a few log lines.

While PostgreSQL is away, asyncpg's pool logs every failed reconnect with a 30-line
traceback, and every request or batch that fails says "database unavailable": several lines a
second for as long as it lasts. ``OutageLog`` lets the first line of each kind through, then
one per ``interval_s`` saying how many it held back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tickguard.storage.db import DatabaseUnavailable

ASYNCPG_POOL = "asyncpg.pool"


def about_outage(record: logging.LogRecord) -> bool:
    """Whether ``record`` reports the database being away: a line of asyncpg's pool (its only
    warnings are failed reconnects), or one whose argument or exception is a
    ``DatabaseUnavailable``."""
    if record.name == ASYNCPG_POOL:
        return True
    args = record.args if isinstance(record.args, tuple) else ()
    error = record.exc_info[1] if record.exc_info else None
    return any(isinstance(a, DatabaseUnavailable) for a in (*args, error))


class OutageLog(logging.Filter):
    """A filter for loggers that report outages. Records ``about_outage`` are limited to one
    per (logger, message template) per ``interval_s``; the one that passes after a pause says
    how many were held back, and a traceback shrinks to its exception's one line. Other
    records pass untouched. ``clock`` is for tests."""

    def __init__(
        self, interval_s: float = 10.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}
        self.held_back = 0  # in total, for tests and curiosity

    def filter(self, record: logging.LogRecord) -> bool:
        if not about_outage(record):
            return True
        key = (record.name, record.msg)
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            self.held_back += 1
            return False
        self._seen[key] = (now, 0)
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            message += f" ({type(error).__name__}: {error})"
            record.exc_info = None
            record.exc_text = None
        if last is not None and last[1]:
            message += f" [{last[1]} more like this in the last {now - last[0]:.0f} s]"
        record.msg, record.args = message, ()
        return True


@contextmanager
def quiet_outages(*logger_names: str, interval_s: float = 10.0) -> Iterator[OutageLog]:
    """Install one ``OutageLog`` on asyncpg's pool logger and on ``logger_names`` for the
    block (filters on a logger see only that logger's own records)."""
    outage_log = OutageLog(interval_s)
    loggers = [logging.getLogger(name) for name in (ASYNCPG_POOL, *logger_names)]
    for logger in loggers:
        logger.addFilter(outage_log)
    try:
        yield outage_log
    finally:
        for logger in loggers:
            logger.removeFilter(outage_log)
