"""What can go wrong with the embedded PostgreSQL, as exceptions a user can act on."""

from __future__ import annotations

import signal
from pathlib import Path


class EmbeddedDatabaseError(RuntimeError):
    """The embedded PostgreSQL could not be started or stopped; the message says why."""


class DataVersionMismatch(EmbeddedDatabaseError):
    """The data directory was created by another PostgreSQL major version than the bundled one."""

    def __init__(self, pgdata: Path, data_version: str, server_version: str) -> None:
        super().__init__(
            f"The embedded database in {pgdata} was created by PostgreSQL {data_version}, but "
            f"this tickguard bundles PostgreSQL {server_version}, which cannot open it. "
            f"Run `tickguard db dump` with the tickguard release that created it, then "
            f"`tickguard db restore` with this one into an empty TICKGUARD_DATA_DIR "
            f"(or set DATABASE_URL to a PostgreSQL {data_version} server)."
        )
        self.pgdata = pgdata
        self.data_version = data_version
        self.server_version = server_version


class EmbeddedServerDied(EmbeddedDatabaseError):
    """The embedded server exited while it should have been running (killed, crashed, or
    stopped by someone else); ``status`` is its exit status as ``Popen.returncode`` says it
    (negative: the signal that ended it)."""

    def __init__(self, pid: int, status: int, log_file: Path) -> None:
        super().__init__(
            f"the embedded PostgreSQL (pid {pid}) {describe_exit(status)}; its log: {log_file}"
        )
        self.pid = pid
        self.status = status
        self.log_file = log_file


def describe_exit(status: int) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL`` for a ``Popen.returncode``."""
    if status >= 0:
        return f"exited with status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    return f"was killed by {name}"
