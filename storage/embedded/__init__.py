"""The embedded PostgreSQL: a real server from the ``pgserver`` wheel, run in the data directory.

Used when ``DATABASE_URL`` is unset, so that tickguard works on a fresh machine. We call the
bundled binaries (``initdb``, ``postgres``) directly rather than pgserver's Python API, because
start-up has to survive what that API does not: a previous owner killed with ``kill -9`` (its
server still running), a server killed itself (stale ``postmaster.pid`` and socket lock files),
root (PostgreSQL refuses to run as root), and a data directory from another PostgreSQL major.
While tickguard runs, the server is a supervised child (``watch_server``): if it dies it is
restarted on the same directory.

The server listens on a unix socket only (no TCP), in a directory only its user can enter,
so trust authentication for local connections lets in nobody but that user and root.

Modules, one concept each: ``_server`` (the server's life: make, recover, start, restart,
stop), ``_supervised`` (the child that watches it), ``_files`` (the directory lock, the socket
directory, what a killed server leaves), ``_processes`` (finding, ending and waiting for
server processes), ``_accounts`` (root: the server's own account), ``_bundle`` (the bundled
programs), ``_errors``.
"""

from tickguard.storage.embedded._accounts import SERVER_USER
from tickguard.storage.embedded._bundle import bin_dir, server_major_version
from tickguard.storage.embedded._errors import (
    DataVersionMismatch,
    EmbeddedDatabaseError,
    EmbeddedServerDied,
)
from tickguard.storage.embedded._server import (
    DATABASE,
    SUPERUSER,
    EmbeddedPostgres,
    embedded_postgres,
)
from tickguard.storage.embedded._supervised import watch_server

__all__ = [
    "DATABASE",
    "SERVER_USER",
    "SUPERUSER",
    "DataVersionMismatch",
    "EmbeddedDatabaseError",
    "EmbeddedPostgres",
    "EmbeddedServerDied",
    "bin_dir",
    "embedded_postgres",
    "server_major_version",
    "watch_server",
]
