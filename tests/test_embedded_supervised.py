"""The embedded PostgreSQL under supervision, as a user runs tickguard: a real `tickguard serve`
process on its own embedded server, whose postmaster the test kills (SIGKILL) or stops
(`pg_ctl stop -m immediate`). The service must bring it back by itself, lose and double
nothing, keep the log short while it is away, and exit 1 once it dies too often."""

from __future__ import annotations

import logging
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from test_cli import Served

from tickguard.storage import DatabaseUnavailable
from tickguard.storage.embedded import SERVER_USER, bin_dir
from tickguard.storage.outage import OutageLog

pytestmark = pytest.mark.timeout(240)

GUARD_S = 60.0  # a hang guard, not an expected duration


def postmaster(data: Path, other_than: int | None = None) -> int:
    """The pid of the embedded server once it accepts connections (postmaster.pid says so),
    waiting for one other than ``other_than`` (a dead server's stale file names it)."""
    pid_file = data / "pgdata" / "postmaster.pid"
    deadline = time.monotonic() + GUARD_S
    while True:
        try:
            lines = pid_file.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if len(lines) >= 8 and lines[7].strip() == "ready":
            pid = int(lines[0])
            if pid != other_than and psutil.pid_exists(pid) and not _zombie(pid):
                return pid
        assert time.monotonic() < deadline, "the embedded server did not come up"
        time.sleep(0.02)


def kill_postmaster(data: Path, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def pg_ctl_stop_immediate(data: Path, pid: int) -> None:
    account: dict[str, Any] = {}
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVER_USER)
        account = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    subprocess.run(
        [str(bin_dir() / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D", str(data / "pgdata")],
        check=True,
        capture_output=True,
        timeout=GUARD_S,
        **account,
    )


def create(url: str, user: str, price: str) -> httpx.Response:
    return httpx.post(
        url + "/api/positions",
        json={"userId": user, "symbol": "BTC-USD", "side": "long", "entryPrice": price},
        timeout=10,
    )


def until(condition: Callable[[], bool], what: str) -> float:
    """Poll ``condition`` until true; returns the seconds it took (a figure, not a check)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < GUARD_S, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def ready_status(url: str) -> int:
    try:
        return httpx.get(url + "/ready", timeout=5).status_code
    except httpx.TransportError:
        return 0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    service = Served(tmp_path / "data", tmp_path)
    yield service
    if service.process.poll() is None:
        service.stop()


@pytest.mark.parametrize(
    "death", [kill_postmaster, pg_ctl_stop_immediate], ids=["sigkill", "pg_ctl"]
)
def test_a_dead_embedded_server_is_restarted_and_the_api_recovers(
    served: Served, tmp_path: Path, death: Callable[[Path, int], None]
) -> None:
    data = tmp_path / "data"
    before = [create(served.url, "alice", str(100 + i)) for i in range(3)]
    assert [r.status_code for r in before] == [201, 201, 201], [r.text for r in before]
    old_pid = postmaster(data)
    lines_before = len(served.output().splitlines())

    killed_at = time.monotonic()
    death(data, old_pid)
    # While it is away: /ready says so, requests get 503, /health stays a liveness check.
    seen_503 = ready_status(served.url) == 503
    listing_codes = [
        httpx.get(served.url + "/api/positions", params={"userId": "alice"}, timeout=10)
        for _ in range(20)
    ]
    assert httpx.get(served.url + "/health", timeout=5).status_code == 200
    until(lambda: ready_status(served.url) == 200, "/ready to answer 200 again")
    recovered_s = time.monotonic() - killed_at
    postmaster(data, other_than=old_pid)
    # The dead postmaster was reaped: no zombie stays behind.
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).ppid() != served.process.pid

    after = create(served.url, "alice", "200")
    assert after.status_code == 201, after.text
    listed = httpx.get(served.url + "/api/positions", params={"userId": "alice"}, timeout=10)
    ids = [p["id"] for p in listed.json()["data"]]
    wanted = [r.json()["data"]["id"] for r in [*before, after]]
    assert sorted(ids) == sorted(wanted), "a position was lost or doubled"

    log = served.output().splitlines()[lines_before:]
    assert seen_503 or any(r.status_code == 503 for r in listing_codes), "never saw the outage"
    # Twenty failed requests and a second or more of reconnect attempts, in a few lines:
    # asyncpg's per-attempt tracebacks and our per-request warnings are held back.
    unavailable = [line for line in log if "database unavailable" in line]
    pool_lines = [line for line in log if "asyncpg.pool" in line]
    assert len(unavailable) <= 2, "\n".join(unavailable)
    assert len(pool_lines) <= 2, "\n".join(pool_lines)
    assert len(log) < 60, "\n".join(log)
    assert "postgres: crashed; restarting" in "\n".join(log)
    print(f"\n{death.__name__}: /ready 200 again {recovered_s:.2f} s after, {len(log)} log lines")

    assert served.stop() == 0, served.output()


def test_a_server_that_keeps_dying_ends_the_process_with_status_1(
    served: Served, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    deaths = 0
    pid: int | None = None
    # The default policy: more than 5 restarts within 60 s and the process gives up, so the
    # sixth death is the last; each kill waits for the restarted server first.
    while deaths < 6:
        assert served.process.poll() is None, served.output()
        pid = postmaster(data, other_than=pid)
        os.kill(pid, signal.SIGKILL)
        deaths += 1
    code = served.process.wait(timeout=GUARD_S)
    log = served.output()
    assert deaths == 6, log
    assert code == 1, log
    # The last line of tickguard's own: the give-up line (the server log's tail follows it).
    gave_up = [line for line in log.splitlines() if "gave up restarting postgres" in line]
    assert len(gave_up) == 1, log
    assert "embedded PostgreSQL" in gave_up[0] and "killed by SIGKILL" in gave_up[0], log
    # Nothing of the server keeps running, and the directory is free again.
    assert not any(_postgres_in(p, data) for p in psutil.process_iter(["name"]))


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _postgres_in(process: psutil.Process, data: Path) -> bool:
    try:
        return process.info["name"] == "postgres" and Path(process.cwd()).is_relative_to(data)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


UNAVAILABLE = "database unavailable: %s"  # as persistence and web say it
FLOOR = "Failed to restore the pool connection floor; retrying"  # as asyncpg 0.30+ says it


def outage_record(
    name: str, message: str, *args: object, error: BaseException | None = None
) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error is not None else None
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, exc_info)


def test_outage_lines_are_limited_to_one_per_interval_with_a_count() -> None:
    now = [0.0]
    outage = OutageLog(10.0, clock=lambda: now[0])
    passed = []
    for i in range(50):
        now[0] = i * 0.1  # 5 s of one failed request every 100 ms
        record = outage_record(
            "tickguard.web", "database unavailable: %s", DatabaseUnavailable("x")
        )
        if outage.filter(record):
            passed.append(record.getMessage())
    assert passed == ["database unavailable: x"]
    now[0] = 12.0
    record = outage_record("tickguard.web", UNAVAILABLE, DatabaseUnavailable("y"))
    assert outage.filter(record)
    assert record.getMessage() == "database unavailable: y [49 more like this in the last 12 s]"
    assert outage.held_back == 49


def test_asyncpg_reconnect_tracebacks_shrink_to_one_line() -> None:
    outage = OutageLog(10.0, clock=lambda: 0.0)
    refused = ConnectionRefusedError(111, "Connection refused")
    first = outage_record(
        "asyncpg.pool", "Failed to restore the pool connection floor; retrying", error=refused
    )
    assert outage.filter(first)
    assert first.exc_info is None
    assert first.getMessage().endswith("(ConnectionRefusedError: [Errno 111] Connection refused)")
    again = outage_record(
        "asyncpg.pool", "Failed to restore the pool connection floor; retrying", error=refused
    )
    assert not outage.filter(again)
    # Lines about anything else pass untouched.
    other = outage_record("tickguard.web", "feed did not confirm %s", "BTC-USD")
    assert outage.filter(other) and other.getMessage() == "feed did not confirm BTC-USD"
