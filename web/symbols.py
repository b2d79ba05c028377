"""Subscribe-on-create: the feed must know a symbol before a position on it is stored.

``ensure_symbol`` is the single place where the create handler asks the feed about a symbol
(API.md "Beyond": wait at most 3 s for Coinbase's answer). It is wired by the lead together
with the feed actor; until then it accepts every well-formed symbol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tickguard.web.app import AppServices


class SymbolRejected(Exception):
    """Coinbase rejected the product id; the create answers 400 and stores nothing."""

    def __init__(self, symbol: str, reason: str = "") -> None:
        super().__init__(symbol, reason)
        self.symbol = symbol
        self.reason = reason


async def ensure_symbol(services: AppServices, symbol: str) -> None:
    """Make sure the feed watches ``symbol`` before a position on it is created.

    Raises ``SymbolRejected`` when Coinbase says the product does not exist. Returns normally
    when the feed accepted it, or is unreachable or slow (the position is then created and the
    symbol watched once the feed answers). Never raises for a feed outage.

    TODO(lead): ask ``services.feed`` (at most 3 s) once the feed actor exists. For now it does
    nothing.
    """
    return None
