"""The feed actor: one Coinbase market-data connection, merged into the per-symbol windows.

Receives ``Watch`` / ``Unwatch`` commands; sends every ticker into its symbol's ``WindowSlot``
(``put`` never blocks, so the reader never waits on an engine, DESIGN.md invariant 3) and keeps
``FeedStatus`` up to date for /ready and /metrics.

Protocol rules it follows (COINBASE.md): one product per subscribe message, waiting for its
ack or error before the next (Coinbase rejects a whole message for one bad product and its
errors carry no request id); the first subscribe right after connecting (5-second rule);
resubscribe everything after a reconnect; exponential backoff with full jitter, reset once a
connection delivered data; a subscribed product silent for ``heartbeat_timeout_s`` recycles the
connection. Malformed and unknown messages are counted and skipped, never raised; a server
that breaks the WebSocket protocol ends that connection only (counted; the feed reconnects).

Halted products (issue 14): each connection first subscribes to Coinbase's ``status`` channel.
While it says a product is not trading (``coinbase.halt_reason``), that product's tickers are
counted (``halted_ticks``) and not put into its slot, so nothing triggers on it, and its
heartbeats start no recovery. Once it trades again, its next ticker is handled like the first
of a subscription: a trade-id jump past the last trade put becomes a ``Hold`` and a
``RecoverGap``, so any real trade printed while it was halted is fetched over REST and judged,
in order, before live windows (a halted market normally prints none, and then nothing is held).

The message format is ``coinbase``, the socket ``feed_connection`` (trio-websocket), the
reported state ``feed_status``.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import ssl

import attrs
import trio

from tickguard.actors import backoff, coinbase
from tickguard.actors import faults as fault_points
from tickguard.actors.faults import FaultPoints
from tickguard.actors.feed_connection import (
    ConnectionSettings,
    FeedConnection,
    FeedConnectionError,
    open_connection,
)
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import (
    Drop,
    FeedCommand,
    Pin,
    RecoverGap,
    SubscribeOutcome,
    Unwatch,
    Watch,
)
from tickguard.actors.window import WindowSlots
from tickguard.config import Settings

log = logging.getLogger(__name__)

MAX_REJECTED_REMEMBERED = 1000
# Halted products remembered beyond the ones the feed watches (a status message lists all).
MAX_HALTED_REMEMBERED = 10_000


@attrs.frozen
class FeedConfig:
    """One Coinbase connection's settings (seconds, not milliseconds).

    ``ssl_context`` verifies a wss:// server; None means the system trust store (tests pass
    a context that trusts their own CA).
    """

    url: str
    products: tuple[str, ...] = ("BTC-USD",)
    reconnect_base_s: float = 1.0
    reconnect_max_s: float = 30.0
    heartbeat_timeout_s: float = 5.0
    ack_timeout_s: float = 5.0
    linger_s: float = 60.0
    connect_timeout_s: float = 10.0
    # None: jitter from system randomness; an int makes the backoff sequence reproducible.
    seed: int | None = None
    # Subscribe to the ``status`` channel first on each connection (halted products, issue 14).
    status_channel: bool = True
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, eq=False)

    def connection(self) -> ConnectionSettings:
        return ConnectionSettings(
            self.url, ssl_context=self.ssl_context, connect_timeout_s=self.connect_timeout_s
        )


def config_from(settings: Settings) -> FeedConfig:
    """The feed's configuration from the process's settings."""
    return FeedConfig(
        url=settings.coinbase_ws_url,
        products=settings.coinbase_products,
        reconnect_base_s=settings.ws_reconnect_base_ms / 1000,
        reconnect_max_s=settings.ws_reconnect_max_ms / 1000,
        heartbeat_timeout_s=settings.ws_heartbeat_timeout_ms / 1000,
    )


# ------------------------------------------------------------------ the actor
class _Subscriptions:
    """One open connection's subscription state (what Coinbase acknowledged on it)."""

    def __init__(self, ws: FeedConnection) -> None:
        self.ws = ws
        self.subscribed: set[str] = set()
        self.in_flight: tuple[coinbase.SubscriptionOp, str] | None = None
        self.answers_send, self.answers = trio.open_memory_channel[coinbase.Message](math.inf)
        self.delivered = False
        self.first_ticker_seen: set[str] = set()
        self.recycle_reason: str | None = None
        self.protocol_error = False


class _Feed:
    def __init__(
        self,
        config: FeedConfig,
        slots: WindowSlots,
        commands: Mailbox[FeedCommand],
        status: FeedStatus,
        faults: FaultPoints | None = None,
        recoveries: Mailbox[RecoverGap] | None = None,
    ) -> None:
        self.config = config
        self.recoveries = recoveries
        self.faults = faults
        self.slots = slots
        self.commands = commands
        self.status = status
        self.rng = random.Random(config.seed)
        # Non-default symbols: None while watched, else the time their linger ends.
        self.watched: dict[str, float | None] = {}
        self.rejected: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.waiters: dict[str, list[Watch]] = {}
        self.session: _Subscriptions | None = None
        self.backing_off = False
        self.last_session: _Subscriptions | None = None
        self.changed = trio.Event()
        # Last ticker trade id per product, kept across reconnects to see jumps.
        self.last_trade_id: dict[str, int] = {}
        # Heartbeats in a row that showed a trade id ahead of the last ticker's.
        self.ahead: dict[str, int] = {}
        # Products trading again whose first ticker since is still to come.
        self.resumed: set[str] = set()
        # Always subscribed: the configured products, or what a Pin says (issue 18).
        self.pinned: tuple[str, ...] = tuple(config.products)
        # Dropped (another engine owns them now) and not watched since: tickers ignored.
        self.dropped: set[str] = set()
        status.status_channel = "connecting" if config.status_channel else "off"
        status.watching = self.watching
        for product in config.products:
            status.product(product)

    def desired(self) -> list[str]:
        wanted = list(self.pinned) + [s for s in self.watched if s not in self.pinned]
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
                elif isinstance(command, Unwatch):
                    self.on_unwatch(command)
                elif isinstance(command, Pin):
                    self.on_pin(command)
                else:
                    self.on_drop(command)
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
        self.dropped.discard(symbol)
        if symbol not in self.pinned:
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

    def watching(self, symbol: str) -> bool:
        """Whether a ``Watch`` of ``symbol`` would change nothing and be answered ``ACCEPTED``
        at once (``on_watch``): subscribed on the live connection with no unsubscribe in
        flight, not rejected or dropped, and pinned or watched without a linger running. The
        create handler reads it through ``FeedStatus.watching`` instead of asking, which cost a
        fifth of a create (issue 16); any other case asks as before."""
        session = self.session
        return (
            session is not None
            and symbol in session.subscribed
            and session.in_flight != ("unsubscribe", symbol)
            and symbol not in self.rejected
            and symbol not in self.dropped
            and (symbol in self.pinned or (symbol in self.watched and self.watched[symbol] is None))
        )

    def on_unwatch(self, command: Unwatch) -> None:
        if command.symbol in self.watched:
            self.watched[command.symbol] = trio.current_time() + self.config.linger_s

    def on_pin(self, command: Pin) -> None:
        """Keep exactly ``command.products`` subscribed besides the watched symbols; a product
        no longer pinned (nor watched) is unsubscribed now."""
        self.pinned = tuple(sorted(command.products))
        for product in self.pinned:
            self.dropped.discard(product)
            self.status.product(product)
        self.wake()

    def on_drop(self, command: Drop) -> None:
        """Another engine owns these symbols now: unsubscribe them without lingering, ignore
        their tickers until watched again, and forget their last trade, so that a later
        subscription recovers from the durable watermark (the other owner may have judged
        trades since, or had ours fenced)."""
        for symbol in command.symbols:
            self.watched.pop(symbol, None)
            if symbol in self.pinned:
                self.pinned = tuple(p for p in self.pinned if p != symbol)
            self.dropped.add(symbol)
            self.last_trade_id.pop(symbol, None)
            self.ahead.pop(symbol, None)
            self.resumed.discard(symbol)
            if self.session is not None:
                self.session.first_ticker_seen.discard(symbol)
        if command.symbols:
            log.info("feed: dropped %s", ", ".join(sorted(command.symbols)))
        self.wake()

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
            except FeedConnectionError as exc:
                self.status.last_error = str(exc)
                log.warning("feed: connection to %s failed: %s", self.config.url, exc)
            session = self.last_session
            if session is not None and session.recycle_reason == "idle":
                continue
            # A server that delivers and then breaks the protocol is not a healthy one: its
            # reconnects keep backing off.
            if session is not None and session.delivered and not session.protocol_error:
                attempt = 0
            self.status.reconnects += 1
            delay = backoff.full_jitter(
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

    async def run_session(self) -> _Subscriptions:
        """One connection, from connect to its end; raises ``FeedConnectionError`` when it
        cannot connect (a connection that ends after opening returns normally)."""
        async with open_connection(self.config.connection()) as ws:
            session = self.last_session = _Subscriptions(ws)
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
        if session.recycle_reason and session.recycle_reason != "idle":
            log.warning("feed: recycling connection: %s", session.recycle_reason)
        return session

    async def read(self, session: _Subscriptions) -> None:
        """Take every message off the socket; returns when the connection ended."""
        receive = session.ws.receive
        on_message = self.on_message
        faults = self.faults
        while True:
            try:
                data = await receive()
            except FeedConnectionError as exc:
                self.status.last_error = str(exc)
                if exc.protocol_error:
                    session.protocol_error = True
                    self.status.protocol_errors += 1
                    log.warning("feed: %s broke the WebSocket protocol: %s", self.config.url, exc)
                else:
                    log.info("feed: connection ended: %s", exc)
                return
            session.delivered = True
            if faults is not None:
                await fault_points.hit(faults, "feed.before_batch")
            on_message(session, data, trio.current_time())

    def on_message(self, session: _Subscriptions, data: str | bytes, now: float) -> None:
        """Parse one message (received at Trio time ``now``) and act on it; never raises for
        bad input, never blocks."""
        try:
            msg = coinbase.parse(data)
        except coinbase.MalformedMessage:
            self.status.malformed += 1
            return
        kind = msg.type
        if kind == "ticker":
            self.on_ticker(session, msg, now)
        elif kind == "heartbeat":
            self.on_heartbeat(msg.product_id, msg.last_trade_id, now)  # type: ignore[arg-type]
        elif kind == "status":
            self.on_status(msg.products or [])
        elif kind == "subscriptions":
            session.answers_send.send_nowait(msg)
        elif kind == "error":
            if coinbase.is_subscribe_failure(msg) and session.in_flight is not None:
                session.answers_send.send_nowait(msg)
            else:
                self.status.errors += 1
                log.warning("feed: Coinbase error %s: %s", msg.message, msg.reason)
        elif kind in coinbase.IGNORED_TYPES:
            pass
        else:
            self.status.unknown += 1

    def on_ticker(self, session: _Subscriptions, msg: coinbase.Message, now: float) -> None:
        product: str = msg.product_id  # type: ignore[assignment]
        trade_id: int = msg.trade_id  # type: ignore[assignment]
        if product in self.dropped:
            return  # owned by another engine now; its unsubscribe is on its way
        status = self.status.products.get(product) or self.status.product(product)
        status.last_message_at = now
        if status.state != "live" and product in session.subscribed:
            status.state = "live"
        if product in self.status.halted:
            # Not trading: judged by nothing. A real trade is recovered once it trades again.
            status.halted_ticks += 1
            return
        last = self.last_trade_id.get(product)
        # The first ticker of a subscription (or since a halt ended) is its own window.
        first = product not in session.first_ticker_seen
        if first:
            session.first_ticker_seen.add(product)
            how = "while halted" if product in self.resumed else "across a reconnect"
            self.resumed.discard(product)
            if last is not None and trade_id > last + 1:
                # Trades happened while we were away: the ticker after the ack is the last one.
                self.report_missed(product, last, trade_id, how)
            if last is None or trade_id > last + 1:
                # Trades may have been missed (or, at start, since the durable watermark).
                self.recover(product, last, trade_id)
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
        if product in self.dropped:
            return
        status = self.status.product(product)
        status.last_message_at = now
        if status.state == "stale":
            status.state = "live"
        last = self.last_trade_id.get(product)
        if last is None or last_trade_id <= last or product in self.status.halted:
            self.ahead.pop(product, None)
            return
        # A ticker may still be on its way; more than two heartbeats ahead means it is not.
        self.ahead[product] = self.ahead.get(product, 0) + 1
        if self.ahead[product] > 2:
            self.report_missed(product, last, last_trade_id + 1, "heartbeat ahead of ticker")
            self.recover(product, last, last_trade_id + 1)
            self.last_trade_id[product] = last_trade_id
            self.ahead.pop(product, None)

    def on_status(self, products: list[coinbase.ProductStatus]) -> None:
        """Apply a ``status`` message: each product listed halts or trades from now on."""
        halted = self.status.halted
        for entry in products:
            product, reason = entry.id, coinbase.halt_reason(entry)
            if reason is None:
                if halted.pop(product, None) is not None:
                    self.on_resumed(product)
            elif product not in halted:
                watched = product in self.status.products or product in self.watched
                if not watched and len(halted) >= MAX_HALTED_REMEMBERED:
                    continue
                halted[product] = reason
                if watched:
                    log.warning("feed: %s is not trading (%s): nothing triggers", product, reason)
            else:
                halted[product] = reason

    def on_resumed(self, product: str) -> None:
        """``product`` trades again: its next ticker is judged like a subscription's first
        (alone, after recovering any trades printed since the last one put)."""
        self.resumed.add(product)
        self.ahead.pop(product, None)
        session = self.session
        if session is not None:
            session.first_ticker_seen.discard(product)
        if product in self.status.products:
            log.warning("feed: %s is trading again", product)

    def recover(self, product: str, after: int | None, before: int) -> None:
        """Hold the product's later windows back until the recovery has delivered the trades
        strictly between ``after`` and ``before`` (issue 14). Never blocks."""
        if self.recoveries is None:
            return
        hold = self.slots.get(product).hold(after, before)
        self.recoveries.send_nowait(RecoverGap(hold))

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
    async def subscribe_loop(self, session: _Subscriptions, scope: trio.CancelScope) -> None:
        """Bring the connection's subscriptions to the desired set, one product at a time
        (after the ``status`` channel, asked for first)."""
        if self.config.status_channel:
            self.status.status_channel = "connecting"
            asked = await self.exchange(
                session,
                ("subscribe", coinbase.STATUS_CHANNEL),
                coinbase.status_subscription(),
                scope,
            )
            if asked is None:
                return
            self.on_status_answer(session, asked)
        while True:
            desired = self.desired()
            todo: tuple[coinbase.SubscriptionOp, str] | None = next(
                (("subscribe", s) for s in desired if s not in session.subscribed), None
            )
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
            answer = await self.exchange(
                session, todo, coinbase.subscription_request(op, symbol), scope
            )
            if answer is None:
                return
            self.on_answer(session, op, symbol, answer)

    async def exchange(
        self,
        session: _Subscriptions,
        todo: tuple[coinbase.SubscriptionOp, str],
        request: str,
        scope: trio.CancelScope,
    ) -> coinbase.Message | None:
        """Send one (un)subscribe and wait for its answer (ack or refusal); None when the
        connection is ending (it ended, or it is recycled for not answering in time)."""
        session.in_flight = todo
        try:
            await session.ws.send(request)
        except FeedConnectionError:
            # The reader sees the end of the connection too and ends the session.
            scope.cancel()
            return None
        answer: coinbase.Message | None = None
        with trio.move_on_after(self.config.ack_timeout_s):
            answer = await session.answers.receive()
        session.in_flight = None
        if answer is None:
            op, what = todo
            self.recycle(session, f"no answer to {op} {what}", scope)
        return answer

    def on_status_answer(self, session: _Subscriptions, answer: coinbase.Message) -> None:
        if answer.type == "error":
            # Without it, nothing is known halted (as before the channel was used): go on.
            reason = answer.reason or answer.message or "rejected"
            self.status.status_channel = f"refused: {reason}"
            log.warning("feed: Coinbase refused the status channel: %s", reason)
            return
        session.subscribed = coinbase.subscribed_tickers(answer)
        self.status.status_channel = "subscribed"
        # A subscribed connection: whatever failed before is over.
        self.status.last_error = None

    def on_answer(
        self,
        session: _Subscriptions,
        op: coinbase.SubscriptionOp,
        symbol: str,
        answer: coinbase.Message,
    ) -> None:
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
        session.subscribed = coinbase.subscribed_tickers(answer)
        now = trio.current_time()
        if op == "subscribe" and symbol in session.subscribed:
            product = self.status.product(symbol)
            # Live once the ack is in (the stale ticker and heartbeats follow); silence
            # from here on counts towards staleness.
            product.last_message_at = now
            product.state, product.reason = "live", None
            # A subscribed connection: whatever failed before is over.
            self.status.last_error = None
            self.settle_waiters(symbol, SubscribeOutcome.ACCEPTED)
        elif op == "unsubscribe" and symbol not in session.subscribed:
            self.status.products.pop(symbol, None)
            # A later subscription's first ticker is a first again (a gap to recover).
            session.first_ticker_seen.discard(symbol)

    def recycle(self, session: _Subscriptions, reason: str, scope: trio.CancelScope) -> None:
        """End this connection (then reconnect) for ``reason``, shown in /ready at once."""
        session.recycle_reason = reason
        self.status.last_error = f"connection recycled: {reason}"
        scope.cancel()

    async def watchdog(self, session: _Subscriptions, scope: trio.CancelScope) -> None:
        """Recycle the connection when a subscribed product has been silent too long."""
        timeout = self.config.heartbeat_timeout_s
        while True:
            await trio.sleep(min(1.0, timeout / 4))
            now = trio.current_time()
            for symbol in session.subscribed:
                product = self.status.product(symbol)
                if product.last_message_at is not None and now - product.last_message_at > timeout:
                    product.state = "stale"
                    self.recycle(session, f"{symbol} silent for {timeout} s", scope)
                    return


async def run(
    config: FeedConfig,
    slots: WindowSlots,
    commands: Mailbox[FeedCommand],
    status: FeedStatus,
    *,
    faults: FaultPoints | None = None,
    recoveries: Mailbox[RecoverGap] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one Coinbase connection until cancelled.

    Receives ``Watch``/``Unwatch`` from ``commands``; puts every valid ticker into
    ``slots.get(product)``; updates ``status``. Started means: taking commands (the connection
    comes up in the background, so a down Coinbase never delays the rest of the tree). With
    ``recoveries``, every gap it finds (a subscription's first ticker past the last trade put,
    or any at start; heartbeats ahead; a product trading again past the last trade put) is held in
    the slot and sent there as ``RecoverGap``. A product Coinbase's ``status`` channel says is not
    trading gets nothing put (``status.halted``). Never waits on an engine; never raises for bad
    feed input or network failures (it reconnects).
    """
    feed = _Feed(config, slots, commands, status, faults, recoveries)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.handle_commands)
        task_status.started()
        await feed.connect_forever()
