"""The supervision tree of one tickguard process, and how it starts and stops.

Reading this file should explain the program. Inside one ``trio.run``:

    storage runtime (trio-asyncio loop + asyncpg pool; embedded PostgreSQL when no URL)
      migrate
      Supervisor (one_for_one, restart intensity per child)
        persistence   the only writer; commits, then publishes to fanout, then Track/Untrack
        fanout        WebSocket sessions and their bounded queues
        feed          one Coinbase connection; merges tickers into each symbol's WindowSlot
        engines       a nested supervisor: one engine per symbol, started on demand
        web           hypercorn serving the quart-trio app (REST + /ws)

Start order is the list above; on SIGINT/SIGTERM the stop order is web (stop accepting),
feed, engines (hand over what they triggered), persistence (drain, bounded by
SHUTDOWN_GRACE_MS), fanout (close sessions with 1001). The supervisor owns every mailbox and
window slot, so a restarted actor finds the same inbox and nobody else learns of the restart.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from tickguard.actors import engine, fanout, feed, persistence
from tickguard.actors.faults import FaultPoints
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import Track, Untrack, Watch
from tickguard.actors.supervision import (
    ChildSpec,
    RestartPolicy,
    Supervisor,
    SupervisorGaveUp,
    innermost,
    run_until_signalled,
)
from tickguard.actors.window import WindowSlots
from tickguard.config import Settings
from tickguard.storage import Database, DatabaseUnavailable, migrate, open_database
from tickguard.storage import positions as store

log = logging.getLogger("tickguard")

MIGRATE_PATIENCE_S = 30.0  # how long start-up waits for a database that is not up yet


class EngineDirectory:
    """The per-symbol engines: their mailboxes, and starting an engine on first use.

    ``send`` never blocks: it queues the message on the symbol's mailbox (unbounded) and, the
    first time a symbol is seen, asks the starter to start its engine. The engine loads its
    open positions from the database as it starts, so a Track queued before that is harmless
    (the engine ignores a position it already holds).
    """

    def __init__(
        self,
        db: Database,
        slots: WindowSlots,
        persistence_box: Mailbox[Any],
        feed_box: Mailbox[Any] | None,
        *,
        engine_config: engine.EngineConfig = engine.EngineConfig(),
        faults: FaultPoints | None = None,
    ) -> None:
        self.db = db
        self.slots = slots
        self.persistence_box = persistence_box
        self.feed_box = feed_box
        self.engine_config = engine_config
        self.faults = faults
        self.mailboxes: dict[str, Mailbox[Track | Untrack]] = {}
        self.stats: dict[str, engine.EngineStats] = {}  # per symbol, across engine restarts
        self.supervisor = Supervisor([ChildSpec("engine-starter", self._run_starter)])
        self._wanted_send, self._wanted = trio.open_memory_channel[str](math.inf)

    def send(self, symbol: str, message: Track | Untrack) -> None:
        self._mailbox(symbol).send_nowait(message)

    def _mailbox(self, symbol: str) -> Mailbox[Track | Untrack]:
        box = self.mailboxes.get(symbol)
        if box is None:
            box = self.mailboxes[symbol] = Mailbox(f"engine:{symbol}")
            self._wanted_send.send_nowait(symbol)
        return box

    async def _run_starter(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Start an engine for every symbol with open positions, then each new symbol."""
        for symbol in await store.open_symbols(self.db):
            self._mailbox(symbol)
        for symbol in list(self.mailboxes):  # also after a restart of this supervisor
            await self._ensure(symbol)
        task_status.started()
        async for symbol in self._wanted:
            await self._ensure(symbol)

    async def _ensure(self, symbol: str) -> None:
        child_id = f"engine:{symbol}"
        if self.supervisor.has_child(child_id):
            return
        if self.feed_box is not None:
            self.feed_box.send_nowait(Watch(symbol, reply=None))
        start = functools.partial(
            engine.run,
            symbol,
            self.slots.get(symbol),
            self.mailboxes[symbol],
            self.persistence_box,
            functools.partial(store.open_positions, self.db),
            config=self.engine_config,
            stats=self.stats.setdefault(symbol, engine.EngineStats()),
            feed=self.feed_box,
            faults=self.faults,
        )
        await self.supervisor.start_child(
            ChildSpec(child_id, start, mailboxes=(self.mailboxes[symbol],))
        )


@attrs.frozen
class Tree:
    """Everything the running tree is made of, for tests and benchmarks to reach."""

    settings: Settings
    db: Database
    supervisor: Supervisor
    slots: WindowSlots
    persistence_box: Mailbox[Any]
    fanout_box: Mailbox[Any]
    feed_box: Mailbox[Any]
    feed_status: FeedStatus
    engines: EngineDirectory
    app: Any
    urls: list[str]  # where web listens, once it started (port 0 picks a free port)


def feed_config(settings: Settings) -> feed.FeedConfig:
    return feed.FeedConfig(
        url=settings.coinbase_ws_url,
        products=settings.coinbase_products,
        reconnect_base_s=settings.ws_reconnect_base_ms / 1000,
        reconnect_max_s=settings.ws_reconnect_max_ms / 1000,
        heartbeat_timeout_s=settings.ws_heartbeat_timeout_ms / 1000,
    )


def build_tree(
    settings: Settings,
    db: Database,
    *,
    faults: FaultPoints | None = None,
    policy: RestartPolicy = RestartPolicy(),
    fanout_config: fanout.FanoutConfig | None = None,
) -> Tree:
    """The actors, their mailboxes and the order they start and stop in (not yet running).

    ``faults`` and ``fanout_config`` are for tests (fault points; a small session queue).
    """
    from tickguard.web.app import AppServices, create_app, serve
    from tickguard.web.metrics import MetricsSources

    slots = WindowSlots()
    persistence_box: Mailbox[Any] = Mailbox("persistence")
    fanout_box: Mailbox[Any] = Mailbox("fanout")
    feed_box: Mailbox[Any] = Mailbox("feed")
    feed_status = FeedStatus()
    # The actors write these counters and /metrics reads them; they outlive actor restarts.
    persistence_stats = persistence.PersistenceStats()
    fanout_config = fanout_config or fanout.FanoutConfig()
    engines = EngineDirectory(db, slots, persistence_box, feed_box, faults=faults)
    app = create_app(
        AppServices(
            settings=settings,
            db=db,
            persistence=persistence_box,
            fanout=fanout_box,
            feed=feed_box,
            feed_status=feed_status,
            slots=slots,
            metrics=MetricsSources(engines.stats, persistence_stats, fanout_config.stats),
        )
    )
    grace_s = settings.shutdown_grace_ms / 1000
    urls: list[str] = []
    children = [
        ChildSpec(
            "persistence",
            functools.partial(
                persistence.run,
                persistence_box,
                db,
                fanout_box,
                engines,
                config=persistence.PersistenceConfig(
                    max_open_per_user=settings.max_open_positions_per_user
                ),
                stats=persistence_stats,
                faults=faults,
            ),
            mailboxes=(persistence_box,),
            graceful=True,
            grace_s=grace_s,
        ),
        ChildSpec(
            "fanout",
            functools.partial(fanout.run, fanout_box, config=fanout_config, faults=faults),
            mailboxes=(fanout_box,),
        ),
        ChildSpec(
            "feed",
            functools.partial(
                feed.run, feed_config(settings), slots, feed_box, feed_status, faults=faults
            ),
            mailboxes=(feed_box,),
        ),
        ChildSpec("engines", engines.supervisor.run, graceful=True, grace_s=grace_s),
        ChildSpec(
            "web",
            functools.partial(_web, serve, app, settings, urls),
            graceful=True,
            grace_s=grace_s,
        ),
    ]
    supervisor = Supervisor(
        children, policy, stop_order=["web", "feed", "engines", "persistence", "fanout"]
    )
    return Tree(
        settings,
        db,
        supervisor,
        slots,
        persistence_box,
        fanout_box,
        feed_box,
        feed_status,
        engines,
        app,
        urls,
    )


async def _web(
    serve: Any,
    app: Any,
    settings: Settings,
    urls: list[str],
    *,
    stopping: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            functools.partial(serve, app, settings, shutdown_trigger=stopping.wait)
        )
        urls[:] = bound
        log.info("listening on %s", " ".join(bound))
        task_status.started()


@asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[Database]:
    """The storage runtime for ``settings``: the embedded server when no URL is set, the loop,
    the pool, and the schema migrated (waiting up to MIGRATE_PATIENCE_S for the database)."""
    if settings.database_url is None:
        from tickguard.storage.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(settings.data_dir)
        dsn = await trio.to_thread.run_sync(server.start)
        try:
            async with _migrated(dsn) as db:
                yield db
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(server.stop)
    else:
        async with _migrated(settings.database_url) as db:
            yield db


@asynccontextmanager
async def _migrated(dsn: str) -> AsyncIterator[Database]:
    with trio.move_on_after(MIGRATE_PATIENCE_S):
        while True:
            try:
                async with open_database(dsn) as db:
                    await migrate(db)
                    break
            except* DatabaseUnavailable as group:
                log.warning("database not ready (%s); retrying", innermost(group))
                await trio.sleep(1.0)
    async with open_database(dsn) as db:
        yield db


async def serve(
    settings: Settings,
    *,
    faults: FaultPoints | None = None,
    task_status: trio.TaskStatus[Tree] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run tickguard until SIGINT/SIGTERM; returns the process exit code.

    0 after a clean shutdown; 1 when a drain overran its grace period (those closes are redone
    on the next start) or when a child crashed past its restart intensity.
    """
    log.info("database: %s", settings.describe_database())
    log.info("feed: %s products %s", settings.coinbase_ws_url, ",".join(settings.coinbase_products))
    async with open_storage(settings) as db:
        tree = build_tree(settings, db, faults=faults)
        outcome: dict[str, tuple[str, ...]] = {}

        async def run_tree(*, task_status: trio.TaskStatus[None]) -> None:
            outcome["overran"] = await run_until_signalled(tree.supervisor, task_status=task_status)

        gave_up: list[BaseException] = []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_tree)
                task_status.started(tree)
        except* SupervisorGaveUp as group:
            gave_up += group.exceptions
    if gave_up:
        log.error("shutting down: %s", innermost(gave_up[0]))
        return 1
    overran = outcome.get("overran", ())
    if overran:
        log.error("shutdown overran its grace period in: %s", ", ".join(overran))
        return 1
    log.info("stopped")
    return 0
