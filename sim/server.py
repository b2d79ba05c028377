"""A Coinbase-Exchange-protocol WebSocket server for tests, benchmarks and the demo.

It speaks the market-data protocol that COINBASE.md describes (subscribe/unsubscribe in both
forms, the full ``subscriptions`` ack, all-or-nothing rejection of unknown products, ticker and
heartbeat messages, the stale ticker after an ack, the 5-second subscribe deadline) and lets a
test or an operator inject faults.

Control: the Python methods of ``Simulator`` (tests), or over HTTP on the same port (anything
that is not a WebSocket upgrade): ``GET /stats`` returns the counters, ``POST /control`` takes
one JSON command ``{"op": ..., ...}`` (see ``Simulator.control``) and answers JSON.

WebSocket frames are parsed by wsproto; outgoing data frames are encoded here, so that
benchmark bursts can be pre-encoded and written in large batches by one writer per connection.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from tickguard.sim import paths
from tickguard.sim.paths import PricePath

log = logging.getLogger(__name__)

CHANNELS = ("ticker", "heartbeat", "status")
MAX_HEAD_BYTES = 65536
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


def format_time(at: datetime) -> str:
    """RFC 3339 UTC with microseconds and ``Z``, as Coinbase writes it."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_frame(text: str | bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame (server to client)."""
    payload = text.encode() if isinstance(text, str) else text
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


class Product:
    """One product's market: its price path and its last trade."""

    def __init__(self, product_id: str, price: Decimal, path: PricePath, trade_id: int) -> None:
        self.id = product_id
        self.path = path
        self.price = price
        self.trade_id = trade_id
        self.sequence = trade_id * 3
        self.last_time = datetime.now(UTC)
        self.last_size = Decimal("0.01000000")
        self.side = "buy"
        self.open_24h = price
        self.low_24h = price
        self.high_24h = price
        self.volume_24h = Decimal("1000.00000000")

    def trade(
        self, price: Decimal, *, time: datetime | None = None, size: Decimal | None = None
    ) -> None:
        """Record one trade (the next trade id) as the product's last."""
        self.side = "buy" if price >= self.price else "sell"
        self.price = price
        self.trade_id += 1
        self.last_time = time or datetime.now(UTC)
        self.last_size = size if size is not None else Decimal("0.01000000")
        self.low_24h = min(self.low_24h, price)
        self.high_24h = max(self.high_24h, price)
        self.volume_24h += self.last_size

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


class Connection:
    """One client's WebSocket: its subscriptions and its outgoing buffer.

    Only the writer task writes to the socket; everyone else appends frames to the buffer.
    """

    def __init__(self, conn_id: int, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.id = conn_id
        self.stream = stream
        self.ws = ws
        self.subscriptions: dict[str, set[str]] = {name: set() for name in CHANNELS}
        self.connected_at = trio.current_time()
        self.first_subscribe_at: float | None = None
        self.stalled_until = -math.inf
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._wake = trio.Event()
        self._flushed = trio.Event()
        self._flushed.set()
        self.closed = False

    def subscribed(self, channel: str, product: str) -> bool:
        return product in self.subscriptions[channel]

    @property
    def backlog(self) -> int:
        """Bytes queued and not yet written."""
        return self._out_bytes

    def enqueue(self, data: bytes) -> bool:
        """Queue bytes for the writer; False (and nothing queued) when stalled or closed."""
        if self.closed or trio.current_time() < self.stalled_until:
            return False
        self._out.append(data)
        self._out_bytes += len(data)
        self._flushed = trio.Event() if self._flushed.is_set() else self._flushed
        self._wake.set()
        return True

    async def flushed(self) -> None:
        """Wait until everything queued so far was handed to the kernel (or the socket died)."""
        await self._flushed.wait()

    async def writer(self) -> None:
        while not self.closed:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._out, self._out_bytes = self._out, [], 0
            if batch:
                try:
                    await self.stream.send_all(b"".join(batch))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.abort()
            if not self._out:
                self._flushed.set()
        self._flushed.set()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (what a network failure looks like)."""
        self.closed = True
        self._wake.set()
        self._flushed.set()


class Simulator:
    """A running Coinbase-protocol server. Start it with ``await nursery.start(sim.serve)``
    (or ``open_simulator``); every method below is safe to call from the same Trio run.

    ``products`` maps product ids to a start price or to a ``(start, path)`` pair. ``rate`` is
    ticks per second per product (0: only ``publish``/``blast`` send tickers).
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
        max_buffer_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.host = host
        self.port = port
        self.rate = rate
        self.heartbeat_interval = heartbeat_interval
        self.subscribe_deadline = subscribe_deadline
        self.max_buffer_bytes = max_buffer_bytes
        self.products: dict[str, Product] = {}
        for index, (product_id, spec) in enumerate(products.items()):
            if isinstance(spec, tuple):
                start, price_path = Decimal(spec[0]), spec[1]
            else:
                start = Decimal(spec)
                price_path = paths.make_path(path, start, seed=seed + index)
            self.add_product(product_id, start, price_path)
        self.connections: dict[int, Connection] = {}
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
                "malformed_sent",
                "unknown_sent",
                "raw_sent",
                "blast_frames_sent",
            ),
            0,
        )
        self.ack_delay = 0.0
        self.refuse_until = -math.inf
        self._ids = itertools.count(1)
        self._changed = trio.Event()
        self._rate_changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ---------------------------------------------------------------- running
    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

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

    def _touch(self) -> None:
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
            if conn.subscribed("ticker", market.id) and self._enqueue(conn, frame):
                self.counters["tickers_sent"] += 1
        self._touch()

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
                if self._enqueue(conn, data):
                    self.counters["blast_frames_sent"] += len(frames[start : start + chunk])
            for conn in targets:
                await conn.flushed()
        self._touch()
        return len(frames)

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

    def send_raw(self, text: str, counter: str = "raw_sent") -> int:
        """Send ``text`` as one text frame to every connection; returns how many got it."""
        frame = encode_frame(text)
        sent = sum(self._enqueue(conn, frame) for conn in list(self.connections.values()))
        self.counters[counter] += sent
        self._touch()
        return sent

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

    def skip_trade_ids(self, product: str, count: int) -> int:
        """``count`` trades happen without a ticker (heartbeats will show them); returns the
        product's last trade id."""
        market = self.products[product]
        market.trade_id += count
        return market.trade_id

    def delay_acks(self, seconds: float) -> None:
        """Answer each later (un)subscribe ``seconds`` late (0 restores prompt acks)."""
        self.ack_delay = seconds

    def refuse_connections(self, seconds: float) -> None:
        """Reject WebSocket handshakes (HTTP 503) for ``seconds``; control HTTP still works."""
        self.refuse_until = trio.current_time() + seconds

    def control(self, command: Mapping[str, Any]) -> dict[str, Any]:
        """Apply one control-channel command; raises ``ValueError`` on a bad one.

        ops: ``stats``; ``drop``; ``stall`` {seconds}; ``malformed`` {count}; ``unknown``
        {count}; ``raw`` {text}; ``skip_trades`` {product, count}; ``delay_acks`` {seconds};
        ``refuse`` {seconds}; ``publish`` {product, price, time?}; ``path`` {product, kind:
        walk|script|jump, start?, prices?, to?, after?, seed?}; ``rate`` {rate};
        ``add_product`` {product, price}; ``blast`` {product, count, start?, step?} (background).
        """
        op = command.get("op")
        try:
            if op == "stats":
                return {"ok": True, "stats": self.stats()}
            if op == "drop":
                return {"ok": True, "dropped": self.drop_all()}
            if op == "stall":
                self.stall(float(command["seconds"]))
            elif op == "malformed":
                return {"ok": True, "sent": self.send_malformed(int(command.get("count", 1)))}
            elif op == "unknown":
                return {"ok": True, "sent": self.send_unknown(int(command.get("count", 1)))}
            elif op == "raw":
                return {"ok": True, "sent": self.send_raw(str(command["text"]))}
            elif op == "skip_trades":
                last = self.skip_trade_ids(str(command["product"]), int(command["count"]))
                return {"ok": True, "last_trade_id": last}
            elif op == "delay_acks":
                self.delay_acks(float(command["seconds"]))
            elif op == "refuse":
                self.refuse_connections(float(command["seconds"]))
            elif op == "publish":
                time = command.get("time")
                at = datetime.fromisoformat(time.replace("Z", "+00:00")) if time else None
                trade_id = self.publish(str(command["product"]), str(command["price"]), time=at)
                return {"ok": True, "trade_id": trade_id}
            elif op == "path":
                self.set_path(str(command["product"]), self._path_from(command))
            elif op == "rate":
                self.set_rate(float(command["rate"]))
            elif op == "blast":
                # Runs in the background: the HTTP answer does not wait for the burst.
                prices = self._blast_prices(command)
                assert self._nursery is not None
                self._nursery.start_soon(self.blast, str(command["product"]), prices)
                return {"ok": True, "frames": len(prices)}
            elif op == "add_product":
                self.add_product(str(command["product"]), str(command["price"]))
            else:
                raise ValueError(f"unknown op {op!r}")
        except (KeyError, TypeError, InvalidOperation) as exc:
            raise ValueError(f"bad {op} command: {exc!r}") from exc
        return {"ok": True}

    def _blast_prices(self, command: Mapping[str, Any]) -> list[Decimal]:
        market = self.products[str(command["product"])]
        start = Decimal(str(command.get("start", market.price)))
        step = Decimal(str(command.get("step", "0.01")))
        # A saw-tooth around start, so that low/high keep moving.
        return [start + step * (i % 200 - 100) for i in range(int(command["count"]))]

    def _path_from(self, command: Mapping[str, Any]) -> PricePath:
        market = self.products[str(command["product"])]
        kind = command.get("kind", "script")
        start = Decimal(str(command.get("start", market.price)))
        if kind == "walk":
            return paths.walk(start, seed=int(command.get("seed", 0)))
        if kind == "script":
            return paths.script(str(p) for p in command["prices"])
        if kind == "jump":
            to = Decimal(str(command["to"]))
            return paths.jump(start, to, after=int(command.get("after", 1)))
        raise ValueError(f"unknown path kind {kind!r}")

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
                    if self._enqueue(conn, frame):
                        self.counters["heartbeats_sent"] += 1
            self._touch()

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

    def _enqueue(self, conn: Connection, frame: bytes) -> bool:
        if not conn.closed and conn.backlog + len(frame) > self.max_buffer_bytes:
            # Coinbase drops consumers that read too slowly; so do we.
            self.counters["slow_consumer_drops"] += 1
            conn.abort()
        return conn.enqueue(frame)

    # ---------------------------------------------------------------- one client
    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = bytearray()
            while b"\r\n\r\n" not in head:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data or len(head) > MAX_HEAD_BYTES:
                    return
                head += data
            request_line, _, rest = bytes(head).partition(b"\r\n")
            headers = {}
            for line in rest.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if headers.get(b"upgrade", b"").lower() == b"websocket":
                await self._serve_websocket(stream, bytes(head))
            else:
                await self._serve_http(stream, request_line, headers, bytes(head))

    async def _serve_http(
        self,
        stream: trio.SocketStream,
        request_line: bytes,
        headers: dict[bytes, bytes],
        head: bytes,
    ) -> None:
        method, target, *_ = request_line.decode("latin-1").split(" ") + ["", ""]
        body = head.split(b"\r\n\r\n", 1)[1]
        length = int(headers.get(b"content-length", b"0") or 0)
        while len(body) < length:
            data = await stream.receive_some(65536)
            if not data:
                return
            body += data
        status, payload = 200, {}
        if method == "GET" and target == "/stats":
            payload = {"ok": True, "stats": self.stats()}
        elif method == "POST" and target == "/control":
            try:
                payload = self.control(json.loads(body or b"{}"))
            except (ValueError, KeyError) as exc:
                status, payload = 400, {"ok": False, "error": str(exc)}
        else:
            status, payload = 404, {"ok": False, "error": f"no route {method} {target}"}
        data = json.dumps(payload).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
        await stream.send_all(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
            + data
        )

    async def _serve_websocket(self, stream: trio.SocketStream, head: bytes) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(head)
        request = next((e for e in ws.events() if isinstance(e, Request)), None)
        if request is None:
            return
        if trio.current_time() < self.refuse_until:
            self.counters["connections_refused"] += 1
            await stream.send_all(ws.send(RejectConnection(status_code=503)))
            return
        await stream.send_all(ws.send(AcceptConnection()))
        conn = Connection(next(self._ids), stream, ws)
        self.connections[conn.id] = conn
        self.counters["connections_accepted"] += 1
        self._touch()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, conn, nursery.cancel_scope)
                nursery.start_soon(self._enforce_deadline, conn)
                await conn.writer()
                nursery.cancel_scope.cancel()
        finally:
            conn.closed = True
            del self.connections[conn.id]
            self._touch()

    async def _enforce_deadline(self, conn: Connection) -> None:
        # Coinbase closes a connection that sends no subscribe within 5 seconds.
        await trio.sleep(self.subscribe_deadline)
        if conn.first_subscribe_at is None:
            self.counters["deadline_kicks"] += 1
            conn.abort()

    async def _read(self, conn: Connection, scope: trio.CancelScope) -> None:
        parts: list[str] = []
        try:
            while True:
                data = await conn.stream.receive_some(65536)
                if not data:
                    break
                conn.ws.receive_data(data)
                for event in conn.ws.events():
                    if isinstance(event, TextMessage):
                        parts.append(event.data)
                        if event.message_finished:
                            text, parts = "".join(parts), []
                            await self._on_message(conn, text)
                    elif isinstance(event, Ping):
                        conn.enqueue(conn.ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        if conn.ws.state.name == "REMOTE_CLOSING":
                            conn.enqueue(conn.ws.send(event.response()))
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError):
            pass
        # Let the writer flush a close reply, then end the connection.
        await conn.flushed()
        conn.abort()

    async def _on_message(self, conn: Connection, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            self._error(conn, "Failed to parse message", "malformed JSON")
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind not in ("subscribe", "unsubscribe"):
            self._error(conn, "Failed to subscribe", f"{kind!r} is not a valid message type")
            return
        self.received.append(message)
        self.counters[f"{kind}s_received"] += 1
        if conn.first_subscribe_at is None:
            conn.first_subscribe_at = trio.current_time()
        self._touch()
        try:
            wanted = self._parse_subscription(message)
        except ValueError as exc:
            self._error(conn, "Failed to subscribe", str(exc))
            return
        unknown = sorted({p for products in wanted.values() for p in products} - set(self.products))
        if unknown:
            # All or nothing: one unknown product voids the whole message.
            self._error(conn, "Failed to subscribe", f"{unknown[0]} is not a valid product")
            return
        if self.ack_delay > 0:
            await trio.sleep(self.ack_delay)
        fresh: list[str] = []
        for channel, products in wanted.items():
            if kind == "subscribe":
                if channel == "ticker":
                    fresh += [p for p in products if p not in conn.subscriptions["ticker"]]
                conn.subscriptions[channel] |= products
            else:
                conn.subscriptions[channel] -= products
        ack = {
            "type": "subscriptions",
            "channels": [
                {"name": name, "product_ids": sorted(products)}
                for name, products in conn.subscriptions.items()
                if products
            ],
        }
        if self._enqueue(conn, encode_frame(json.dumps(ack))):
            self.counters["acks_sent"] += 1
        # Right after the ack, Coinbase sends the last trade of each new ticker product.
        for product in fresh:
            if self._enqueue(conn, encode_frame(self.products[product].ticker())):
                self.counters["tickers_sent"] += 1
        self._touch()

    @staticmethod
    def _parse_subscription(message: dict[str, Any]) -> dict[str, set[str]]:
        """channel -> products named by a (un)subscribe, in either form; ValueError if bad."""
        top = message.get("product_ids") or []
        channels = message.get("channels")
        if not isinstance(top, list) or not isinstance(channels, list) or not channels:
            raise ValueError("channels must be a non-empty list")
        wanted: dict[str, set[str]] = {}
        for channel in channels:
            if isinstance(channel, str):
                name, products = channel, top
            elif isinstance(channel, dict):
                name, products = str(channel.get("name")), channel.get("product_ids") or top
            else:
                raise ValueError(f"{channel!r} is not a valid channel")
            if name not in CHANNELS:
                raise ValueError(f"{name} is not a valid channel")
            if not isinstance(products, list) or not products:
                raise ValueError(f"no product ids for channel {name}")
            wanted.setdefault(name, set()).update(str(p) for p in products)
        return wanted

    def _error(self, conn: Connection, message: str, reason: str) -> None:
        frame = encode_frame(json.dumps({"type": "error", "message": message, "reason": reason}))
        if self._enqueue(conn, frame):
            self.counters["errors_sent"] += 1
        self._touch()


@asynccontextmanager
async def open_simulator(products: Mapping[str, Any], **options: Any) -> AsyncIterator[Simulator]:
    """Run a ``Simulator`` for the body of the ``async with``; yields it bound and listening."""
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(Simulator(products, **options).serve)
        try:
            yield sim
        finally:
            nursery.cancel_scope.cancel()
