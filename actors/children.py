"""The child specs that more than one tree is built from: the one-process tree
(``supervisor.build_tree``), a split process (``supervisor.build_split_tree``) and an engine
role's term (``actors.engine_role``) run the same persistence, feed, recovery and product
actors, configured from ``Settings`` the same way.
"""

from __future__ import annotations

import functools
from datetime import timedelta

import attrs

from tickguard.actors import engine, feed, persistence, products, recovery
from tickguard.actors.faults import FaultPoints
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import FanoutMessage, FeedCommand, PersistenceRequest, RecoverGap
from tickguard.actors.supervision import ChildSpec
from tickguard.actors.window import WindowSlots
from tickguard.config import Settings
from tickguard.storage import Database, watermarks
from tickguard.storage.writes import Fence


def engine_config(settings: Settings, *, catch_up_windows: int = 0) -> engine.EngineConfig:
    return engine.EngineConfig(
        gap_fill="trade" if settings.gap_fill == "trade" else "level",
        catch_up_windows=catch_up_windows,
    )


def retention(settings: Settings) -> timedelta | None:
    """EVENT_RETENTION_DAYS as the writer's retention (None: keep every event)."""
    days = settings.event_retention_days
    return timedelta(days=days) if days > 0 else None


def persistence_spec(
    settings: Settings,
    db: Database,
    inbox: Mailbox[PersistenceRequest],
    fanout: Mailbox[FanoutMessage],
    engines: persistence.EngineInboxes,
    *,
    stats: persistence.PersistenceStats,
    faults: FaultPoints | None,
    fence: Fence | None = None,
    prune: bool = True,
) -> ChildSpec:
    """The writer; ``fence`` for an engine role's closes, ``prune`` where it keeps the event
    log bounded."""
    return ChildSpec(
        "persistence",
        functools.partial(
            persistence.run,
            inbox,
            db,
            fanout,
            engines,
            config=persistence.PersistenceConfig(
                max_open_per_user=settings.max_open_positions_per_user,
                event_retention=retention(settings) if prune else None,
                fence=fence,
            ),
            stats=stats,
            faults=faults,
        ),
        mailboxes=(inbox,),
        graceful=True,
        grace_s=settings.shutdown_grace_ms / 1000,
    )


def feed_spec(
    settings: Settings,
    slots: WindowSlots,
    inbox: Mailbox[FeedCommand],
    status: FeedStatus,
    recoveries: Mailbox[RecoverGap],
    *,
    faults: FaultPoints | None,
    always: tuple[str, ...] | None = None,
) -> ChildSpec:
    """The feed; ``always`` replaces ``COINBASE_PRODUCTS`` as the always-subscribed products
    (a sharded engine pins its owned partitions' products instead, issue 18)."""
    config = feed.config_from(settings)
    if always is not None:
        config = attrs.evolve(config, products=always)
    return ChildSpec(
        "feed",
        functools.partial(
            feed.run,
            config,
            slots,
            inbox,
            status,
            faults=faults,
            recoveries=recoveries,
        ),
        mailboxes=(inbox,),
    )


def recovery_spec(
    settings: Settings,
    db: Database,
    inbox: Mailbox[RecoverGap],
    slots: WindowSlots,
    *,
    stats: recovery.RecoveryStats,
    config: recovery.RecoveryConfig | None,
) -> ChildSpec:
    """Gap recovery; ``config`` is for tests (small REST pages), the URL and gap bound come
    from ``settings``."""
    return ChildSpec(
        "recovery",
        functools.partial(
            recovery.run,
            attrs.evolve(
                config or recovery.RecoveryConfig(),
                rest_url=settings.coinbase_rest_url,
                max_gap_s=float(settings.recovery_max_gap_s),
            ),
            inbox,
            slots,
            functools.partial(watermarks.read, db),
            stats=stats,
        ),
        mailboxes=(inbox,),
    )


def products_spec(settings: Settings, catalog: products.ProductCatalog) -> ChildSpec:
    return ChildSpec(
        "products",
        functools.partial(
            products.run,
            products.CatalogConfig(settings.coinbase_rest_url, settings.products_refresh_s),
            catalog,
        ),
    )
