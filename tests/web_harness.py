"""Start the real app on a real socket for tests: the HTTP/WS server alone (``running_app``),
or with the real fanout and persistence actors on a real database (``running_stack``).

Both are async context managers to enter inside a test; they listen on a free port and stop
the server (closing WebSocket sessions with 1001) on exit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio

from tickguard.actors import fanout, persistence
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import Track, Untrack
from tickguard.actors.window import WindowSlots
from tickguard.config import Settings
from tickguard.storage import Database, open_pool
from tickguard.web.app import AppServices, create_app, serve

TEST_ORIGIN = "http://localhost:5173"


def make_settings(**changes: Any) -> Settings:
    """Settings for a test server: localhost, any free port, the React dev origin."""
    return attrs.evolve(Settings(host="127.0.0.1", port=0, cors_origins=(TEST_ORIGIN,)), **changes)


@asynccontextmanager
async def running_app(
    services: AppServices,
    *,
    ws_ping_interval: float | None = None,
    graceful_timeout: float = 3.0,
    stop: trio.Event | None = None,
) -> AsyncIterator[str]:
    """Serve ``create_app(services)`` on 127.0.0.1 and a free port; yields the base URL
    (``http://127.0.0.1:PORT``). Setting ``stop``, or leaving the block, shuts the server down
    gracefully (WebSocket sessions get 1001)."""
    stop = trio.Event() if stop is None else stop
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(
                serve,
                create_app(services),
                services.settings,
                shutdown_trigger=stop.wait,
                port=0,
                ws_ping_interval=ws_ping_interval,
                graceful_timeout=graceful_timeout,
            )
        )
        try:
            yield binds[0]
        finally:
            stop.set()


def ws_url(base_url: str, user_id: str | None = None, path: str = "/ws") -> str:
    """The WebSocket URL of ``path`` on the server at ``base_url``, with ``userId``."""
    url = base_url.replace("http://", "ws://", 1) + path
    return url if user_id is None else f"{url}?userId={user_id}"


class EngineRecorder:
    """Stands where the engines' registry goes: records each Track/Untrack persistence sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Track | Untrack]] = []

    def send(self, symbol: str, message: Track | Untrack) -> None:
        self.sent.append((symbol, message))


@attrs.frozen
class Stack:
    """A running app with its actors: ``base_url`` to call, the parts to inspect."""

    base_url: str
    services: AppServices
    fanout_config: fanout.FanoutConfig
    engines: EngineRecorder

    def ws_url(self, user_id: str | None = None, path: str = "/ws") -> str:
        return ws_url(self.base_url, user_id, path)


@asynccontextmanager
async def running_stack(
    db: Database,
    *,
    settings: Settings | None = None,
    queue_bytes: int = fanout.DEFAULT_QUEUE_BYTES,
    request_timeout: float = 10.0,
    ws_ping_interval: float | None = None,
    slots: WindowSlots | None = None,
    stop: trio.Event | None = None,
    graceful_timeout: float = 3.0,
) -> AsyncIterator[Stack]:
    """The app with the real persistence and fanout actors on ``db``; yields a ``Stack``.

    ``stop`` (optional) shuts the server down when set, as the supervisor's trigger would.
    """
    settings = settings or make_settings()
    fanout_config = fanout.FanoutConfig(queue_bytes=queue_bytes)
    engines = EngineRecorder()
    services = AppServices(
        settings=settings,
        db=db,
        persistence=Mailbox("persistence"),
        fanout=Mailbox("fanout"),
        feed_status=FeedStatus(),
        slots=slots or WindowSlots(),
        request_timeout=request_timeout,
    )
    stopping = trio.Event()
    async with trio.open_nursery() as actors:
        await actors.start(partial(fanout.run, services.fanout, config=fanout_config))
        # Persistence is stopped by draining, not cancelled: cancelling it in the middle of a
        # query makes asyncpg report a lost connection when the test's loop closes.
        async with trio.open_nursery() as writers:
            await writers.start(
                partial(
                    persistence.run,
                    services.persistence,
                    db,
                    services.fanout,
                    engines,
                    config=persistence.PersistenceConfig(
                        max_open_per_user=settings.max_open_positions_per_user
                    ),
                    stopping=stopping,
                )
            )
            async with running_app(
                services,
                ws_ping_interval=ws_ping_interval,
                stop=stop,
                graceful_timeout=graceful_timeout,
            ) as base_url:
                yield Stack(base_url, services, fanout_config, engines)
            stopping.set()
        actors.cancel_scope.cancel()


async def services_without_database(database_url: str) -> AppServices:
    """App services whose pool is already closed: every database call fails as if the
    server were lost (no persistence actor runs behind them)."""
    async with open_pool(database_url) as doomed:
        pass  # closed on exit
    return AppServices(
        settings=make_settings(),
        db=doomed,
        persistence=Mailbox("persistence"),
        fanout=Mailbox("fanout"),
        feed_status=FeedStatus(),
    )
