"""tickguard's log lines: readable text by default, one JSON object per line for machines.

Two context variables say where a line comes from: ``ACTOR`` (the supervised child whose task
wrote it, e.g. ``persistence`` or ``engine:BTC-USD``; the supervisor sets it as it starts each
child) and ``REQUEST_ID`` (the HTTP request being handled; the web layer sets it). Both follow
Trio's task tree: a task started inside an actor or a request inherits them. ``ContextFilter``
copies them onto every record, so any logger in any library gets them without knowing.

Both formats pass every message and traceback through ``redact``: a ``token=`` query value or
a JWT-shaped string never reaches a log line, whichever logger wrote it (docs/SECURITY.md).

Formats::

    text  2026-11-24T10:15:30.123Z INFO [engine:BTC-USD] tickguard.actors.engine: started
          2026-11-24T10:15:30.123Z WARNING [web req=3f2a...] tickguard.web: database unavailable
    json  {"time": "2026-11-24T10:15:30.123Z", "level": "info", "logger": "...",
           "message": "...", "actor": "engine:BTC-USD", "request_id": null}
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, Literal

# Context variables must live at module level (one per process, values per task context).
ACTOR: ContextVar[str | None] = ContextVar("tickguard_actor", default=None)
REQUEST_ID: ContextVar[str | None] = ContextVar("tickguard_request_id", default=None)

LogFormat = Literal["text", "json"]

# Libraries whose INFO lines repeat what tickguard logs itself.
_QUIET_LOGGERS = ("hypercorn.access",)

# What must never reach a log line (docs/SECURITY.md "What is logged"): the value of a
# ``token=`` query parameter (the /ws client's), and anything shaped like a JWT (a compact
# JWS: "eyJ" is the base64url of '{"'), wherever a library or a message put it.
_TOKEN_PARAM = re.compile(r"(?i)([?&;](?:access_)?token=)[^&;#\s\"']+")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """``text`` with token query values and JWT-shaped strings replaced by ``[redacted]``."""
    if "token=" not in text.lower() and "eyJ" not in text:
        return text  # the common case costs two scans, no regex
    return _JWT.sub(REDACTED, _TOKEN_PARAM.sub(lambda m: m.group(1) + REDACTED, text))


def iso_time(created: float) -> str:
    """A record's creation time as ISO 8601 UTC with milliseconds (``...T10:15:30.123Z``)."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class ContextFilter(logging.Filter):
    """Adds ``actor`` and ``request_id`` (None when unset) to each record; never drops one.

    Attach it to a handler, not a logger: handler filters see the records of every logger
    that propagates to it, logger filters only their own logger's.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        # A record that already carries them (passed via ``extra=``) keeps its own values.
        if not hasattr(record, "actor"):
            record.actor = ACTOR.get()
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """``time level [actor req=id] logger: message``, then the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        actor = getattr(record, "actor", None) or "-"
        request_id = getattr(record, "request_id", None)
        where = f"{actor} req={request_id}" if request_id else actor
        line = (
            f"{iso_time(record.created)} {record.levelname} [{where}] "
            f"{record.name}: {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped).

    Keys: ``time`` (ISO UTC, ms), ``level`` (lower case), ``logger``, ``message``, ``actor``,
    ``request_id`` (null when unset), and ``exception`` (the formatted traceback) only when
    the record has one.
    """

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            "actor": getattr(record, "actor", None),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            body["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            body["stack"] = redact(self.formatStack(record.stack_info))
        # default=str: a message argument is already rendered, but ``extra`` values may not be
        # JSON types; a log line must never raise.
        return json.dumps(body, default=str)


def make_handler(log_format: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) writing ``log_format`` with the context filter."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure(level: str, log_format: LogFormat, stream: IO[str] | None = None) -> None:
    """Route every logger to one handler on the root logger at ``level`` (``info``...).

    Replaces the root logger's handlers (called once, at process start); leaves other
    loggers' own handlers alone.
    """
    root = logging.getLogger()
    root.handlers[:] = [make_handler(log_format, stream)]
    root.setLevel(level.upper())
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
