"""The Coinbase Exchange market-data message format (COINBASE.md): parsing what the feed reads,
building what it sends. Pure: no I/O, no clock, no state.

Only the fields tickguard uses are decoded (msgspec skips the rest unparsed). ``parse`` checks
what the feed relies on, so a value it returns is safe to act on: a ticker has a product, a
finite positive price, a trade id and a time with a zone; a heartbeat has a product and a last
trade id; a ``status`` message lists products, each with an id and a ``status`` (issue 14:
``halt_reason`` says whether one is trading). Anything else that is not valid JSON of the
right shape raises ``MalformedMessage``.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Literal

import msgspec

# Message types a ticker client receives and has no use for (not counted as unknown).
IGNORED_TYPES = frozenset({"l2update", "snapshot", "match", "last_match", "received"})
# The error Coinbase answers a (un)subscribe it refuses with; its ``reason`` says why.
SUBSCRIBE_FAILED = "Failed to subscribe"

# The channel that tells every product's trading status; it covers all products (none named).
STATUS_CHANNEL = "status"
# A product id longer than this is not one (Coinbase's are like "BTC-USD").
MAX_PRODUCT_ID = 64

SubscriptionOp = Literal["subscribe", "unsubscribe"]


class MalformedMessage(ValueError):
    """Not valid JSON, not an object with a string ``type``, or a ticker/heartbeat missing a
    field the feed needs (or with an unusable value: NaN, zero or negative price, no zone)."""


class Channel(msgspec.Struct, frozen=True, gc=False):
    """One channel of a ``subscriptions`` ack: its name and the products now subscribed."""

    name: str
    product_ids: list[str] = []


class ProductStatus(msgspec.Struct, frozen=True, gc=False):
    """One product of a ``status`` message: the fields that say whether it trades."""

    id: str
    status: str
    trading_disabled: bool = False
    cancel_only: bool = False
    status_message: str | None = None


class Message(msgspec.Struct, frozen=True, gc=False):
    """Every field tickguard reads from any feed message; which are set depends on ``type``."""

    type: str
    product_id: str | None = None
    price: Decimal | None = None
    trade_id: int | None = None
    time: datetime | None = None
    last_trade_id: int | None = None
    message: str | None = None
    reason: str | None = None
    channels: list[Channel] | None = None
    products: list[ProductStatus] | None = None


_decode = msgspec.json.Decoder(Message).decode


def parse(data: str | bytes) -> Message:
    """Decode one feed message and check the fields its type needs; raises
    ``MalformedMessage``. Types other than ticker and heartbeat are returned as decoded."""
    try:
        msg = _decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(str(exc)) from None
    kind = msg.type
    if kind == "ticker":
        price = msg.price
        if (
            msg.product_id is None
            or price is None
            or not price.is_finite()
            or price <= 0
            or msg.trade_id is None
            or msg.time is None
            or msg.time.tzinfo is None
        ):
            raise MalformedMessage("ticker without a usable product, price, trade id or time")
    elif kind == "heartbeat" and (msg.product_id is None or msg.last_trade_id is None):
        raise MalformedMessage("heartbeat without product_id or last_trade_id")
    elif kind == "status":
        if msg.products is None:
            raise MalformedMessage("status without a products list")
        if any(not 0 < len(p.id) <= MAX_PRODUCT_ID for p in msg.products):
            raise MalformedMessage("status naming a product without a usable id")
    return msg


def halt_reason(product: ProductStatus) -> str | None:
    """Why ``product`` is not trading (its status, ``trading disabled``, ``cancel only``),
    or None when it trades. ``post_only``/``limit_only``/auction restrict orders, not trades:
    a trade printed under them is real, so the product counts as trading."""
    reasons = []
    if product.status != "online":
        reasons.append(f"status {product.status or 'empty'}")
    if product.trading_disabled:
        reasons.append("trading disabled")
    if product.cancel_only:
        reasons.append("cancel only")
    return ", ".join(reasons) or None


def is_subscribe_failure(msg: Message) -> bool:
    """Whether ``msg`` is Coinbase's answer refusing a (un)subscribe (not a general error)."""
    return msg.type == "error" and msg.message == SUBSCRIBE_FAILED


def subscribed_tickers(ack: Message) -> set[str]:
    """The products a ``subscriptions`` ack lists on the ticker channel (the whole current
    set of the connection, not just the product asked for)."""
    return next((set(c.product_ids) for c in ack.channels or [] if c.name == "ticker"), set())


def status_subscription() -> str:
    """The subscribe message for the ``status`` channel, in COINBASE.md's form (a channel name,
    no products: the channel covers every product)."""
    return json.dumps({"type": "subscribe", "channels": [STATUS_CHANNEL]})


def subscription_request(op: SubscriptionOp, product: str) -> str:
    """The (un)subscribe message for one product on the ticker and heartbeat channels, in the
    channel-object form (one product per message: Coinbase refuses a whole message for one
    bad product, and its error does not say which)."""
    products = [product]
    return json.dumps(
        {
            "type": op,
            "channels": [
                {"name": "ticker", "product_ids": products},
                {"name": "heartbeat", "product_ids": products},
            ],
        }
    )
