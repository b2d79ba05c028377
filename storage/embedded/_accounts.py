"""Running the server as root: PostgreSQL refuses to, so it runs as an unprivileged account,
which must be able to reach its data directory and the bundled programs.

For a normal user everything here is a no-op: the user's own account runs the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

from tickguard.storage.embedded._bundle import bin_dir
from tickguard.storage.embedded._errors import EmbeddedDatabaseError

log = logging.getLogger("tickguard.storage.embedded")

# As root, PostgreSQL runs as this unprivileged user; the same name pgserver itself uses, so a
# machine that ran pgserver before needs no second account.
SERVER_USER = "pgserver"


def server_account() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root (created on first use); None for a
    normal user, whose own account runs the server. Raises ``EmbeddedDatabaseError`` when
    the account is missing and cannot be created."""
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


def as_account(account: pwd.struct_passwd | None) -> dict[str, Any]:
    """``subprocess`` keyword arguments that run a program as ``account`` (none for None).
    The program is still our child process: we can wait for it."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def grant_search(path: Path, account: pwd.struct_passwd) -> None:
    """Let the server's user reach ``path``: add search (x, not read) permission for others
    on every ancestor that lacks it, e.g. /root. Nothing becomes listable or readable."""
    for directory in [path, *path.parents]:
        info = directory.stat()
        if info.st_uid != account.pw_uid and not info.st_mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


def open_bundle_to(account: pwd.struct_passwd) -> None:
    """Make the bundled PostgreSQL readable and runnable by the server's user; a no-op when
    it already is (pip installs it so), needed when unpacked privately (PyInstaller).

    That is pginstall and the pgserver.libs directory beside the package, from which
    initdb, pg_dump and psql load libpq (their RPATH is $ORIGIN/../../../pgserver.libs)."""
    install = bin_dir().parent
    grant_search(install, account)
    if (install / "bin" / "postgres").stat().st_mode & stat.S_IXOTH:
        return
    _open_tree(install)
    libs = install.parent.parent / "pgserver.libs"
    if libs.is_dir():
        _open_tree(libs)


def give_tree(root: Path, account: pwd.struct_passwd) -> None:
    """Make ``account`` the owner of ``root`` and everything below it (symlinks themselves)."""
    log.warning("giving %s to the %s user", root, account.pw_name)
    os.chown(root, account.pw_uid, account.pw_gid)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(Path(parent) / name, account.pw_uid, account.pw_gid, follow_symlinks=False)


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
