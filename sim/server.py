"""A Coinbase-Exchange-protocol server for tests, benchmarks and the demo: the ``Simulator``
ties its parts together on one port.

It speaks the market-data protocol that COINBASE.md describes over WebSocket (``sim.ws``),
serves Coinbase's public REST market data from the trades it published (``sim.market_data``)
and lets a test or an operator inject faults: the Python methods below (tests), or over HTTP
on the same port (``sim.http``): ``GET /stats`` returns the counters, ``POST /control`` takes
one JSON command ``{"op": ..., ...}`` (``sim.control``; ``{"op": "help"}`` lists them).

HTTP is parsed by h11 and WebSocket spoken by wsproto; data frames are encoded once per
message (benchmark bursts are pre-encoded) and written in large batches by one writer per
connection.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import trio

from tickguard.sim import control, market_data, paths
from tickguard.sim.http import HttpAnswer, HttpRequest, serve_connection
from tickguard.sim.paths import PricePath
from tickguard.sim.products import Product, Trade
from tickguard.sim.rest_faults import RestFaults
from tickguard.sim.wire import (
    MALFORMED_SAMPLES,
    UNKNOWN_SAMPLES,
    encode_frame,
    format_time,
)
from tickguard.sim.ws import Connection, serve_session

__all__ = [
    "Connection",
    "Product",
    "Simulator",
    "Trade",
    "encode_frame",
    "format_time",
    "open_simulator",
]

log = logging.getLogger(__name__)


class Simulator:
    """A running Coinbase-protocol server. Start it with ``await nursery.start(sim.serve)``
    (or ``open_simulator``); every method below is safe to call from the same Trio run.

    ``products`` maps product ids to a start price or to a ``(start, path)`` pair. ``rate`` is
    ticks per second per product (0: only ``publish``/``blast`` send tickers). ``volatility``
    is the default walk's largest move per tick, as a fraction of the start price.
    """

    def __init__(
        self,
        products: Mapping[str, Decimal | str | int | tuple[Decimal | str | int, PricePath]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate: float = 0.0,
        heartbeat_interval: float = 1.0,
        subscribe_deadline: float = 5.0,
        path: str = "walk",
        seed: int = 0,
        volatility: Decimal | str = paths.DEFAULT_VOLATILITY,
        max_buffer_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.host = host
        self.port = port
        self.rate = rate
        self.heartbeat_interval = heartbeat_interval
        self.subscribe_deadline = subscribe_deadline
        self.max_buffer_bytes = max_buffer_bytes
        self.volatility = Decimal(volatility)
        self.products: dict[str, Product] = {}
        for index, (product_id, spec) in enumerate(products.items()):
            if isinstance(spec, tuple):
                start, price_path = Decimal(spec[0]), spec[1]
            else:
                start = Decimal(spec)
                price_path = paths.make_path(
                    path, start, seed=seed + index, volatility=self.volatility
                )
            self.add_product(product_id, start, price_path)
        self.connections: dict[int, Connection] = {}
        self.connection_ids = itertools.count(1)
        self.received: list[dict[str, Any]] = []
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "connections_accepted",
                "connections_refused",
                "connections_dropped",
                "deadline_kicks",
                "slow_consumer_drops",
                "subscribes_received",
                "unsubscribes_received",
                "acks_sent",
                "errors_sent",
                "tickers_sent",
                "heartbeats_sent",
                "statuses_sent",
                "malformed_sent",
                "unknown_sent",
                "raw_sent",
                "blast_frames_sent",
                "http_requests",
                "rest_requests",
                "rest_faults_applied",
            ),
            0,
        )
        self.ack_delay = 0.0
        self.refuse_until = -math.inf
        self.rest_faults: RestFaults = RestFaults()
        self._changed = trio.Event()
        self._rate_changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ---------------------------------------------------------------- running
    @property
    def url(self) -> str:
        """The WebSocket feed's URL (``COINBASE_WS_URL``)."""
        return f"ws://{self.host}:{self.port}"

    @property
    def rest_url(self) -> str:
        """The REST market data's base URL (``COINBASE_REST_URL``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.port}/control"

    async def serve(
        self, *, task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, tick and heartbeat until cancelled; ``started`` with self once bound."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._heartbeats)
            nursery.start_soon(self._ticks)
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            log.info("simulator listening on %s", self.url)
            task_status.started(self)

    async def wait_until(self, condition: Callable[[Simulator], bool]) -> None:
        """Wait until ``condition(self)`` holds; it is re-checked after every state change
        (connection, subscription, message sent). Put a ``trio.fail_after`` around it."""
        while not condition(self):
            await self._changed.wait()

    def touch(self) -> None:
        """Wake ``wait_until``: something changed."""
        self._changed.set()
        self._changed = trio.Event()

    # ---------------------------------------------------------------- what happened
    def stats(self) -> dict[str, int]:
        """Counters of what the simulator accepted and sent, plus the open connections."""
        return {**self.counters, "connections_open": len(self.connections)}

    def subscribers(self, product: str, channel: str = "ticker") -> int:
        """How many open connections are subscribed to ``product`` on ``channel``."""
        return sum(c.subscribed(channel, product) for c in self.connections.values())

    # ---------------------------------------------------------------- prices
    def add_product(
        self, product_id: str, price: Decimal | str | int, path: PricePath | None = None
    ) -> None:
        """Serve one more product (the next subscribe naming it succeeds)."""
        start = Decimal(price)
        # Trade ids differ per product and are far from zero, like Coinbase's.
        trade_id = 100_000_000 * (len(self.products) + 1)
        self.products[product_id] = Product(
            product_id, start, path if path is not None else paths.script([]), trade_id
        )

    def set_path(self, product: str, path: PricePath) -> None:
        """Take the product's next prices from ``path``."""
        self.products[product].path = path

    def set_rate(self, rate: float) -> None:
        """Ticks per second per product (0 stops automatic ticks)."""
        self.rate = rate
        self._rate_changed.set()

    def publish(
        self,
        product: str,
        price: Decimal | str | int,
        *,
        time: datetime | None = None,
        size: Decimal | None = None,
    ) -> int:
        """Trade at ``price`` now and send the ticker to every subscriber; returns the new
        trade id. ``time`` overrides the trade time (e.g. an old trade)."""
        market = self.products[product]
        market.trade(Decimal(price), time=time, size=size)
        self._send_ticker(market)
        return market.trade_id

    def _send_ticker(self, market: Product) -> None:
        frame = encode_frame(market.ticker())
        for conn in list(self.connections.values()):
            if conn.subscribed("ticker", market.id) and self.enqueue(conn, frame):
                self.counters["tickers_sent"] += 1
        self.touch()

    async def blast(
        self, product: str, prices: Iterable[Decimal | str | int], *, chunk: int = 2000
    ) -> int:
        """Send one ticker per price to the product's subscribers as fast as the sockets take
        them (frames pre-encoded, written in large batches). Returns the frames sent per
        subscriber; waits until they were handed to the kernel."""
        market = self.products[product]
        frames = []
        for price in prices:
            market.trade(Decimal(price))
            frames.append(encode_frame(market.ticker()))
        for start in range(0, len(frames), chunk):
            data = b"".join(frames[start : start + chunk])
            targets = [c for c in self.connections.values() if c.subscribed("ticker", product)]
            for conn in targets:
                if self.enqueue(conn, data):
                    self.counters["blast_frames_sent"] += len(frames[start : start + chunk])
            for conn in targets:
                await conn.flushed()
        self.touch()
        return len(frames)

    def blast_in_background(self, product: str, prices: list[Decimal]) -> None:
        """``blast`` without waiting for it (the control channel's ``blast`` op)."""
        assert self._nursery is not None, "the simulator is not serving"
        self._nursery.start_soon(self.blast, product, prices)

    # ---------------------------------------------------------------- faults
    def drop_all(self) -> int:
        """Drop every client connection at the TCP level (no close frame); returns how many."""
        dropped = list(self.connections.values())
        for conn in dropped:
            conn.abort()
        self.counters["connections_dropped"] += len(dropped)
        return len(dropped)

    def stall(self, seconds: float) -> None:
        """The open connections go silent for ``seconds``: nothing is sent on them, heartbeats
        and acks included (what is produced meanwhile is lost). New connections are served."""
        until = trio.current_time() + seconds
        for conn in self.connections.values():
            conn.stalled_until = until

    def send_bytes(self, data: bytes, counter: str = "raw_sent") -> int:
        """Write ``data`` as it is on every connection (a frame-level fault when it is not a
        well-formed frame); returns how many got it."""
        sent = sum(self.enqueue(conn, data) for conn in list(self.connections.values()))
        self.counters[counter] += sent
        self.touch()
        return sent

    def send_raw(self, text: str, counter: str = "raw_sent") -> int:
        """Send ``text`` as one text frame to every connection; returns how many got it."""
        return self.send_bytes(encode_frame(text), counter)

    def send_malformed(self, count: int = 1) -> int:
        """Send ``count`` malformed messages (bad JSON, wrong field types, missing fields)."""
        return sum(
            self.send_raw(MALFORMED_SAMPLES[i % len(MALFORMED_SAMPLES)], "malformed_sent")
            for i in range(count)
        )

    def send_unknown(self, count: int = 1) -> int:
        """Send ``count`` well-formed messages of types a ticker client does not use."""
        return sum(
            self.send_raw(UNKNOWN_SAMPLES[i % len(UNKNOWN_SAMPLES)], "unknown_sent")
            for i in range(count)
        )

    def skip_trade_ids(
        self, product: str, count: int, *, prices: Iterable[Decimal] | None = None
    ) -> int:
        """``count`` trades happen without a ticker (heartbeats show them, and the REST trades
        and candles list them): at ``prices`` when given, else at the last price. Returns the
        product's last trade id."""
        market = self.products[product]
        hidden = list(prices) if prices is not None else []
        for i in range(count):
            market.trade(hidden[i] if i < len(hidden) else market.price)
        self.touch()
        return market.trade_id

    def delay_acks(self, seconds: float) -> None:
        """Answer each later (un)subscribe ``seconds`` late (0 restores prompt acks)."""
        self.ack_delay = seconds

    def refuse_connections(self, seconds: float) -> None:
        """Reject WebSocket handshakes (HTTP 503) for ``seconds``; control HTTP still works."""
        self.refuse_until = trio.current_time() + seconds

    def set_trading(self, product: str, *, online: bool) -> int:
        """Halt (offline, trading disabled) or resume a product; ``status`` subscribers are
        told at once. Returns how many were told."""
        market = self.products[product]
        market.status = "online" if online else "offline"
        market.trading_disabled = not online
        frame = self.status_frame()
        sent = sum(
            self.enqueue(conn, frame)
            for conn in list(self.connections.values())
            if conn.status_subscribed
        )
        self.counters["statuses_sent"] += sent
        self.touch()
        return sent

    def status_frame(self) -> bytes:
        """The ``status`` channel's message: every product with its status."""
        message = {
            "type": "status",
            "products": [p.to_json() for p in self.products.values()],
            "currencies": [],
        }
        return encode_frame(json.dumps(message))

    def control(self, command: Mapping[str, Any]) -> dict[str, Any]:
        """Apply one control-channel command; raises ``ValueError`` on a bad one.
        ``{"op": "help"}`` lists the ops and their arguments (see ``sim.control``)."""
        return control.apply(self, command)

    # ---------------------------------------------------------------- background
    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            for market in self.products.values():
                targets = [
                    c for c in self.connections.values() if c.subscribed("heartbeat", market.id)
                ]
                if not targets:
                    continue
                frame = encode_frame(market.heartbeat())
                for conn in targets:
                    if self.enqueue(conn, frame):
                        self.counters["heartbeats_sent"] += 1
            self.touch()

    async def _ticks(self) -> None:
        while True:
            if self.rate <= 0:
                self._rate_changed = trio.Event()
                await self._rate_changed.wait()
                continue
            await trio.sleep(1 / self.rate)
            for market in self.products.values():
                price = next(market.path, None)
                if price is not None:
                    market.trade(price)
                    self._send_ticker(market)

    def enqueue(self, conn: Connection, frame: bytes) -> bool:
        """Queue ``frame`` on ``conn``; a consumer too far behind is dropped, as Coinbase does."""
        if not conn.closed and conn.backlog + len(frame) > self.max_buffer_bytes:
            self.counters["slow_consumer_drops"] += 1
            conn.abort()
        return conn.enqueue(frame)

    # ---------------------------------------------------------------- one client
    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            await serve_connection(stream, self._answer, self._upgrade)

    async def _upgrade(self, stream: trio.abc.Stream, request: Any, trailing: bytes) -> None:
        await serve_session(self, stream, request, trailing)

    async def _answer(self, request: HttpRequest) -> HttpAnswer:
        """The answer to one plain HTTP request: control, stats, or REST market data."""
        self.counters["http_requests"] += 1
        parts = urlsplit(request.target)
        if request.method == "GET" and parts.path == "/stats":
            return _json_answer(200, {"ok": True, "stats": self.stats()})
        if request.method == "POST" and parts.path == "/control":
            try:
                return _json_answer(200, self.control(json.loads(request.body or b"{}")))
            except ValueError as exc:  # includes bad JSON and bad UTF-8
                return _json_answer(400, {"ok": False, "error": str(exc)})
        if request.method == "GET":
            query = dict(parse_qsl(parts.query))
            found = market_data.answer(self.products, parts.path, query, datetime.now(UTC))
            if found is not None:
                self.counters["rest_requests"] += 1
                return await self._with_fault(
                    HttpAnswer(found.status, found.body.encode(), found.headers)
                )
        return _json_answer(404, {"message": "NotFound"})

    async def _with_fault(self, answer: HttpAnswer) -> HttpAnswer:
        fault = self.rest_faults.take()
        if fault is None:
            return answer
        self.counters["rest_faults_applied"] += 1
        if fault.kind == "slow":
            await trio.sleep(fault.seconds)
            return answer
        if fault.kind == "429":
            return HttpAnswer(
                429,
                b'{"message": "Public rate limit exceeded"}',
                (("Retry-After", str(fault.retry_after)),),
            )
        if fault.kind == "5xx":
            return HttpAnswer(fault.status, b'{"message": "Internal server error"}')
        return HttpAnswer(
            answer.status, answer.body, answer.headers, truncate_at=len(answer.body) // 2
        )


def _json_answer(status: int, payload: Any) -> HttpAnswer:
    return HttpAnswer(status, json.dumps(payload).encode())


@asynccontextmanager
async def open_simulator(products: Mapping[str, Any], **options: Any) -> AsyncIterator[Simulator]:
    """Run a ``Simulator`` for the body of the ``async with``; yields it bound and listening."""
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(Simulator(products, **options).serve)
        try:
            yield sim
        finally:
            nursery.cancel_scope.cancel()
