"""What the feed reports about its connection and each product: the feed writes it, /ready
and /metrics read it (plain counters, no locking: one Trio thread). Times are Trio clock."""

from __future__ import annotations

import collections
from typing import Any, Literal

import attrs
import trio

ProductState = Literal["connecting", "live", "stale", "rejected"]


@attrs.define
class ProductStatus:
    """One product's feed state; ``reason`` is Coinbase's when it rejected the product."""

    state: ProductState = "connecting"
    last_message_at: float | None = None
    ticks: int = 0
    missed_trades: int = 0
    reason: str | None = None


class FeedStatus:
    """The feed's connection and per-product state.

    ``last_error`` is why the last connection attempt failed or the last connection ended
    (DNS failure, connection refused, TLS failure, a protocol violation by the server...);
    cleared once a connection is subscribed again. ``protocol_errors`` counts connections
    ended because the server broke the WebSocket protocol (bad frames, oversized message).
    """

    def __init__(self) -> None:
        self.products: dict[str, ProductStatus] = {}
        self.connected = False
        self.reconnects = 0
        self.malformed = 0
        self.unknown = 0
        self.errors = 0
        self.protocol_errors = 0
        self.missed_trades = 0
        self.missed_gaps = 0
        self.duplicates = 0
        self.last_error: str | None = None
        # (attempt, delay) of recent backoffs, newest last.
        self.backoffs: collections.deque[tuple[int, float]] = collections.deque(maxlen=32)

    def product(self, symbol: str) -> ProductStatus:
        """The status of ``symbol``, created (``connecting``) on first use."""
        status = self.products.get(symbol)
        if status is None:
            status = self.products[symbol] = ProductStatus()
        return status

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: per product state, age of last message (s), ticks, missed, and
        ``lastError`` (the connection's) for a product that is not live."""
        now = trio.current_time()
        error = self.last_error
        return {
            "connected": self.connected,
            "reconnects": self.reconnects,
            "malformed": self.malformed,
            "unknown": self.unknown,
            "errors": self.errors,
            "protocol_errors": self.protocol_errors,
            "missed_trades": self.missed_trades,
            "missed_gaps": self.missed_gaps,
            **({"lastError": error} if error else {}),
            "products": {
                symbol: {
                    "state": p.state,
                    "age_s": None
                    if p.last_message_at is None
                    else round(now - p.last_message_at, 3),
                    "ticks": p.ticks,
                    "missed_trades": p.missed_trades,
                    **({"reason": p.reason} if p.reason else {}),
                    **({"lastError": error} if error and p.state in _WAITING else {}),
                }
                for symbol, p in self.products.items()
            },
        }


# States in which the connection's last error is the likely cause.
_WAITING = frozenset({"connecting", "stale"})
