"""A Redis for tests: ``TEST_REDIS_URL`` when set, else a ``redis-server`` of the test's own.

A server of our own listens on a free loopback port, keeps nothing on disk (``--save ""
--appendonly no``) and is killed at teardown. Outage tests always get their own (``own_redis``),
which they may stop and start again on the same port; a shared server is never stopped, and
never flushed (DESIGN.md "Testing").
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = "/usr/bin/redis-server"
START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on a fixed port, stoppable and restartable (same port)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port if port is not None else _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start it and return once it answers PING (``RuntimeError`` if it does not)."""
        assert not self.running, "already running"
        self._process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers_ping(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill it (SIGKILL: an outage, not a shutdown) and wait until it is gone."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait(timeout=10)
            self._process = None


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server that belongs to this test (started; killed at teardown)."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip(f"{REDIS_SERVER} is missing (Debian: apt-get install redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="tickguard-redis-"))
    server = RedisServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """``TEST_REDIS_URL`` when set, else the URL of a redis-server of this test's own."""
    shared = os.environ.get("TEST_REDIS_URL")
    if shared:
        return shared
    server: RedisServer = request.getfixturevalue("own_redis")
    return server.url
