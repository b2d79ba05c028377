"""The feed actor: one Coinbase market-data connection, merged into the per-symbol windows.

Receives ``Watch`` / ``Unwatch`` commands; sends every ticker into its symbol's ``WindowSlot``
(``put`` never blocks, so the reader never waits on an engine, DESIGN.md invariant 3) and keeps
``FeedStatus`` up to date for /ready and /metrics.

Protocol rules it follows (COINBASE.md): one product per subscribe message, waiting for its
ack or error before the next (Coinbase rejects a whole message for one bad product and its
errors carry no request id); the first subscribe right after connecting (5-second rule);
resubscribe everything after a reconnect; exponential backoff with full jitter, reset once a
connection delivered data; a subscribed product silent for ``heartbeat_timeout_s`` recycles the
connection. Malformed and unknown messages are counted and skipped, never raised.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import math
import os
import random
import ssl
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import attrs
import msgspec
import trio

from tickguard.actors import faults as fault_points
from tickguard.actors.faults import FaultPoints
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.window import WindowSlots

log = logging.getLogger(__name__)

ProductState = Literal["connecting", "live", "stale", "rejected"]
MAX_REJECTED_REMEMBERED = 1000


@attrs.frozen
class FeedConfig:
    """One Coinbase connection's settings (seconds, not milliseconds)."""

    url: str
    products: tuple[str, ...] = ("BTC-USD",)
    reconnect_base_s: float = 1.0
    reconnect_max_s: float = 30.0
    heartbeat_timeout_s: float = 5.0
    subscribe_deadline_s: float = 5.0
    ack_timeout_s: float = 5.0
    linger_s: float = 60.0
    connect_timeout_s: float = 10.0
    # None: jitter from system randomness; an int makes the backoff sequence reproducible.
    seed: int | None = None


@attrs.frozen
class SubscribeOutcome:
    """The feed's answer to ``Watch``: accepted, rejected (with Coinbase's reason), or pending
    (no connection right now: the symbol is subscribed once one is up)."""

    status: Literal["accepted", "rejected", "pending"]
    reason: str | None = None

    ACCEPTED: ClassVar[SubscribeOutcome]
    PENDING: ClassVar[SubscribeOutcome]

    @classmethod
    def rejected(cls, reason: str) -> SubscribeOutcome:
        return cls("rejected", reason)


SubscribeOutcome.ACCEPTED = SubscribeOutcome("accepted")
SubscribeOutcome.PENDING = SubscribeOutcome("pending")


@attrs.frozen(eq=False)
class Watch:
    """Ensure ``symbol`` is subscribed. The reply (if any) gets a ``SubscribeOutcome``."""

    symbol: str
    reply: trio.MemorySendChannel[Any] | None = None


@attrs.frozen
class Unwatch:
    """The last open position on ``symbol`` closed: unsubscribe after the linger time unless
    a ``Watch`` comes first. Ignored for the always-subscribed products."""

    symbol: str


FeedCommand = Watch | Unwatch


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in ``0 .. min(cap, base * 2**attempt)``."""
    return rng.uniform(0, min(cap, base * 2 ** min(attempt, 60)))


# ------------------------------------------------------------------ status
@attrs.define
class ProductStatus:
    state: ProductState = "connecting"
    last_message_at: float | None = None
    ticks: int = 0
    missed_trades: int = 0
    reason: str | None = None


class FeedStatus:
    """What the feed reports (it writes, /ready and /metrics read). Times are Trio clock."""

    def __init__(self) -> None:
        self.products: dict[str, ProductStatus] = {}
        self.connected = False
        self.reconnects = 0
        self.malformed = 0
        self.unknown = 0
        self.errors = 0
        self.missed_trades = 0
        self.missed_gaps = 0
        self.duplicates = 0
        # (attempt, delay) of recent backoffs, newest last.
        self.backoffs: collections.deque[tuple[int, float]] = collections.deque(maxlen=32)

    def product(self, symbol: str) -> ProductStatus:
        status = self.products.get(symbol)
        if status is None:
            status = self.products[symbol] = ProductStatus()
        return status

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: per product state, age of last message (s), ticks, missed."""
        now = trio.current_time()
        return {
            "connected": self.connected,
            "reconnects": self.reconnects,
            "malformed": self.malformed,
            "unknown": self.unknown,
            "errors": self.errors,
            "missed_trades": self.missed_trades,
            "missed_gaps": self.missed_gaps,
            "products": {
                symbol: {
                    "state": p.state,
                    "age_s": None
                    if p.last_message_at is None
                    else round(now - p.last_message_at, 3),
                    "ticks": p.ticks,
                    "missed_trades": p.missed_trades,
                    **({"reason": p.reason} if p.reason else {}),
                }
                for symbol, p in self.products.items()
            },
        }


# ------------------------------------------------------------------ wire format
class _Channel(msgspec.Struct, gc=False):
    name: str
    product_ids: list[str] = []


class _Message(msgspec.Struct, gc=False):
    """Every field tickguard reads from any feed message; the rest is skipped unparsed."""

    type: str
    product_id: str | None = None
    price: Decimal | None = None
    trade_id: int | None = None
    time: datetime | None = None
    last_trade_id: int | None = None
    message: str | None = None
    reason: str | None = None
    channels: list[_Channel] | None = None


_decode = msgspec.json.Decoder(_Message).decode
_IGNORED_TYPES = frozenset({"status", "l2update", "snapshot", "match", "last_match", "received"})


def parse_ticker(data: str | bytes) -> tuple[str, Decimal, int, datetime] | None:
    """(product, price, trade_id, time) of a valid ticker, else None. Raises on bad JSON."""
    msg = _decode(data)
    if msg.type != "ticker" or not _valid_ticker(msg):
        return None
    return msg.product_id, msg.price, msg.trade_id, msg.time  # type: ignore[return-value]


def _valid_ticker(msg: _Message) -> bool:
    price = msg.price
    return (
        msg.product_id is not None
        and price is not None
        and price.is_finite()
        and price > 0
        and msg.trade_id is not None
        and msg.time is not None
        and msg.time.tzinfo is not None
    )


# ------------------------------------------------------------------ the socket
class FeedConnectionClosed(Exception):
    """The market-data socket ended (EOF, close frame, protocol error, failed handshake)."""


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_MESSAGE = 1 << 20


class _FeedSocket:
    """A WebSocket client for a server that streams small text messages.

    Frames are parsed here rather than by a general-purpose library: the feed reads tens of
    thousands of messages a second and handles a whole read's worth in one go, without a
    task switch per message. Server frames are never masked; client frames always are.
    """

    def __init__(self, stream: trio.abc.Stream, buffered: bytes) -> None:
        self.stream = stream
        self.buffer = bytearray(buffered)
        self.parts: list[bytes] = []
        self.send_lock = trio.Lock()

    @classmethod
    async def connect(cls, url: str) -> _FeedSocket:
        """Open the TCP (TLS for wss) stream and do the opening handshake."""
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or "localhost"
        port = parts.port or (443 if secure else 80)
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        try:
            if secure:
                stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=host)
            key = base64.b64encode(os.urandom(16))
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            await stream.send_all(
                f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            head = bytearray()
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(65536)
                if not data or len(head) > 65536:
                    raise FeedConnectionClosed("handshake: connection closed")
                head += data
            response, _, rest = bytes(head).partition(b"\r\n\r\n")
            lines = response.split(b"\r\n")
            if lines[0].split(b" ")[1:2] != [b"101"]:
                raise FeedConnectionClosed(f"handshake refused: {lines[0].decode('latin-1')}")
            accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in lines[1:])
            }
            if headers.get(b"sec-websocket-accept") != accept:
                raise FeedConnectionClosed("handshake: bad Sec-WebSocket-Accept")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return cls(stream, rest)

    async def receive_batch(self) -> list[bytes]:
        """The complete text messages of the next read (at least one); raises
        ``FeedConnectionClosed`` when the socket ends."""
        while True:
            messages = await self._parse()
            if messages:
                return messages
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
                raise FeedConnectionClosed(repr(exc)) from exc
            if not data:
                raise FeedConnectionClosed("EOF")
            self.buffer += data

    async def _parse(self) -> list[bytes]:
        buf, pos, messages = self.buffer, 0, []
        size = len(buf)
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length, start = second & 0x7F, pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            if second & 0x80:
                raise FeedConnectionClosed("protocol error: masked server frame")
            if length > _MAX_MESSAGE:
                raise FeedConnectionClosed("message too big")
            end = start + length
            if end > size:
                break
            payload = bytes(buf[start:end])
            pos = end
            opcode = first & 0x0F
            if opcode in (0x1, 0x2, 0x0):
                if first & 0x80 and not self.parts:
                    messages.append(payload)
                else:
                    self.parts.append(payload)
                    if first & 0x80:
                        messages.append(b"".join(self.parts))
                        self.parts = []
            elif opcode == 0x9:
                await self._send_frame(0xA, payload)
            elif opcode == 0x8:
                raise FeedConnectionClosed("closed by server")
        del buf[:pos]
        return messages

    async def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        masked = (
            int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        ).to_bytes(n, "big")
        async with self.send_lock:
            try:
                await self.stream.send_all(header + mask + masked)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
                raise FeedConnectionClosed(repr(exc)) from exc

    async def send_text(self, text: str) -> None:
        await self._send_frame(0x1, text.encode())

    async def aclose(self) -> None:
        """Send a close frame (best effort, briefly) and close the stream."""
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            try:
                await self._send_frame(0x8, (1000).to_bytes(2, "big"))
            except FeedConnectionClosed:
                pass
            await trio.aclose_forcefully(self.stream)


# ------------------------------------------------------------------ the actor
class _Recycle(Exception):
    """End this connection and reconnect (stale product, ack timeout)."""


class _Session:
    """One open connection's subscription state."""

    def __init__(self, ws: _FeedSocket) -> None:
        self.ws = ws
        self.subscribed: set[str] = set()
        self.in_flight: tuple[str, str] | None = None
        self.answers_send, self.answers = trio.open_memory_channel[_Message](math.inf)
        self.delivered = False
        self.first_ticker_seen: set[str] = set()
        self.recycle_reason: str | None = None


class _Feed:
    def __init__(
        self,
        config: FeedConfig,
        slots: WindowSlots,
        commands: Mailbox[FeedCommand],
        status: FeedStatus,
        faults: FaultPoints | None = None,
    ) -> None:
        self.config = config
        self.faults = faults
        self.slots = slots
        self.commands = commands
        self.status = status
        self.rng = random.Random(config.seed)
        # Non-default symbols: None while watched, else the time their linger ends.
        self.watched: dict[str, float | None] = {}
        self.rejected: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.waiters: dict[str, list[Watch]] = {}
        self.session: _Session | None = None
        self.backing_off = False
        self.last_session: _Session | None = None
        self.changed = trio.Event()
        # Last ticker trade id per product, kept across reconnects to see jumps.
        self.last_trade_id: dict[str, int] = {}
        # Heartbeats in a row that showed a trade id ahead of the last ticker's.
        self.ahead: dict[str, int] = {}
        for product in config.products:
            status.product(product)

    def desired(self) -> list[str]:
        wanted = list(self.config.products) + [
            s for s in self.watched if s not in self.config.products
        ]
        return [s for s in wanted if s not in self.rejected]

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # -------------------------------------------------------------- commands
    async def handle_commands(self) -> None:
        while True:
            deadline = min((d for d in self.watched.values() if d is not None), default=math.inf)
            with trio.move_on_at(deadline):
                command = await self.commands.receive()
                if isinstance(command, Watch):
                    self.on_watch(command)
                else:
                    self.on_unwatch(command)
                continue
            now = trio.current_time()
            expired = [s for s, d in self.watched.items() if d is not None and d <= now]
            for symbol in expired:
                del self.watched[symbol]
            if expired:
                log.info("feed: lingered out %s", ", ".join(expired))
                self.wake()

    def on_watch(self, command: Watch) -> None:
        symbol = command.symbol
        if symbol in self.rejected:
            self.commands.answer(command, SubscribeOutcome.rejected(self.rejected[symbol]))
            return
        if symbol not in self.config.products:
            self.watched[symbol] = None
        session = self.session
        if session is None and self.backing_off:
            self.commands.answer(command, SubscribeOutcome.PENDING)
        elif session is None:
            # Connecting: the answer comes with this connection's ack (or PENDING if it fails).
            self.waiters.setdefault(symbol, []).append(command)
        elif symbol in session.subscribed and session.in_flight != ("unsubscribe", symbol):
            self.commands.answer(command, SubscribeOutcome.ACCEPTED)
        else:
            self.waiters.setdefault(symbol, []).append(command)
        self.wake()

    def on_unwatch(self, command: Unwatch) -> None:
        if command.symbol in self.watched:
            self.watched[command.symbol] = trio.current_time() + self.config.linger_s

    def settle_waiters(self, symbol: str, outcome: SubscribeOutcome) -> None:
        for command in self.waiters.pop(symbol, []):
            self.commands.answer(command, outcome)

    # -------------------------------------------------------------- connection loop
    async def connect_forever(self) -> None:
        attempt = 0
        while True:
            while not self.desired():
                await self.changed.wait()
            for symbol in self.desired():
                product = self.status.product(symbol)
                if product.state != "stale":
                    product.state = "connecting"
            self.last_session = None
            try:
                await self.run_session()
            except (OSError, FeedConnectionClosed, trio.TooSlowError) as exc:
                log.warning("feed: connection to %s failed: %r", self.config.url, exc)
            session = self.last_session
            if session is not None and session.recycle_reason == "idle":
                continue
            if session is not None and session.delivered:
                attempt = 0
            self.status.reconnects += 1
            delay = backoff_delay(
                attempt, self.config.reconnect_base_s, self.config.reconnect_max_s, self.rng
            )
            self.status.backoffs.append((attempt, delay))
            attempt += 1
            for symbol in list(self.waiters):
                self.settle_waiters(symbol, SubscribeOutcome.PENDING)
            self.backing_off = True
            try:
                await trio.sleep(delay)
            finally:
                self.backing_off = False

    async def run_session(self) -> _Session:
        config = self.config
        with trio.fail_after(config.connect_timeout_s):
            ws = await _FeedSocket.connect(config.url)
        try:
            session = self.last_session = _Session(ws)
            self.session = session
            self.status.connected = True
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.subscribe_loop, session, nursery.cancel_scope)
                    nursery.start_soon(self.watchdog, session, nursery.cancel_scope)
                    await self.read(session)
                    nursery.cancel_scope.cancel()
            finally:
                self.session = None
                self.status.connected = False
                # Answer now: closing a stuck connection can take a while.
                for symbol in list(self.waiters):
                    self.settle_waiters(symbol, SubscribeOutcome.PENDING)
        finally:
            await ws.aclose()
        if session.recycle_reason and session.recycle_reason != "idle":
            log.warning("feed: recycling connection: %s", session.recycle_reason)
        return session

    async def read(self, session: _Session) -> None:
        """Take every message off the socket; returns when the server closed it."""
        ws = session.ws
        on_message = self.on_message
        while True:
            try:
                batch = await ws.receive_batch()
            except FeedConnectionClosed as exc:
                log.info("feed: connection ended: %s", exc)
                return
            session.delivered = True
            await fault_points.hit(self.faults, "feed.before_batch")
            now = trio.current_time()
            for data in batch:
                on_message(session, data, now)

    def on_message(self, session: _Session, data: str | bytes, now: float) -> None:
        """Parse one message (received at Trio time ``now``) and act on it; never raises for
        bad input, never blocks."""
        try:
            msg = _decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.status.malformed += 1
            return
        kind = msg.type
        if kind == "ticker":
            if not _valid_ticker(msg):
                self.status.malformed += 1
                return
            self.on_ticker(session, msg, now)
        elif kind == "heartbeat":
            if msg.product_id is None or msg.last_trade_id is None:
                self.status.malformed += 1
                return
            self.on_heartbeat(msg.product_id, msg.last_trade_id, now)
        elif kind == "subscriptions":
            session.answers_send.send_nowait(msg)
        elif kind == "error":
            if msg.message == "Failed to subscribe" and session.in_flight is not None:
                session.answers_send.send_nowait(msg)
            else:
                self.status.errors += 1
                log.warning("feed: Coinbase error %s: %s", msg.message, msg.reason)
        elif kind in _IGNORED_TYPES:
            pass
        else:
            self.status.unknown += 1

    def on_ticker(self, session: _Session, msg: _Message, now: float) -> None:
        product: str = msg.product_id  # type: ignore[assignment]
        trade_id: int = msg.trade_id  # type: ignore[assignment]
        status = self.status.products.get(product) or self.status.product(product)
        status.last_message_at = now
        if status.state != "live" and product in session.subscribed:
            status.state = "live"
        last = self.last_trade_id.get(product)
        # The first ticker of a subscription is the last trade, however old: its own window.
        first = product not in session.first_ticker_seen
        if first:
            session.first_ticker_seen.add(product)
            if last is not None and trade_id > last + 1:
                # Trades happened while we were away: the ticker after the ack is the last one.
                self.report_missed(product, last, trade_id, "across a reconnect")
        if last is not None and trade_id <= last:
            # The same trade again (the ticker sent after a resubscribe): already delivered.
            self.status.duplicates += 1
            return
        self.last_trade_id[product] = trade_id
        if self.ahead:
            self.ahead.pop(product, None)
        status.ticks += 1
        self.slots.get(product).put(msg.price, trade_id, msg.time, alone=first)  # type: ignore[arg-type]

    def on_heartbeat(self, product: str, last_trade_id: int, now: float) -> None:
        status = self.status.product(product)
        status.last_message_at = now
        if status.state == "stale":
            status.state = "live"
        last = self.last_trade_id.get(product)
        if last is None or last_trade_id <= last:
            self.ahead.pop(product, None)
            return
        # A ticker may still be on its way; more than two heartbeats ahead means it is not.
        self.ahead[product] = self.ahead.get(product, 0) + 1
        if self.ahead[product] > 2:
            self.report_missed(product, last, last_trade_id + 1, "heartbeat ahead of ticker")
            self.last_trade_id[product] = last_trade_id
            self.ahead.pop(product, None)

    def report_missed(self, product: str, last_seen: int, next_seen: int, how: str) -> None:
        missed = next_seen - last_seen - 1
        self.status.missed_trades += missed
        self.status.missed_gaps += 1
        self.status.product(product).missed_trades += missed
        log.warning(
            "feed: %s missed %d trades (%s): after trade %d, before %d",
            product,
            missed,
            how,
            last_seen,
            next_seen,
        )

    # -------------------------------------------------------------- subscriptions
    async def subscribe_loop(self, session: _Session, scope: trio.CancelScope) -> None:
        """Bring the connection's subscriptions to the desired set, one product at a time."""
        while True:
            desired = self.desired()
            todo = next((("subscribe", s) for s in desired if s not in session.subscribed), None)
            if todo is None:
                todo = next(
                    (("unsubscribe", s) for s in session.subscribed if s not in desired), None
                )
            if todo is None:
                if not desired and not session.subscribed:
                    session.recycle_reason = "idle"
                    scope.cancel()
                    return
                await self.changed.wait()
                continue
            op, symbol = todo
            session.in_flight = todo
            channel = [symbol]
            try:
                await session.ws.send_text(
                    json.dumps(
                        {
                            "type": op,
                            "channels": [
                                {"name": "ticker", "product_ids": channel},
                                {"name": "heartbeat", "product_ids": channel},
                            ],
                        }
                    )
                )
            except FeedConnectionClosed:
                # The reader sees the end of the socket too and ends the session.
                scope.cancel()
                return
            answer: _Message | None = None
            with trio.move_on_after(self.config.ack_timeout_s):
                answer = await session.answers.receive()
            session.in_flight = None
            if answer is None:
                session.recycle_reason = f"no answer to {op} {symbol}"
                scope.cancel()
                return
            self.on_answer(session, op, symbol, answer)

    def on_answer(self, session: _Session, op: str, symbol: str, answer: _Message) -> None:
        if answer.type == "error":
            reason = answer.reason or answer.message or "rejected"
            log.warning("feed: Coinbase rejected %s %s: %s", op, symbol, reason)
            if op == "subscribe":
                self.rejected[symbol] = reason
                while len(self.rejected) > MAX_REJECTED_REMEMBERED:
                    self.rejected.popitem(last=False)
                self.watched.pop(symbol, None)
                product = self.status.product(symbol)
                product.state, product.reason = "rejected", reason
                self.settle_waiters(symbol, SubscribeOutcome.rejected(reason))
            return
        # The ack lists the whole current set: it is the truth about this connection.
        ticker = next((c.product_ids for c in answer.channels or [] if c.name == "ticker"), [])
        session.subscribed = set(ticker)
        now = trio.current_time()
        if op == "subscribe" and symbol in session.subscribed:
            product = self.status.product(symbol)
            # Live once the ack is in (the stale ticker and heartbeats follow); silence
            # from here on counts towards staleness.
            product.last_message_at = now
            product.state, product.reason = "live", None
            self.settle_waiters(symbol, SubscribeOutcome.ACCEPTED)
        elif op == "unsubscribe" and symbol not in session.subscribed:
            self.status.products.pop(symbol, None)

    async def watchdog(self, session: _Session, scope: trio.CancelScope) -> None:
        """Recycle the connection when a subscribed product has been silent too long."""
        timeout = self.config.heartbeat_timeout_s
        while True:
            await trio.sleep(min(1.0, timeout / 4))
            now = trio.current_time()
            for symbol in session.subscribed:
                product = self.status.product(symbol)
                if product.last_message_at is not None and now - product.last_message_at > timeout:
                    product.state = "stale"
                    session.recycle_reason = f"{symbol} silent for {timeout} s"
                    scope.cancel()
                    return


async def run(
    config: FeedConfig,
    slots: WindowSlots,
    commands: Mailbox[FeedCommand],
    status: FeedStatus,
    *,
    faults: FaultPoints | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one Coinbase connection until cancelled.

    Receives ``Watch``/``Unwatch`` from ``commands``; puts every valid ticker into
    ``slots.get(product)``; updates ``status``. Started means: taking commands (the connection
    comes up in the background, so a down Coinbase never delays the rest of the tree). Never
    waits on an engine; never raises for bad feed input or network failures (it reconnects).
    """
    feed = _Feed(config, slots, commands, status, faults)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.handle_commands)
        task_status.started()
        await feed.connect_forever()
