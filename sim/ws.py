"""One client's WebSocket session on the simulator: wsproto's handshake (taken over from the
request h11 parsed), the outgoing buffer and its single writer, the subscribe deadline, and
Coinbase's subscription rules (both message forms, the full ack, all-or-nothing rejection,
the stale ticker after an ack, the ``status`` channel)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import h11
import trio
from wsproto import ConnectionType
from wsproto.connection import Connection as WsProtocol
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from tickguard.sim.wire import encode_frame

if TYPE_CHECKING:
    from tickguard.sim.server import Simulator

CHANNELS = ("ticker", "heartbeat", "status")
RECEIVE_BYTES = 65536


class Connection:
    """One client's WebSocket: its subscriptions and its outgoing buffer.

    Only the writer task writes to the socket; everyone else appends frames to the buffer.
    """

    def __init__(self, conn_id: int, stream: trio.abc.Stream, ws: WsProtocol) -> None:
        self.id = conn_id
        self.stream = stream
        self.ws = ws
        self.subscriptions: dict[str, set[str]] = {name: set() for name in CHANNELS}
        self.status_subscribed = False
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
        """Write queued bytes in batches until the connection is closed or aborted."""
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


async def serve_session(
    sim: Simulator, stream: trio.abc.Stream, request: h11.Request, trailing: bytes
) -> None:
    """Complete the upgrade h11 parsed (or refuse it with 503 while the simulator refuses
    connections), then run the session until either side ends it. Never raises for what the
    client sent or for a broken socket."""
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.initiate_upgrade_connection(list(request.headers), request.target)
        if not any(isinstance(e, Request) for e in handshake.events()):
            return
        if trio.current_time() < sim.refuse_until:
            sim.counters["connections_refused"] += 1
            await stream.send_all(handshake.send(RejectConnection(status_code=503)))
            return
        accept = handshake.send(AcceptConnection())
    except (RemoteProtocolError, LocalProtocolError):
        # Not a valid WebSocket handshake (e.g. no Sec-WebSocket-Key): refused with a 400.
        try:
            await _send_quietly(stream, handshake.send(RejectConnection(status_code=400)))
        except LocalProtocolError:
            pass  # wsproto cannot answer in this state: the connection just ends
        return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    protocol = handshake.connection
    assert protocol is not None
    conn = Connection(next(sim.connection_ids), stream, protocol)
    # The 101 goes first through the writer: whatever is sent once the session is registered
    # follows it on the wire.
    conn.enqueue(accept)
    sim.connections[conn.id] = conn
    sim.counters["connections_accepted"] += 1
    sim.touch()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read, sim, conn, trailing)
            nursery.start_soon(_enforce_deadline, sim, conn)
            await conn.writer()
            nursery.cancel_scope.cancel()
    finally:
        conn.closed = True
        del sim.connections[conn.id]
        sim.touch()


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> bool:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def _enforce_deadline(sim: Simulator, conn: Connection) -> None:
    # Coinbase closes a connection that sends no subscribe within 5 seconds.
    await trio.sleep(sim.subscribe_deadline)
    if conn.first_subscribe_at is None:
        sim.counters["deadline_kicks"] += 1
        conn.abort()


async def _read(sim: Simulator, conn: Connection, trailing: bytes) -> None:
    parts: list[str] = []
    data = trailing
    try:
        while True:
            if data:
                conn.ws.receive_data(data)
            closing = False
            for event in conn.ws.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        text, parts = "".join(parts), []
                        await on_message(sim, conn, text)
                elif isinstance(event, Ping):
                    conn.enqueue(conn.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if conn.ws.state.name == "REMOTE_CLOSING":
                        conn.enqueue(conn.ws.send(event.response()))
                    closing = True
                    break
            if closing:
                break
            data = bytes(await conn.stream.receive_some(RECEIVE_BYTES))
            if not data:
                break
    except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError):
        pass
    # Let the writer flush a close reply, then end the connection.
    await conn.flushed()
    conn.abort()


async def on_message(sim: Simulator, conn: Connection, text: str) -> None:
    """Apply one client message: a (un)subscribe is acked with the full set (then the stale
    ticker of each new ticker product, and the status of every product for a new ``status``
    subscriber); anything else is answered with an ``error`` message."""
    try:
        message = json.loads(text)
    except ValueError:
        error(sim, conn, "Failed to parse message", "malformed JSON")
        return
    kind = message.get("type") if isinstance(message, dict) else None
    if kind not in ("subscribe", "unsubscribe"):
        error(sim, conn, "Failed to subscribe", f"{kind!r} is not a valid message type")
        return
    sim.received.append(message)
    sim.counters[f"{kind}s_received"] += 1
    if conn.first_subscribe_at is None:
        conn.first_subscribe_at = trio.current_time()
    sim.touch()
    try:
        wanted = parse_subscription(message)
    except ValueError as exc:
        error(sim, conn, "Failed to subscribe", str(exc))
        return
    named = {p for channel, products in wanted.items() if channel != "status" for p in products}
    unknown = sorted(named - set(sim.products))
    if unknown:
        # All or nothing: one unknown product voids the whole message.
        error(sim, conn, "Failed to subscribe", f"{unknown[0]} is not a valid product")
        return
    if sim.ack_delay > 0:
        await trio.sleep(sim.ack_delay)
    fresh: list[str] = []
    status_fresh = False
    for channel, products in wanted.items():
        if channel == "status":
            status_fresh = kind == "subscribe" and not conn.status_subscribed
            conn.status_subscribed = kind == "subscribe"
        elif kind == "subscribe":
            if channel == "ticker":
                fresh += [p for p in products if p not in conn.subscriptions["ticker"]]
            conn.subscriptions[channel] |= products
        else:
            conn.subscriptions[channel] -= products
    channels: list[dict[str, Any]] = [
        {"name": name, "product_ids": sorted(products)}
        for name, products in conn.subscriptions.items()
        if products and name != "status"
    ]
    if conn.status_subscribed:
        channels.append({"name": "status", "product_ids": []})
    if sim.enqueue(conn, encode_frame(json.dumps({"type": "subscriptions", "channels": channels}))):
        sim.counters["acks_sent"] += 1
    # Right after the ack, Coinbase sends the last trade of each new ticker product.
    for product in fresh:
        if sim.enqueue(conn, encode_frame(sim.products[product].ticker())):
            sim.counters["tickers_sent"] += 1
    if status_fresh and sim.enqueue(conn, sim.status_frame()):
        sim.counters["statuses_sent"] += 1
    sim.touch()


def parse_subscription(message: dict[str, Any]) -> dict[str, set[str]]:
    """channel -> products named by a (un)subscribe, in either form; ValueError if bad.
    The ``status`` channel needs no products (it covers all of them)."""
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
        if not isinstance(products, list) or (not products and name != "status"):
            raise ValueError(f"no product ids for channel {name}")
        wanted.setdefault(name, set()).update(str(p) for p in products)
    return wanted


def error(sim: Simulator, conn: Connection, message: str, reason: str) -> None:
    """Send Coinbase's ``error`` message to one connection."""
    frame = encode_frame(json.dumps({"type": "error", "message": message, "reason": reason}))
    if sim.enqueue(conn, frame):
        sim.counters["errors_sent"] += 1
    sim.touch()
