"""The notifier: in a split deployment (issue 17), what fanout is in one process.

A writer process (api or engine role) has no WebSocket sessions: its persistence actor hands
committed events here, and the notifier wakes the other processes through Redis
(``Bus.wake("events")``). The wake-up carries nothing: gateways and engines read the events
from the event log (``storage.tail``), so a wake-up lost while Redis is away costs only the
readers' poll interval, never an event. Several events queued meanwhile are one wake-up.
"""

from __future__ import annotations

from typing import Protocol

import trio

from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import FanoutMessage

EVENTS_TOPIC = "events"


class Waker(Protocol):
    async def wake(self, topic: str) -> None: ...


async def run(
    inbox: Mailbox[FanoutMessage],
    bus: Waker,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Wake ``EVENTS_TOPIC`` once per burst of committed events; never blocks persistence
    (its mailbox is unbounded) and never fails on a Redis outage (``Bus.wake`` does not)."""
    task_status.started()
    while True:
        await inbox.receive()
        while True:  # what queued meanwhile is covered by the same wake-up
            try:
                inbox.receive_nowait()
            except trio.WouldBlock:
                break
        await bus.wake(EVENTS_TOPIC)
