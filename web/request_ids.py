"""A request id for every HTTP request (and WebSocket session), in its logs and its response.

``web.edge`` applies it: for each request it takes the client's ``X-Request-Id`` when it is
sane (1-128 characters of ``[A-Za-z0-9._-]``, so it cannot forge log lines or bloat them,
``request_id_from``) and otherwise makes a new one (``new_request_id``), sets
``tickguard.logs.REQUEST_ID`` for everything that runs while the request is handled (the
handler and every task it starts), and echoes the id in the HTTP response's ``X-Request-Id``
header. When the response is done it logs one access line at DEBUG on ``access_log``
(``tickguard.web.access``: method, path, status, duration).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable

HEADER = "X-Request-Id"
_HEADER_KEY = HEADER.lower().encode("ascii")
_SANE = re.compile(rb"[A-Za-z0-9._-]{1,128}")

access_log = logging.getLogger("tickguard.web.access")


def new_request_id() -> str:
    """A fresh id: 32 hex characters, unique enough to grep for."""
    return uuid.uuid4().hex


def request_id_from(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The first ``X-Request-Id`` of an ASGI header list if it is sane, else None."""
    for name, value in headers:
        if name.lower() == _HEADER_KEY:
            return value.decode("ascii") if _SANE.fullmatch(value) else None
    return None
