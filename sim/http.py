"""The simulator's HTTP side, parsed by h11: one connection's requests, answered by a handler,
and the hand-over of a WebSocket upgrade to the session code.

A request h11 cannot parse (``Content-Length: abc``, a broken request line, an oversized head)
is answered 400 (or what h11 suggests) and ends that connection only; the listener and every
other connection carry on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import attrs
import h11
import trio

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 65536
MAX_BODY_BYTES = 1024 * 1024
RECEIVE_BYTES = 65536


@attrs.frozen
class HttpRequest:
    """One parsed request: method, target (path and query), headers (lower-case), body."""

    method: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


@attrs.frozen
class HttpAnswer:
    """A JSON answer. ``truncate_at`` cuts the body after that many bytes and drops the
    connection (a page cut short mid-body, as a flaky network delivers it)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    truncate_at: int | None = None


Answerer = Callable[[HttpRequest], Awaitable[HttpAnswer]]
Upgrader = Callable[[trio.abc.Stream, h11.Request, bytes], Awaitable[None]]


def is_websocket_upgrade(request: h11.Request) -> bool:
    return any(
        name == b"upgrade" and value.lower() == b"websocket" for name, value in request.headers
    )


async def serve_connection(stream: trio.abc.Stream, answer: Answerer, upgrade: Upgrader) -> None:
    """Answer requests on ``stream`` (keep-alive) until the client closes, a request is bad,
    or a WebSocket upgrade arrives (then ``upgrade`` runs with the request and the bytes that
    followed it, and owns the stream). Returns when the connection is done; never raises for
    what the client sent or for a broken socket."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    while True:
        try:
            event = await _next_event(conn, stream)
            if isinstance(event, h11.ConnectionClosed) or event is None:
                return
            assert isinstance(event, h11.Request)
            if is_websocket_upgrade(event):
                await upgrade(stream, event, conn.trailing_data[0])
                return
            body = await _read_body(conn, stream, event)
        except h11.RemoteProtocolError as exc:
            await _refuse(conn, stream, exc.error_status_hint, str(exc))
            return
        except _TooLarge:
            await _refuse(conn, stream, 413, f"body over {MAX_BODY_BYTES} bytes")
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        request = HttpRequest(
            event.method.decode("ascii", "replace"),
            event.target.decode("ascii", "replace"),
            tuple((bytes(k), bytes(v)) for k, v in event.headers),
            body,
        )
        reply = await answer(request)
        try:
            if not await _send(conn, stream, reply):
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


class _TooLarge(Exception):
    """The request's body is larger than the simulator takes."""


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event | None:
    """The next h11 event, reading from ``stream`` as needed; None on a paused connection."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))
            continue
        if event is h11.PAUSED:
            return None
        assert not isinstance(event, type)
        return event


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream, request: h11.Request) -> bytes:
    body = bytearray()
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:  # the client closed mid-body
            raise trio.BrokenResourceError(f"connection ended inside {request.target!r}")


def _response_headers(reply: HttpAnswer, *, close: bool) -> list[tuple[str, str]]:
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(reply.body))),
        *reply.headers,
    ]
    if close:
        headers.append(("connection", "close"))
    return headers


async def _send(conn: h11.Connection, stream: trio.abc.Stream, reply: HttpAnswer) -> bool:
    """Write ``reply``; False when the connection must end (a truncated body)."""
    reason = HTTPStatus(reply.status).phrase.encode()
    close = reply.truncate_at is not None
    head = h11.Response(
        status_code=reply.status,
        headers=_response_headers(reply, close=close),
        reason=reason,
    )
    if reply.truncate_at is not None:
        # Byte-level fault: the declared length is never delivered; the socket just ends.
        await stream.send_all(conn.send(head) + reply.body[: reply.truncate_at])
        return False
    await stream.send_all(
        conn.send(head) + conn.send(h11.Data(data=reply.body)) + conn.send(h11.EndOfMessage())
    )
    return True


async def _refuse(conn: h11.Connection, stream: trio.abc.Stream, status: int, why: str) -> None:
    """Answer a request that could not be read, then let the connection end."""
    log.info("simulator: bad HTTP request answered %d: %s", status, why)
    body = json.dumps({"ok": False, "message": why}).encode()
    try:
        await _send(conn, stream, HttpAnswer(status, body, (("connection", "close"),)))
    except h11.LocalProtocolError:
        pass  # h11 cannot answer in this state (e.g. mid-response): just close
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
