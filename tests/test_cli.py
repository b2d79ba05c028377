"""The `tickguard` command as a user runs it: a real process, the embedded PostgreSQL, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tickguard import __version__

pytestmark = pytest.mark.timeout(240)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "PORT"}}
    env.update(
        TICKGUARD_DATA_DIR=str(data_dir),
        # Nothing listens there: the service must start and serve without a feed.
        COINBASE_WS_URL="ws://127.0.0.1:9",
        COINBASE_REST_URL="http://127.0.0.1:9",
        WS_RECONNECT_BASE_MS="100",
        WS_RECONNECT_MAX_MS="500",
        SHUTDOWN_GRACE_MS="5000",
        **extra,
    )
    return env


def tickguard(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tickguard", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


class Served:
    """`tickguard serve` in a subprocess, until stop()."""

    def __init__(self, data_dir: Path, cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / f"serve-{self.port}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tickguard", "serve"],
            env=environment(data_dir, PORT=str(self.port)),
            cwd=cwd,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while True:
            assert self.process.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)


def test_version_and_help(tmp_path: Path) -> None:
    done = tickguard("--version", env=environment(tmp_path), cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"tickguard {__version__}"
    done = tickguard("--help", env=environment(tmp_path), cwd=tmp_path)
    assert done.returncode == 0
    for command in ("serve", "migrate", "db", "sim"):
        assert command in done.stdout


def test_a_bad_variable_stops_start_up_naming_it(tmp_path: Path) -> None:
    done = tickguard("serve", env=environment(tmp_path, PORT="eighty"), cwd=tmp_path)
    assert done.returncode == 2
    assert "PORT" in done.stderr and "eighty" in done.stderr


def test_serve_on_the_embedded_database_keeps_data_and_stops_in_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    served = Served(data, tmp_path)
    try:
        ready = httpx.get(served.url + "/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["database"] == "ok"
        created = httpx.post(
            served.url + "/api/positions",
            json={
                "userId": "u1",
                "symbol": "BTC-USD",
                "side": "long",
                "entryPrice": "100.5",
                "stopLoss": 90,
            },
            timeout=10,
        )
        assert created.status_code == 201, created.text
    finally:
        code = served.stop()
    log = served.output()
    assert code == 0, log
    assert f"embedded PostgreSQL in {data}" in log
    assert "ws://127.0.0.1:9" in log and f"127.0.0.1:{served.port}" in log
    stops = [
        line.split(": stopping")[0].rsplit(" ", 1)[-1]
        for line in log.splitlines()
        if line.endswith(": stopping")
    ]
    assert stops[:4] == ["web", "feed", "recovery", "engines"]  # recovery releases its holds
    assert stops.index("persistence") < stops.index("fanout")
    # Started again on the same directory: the position is still there.
    again = Served(data, tmp_path)
    try:
        listed = httpx.get(again.url + "/api/positions", params={"userId": "u1"}, timeout=10)
        assert [p["id"] for p in listed.json()["data"]] == [created.json()["data"]["id"]]
    finally:
        assert again.stop(signal.SIGINT) == 0, again.output()


def test_db_dump_and_restore_round_trip_the_positions(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    served = Served(source, tmp_path)
    try:
        for price in ("1", "2.5", "3.12345678"):
            response = httpx.post(
                served.url + "/api/positions",
                json={"userId": "u1", "symbol": "ETH-USD", "side": "short", "entryPrice": price},
                timeout=10,
            )
            assert response.status_code == 201, response.text
        before = httpx.get(served.url + "/api/positions", params={"userId": "u1"}).json()
    finally:
        assert served.stop() == 0
    dump = tmp_path / "tickguard.dump"
    done = tickguard("db", "dump", str(dump), env=environment(source), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert dump.stat().st_size > 0
    done = tickguard("db", "restore", str(dump), env=environment(target), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    restored = Served(target, tmp_path)
    try:
        after = httpx.get(restored.url + "/api/positions", params={"userId": "u1"}).json()
    finally:
        assert restored.stop() == 0
    assert after == before and len(after["data"]) == 3


def test_a_taken_port_or_data_directory_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    data = tmp_path / "data"
    served = Served(data, tmp_path)
    try:
        # The same data directory, while the first process owns it.
        done = tickguard("serve", env=environment(data, PORT=str(free_port())), cwd=tmp_path)
        assert done.returncode == 1
        assert "in use by another tickguard process" in done.stderr
        assert "Traceback" not in done.stderr.splitlines()[-1]
        # Another data directory, but the first process's port.
        done = tickguard(
            "serve", env=environment(tmp_path / "other", PORT=str(served.port)), cwd=tmp_path
        )
        assert done.returncode == 1
        port = served.port
        assert done.stderr.splitlines()[-1] == (
            f"tickguard: cannot listen on 127.0.0.1:{port} (HOST=127.0.0.1 PORT={port}): "
            "Address already in use; stop what uses it or choose another PORT"
        )
    finally:
        assert served.stop() == 0


def test_a_busy_port_is_refused_before_any_database_is_made(tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = tickguard("serve", env=environment(data, PORT=str(port)), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    last = done.stderr.splitlines()[-1]
    assert f"127.0.0.1:{port}" in last and f"PORT={port}" in last, last
    # Nothing was created or migrated for a service that cannot listen.
    assert not (data / "pgdata").exists()
    assert "creating the embedded PostgreSQL" not in done.stderr
    assert "migration" not in done.stderr
    assert "Traceback" not in done.stderr


def unreachable_database(tmp_path: Path) -> tuple[dict[str, str], int]:
    """An environment whose DATABASE_URL points at a local port nothing listens on."""
    port = free_port()
    url = f"postgresql://app:s3cret@127.0.0.1:{port}/app"
    return environment(tmp_path / "unused", DATABASE_URL=url, PORT=str(free_port())), port


def test_an_unreachable_database_url_is_waited_for_then_named(tmp_path: Path) -> None:
    env, port = unreachable_database(tmp_path)
    started = time.monotonic()
    done = tickguard("serve", env=env, cwd=tmp_path)
    waited = time.monotonic() - started
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    where = f"DATABASE_URL=postgresql://app@127.0.0.1:{port}/app"
    assert "s3cret" not in done.stderr
    waiting = [line for line in lines if "waiting for the database" in line]
    assert f"waiting for the database at {where} for up to 30 s" in waiting[0]
    # Progress at most every 10 s over 30 s, not one line per attempt.
    assert 1 <= len(waiting) <= 4, "\n".join(lines)
    assert lines[-1].startswith(
        f"tickguard: database: gave up after waiting 30 s for the database at {where}"
    ), lines[-1]
    assert "Traceback" not in done.stderr
    assert len(lines) <= 8, "\n".join(lines)
    assert waited >= 30


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_waiting_for_the_database_stops_in_one_line(
    tmp_path: Path, sig: signal.Signals
) -> None:
    env, _ = unreachable_database(tmp_path)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tickguard", "serve"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "waiting for the database" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        process.send_signal(sig)
        code = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = log.read_text().splitlines()
    assert code == 0, "\n".join(lines)
    assert "Traceback" not in log.read_text()
    assert lines[-1].endswith(f"received {sig.name} while starting; stopped"), lines[-1]
    assert len(lines) <= 5, "\n".join(lines)
