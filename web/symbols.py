"""Subscribe-on-create: the feed must know a symbol before a position on it is stored.

``ensure_symbol`` is the single place where the create handler checks a symbol: first against
Coinbase's product list (the catalog, ``actors/products.py``), so that a made-up symbol never
reaches the feed (no subscribe, no per-product state, no log line); then it asks the feed
(API.md "Beyond": wait at most 3 s for Coinbase's answer), unless the feed's status says it
watches the symbol already and a ``Watch`` would change nothing (``FeedStatus.watching``).
While the list has never been read, the feed's answer alone decides, as before the catalog
existed. An api process of a split deployment has no feed: until its list has been read, a
create answers 503.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from tickguard.actors.mailbox import ActorUnavailable, ask
from tickguard.actors.messages import SubscribeOutcome, Watch

if TYPE_CHECKING:
    from tickguard.web.app import AppServices


class SymbolRejected(Exception):
    """Coinbase rejected the product id; the create answers 400 and stores nothing."""

    def __init__(self, symbol: str, reason: str = "") -> None:
        super().__init__(symbol, reason)
        self.symbol = symbol
        self.reason = reason


class SymbolUnchecked(Exception):
    """An api process (issue 17) has no feed to ask, and Coinbase's product list has not been
    read yet: the symbol cannot be checked now, so nothing is stored (503, try again)."""


SUBSCRIBE_WAIT_S = 3.0  # API.md: the first position on a new symbol waits at most this long

log = logging.getLogger("tickguard.web")


async def ensure_symbol(services: AppServices, symbol: str) -> None:
    """Make sure the feed watches ``symbol`` before a position on it is created.

    Raises ``SymbolRejected`` when Coinbase's product list does not name it (without asking
    the feed) or when the feed's subscription is refused. Returns normally when the feed
    accepted it, or is unreachable or slow (the position is then created and the symbol
    watched once the feed answers). Never raises for a feed or REST outage.
    """
    catalog = services.catalog
    if catalog is not None and catalog.known(symbol) is False:
        raise SymbolRejected(symbol, f"{symbol} is not in Coinbase's product list")
    if services.feed is None:
        if catalog is not None and catalog.known(symbol) is None and services.settings.split:
            raise SymbolUnchecked(symbol)
        return
    if services.feed_status is not None and services.feed_status.watching(symbol):
        return  # subscribed and kept so: asking would change nothing (actors/feed.py)
    try:
        outcome: SubscribeOutcome = await ask(
            services.feed, lambda reply: Watch(symbol, reply), timeout=SUBSCRIBE_WAIT_S
        )
    except (trio.TooSlowError, ActorUnavailable) as exc:
        log.warning("feed did not confirm %s in time (%s); creating anyway", symbol, exc)
        return
    if outcome.status == "rejected":
        raise SymbolRejected(symbol, outcome.reason or "")
