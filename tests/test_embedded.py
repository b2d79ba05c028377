"""The embedded PostgreSQL, for real: fresh directory, restart with data, a previous owner
killed with SIGKILL, stale lock files, a data directory from another major version."""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
import trio
import trio_asyncio

from tickguard.storage.embedded import (
    SERVER_USER,
    DataVersionMismatch,
    EmbeddedDatabaseError,
    EmbeddedPostgres,
    bin_dir,
    embedded_postgres,
    server_major_version,
)

IS_ROOT = os.geteuid() == 0
HANG_GUARD = 30.0


def fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    """Run one statement through asyncpg on trio-asyncio, as tickguard's storage does."""

    async def run() -> list[asyncpg.Record]:
        with trio.fail_after(HANG_GUARD):
            async with trio_asyncio.open_loop():
                conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn)
                try:
                    return await trio_asyncio.aio_as_trio(conn.fetch)(sql)
                finally:
                    await trio_asyncio.aio_as_trio(conn.close)()

    return trio.run(run)


def wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_servers_under(root: Path) -> None:
    """Teardown: no server a failed test started may outlive it."""
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != "postgres":
            continue
        try:
            if Path(process.cwd()).is_relative_to(root.resolve()):
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "data"
    kill_servers_under(tmp_path)


@pytest.fixture(scope="session")
def template() -> Iterator[Path]:
    """One initialised data directory, copied by the tests that do not test initdb."""
    # Not under pytest's base directory, which another pytest session may reset to 0700.
    scratch = Path(tempfile.mkdtemp(prefix="tickguard-template-"))
    root = scratch / "data"
    with embedded_postgres(root) as dsn:
        fetch(dsn, "CREATE TABLE seed (id int PRIMARY KEY, note text)")
        fetch(dsn, "INSERT INTO seed VALUES (1, 'from the template')")
    yield root
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def initialised(template: Path, data_dir: Path) -> Path:
    # copytree does not keep owners: as root the copy is root's, which start() must fix.
    shutil.copytree(template, data_dir, symlinks=True)
    return data_dir


def test_starts_on_an_empty_directory_and_stops(data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir)
    dsn = server.start()
    try:
        pid = server.pid
        assert pid is not None
        assert dsn.startswith("postgresql://postgres@/postgres?host=/")
        rows = fetch(dsn, "SELECT current_setting('listen_addresses') AS tcp, version() AS v")
        assert rows[0]["tcp"] == ""
        assert f"PostgreSQL {server_major_version()}." in rows[0]["v"]
        assert (data_dir / "pgdata" / "PG_VERSION").read_text().strip() == server_major_version()
        expected_user = SERVER_USER if IS_ROOT else psutil.Process().username()
        assert psutil.Process(pid).username() == expected_user
    finally:
        server.stop()
    assert gone(pid)
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()
    with pytest.raises(EmbeddedDatabaseError, match="not running"):
        _ = server.dsn


def test_restart_keeps_the_data(initialised: Path) -> None:
    with embedded_postgres(initialised) as dsn:
        assert fetch(dsn, "SELECT note FROM seed")[0]["note"] == "from the template"
        fetch(dsn, "CREATE TABLE kept (n numeric(18,8))")
        fetch(dsn, "INSERT INTO kept VALUES (65000.5)")
    with embedded_postgres(initialised) as dsn:
        rows = fetch(dsn, "SELECT n::text AS n FROM kept")
    assert [row["n"] for row in rows] == ["65000.50000000"]


CHILD = """
import sys
from pathlib import Path
from tickguard.storage.embedded import EmbeddedPostgres
server = EmbeddedPostgres(Path(sys.argv[1]))
dsn = server.start()
print("READY", server.pid, dsn, flush=True)
sys.stdin.read()
"""


def test_starts_after_its_previous_owner_was_killed(initialised: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(initialised)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], HANG_GUARD)
        assert ready, "the child did not start its server"
        word, old_pid, old_dsn = child.stdout.readline().split()
        assert word == "READY"
        fetch(old_dsn, "INSERT INTO seed VALUES (2, 'written before kill -9')")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The scenario is real: the orphaned server is still running on the data directory.
    assert not gone(int(old_pid))

    with embedded_postgres(initialised) as dsn:
        rows = fetch(dsn, "SELECT note FROM seed ORDER BY id")
        assert [row["note"] for row in rows] == ["from the template", "written before kill -9"]
    assert gone(int(old_pid))


@pytest.fixture
def unrelated_process() -> Iterator[subprocess.Popen[bytes]]:
    """A live process of the server's user: what a recycled pid in a stale lock file names
    after a reboot or container restart. PostgreSQL alone refuses to start over it."""
    extra = {}
    if IS_ROOT:
        account = pwd.getpwnam(SERVER_USER)
        extra = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    sleeper = subprocess.Popen(["sleep", "300"], **extra)  # type: ignore[call-overload]
    yield sleeper
    sleeper.kill()
    sleeper.wait()


@pytest.mark.parametrize("owner", ["dead", "recycled"])
def test_starts_over_stale_lock_files_of_a_killed_server(
    initialised: Path, owner: str, unrelated_process: subprocess.Popen[bytes]
) -> None:
    server = EmbeddedPostgres(initialised)
    dsn = server.start()
    killed = server.pid
    assert killed is not None
    fetch(dsn, "INSERT INTO seed VALUES (3, 'before the server was killed')")
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: gone(killed), "the killed server to exit")
    server.stop()  # reaps it; a killed server cleans nothing up
    pid_file = initialised / "pgdata" / "postmaster.pid"
    socket_lock = initialised / "pgdata" / ".s.PGSQL.5432.lock"
    assert pid_file.exists() and socket_lock.exists()
    if owner == "recycled":
        stale_pid = str(unrelated_process.pid)
        for lock in (pid_file, socket_lock):
            lines = lock.read_text().splitlines()
            lock.write_text("\n".join([stale_pid, *lines[1:]]) + "\n")

    with embedded_postgres(initialised) as dsn:
        rows = fetch(dsn, "SELECT note FROM seed WHERE id = 3")
    assert [row["note"] for row in rows] == ["before the server was killed"]
    assert unrelated_process.poll() is None, "recovery must not touch unrelated processes"


def test_a_data_directory_of_another_major_version_is_refused(initialised: Path) -> None:
    version_file = initialised / "pgdata" / "PG_VERSION"
    version_file.write_text("15\n")
    with pytest.raises(DataVersionMismatch) as caught:
        EmbeddedPostgres(initialised).start()
    message = str(caught.value)
    assert "PostgreSQL 15" in message
    assert f"PostgreSQL {server_major_version()}" in message
    assert "tickguard db dump" in message
    assert (caught.value.data_version, caught.value.server_version) == (
        "15",
        server_major_version(),
    )
    assert not (initialised / "pgdata" / "postmaster.pid").exists()
    # The refusal released the directory and changed nothing: with the right version it starts.
    version_file.write_text(f"{server_major_version()}\n")
    with embedded_postgres(initialised) as dsn:
        assert len(fetch(dsn, "SELECT * FROM seed")) == 1


def test_a_second_owner_of_the_directory_is_refused(initialised: Path) -> None:
    with embedded_postgres(initialised) as dsn:
        with pytest.raises(EmbeddedDatabaseError, match=f"in use by another.*pid {os.getpid()}"):
            EmbeddedPostgres(initialised).start()
        assert len(fetch(dsn, "SELECT * FROM seed")) == 1


def test_a_directory_without_a_cluster_is_not_overwritten(data_dir: Path) -> None:
    (data_dir / "pgdata").mkdir(parents=True)
    (data_dir / "pgdata" / "precious.txt").write_text("mine")
    with pytest.raises(EmbeddedDatabaseError, match="no PG_VERSION"):
        EmbeddedPostgres(data_dir).start()
    assert (data_dir / "pgdata" / "precious.txt").read_text() == "mine"


def test_a_bare_cluster_as_data_directory_is_refused(template: Path, data_dir: Path) -> None:
    shutil.copytree(template / "pgdata", data_dir, symlinks=True)
    with pytest.raises(EmbeddedDatabaseError, match="is itself a PostgreSQL data directory"):
        EmbeddedPostgres(data_dir).start()
    assert not (data_dir / "pgdata").exists()


def test_a_long_data_directory_gets_a_short_socket_directory(
    template: Path, tmp_path: Path
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "data"
    shutil.copytree(template, deep, symlinks=True)
    try:
        with embedded_postgres(deep) as dsn:
            host = dsn.partition("?host=")[2]
            assert len(host) + len("/.s.PGSQL.5432") < 107
            assert stat_mode(Path(host)) == 0o700
            assert len(fetch(dsn, "SELECT * FROM seed")) == 1
    finally:
        kill_servers_under(tmp_path)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def reachable_by_others(path: Path) -> bool:
    return all(parent.stat().st_mode & 0o001 for parent in path.resolve().parents)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a child as another user")
@pytest.mark.skipif(
    not reachable_by_others(Path(sys.executable)),
    reason="the Python interpreter is not reachable by other users (e.g. under /root)",
)
def test_runs_as_a_normal_user(template: Path, tmp_path: Path) -> None:
    home = tmp_path / "nobody"
    home.mkdir()
    shutil.copytree(template, home / "data", symlinks=True)
    account = pwd.getpwnam("nobody")
    for path in [home, *home.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
    os.chmod(tmp_path, 0o755)
    script = CHILD.replace("sys.stdin.read()", "server.stop()")
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, str(home / "data")],
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=HANG_GUARD,
            env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
        )
    finally:
        kill_servers_under(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("READY ")
    # The normal user kept the cluster: no hand-over to the root-only server account.
    assert (home / "data" / "pgdata").stat().st_uid == account.pw_uid


def test_bin_dir_holds_the_dump_and_restore_tools() -> None:
    for tool in ("pg_dump", "pg_restore", "psql", "postgres", "initdb"):
        assert os.access(bin_dir() / tool, os.X_OK), tool


def test_restart_after_the_server_was_killed_keeps_data_dsn_and_directory(
    initialised: Path,
) -> None:
    server = EmbeddedPostgres(initialised)
    dsn = server.start()
    try:
        killed = server.pid
        assert killed is not None and server.running
        fetch(dsn, "INSERT INTO seed VALUES (4, 'committed before the kill')")
        os.kill(killed, signal.SIGKILL)

        async def exit_status() -> int:
            with trio.fail_after(HANG_GUARD):
                return await server.wait_exited()

        assert trio.run(exit_status) == -signal.SIGKILL
        assert gone(killed) and not psutil.pid_exists(killed), "reaped, not left a zombie"
        assert not server.running
        # Dead, but still ours: nobody else may take the directory meanwhile.
        with pytest.raises(EmbeddedDatabaseError, match="in use by another"):
            EmbeddedPostgres(initialised).start()

        assert server.restart() == dsn
        assert server.running and server.pid != killed
        rows = fetch(dsn, "SELECT note FROM seed WHERE id = 4")
        assert [row["note"] for row in rows] == ["committed before the kill"]
        with pytest.raises(EmbeddedDatabaseError, match="still running"):
            server.restart()
    finally:
        server.stop()
    assert not (initialised / "pgdata" / "postmaster.pid").exists()
