"""hypercorn's keep-alive timeout, kept by ``web.isolation.IdleTimer`` (issue 16).

In a bare quart-trio app hypercorn's own idle timer is never re-armed after a connection's
first request (quart-trio cancels the task that re-arms it), so an idle client would hold its
connection forever. These tests serve a small quart-trio app through hypercorn with
``web.isolation`` installed, over real sockets, with the timeout shrunk to ``TIMEOUT_S``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from hypercorn.trio import serve
from quart import Response
from quart_trio import QuartTrio

from tickguard.web import isolation
from tickguard.web.app import hypercorn_config

TIMEOUT_S = 0.5
GUARD_S = 10.0
REQUEST = b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n"


def _app() -> QuartTrio:
    app = QuartTrio("keepalive")

    @app.get("/ping")
    async def ping() -> Response:
        return Response(b"pong", content_type="text/plain")

    return app


@asynccontextmanager
async def _server() -> AsyncIterator[tuple[int, trio.Event]]:
    """The app on a free port; yields the port and the event that shuts it down."""
    isolation.install()
    config = hypercorn_config("127.0.0.1", 0)
    config.keep_alive_timeout = TIMEOUT_S
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: serve(
                _app(), config, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        yield int(urls[0].rsplit(":", 1)[1]), stop
        stop.set()


async def _ask(stream: trio.SocketStream) -> None:
    """One request on ``stream`` and its whole answer."""
    await stream.send_all(REQUEST)
    answer = b""
    while not answer.endswith(b"pong"):
        chunk = await stream.receive_some(4096)
        assert chunk, f"closed before the answer: {answer!r}"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")


async def _closed_by_server(stream: trio.SocketStream) -> float:
    """Seconds until the server closes ``stream`` (which must send nothing meanwhile)."""
    started = trio.current_time()
    assert await stream.receive_some(4096) == b""
    return trio.current_time() - started


async def test_an_idle_connection_is_closed_after_the_timeout_even_after_a_request() -> None:
    with trio.fail_after(GUARD_S):
        async with _server() as (port, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            for _ in range(3):
                await _ask(stream)
            waited = await _closed_by_server(stream)
            assert TIMEOUT_S * 0.8 <= waited < TIMEOUT_S * 4


async def test_a_connection_in_use_is_kept_past_the_timeout() -> None:
    with trio.fail_after(GUARD_S):
        async with _server() as (port, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            started = trio.current_time()
            while trio.current_time() - started < TIMEOUT_S * 3:
                await _ask(stream)  # fails if the server closed it meanwhile
                await trio.sleep(TIMEOUT_S / 3)
            await _closed_by_server(stream)


async def test_shutdown_closes_an_idle_connection_at_once() -> None:
    with trio.fail_after(GUARD_S):
        async with _server() as (port, stop):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await _ask(stream)
            stop.set()
            assert await _closed_by_server(stream) < TIMEOUT_S * 0.8
