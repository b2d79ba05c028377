"""One simulated product: its price path, its last trade, the history of the trades it
published (for the REST endpoints) and its trading status (for the ``status`` channel)."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import attrs

from tickguard.sim.paths import PricePath
from tickguard.sim.wire import format_time

# Trades kept per product for GET /products/{id}/trades and /candles; older ones are forgotten
# (Coinbase keeps everything; a simulator run needs the recent past only).
HISTORY_TRADES = 100_000
DEFAULT_SIZE = Decimal("0.01000000")


@attrs.frozen(slots=True)
class Trade:
    """One published (or hidden) trade, as GET /products/{id}/trades lists it."""

    trade_id: int
    time: datetime
    price: Decimal
    size: Decimal
    side: str

    def to_json(self) -> dict[str, object]:
        return {
            "time": format_time(self.time),
            "trade_id": self.trade_id,
            "price": str(self.price),
            "size": str(self.size),
            "side": self.side,
        }


class Product:
    """One product's market: its price path, its last trade and the trades before it."""

    def __init__(
        self,
        product_id: str,
        price: Decimal,
        path: PricePath,
        trade_id: int,
        *,
        history: int = HISTORY_TRADES,
    ) -> None:
        self.id = product_id
        self.path = path
        self.price = price
        self.trade_id = trade_id
        self.sequence = trade_id * 3
        self.last_time = datetime.now(UTC)
        self.last_size = DEFAULT_SIZE
        self.side = "buy"
        self.open_24h = price
        self.low_24h = price
        self.high_24h = price
        self.volume_24h = Decimal("1000.00000000")
        self.history: deque[Trade] = deque(maxlen=history)
        self.status = "online"
        self.trading_disabled = False

    def trade(
        self, price: Decimal, *, time: datetime | None = None, size: Decimal | None = None
    ) -> None:
        """Record one trade (the next trade id) as the product's last."""
        self.side = "buy" if price >= self.price else "sell"
        self.price = price
        self.trade_id += 1
        self.last_time = time or datetime.now(UTC)
        self.last_size = size if size is not None else DEFAULT_SIZE
        self.low_24h = min(self.low_24h, price)
        self.high_24h = max(self.high_24h, price)
        self.volume_24h += self.last_size
        self.history.append(Trade(self.trade_id, self.last_time, price, self.last_size, self.side))

    def trades_between(self, newer_than: int, older_than: int) -> Iterator[Trade]:
        """The remembered trades with ``newer_than < trade_id < older_than``, newest first."""
        for trade in reversed(self.history):
            if trade.trade_id >= older_than:
                continue
            if trade.trade_id <= newer_than:
                break
            yield trade

    def ticker(self) -> str:
        """The ticker message of the last trade, every field as Coinbase sends it."""
        self.sequence += 1
        # A plausible book around the trade: one increment either side.
        spread = Decimal("0.01")
        return (
            f'{{"type":"ticker","sequence":{self.sequence},"product_id":"{self.id}",'
            f'"price":"{self.price}","open_24h":"{self.open_24h}",'
            f'"volume_24h":"{self.volume_24h}","low_24h":"{self.low_24h}",'
            f'"high_24h":"{self.high_24h}","volume_30d":"{self.volume_24h * 30}",'
            f'"best_bid":"{self.price - spread}","best_bid_size":"0.50000000",'
            f'"best_ask":"{self.price + spread}","best_ask_size":"0.50000000",'
            f'"side":"{self.side}","time":"{format_time(self.last_time)}",'
            f'"trade_id":{self.trade_id},"last_size":"{self.last_size}"}}'
        )

    def heartbeat(self) -> str:
        """The heartbeat message: the last trade id, now."""
        self.sequence += 1
        return json.dumps(
            {
                "type": "heartbeat",
                "last_trade_id": self.trade_id,
                "product_id": self.id,
                "sequence": self.sequence,
                "time": format_time(datetime.now(UTC)),
            }
        )

    def to_json(self) -> dict[str, object]:
        """The product as Coinbase's GET /products lists it."""
        base, _, quote = self.id.partition("-")
        return {
            "id": self.id,
            "base_currency": base,
            "quote_currency": quote,
            "quote_increment": "0.01000000",
            "base_increment": "0.00000001",
            "display_name": f"{base}/{quote}",
            "min_market_funds": "1",
            "margin_enabled": False,
            "post_only": False,
            "limit_only": False,
            "cancel_only": False,
            "status": self.status,
            "status_message": "",
            "trading_disabled": self.trading_disabled,
            "fx_stablecoin": False,
            "max_slippage_percentage": "0.03000000",
            "auction_mode": False,
            "high_bid_limit_percentage": "",
        }
