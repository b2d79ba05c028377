"""``serve --workers N`` (tickguard.workers): real processes sharing one real port.

The supervision part runs a stand-in worker (tests/reuse_port_server.py: binds with the same
``bind_shared`` and answers its pid), so these tests need no database; the CLI's refusals
run ``python -m tickguard``. Waits are for conditions, under ``trio.fail_after`` guards.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from tickguard.actors.supervision import RestartPolicy
from tickguard.config import Settings
from tickguard.supervisor import PortInUse, check_port
from tickguard.workers import (
    REUSE_PORT_FLAG,
    WorkerGroup,
    bind_shared,
    run_workers,
    worker_command,
)

pytestmark = pytest.mark.timeout(120)

SERVER = str(Path(__file__).with_name("reuse_port_server.py"))
# Quick restarts, so a crash loop or a kill is over in well under a second of backoff.
QUICK = RestartPolicy(max_restarts=5, window_s=60.0, backoff_base_s=0.01, backoff_max_s=0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(port: int) -> list[str]:
    return [sys.executable, SERVER, "127.0.0.1", str(port)]


async def ask_pid(port: int) -> int | None:
    """One new connection, one request: the answering worker's pid, None if refused."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return None
    async with stream:
        await stream.send_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        received = b""
        while chunk := await stream.receive_some():
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), received
    return int(body)


async def pids_until(
    port: int, wanted: set[int], *, at_least: int = 50, distinct: int = 0
) -> list[int]:
    """Ask for pids (a new connection each) until every pid in ``wanted`` answered, at
    least ``distinct`` different pids did, and at least ``at_least`` answers came; all
    answers, in order."""
    answers: list[int] = []
    with trio.fail_after(30):
        while not wanted <= set(answers) or len(set(answers)) < distinct or len(answers) < at_least:
            pid = await ask_pid(port)
            if pid is None:
                await trio.sleep(0.02)  # not listening yet: ask again
            else:
                answers.append(pid)
    return answers


@asynccontextmanager
async def workers(
    command: list[str], count: int, policy: RestartPolicy = QUICK
) -> AsyncIterator[tuple[WorkerGroup, dict[str, int]]]:
    """``run_workers`` in this process; on exit stops the group (if it still runs) and waits
    for its exit status, which the caller reads from the yielded dict as ``"status"``."""
    outcome: dict[str, int] = {}

    async def run(*, task_status: trio.TaskStatus[WorkerGroup]) -> None:
        outcome["status"] = await run_workers(
            command,
            count,
            dict(os.environ),
            policy=policy,
            stop_timeout_s=10.0,
            task_status=task_status,
        )

    async with trio.open_nursery() as nursery:
        group = await nursery.start(run)
        try:
            yield group, outcome
        finally:
            group.stop()


async def test_two_workers_accept_on_one_port() -> None:
    port = free_port()
    async with workers(server_command(port), 2) as (group, outcome):
        pids = set(group.pids())
        assert len(pids) == 2
        answers = await pids_until(port, pids)
        assert set(answers) == pids  # both answered, nobody else did
    assert outcome["status"] == 0
    assert all(p.returncode == 0 for p in group.processes.values())
    assert group.restarts == 0


async def test_a_killed_worker_is_restarted_and_the_port_keeps_answering() -> None:
    port = free_port()
    async with workers(server_command(port), 2) as (group, outcome):
        before = set(group.pids())
        await pids_until(port, before, at_least=2)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(30):
            while len(set(group.pids()) - before) < 1:
                await trio.sleep(0.01)
        after = set(group.pids())
        assert victim not in after and len(after) == 2 and len(after & before) == 1
        # The survivor and the replacement both answer on the same port.
        answers = await pids_until(port, after, at_least=20)
        assert set(answers) == after
        assert group.restarts == 1
    assert outcome["status"] == 0


async def test_a_crash_loop_makes_the_parent_give_up_with_status_1() -> None:
    policy = attrs.evolve(QUICK, max_restarts=3)
    crash = [sys.executable, "-c", "raise SystemExit(3)"]
    async with workers(crash, 2, policy) as (group, outcome):
        with trio.fail_after(30):
            await group.stopping.wait()
    assert outcome["status"] == 1
    assert group.gave_up
    # The worker that gave up was restarted max_restarts times; its sibling at most as often.
    assert policy.max_restarts + 1 <= group.restarts <= 2 * policy.max_restarts + 1
    assert group.pids() == []


async def test_a_worker_that_ignores_sigterm_is_killed_after_the_timeout(
    tmp_path: Path,
) -> None:
    ready = tmp_path / "ready"
    stubborn = [
        sys.executable,
        "-c",
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(600)",
        str(ready),
    ]
    outcome: dict[str, int] = {}

    async def run(*, task_status: trio.TaskStatus[WorkerGroup]) -> None:
        outcome["status"] = await run_workers(
            stubborn,
            1,
            dict(os.environ),
            policy=QUICK,
            stop_timeout_s=0.5,
            task_status=task_status,
        )

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            group = await nursery.start(run)
            while not ready.exists():  # SIGTERM is ignored from now on
                await trio.sleep(0.01)
            group.stop()
    assert outcome["status"] == 1  # SIGTERM ignored, then SIGKILL: -9
    assert group.pids() == []


def test_sigterm_to_the_parent_stops_every_worker_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    driver = (
        "import functools, os, sys, trio\n"
        "from tickguard.workers import run_workers\n"
        f"command = {server_command(port)!r}\n"
        "sys.exit(trio.run(functools.partial(run_workers, command, 2, dict(os.environ))))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", driver], cwd=tmp_path)
    try:
        answers = trio.run(functools.partial(pids_until, port, set(), distinct=2))
        children = set(answers)
        assert len(children) == 2 and len(answers) >= 50, answers
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert trio.run(ask_pid, port) is None  # nothing listens any more
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_the_worker_command_runs_this_program_with_the_hidden_flag() -> None:
    assert worker_command() == [sys.executable, "-m", "tickguard", "serve", REUSE_PORT_FLAG]


def test_a_worker_port_check_passes_beside_its_siblings_and_only_then() -> None:
    port = free_port()
    settings = Settings(host="127.0.0.1", port=port, api_workers=2)
    with bind_shared("127.0.0.1", port) as sibling:
        sibling.listen()
        check_port(settings)  # a worker (re)starting beside a listening sibling
        with pytest.raises(PortInUse):
            check_port(settings, shared=False)  # the parent: the port is taken
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        with pytest.raises(PortInUse):
            check_port(settings)  # something that is not a worker holds it


def run_cli(*args: str, cwd: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "PORT"}}
    env.update(TICKGUARD_DATA_DIR=str(cwd / "data"), **variables)
    return subprocess.run(
        [sys.executable, "-m", "tickguard", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


SPLIT = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/unused",
    "REDIS_URL": "redis://127.0.0.1:9/0",
}


@pytest.mark.parametrize("role", ["all", "api,engine"])
def test_workers_refuse_a_process_that_plays_engine(tmp_path: Path, role: str) -> None:
    done = run_cli("serve", "--role", role, "--workers", "2", cwd=tmp_path, **SPLIT)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "tickguard: --workers needs --role api (or api,gateway); engines run in their own process"
    ]


def test_workers_on_a_busy_port_is_one_line_and_status_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_cli(
            "serve", "--role", "api", "--workers", "2", cwd=tmp_path, PORT=str(port), **SPLIT
        )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tickguard: cannot listen on 127.0.0.1:{port}")
