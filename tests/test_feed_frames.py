"""The feed's WebSocket connection against servers that misbehave, over TLS, and unreachable.

The misbehaving server is a raw-socket Trio server written here on purpose: it sends frames no
WebSocket library would (a message over the limit in 1 MiB fragments, a lone continuation, an
unknown opcode, RSV bits, a data frame inside a fragmented message). Each must end that
connection only: counted, the bad message never delivered, the feed reconnects and goes on.
Real sockets, real clock (megabytes on the loopback while virtual time jumps would look like
silence), each wait bounded by ``eventually``/``fail_after``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal

import pytest
import trio
import trustme
from sim_fixtures import eventually
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from tickguard.actors.feed import FeedConfig, run
from tickguard.actors.feed_connection import MAX_MESSAGE_SIZE, ConnectionSettings, open_connection
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.window import TickWindow, WindowSlots

GUARD_S = 30.0
BAD_PRICE = "66666"  # every bad frame carries a ticker at this price: it must never arrive
MIB = 1 << 20


def ticker(price: str, trade_id: int, pad: int = 0) -> bytes:
    message = {
        "type": "ticker",
        "product_id": "BTC-USD",
        "price": price,
        "trade_id": trade_id,
        "time": "2026-01-01T00:00:00.000000Z",
    }
    if pad:
        message["pad"] = "x" * pad
    return json.dumps(message).encode()


ACK = json.dumps(
    {
        "type": "subscriptions",
        "channels": [
            {"name": "ticker", "product_ids": ["BTC-USD"]},
            {"name": "heartbeat", "product_ids": ["BTC-USD"]},
        ],
    }
).encode()


def frame(payload: bytes, opcode: int = 0x1, *, fin: bool = True, rsv: int = 0) -> bytes:
    """One unmasked server frame, exactly as asked (no checks: that is the point)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    if n < 126:
        header = bytes((first, n))
    elif n < 1 << 16:
        header = bytes((first, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + n.to_bytes(8, "big")
    return header + payload


def over_the_limit_in_1_mib_fragments() -> bytes:
    """Valid JSON one MiB over the feed's message limit, in 1 MiB fragments."""
    size = MAX_MESSAGE_SIZE + MIB
    message = ticker(BAD_PRICE, 11, pad=size - 200)
    message += b" " * (size - len(message))
    parts = [message[i : i + MIB] for i in range(0, size, MIB)]
    opcodes = [0x1] + [0x0] * (len(parts) - 1)
    return b"".join(
        frame(part, opcode, fin=i == len(parts) - 1)
        for i, (part, opcode) in enumerate(zip(parts, opcodes, strict=True))
    )


def text_inside_a_fragmented_message() -> bytes:
    whole = ticker(BAD_PRICE, 12)
    return (
        frame(whole[:20], 0x1, fin=False)
        + frame(ticker(BAD_PRICE, 11), 0x1)  # a new message before the first one ended
        + frame(whole[20:], 0x0, fin=True)
    )


BAD_FRAMES: dict[str, Callable[[], bytes]] = {
    "1 MiB over the limit, in 1 MiB fragments": over_the_limit_in_1_mib_fragments,
    "lone continuation": lambda: frame(ticker(BAD_PRICE, 11), 0x0),
    "unknown opcode 0x3": lambda: frame(ticker(BAD_PRICE, 11), 0x3),
    "unknown opcode 0xB": lambda: frame(ticker(BAD_PRICE, 11), 0xB),
    "RSV1 set": lambda: frame(ticker(BAD_PRICE, 11), rsv=0b100),
    "RSV2 and RSV3 set": lambda: frame(ticker(BAD_PRICE, 11), rsv=0b011),
    "text inside a fragmented message": text_inside_a_fragmented_message,
}


class RawServer:
    """Speaks just enough WebSocket by hand: the handshake, reading the client's masked
    frames, sending whatever bytes a test wants. Connection 1 gets ``bad`` after a good
    ticker; later connections get a good ticker and stay quiet."""

    def __init__(self, bad: bytes) -> None:
        self.bad = bad
        self.connections = 0
        self.ended_by_client: list[int] = []  # connection numbers the client closed
        self.close_codes: list[int] = []  # close frames the client sent
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        reader = _ClientFrames(stream)
        async with stream:
            await reader.handshake()
            subscribe = json.loads(await reader.text())
            assert subscribe["type"] == "subscribe"
            await stream.send_all(frame(ACK))
            if number == 1:
                await stream.send_all(frame(ticker("65000", 10)))
                try:
                    await stream.send_all(self.bad)
                except trio.BrokenResourceError:
                    pass  # the client may hang up while a big message is still going out
            else:
                await stream.send_all(frame(ticker("65001", 20)))
            # Wait for the client to end the connection (never ended from this side).
            code = await reader.until_closed()
            if code is not None:
                self.close_codes.append(code)
            self.ended_by_client.append(number)


class _ClientFrames:
    """Reads the client's side: its upgrade request, then masked frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self, n: int) -> bool:
        while len(self.buffer) < n:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return False
            if not data:
                return False
            self.buffer += data
        return True

    async def handshake(self) -> None:
        while b"\r\n\r\n" not in self.buffer:
            assert await self._fill(len(self.buffer) + 1)
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        await self.stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )

    async def next_frame(self) -> tuple[int, bytes] | None:
        if not await self._fill(2):
            return None
        opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
        start = 2
        if length == 126:
            if not await self._fill(4):
                return None
            length, start = int.from_bytes(self.buffer[2:4], "big"), 4
        elif length == 127:
            if not await self._fill(10):
                return None
            length, start = int.from_bytes(self.buffer[2:10], "big"), 10
        if not await self._fill(start + 4 + length):
            return None
        mask = self.buffer[start : start + 4]
        body = self.buffer[start + 4 : start + 4 + length]
        del self.buffer[: start + 4 + length]
        return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(body))

    async def text(self) -> bytes:
        got = await self.next_frame()
        assert got is not None and got[0] == 0x1
        return got[1]

    async def until_closed(self) -> int | None:
        """The close code the client sent, if any, once it hung up (EOF)."""
        code = None
        with trio.fail_after(GUARD_S):
            while (got := await self.next_frame()) is not None:
                opcode, body = got
                if opcode == 0x8 and len(body) >= 2:
                    code = int.from_bytes(body[:2], "big")
        return code


@asynccontextmanager
async def feed_at(url: str, **config: object) -> AsyncIterator[tuple[FeedStatus, WindowSlots]]:
    settings = {
        "reconnect_base_s": 0.05,
        "reconnect_max_s": 0.2,
        "heartbeat_timeout_s": 60.0,
        "seed": 3,
        # These servers script one subscribe per connection: the products', not the status
        # channel's (test_feed.py covers that one).
        "status_channel": False,
        **config,
    }
    status, slots = FeedStatus(), WindowSlots()
    feed_config = FeedConfig(url, ("BTC-USD",), **settings)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(run, feed_config, slots, Mailbox("feed"), status)
        yield status, slots
        nursery.cancel_scope.cancel()


def windows(slots: WindowSlots) -> list[TickWindow]:
    taken = []
    while (window := slots.get("BTC-USD").take_nowait()) is not None:
        taken.append(window)
    return taken


@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_a_bad_frame_ends_that_connection_only_and_the_feed_reconnects(case: str) -> None:
    server = RawServer(BAD_FRAMES[case]())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with feed_at(f"ws://127.0.0.1:{server.port}/") as (status, slots):
            product = status.product("BTC-USD")
            await eventually(lambda: product.ticks == 2 and product.state == "live", GUARD_S)
            # The first connection was ended by the feed, not by the server.
            await eventually(lambda: server.ended_by_client[:1] == [1], GUARD_S)
            assert server.connections == 2
            assert status.protocol_errors == 1 and status.reconnects == 1
            assert status.malformed == 0
            seen = windows(slots)
            assert {w.last for w in seen} == {Decimal("65000"), Decimal("65001")}
            assert all(w.high < Decimal(BAD_PRICE) for w in seen)
            # Subscribed again: the error that ended the first connection is no longer current.
            assert status.last_error is None
        nursery.cancel_scope.cancel()
    if case.startswith("1 MiB over"):
        assert server.close_codes[0] == 1009  # message too big, said so before hanging up


async def test_the_protocol_error_is_reported_while_the_server_keeps_misbehaving() -> None:
    class AlwaysBad(RawServer):
        async def handle(self, stream: trio.SocketStream) -> None:
            self.connections = 0  # every connection is "the first": always bad
            await super().handle(stream)

    server = AlwaysBad(frame(ticker(BAD_PRICE, 11), 0x3))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with feed_at(f"ws://127.0.0.1:{server.port}/", reconnect_base_s=0.2) as (
            status,
            _,
        ):
            await eventually(
                lambda: status.protocol_errors >= 3 and len(status.backoffs) >= 3, GUARD_S
            )
            assert status.last_error is not None and "1002" in status.last_error
            assert "PROTOCOL_ERROR" in status.last_error
            # Each connection delivered data, yet the backoff keeps growing: not healthy.
            assert [attempt for attempt, _ in status.backoffs][:3] == [0, 1, 2]
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------- wss:// for real
class TlsCoinbase:
    """A minimal Coinbase over TLS (trio-websocket's server): acks each subscribe and sends
    one ticker."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.port = 0
        self.subscribes = 0

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, self.handle, "127.0.0.1", 0, self.context)
            self.port = server.port
            task_status.started()

    async def handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                message = json.loads(await ws.get_message())
                if message["type"] == "subscribe":
                    self.subscribes += 1
                    await ws.send_message(ACK.decode())
                    await ws.send_message(ticker("65002", 30).decode())
        except ConnectionClosed:
            pass


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def test_wss_with_a_trusted_ca_delivers_tickers(test_ca: trustme.CA) -> None:
    client = ssl.create_default_context()
    test_ca.configure_trust(client)
    server = TlsCoinbase(server_context(test_ca))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        url = f"wss://127.0.0.1:{server.port}/"
        async with feed_at(url, ssl_context=client) as (status, slots):
            product = status.product("BTC-USD")
            await eventually(lambda: product.ticks == 1 and product.state == "live", GUARD_S)
            assert [w.last for w in windows(slots)] == [Decimal("65002")]
            assert status.connected and status.reconnects == 0
        nursery.cancel_scope.cancel()


async def test_wss_to_an_untrusted_certificate_is_refused_and_reported(
    test_ca: trustme.CA,
) -> None:
    # The production default: the system trust store, which does not know the test CA.
    server = TlsCoinbase(server_context(test_ca))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with feed_at(f"wss://127.0.0.1:{server.port}/") as (status, _):
            await eventually(lambda: status.reconnects >= 2, GUARD_S)
            assert server.subscribes == 0
            assert status.last_error is not None
            assert "CERTIFICATE_VERIFY_FAILED" in status.last_error
            snapshot = status.snapshot()["products"]["BTC-USD"]
            assert snapshot["state"] == "connecting"
            assert snapshot["lastError"] == status.last_error
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------- why it is not live
async def closed_port() -> int:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port: int = listener.getsockname()[1]
    listener.close()  # bound then closed: nothing listens there now
    return port


async def test_a_refused_connection_is_shown_per_product_in_the_snapshot() -> None:
    port = await closed_port()
    async with feed_at(f"ws://127.0.0.1:{port}/") as (status, _):
        await eventually(lambda: status.reconnects >= 2, GUARD_S)
        snapshot = status.snapshot()
        assert snapshot["lastError"] == f"127.0.0.1:{port}: Connection refused"
        product = snapshot["products"]["BTC-USD"]
        assert product["state"] == "connecting"
        assert product["lastError"] == f"127.0.0.1:{port}: Connection refused"


async def test_a_dns_failure_is_shown_with_the_resolver_s_words() -> None:
    # .invalid never resolves (RFC 2606); the resolver's answer is the cause shown.
    async with feed_at("ws://no-such-host.invalid/", connect_timeout_s=5.0) as (status, _):
        await eventually(lambda: status.last_error is not None, GUARD_S)
        error = status.last_error
        assert error is not None and error.startswith("no-such-host.invalid: ")
        cause = error.removeprefix("no-such-host.invalid: ")
        # Which words depends on the resolver (offline: a temporary failure).
        assert cause in (
            "Name or service not known",
            "Temporary failure in name resolution",
            "No address associated with hostname",
        ) or cause.startswith("connect timed out")
        assert status.snapshot()["products"]["BTC-USD"]["lastError"] == error


# --------------------------------------------------------------------- the connection itself
async def test_an_error_inside_the_connection_block_comes_out_as_itself() -> None:
    server = RawServer(b"")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        settings = ConnectionSettings(f"ws://127.0.0.1:{server.port}/")
        cause = ValueError("underneath")
        with pytest.raises(KeyError) as caught:
            async with open_connection(settings) as connection:
                await connection.send(json.dumps({"type": "subscribe", "channels": []}))
                assert json.loads(await connection.receive())["type"] == "subscriptions"
                raise KeyError("inside") from cause
        # Not wrapped in the reader's nursery group, its cause kept.
        assert caught.value.__cause__ is cause
        await eventually(lambda: server.ended_by_client == [1], GUARD_S)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------- the status channel
class NoStatusCoinbase:
    """A Coinbase without the ``status`` channel: refuses its subscribe the way Coinbase
    refuses one (an ``error``, the socket stays open), serves the ticker normally."""

    def __init__(self) -> None:
        self.port = 0
        self.refused = 0

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, self.handle, "127.0.0.1", 0, None)
            self.port = server.port
            task_status.started()

    async def handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                message = json.loads(await ws.get_message())
                if message["channels"] == ["status"]:
                    self.refused += 1
                    error = {
                        "type": "error",
                        "message": "Failed to subscribe",
                        "reason": "status is not a valid channel",
                    }
                    await ws.send_message(json.dumps(error))
                else:
                    await ws.send_message(ACK.decode())
                    await ws.send_message(ticker("65003", 40).decode())
        except ConnectionClosed:
            pass


async def test_a_refused_status_channel_is_reported_and_the_products_still_subscribe() -> None:
    server = NoStatusCoinbase()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        url = f"ws://127.0.0.1:{server.port}/"
        async with feed_at(url, status_channel=True) as (status, slots):
            product = status.product("BTC-USD")
            await eventually(lambda: product.ticks == 1 and product.state == "live", GUARD_S)
            assert status.status_channel == "refused: status is not a valid channel"
            assert status.snapshot()["status_channel"] == status.status_channel
            assert [w.last for w in windows(slots)] == [Decimal("65003")]
            assert server.refused == 1 and status.reconnects == 0 and status.errors == 0
        nursery.cancel_scope.cancel()
