"""What the simulator writes on the wire: Coinbase's time format, pre-encoded WebSocket frames,
JSON with exact decimal numbers, and the samples its fault ops send."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from wsproto.frame_protocol import FrameProtocol

MALFORMED_SAMPLES = (
    '{"type": "ticker", "product_id": "BTC-USD", "price": "6',
    "not json at all",
    '{"type": "ticker", "product_id": "BTC-USD", "price": "abc", "trade_id": 1, '
    '"time": "2024-01-01T00:00:00.000000Z"}',
    '{"type": "ticker", "product_id": "BTC-USD", "price": "1.5"}',
    "[1, 2, 3]",
    '{"type": "heartbeat", "product_id": "BTC-USD", "last_trade_id": "x"}',
)
UNKNOWN_SAMPLES = (
    '{"type": "status", "products": [], "currencies": []}',
    '{"type": "l2update", "product_id": "BTC-USD", "changes": []}',
    '{"type": "something_new", "detail": 1}',
)

# wsproto's framing: a frame is encoded once and written to every subscriber (and benchmark
# bursts are pre-encoded), so no per-connection state is involved.
_FRAMES = FrameProtocol(client=False, extensions=[])


def format_time(at: datetime) -> str:
    """RFC 3339 UTC with microseconds and ``Z``, as Coinbase writes it."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """An ISO 8601 / RFC 3339 time (``Z`` allowed; naive means UTC); ValueError if bad."""
    at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def encode_frame(text: str | bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame (server to client), framed by wsproto."""
    payload = text.encode() if isinstance(text, str) else text
    return _text_header(len(payload)) + payload


@functools.lru_cache(maxsize=4096)
def _text_header(length: int) -> bytes:
    # A server text frame's header depends on the payload length only: wsproto frames a
    # placeholder of that length once, and the header is reused (wsproto costs ~14 us a frame,
    # which would cap the benchmarks' pre-encoded bursts below 30,000 messages a second).
    frame = bytes(_FRAMES.send_data(" " * length, fin=True))
    return frame[: len(frame) - length]


def dumps_exact(value: Any) -> str:
    """JSON in which every ``Decimal`` is written as an exact JSON number (never via float),
    as Coinbase writes candle rows."""
    return "".join(_encode(value))


def _encode(value: Any) -> Iterable[str]:
    if isinstance(value, Decimal):
        yield format(value, "f")
    elif isinstance(value, list | tuple):
        yield "["
        for i, item in enumerate(value):
            if i:
                yield ","
            yield from _encode(item)
        yield "]"
    elif isinstance(value, dict):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            if i:
                yield ","
            yield json.dumps(str(key))
            yield ":"
            yield from _encode(item)
        yield "}"
    else:
        yield json.dumps(value)
