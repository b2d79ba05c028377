"""What the web layer is given: the database, the actors' mailboxes, the feed's state.

The supervisor builds one ``AppServices`` and passes it to ``create_app``; handlers find it in
``app.extensions`` (never in a global).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, Protocol

import attrs
from flask.sansio.app import App

from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import FanoutMessage, FeedCommand, PersistenceRequest
from tickguard.actors.products import ProductCatalog
from tickguard.actors.window import WindowSlots
from tickguard.config import Settings
from tickguard.storage import ReadOnlyDatabase

EXTENSION = "tickguard"


class FeedReport(Protocol):
    """What /ready shows of the feed (``actors.feed_status.FeedStatus`` is the one the
    supervisor passes)."""

    def snapshot(self) -> dict[str, Any]: ...

    def product_state(self, symbol: str) -> str | None:
        """The product's state as ``snapshot`` shows it (None: not known to the feed)."""
        ...

    def watching(self, symbol: str) -> bool:
        """Whether the feed watches ``symbol`` so that a ``Watch`` would change nothing."""
        ...


@attrs.define
class WsStats:
    """Counters of the /ws endpoint; only the endpoint writes them."""

    opened: int = 0
    rejected: int = 0
    ignored_frames: int = 0
    too_big: int = 0


@attrs.frozen
class AppServices:
    """Everything the handlers use.

    ``persistence`` takes ``CreateRequest``/``CloseRequest``; ``fanout`` takes the
    ``Join``/``Leave`` of WebSocket sessions; ``feed`` (None until the feed actor is wired)
    takes subscribe requests; ``catalog`` (None: not wired) is Coinbase's product list, checked
    before the feed; ``slots`` hold each symbol's last price. ``request_timeout``
    bounds each wait for an actor's answer (then 503).
    """

    settings: Settings
    db: ReadOnlyDatabase  # reads only: every write goes through persistence
    persistence: Mailbox[PersistenceRequest]
    fanout: Mailbox[FanoutMessage]
    feed: Mailbox[FeedCommand] | None = None
    feed_status: FeedReport | None = None
    catalog: ProductCatalog | None = None
    slots: WindowSlots = attrs.field(factory=WindowSlots)
    metrics: Any = None
    ws_stats: WsStats = attrs.field(factory=WsStats)
    request_timeout: float = 10.0
    # Split roles (issue 17): the last price of a symbol from Redis instead of ``slots``
    # (raises when Redis cannot be read), and what /ready adds about roles and ownership.
    prices: Callable[[str], Awaitable[Decimal | None]] | None = None
    roles_report: Callable[[], dict[str, Any]] | None = None


def services_of(app: App) -> AppServices:
    """The ``AppServices`` that ``create_app`` stored in ``app``."""
    services: AppServices = app.extensions[EXTENSION]
    return services
