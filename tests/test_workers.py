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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from tickguard.actors.supervision import RestartPolicy
from tickguard.config import Settings
from tickguard.sim import open_simulator
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


def _parent_of_two(port: int, cwd: Path) -> subprocess.Popen[bytes]:
    """A parent process running two workers of the stand-in server on ``port``."""
    driver = (
        "import functools, os, sys, trio\n"
        "from tickguard.workers import run_workers\n"
        f"command = {server_command(port)!r}\n"
        "sys.exit(trio.run(functools.partial(run_workers, command, 2, dict(os.environ))))\n"
    )
    return subprocess.Popen([sys.executable, "-c", driver], cwd=cwd)


def test_sigterm_to_the_parent_stops_every_worker_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    parent = _parent_of_two(port, tmp_path)
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


def test_a_parent_killed_by_sigkill_takes_its_workers_with_it(tmp_path: Path) -> None:
    """A worker must not outlive its parent holding the port (PR_SET_PDEATHSIG)."""
    port = free_port()
    parent = _parent_of_two(port, tmp_path)
    try:
        children = set(trio.run(functools.partial(pids_until, port, set(), distinct=2)))
        assert len(children) == 2
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30  # a hang guard, not a speed bound
        while any(_alive(pid) for pid in children):
            assert time.monotonic() < deadline, f"workers outlived their parent: {children}"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A worker that exited but is not reaped yet (its parent is gone: init reaps it) is a
    # zombie: it holds no port any more.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


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


async def test_the_web_server_of_a_worker_shares_its_port(db: object, database_url: str) -> None:
    """``web.app.serve`` with API_WORKERS above 1 binds with SO_REUSEPORT (by descriptor):
    two servers listen on one port, either answers, and one stopping leaves the other."""
    from web_harness import services_without_database  # its pool needs db's loop

    from tickguard.web.app import create_app, serve

    port = free_port()
    services = await services_without_database(database_url)
    services = attrs.evolve(
        services, settings=attrs.evolve(services.settings, port=port, api_workers=2)
    )
    stops = [trio.Event(), trio.Event()]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            binds = [
                await nursery.start(
                    functools.partial(
                        serve,
                        create_app(services),
                        services.settings,
                        shutdown_trigger=stop.wait,
                        graceful_timeout=0.5,
                    )
                )
                for stop in stops
            ]
            assert binds == [[f"http://127.0.0.1:{port}"]] * 2
            async with httpx.AsyncClient(base_url=binds[0][0]) as http:
                for _ in range(10):
                    health = await http.get("/health", headers={"Connection": "close"})
                    assert health.status_code == 200
                stops[0].set()
                for _ in range(10):  # the other server alone
                    health = await http.get("/health", headers={"Connection": "close"})
                    assert health.status_code == 200
            stops[1].set()
    # A server without API_WORKERS cannot join them: the port is its own or nobody's.
    alone = attrs.evolve(services.settings, api_workers=1)
    with bind_shared("127.0.0.1", port) as worker:
        worker.listen()
        refused: list[BaseExceptionGroup[OSError]] = []
        try:
            with trio.fail_after(30):  # were it to bind, it would serve until this fires
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        functools.partial(
                            serve, create_app(services), alone, shutdown_trigger=trio.Event().wait
                        )
                    )
        except* OSError as group:  # EADDRINUSE, inside hypercorn's nurseries
            refused.append(group)
        assert refused


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


# --- end to end: `tickguard serve --role api --workers 2` -----------------------------------


async def ready_pid(http: httpx.AsyncClient) -> int | None:
    """/ready over a new connection (``Connection: close``): the answering worker's pid."""
    try:
        response = await http.get("/ready", headers={"Connection": "close"})
    except httpx.TransportError:
        return None
    if response.status_code != 200:
        return None
    return int(response.json()["pid"])


@pytest.mark.slow
async def test_serve_role_api_with_two_workers_serves_one_port_from_two_pids(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    async with open_simulator({"BTC-USD": "65000"}) as sim:
        env = {
            **os.environ,
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "DATABASE_URL": own_database,
            "REDIS_URL": redis_url,
            "COINBASE_WS_URL": sim.url,
            "COINBASE_REST_URL": sim.rest_url,
            "COINBASE_PRODUCTS": "BTC-USD",
            "SHUTDOWN_GRACE_MS": "5000",
            "RATE_LIMIT_PER_USER": "0",
            "RATE_LIMIT_PER_ADDRESS": "0",
        }
        with log.open("wb") as out:
            parent = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tickguard", "serve", "--role", "api", "--workers", "2"],
                env=env,
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                pids: list[int] = []
                with trio.fail_after(90):  # both workers start, migrate (one waits) and listen
                    while len(set(pids)) < 2:
                        assert parent.poll() is None, log.read_text()[-3000:]
                        pid = await ready_pid(http)
                        if pid is None:
                            await trio.sleep(0.05)
                        else:
                            pids.append(pid)
                close = {"Connection": "close"}
                ids = []
                for i in range(10):  # each on a new connection: spread over both workers
                    body = {
                        "userId": "wally",
                        "symbol": "BTC-USD",
                        "side": "long",
                        "entryPrice": "65000",
                        "stopLoss": str(60000 - i),
                    }
                    created = await http.post("/api/positions", json=body, headers=close)
                    assert created.status_code == 201, created.text
                    ids.append(created.json()["data"]["id"])
                for _ in range(10):  # whichever worker answers sees every write
                    listed = await http.get(
                        "/api/positions", params={"userId": "wally"}, headers=close
                    )
                    assert listed.status_code == 200, listed.text
                    assert sorted(p["id"] for p in listed.json()["data"]) == sorted(ids)
            parent.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                assert await parent.wait() == 0, log.read_text()[-3000:]
            for pid in set(pids):
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
        finally:
            if parent.poll() is None:
                parent.kill()
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await parent.wait()
