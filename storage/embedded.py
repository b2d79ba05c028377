"""The embedded PostgreSQL: a real server from the ``pgserver`` wheel, run in the data directory.

Used when ``DATABASE_URL`` is unset, so that tickguard works on a fresh machine. We call the
bundled binaries (``initdb``, ``postgres``) directly rather than pgserver's Python API, because
start-up has to survive what that API does not: a previous owner killed with ``kill -9`` (its
server still running), a server killed itself (stale ``postmaster.pid`` and socket lock files),
root (PostgreSQL refuses to run as root), and a data directory from another PostgreSQL major.

Layout of ``data_dir``::

    tickguard-embedded.lock   held (flock) by the process that owns the server
    pgdata/                   the cluster; PG_VERSION (written by initdb) records its major
    postgres.log              this run's server log (postgres.log.1: the previous run's)

The server listens on a unix socket only (no TCP), in a directory only its user can enter,
so trust authentication for local connections lets in nobody but that user and root.

Everything here blocks (subprocesses, polling a file): call it before ``trio.run`` or through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psutil

log = logging.getLogger(__name__)

# As root, PostgreSQL runs as this unprivileged user; the same name pgserver itself uses, so a
# machine that ran pgserver before needs no second account.
SERVER_USER = "pgserver"
SUPERUSER = "postgres"
DATABASE = "postgres"

_PORT = 5432
_SOCKET_NAME = f".s.PGSQL.{_PORT}"
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# unix_socket_directories is a comma-separated, quotable list: keep socket paths to plain
# characters and fall back to a short hashed directory otherwise.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/._+-]+")
_SHORT_SOCKET_ROOT = Path("/tmp")
_LOCK_NAME = "tickguard-embedded.lock"
_POLL_SECONDS = 0.005
# Deterministic server behaviour whatever the host's locale and time zone.
_SERVER_ENV = {"LC_ALL": "C", "TZ": "UTC"}


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


def bin_dir() -> Path:
    """The directory of the bundled server's programs (postgres, initdb, pg_dump, pg_restore,
    psql). Does not import pgserver (its import has side effects we do not need)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedDatabaseError("the pgserver package (the bundled PostgreSQL) is missing")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def server_major_version() -> str:
    """The bundled PostgreSQL's major version, e.g. ``"16"``, as PG_VERSION spells it."""
    out = subprocess.run(
        [str(bin_dir() / "postgres"), "--version"],
        check=True,
        capture_output=True,
        text=True,
        env=_SERVER_ENV,
    ).stdout
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    if match is None:
        raise EmbeddedDatabaseError(f"cannot read the bundled PostgreSQL version from {out!r}")
    return match.group(1)


class EmbeddedPostgres:
    """One embedded PostgreSQL server on ``data_dir``, owned by this object between ``start``
    and ``stop``.

    ``start`` initialises the cluster on first use, recovers from a previous owner or server
    that was killed, and returns a DSN for asyncpg or psql. ``stop`` shuts the server down
    (fast mode: sessions end, committed data is kept). Two owners of one ``data_dir`` at once
    are refused. It never deletes data: a directory it cannot use is an error, not a reset.
    """

    def __init__(
        self, data_dir: Path, *, start_timeout: float = 120.0, stop_timeout: float = 30.0
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.pgdata = self.data_dir / "pgdata"
        self.log_file = self.data_dir / "postgres.log"
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._lock_fd: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None

    @property
    def dsn(self) -> str:
        """The connection URL of the running server (unix socket, trust authentication)."""
        if self._socket_dir is None or self._process is None:
            raise EmbeddedDatabaseError("the embedded PostgreSQL is not running")
        return f"postgresql://{SUPERUSER}@/{DATABASE}?host={quote(str(self._socket_dir))}"

    @property
    def pid(self) -> int | None:
        """The server's process id while this object runs it."""
        return None if self._process is None else self._process.pid

    def start(self) -> str:
        """Start the server and return its DSN once it accepts connections.

        Raises ``DataVersionMismatch`` when the cluster is from another major version and
        ``EmbeddedDatabaseError`` for everything else that stops it (directory in use by
        another process, server failed to start: the message ends with its log).
        """
        if self._process is not None:
            raise EmbeddedDatabaseError("the embedded PostgreSQL is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            account = _server_account()
            if account is not None:
                _grant_search(self.data_dir, account)
                _open_bundle_to(account)
            version = server_major_version()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb(account)
            data_version = (self.pgdata / "PG_VERSION").read_text().strip()
            if data_version != version:
                raise DataVersionMismatch(self.pgdata, data_version, version)
            self._check_owner(account)
            socket_dir = self._prepare_socket_dir(account)
            if (self.pgdata / "postmaster.pid").exists():
                self._recover(socket_dir)
            self._launch(socket_dir, account)
        except BaseException:
            self._unlock()
            raise
        return self.dsn

    def stop(self) -> None:
        """Shut the server down and release the data directory; does nothing if not running.

        Fast shutdown first; a server still up after ``stop_timeout`` gets an immediate
        shutdown (crash recovery on next start, no committed data lost), then SIGKILL.
        """
        try:
            self._stop_process()
        finally:
            self._unlock()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- ownership of the data directory --------------------------------------------------

    def _lock(self) -> None:
        # flock dies with its process, so a holder killed by SIGKILL never blocks the next
        # start; the fd is close-on-exec, so the server we spawn does not inherit the lock.
        path = self.data_dir / _LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EmbeddedDatabaseError(
                f"{self.data_dir} is in use by another tickguard process (pid {holder}); "
                f"stop it or choose another TICKGUARD_DATA_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

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
            env=_SERVER_ENV,
            cwd=staging,
            **_as_account(account),
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
            log.warning("giving %s to the %s user", self.pgdata, account.pw_name)
            _chown_tree(self.pgdata, account)

    # -- sockets, recovery and the server process -----------------------------------------

    def _prepare_socket_dir(self, account: pwd.struct_passwd | None) -> Path:
        """The socket directory: the cluster itself when its path is short and plain, else a
        private directory under /tmp named after the cluster's path."""
        if (
            len(os.fsencode(self.pgdata / _SOCKET_NAME)) <= _MAX_SOCKET_PATH
            and _PLAIN_PATH.fullmatch(str(self.pgdata)) is not None
        ):
            return self.pgdata
        digest = hashlib.sha256(os.fsencode(self.pgdata)).hexdigest()[:16]
        short = _SHORT_SOCKET_ROOT / f"tickguard-{digest}"
        owner = os.geteuid() if account is None else account.pw_uid
        with contextlib.suppress(FileExistsError):
            short.mkdir(mode=0o700)
            if account is not None:
                os.chown(short, account.pw_uid, account.pw_gid)
        info = short.lstat()
        # /tmp is shared: a directory someone else made there could intercept connections.
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner or info.st_mode & 0o077:
            raise EmbeddedDatabaseError(
                f"{short} (the socket directory for {self.pgdata}) is not a private directory "
                f"of uid {owner}; remove it"
            )
        return short

    def _recover(self, socket_dir: Path) -> None:
        """A postmaster.pid exists although we hold the lock: its owner died without stopping
        the server. Stop that server if it still runs, end backends a killed server left
        behind, and remove the lock files it left, so that a fresh server can start."""
        pid = _postmaster_pid(self.pgdata)
        if pid is not None and _is_postgres_in(pid, self.pgdata):
            log.warning("stopping the embedded PostgreSQL (pid %d) left by a killed owner", pid)
            _shut_down(pid, self._stop_timeout, wait=_wait_gone_callback(pid))
        else:
            log.warning("removing stale lock files of a killed PostgreSQL (pid %s)", pid)
        _end_orphans(self.pgdata, self._stop_timeout)
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        (socket_dir / f"{_SOCKET_NAME}.lock").unlink(missing_ok=True)
        (socket_dir / _SOCKET_NAME).unlink(missing_ok=True)

    def _launch(self, socket_dir: Path, account: pwd.struct_passwd | None) -> None:
        if self.log_file.exists():
            self.log_file.replace(self.log_file.with_name(self.log_file.name + ".1"))
        # The server writes through the inherited descriptor, so root keeps owning the file.
        with open(self.log_file, "ab") as log_out:
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
                    f"port={_PORT}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for tickguard must not stop the database
                # before tickguard has drained its writes into it.
                start_new_session=True,
                env=_SERVER_ENV,
                cwd=self.pgdata,
                **_as_account(account),
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
        self._socket_dir = None
        if process is not None:
            _shut_down(process.pid, self._stop_timeout, wait=process.wait)

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        # postmaster.pid's 8th line turns "ready" once connections are accepted (after any
        # crash recovery); the 1st line tells it is our process and not a stale file.
        deadline = time.monotonic() + self._start_timeout
        while True:
            status = process.poll()
            if status is not None:
                raise EmbeddedDatabaseError(
                    f"PostgreSQL exited with status {status} while starting; "
                    f"the end of {self.log_file}:\n{_tail(self.log_file)}"
                )
            lines = _read_lines(self.pgdata / "postmaster.pid")
            if len(lines) >= 8 and lines[0] == str(process.pid) and lines[7] == "ready":
                return
            if time.monotonic() > deadline:
                raise EmbeddedDatabaseError(
                    f"PostgreSQL did not become ready within {self._start_timeout} s; "
                    f"the end of {self.log_file}:\n{_tail(self.log_file)}"
                )
            time.sleep(_POLL_SECONDS)


@contextlib.contextmanager
def embedded_postgres(data_dir: Path, **options: Any) -> Iterator[str]:
    """Run the embedded PostgreSQL on ``data_dir`` for the block; yields its DSN."""
    server = EmbeddedPostgres(data_dir, **options)
    with server as dsn:
        yield dsn


# -- the server's account (root only) --------------------------------------------------------


def _server_account() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root (created on first use); None for a
    normal user, whose own account runs the server."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SERVER_USER)
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    try:
        subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home", SERVER_USER],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        # Another process may have created it at the same moment.
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(SERVER_USER)
        raise EmbeddedDatabaseError(
            f"PostgreSQL refuses to run as root and the user {SERVER_USER!r} could not be "
            f"created ({exc}); create it, run tickguard as a normal user, or set DATABASE_URL"
        ) from exc
    return pwd.getpwnam(SERVER_USER)


def _as_account(account: pwd.struct_passwd | None) -> dict[str, Any]:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _grant_search(path: Path, account: pwd.struct_passwd) -> None:
    """Let the server's user reach ``path``: add search (x, not read) permission for others
    on every ancestor that lacks it, e.g. /root. Nothing becomes listable or readable."""
    for directory in [path, *path.parents]:
        info = directory.stat()
        if info.st_uid != account.pw_uid and not info.st_mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


def _open_bundle_to(account: pwd.struct_passwd) -> None:
    """Make the bundled PostgreSQL readable and runnable by the server's user; a no-op when
    it already is (pip installs it so), needed when unpacked privately (PyInstaller).

    That is pginstall and the pgserver.libs directory beside the package, from which
    initdb, pg_dump and psql load libpq (their RPATH is $ORIGIN/../../../pgserver.libs)."""
    install = bin_dir().parent
    _grant_search(install, account)
    if (install / "bin" / "postgres").stat().st_mode & stat.S_IXOTH:
        return
    _open_tree(install)
    libs = install.parent.parent / "pgserver.libs"
    if libs.is_dir():
        _open_tree(libs)


def _open_tree(top: Path) -> None:
    """Add read for others to everything below ``top``, and search/execute where the owner
    has it."""
    _add_mode(top, stat.S_IROTH | stat.S_IXOTH)
    for root, dirs, files in os.walk(top):
        for name in dirs:
            _add_mode(Path(root) / name, stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            file = Path(root) / name
            extra = stat.S_IXOTH if file.stat().st_mode & stat.S_IXUSR else 0
            _add_mode(file, stat.S_IROTH | extra)


def _add_mode(path: Path, bits: int) -> None:
    path.chmod(stat.S_IMODE(path.stat().st_mode) | bits)


def _chown_tree(root: Path, account: pwd.struct_passwd) -> None:
    os.chown(root, account.pw_uid, account.pw_gid)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(Path(parent) / name, account.pw_uid, account.pw_gid, follow_symlinks=False)


# -- processes --------------------------------------------------------------------------------


def _postmaster_pid(pgdata: Path) -> int | None:
    lines = _read_lines(pgdata / "postmaster.pid")
    if lines and lines[0].isdigit():
        return int(lines[0])
    return None


def _is_postgres_in(pid: int, pgdata: Path) -> bool:
    """Whether ``pid`` is a live PostgreSQL process working in ``pgdata``. A server chdirs
    into its data directory, which tells it apart from an unrelated process that reused
    the pid after a reboot or container restart."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return process.name() == "postgres" and Path(process.cwd()) == pgdata.resolve()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _end_orphans(pgdata: Path, timeout: float) -> None:
    """End backends that outlived a killed postmaster: while one still holds the old shared
    memory, a new server refuses to start."""
    resolved = str(pgdata.resolve())
    orphans: list[psutil.Process] = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != "postgres":
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if process.cwd() == resolved:
                orphans.append(process)
    if not orphans:
        return
    log.warning("ending %d PostgreSQL processes left by a killed server", len(orphans))
    for process in orphans:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    _, alive = psutil.wait_procs(orphans, timeout=timeout)
    alive = [p for p in alive if _is_postgres_in(p.pid, pgdata)]
    if alive:
        raise EmbeddedDatabaseError(
            f"PostgreSQL processes {[p.pid for p in alive]} of {pgdata} do not exit"
        )


def _wait_gone_callback(pid: int) -> Callable[[float], None]:
    def wait(timeout: float) -> None:
        # Not our child, so no waitpid: poll. A zombie (its parent is not reaping) is gone.
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {pid}", timeout)
            time.sleep(_POLL_SECONDS)

    return wait


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _shut_down(pid: int, timeout: float, *, wait: Callable[[float], object]) -> None:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL, each given time to
    work; ``wait(timeout)`` waits for the exit or raises ``subprocess.TimeoutExpired``."""
    for sig, grace in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        try:
            wait(grace)
            return
        except subprocess.TimeoutExpired:
            log.warning("PostgreSQL (pid %d) still running after %s", pid, sig.name)
    raise EmbeddedDatabaseError(f"PostgreSQL (pid {pid}) does not exit, even after SIGKILL")


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
