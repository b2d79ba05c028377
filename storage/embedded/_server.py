"""One embedded PostgreSQL server on a data directory: made on first use, recovered after a
kill, started, restarted after it died, stopped.

Everything here blocks (subprocesses, polling a file): call it before ``trio.run`` or through
``trio.to_thread.run_sync``; only ``wait_exited`` is a Trio call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from tickguard.storage.embedded import _files as files
from tickguard.storage.embedded._accounts import (
    as_account,
    give_tree,
    grant_search,
    open_bundle_to,
    server_account,
)
from tickguard.storage.embedded._bundle import SERVER_ENV, bin_dir, server_major_version
from tickguard.storage.embedded._errors import (
    DataVersionMismatch,
    EmbeddedDatabaseError,
    describe_exit,
)
from tickguard.storage.embedded._processes import (
    POLL_SECONDS,
    end_orphans,
    is_postgres_in,
    shut_down,
    wait_exited,
    wait_gone_callback,
)

log = logging.getLogger("tickguard.storage.embedded")

SUPERUSER = "postgres"
DATABASE = "postgres"


class EmbeddedPostgres:
    """One embedded PostgreSQL server on ``data_dir``, owned by this object between ``start``
    and ``stop``.

    ``start`` initialises the cluster on first use, recovers from a previous owner or server
    that was killed, and returns a DSN for asyncpg or psql. ``restart`` brings the server back
    after it died while owned (crash recovery on the same directory, same DSN). ``stop`` shuts
    it down (fast mode: sessions end, committed data is kept). Two owners of one ``data_dir``
    at once are refused. It never deletes data: a directory it cannot use is an error, not a
    reset.
    """

    def __init__(
        self, data_dir: Path, *, start_timeout: float = 120.0, stop_timeout: float = 30.0
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.pgdata = self.data_dir / "pgdata"
        self.log_file = self.data_dir / "postgres.log"
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._lock = files.DirectoryLock(self.data_dir)
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None
        self._account: pwd.struct_passwd | None = None

    @property
    def dsn(self) -> str:
        """The connection URL of the running server (unix socket, trust authentication)."""
        if self._socket_dir is None or self._process is None:
            raise EmbeddedDatabaseError("the embedded PostgreSQL is not running")
        return f"postgresql://{SUPERUSER}@/{DATABASE}?host={quote(str(self._socket_dir))}"

    @property
    def pid(self) -> int | None:
        """The server's process id while this object runs it (also once it died, until
        ``restart`` or ``stop``)."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        """Whether the server this object started is still alive (reaps it if it exited)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> str:
        """Start the server and return its DSN once it accepts connections.

        Raises ``DataVersionMismatch`` when the cluster is from another major version and
        ``EmbeddedDatabaseError`` for everything else that stops it (directory in use by
        another process, server failed to start: the message ends with its log).
        """
        if self._lock.held:
            raise EmbeddedDatabaseError("the embedded PostgreSQL is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            account = self._account = server_account()
            if account is not None:
                grant_search(self.data_dir, account)
                open_bundle_to(account)
            version = server_major_version()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb(account)
            data_version = (self.pgdata / "PG_VERSION").read_text().strip()
            if data_version != version:
                raise DataVersionMismatch(self.pgdata, data_version, version)
            self._check_owner(account)
            socket_dir = files.prepare_socket_dir(self.pgdata, account)
            if (self.pgdata / "postmaster.pid").exists():
                self._recover(socket_dir)
            files.rotate_log(self.log_file)
            self._launch(socket_dir, account)
        except BaseException:
            self._lock.release()
            raise
        return self.dsn

    def restart(self) -> str:
        """Start the server again after it died while this object owned it; returns the DSN,
        the same as before, so a connection pool reconnects by itself.

        Reaps the dead server, ends the backends it left, removes its stale lock files and
        launches it on the same directory: PostgreSQL replays its WAL (crash recovery), so
        nothing committed is lost. The directory stays ours throughout. The server's log goes
        on in the same file, after the dead server's last lines. Raises
        ``EmbeddedDatabaseError`` when it was never started, still runs, or fails to start.
        """
        if not self._lock.held or self._socket_dir is None:
            raise EmbeddedDatabaseError("the embedded PostgreSQL was not started")
        if self.running:
            raise EmbeddedDatabaseError("the embedded PostgreSQL is still running")
        self._process = None
        if (self.pgdata / "postmaster.pid").exists():
            self._recover(self._socket_dir)
        else:  # stopped by someone else (pg_ctl stop): it cleaned up, its backends too
            end_orphans(self.pgdata, self._stop_timeout)
        self._launch(self._socket_dir, self._account)
        return self.dsn

    async def wait_exited(self) -> int:
        """Wait until the server exits (it should not: it was killed, crashed or stopped by
        someone else), reap it and return its exit status (``Popen.returncode``: negative
        for the signal that ended it). Raises ``EmbeddedDatabaseError`` when not running."""
        process = self._process
        if process is None:
            raise EmbeddedDatabaseError("the embedded PostgreSQL is not running")
        return await wait_exited(process)

    def stop(self) -> None:
        """Shut the server down and release the data directory; does nothing if not running.

        Fast shutdown first; a server still up after ``stop_timeout`` gets an immediate
        shutdown (crash recovery on next start, no committed data lost), then SIGKILL.
        """
        try:
            self._stop_process()
        finally:
            self._socket_dir = None
            self._lock.release()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the cluster ----------------------------------------------------------------------

    def _initdb(self, account: pwd.struct_passwd | None) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            # A cluster itself (e.g. made by pgserver directly): never nest a second one in it.
            raise EmbeddedDatabaseError(
                f"{self.data_dir} is itself a PostgreSQL data directory; tickguard keeps its "
                f"cluster in {self.pgdata.name}/ below TICKGUARD_DATA_DIR: move it to "
                f"{self.pgdata} or choose another TICKGUARD_DATA_DIR"
            )
        if self.pgdata.exists():
            raise EmbeddedDatabaseError(
                f"{self.pgdata} exists but holds no PostgreSQL cluster (no PG_VERSION); "
                f"move it away or choose another TICKGUARD_DATA_DIR"
            )
        # initdb into a staging directory and rename: a start killed half-way through leaves
        # no half-made cluster under the real name, only a staging directory we redo.
        staging = self.data_dir / "pgdata.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        if account is not None:
            os.chown(staging, account.pw_uid, account.pw_gid)
        log.info("creating the embedded PostgreSQL cluster in %s", self.pgdata)
        result = subprocess.run(
            [
                str(bin_dir() / "initdb"),
                "--pgdata",
                str(staging),
                "--username",
                SUPERUSER,
                "--encoding",
                "UTF8",
                # C collation: ordering that does not change with the host's locale or libc.
                "--no-locale",
                "--auth-local",
                "trust",
                # The superuser has no password, so even a TCP listener would let nobody in.
                "--auth-host",
                "scram-sha-256",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            env=SERVER_ENV,
            cwd=staging,
            **as_account(account),
        )
        if result.returncode != 0:
            raise EmbeddedDatabaseError(
                f"initdb failed with status {result.returncode}:\n{result.stderr.strip()}"
            )
        staging.rename(self.pgdata)

    def _check_owner(self, account: pwd.struct_passwd | None) -> None:
        owner = self.pgdata.stat().st_uid
        if account is None:
            if owner != os.geteuid():
                raise EmbeddedDatabaseError(
                    f"{self.pgdata} belongs to uid {owner}, not to this user (uid "
                    f"{os.geteuid()}); run tickguard as its owner or as root"
                )
            return
        if owner != account.pw_uid:
            # Root may hand a cluster made by another user to the server's user.
            give_tree(self.pgdata, account)

    # -- recovery and the server process --------------------------------------------------

    def _recover(self, socket_dir: Path) -> None:
        """A postmaster.pid exists although we hold the lock: its owner died without stopping
        the server, or the server itself was killed. Stop that server if it still runs, end
        backends a killed server left behind, and remove the lock files it left, so that a
        fresh server can start."""
        pid = files.postmaster_pid(self.pgdata)
        if pid is not None and is_postgres_in(pid, self.pgdata):
            log.warning("stopping the embedded PostgreSQL (pid %d) left by a killed owner", pid)
            shut_down(pid, self._stop_timeout, wait=wait_gone_callback(pid))
        else:
            log.warning("removing stale lock files of a killed PostgreSQL (pid %s)", pid)
        end_orphans(self.pgdata, self._stop_timeout)
        files.remove_lock_files(self.pgdata, socket_dir)

    def _launch(self, socket_dir: Path, account: pwd.struct_passwd | None) -> None:
        # The server writes through the inherited descriptor, so root keeps owning the file.
        with open(self.log_file, "ab") as log_out:
            # Popen with user=/group= still forks us first: even as root the server is our
            # child, so we can wait for it (and must reap it).
            process = subprocess.Popen(
                [
                    str(bin_dir() / "postgres"),
                    "-D",
                    str(self.pgdata),
                    "-c",
                    "listen_addresses=",
                    "-c",
                    f"unix_socket_directories={socket_dir}",
                    "-c",
                    "unix_socket_permissions=0700",
                    "-c",
                    f"port={files.PORT}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for tickguard must not stop the database
                # before tickguard has drained its writes into it.
                start_new_session=True,
                env=SERVER_ENV,
                cwd=self.pgdata,
                **as_account(account),
            )
        self._process = process
        self._socket_dir = socket_dir
        try:
            self._wait_ready(process)
        except BaseException:
            self._stop_process()
            raise

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            shut_down(process.pid, self._stop_timeout, wait=process.wait)

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self._start_timeout
        while True:
            status = process.poll()
            if status is not None:
                raise EmbeddedDatabaseError(
                    f"the embedded PostgreSQL {describe_exit(status)} while starting; "
                    f"the end of {self.log_file}:\n{files.tail(self.log_file)}"
                )
            if files.is_ready(self.pgdata, process.pid):
                return
            if time.monotonic() > deadline:
                raise EmbeddedDatabaseError(
                    f"PostgreSQL did not become ready within {self._start_timeout} s; "
                    f"the end of {self.log_file}:\n{files.tail(self.log_file)}"
                )
            time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def embedded_postgres(data_dir: Path, **options: Any) -> Iterator[str]:
    """Run the embedded PostgreSQL on ``data_dir`` for the block; yields its DSN."""
    server = EmbeddedPostgres(data_dir, **options)
    with server as dsn:
        yield dsn
