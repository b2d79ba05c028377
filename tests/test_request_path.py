"""The request path's one ASGI layer (``web.edge``, issue 16), over a real socket: the request
id, its echo and the access line stay; methods, paths and bodies reach the app's routes."""

from __future__ import annotations

import gc
import logging

import httpx
import pytest
from web_harness import running_stack

from tickguard import supervisor
from tickguard.storage import Database
from tickguard.wire import loads


async def test_the_edge_keeps_the_request_id_and_the_access_line(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tickguard.web.access")
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        echoed = await client.get("/health", headers={"X-Request-Id": "probe-42"})
        fresh = await client.get("/health")
    assert echoed.headers["x-request-id"] == "probe-42"
    assert len(fresh.headers["x-request-id"]) == 32
    lines = [r.getMessage() for r in caplog.records if r.name == "tickguard.web.access"]
    assert sum(line.startswith("GET /health 200 ") for line in lines) == 2


async def test_other_methods_and_paths_still_reach_the_app(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        post = await client.post(
            "/health", content=b"{}", headers={"Content-Type": "application/json"}
        )
        slash = await client.get("/health/")
        body = await client.request("GET", "/health", content=b"x")
    assert post.status_code == 405 and post.headers["allow"]
    assert post.json() == {"error": "Method not allowed."}
    assert slash.status_code == 404 and slash.json() == {"error": "Not found."}
    # A GET that carries a body goes through the app (and its early-answer rules).
    assert body.status_code == 200 and loads(body.content)["ok"] is True


def test_a_settled_heap_is_frozen_and_collects_its_young_generation_less_often() -> None:
    """``supervisor.settle_heap`` (issue 16): what start-up built leaves the collector's walks,
    and generation 0 is collected every ``GC_YOUNG_THRESHOLD`` net allocations instead of 700,
    so the garbage of requests in flight is not promoted to the old generations."""
    before = gc.get_threshold()
    built = [[n] for n in range(1000)]  # tracked objects alive at "start-up"
    try:
        supervisor.settle_heap()
        assert gc.get_freeze_count() >= len(built)
        assert gc.get_threshold() == (supervisor.GC_YOUNG_THRESHOLD, *before[1:])
        # Wider than CPython's default (the process may have settled before: other tests
        # serve in-process).
        assert supervisor.GC_YOUNG_THRESHOLD > 700
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
