"""One WebSocket connection to the market-data server, over trio-websocket (wsproto).

Thin on purpose: the protocol (handshake, framing, fragments, masking, ping/pong, close) is
trio-websocket's. What this module adds is what the feed needs around it: the TCP and TLS
set-up done here, so that a DNS, refused-connection or certificate failure is reported as
itself; one exception, ``FeedConnectionError``, for every way a connection fails or ends; and
a close that never waits longer than ``close_timeout_s`` on a peer that stopped answering.

A server that breaks the protocol (unknown opcode, RSV bits, a stray continuation, a data
frame inside a fragmented message, a message over ``max_message_size``) ends this connection
with ``FeedConnectionError(protocol_error=True)``; the bad message is never delivered.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

# Coinbase's status channel sends every product and currency in one message (hundreds of KB
# and growing); 4 MiB leaves room for it while still bounding one message.
MAX_MESSAGE_SIZE = 4 << 20
# Messages parsed ahead of the feed: more lets the reader task turn a whole read into
# messages without a task switch per message; the bound keeps memory bounded (at most this
# many messages of at most MAX_MESSAGE_SIZE each).
MESSAGE_QUEUE_SIZE = 64
RECEIVE_BUFFER_SIZE = 64 * 1024
# Close codes (RFC 6455 7.4.1) that mean one side broke the protocol.
_PROTOCOL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1009})


class FeedConnectionError(Exception):
    """The connection could not be opened, or it ended. ``str()`` says why in words a reader
    of /ready understands; ``protocol_error`` is True when the server broke the WebSocket
    protocol (and the connection was ended for it)."""

    def __init__(self, message: str, *, protocol_error: bool = False) -> None:
        super().__init__(message)
        self.protocol_error = protocol_error


@attrs.frozen
class ConnectionSettings:
    """How to reach the server. ``ssl_context`` None means the system trust store for wss."""

    url: str
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, eq=False)
    connect_timeout_s: float = 10.0
    close_timeout_s: float = 1.0
    max_message_size: int = MAX_MESSAGE_SIZE


class FeedConnection:
    """An open connection: ``receive`` messages, ``send`` text. Made by ``open_connection``."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws

    async def receive(self) -> str | bytes:
        """Wait for the next complete message; raises ``FeedConnectionError`` once the
        connection ended (closed by the server, dropped, or a protocol violation)."""
        try:
            return await self._ws.get_message()
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def send(self, text: str) -> None:
        """Send one text message (waits while the socket's buffer is full); raises
        ``FeedConnectionError`` when the connection is gone."""
        try:
            await self._ws.send_message(text)
        except ConnectionClosed as exc:
            raise _closed(exc) from None


def _closed(exc: ConnectionClosed) -> FeedConnectionError:
    reason = exc.reason
    if reason is None:
        return FeedConnectionError("connection closed")
    words = f"connection closed: {reason.code} {reason.name}"
    if reason.reason:
        words += f" ({reason.reason})"
    return FeedConnectionError(words, protocol_error=reason.code in _PROTOCOL_CLOSE_CODES)


def describe(exc: BaseException) -> str:
    """A one-line cause for a failed connect: DNS, refused, TLS, timeout, HTTP rejection."""
    if isinstance(exc, FeedConnectionError):
        return str(exc)
    if isinstance(exc, ConnectionRejected):
        return f"handshake refused: HTTP {exc.status_code}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, ssl.SSLError):
        return describe(exc.__cause__)
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)  # "Name or service not known"
    if isinstance(exc, OSError):
        group = exc.__cause__
        if isinstance(group, BaseExceptionGroup):
            # trio tried each address ("all attempts ... failed"); the causes say why.
            return "; ".join(dict.fromkeys(describe(inner) for inner in group.exceptions))
        if exc.errno is not None and exc.errno > 0:
            return os.strerror(exc.errno)  # "Connection refused", without trio's prefix
        return str(exc) or type(exc).__name__
    return repr(exc)


async def _open_stream(settings: ConnectionSettings) -> tuple[trio.abc.Stream, str, str]:
    """TCP (and TLS, handshake included) to the URL's host; returns (stream, Host header,
    resource)."""
    parts = urlsplit(settings.url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise FeedConnectionError(f"not a ws:// or wss:// URL: {settings.url}")
    secure = parts.scheme == "wss"
    host = parts.hostname
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = host if parts.port is None else f"{host}:{port}"
    tcp = await trio.open_tcp_stream(host, port)
    if not secure:
        return tcp, host_header, resource
    context = settings.ssl_context or ssl.create_default_context()
    tls = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
    try:
        # Now, so that a certificate failure is reported as such (not as a closed socket).
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tls)
        cause = exc.__cause__
        why = describe(cause) if cause is not None else "TLS failed"
        raise FeedConnectionError(f"{_where(settings.url)}: {why}") from exc
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls, host_header, resource


def _where(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


@asynccontextmanager
async def open_connection(settings: ConnectionSettings) -> AsyncIterator[FeedConnection]:
    """Connect and do the opening handshake (within ``connect_timeout_s``), yield the
    connection, close it on the way out (politely within ``close_timeout_s``, then at TCP).

    Raises ``FeedConnectionError`` when it cannot connect (the message names the cause).
    Errors inside the block propagate unchanged.
    """
    try:
        with trio.fail_after(settings.connect_timeout_s):
            stream, host_header, resource = await _open_stream(settings)
    except trio.TooSlowError:
        raise FeedConnectionError(
            f"{_where(settings.url)}: connect timed out after {settings.connect_timeout_s} s"
        ) from None
    except OSError as exc:
        raise FeedConnectionError(f"{_where(settings.url)}: {describe(exc)}") from exc
    error: BaseException | None = None
    try:
        # The reader task lives in this nursery: cancelling it on the way out means a peer
        # that never closes cannot keep us here (trio-websocket's own context manager waits
        # for its reader after a protocol error).
        async with trio.open_nursery() as nursery:
            ws = await _handshake(nursery, stream, host_header, resource, settings)
            try:
                yield FeedConnection(ws)
            finally:
                with trio.move_on_after(settings.close_timeout_s) as scope:
                    scope.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        error = _single(group)
    finally:
        await trio.aclose_forcefully(stream)
    if error is not None:
        # Raised outside the handler: the block's own exception comes out as it went in
        # (its cause and context untouched, not chained to the group).
        raise error


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception that matters in the nursery's group: the block's own error, or a
    handshake rejection from the reader task (as ``FeedConnectionError``); a Cancelled only
    when there is nothing else."""
    leaves: list[BaseException] = []

    def flatten(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                flatten(inner)
        else:
            leaves.append(exc)

    flatten(group)
    errors = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
    if not errors:
        return leaves[0] if len(leaves) == 1 else group
    if len(errors) > 1:
        return group
    (error,) = errors
    if isinstance(error, HandshakeError):
        return FeedConnectionError(describe(error))
    return error


async def _handshake(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    host_header: str,
    resource: str,
    settings: ConnectionSettings,
) -> WebSocketConnection:
    try:
        with trio.fail_after(settings.connect_timeout_s):
            # A rejection is raised by trio-websocket's reader task, into this nursery: it
            # cancels the wait here and leaves the nursery as a group.
            return await wrap_client_stream(
                nursery,
                stream,  # type: ignore[arg-type]  # any trio stream works; the hint is narrow
                host_header,
                resource,
                message_queue_size=MESSAGE_QUEUE_SIZE,
                max_message_size=settings.max_message_size,
                receive_buffer_size=RECEIVE_BUFFER_SIZE,
            )
    except trio.TooSlowError:
        raise FeedConnectionError("WebSocket handshake timed out") from None
    except HandshakeError as exc:
        raise FeedConnectionError(describe(exc)) from exc
