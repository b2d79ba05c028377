"""``kill -9`` in the middle of a 3,000-position stop cascade, the price back above every stop
before the restart (issue 14): every crossed position still closes, exactly once.

A real ``tickguard serve`` process on its own database (on the session's PostgreSQL server),
fed by the simulator over real sockets. 3,000 long positions of 30 users have their stops
between 64,000 and 64,299.9; one trade at 63,900 crosses them all. The engine judges that one
window and sends its closes in growing requests, one at a time (issue 16: the first holds
``EngineConfig.first_batch``, 128, the next up to ``batch_growth`` (8) times the previous: 128,
1,024, then the last 1,848); persistence commits each request as one transaction (in pieces of
``PersistenceConfig.close_chunk``, 2,500, were it larger), and the symbol's watermark advances
only in the transaction of the request that holds the last of them (a watermark never passes a
close that did not commit).

Making the kill land mid-cascade every time: polling the closed count alone is a race. Here
(2 shared cores, 2026-12-02), polling every 2 ms without the lock below saw the count go from 0
straight to 3,000 in 2 runs of 3, and 2,500 for 0.21 s in the third (then with one request
committed in pieces of 2,500); a kill sent on seeing a partial count can still arrive after the
last piece committed. So the test also holds a row lock on the symbol's watermark row
(``SELECT ... FOR UPDATE`` on its own connection) while the cascade runs: the first requests
commit, the last one's transaction (its closes written, not committed) waits on that lock when
it advances the watermark. The test kills tickguard once the closed count is
strictly between 0 and 3,000 and a backend of the database waits on a lock, then releases the
lock (the orphaned transaction then finds its client gone and rolls back). It is a real fault
of a real database (a commit held up by another transaction), not a stand-in.

Then the simulator trades at 65,000 (inside every bracket) while tickguard is dead, and the
service starts again on the same database. The ticker it gets after subscribing says 65,000:
only the gap recovery (the crossing trade fetched over REST from the watermark on) can close
the ones still open (1,848 with the default batch sizes). The test asserts, behind
``trio.fail_after`` hang guards: every crossed position is closed, at its stop level
(``GAP_FILL=level``, the default), triggered at the crossing trade's time, with exactly one
``position.closed`` row in ``events``, ``"recovered": true`` exactly on those closed after the
restart; no uncrossed position is closed; each user's
event seqs run 1..n; the outbox ends empty. 6-12 s here (2 shared cores).
"""

from __future__ import annotations

import re
import signal
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import trio
import trio_asyncio
from fault_helpers import Figures, Run, audit, until
from test_faults_process import tickguard_process

from tickguard.actors.engine import EngineConfig
from tickguard.domain import NewPosition
from tickguard.sim import Simulator, open_simulator
from tickguard.storage import Database, migrate, open_database, watermarks, writes
from tickguard.wire import loads

PRODUCT = "BTC-USD"
CROSSED = 3_000
USERS = 30  # 100 crossed positions each: every piece of the cascade spans many users
STOP_BASE = Decimal("64000")  # crossed stops: 64,000.0 .. 64,299.9
TAKE_PROFIT = Decimal("66000")
CROSSING_PRICE = "63900"  # below every crossed stop, above every uncrossed one
BACK_PRICE = "65000"  # inside every bracket: the live ticker after the restart closes nothing
WAITING_ON_A_LOCK = """SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock'"""
BUSY_BACKENDS = """SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND backend_type = 'client backend'
      AND pid <> pg_backend_pid() AND state <> 'idle'"""


@pytest.fixture(scope="module")
def figures() -> Iterator[Figures]:
    collected = Figures()
    yield collected
    collected.flush()


def crossed_positions() -> list[NewPosition]:
    return [
        NewPosition(
            user_id=f"cascade-{i % USERS:02d}",
            symbol=PRODUCT,
            side="long",
            entry_price=Decimal("65000"),
            take_profit=TAKE_PROFIT,
            stop_loss=STOP_BASE + Decimal(i) / 10,
        )
        for i in range(CROSSED)
    ]


def uncrossed_positions() -> list[NewPosition]:
    """Longs and shorts whose brackets hold both 63,900 and 65,000."""
    entry, low, high = Decimal("65000"), Decimal("60000"), Decimal("70000")
    longs = [NewPosition("spared", PRODUCT, "long", entry, high, low) for _ in range(20)]
    shorts = [NewPosition("spared", PRODUCT, "short", entry, low, high) for _ in range(20)]
    return longs + shorts


async def seed(db: Database, requests: list[NewPosition]) -> list[str]:
    """Store positions through the persistence actor's own writer (one transaction), before
    tickguard starts: its engine loads them at start-up."""
    results, _ = await writes.create_positions(db, requests, max_open_per_user=10**6)
    ids = []
    for result in results:
        assert not isinstance(result, Exception), result
        ids.append(str(result.position.id))
    return ids


async def count_closed(db: Database, ids: list[str]) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM positions WHERE id = ANY($1::uuid[]) AND status = 'closed'",
            [uuid.UUID(i) for i in ids],
        )
    )


async def open_ids(db: Database, ids: list[str]) -> set[str]:
    rows = await db.fetch(
        "SELECT id FROM positions WHERE id = ANY($1::uuid[]) AND status = 'open'",
        [uuid.UUID(i) for i in ids],
    )
    return {str(row["id"]) for row in rows}


class RowLock:
    """A transaction on its own connection holding one row lock until ``release``."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @classmethod
    async def take(cls, url: str, sql: str, *args: Any) -> RowLock:
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(url)
        await trio_asyncio.aio_as_trio(conn.execute)("BEGIN")
        locked = await trio_asyncio.aio_as_trio(conn.fetch)(sql, *args)
        assert len(locked) == 1, locked
        return cls(conn)

    async def release(self) -> None:
        if self.conn.is_closed():
            return
        await trio_asyncio.aio_as_trio(self.conn.execute)("ROLLBACK")
        await trio_asyncio.aio_as_trio(self.conn.close)()


async def test_kill_9_mid_cascade_of_3000_then_price_back_closes_each_crossed_stop_once(
    own_database: str,
    tmp_path: Path,
    figures: Figures,
) -> None:
    # The cascade must commit in several transactions, the watermark in the last one only.
    assert CROSSED > EngineConfig().first_batch, "the cascade must commit in pieces"
    async with (
        open_simulator({PRODUCT: BACK_PRICE}, heartbeat_interval=0.2) as sim,
        open_database(own_database, timeout=30.0) as db,
    ):
        await migrate(db)
        crossed = await seed(db, crossed_positions())
        spared = await seed(db, uncrossed_positions())
        async with tickguard_process(own_database, sim, tmp_path / "first.log") as first:
            quiet = await judged_with_watermark(db, sim)
            # Held from here: the cascade's last piece cannot advance the watermark past it.
            lock = await RowLock.take(
                own_database, "SELECT 1 FROM watermarks WHERE symbol = $1 FOR UPDATE", PRODUCT
            )
            try:
                crossing = sim.publish(PRODUCT, CROSSING_PRICE)
                crossing_time = sim.products[PRODUCT].last_time

                async def mid_cascade() -> bool:
                    closed = await count_closed(db, crossed)
                    # Loud, not a 60 s hang, if the cascade stops committing in pieces with
                    # the watermark in the last one (what this test relies on to kill mid-way).
                    assert closed < CROSSED, "the whole cascade committed past the held lock"
                    return closed > 0 and await db.fetchval(WAITING_ON_A_LOCK) > 0

                await until(mid_cascade, poll=0.005)
                first.process.send_signal(signal.SIGKILL)
                killed_at = trio.current_time()
                with trio.fail_after(10):
                    await first.process.wait()
            finally:
                await lock.release()
        # The killed process's transaction, waiting on the lock until now, must end (its
        # client is gone: it rolls back) before anything is counted or restarted.
        await until(lambda: _none_busy(db))
        still_open = await open_ids(db, crossed)
        closed_before = CROSSED - len(still_open)
        assert 0 < closed_before < CROSSED, closed_before  # the kill landed mid-cascade
        mark = await watermarks.read(db, PRODUCT)
        assert mark is not None and quiet <= mark.trade_id < crossing, (mark, quiet, crossing)

        # While tickguard is dead the price comes back inside every bracket.
        sim.publish(PRODUCT, BACK_PRICE)
        async with tickguard_process(own_database, sim, tmp_path / "restart.log") as again:
            await until(lambda: _all_closed(db, crossed))
            recovered_at = trio.current_time()
            await until(lambda: _outbox_empty(db))
            async with httpx.AsyncClient(base_url=again.base_url, timeout=10) as http:
                metrics = (await http.get("/metrics")).text

        result = await audit(db, crossed, spared)
        rows = await db.fetch(
            """SELECT p.id, p.status, p.close_reason, p.close_price, p.stop_loss,
                      p.triggered_at, e.message
                 FROM positions p
                 JOIN events e ON e.position_id = p.id AND e.type = 'position.closed'
                WHERE p.id = ANY($1::uuid[])""",
            [uuid.UUID(i) for i in crossed],
        )
        spared_events = await db.fetchval(
            "SELECT count(*) FROM events WHERE position_id = ANY($1::uuid[]) "
            "AND type = 'position.closed'",
            [uuid.UUID(i) for i in spared],
        )
    run = figures.record(
        Run("kill -9 mid-cascade of 3,000, price back before restart", faults_injected=1)
    )
    run.add_audit(result)
    run.recovery_s = round(recovered_at - killed_at, 3)  # includes the new process's start-up
    print(
        f"kill -9: {closed_before} of {CROSSED} closed before the kill, the rest recovered "
        f"{run.recovery_s} s after it"
    )

    result.assert_clean()  # each crossed position closed once, one event each, seqs 1..n
    assert spared_events == 0
    assert len(rows) == CROSSED  # one (closed position, close event) pair each
    recovered = set()
    for row in rows:
        assert row["status"] == "closed" and row["close_reason"] == "stop_loss", dict(row)
        assert row["close_price"] == row["stop_loss"], dict(row)  # GAP_FILL=level
        assert row["triggered_at"] == crossing_time, dict(row)
        event = loads(row["message"])
        assert event["source"] == "engine", event
        assert Decimal(str(event["position"]["closePrice"])) == row["stop_loss"], event
        if event.get("recovered") is True:
            recovered.add(str(row["id"]))
        else:
            assert "recovered" not in event, event
    # Live closes before the kill; the gap recovery closed exactly the rest after the restart.
    assert recovered == still_open, (len(recovered), len(still_open))
    assert _metric(metrics, "tickguard_recovery_trades_total") == 1  # the crossing trade
    assert _metric(metrics, 'tickguard_recovery_gaps_total{outcome="abandoned"}') == 0


async def judged_with_watermark(db: Database, sim: Simulator) -> int:
    """Publish one quiet trade and wait until tickguard's durable watermark reached it (the
    engine writes a quiet window's watermark at most once a second); returns its trade id."""
    trade_id = int(sim.publish(PRODUCT, BACK_PRICE))

    async def reached() -> bool:
        mark = await watermarks.read(db, PRODUCT)
        return mark is not None and mark.trade_id >= trade_id

    await until(reached)
    return trade_id


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in /metrics"
    return float(found.group(1))


async def _none_busy(db: Database) -> bool:
    return bool(await db.fetchval(BUSY_BACKENDS) == 0)


async def _all_closed(db: Database, ids: list[str]) -> bool:
    return await count_closed(db, ids) == len(ids)


async def _outbox_empty(db: Database) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM events WHERE published_at IS NULL") == 0)
