"""What the feed reports about its connection and each product: the feed writes it, /ready
and /metrics read it (plain counters, no locking: one Trio thread). Times are Trio clock."""

from __future__ import annotations

import collections
from collections.abc import Callable
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
    # Tickers that arrived while Coinbase's status said the product was not trading: not put
    # into its window (recovered over REST once it trades again, issue 14).
    halted_ticks: int = 0


def _no_feed(symbol: str) -> bool:
    return False


class FeedStatus:
    """The feed's connection and per-product state.

    ``last_error`` is why the last connection attempt failed or the last connection ended
    (DNS failure, connection refused, TLS failure, a protocol violation by the server...);
    cleared once a connection is subscribed again. ``protocol_errors`` counts connections
    ended because the server broke the WebSocket protocol (bad frames, oversized message).

    ``halted`` maps each product Coinbase's ``status`` channel last said is not trading to why
    (e.g. ``status offline, trading disabled``); a product absent from it trades.
    ``status_channel`` is that channel's state on the current connection: ``off`` (not asked
    for), ``connecting``, ``subscribed``, or ``refused: <Coinbase's reason>``.
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
        self.halted: dict[str, str] = {}
        self.status_channel = "off"
        # The running feed's ``_Feed.watching``: whether a Watch would be a question only
        # (False while no feed has started).
        self.watching: Callable[[str], bool] = _no_feed
        # (attempt, delay) of recent backoffs, newest last.
        self.backoffs: collections.deque[tuple[int, float]] = collections.deque(maxlen=32)

    def product(self, symbol: str) -> ProductStatus:
        """The status of ``symbol``, created (``connecting``) on first use."""
        status = self.products.get(symbol)
        if status is None:
            status = self.products[symbol] = ProductStatus()
        return status

    def product_state(self, symbol: str) -> str | None:
        """``symbol``'s state (``connecting``, ``live``…; None: not known), as ``snapshot``
        shows it, without copying every product (asked on every create)."""
        status = self.products.get(symbol)
        return None if status is None else status.state

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: per product state, age of last message (s), ticks, missed,
        ``trading`` (``trading`` or ``halted``, with ``halt_reason`` and ``halted_ticks``) and
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
            "status_channel": self.status_channel,
            **({"lastError": error} if error else {}),
            "products": {
                symbol: {
                    "state": p.state,
                    "age_s": None
                    if p.last_message_at is None
                    else round(now - p.last_message_at, 3),
                    "ticks": p.ticks,
                    "missed_trades": p.missed_trades,
                    **_trading(self.halted.get(symbol), p.halted_ticks),
                    **({"reason": p.reason} if p.reason else {}),
                    **({"lastError": error} if error and p.state in _WAITING else {}),
                }
                for symbol, p in self.products.items()
            },
        }


def _trading(halt_reason: str | None, halted_ticks: int) -> dict[str, Any]:
    if halt_reason is None:
        return {"trading": "trading", "halted_ticks": halted_ticks}
    return {"trading": "halted", "halt_reason": halt_reason, "halted_ticks": halted_ticks}


# States in which the connection's last error is the likely cause.
_WAITING = frozenset({"connecting", "stale"})
