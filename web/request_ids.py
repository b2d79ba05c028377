"""A request id for every HTTP request (and WebSocket session), in its logs and its response.

``web.edge`` applies it: for each request it takes the client's ``X-Request-Id`` when it is
sane (1-128 characters of ``[A-Za-z0-9._-]``, so it cannot forge log lines or bloat them,
``sane_request_id``) and otherwise makes a new one (``new_request_id``), sets
``tickguard.logs.REQUEST_ID`` for everything that runs while the request is handled (the
handler and every task it starts), and echoes the id in the HTTP response's ``X-Request-Id``
header. When the response is done it logs one access line at DEBUG on ``access_log``
(``tickguard.web.access``: method, path, status, duration).
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets

HEADER = "X-Request-Id"
_HEADER_KEY = HEADER.lower().encode("ascii")
_SANE = re.compile(rb"[A-Za-z0-9._-]{1,128}")

access_log = logging.getLogger("tickguard.web.access")


# A process's ids: a random prefix of its own and a counter (a uuid4 per request was over 1% of
# a request's CPU, issue 16). Workers are started as new processes (tickguard.workers), never
# forked, so each has its own prefix.
_PREFIX = secrets.token_hex(8)
_NEXT = itertools.count(1)


def new_request_id() -> str:
    """A fresh id: 32 hex characters, unique enough to grep for (16 of this process's random
    prefix, 16 of a counter)."""
    return f"{_PREFIX}{next(_NEXT):016x}"


def sane_request_id(value: bytes) -> str | None:
    """A client's ``X-Request-Id`` value if it is sane (1-128 characters of
    ``[A-Za-z0-9._-]``), else None."""
    return value.decode("ascii") if _SANE.fullmatch(value) else None
