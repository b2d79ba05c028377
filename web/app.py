"""The quart-trio application and the hypercorn server that runs it.

``create_app(services)`` builds the app around one ``AppServices`` (kept in
``app.extensions``, no globals). ``serve`` runs it with ``hypercorn.trio.serve`` inside the
caller's nursery: ``await nursery.start(serve, app, settings, shutdown_trigger=...)`` returns
once the socket listens, with the base URLs it listens on (port 0 picks a free port).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from tickguard.config import Settings
from tickguard.web import content_type, cors, edge, errors, identity, isolation, origin
from tickguard.web.audit import audit
from tickguard.web.dashboard import dashboard
from tickguard.web.json import WireJSONProvider
from tickguard.web.metrics import metrics
from tickguard.web.openapi import openapi
from tickguard.web.pages import PAGE_READER, PageReader
from tickguard.web.probes import probes
from tickguard.web.routes import routes
from tickguard.web.seq_reader import SEQ_READER, SeqReader
from tickguard.web.services import EXTENSION, AppServices, FeedReport, services_of
from tickguard.web.ws import LIVE_SESSIONS, MAX_FRAME_BYTES, LiveSessions, live_sessions, ws
from tickguard.workers import bind_shared

__all__ = [
    "AppServices",
    "FeedReport",
    "create_app",
    "hypercorn_config",
    "serve",
    "services_of",
]

MAX_BODY_BYTES = 64 * 1024
# Seconds between the server's WebSocket pings (keep-alive through proxies and NATs).
WS_PING_INTERVAL = 20.0
# Connections the kernel queues before hypercorn accepts them (hypercorn's default is 100): a
# burst of connects beyond it has its SYNs dropped and retried 1, 3, 7... s later (finding 6).
LISTEN_BACKLOG = 4096
# What hypercorn waits for open requests at shutdown; WebSockets are closed before it.
GRACEFUL_TIMEOUT = 3.0


def create_app(services: AppServices) -> QuartTrio:
    """The tickguard HTTP/WebSocket app for ``services``."""
    app = QuartTrio("tickguard")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    # Werkzeug answers `/assets//x` with a 308 to `/assets/x` whose body is HTML; an API that
    # answers JSON everywhere treats such a path as unknown (404) instead.
    app.url_map.merge_slashes = False
    app.json = WireJSONProvider(app)
    app.extensions[EXTENSION] = services
    app.extensions[LIVE_SESSIONS] = LiveSessions()
    app.extensions[SEQ_READER] = SeqReader(services.db)
    app.extensions[PAGE_READER] = PageReader(services.db)
    errors.install(app)
    cors.install(app)
    # After CORS: a preflight is answered before any check. A /ws handshake from another
    # site is refused (origin) before its token is looked at (identity).
    origin.install(app, services.settings.cors_origins)
    identity.install(app, services.settings)
    content_type.install(app)  # a preflight has no body to check
    # Every process answers the probes and /metrics; /api/* is the api role's, /ws the
    # gateway's (issue 17: one process of `--role all` plays both).
    settings = services.settings
    app.register_blueprint(probes)
    if settings.plays("api"):
        app.register_blueprint(routes)
        app.register_blueprint(audit)
        app.register_blueprint(dashboard)
    if settings.plays("gateway"):
        app.register_blueprint(ws)
    app.register_blueprint(openapi)
    app.register_blueprint(metrics)
    # Request ids, the access line, early-answer closes and CORS headers: one layer.
    edge.install(app, cors.CorsPolicy(services.settings.cors_origins))
    return app


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hypercorn_config(
    host: str,
    port: int,
    *,
    ws_ping_interval: float | None = WS_PING_INTERVAL,
    graceful_timeout: float = GRACEFUL_TIMEOUT,
) -> Config:
    """hypercorn's settings for ``serve`` (one worker, no access log of hypercorn's own: the
    access line is ``web.edge``'s). The REST benchmark's bare app uses the same."""
    config = Config()
    config.bind = [_bind(host, port)]
    config.websocket_max_message_size = MAX_FRAME_BYTES
    config.websocket_ping_interval = ws_ping_interval
    config.graceful_timeout = graceful_timeout
    config.backlog = LISTEN_BACKLOG  # the kernel caps it at net.core.somaxconn
    config.accesslog = None
    # hypercorn's own stderr handler would bypass LOG_FORMAT; its logger propagates to ours.
    config.errorlog = logging.getLogger("hypercorn.error")
    # Quart enforces MAX_CONTENT_LENGTH itself (as a 413); hypercorn's limits stay above it.
    config.h11_max_incomplete_size = max(config.h11_max_incomplete_size, MAX_BODY_BYTES)
    return config


async def serve(
    app: QuartTrio,
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    port: int | None = None,
    ws_ping_interval: float | None = WS_PING_INTERVAL,
    graceful_timeout: float = GRACEFUL_TIMEOUT,
) -> None:
    """Serve ``app`` on ``settings.host``:``settings.port`` (``port`` overrides it; 0 picks a
    free one) until ``shutdown_trigger`` returns. With ``API_WORKERS`` above 1 this process is
    one of several workers sharing the port: it binds with SO_REUSEPORT (``bind_shared``).

    Reports ``started`` with the base URLs (``["http://127.0.0.1:54321"]``) once listening.
    On shutdown it stops accepting, closes every WebSocket session with 1001 (so hypercorn's
    graceful timeout is not spent waiting for them), lets requests in flight finish within
    ``graceful_timeout`` and returns.
    """
    port = settings.port if port is None else port
    config = hypercorn_config(
        settings.host, port, ws_ping_interval=ws_ping_interval, graceful_timeout=graceful_timeout
    )
    if settings.api_workers > 1:
        # One of `serve --workers N` (tickguard.workers): its own SO_REUSEPORT socket, handed
        # to hypercorn by descriptor (hypercorn then owns and closes it).
        config.bind = [f"fd://{bind_shared(settings.host, port).detach()}"]
    sessions = live_sessions(app)
    isolation.install()  # one connection's failure must not end the server (hypercorn#225)

    async def stop() -> None:
        await shutdown_trigger()
        sessions.close_all()

    # web.edge (installed by create_app) closes a connection answered before its body was read.
    await hypercorn_serve(app, config, shutdown_trigger=stop, task_status=task_status)
