"""PostgreSQL stopped with ``pg_ctl stop -m immediate`` in the middle of a stop cascade.

Always on a server this test owns (an embedded PostgreSQL in ``tmp_path``), never the shared
one behind TEST_DATABASE_URL. While it is down the API answers 503; when it is back everything
resumes by itself: nothing lost or closed twice, every committed close has exactly one event.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fault_helpers import (
    GUARD_S,
    Figures,
    Run,
    all_closed,
    audit,
    audit_stream,
    create_many,
    faulty_service,
    long_with_stop,
    seeds,
    until,
)
from service_harness import event_stream, wait_until_live

from tickguard.sim import open_simulator
from tickguard.storage import Database, migrate, open_database
from tickguard.storage.embedded import SERVER_USER, EmbeddedPostgres, bin_dir

OUTAGE_S = 1.5  # how long the database stays down (the fault's length, not a wait)


@pytest.fixture(scope="module")
def figures() -> Iterator[Figures]:
    collected = Figures()
    yield collected
    collected.flush()


def pg_ctl_stop_immediate(server: EmbeddedPostgres) -> None:
    """``pg_ctl stop -m immediate`` on ``server`` (as the account that runs it when root)."""
    account: dict[str, Any] = {}
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVER_USER)
        account = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    subprocess.run(
        [str(bin_dir() / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D", str(server.pgdata)],
        check=True,
        capture_output=True,
        timeout=30,
        **account,
    )


async def closed_count(db: Database, ids: list[str]) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM positions WHERE id::text = ANY($1::text[]) AND status='closed'",
            ids,
        )
    )


@pytest.mark.parametrize("seed", seeds(1, 2))
async def test_postgres_stopped_mid_cascade_then_started_loses_and_doubles_nothing(
    tmp_path: Path, figures: Figures, seed: int
) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    dsn = await trio.to_thread.run_sync(server.start)
    try:
        async with open_database(dsn, timeout=2.0) as db:
            await migrate(db)
            async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
                async with faulty_service(db, sim) as service:
                    await wait_until_live(service)
                    async with event_stream(service, "alice") as alice:
                        wanted = [long_with_stop("alice", str(64000 + i)) for i in range(200)]
                        spared = [long_with_stop("alice", "60000") for _ in range(4)]
                        triggered = [p["id"] for p in await create_many(service.http, wanted)]
                        untouched = [p["id"] for p in await create_many(service.http, spared)]
                        await alice.wait_for("position.created", 204)
                        # Twenty ticks, each through ten more stops: closes commit in steps.
                        for step in range(20):
                            sim.publish("BTC-USD", str(64200 - 10 * (step + 1) + seed))
                        await until(lambda: _some_closed(db, triggered), poll=0.001)
                        stopped_at = trio.current_time()
                        await trio.to_thread.run_sync(pg_ctl_stop_immediate, server)
                        sim.publish("BTC-USD", "63900")  # crosses the rest while it is down
                        # Down: the API answers 503 (the guard only stops a hang).
                        with trio.fail_after(10):
                            listing = await service.http.get(
                                "/api/positions", params={"userId": "alice"}
                            )
                            ready = await service.http.get("/ready")
                        assert listing.status_code == 503, listing.text
                        assert "error" in listing.json()
                        assert ready.status_code == 503
                        await trio.sleep(OUTAGE_S)  # the outage lasts a while on purpose
                        await trio.to_thread.run_sync(server.stop)
                        assert await trio.to_thread.run_sync(server.start) == dsn
                        await until(_api_answers(service))
                        await until(lambda: all_closed(db, triggered))
                        recovered = trio.current_time()
                        await alice.wait_for("position.closed", 200, timeout=GUARD_S)
                        await until(_outbox_empty(db))
                        stream_result = audit_stream(alice, triggered)
                    result = await audit(db, triggered, untouched)
    finally:
        await trio.to_thread.run_sync(server.stop)
    run = figures.record(Run("PostgreSQL stopped (immediate) mid-cascade", f"seed {seed}"))
    run.faults_injected = 1
    run.add_audit(result)
    run.add_stream(stream_result)
    run.recovery_s = round(recovered - stopped_at, 3)
    result.assert_clean()
    stream_result.assert_clean()


def _some_closed(db: Database, ids: list[str]) -> Any:
    async def check() -> bool:
        return await closed_count(db, ids) > 0

    return check()


def _api_answers(service: Any) -> Any:
    async def check() -> bool:
        response = await service.http.get("/api/positions", params={"userId": "alice"})
        return bool(response.status_code == 200)

    return check


def _outbox_empty(db: Database) -> Any:
    async def check() -> bool:
        return bool(
            await db.fetchval("SELECT count(*) FROM events WHERE published_at IS NULL") == 0
        )

    return check
