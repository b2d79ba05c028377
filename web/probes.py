"""``/health`` and ``/ready``: every process serves them, whatever its roles (issue 17).

``/health`` says the process is alive; ``/ready`` that it can do its work: the database
answers, and what it reports of its feed, its gap recovery and (split roles) its roles and
the symbols its engine owns.
"""

from __future__ import annotations

import os
from typing import Any

from quart import Blueprint, Response, current_app

from tickguard.storage import DatabaseUnavailable
from tickguard.web.health import health_body
from tickguard.web.json import json_response, raw_json_response
from tickguard.web.metrics import recovery_report
from tickguard.web.services import services_of

probes = Blueprint("probes", __name__)


@probes.get("/health")
async def health() -> Response:
    return raw_json_response(health_body())


@probes.get("/ready")
async def ready() -> Response:
    services = services_of(current_app)
    feed = services.feed_status.snapshot() if services.feed_status is not None else {}
    # "pid": the process answering (the workers of `serve --workers N` share one port).
    extra: dict[str, Any] = {"pid": os.getpid()}
    # Gaps flagged and not judged: reported, never a reason to be unready (nothing a restart
    # or another instance could fix; docs/DECISIONS.md).
    recovery = recovery_report(services)
    if recovery is not None:
        extra["recovery"] = recovery
    if services.roles_report is not None:
        extra.update(services.roles_report())
    try:
        await services.db.ping()
    except DatabaseUnavailable:
        body = {"ok": False, "database": "unavailable", "feed": feed, **extra}
        return json_response(body, 503, {"Retry-After": "2"})
    return json_response({"ok": True, "database": "ok", "feed": feed, **extra})
