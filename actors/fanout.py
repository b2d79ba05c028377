"""The fanout actor: each committed event to every live WebSocket session of its user.

Persistence sends committed ``Event`` values here in commit order; the ``/ws`` endpoint sends
``Join``/``Leave`` for its sessions. Fanout never awaits a socket: it appends the event's text
to each of the user's ``SessionQueue`` queues, which are bounded by bytes (DESIGN.md invariant 8).
A session whose queue would overflow is closed with 1013 ("slow consumer") and dropped, and
nobody else waits for it. When fanout stops, every session it had is closed (1012 when it
crashed and will be restarted, 1001 when the process is shutting down), so that clients
reconnect and resync instead of silently missing events.
"""

from __future__ import annotations

import logging

import attrs
import trio

from tickguard.actors import faults as fault_points
from tickguard.actors.faults import FaultPoints
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import Event, Join, Leave
from tickguard.actors.session_queue import SessionQueue
from tickguard.wire import GOING_AWAY, SERVICE_RESTART, TRY_AGAIN_LATER

log = logging.getLogger("tickguard.fanout")


# Large enough for a stop cascade of 10,000 positions (about 600 bytes per event).
DEFAULT_QUEUE_BYTES = 16 * 1024 * 1024


@attrs.define
class FanoutStats:
    """Counters the metrics endpoint reads; only fanout writes them."""

    sessions: int = 0
    events: int = 0
    delivered: int = 0
    dropped_slow: int = 0
    duplicates: int = 0  # republished events already delivered, dropped


@attrs.frozen
class FanoutConfig:
    """``queue_bytes`` bounds each session's queue (UTF-8 bytes of queued messages)."""

    queue_bytes: int = DEFAULT_QUEUE_BYTES
    stats: FanoutStats = attrs.field(factory=FanoutStats)


async def run(
    inbox: Mailbox[Event | Join | Leave],
    *,
    config: FanoutConfig,
    faults: FaultPoints | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the fanout actor until cancelled.

    Receives committed ``Event`` values (in commit order), ``Join`` and ``Leave``. Sends each
    event's ``message`` to the queues of that user's sessions only. Never awaits a session's
    socket, and never replies to anyone. On exit, closes every session it had.
    """
    stats = config.stats
    by_user: dict[str, set[SessionQueue]] = {}
    # The last seq handed out per user: persistence republishes its outbox after a crash or a
    # lost commit acknowledgement, and an event already delivered must not be sent twice.
    delivered: dict[str, int] = {}
    task_status.started()
    close_code, close_reason = SERVICE_RESTART, "realtime gateway restarting"

    try:
        while True:
            # One schedule point per message (``receive``): each session's sender runs between
            # two events, so a reading client keeps up with a burst however small its queue.
            # Taking runs of queued messages without one (tried for cascades, issue 16) let a
            # burst overflow a small queue of a client that was reading.
            message = await inbox.receive()
            if isinstance(message, Event):
                await fault_points.hit(faults, "fanout.before_deliver")
                if message.seq <= delivered.get(message.user_id, 0):
                    stats.duplicates += 1
                    continue
                delivered[message.user_id] = message.seq
                _deliver(by_user, message, config)
            elif isinstance(message, Join):
                if message.queue.closed is None:
                    group = by_user.setdefault(message.queue.user_id, set())
                    if message.queue not in group:
                        group.add(message.queue)
                        stats.sessions += 1
            elif isinstance(message, Leave):
                _remove(by_user, message.queue, stats)
            else:
                log.warning("fanout ignored an unexpected message: %r", message)
    except trio.Cancelled:
        close_code, close_reason = GOING_AWAY, "server shutting down"
        raise
    finally:
        # Sessions joined to this run would otherwise wait forever for events it will not send.
        for group in by_user.values():
            for session in group:
                session.close(close_code, close_reason)
        stats.sessions = 0


def _deliver(by_user: dict[str, set[SessionQueue]], event: Event, config: FanoutConfig) -> None:
    stats = config.stats
    stats.events += 1
    group = by_user.get(event.user_id)
    if not group:
        return
    message = event.message
    size = len(message) if message.isascii() else len(message.encode())  # isascii is O(1)
    for session in list(group):
        if session.closed is not None:
            # Ended without a Leave reaching us (yet): nothing to deliver to.
            _remove(by_user, session, stats)
        elif session.queued_bytes + size > config.queue_bytes:
            session.close(TRY_AGAIN_LATER, "slow consumer")
            _remove(by_user, session, stats)
            stats.dropped_slow += 1
            log.info("closed a slow WebSocket session of user %r (queue full)", event.user_id)
        else:
            session.push(event.seq, event.message, size)
            stats.delivered += 1


def _remove(
    by_user: dict[str, set[SessionQueue]], session: SessionQueue, stats: FanoutStats
) -> None:
    group = by_user.get(session.user_id)
    if group is None or session not in group:
        return
    group.discard(session)
    stats.sessions -= 1
    if not group:
        del by_user[session.user_id]
