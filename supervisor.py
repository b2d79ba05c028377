"""The supervision tree of one tickguard process, and how it starts and stops.

Reading this file should explain the program. Inside one ``trio.run``:

    HOST:PORT checked free (before anything starts)
    Supervisor "database" (only without DATABASE_URL)
      postgres      the embedded PostgreSQL, watched; restarted (crash recovery) when it dies
    storage runtime (trio-asyncio loop + asyncpg pool), after waiting for the database
      migrate
      Supervisor (one_for_one, restart intensity per child)
        persistence   the only writer; commits, then publishes to fanout, then Track/Untrack
        fanout        WebSocket sessions and their bounded queues
        feed          one Coinbase connection; merges tickers into each symbol's WindowSlot
        recovery      fetches the trades a gap hid (REST) into the slot, before later windows
        products      Coinbase's product list (REST), re-read hourly; web checks symbols on it
        engines       a nested supervisor (actors/engines.py): one engine per symbol, on demand
        web           hypercorn serving the quart-trio app (REST + /ws)

Start order is the list above; on SIGINT/SIGTERM the stop order is web (stop accepting),
feed, recovery (releasing any hold), engines (hand over what they triggered), persistence
(drain, bounded by SHUTDOWN_GRACE_MS), fanout (close sessions with 1001), products, then the
pool, then PostgreSQL. A signal during start-up (e.g. while waiting for the database) stops it
at once, exit 0. The supervisor owns every mailbox and window slot, so a restarted actor finds
the same inbox and nobody else learns of the restart.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio

from tickguard.actors import children as children_specs
from tickguard.actors import fanout, persistence, products, recovery
from tickguard.actors.engines import EngineDirectory
from tickguard.actors.faults import FaultPoints
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import (
    Event,
    FanoutMessage,
    FeedCommand,
    PersistenceRequest,
    RecoverGap,
)
from tickguard.actors.supervision import (
    ChildSpec,
    RestartPolicy,
    Supervisor,
    SupervisorGaveUp,
)
from tickguard.actors.window import WindowSlots
from tickguard.config import Settings
from tickguard.storage import Database, runtime
from tickguard.storage.embedded import EmbeddedPostgres, watch_server
from tickguard.storage.outage import quiet_outages
from tickguard.storage.tail import LogTail

log = logging.getLogger("tickguard")

E = TypeVar("E", bound=BaseException)


@attrs.frozen
class Tree:
    """Everything the running tree is made of, for tests and benchmarks to reach."""

    settings: Settings
    db: Database
    supervisor: Supervisor
    slots: WindowSlots
    persistence_box: Mailbox[PersistenceRequest]
    fanout_box: Mailbox[FanoutMessage]
    feed_box: Mailbox[FeedCommand]
    feed_status: FeedStatus
    engines: EngineDirectory
    app: Any
    urls: list[str]  # where web listens, once it started (port 0 picks a free port)
    catalog: products.ProductCatalog = attrs.field(factory=products.ProductCatalog)
    recovery_stats: recovery.RecoveryStats = attrs.field(factory=recovery.RecoveryStats)
    # Split roles (issue 17): the engine role's lease and terms (None without the role).
    engine_role: Any = None


def build_tree(
    settings: Settings,
    db: Database,
    *,
    faults: FaultPoints | None = None,
    policy: RestartPolicy = RestartPolicy(),
    fanout_config: fanout.FanoutConfig | None = None,
    recovery_config: recovery.RecoveryConfig | None = None,
) -> Tree:
    """The actors, their mailboxes and the order they start and stop in (not yet running).

    ``faults``, ``fanout_config`` and ``recovery_config`` are for tests (fault points; a small
    session queue; small REST pages); the recovery's URL and gap bound come from ``settings``.
    """
    from tickguard.web.app import AppServices, create_app, serve
    from tickguard.web.metrics import MetricsSources

    slots = WindowSlots()
    persistence_box: Mailbox[PersistenceRequest] = Mailbox("persistence")
    fanout_box: Mailbox[FanoutMessage] = Mailbox("fanout")
    feed_box: Mailbox[FeedCommand] = Mailbox("feed")
    feed_status = FeedStatus()
    catalog = products.ProductCatalog()
    # The actors write these counters and /metrics reads them; they outlive actor restarts.
    persistence_stats = persistence.PersistenceStats()
    fanout_config = fanout_config or fanout.FanoutConfig()
    recovery_box: Mailbox[RecoverGap] = Mailbox("recovery")
    recovery_stats = recovery.RecoveryStats()
    engines = EngineDirectory(
        db,
        slots,
        persistence_box,
        feed_box,
        engine_config=children_specs.engine_config(settings),
        faults=faults,
    )
    app = create_app(
        AppServices(
            settings=settings,
            db=db.read_only(),
            persistence=persistence_box,
            fanout=fanout_box,
            feed=feed_box,
            feed_status=feed_status,
            catalog=catalog,
            slots=slots,
            metrics=MetricsSources(
                engines.stats, persistence_stats, fanout_config.stats, recovery_stats
            ),
        )
    )
    grace_s = settings.shutdown_grace_ms / 1000
    urls: list[str] = []
    children = [
        children_specs.persistence_spec(
            settings,
            db,
            persistence_box,
            fanout_box,
            engines,
            stats=persistence_stats,
            faults=faults,
        ),
        ChildSpec(
            "fanout",
            functools.partial(fanout.run, fanout_box, config=fanout_config, faults=faults),
            mailboxes=(fanout_box,),
        ),
        children_specs.feed_spec(
            settings, slots, feed_box, feed_status, recovery_box, faults=faults
        ),
        children_specs.recovery_spec(
            settings, db, recovery_box, slots, stats=recovery_stats, config=recovery_config
        ),
        children_specs.products_spec(settings, catalog),
        ChildSpec("engines", engines.supervisor.run, graceful=True, grace_s=grace_s),
        ChildSpec(
            "web",
            functools.partial(_web, serve, app, settings, urls),
            graceful=True,
            grace_s=grace_s,
        ),
    ]
    supervisor = Supervisor(
        children,
        policy,
        stop_order=[
            "web",
            "feed",
            "recovery",
            "engines",
            "persistence",
            "fanout",
            "products",
        ],
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
        catalog,
        recovery_stats,
    )


class _EnginesElsewhere:
    """Persistence's engine registry in a split api process: the engines run in another process
    and learn of creates and closes from the event log, so Track/Untrack go nowhere."""

    def send(self, symbol: str, message: Any) -> None:
        pass


def _split_children(
    settings: Settings,
    db: Database,
    bus: Any,
    *,
    faults: FaultPoints | None,
    policy: RestartPolicy,
    fanout_config: fanout.FanoutConfig,
    recovery_config: recovery.RecoveryConfig | None,
) -> tuple[list[ChildSpec], dict[str, Any]]:
    """The children of a process playing some of the roles (issue 17), and what the web app
    is given of them. Each role talks to the others only through PostgreSQL (the event log)
    and Redis (wake-ups, last prices)."""
    from tickguard.actors import balance, engine_role, follower, lease, notifier

    grace_s = settings.shutdown_grace_ms / 1000
    children: list[ChildSpec] = []
    parts: dict[str, Any] = {"roles_report": None}
    reports: list[Any] = []
    if settings.plays("api"):
        persistence_box: Mailbox[PersistenceRequest] = Mailbox("persistence")
        notify_box: Mailbox[FanoutMessage] = Mailbox("notifier")
        persistence_stats = persistence.PersistenceStats()
        catalog = products.ProductCatalog()
        children += [
            children_specs.persistence_spec(
                settings,
                db,
                persistence_box,
                notify_box,
                _EnginesElsewhere(),
                stats=persistence_stats,
                faults=faults,
            ),
            ChildSpec("notifier", functools.partial(notifier.run, notify_box, bus)),
            children_specs.products_spec(settings, catalog),
        ]
        parts.update(
            persistence=persistence_box,
            persistence_stats=persistence_stats,
            catalog=catalog,
            prices=bus.get_price,
        )
    if settings.plays("gateway"):
        fanout_box: Mailbox[FanoutMessage] = Mailbox("fanout")
        follower_stats = follower.FollowerStats()
        children += [
            ChildSpec(
                "fanout",
                functools.partial(fanout.run, fanout_box, config=fanout_config, faults=faults),
                mailboxes=(fanout_box,),
            ),
            ChildSpec(
                "gateway-follower",
                functools.partial(
                    follower.run,
                    db.read_only(),
                    functools.partial(_to_fanout, fanout_box),
                    wakeups=bus.wakeups(notifier.EVENTS_TOPIC),
                    stats=follower_stats,
                    tail=LogTail(),  # a restarted follower goes on from where it was
                ),
            ),
        ]
        parts.update(fanout=fanout_box, fanout_stats=fanout_config.stats)
        parts.setdefault("followers", {})["gateway"] = follower_stats
    if settings.plays("engine"):
        state = lease.LeaseState()
        lease_stats = lease.LeaseStats()
        owner = settings.engine_id or f"{socket.gethostname()}:{os.getpid()}"
        # Stage 3 (issue 18): the engines share ENGINE_PARTITIONS leases, each its fair share.
        balancer = balance.Balancer(
            db, owner, settings.engine_partitions, settings.engine_lease_ttl_ms
        )
        role = engine_role.EngineRole(
            state, partitions=settings.engine_partitions, balancer=balancer
        )
        children += [
            ChildSpec(
                "lease",
                functools.partial(
                    lease.run,
                    db,
                    lease.LeaseConfig(
                        owner=owner,
                        partitions=settings.engine_partitions,
                        ttl_ms=settings.engine_lease_ttl_ms,
                        balancer=balancer,
                    ),
                    state,
                    stats=lease_stats,
                ),
            ),
            ChildSpec(
                "engine-role",
                functools.partial(
                    engine_role.run,
                    settings,
                    db,
                    bus,
                    role,
                    faults=faults,
                    policy=policy,
                    recovery_config=recovery_config,
                ),
                graceful=True,
                grace_s=grace_s * 2,  # the term drains engines, then persistence
            ),
        ]
        parts.update(engine_role=role, feed_status=role.feed_status, lease_stats=lease_stats)
        parts.setdefault("followers", {})["engine"] = role.follower_stats
        reports.append(role.report)

    def roles_report() -> dict[str, Any]:
        report: dict[str, Any] = {"roles": list(settings.roles)}
        for more in reports:
            report.update(more())
        return report

    parts["roles_report"] = roles_report
    return children, parts


def _to_fanout(fanout_box: Mailbox[FanoutMessage], batch: list[Any]) -> None:
    """The gateway's share of the event log: each user's events in ``seq`` order."""
    for event in sorted(batch, key=lambda e: (e.user_id, e.seq)):
        fanout_box.send_nowait(
            Event(event.id, event.user_id, event.seq, event.type, event.message, event.position_id)
        )


# The order a split process stops in: stop accepting, hand the lease over after the engines
# drained, then the writers and the sessions.
SPLIT_STOP_ORDER = [
    "web",
    "engine-role",
    "lease",
    "gateway-follower",
    "persistence",
    "notifier",
    "fanout",
    "products",
]


def build_split_tree(
    settings: Settings,
    db: Database,
    bus: Any,
    *,
    faults: FaultPoints | None = None,
    policy: RestartPolicy = RestartPolicy(),
    fanout_config: fanout.FanoutConfig | None = None,
    recovery_config: recovery.RecoveryConfig | None = None,
) -> Tree:
    """The tree of a process playing some of the roles (``settings.roles``, issue 17)."""
    from tickguard.web.app import AppServices, create_app, serve
    from tickguard.web.metrics import MetricsSources

    fanout_config = fanout_config or fanout.FanoutConfig()
    children, parts = _split_children(
        settings,
        db,
        bus,
        faults=faults,
        policy=policy,
        fanout_config=fanout_config,
        recovery_config=recovery_config,
    )
    role = parts.get("engine_role")
    unused_persistence: Mailbox[PersistenceRequest] = Mailbox("persistence")
    unused_fanout: Mailbox[FanoutMessage] = Mailbox("fanout")
    feed_status = parts.get("feed_status") or FeedStatus()
    app = create_app(
        AppServices(
            settings=settings,
            db=db.read_only(),
            persistence=parts.get("persistence", unused_persistence),
            fanout=parts.get("fanout", unused_fanout),
            feed=None,
            feed_status=parts.get("feed_status"),
            catalog=parts.get("catalog"),
            prices=parts.get("prices"),
            roles_report=parts["roles_report"],
            metrics=MetricsSources(
                role.engine_stats if role is not None else {},
                role.persistence_stats if role is not None else parts.get("persistence_stats"),
                parts.get("fanout_stats"),
                role.recovery_stats if role is not None else None,
                lease=parts.get("lease_stats"),
                followers=parts.get("followers", {}),
            ),
        )
    )
    urls: list[str] = []
    grace_s = settings.shutdown_grace_ms / 1000
    children.append(
        ChildSpec(
            "web",
            functools.partial(_web, serve, app, settings, urls),
            graceful=True,
            grace_s=grace_s,
        )
    )
    slots = WindowSlots()
    supervisor = Supervisor(
        children,
        policy,
        stop_order=[name for name in SPLIT_STOP_ORDER if any(c.id == name for c in children)],
    )
    return Tree(
        settings,
        db,
        supervisor,
        slots,
        parts.get("persistence", unused_persistence),
        parts.get("fanout", unused_fanout),
        Mailbox("feed"),
        feed_status,
        EngineDirectory(db, slots, unused_persistence, None),
        app,
        urls,
        parts.get("catalog") or products.ProductCatalog(),
        role.recovery_stats if role is not None else recovery.RecoveryStats(),
        engine_role=role,
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


class PortInUse(Exception):
    """The address tickguard should listen on cannot be bound; the message names it and the
    variables that set it."""


def check_port(settings: Settings, *, shared: bool | None = None) -> None:
    """Bind HOST:PORT once and let it go again, before anything is started or migrated, so
    that a second ``serve`` on a busy port fails at once, naming the address (port 0, "any
    free port", needs no check). Raises ``PortInUse``. hypercorn binds the same way
    (SO_REUSEADDR, IPv6 when the host has a colon) moments later.

    ``shared`` probes with SO_REUSEPORT too, as a worker of ``serve --workers N`` binds
    (``tickguard.workers``): a worker (re)starting beside its listening siblings passes,
    anything else holding the port still fails it. By default a process with
    ``API_WORKERS`` above 1 is such a worker; their parent checks with ``shared=False``."""
    if settings.port == 0:
        return
    if shared is None:
        shared = settings.api_workers > 1
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            address = (
                f"[{settings.host}]:{settings.port}"
                if family == socket.AF_INET6
                else f"{settings.host}:{settings.port}"
            )
            raise PortInUse(
                f"cannot listen on {address} (HOST={settings.host} PORT={settings.port}): "
                f"{exc.strerror or exc}; stop what uses it or choose another PORT"
            ) from exc


# The loggers that report each request or batch that failed because the database was away.
OUTAGE_LOGGERS = ("tickguard.actors.persistence", "tickguard.web", "tickguard.web.ws")


# The embedded server's restart intensity: a database that dies six times in a minute will
# not be fixed by a seventh start; exiting lets a process manager (and a human) look at it.
POSTGRES_POLICY = RestartPolicy(max_restarts=5, window_s=60.0)


@asynccontextmanager
async def open_storage(
    settings: Settings,
    *,
    postgres_policy: RestartPolicy = POSTGRES_POLICY,
    patience_s: float = runtime.PATIENCE_S,
) -> AsyncIterator[Database]:
    """The storage the tree runs on: the database waited for (up to ``patience_s``) and
    migrated, the loop and the pool.

    Without DATABASE_URL the embedded PostgreSQL comes first, under its own small supervisor
    around the tree: one child, ``postgres``, which watches the server and restarts it when
    it dies (crash recovery on the same directory; the pool reconnects by itself). Past
    ``postgres_policy``'s intensity that supervisor raises ``SupervisorGaveUp``, which cancels
    the tree. The server stops after everything else.
    """
    if settings.database_url is not None:
        where = f"DATABASE_URL={settings.describe_database()}"
        async with runtime.open_storage(
            settings.database_url, where=where, patience_s=patience_s
        ) as db:
            yield db
        return
    server = EmbeddedPostgres(settings.data_dir)
    dsn = await trio.to_thread.run_sync(server.start)
    try:
        database = Supervisor(
            [ChildSpec("postgres", functools.partial(watch_server, server))], postgres_policy
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(database.run)
            try:
                async with runtime.open_storage(
                    dsn, where=settings.describe_database(), patience_s=patience_s
                ) as db:
                    yield db
            finally:
                with trio.CancelScope(shield=True):
                    await database.shutdown()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.stop)


@asynccontextmanager
async def _open_bus(settings: Settings) -> AsyncIterator[Any]:
    """Redis (wake-ups, last prices) for a split process; nothing for ``--role all``."""
    if not settings.split or settings.redis_url is None:
        yield None
        return
    from tickguard.storage.bus import open_bus

    async with open_bus(settings.redis_url) as bus:
        yield bus


# The cyclic collector's first threshold while serving (CPython's default is 700). A
# generation-0 collection runs when tracked allocations exceed deallocations by this much; at
# 700 it runs several hundred times a second under load, each time promoting whatever the
# requests in flight hold at that instant, so the old generations fill with objects that die a
# millisecond later, and full collections (which walk every live object: ~60 ms with 50,000
# positions created) come about twice a second. At 10,000 a request's garbage is freed by
# reference counting before it counts, only what lives on is promoted, and a full REST bench
# run has one or two full collections instead of ~76 (issue 16, session 5: collector time
# 4.7 s -> 0.5 s per run, POST p99/p50 3.4 -> 1.2). A generation-0 collection then walks up to
# 10,000 young objects: ~1-6 ms.
GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Freeze what start-up built (``gc.freeze``): the positions the engines loaded, the
    modules, the app. The cyclic collector then no longer walks them in its full collections
    (issue 16: with 20,000 positions loaded it took 11% of the server's CPU under REST load,
    ~150 ms per full collection, a stall of every request in flight). No collection first: it
    would stall the loop for as long, and what garbage start-up left is frozen once, bounded.
    Then the young generation is widened (``GC_YOUNG_THRESHOLD``); the older generations'
    ratios stay CPython's.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    log.info(
        "heap settled: %d objects frozen, collector thresholds %s",
        gc.get_freeze_count(),
        gc.get_threshold(),
    )


def _leaves(group: BaseExceptionGroup[Any], kind: type[E]) -> list[E]:
    """The exceptions of type ``kind`` in ``group``, however deeply nurseries nested it."""
    found: list[E] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found += _leaves(error, kind)
        elif isinstance(error, kind):
            found.append(error)
    return found


async def serve(
    settings: Settings,
    *,
    faults: FaultPoints | None = None,
    postgres_policy: RestartPolicy = POSTGRES_POLICY,
    task_status: trio.TaskStatus[Tree] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run tickguard until SIGINT/SIGTERM; returns the process exit code.

    0 after a clean shutdown, also when a signal arrives during start-up (e.g. while waiting
    for the database: nothing started needs draining); 1 when a drain overran its grace
    period (those closes are redone on the next start) or when a child (the embedded
    PostgreSQL included) crashed past its restart intensity. Raises ``PortInUse`` before
    starting anything when HOST:PORT is taken, ``DatabaseUnavailable`` when the database
    did not answer in time.
    """
    log.info("database: %s", settings.describe_database())
    log.info("feed: %s products %s", settings.coinbase_ws_url, ",".join(settings.coinbase_products))
    check_port(settings)
    with quiet_outages(*OUTAGE_LOGGERS):
        return await _serve(settings, faults, postgres_policy, task_status)


async def _serve(
    settings: Settings,
    faults: FaultPoints | None,
    postgres_policy: RestartPolicy,
    task_status: trio.TaskStatus[Tree],
) -> int:
    outcome: dict[str, tuple[str, ...]] = {}
    gave_up: list[SupervisorGaveUp] = []
    interrupted: list[str] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        with trio.CancelScope() as everything:
            requested = trio.Event()
            tree_ready = trio.Event()

            async def on_signal() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if tree_ready.is_set():
                        log.info("received %s; shutting down", name)
                        requested.set()
                    else:
                        # Nothing is serving yet: stop starting (the database wait included).
                        interrupted.append(name)
                        everything.cancel()
                    return

            try:
                async with trio.open_nursery() as guard:
                    guard.start_soon(on_signal)
                    async with (
                        open_storage(settings, postgres_policy=postgres_policy) as db,
                        _open_bus(settings) as bus,
                    ):
                        if settings.split:
                            tree = build_split_tree(settings, db, bus, faults=faults)
                        else:
                            tree = build_tree(settings, db, faults=faults)
                        async with trio.open_nursery() as nursery:
                            await nursery.start(tree.supervisor.run)
                            settle_heap()
                            tree_ready.set()
                            task_status.started(tree)
                            await requested.wait()
                            outcome["overran"] = await tree.supervisor.shutdown()
                    guard.cancel_scope.cancel()
            except* SupervisorGaveUp as group:
                gave_up += _leaves(group, SupervisorGaveUp)
    if interrupted:
        log.info("received %s while starting; stopped", interrupted[0])
        return 0
    if gave_up:
        log.error(
            "shutting down: gave up restarting %s: %s", gave_up[0].child_id, gave_up[0].last_error
        )
        return 1
    overran = outcome.get("overran", ())
    if overran:
        log.error("shutdown overran its grace period in: %s", ", ".join(overran))
        return 1
    log.info("stopped")
    return 0
