"""The server's processes: telling a live server from a recycled pid, ending what a killed
server left running, shutting one down in escalating steps, and noticing that ours exited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import trio

from tickguard.storage.embedded._errors import EmbeddedDatabaseError

log = logging.getLogger("tickguard.storage.embedded")

POLL_SECONDS = 0.005
# Where pidfd_open is missing (not Linux, or a kernel before 5.3): how often to look instead.
_EXIT_POLL_SECONDS = 0.25


def is_postgres_in(pid: int, pgdata: Path) -> bool:
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


def end_orphans(pgdata: Path, timeout: float) -> None:
    """End backends that outlived a killed postmaster: while one still holds the old shared
    memory, a new server refuses to start. Waits up to ``timeout`` for them to exit; raises
    ``EmbeddedDatabaseError`` if some do not."""
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
    alive = [p for p in alive if is_postgres_in(p.pid, pgdata)]
    if alive:
        raise EmbeddedDatabaseError(
            f"PostgreSQL processes {[p.pid for p in alive]} of {pgdata} do not exit"
        )


def wait_gone_callback(pid: int) -> Callable[[float], None]:
    """A ``wait(timeout)`` for a process that is not our child (no waitpid): it polls, and
    counts a zombie (its parent is not reaping) as gone."""

    def wait(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {pid}", timeout)
            time.sleep(POLL_SECONDS)

    return wait


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def shut_down(pid: int, timeout: float, *, wait: Callable[[float], object]) -> None:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL, each given time to
    work; ``wait(timeout)`` waits for the exit or raises ``subprocess.TimeoutExpired``.
    Blocks; raises ``EmbeddedDatabaseError`` if even SIGKILL does not end it."""
    for sig, grace in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        try:
            wait(grace)
            return
        except subprocess.TimeoutExpired:
            log.warning("PostgreSQL (pid %d) still running after %s", pid, sig.name)
    raise EmbeddedDatabaseError(f"PostgreSQL (pid {pid}) does not exit, even after SIGKILL")


async def wait_exited(process: subprocess.Popen[bytes]) -> int:
    """Wait, without a thread or a busy loop, until our child ``process`` exits; reap it (no
    zombie stays behind) and return its ``returncode``.

    A pidfd (Linux 5.3+) becomes readable when the process ends, so Trio waits on it like on
    a socket; elsewhere the process is polled every quarter second. Cancellable.
    """
    if process.poll() is not None:
        return process.returncode
    try:
        # Only this Popen reaps the pid, so it still names our process (running or zombie).
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        # No pidfd: nothing to wait on but the process table itself.
        while process.poll() is None:  # noqa: ASYNC110
            await trio.sleep(_EXIT_POLL_SECONDS)
        return process.returncode
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    # Readable means it has exited: this wait returns at once and reaps it.
    return process.wait()
