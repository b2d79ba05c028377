"""The ``/ws`` endpoint: one user's committed events, pushed as they commit.

A session joins fanout, then reads the user's latest ``seq`` (through ``SeqReader``, which
batches the reads of every session connecting at the same time) and announces it in
``connection.ready``. Joining first means no event committed after that seq can be missed;
dropping queued events with ``seq <= N`` means none the client already has is sent twice.
The session then forwards what fanout queues for it and answers ``{"type": "ping"}`` with
``{"type": "pong"}``; every other client frame is ignored and counted.

With ``since=SEQ`` (issue 17, API.md "Event log, resume and audit") the session resumes: after
``connection.ready`` (which then also says ``"replayComplete"``) it first sends, from the event
log, every event of the user with ``SEQ < seq <= N`` still there, in order, a bounded page at a
time, then what fanout queued meanwhile (the queue drops ``seq <= N``): the session joined
fanout before N was read, so nothing after N is missed and nothing up to N is sent twice. The
replay is complete when every seq of ``(SEQ, N]`` is in the log; if retention prunes one while
a complete replay runs, the session closes with 1013 rather than skip it silently (the client
resumes from the last seq it got, and is then told the replay is incomplete).

Close codes: 1008 without a valid ``userId``, or with a ``since`` that is not an integer >= 0 or
is above the latest seq; 1009 for a frame over 64 KiB (hypercorn
enforces it, this checks again); 1013 when fanout dropped the session as a slow consumer;
1012 when fanout restarts; 1001 when the server shuts down; 1011 when the database cannot
give the starting seq (or the replay).
"""

from __future__ import annotations

import logging
import re
import time

import trio
from quart import Blueprint, Response, current_app, websocket
from quart_trio import QuartTrio

from tickguard.actors.messages import Join, Leave
from tickguard.actors.session_queue import SessionClosed, SessionQueue
from tickguard.storage import DatabaseUnavailable
from tickguard.storage.db import Reader
from tickguard.storage.eventlog import count_user_events, user_events_after
from tickguard.web.auth import WS_BEARER_PROTOCOL
from tickguard.web.errors import ApiError
from tickguard.web.identity import current_identity, offered_bearer_protocol
from tickguard.web.schemas import FieldError, parse_user_id
from tickguard.web.seq_reader import SEQ_READER, SeqReader
from tickguard.web.services import WsStats, services_of
from tickguard.wire import (
    GOING_AWAY,
    INTERNAL_ERROR,
    MESSAGE_TOO_BIG,
    POLICY_VIOLATION,
    TRY_AGAIN_LATER,
    dumps,
    loads,
)

log = logging.getLogger("tickguard.web.ws")

MAX_FRAME_BYTES = 64 * 1024
LIVE_SESSIONS = "tickguard.live_sessions"
_PONG = dumps({"type": "pong"}).decode()
# Events read from the log per query while a session replays (bounded memory per session).
REPLAY_PAGE = 500
_SINCE = re.compile(r"[0-9]{1,18}")  # within BIGINT; a longer number is above any seq anyway

ws = Blueprint("ws", __name__)


class LiveSessions:
    """The sessions this app is serving, so that shutdown can close each one with 1001."""

    def __init__(self) -> None:
        self._sessions: set[SessionQueue] = set()
        self.closing = False

    def add(self, session: SessionQueue) -> None:
        self._sessions.add(session)

    def discard(self, session: SessionQueue) -> None:
        self._sessions.discard(session)

    def __len__(self) -> int:
        return len(self._sessions)

    def close_all(self, code: int = GOING_AWAY, reason: str = "server shutting down") -> None:
        """Close every session (their tasks send the close frame) and refuse new ones."""
        self.closing = True
        for session in list(self._sessions):
            session.close(code, reason)


def live_sessions(app: QuartTrio) -> LiveSessions:
    sessions: LiveSessions = app.extensions[LIVE_SESSIONS]
    return sessions


def seq_reader(app: QuartTrio) -> SeqReader:
    reader: SeqReader = app.extensions[SEQ_READER]
    return reader


@ws.get("/ws")
async def not_upgraded() -> Response:
    """A plain HTTP request on the WebSocket path: say what it is instead of a vague 400."""
    raise ApiError(
        426,
        "/ws is a WebSocket endpoint: connect with a WebSocket upgrade.",
        headers={"Upgrade": "websocket", "Connection": "Upgrade"},
    )


@ws.websocket("/ws")
async def events() -> None:
    services = services_of(current_app)
    live = live_sessions(current_app)  # type: ignore[arg-type]
    stats = services.ws_stats
    identity = current_identity()  # set by the handshake check when authentication is on
    await websocket.accept(subprotocol=WS_BEARER_PROTOCOL if offered_bearer_protocol() else None)
    if identity is not None:
        user_id = identity.sub
    else:
        try:
            user_id = parse_user_id("userId", websocket.args.get("userId"))
        except FieldError:
            stats.rejected += 1
            await websocket.close(POLICY_VIOLATION, "userId query param is required")
            return
    since_raw = websocket.args.get("since")
    since: int | None = None
    if since_raw is not None:
        if not _SINCE.fullmatch(since_raw):
            stats.rejected += 1
            await websocket.close(POLICY_VIOLATION, "since must be an integer >= 0")
            return
        since = int(since_raw)
    if live.closing:
        await websocket.close(GOING_AWAY, "server shutting down")
        return
    stats.opened += 1
    session = SessionQueue(user_id)
    live.add(session)
    try:
        # Join before reading the seq: nothing committed after it can be missed.
        await services.fanout.send(Join(session))
        try:
            # Batched with every session connecting now: a burst needs no connection each.
            seq = await seq_reader(current_app).latest(user_id)  # type: ignore[arg-type]
        except DatabaseUnavailable as exc:
            log.warning("no starting seq for a WebSocket session: %s", exc)
            await websocket.close(INTERNAL_ERROR, "database unavailable")
            return
        session.skip_through(seq)
        ready: dict[str, object] = {
            "type": "connection.ready",
            "message": "realtime channel established",
            "seq": seq,
        }
        complete = True
        if since is not None:
            if since > seq:
                stats.rejected += 1
                await websocket.close(POLICY_VIOLATION, "since is above the latest seq")
                return
            try:
                found = await count_user_events(services.db, user_id, since, seq)
            except DatabaseUnavailable as exc:
                log.warning("no replay count for a WebSocket session: %s", exc)
                await websocket.close(INTERNAL_ERROR, "database unavailable")
                return
            complete = found == seq - since
            ready["replayComplete"] = complete
        await websocket.send(dumps(ready).decode())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_listen, session, services.ws_stats)
            if identity is not None:
                nursery.start_soon(_expire, session, identity.exp)
            if since is not None:
                await _replay(session, services.db, since, seq, complete)
            await _forward(session)
            nursery.cancel_scope.cancel()
    finally:
        # No awaits here: this also runs when the client vanished and the task is cancelled.
        live.discard(session)
        session.close(GOING_AWAY, "session ended")
        try:
            services.fanout.send_nowait(Leave(session))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # fanout also drops closed sessions by itself on their next event


async def _expire(session: SessionQueue, exp: float) -> None:
    """End the session with 1008 when its token expires (``exp``, Unix seconds): a session
    lives no longer than the credential that opened it; the client reconnects with a new one."""
    await trio.sleep(max(0.0, exp - time.time()))
    session.close(POLICY_VIOLATION, "token expired")


async def _replay(
    session: SessionQueue, db: Reader, since: int, through: int, complete: bool
) -> None:
    """Send the user's logged events with ``since < seq <= through``, in order, a page at a
    time, while fanout queues live ones (``seq > through``) behind them. Closes the session
    (1011) when the database fails, and (1013) when a replay announced complete meets a hole:
    retention pruned an event meanwhile."""
    after = since
    while after < through and session.closed is None:
        try:
            page = await user_events_after(
                db, session.user_id, after, through=through, limit=REPLAY_PAGE
            )
        except DatabaseUnavailable as exc:
            log.warning("replay of a WebSocket session failed: %s", exc)
            session.close(INTERNAL_ERROR, "database unavailable")
            return
        for event in page:
            if complete and event.seq != after + 1:
                session.close(TRY_AGAIN_LATER, "event log pruned during replay: resume")
                return
            if session.closed is not None:
                return
            await websocket.send(event.message)
            after = event.seq
        if len(page) < REPLAY_PAGE:
            if complete and after < through:
                session.close(TRY_AGAIN_LATER, "event log pruned during replay: resume")
            return


async def _forward(session: SessionQueue) -> None:
    """Send what fanout queued for this session until it is closed, then close the socket
    with the session's code."""
    send = websocket.send  # resolved once: ``websocket`` is a context-local proxy
    try:
        while True:
            await send(await session.next_message())
    except SessionClosed as closed:
        await websocket.close(closed.code, closed.reason)


async def _listen(session: SessionQueue, stats: WsStats) -> None:
    """Answer client pings; count and ignore every other frame; 1009 for an oversized one."""
    while True:
        frame = await websocket.receive()
        size = len(frame.encode() if isinstance(frame, str) else frame)
        if size > MAX_FRAME_BYTES:
            stats.too_big += 1
            session.close(MESSAGE_TOO_BIG, "frame too big")
            return
        if _is_ping(frame):
            await websocket.send(_PONG)
        else:
            stats.ignored_frames += 1


def _is_ping(frame: str | bytes) -> bool:
    try:
        message = loads(frame)
    except (ValueError, RecursionError):
        return False
    return isinstance(message, dict) and message.get("type") == "ping"
