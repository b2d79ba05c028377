"""The single binary (dist/tickguard, built by `make binary`) as an operator runs it.

Each test runs the built executable as a plain subprocess, with a minimal environment (no
virtualenv on PATH, no PYTHON* variables) and its own TICKGUARD_DATA_DIR, so the embedded
PostgreSQL, the migrations and the simulator must all come out of the bundle. As root (here and
in CI) this also covers the server running as its own user from the privately unpacked bundle.

Skipped unless the binary exists at dist/tickguard or TICKGUARD_BINARY names one.
Real clock throughout; every wait is for a condition, under a ``trio.fail_after`` hang guard.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio

from tickguard import __version__

ROOT = Path(__file__).resolve().parent.parent


def _binary() -> Path | None:
    named = os.environ.get("TICKGUARD_BINARY")
    candidate = Path(named).absolute() if named else ROOT / "dist" / "tickguard"
    return candidate if candidate.is_file() else None


BINARY = _binary()

pytestmark = [
    pytest.mark.binary,
    pytest.mark.skipif(
        BINARY is None, reason="no built binary (run `make binary` or set TICKGUARD_BINARY)"
    ),
]

# Hang guards, not speed limits: a first start unpacks the bundle and runs initdb, which is
# slow on a loaded CI machine.
START_S = 120.0
STOP_S = 60.0
FEED_S = 30.0
_POLL_S = 0.05
# The server's user when tickguard runs as root (storage.embedded.SERVER_USER).
SERVER_USER = "pgserver"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _environment(data_dir: Path, port: int, feed_url: str) -> dict[str, str]:
    """What a machine without Python gives the binary: a system PATH and our settings."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "TICKGUARD_DATA_DIR": str(data_dir),
        "PORT": str(port),
        "COINBASE_WS_URL": feed_url,
        # The simulator serves the product list on the feed's port.
        "COINBASE_REST_URL": feed_url.replace("ws://", "http://", 1),
        "COINBASE_PRODUCTS": "BTC-USD",
        "WS_RECONNECT_BASE_MS": "100",
        "WS_RECONNECT_MAX_MS": "500",
    }
    if "TMPDIR" in os.environ:
        env["TMPDIR"] = os.environ["TMPDIR"]
    return env


def _loads(text: str) -> Any:
    return json.loads(text, parse_float=Decimal)


def _postgres_under(root: Path) -> list[psutil.Process]:
    """Live PostgreSQL processes working in a directory below ``root``."""
    found = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != "postgres":
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if process.status() != psutil.STATUS_ZOMBIE and Path(process.cwd()).is_relative_to(
                root.resolve()
            ):
                found.append(process)
    return found


class Running:
    """One started ``tickguard`` process, its logs in files (a pipe nobody reads could fill)."""

    def __init__(self, process: trio.Process, stdout_path: Path, stderr_path: Path) -> None:
        self.process = process
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path

    @classmethod
    async def start(cls, args: list[str], env: dict[str, str], cwd: Path, name: str) -> Running:
        assert BINARY is not None
        stdout_path = cwd / f"{name}.stdout"
        stderr_path = cwd / f"{name}.stderr"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        out = os.open(stdout_path, flags, 0o644)
        err = os.open(stderr_path, flags, 0o644)
        try:
            # cwd is the test's directory: the repository's .env must not leak in.
            process = await trio.lowlevel.open_process(
                [str(BINARY), *args], env=env, cwd=cwd, stdout=out, stderr=err
            )
        finally:
            os.close(out)
            os.close(err)
        return cls(process, stdout_path, stderr_path)

    def logs(self) -> str:
        return (
            f"exit status: {self.process.poll()}\n"
            f"--- stdout\n{self.stdout_path.read_text(errors='replace')[-4000:]}\n"
            f"--- stderr\n{self.stderr_path.read_text(errors='replace')[-8000:]}"
        )

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"tickguard exited early\n{self.logs()}")

    async def wait(self, timeout: float) -> int:
        """Wait at most ``timeout`` seconds for the exit; returns the exit status."""
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit; returns the exit status."""
        self.process.send_signal(sig)
        return await self.wait(STOP_S)

    async def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            with trio.fail_after(STOP_S):
                await self.process.wait()


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Any]:
    """``await launch(args, env, name)`` starts the binary in ``tmp_path``; whatever is still
    running at the end (a failed test) is killed, the embedded servers too."""
    started: list[Running] = []

    async def start(args: list[str], env: dict[str, str], name: str) -> Running:
        running = await Running.start(args, env, tmp_path, name)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.kill()
    for process in _postgres_under(tmp_path):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


async def _wait_healthy(service: Running, base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as client:
        with trio.fail_after(START_S):
            while True:
                service.check_alive()
                try:
                    response = await client.get("/health")
                except httpx.TransportError:
                    await trio.sleep(_POLL_S)
                    continue
                assert response.status_code == 200, response.text
                assert _loads(response.text)["ok"] is True
                return


async def _create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/api/positions", json=body)
    assert response.status_code == 201, response.text
    position: dict[str, Any] = _loads(response.text)["data"]
    return position


async def _list(client: httpx.AsyncClient, user: str) -> list[dict[str, Any]]:
    response = await client.get("/api/positions", params={"userId": user})
    assert response.status_code == 200, response.text
    positions: list[dict[str, Any]] = _loads(response.text)["data"]
    return positions


def _assert_server_ran_from_bundle(server: psutil.Process) -> Path:
    """The embedded server is the bundle's own PostgreSQL, not the build venv's; as root it
    runs as its own user. Returns the directory the bundle was unpacked into."""
    exe = Path(server.exe())
    assert not exe.is_relative_to(Path(sys.prefix).resolve()), exe
    assert exe.parts[-4:] == ("pgserver", "pginstall", "bin", "postgres"), exe
    if os.geteuid() == 0:
        assert server.uids().effective == pwd.getpwnam(SERVER_USER).pw_uid
    return exe.parents[3]


def test_version_prints() -> None:
    assert BINARY is not None
    done = subprocess.run(
        [str(BINARY), "--version"], capture_output=True, text=True, timeout=STOP_S, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"tickguard {__version__}"


async def test_serves_positions_on_the_embedded_database_and_stops_on_sigterm(
    tmp_path: Path, launch: Any
) -> None:
    port = _free_port()
    data_dir = tmp_path / "data"
    # Nothing listens on port 1: the service must start and serve without its feed.
    env = _environment(data_dir, port, "ws://127.0.0.1:1")
    service: Running = await launch(["serve"], env, "serve")
    base = f"http://127.0.0.1:{port}"
    await _wait_healthy(service, base)

    async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
        ready = await client.get("/ready")
        assert ready.status_code == 200, ready.text
        body = _loads(ready.text)
        assert body["ok"] is True and body["database"] == "ok"
        assert body["feed"]["products"]["BTC-USD"]["state"] != "live"

        created = await _create(
            client,
            userId="alice",
            symbol="btc-usd",
            side="long",
            entryPrice="65000.12345678",
            takeProfit=70000,
            stopLoss="60000.5",
        )
        assert created["symbol"] == "BTC-USD" and created["status"] == "open"
        assert created["entryPrice"] == Decimal("65000.12345678")
        listed = await _list(client, "alice")
        assert [p["id"] for p in listed] == [created["id"]]
        assert listed[0]["stopLoss"] == Decimal("60000.5")
        assert await _list(client, "bob") == []

    postmaster = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    assert postmaster in {process.pid for process in _postgres_under(tmp_path)}
    bundle = _assert_server_ran_from_bundle(psutil.Process(postmaster))

    assert await service.stop() == 0, service.logs()
    # A clean stop shuts the embedded server down and removes the unpacked bundle.
    assert _postgres_under(tmp_path) == []
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()
    if bundle.name.startswith("_MEI"):
        # A one-file build removes its unpacked copy (a one-dir build has none).
        assert not bundle.exists()
    assert "stopped" in service.stderr_path.read_text()


async def test_migrate_then_serve_an_existing_data_dir_keeps_positions(
    tmp_path: Path, launch: Any
) -> None:
    port = _free_port()
    data_dir = tmp_path / "data"
    env = _environment(data_dir, port, "ws://127.0.0.1:1")
    base = f"http://127.0.0.1:{port}"

    migrate: Running = await launch(["migrate"], env, "migrate")
    assert await migrate.wait(START_S) == 0, migrate.logs()
    assert "database is up to date" in migrate.stderr_path.read_text()
    assert _postgres_under(tmp_path) == []

    first: Running = await launch(["serve"], env, "serve-1")
    await _wait_healthy(first, base)
    async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
        created = await _create(
            client, userId="carol", symbol="BTC-USD", side="short", entryPrice="64000"
        )
    assert await first.stop() == 0, first.logs()

    second: Running = await launch(["serve"], env, "serve-2")
    await _wait_healthy(second, base)
    async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
        assert (await client.get("/ready")).status_code == 200
        listed = await _list(client, "carol")
    assert [(p["id"], p["side"], p["entryPrice"]) for p in listed] == [
        (created["id"], "short", Decimal("64000"))
    ]
    # No second cluster: the existing one was reused, never re-initialised.
    assert "creating the embedded PostgreSQL cluster" not in second.stderr_path.read_text()
    assert await second.stop() == 0, second.logs()


async def _simulator_url(sim: Running) -> str:
    with trio.fail_after(START_S):
        while True:
            sim.check_alive()
            match = re.search(r"simulator on (ws://\S+)", sim.stdout_path.read_text())
            if match:
                return match.group(1)
            await trio.sleep(_POLL_S)


async def test_binary_simulator_feeds_the_binary_service(tmp_path: Path, launch: Any) -> None:
    sim_env = _environment(tmp_path / "unused", _free_port(), "ws://127.0.0.1:1")
    sim: Running = await launch(
        ["sim", "--port", "0", "--products", "BTC-USD=65000", "--rate", "20"], sim_env, "sim"
    )
    feed_url = await _simulator_url(sim)

    port = _free_port()
    env = _environment(tmp_path / "data", port, feed_url)
    service: Running = await launch(["serve"], env, "serve")
    base = f"http://127.0.0.1:{port}"
    await _wait_healthy(service, base)
    async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
        with trio.fail_after(FEED_S):
            while True:
                service.check_alive()
                feed = _loads((await client.get("/ready")).text)["feed"]
                product = feed["products"]["BTC-USD"]
                if product["state"] == "live" and product["ticks"] > 0:
                    break
                await trio.sleep(_POLL_S)
        # Without entryPrice the position opens at the simulator's last price.
        created = await _create(client, userId="dave", symbol="BTC-USD", side="long")
    assert Decimal(0) < created["entryPrice"]

    assert await service.stop() == 0, service.logs()
    # The simulator prints its counters when stopped with Ctrl-C. (Its exit status is not
    # checked: sim/cli.py lets a KeyboardInterrupt wrapped in trio's ExceptionGroup escape.)
    await sim.stop(signal.SIGINT)
    line = next(line for line in sim.stderr_path.read_text().splitlines() if line[:1] == "{")
    stats = _loads(line)
    assert stats["connections_accepted"] >= 1 and stats["tickers_sent"] >= 1
