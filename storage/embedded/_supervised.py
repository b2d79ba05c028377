"""The embedded server as a supervised child: it watches the server it was given and, run
again after the server died, brings it back.

It follows the actors' child contract (``task_status.started()`` once ready; a crash is an
exception the supervisor restarts it for) without importing the actors: the supervision tree
(``tickguard.supervisor``) decides the restart policy and where the child sits.
"""

from __future__ import annotations

import logging

import trio

from tickguard.storage.embedded._errors import EmbeddedServerDied
from tickguard.storage.embedded._server import EmbeddedPostgres

log = logging.getLogger("tickguard.storage.embedded")


async def watch_server(
    server: EmbeddedPostgres, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Keep ``server`` (started by the caller, who also stops it) under watch.

    If the server is not running (this run follows its death), restart it first: crash
    recovery on the same data directory, the same DSN. Reports started once it accepts
    connections, then waits for its exit on the process itself (no polling of the database,
    no log line while it runs). Never returns: raises ``EmbeddedServerDied`` when the server
    exits, ``EmbeddedDatabaseError`` when it cannot be restarted; cancel it to stop watching
    (the server keeps running).
    """
    if not server.running:
        # Blocking (a subprocess, crash recovery) and short: not abandoned on cancel, so a
        # server being started is never left running behind our back.
        await trio.to_thread.run_sync(server.restart)
        log.warning("the embedded PostgreSQL is back (pid %s)", server.pid)
    pid = server.pid
    task_status.started()
    status = await server.wait_exited()
    raise EmbeddedServerDied(pid or 0, status, server.log_file)
