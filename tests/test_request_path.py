"""The request path's shortcuts (issue 16) answer exactly what the framework's route answers,
over a real socket: ``GET /health`` written by ``web.health`` before Quart, compared with the
``/health`` route itself (a ``HEAD``, which the shortcut leaves to Quart), header for header,
with and without a listed ``Origin``, for a listed origin set and for ``*``; the request id,
its echo and the access line stay."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from web_harness import TEST_ORIGIN, make_settings, running_stack

from tickguard.storage import Database
from tickguard.web.cors import CorsPolicy
from tickguard.web.edge import Edge
from tickguard.web.health import health_body
from tickguard.wire import loads

ORIGINS = {
    "listed": (TEST_ORIGIN, "https://app.example.com"),
    "any": ("*",),
}


def _headers(response: httpx.Response) -> list[tuple[str, str]]:
    """Headers in order, without those that vary from one response to the next."""
    skip = {b"date", b"x-request-id"}
    return [
        (name.decode().lower(), value.decode())
        for name, value in response.headers.raw
        if name.lower() not in skip
    ]


@pytest.mark.parametrize("origins", list(ORIGINS))
@pytest.mark.parametrize("origin", [None, "https://app.example.com", "https://evil.example"])
async def test_health_shortcut_answers_as_the_route_does(
    db: Database, origins: str, origin: str | None
) -> None:
    settings = make_settings(cors_origins=ORIGINS[origins])
    headers = {} if origin is None else {"Origin": origin}
    async with (
        running_stack(db, settings=settings) as stack,
        httpx.AsyncClient(base_url=stack.base_url) as client,
    ):
        fast = await client.get("/health", headers=headers)
        route = await client.head("/health", headers=headers)
    assert fast.status_code == route.status_code == 200
    assert _headers(fast) == _headers(route)
    body = loads(fast.content)
    assert list(body) == ["ok", "service", "timestamp"]
    assert body["ok"] is True and body["service"] == "tickguard"
    assert len(fast.content) == len(health_body()) == int(route.headers["content-length"])
    if origin == "https://app.example.com" or (origins == "any" and origin is not None):
        assert fast.headers["access-control-allow-origin"] in (origin, "*")
    else:
        assert "access-control-allow-origin" not in fast.headers


async def test_health_shortcut_keeps_the_request_id_and_the_access_line(
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


async def test_health_shortcut_never_calls_the_app_for_a_plain_get() -> None:
    calls: list[str] = []
    sent: list[dict[str, object]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(f"{scope['method']} {scope['path']}")

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    shortcut = Edge(app, CorsPolicy((TEST_ORIGIN,)))
    plain = {"type": "http", "method": "GET", "path": "/health", "headers": []}
    await shortcut(plain, receive, send)
    assert calls == [] and [m["type"] for m in sent] == [
        "http.response.start",
        "http.response.body",
    ]
    for other in (
        {**plain, "method": "HEAD"},
        {**plain, "path": "/ready"},
        {**plain, "headers": [(b"content-length", b"3")]},
    ):
        await shortcut(other, receive, send)
    assert calls == ["HEAD /health", "GET /ready", "GET /health"]
