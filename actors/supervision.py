"""Supervision: start actors in order, restart the ones that crash, stop them in order.

Vocabulary from Erlang/OTP (one_for_one supervisor, restart strategies, restart intensity);
the tree itself (which actors, in what order) lives in ``tickguard.supervisor``.

The child contract
------------------
A child is an ``async def`` described by a ``ChildSpec``. The supervisor calls it as
``await nursery.start(spec.start)`` so it receives ``task_status`` and must call
``task_status.started()`` once it is ready: "started" means ready, and the next child in the
start order only starts then. A child whose spec says ``graceful=True`` also receives
``stopping``, a ``trio.Event`` the supervisor sets when that child is asked to stop: the child
drains (finishes what it holds, answers its requests) and returns. If it has not returned
within ``spec.grace_s`` seconds its cancel scope is cancelled. A child with ``graceful=False``
is simply cancelled when stopped.

Cleanup that must finish even under cancellation (closing a socket, returning a database
connection) runs shielded *and* bounded, so a cancelled child cannot hang the shutdown::

    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_S):
            await connection.aclose()

A child that raises ``Exception`` has crashed; ``trio.Cancelled``, ``KeyboardInterrupt`` and
``SystemExit`` are never treated as crashes and pass through. When a child run ends (crash,
return or cancel), every request it had taken from its ``mailboxes`` but not answered gets
``ActorUnavailable``; requests still queued wait for the restarted child. When a child is gone
for good (stopped, or not restarted) its queued requests are answered with
``ActorUnavailable`` too, so no caller waits forever.

Restarts follow ``ChildSpec.restart`` with exponential backoff; more than
``RestartPolicy.max_restarts`` restarts of one child within ``window_s`` seconds make the
supervisor give up: it logs the child and its last error at ERROR and raises
``SupervisorGaveUp``, which cancels the rest of the tree. Inside enclosing nurseries that
exception arrives in an ``ExceptionGroup``: catch it with ``except* SupervisorGaveUp``.

A ``Supervisor`` is itself a graceful child (``run`` takes ``stopping``), so a group of
children that start at run time (the engines, one per symbol) can sit under their own
supervisor and be stopped as one step of the parent's stop order.
"""

from __future__ import annotations

import enum
import functools
import logging
import signal
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import attrs
import trio

from tickguard.actors.backoff import exponential
from tickguard.actors.mailbox import Mailbox
from tickguard.logs import ACTOR

log = logging.getLogger("tickguard.supervisor")


class Restart(enum.Enum):
    """When a child that ended is started again."""

    PERMANENT = "permanent"  # always: a clean return is as unexpected as a crash
    TRANSIENT = "transient"  # only when it raised; a clean return ends it
    TEMPORARY = "temporary"  # never; its crash is logged, not fatal


@attrs.frozen
class RestartPolicy:
    """Restart intensity and backoff, applied to each child separately.

    More than ``max_restarts`` restarts within ``window_s`` seconds make the supervisor give
    up. The n-th consecutive restart waits ``backoff_base_s * 2**(n-1)`` seconds, at most
    ``backoff_max_s``; a child that ran for ``healthy_after_s`` seconds starts over at the base.
    """

    max_restarts: int = 5
    window_s: float = 10.0
    backoff_base_s: float = 0.1
    backoff_max_s: float = 5.0
    healthy_after_s: float = 30.0

    def backoff(self, consecutive: int) -> float:
        """The wait before the ``consecutive``-th restart in a row (1-based)."""
        return exponential(consecutive - 1, self.backoff_base_s, self.backoff_max_s)


@attrs.frozen
class ChildSpec:
    """One supervised child: how to start it, when to restart it, how to stop it.

    ``mailboxes`` are the inboxes the child reads; the supervisor answers their in-flight
    requests when the child dies. ``graceful`` children receive a ``stopping`` event and get
    ``grace_s`` seconds to return after it is set; the others are cancelled at once.
    """

    id: str
    start: Callable[..., Awaitable[Any]]
    restart: Restart = Restart.PERMANENT
    mailboxes: tuple[Mailbox[Any], ...] = ()
    graceful: bool = False
    grace_s: float = 5.0


class SupervisorGaveUp(Exception):
    """A child crashed more often than the restart intensity allows."""

    def __init__(self, child_id: str, last_error: BaseException | None) -> None:
        super().__init__(f"gave up restarting {child_id!r}: {last_error!r}")
        self.child_id = child_id
        self.last_error = last_error


class ChildStartFailed(Exception):
    """A child failed before reporting started; its error is the ``__cause__``."""

    def __init__(self, child_id: str) -> None:
        super().__init__(f"child {child_id!r} failed to start")
        self.child_id = child_id


@attrs.define(eq=False)
class _Child:
    """The supervisor's record of one running child (lives until the child is gone for good)."""

    spec: ChildSpec
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    stopping: trio.Event = attrs.Factory(trio.Event)
    done: trio.Event = attrs.Factory(trio.Event)


def innermost(error: BaseException) -> BaseException:
    """The single exception inside nested one-member groups (nurseries wrap everything)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


class Supervisor:
    """A one_for_one supervisor: each child is restarted on its own, the others keep running."""

    def __init__(
        self,
        children: Sequence[ChildSpec] = (),
        policy: RestartPolicy = RestartPolicy(),
        *,
        stop_order: Sequence[str] | None = None,
    ) -> None:
        """``children`` start in the given order; ``stop_order`` (ids) overrides the default
        stop order, reverse start order, and must then name every child ever started."""
        self._initial = tuple(children)
        self._policy = policy
        self._stop_order = tuple(stop_order) if stop_order is not None else None
        for spec in self._initial:
            self._check_stop_order(spec.id)
        self._nursery: trio.Nursery | None = None
        self._children: dict[str, _Child] = {}
        self._start_order: list[str] = []
        self._closing = False
        self._closed = trio.Event()
        # Restarts per child id since this supervisor was made (for /metrics and the tests
        # that check that hostile input never restarts anything).
        self.restarts: Counter[str] = Counter()

    def _check_stop_order(self, child_id: str) -> None:
        if self._stop_order is not None and child_id not in self._stop_order:
            raise ValueError(f"child {child_id!r} is missing from stop_order")

    async def run(
        self,
        *,
        stopping: trio.Event | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the children in order, report started, supervise until shut down.

        Returns after ``shutdown`` finished (called directly or because ``stopping`` was set).
        Raises ``ChildStartFailed`` when a child given at construction fails to start and
        ``SupervisorGaveUp`` when a child exceeds the restart intensity.
        """
        self._children, self._start_order = {}, []
        self._closing, self._closed = False, trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for spec in self._initial:
                    await self.start_child(spec)
                task_status.started()
                if stopping is not None:
                    nursery.start_soon(self._shutdown_when, stopping)
                await self._closed.wait()
                nursery.cancel_scope.cancel()  # only the stopping watcher can be left
        except* SupervisorGaveUp as gave_up:
            raise innermost(gave_up) from None  # the group only wraps it
        except* ChildStartFailed as failed:
            start_failed = innermost(failed)
            raise start_failed from start_failed.__cause__  # the child's own error
        finally:
            self._nursery = None

    async def _shutdown_when(self, stopping: trio.Event) -> None:
        await stopping.wait()
        await self.shutdown()

    def has_child(self, child_id: str) -> bool:
        """Whether a child with this id is running (or waiting to be restarted)."""
        return child_id in self._children

    async def start_child(self, spec: ChildSpec) -> None:
        """Start and supervise ``spec``; returns once it reported started.

        Raises ``ChildStartFailed`` if it failed before that, ``ValueError`` if a child with
        that id is running (or the id is not in ``stop_order``), ``trio.ClosedResourceError``
        when the supervisor is not running or is shutting down.
        """
        if self._nursery is None or self._closing:
            raise trio.ClosedResourceError("supervisor is not running")
        if spec.id in self._children:
            raise ValueError(f"child {spec.id!r} is already running")
        self._check_stop_order(spec.id)
        child = _Child(spec)
        self._children[spec.id] = child  # before the first await: has_child sees it at once
        self._start_order.append(spec.id)
        await self._nursery.start(self._supervise, child)

    async def stop_child(self, child_id: str) -> bool:
        """Stop one child and wait until it is gone; it is not restarted.

        Returns False when a graceful child overran its grace period and was cancelled,
        True otherwise (also when no such child runs).
        """
        child = self._children.get(child_id)
        if child is None:
            return True
        log.info("%s: stopping", child_id)
        child.stopping.set()
        in_time = True
        if child.spec.graceful:
            with trio.move_on_after(child.spec.grace_s):
                await child.done.wait()
            if not child.done.is_set():
                log.warning(
                    "%s: overran its %ss grace period; cancelling", child_id, child.spec.grace_s
                )
                in_time = False
        child.scope.cancel()
        await child.done.wait()
        return in_time

    async def shutdown(self) -> tuple[str, ...]:
        """Stop every child, one at a time, in stop order; returns the ids that overran.

        After this the supervisor accepts no new children and ``run`` returns.
        """
        if self._closing:
            await self._closed.wait()
            return ()
        self._closing = True
        if self._stop_order is not None:
            order: Iterable[str] = self._stop_order
        else:
            order = reversed(self._start_order)
        overran = [child_id for child_id in list(order) if not await self.stop_child(child_id)]
        self._closed.set()
        return tuple(overran)

    async def _supervise(
        self, child: _Child, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run one child until it is gone for good, restarting it as its spec says."""
        spec, policy = child.spec, self._policy
        # This task is the child's own (nursery.start copied the context): every line the
        # child logs, and the supervisor's lines about it, name it. Nested children override.
        ACTOR.set(spec.id)
        launch: Callable[..., Awaitable[Any]] = spec.start
        if spec.graceful:
            launch = functools.partial(spec.start, stopping=child.stopping)
        restarts: deque[float] = deque()
        consecutive = 0
        ready = False
        try:
            with child.scope:
                while True:
                    started_at: float | None = None
                    error: BaseException | None = None
                    try:
                        async with trio.open_nursery() as attempt:
                            await attempt.start(launch)
                            started_at = trio.current_time()
                            log.info("%s: started", spec.id)
                            if not ready:
                                ready = True
                                task_status.started()
                    except* Exception as group:
                        error = innermost(group)
                    finally:
                        for mailbox in spec.mailboxes:
                            mailbox.fail_in_flight()
                    if not ready:
                        log.error("%s: failed to start", spec.id, exc_info=error)
                        raise ChildStartFailed(spec.id) from error
                    if child.stopping.is_set():
                        log.info("%s: stopped", spec.id)
                        return
                    if error is None and spec.restart is not Restart.PERMANENT:
                        log.info("%s: finished", spec.id)
                        return
                    if spec.restart is Restart.TEMPORARY:
                        log.error("%s: crashed; temporary, not restarted", spec.id, exc_info=error)
                        return
                    now = trio.current_time()
                    if started_at is not None and now - started_at >= policy.healthy_after_s:
                        consecutive = 0
                    consecutive += 1
                    restarts.append(now)
                    self.restarts[spec.id] += 1
                    while now - restarts[0] > policy.window_s:
                        restarts.popleft()
                    if len(restarts) > policy.max_restarts:
                        log.error(
                            "%s: %d restarts within %ss; giving up",
                            spec.id,
                            len(restarts) - 1,
                            policy.window_s,
                            exc_info=error,
                        )
                        raise SupervisorGaveUp(spec.id, error)
                    delay = policy.backoff(consecutive)
                    what = "crashed" if error is not None else "returned"
                    log.warning("%s: %s; restarting in %.3fs", spec.id, what, delay, exc_info=error)
                    # A stop request during the backoff ends the child without restarting it.
                    with trio.move_on_after(delay):
                        await child.stopping.wait()
                    if child.stopping.is_set():
                        log.info("%s: stopped while waiting to restart", spec.id)
                        return
        finally:
            for mailbox in spec.mailboxes:
                mailbox.fail_in_flight()
                mailbox.fail_queued()
            del self._children[spec.id]
            self._start_order.remove(spec.id)
            child.done.set()


async def run_until_signalled(
    supervisor: Supervisor,
    *,
    signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> tuple[str, ...]:
    """Run ``supervisor`` until one of ``signals`` arrives, then shut it down in order.

    Reports started once the whole tree is ready. Returns the ids of children that overran
    their grace period (the caller exits non-zero when that matters). Must run in the main
    thread; signals arriving during the shutdown are ignored (the grace periods bound it).
    """
    with trio.open_signal_receiver(*signals) as received:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            task_status.started()
            async for signum in received:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                break
            return await supervisor.shutdown()
