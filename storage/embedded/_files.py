"""The files around a cluster: who owns the data directory (an flock), where the server's
socket lives, what a server leaves behind (``postmaster.pid``, the socket and its lock file),
and the server's log.

Layout of ``data_dir``::

    tickguard-embedded.lock   held (flock) by the process that owns the server
    pgdata/                   the cluster; PG_VERSION (written by initdb) records its major
    postgres.log              this run's server log (postgres.log.1: the previous run's)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import stat
from pathlib import Path

from tickguard.storage.embedded._errors import EmbeddedDatabaseError

PORT = 5432
SOCKET_NAME = f".s.PGSQL.{PORT}"
LOCK_NAME = "tickguard-embedded.lock"
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# unix_socket_directories is a comma-separated, quotable list: keep socket paths to plain
# characters and fall back to a short hashed directory otherwise.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/._+-]+")
_SHORT_SOCKET_ROOT = Path("/tmp")


class DirectoryLock:
    """This process's exclusive claim on a data directory, between ``acquire`` and ``release``.

    flock dies with its process, so a holder killed by SIGKILL never blocks the next start;
    the fd is close-on-exec, so a server we spawn does not inherit the lock.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting; raises ``EmbeddedDatabaseError`` naming the holder's
        pid when another process has it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EmbeddedDatabaseError(
                f"{self.path.parent} is in use by another tickguard process (pid {holder}); "
                f"stop it or choose another TICKGUARD_DATA_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the directory up; does nothing when not held."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def prepare_socket_dir(pgdata: Path, account: pwd.struct_passwd | None) -> Path:
    """The socket directory: the cluster itself when its path is short and plain, else a
    private directory under /tmp named after the cluster's path (made on first use).

    Raises ``EmbeddedDatabaseError`` when that /tmp directory is not private to the server's
    user (someone else could intercept connections there)."""
    if (
        len(os.fsencode(pgdata / SOCKET_NAME)) <= _MAX_SOCKET_PATH
        and _PLAIN_PATH.fullmatch(str(pgdata)) is not None
    ):
        return pgdata
    digest = hashlib.sha256(os.fsencode(pgdata)).hexdigest()[:16]
    short = _SHORT_SOCKET_ROOT / f"tickguard-{digest}"
    owner = os.geteuid() if account is None else account.pw_uid
    with contextlib.suppress(FileExistsError):
        short.mkdir(mode=0o700)
        if account is not None:
            os.chown(short, account.pw_uid, account.pw_gid)
    info = short.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner or info.st_mode & 0o077:
        raise EmbeddedDatabaseError(
            f"{short} (the socket directory for {pgdata}) is not a private directory "
            f"of uid {owner}; remove it"
        )
    return short


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid in ``postmaster.pid`` (None when there is none): a running server's, or a
    killed server's stale one."""
    lines = read_lines(pgdata / "postmaster.pid")
    if lines and lines[0].isdigit():
        return int(lines[0])
    return None


def is_ready(pgdata: Path, pid: int) -> bool:
    """Whether the server ``pid`` accepts connections: ``postmaster.pid``'s 8th line turns
    ``ready`` then (after any crash recovery); its 1st line tells it is that server's file
    and not a stale one."""
    lines = read_lines(pgdata / "postmaster.pid")
    return len(lines) >= 8 and lines[0] == str(pid) and lines[7] == "ready"


def remove_lock_files(pgdata: Path, socket_dir: Path) -> None:
    """Remove what a killed server leaves behind and PostgreSQL refuses to start over:
    ``postmaster.pid``, the socket and the socket's lock file. Only call it once no server
    runs on ``pgdata``."""
    (pgdata / "postmaster.pid").unlink(missing_ok=True)
    (socket_dir / f"{SOCKET_NAME}.lock").unlink(missing_ok=True)
    (socket_dir / SOCKET_NAME).unlink(missing_ok=True)


def rotate_log(log_file: Path) -> None:
    """Keep the previous run's log as ``<name>.1``; the new run starts an empty one."""
    if log_file.exists():
        log_file.replace(log_file.with_name(log_file.name + ".1"))


def read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
