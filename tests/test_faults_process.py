"""Faults of the whole process: ``kill -9`` mid-cascade and SIGTERM under load.

tickguard runs as a real subprocess (``python -m tickguard serve``) on its own database,
created for the test on the session's PostgreSQL server and dropped afterwards, fed by a
simulator running in the test.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fault_helpers import GUARD_S, Figures, Run, audit, long_with_stop, seeds, until

from tickguard.sim import Simulator, open_simulator
from tickguard.storage import Database, open_database

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def figures() -> Iterator[Figures]:
    collected = Figures()
    yield collected
    collected.flush()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Tickguard:
    """One ``tickguard serve`` subprocess, its log in a file."""

    def __init__(self, process: trio.Process, base_url: str, log: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def tickguard_process(
    database_url: str, sim: Simulator, log: Path, **env: str
) -> AsyncIterator[Tickguard]:
    """Start ``python -m tickguard serve``; yields once /health answers; kills it on exit."""
    port = _free_port()
    environment = {
        **os.environ,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "DATABASE_URL": database_url,
        "COINBASE_WS_URL": sim.url,
        "COINBASE_REST_URL": sim.rest_url,
        "COINBASE_PRODUCTS": "BTC-USD",
        "WS_RECONNECT_BASE_MS": "20",
        "WS_RECONNECT_MAX_MS": "200",
        "SHUTDOWN_GRACE_MS": "5000",
        # The scenarios load cascades through the API from one address (web/identity.py).
        "RATE_LIMIT_PER_USER": "0",
        "RATE_LIMIT_PER_ADDRESS": "0",
        **env,
    }
    with open(log, "ab") as out:  # noqa: ASYNC230 (a local file, once, before the spawn)
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tickguard", "serve"],
            env=environment,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:

            async def healthy() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"tickguard exited:\n{log.read_text()[-3000:]}")  # noqa: ASYNC240
                try:
                    return (await http.get("/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await until(healthy, poll=0.05)
        yield Tickguard(process, base_url, log)
    finally:
        if process.poll() is None:
            process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await process.wait()


async def _create(http: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> list[str]:
    ids: list[str] = []

    async def worker(start: int) -> None:
        for body in bodies[start::16]:
            response = await http.post("/api/positions", json=body)
            assert response.status_code == 201, response.text
            ids.append(response.json()["data"]["id"])

    async with trio.open_nursery() as nursery:
        for start in range(16):
            nursery.start_soon(worker, start)
    return ids


async def _count_closed(db: Database, ids: list[str]) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM positions WHERE id::text = ANY($1::text[]) AND status='closed'",
            ids,
        )
    )


# --------------------------------------------------------------------- kill -9
@pytest.mark.parametrize("seed", seeds(1, 2))
async def test_kill_9_mid_cascade_then_restart_closes_each_crossed_stop_exactly_once(
    own_database: str, tmp_path: Path, figures: Figures, seed: int
) -> None:
    log = tmp_path / "tickguard.log"
    async with (
        open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim,
        open_database(own_database) as db,
    ):
        async with tickguard_process(own_database, sim, log) as first:
            async with httpx.AsyncClient(base_url=first.base_url, timeout=10) as http:
                bodies = [long_with_stop("alice", str(64000 + i)) for i in range(300)]
                triggered = await _create(http, bodies)
                untouched = await _create(http, [long_with_stop("bob", "60000")] * 4)
            # A few ticks one by one (each through ten stops, committed before the next),
            # then a burst through all the rest, and the kill lands while it is closing them.
            rng = random.Random(seed)
            first_steps = rng.randint(1, 5)
            for step in range(30):
                sim.publish("BTC-USD", str(64300 - 10 * (step + 1) - Decimal("0.5")))
                if step < first_steps:
                    done = 10 * (step + 1)

                    async def step_closed(done: int = done) -> bool:
                        return await _count_closed(db, triggered) >= done

                    await until(step_closed, poll=0.005)
            sim.publish("BTC-USD", "63900")
            await trio.sleep(rng.uniform(0, 0.1))  # where in the burst the kill lands
            first.process.send_signal(signal.SIGKILL)
            killed_at = trio.current_time()
            with trio.fail_after(10):
                await first.process.wait()
            closed_before = await _count_closed(db, triggered)
        # tickguard is down; it comes back on the same database.
        async with tickguard_process(own_database, sim, tmp_path / "restart.log"):
            await until(lambda: _all_closed(db, triggered))
            recovered = trio.current_time()
            await until(lambda: _outbox_empty(db))
        result = await audit(db, triggered, untouched)
    run = figures.record(Run("kill -9 mid-cascade, restart", f"seed {seed}", faults_injected=1))
    run.add_audit(result)
    run.recovery_s = round(recovered - killed_at, 3)  # includes the process start-up
    print(f"kill -9: {closed_before} of {len(triggered)} closed before the kill")
    result.assert_clean()


async def _all_closed(db: Database, ids: list[str]) -> bool:
    return await _count_closed(db, ids) == len(ids)


async def _outbox_empty(db: Database) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM events WHERE published_at IS NULL") == 0)


# --------------------------------------------------------------------- SIGTERM under load
async def test_sigterm_under_load_finishes_or_fails_requests_cleanly_and_exits_0(
    own_database: str, tmp_path: Path, figures: Figures
) -> None:
    log = tmp_path / "tickguard.log"
    answered: dict[str, list[int]] = {"created": [], "other": []}
    created_ids: list[str] = []
    transport_errors = 0
    async with (
        open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim,
        open_database(own_database) as db,
    ):
        async with tickguard_process(own_database, sim, log) as service:
            async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as http:
                triggered = await _create(
                    http, [long_with_stop("alice", str(64000 + i)) for i in range(200)]
                )
                stop_load = trio.Event()

                async def load(worker: int) -> None:
                    nonlocal transport_errors
                    i = 0
                    while not stop_load.is_set():
                        i += 1
                        body = long_with_stop(f"user{worker}", str(60000 + i))
                        try:
                            response = await http.post("/api/positions", json=body)
                        except httpx.TransportError:
                            transport_errors += 1
                            return  # the server went away: a clean failure
                        if response.status_code == 201:
                            answered["created"].append(201)
                            created_ids.append(response.json()["data"]["id"])
                        else:
                            answered["other"].append(response.status_code)

                async with trio.open_nursery() as nursery:
                    for worker in range(8):
                        nursery.start_soon(load, worker)
                    await until(lambda: _at_least(answered["created"], 50), poll=0.01)
                    for step in range(20):  # a cascade in flight as the signal arrives
                        sim.publish("BTC-USD", str(64200 - 10 * (step + 1)))
                    service.process.send_signal(signal.SIGTERM)
                    signalled_at = trio.current_time()
                    with trio.fail_after(GUARD_S):
                        code = await service.process.wait()
                    stopped_at = trio.current_time()
                    stop_load.set()
        # Everything a client was told was created is there, with its created event.
        missing = await db.fetchval(
            "SELECT count(*) FROM unnest($1::uuid[]) AS c(id) "
            "WHERE NOT EXISTS (SELECT 1 FROM positions p WHERE p.id = c.id)",
            [uuid.UUID(i) for i in created_ids],
        )
        half_written = await db.fetchval(
            """SELECT count(*) FROM positions p WHERE
                 (SELECT count(*) FROM events e WHERE e.position_id = p.id
                   AND e.type = 'position.created') <> 1
              OR (p.status = 'closed') <> EXISTS (SELECT 1 FROM events e
                   WHERE e.position_id = p.id AND e.type = 'position.closed')"""
        )
        doubled = await db.fetchval(
            """SELECT count(*) FROM (SELECT position_id FROM events
                WHERE type = 'position.closed' GROUP BY position_id HAVING count(*) > 1) d"""
        )
        closed = await _count_closed(db, triggered)
    run = figures.record(Run("SIGTERM under load (exit 0)", faults_injected=1))
    run.positions_triggered = closed
    run.closed_once = closed - doubled
    run.doubled = doubled
    run.lost = missing
    run.missing_events = half_written
    run.recovery_s = round(stopped_at - signalled_at, 3)  # here: time to a clean exit
    assert code == 0, service.log_text()[-3000:]
    assert set(answered["other"]) <= {503}, answered["other"]
    assert (missing, half_written, doubled) == (0, 0, 0)
    assert "received SIGTERM" in service.log_text()


async def _at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n
