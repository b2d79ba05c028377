"""``GET /health``'s body, encoded once per request without a response object's JSON machinery
(issue 16): liveness is what load balancers and monitors ask most often."""

from __future__ import annotations

from datetime import UTC, datetime

from tickguard.wire import dumps, iso_millis


def health_body() -> bytes:
    """The liveness body: ``{"ok":true,"service":"tickguard","timestamp":"…Z"}``."""
    now = datetime.now(UTC)
    return dumps({"ok": True, "service": "tickguard", "timestamp": iso_millis.__wrapped__(now)})
