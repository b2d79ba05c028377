"""``tickguard serve --workers N``: N api processes sharing one port, under a small parent.

One Python process is CPU-bound at a few hundred creates per second (issue 17); api
processes scale REST by sharing ``HOST:PORT``. The parent does not serve: it checks the port
once (a busy port is the usual one-line error), starts N children running ``serve`` with the
hidden ``--reuse-port`` and the parent's environment (command-line options folded in, so
they read the same settings, ``API_WORKERS`` included), and supervises them:

    parent (this module, one trio.run)
      worker 0   tickguard serve --reuse-port   binds PORT with SO_REUSEPORT
      worker 1   tickguard serve --reuse-port   the kernel spreads connections over both
      ...

Each child binds its own socket with SO_REUSEADDR + SO_REUSEPORT (``bind_shared``), so a
restarted child binds again while its siblings keep answering; the kernel balances new
connections between the listening sockets. A child that exits unexpectedly is restarted
with backoff; past the restart intensity (per worker, as the in-process supervisor counts)
the parent stops every child and exits 1. SIGINT/SIGTERM to the parent: SIGTERM to every
child, each gets the shutdown grace plus a margin, then SIGKILL; exit 0 if all exited 0.
Children inherit stdin/stdout/stderr, so their logs go where the parent's go.

Workers play api (and may play gateway) only: engines lease symbols and must not run once
per worker, so ``serve_workers`` refuses a process that plays engine.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import attrs
import trio

from tickguard.actors.supervision import RestartPolicy
from tickguard.config import Settings

log = logging.getLogger("tickguard.workers")

# The hidden ``serve`` option that makes a process one of the workers: it serves (never
# spawns workers of its own) and binds PORT with SO_REUSEPORT.
REUSE_PORT_FLAG = "--reuse-port"

# Past 5 restarts of one worker within a minute the parent gives up: a worker that cannot
# stay up will not be fixed by a seventh start, and exiting 1 lets a process manager see it.
WORKER_POLICY = RestartPolicy(max_restarts=5, window_s=60.0, backoff_max_s=5.0)

# Beyond SHUTDOWN_GRACE_MS (the persistence drain), what a worker may take to stop: hypercorn's
# graceful timeout for requests in flight and closing the pool.
STOP_MARGIN_S = 5.0

ENGINE_REFUSED = "--workers needs --role api (or api,gateway); engines run in their own process"


def bind_shared(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` with SO_REUSEADDR and SO_REUSEPORT, not yet
    listening: several processes of the same user can each bind one and listen, and the
    kernel spreads incoming connections over them. IPv6 when ``host`` has a colon. Raises
    ``OSError`` when the port is held by a socket without SO_REUSEPORT (or another user's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def worker_command() -> list[str]:
    """The command line of one worker: this same program running ``serve`` with
    ``REUSE_PORT_FLAG`` (its settings come from the environment it is given). A frozen
    binary (PyInstaller) is its own entry point; otherwise the interpreter runs the
    package."""
    if getattr(sys, "frozen", False):
        program = [sys.executable]
    else:
        program = [sys.executable, "-m", "tickguard"]
    return [*program, "serve", REUSE_PORT_FLAG]


async def serve_workers(
    settings: Settings, *, environ: Mapping[str, str], check_port: Callable[[Settings], None]
) -> int:
    """``tickguard serve`` with ``settings.api_workers`` above 1: the parent process.

    Refuses (exit 2, one line) a process that plays engine; ``check_port`` checks HOST:PORT
    once, strictly (``supervisor.check_port`` with ``shared=False``: a port held by anything,
    another group of workers included, raises ``PortInUse``, which the command turns into
    the usual one-line error); then ``run_workers`` with ``environ`` (the command line's
    options already folded in, so every worker reads the same settings) until
    SIGINT/SIGTERM. The check comes in as a function so that this module, which web imports
    for ``bind_shared``, imports no part of the tree.
    """
    if settings.plays("engine"):
        print(f"tickguard: {ENGINE_REFUSED}", file=sys.stderr)
        return 2
    check_port(settings)
    log.info(
        "starting %d api workers (%s) on %s:%d",
        settings.api_workers,
        ",".join(settings.roles),
        settings.host,
        settings.port,
    )
    return await run_workers(
        worker_command(),
        settings.api_workers,
        environ,
        stop_timeout_s=settings.shutdown_grace_ms / 1000 + STOP_MARGIN_S,
    )


@attrs.define
class WorkerGroup:
    """The running workers, for tests and the parent's own log: ``pids()`` of the live
    children, ``restarts`` so far, ``stop()`` to begin the shutdown a signal would."""

    count: int
    processes: dict[int, trio.Process] = attrs.field(factory=dict)
    restarts: int = 0
    stopping: trio.Event = attrs.field(factory=trio.Event)
    gave_up: bool = False

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values() if p.returncode is None]

    def stop(self) -> None:
        self.stopping.set()


async def run_workers(
    command: Sequence[str],
    count: int,
    env: Mapping[str, str],
    *,
    policy: RestartPolicy = WORKER_POLICY,
    stop_timeout_s: float = 10.0 + STOP_MARGIN_S,
    signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
    task_status: trio.TaskStatus[WorkerGroup] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run ``count`` copies of ``command`` (with environment ``env``) until one of
    ``signals`` arrives or ``WorkerGroup.stop()`` is called; returns the exit status.

    Reports started with the ``WorkerGroup`` once every child has been spawned (not once
    they listen: the children say that themselves). A child that exits on its own, whatever
    its status, is restarted after ``policy``'s backoff; more than ``policy.max_restarts``
    restarts of one worker within ``policy.window_s`` stop everything. Stopping sends SIGTERM
    to each child and waits up to ``stop_timeout_s`` before SIGKILL. Returns 0 when every
    child exited 0 after the stop, 1 after giving up or when a child exited otherwise.
    Opens a signal receiver: call it in the main thread.
    """
    group = WorkerGroup(count)
    statuses: list[int] = []
    argv = list(command)

    async def watch_signals(received: AsyncIterator[int]) -> None:
        async for signum in received:
            log.info("received %s; stopping %d workers", signal.Signals(signum).name, count)
            group.stop()
            return

    async def keep(slot: int, *, task_status: trio.TaskStatus[None]) -> None:
        restarts: deque[float] = deque()
        consecutive = 0
        first = True
        while True:
            process = await trio.lowlevel.open_process(
                argv, env=dict(env), preexec_fn=_die_with_parent
            )
            group.processes[slot] = process
            started_at = trio.current_time()
            log.info("worker %d: started (pid %d)", slot, process.pid)
            if first:
                first = False
                task_status.started()
            try:
                await _exit_or_stop(process, group.stopping)
                if group.stopping.is_set():
                    statuses.append(await _stop(process, slot, stop_timeout_s))
                    return
            finally:
                # Cancelled from outside (not a stop): no child outlives the parent's run.
                if process.returncode is None:
                    process.kill()
                    with trio.CancelScope(shield=True), trio.move_on_after(STOP_MARGIN_S):
                        await process.wait()
            now = trio.current_time()
            if now - started_at >= policy.healthy_after_s:
                consecutive = 0
            consecutive += 1
            group.restarts += 1
            restarts.append(now)
            while now - restarts[0] > policy.window_s:
                restarts.popleft()
            if len(restarts) > policy.max_restarts:
                log.error(
                    "worker %d: exited with status %s, %d restarts within %ss; giving up",
                    slot,
                    process.returncode,
                    len(restarts) - 1,
                    policy.window_s,
                )
                group.gave_up = True
                group.stop()
                return
            delay = policy.backoff(consecutive)
            log.warning(
                "worker %d: exited with status %s; restarting in %.3fs",
                slot,
                process.returncode,
                delay,
            )
            # A stop during the backoff ends the worker without restarting it.
            with trio.move_on_after(delay):
                await group.stopping.wait()
            if group.stopping.is_set():
                return

    with trio.open_signal_receiver(*signals) as received:
        async with trio.open_nursery() as outer:
            outer.start_soon(watch_signals, received)
            # Each slot returns once its child is stopped (or it gave up).
            async with trio.open_nursery() as slots:
                for slot in range(count):
                    await slots.start(keep, slot)
                task_status.started(group)
            outer.cancel_scope.cancel()
    if group.gave_up:
        return 1
    failed = [status for status in statuses if status != 0]
    if failed:
        log.error("workers exited with status %s", ", ".join(map(str, failed)))
        return 1
    log.info("workers stopped")
    return 0


async def _exit_or_stop(process: trio.Process, stopping: trio.Event) -> None:
    """Until ``process`` exits or ``stopping`` is set, whichever comes first."""
    async with trio.open_nursery() as race:

        async def exited() -> None:
            await process.wait()
            race.cancel_scope.cancel()

        async def stopped() -> None:
            await stopping.wait()
            race.cancel_scope.cancel()

        race.start_soon(exited)
        race.start_soon(stopped)


async def _stop(process: trio.Process, slot: int, timeout_s: float) -> int:
    """SIGTERM to ``process``, SIGKILL if it has not exited within ``timeout_s``; its exit
    status (negative: the signal that ended it)."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout_s):
            await process.wait()
        if process.returncode is None:
            log.error("worker %d: still running %.1fs after SIGTERM; killing it", slot, timeout_s)
            process.kill()
    status = await process.wait()
    log.info("worker %d: exited with status %d", slot, status)
    return status


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the parent dies, even by SIGKILL, so a
    killed parent never leaves workers holding the port (Linux; elsewhere a no-op)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
