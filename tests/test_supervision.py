"""The supervisor: restarts with backoff, intensity limit, restart strategies, ordered stop."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from tickguard.actors.mailbox import ActorUnavailable, Mailbox, ask
from tickguard.actors.supervision import (
    ChildSpec,
    ChildStartFailed,
    Restart,
    RestartPolicy,
    Supervisor,
    SupervisorGaveUp,
)

POLICY = RestartPolicy(
    max_restarts=5, window_s=10.0, backoff_base_s=0.1, backoff_max_s=1.0, healthy_after_s=30.0
)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Boom(Exception):
    """The crash the test children raise."""


@attrs.define
class Starts:
    """The times a child started; tests wait on it instead of polling."""

    times: list[float] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    def record(self) -> None:
        self.times.append(trio.current_time())
        self._changed.set()
        self._changed = trio.Event()

    async def reach(self, count: int) -> None:
        """Wait until ``count`` starts happened (hang guard: 300 s of mock time)."""
        with trio.fail_after(300):
            while len(self.times) < count:
                await self._changed.wait()

    def gaps(self) -> list[float]:
        return [round(b - a, 6) for a, b in zip(self.times, self.times[1:], strict=False)]


def crashing_child(starts: Starts, *, runs_for: float = 0.0) -> Any:
    """A child that records each start time, runs ``runs_for`` seconds, then raises Boom."""

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        starts.record()
        task_status.started()
        await trio.sleep(runs_for)
        raise Boom(f"crash #{len(starts.times)}")

    return child


async def test_crashing_child_is_restarted_with_exponential_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts = Starts()
    sup = Supervisor([ChildSpec("flaky", crashing_child(starts))], POLICY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await starts.reach(5)
        nursery.cancel_scope.cancel()
    assert starts.gaps()[:4] == [0.1, 0.2, 0.4, 0.8]


async def test_backoff_is_capped_and_resets_after_a_healthy_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts = Starts()
    runs = iter([0.0, 0.0, 0.0, 0.0, 0.0, 40.0, 0.0])

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        starts.record()
        task_status.started()
        await trio.sleep(next(runs))
        raise Boom("again")

    policy = attrs.evolve(POLICY, max_restarts=100, backoff_max_s=0.5)
    sup = Supervisor([ChildSpec("flaky", child)], policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await starts.reach(7)
        nursery.cancel_scope.cancel()
    gaps = starts.gaps()
    # 0.1, 0.2, 0.4, then capped at 0.5; the sixth run lasted 40 s (> healthy_after_s), so the
    # backoff starts over at the base.
    assert gaps == [0.1, 0.2, 0.4, 0.5, 0.5, 40.1]


async def test_past_the_intensity_limit_the_supervisor_gives_up(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    starts = Starts()
    policy = attrs.evolve(POLICY, max_restarts=3)
    sup = Supervisor([ChildSpec("flaky", crashing_child(starts))], policy)
    caplog.set_level(logging.INFO, logger="tickguard.supervisor")
    with pytest.raises(SupervisorGaveUp) as raised, trio.fail_after(60):
        await sup.run()
    assert raised.value.child_id == "flaky"
    assert isinstance(raised.value.last_error, Boom)
    assert str(raised.value.last_error) == "crash #4"
    assert len(starts.times) == 4  # the first run and three restarts
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage().startswith("flaky:")
    assert errors[0].exc_info is not None and errors[0].exc_info[1] is raised.value.last_error


async def test_restarts_spread_beyond_the_window_do_not_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts = Starts()
    policy = attrs.evolve(POLICY, max_restarts=2, window_s=5.0)
    # Each run lasts 3 s, so only two crashes ever fall within one 5 s window.
    sup = Supervisor([ChildSpec("slow", crashing_child(starts, runs_for=3.0))], policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await starts.reach(10)  # a wrong give-up would raise SupervisorGaveUp instead
        nursery.cancel_scope.cancel()


async def test_transient_child_clean_return_ends_it_and_a_crash_restarts_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs: list[str] = []
    starts = Starts()
    outcomes = iter(["crash", "return"])

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        starts.record()
        task_status.started()
        outcome = next(outcomes)
        runs.append(outcome)
        if outcome == "crash":
            raise Boom("transient crash")

    sup = Supervisor([ChildSpec("job", child, Restart.TRANSIENT)], POLICY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await starts.reach(2)
        await trio.sleep(10)  # a wrongly scheduled restart would call next() and fail
        assert not sup.has_child("job")
        assert runs == ["crash", "return"]
        nursery.cancel_scope.cancel()


async def test_permanent_child_is_restarted_after_a_clean_return(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts = Starts()

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        starts.record()
        task_status.started()

    sup = Supervisor([ChildSpec("loop", child)], attrs.evolve(POLICY, max_restarts=100))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await starts.reach(3)
        nursery.cancel_scope.cancel()


async def test_temporary_child_is_never_restarted_and_its_crash_is_not_fatal(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    temp_starts = Starts()
    other_alive = trio.Event()

    async def steady(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        other_alive.set()
        await trio.sleep_forever()

    sup = Supervisor(
        [
            ChildSpec("steady", steady),
            ChildSpec("once", crashing_child(temp_starts), Restart.TEMPORARY),
        ],
        POLICY,
    )
    caplog.set_level(logging.INFO, logger="tickguard.supervisor")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await temp_starts.reach(1)
        await trio.sleep(10)
        assert len(temp_starts.times) == 1
        assert not sup.has_child("once")
        assert sup.has_child("steady")
        await sup.shutdown()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage().split(":")[0] for r in errors] == ["once"]
    assert isinstance(errors[0].exc_info[1], Boom)  # type: ignore[index]


@attrs.frozen
class Request:
    """A test request: ``crash`` makes the actor die holding it; others are echoed."""

    text: str
    reply: trio.MemorySendChannel[Any] | None


async def test_in_flight_request_of_a_dead_child_gets_actor_unavailable_and_queue_survives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inbox: Mailbox[Request] = Mailbox("echo")
    holding = trio.Event()
    release = trio.Event()
    generations = 0

    async def echo(*, task_status: trio.TaskStatus[None]) -> None:
        nonlocal generations
        generations += 1
        generation = generations
        task_status.started()
        while True:
            request = await inbox.receive()
            if request.text == "crash":
                holding.set()
                await release.wait()
                raise Boom("died holding a request")
            inbox.answer(request, f"{request.text} from run {generation}")

    sup = Supervisor([ChildSpec("echo", echo, mailboxes=(inbox,))], POLICY)
    results: dict[str, Any] = {}

    async def call(text: str) -> None:
        try:
            results[text] = await ask(inbox, lambda reply: Request(text, reply), timeout=30)
        except ActorUnavailable as error:
            results[text] = error

    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        async with trio.open_nursery() as callers:
            callers.start_soon(call, "crash")
            await holding.wait()
            callers.start_soon(call, "hello")  # queued while the crash request is in flight
            await trio.testing.wait_all_tasks_blocked()
            assert inbox.pending() == 1
            release.set()
        nursery.cancel_scope.cancel()
    assert isinstance(results["crash"], ActorUnavailable)
    assert results["hello"] == "hello from run 2"


async def test_queued_requests_are_answered_when_a_child_is_gone_for_good(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inbox: Mailbox[Request] = Mailbox("idle")

    async def idle(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep_forever()

    sup = Supervisor([ChildSpec("idle", idle, mailboxes=(inbox,))], POLICY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.RaisesGroup(ActorUnavailable):
            async with trio.open_nursery() as callers:
                callers.start_soon(sup.stop_child, "idle")
                await ask(inbox, lambda reply: Request("late", reply), timeout=30)
        nursery.cancel_scope.cancel()


def ordered_children(log: list[str], ids: list[str], *, graceful: bool) -> list[ChildSpec]:
    """Children that log ``start X`` when ready and ``stop X`` when they end."""

    def make(child_id: str) -> ChildSpec:
        async def child(
            *, task_status: trio.TaskStatus[None], stopping: trio.Event | None = None
        ) -> None:
            await trio.sleep(1)  # a slow start: the next one must still wait for it
            log.append(f"start {child_id}")
            task_status.started()
            try:
                if stopping is None:
                    await trio.sleep_forever()
                else:
                    await stopping.wait()
                    await trio.sleep(1)  # draining takes a while
            finally:
                log.append(f"stop {child_id}")

        return ChildSpec(child_id, child, graceful=graceful)

    return [make(child_id) for child_id in ids]


@pytest.mark.parametrize("graceful", [True, False])
async def test_children_start_in_order_and_stop_in_reverse_order(
    autojump_clock: trio.testing.MockClock, graceful: bool
) -> None:
    log: list[str] = []
    sup = Supervisor(ordered_children(log, ["a", "b", "c"], graceful=graceful), POLICY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert log == ["start a", "start b", "start c"]
        assert await sup.shutdown() == ()
    assert log[3:] == ["stop c", "stop b", "stop a"]


async def test_explicit_stop_order_is_followed_one_child_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    children = ordered_children(log, ["persistence", "fanout", "feed", "web"], graceful=True)
    sup = Supervisor(children, POLICY, stop_order=["web", "feed", "persistence", "fanout"])
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(sup.run, stopping=stopping))
        stopping.set()  # run() shuts down in order and returns
    assert log[4:] == ["stop web", "stop feed", "stop persistence", "stop fanout"]


async def test_stop_order_must_name_every_child() -> None:
    with pytest.raises(ValueError, match="engine"):
        Supervisor(ordered_children([], ["web", "engine"], graceful=True), stop_order=["web"])


async def test_a_child_overrunning_its_grace_period_is_cancelled_and_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cleaned = trio.Event()

    async def stubborn(*, task_status: trio.TaskStatus[None], stopping: trio.Event) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()  # ignores the stop request
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await trio.sleep(0.5)  # shielded cleanup still finishes
                cleaned.set()

    sup = Supervisor([ChildSpec("stubborn", stubborn, graceful=True, grace_s=2.0)], POLICY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        began = trio.current_time()
        assert await sup.shutdown() == ("stubborn",)
        assert trio.current_time() - began == pytest.approx(2.5)
    assert cleaned.is_set()


async def test_cancellation_is_not_a_crash(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    runs = 0

    async def worker(*, task_status: trio.TaskStatus[None]) -> None:
        nonlocal runs
        runs += 1
        task_status.started()
        await trio.sleep_forever()

    sup = Supervisor([ChildSpec("worker", worker), ChildSpec("other", worker)], POLICY)
    caplog.set_level(logging.INFO, logger="tickguard.supervisor")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        # A non-graceful stop cancels the child: it must not be restarted.
        assert await sup.stop_child("worker")
        await trio.sleep(10)
        assert not sup.has_child("worker")
        # Cancelling the whole tree from outside ends it without restarts or errors.
        nursery.cancel_scope.cancel()
    assert runs == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_child_started_at_run_time_is_supervised(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts = Starts()
    sup = Supervisor([], POLICY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert not sup.has_child("engine:BTC-USD")
        await sup.start_child(ChildSpec("engine:BTC-USD", crashing_child(starts, runs_for=1)))
        assert sup.has_child("engine:BTC-USD")
        assert len(starts.times) == 1  # start_child returned once it reported started
        with pytest.raises(ValueError, match="already running"):
            await sup.start_child(ChildSpec("engine:BTC-USD", crashing_child(starts)))
        await starts.reach(3)
        await sup.shutdown()
        assert not sup.has_child("engine:BTC-USD")
        with pytest.raises(trio.ClosedResourceError):
            await sup.start_child(ChildSpec("engine:ETH-USD", crashing_child(starts)))


async def test_a_child_failing_before_started_makes_start_child_raise(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def broken(*, task_status: trio.TaskStatus[None]) -> None:
        raise Boom("cannot load positions")

    sup = Supervisor([], POLICY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(ChildStartFailed) as raised:
            await sup.start_child(ChildSpec("engine:BTC-USD", broken))
        assert raised.value.child_id == "engine:BTC-USD"
        assert isinstance(raised.value.__cause__, Boom)
        assert not sup.has_child("engine:BTC-USD")
        nursery.cancel_scope.cancel()

    # At construction, the same failure makes run() itself raise.
    with pytest.raises(ChildStartFailed):
        await Supervisor([ChildSpec("feed", broken)], POLICY).run()


async def test_a_nested_supervisor_is_stopped_as_one_graceful_child(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    engines = Supervisor([], POLICY)
    [feed, persistence] = ordered_children(log, ["feed", "persistence"], graceful=True)
    engines_spec = ChildSpec("engines", engines.run, graceful=True, grace_s=30)
    sup = Supervisor(
        [persistence, feed, engines_spec], POLICY, stop_order=["feed", "engines", "persistence"]
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for engine in ordered_children(log, ["BTC", "ETH"], graceful=True):
            await engines.start_child(engine)
        await sup.shutdown()
    assert log[4:] == ["stop feed", "stop ETH", "stop BTC", "stop persistence"]


SIGTERM_SCRIPT = """
import sys
import trio
from tickguard.actors.supervision import ChildSpec, Supervisor, run_until_signalled

def child(name):
    async def run(*, task_status, stopping):
        print(f"start {name}", flush=True)
        task_status.started()
        await stopping.wait()
        print(f"stop {name}", flush=True)
    return ChildSpec(name, run, graceful=True, grace_s=5)

async def main():
    sup = Supervisor([child("persistence"), child("web")])
    async with trio.open_nursery() as nursery:
        await nursery.start(run_until_signalled, sup)
        print("READY", flush=True)
    return 0

sys.exit(trio.run(main))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_sigterm_shuts_the_tree_down_in_order_and_exits_zero(tmp_path: Path) -> None:
    script = tmp_path / "tree.py"
    script.write_text(textwrap.dedent(SIGTERM_SCRIPT))
    process = await trio.lowlevel.open_process(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None and process.stderr is not None
    output = b""
    try:
        with trio.fail_after(30):
            while b"READY\n" not in output:
                chunk = await process.stdout.receive_some()
                assert chunk, f"exited early: {output!r}"
                output += chunk
            process.send_signal(signal.SIGTERM)
            while chunk := await process.stdout.receive_some():
                output += chunk
            code = await process.wait()
            errors = await process.stderr.receive_some()
    finally:
        if process.returncode is None:
            process.kill()
    lines = output.decode().splitlines()
    assert lines == ["start persistence", "start web", "READY", "stop web", "stop persistence"]
    assert code == 0, errors.decode()
