"""Gap recovery (issue 14) end to end: a stop crossed while tickguard was not listening still
closes, at its level, exactly once, with ``"recovered": true``.

The real tree on the test database, the simulator as Coinbase over real sockets: its
``skip_trade_ids`` makes trades that no ticker shows (the REST trades list them), ``refuse`` and
``drop`` make the gap, ``rest_faults`` make the REST reads fail.
"""

from __future__ import annotations

import json
import signal
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import trio
from fault_helpers import long_with_stop, until
from service_harness import Service, running_service, wait_until_live
from sim_fixtures import eventually
from test_faults_process import tickguard_process

from tickguard.sim import Simulator, open_simulator
from tickguard.sim.rest_faults import RestFault
from tickguard.storage import Database, open_database, watermarks
from tickguard.wire import loads

PRODUCT = "BTC-USD"


async def judged_with_watermark(db: Database, service: Service, sim: Simulator) -> int:
    """Publish one quiet trade and wait until the watermark (written by the engine's
    rate-limited write) has reached it; returns its trade id."""
    trade_id = sim.publish(PRODUCT, "65000")
    with trio.fail_after(15):
        while True:
            mark = await watermarks.read(db, PRODUCT)
            if mark is not None and mark.trade_id >= trade_id:
                return trade_id
            await trio.sleep(0.05)


async def closed_events(db: Database, position_id: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT message FROM events WHERE position_id = $1 AND type = 'position.closed'",
        uuid.UUID(position_id),
    )
    return [loads(r["message"]) for r in rows]


async def until_closed(service: Service, user: str, position_id: str) -> dict[str, Any]:
    with trio.fail_after(20):
        while True:
            position = await service.get(user, position_id)
            if position["status"] == "closed":
                return position
            await trio.sleep(0.05)


def trade_time(sim: Simulator, price: str) -> datetime:
    """The time of the (only) remembered trade at ``price``."""
    times = [t.time for t in sim.products[PRODUCT].history if t.price == Decimal(price)]
    assert len(times) == 1, times
    return times[0]


def iso(time: datetime) -> str:
    return time.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def hide_trades(sim: Simulator, *prices: str, refuse_s: float = 1.0) -> None:
    """Disconnect tickguard (refusing its reconnects for ``refuse_s``) and trade ``prices``
    meanwhile, without a ticker: only the REST trades show them."""
    sim.refuse_connections(refuse_s)
    sim.drop_all()
    await trio.sleep(0.1)  # the feed notices the drop and starts backing off / refused
    sim.skip_trade_ids(PRODUCT, len(prices), prices=[Decimal(p) for p in prices])


async def assert_closed_once_recovered(
    db: Database, service: Service, position_id: str, level: str, crossing: datetime
) -> None:
    position = await until_closed(service, "alice", position_id)
    assert position["closeReason"] == "stop_loss"
    assert Decimal(str(position["closePrice"])) == Decimal(level)
    assert position["triggeredAt"] == iso(crossing)
    await trio.sleep(0.3)  # give a second close (a bug) the time to commit
    events = await closed_events(db, position_id)
    assert len(events) == 1, events
    assert events[0]["source"] == "engine" and events[0]["recovered"] is True


async def test_a_stop_crossed_while_disconnected_closes_after_the_reconnect(db: Database) -> None:
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            crossed = await service.create(stopLoss="64990", takeProfit="66000")
            await judged_with_watermark(db, service, sim)
            # The price dips through the stop and comes back while tickguard is away.
            await hide_trades(sim, "64995", "64950", "65010")
            crossing = trade_time(sim, "64950")
            await assert_closed_once_recovered(db, service, crossed["id"], "64990", crossing)
            assert service.tree.recovery_stats.trades == 2  # 64995, 64950 (65010 is live)
            metrics = (await service.http.get("/metrics")).text
            assert "tickguard_recovery_trades_total 2.0" in metrics
            assert 'tickguard_recovery_gaps_total{outcome="abandoned"} 0.0' in metrics
            # Live ticks are judged again after the recovery, in order.
            take = await service.create(stopLoss="64000", takeProfit="65500")
            sim.publish(PRODUCT, "65600")
            position = await until_closed(service, "alice", take["id"])
            assert position["closeReason"] == "take_profit"
            events = await closed_events(db, take["id"])
            assert len(events) == 1 and "recovered" not in events[0]


async def test_a_stop_crossed_while_stopped_closes_after_the_restart(db: Database) -> None:
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            crossed = await service.create(stopLoss="64990", takeProfit="66000")
            mark = await judged_with_watermark(db, service, sim)
        # Stopped cleanly: the price crosses the stop and comes back meanwhile.
        sim.skip_trade_ids(
            PRODUCT, 3, prices=[Decimal("64980"), Decimal("64900"), Decimal("65020")]
        )
        crossing = trade_time(sim, "64980")  # the first trade at or below the stop
        async with running_service(db, sim) as service:
            await assert_closed_once_recovered(db, service, crossed["id"], "64990", crossing)
            stats = service.tree.recovery_stats
            assert stats.trades == 2 and stats.abandoned == 0  # after the watermark, before 65020
            saved = await watermarks.read(db, PRODUCT)
            assert saved is not None and saved.trade_id > mark


async def test_rest_failing_during_recovery_is_retried_and_closes_once(db: Database) -> None:
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            await eventually(lambda: service.tree.catalog.loaded)  # GET /products is done
            crossed = await service.create(stopLoss="64990", takeProfit="66000")
            await judged_with_watermark(db, service, sim)
            sim.rest_faults.add(RestFault("5xx", count=2, status=503))
            sim.rest_faults.add(RestFault("429", count=1, retry_after=1))
            sim.rest_faults.add(RestFault("truncate", count=1))
            await hide_trades(sim, "64950", "65010", refuse_s=0.5)
            crossing = trade_time(sim, "64950")
            await assert_closed_once_recovered(db, service, crossed["id"], "64990", crossing)
            stats = service.tree.recovery_stats
            assert stats.retries == 4 and stats.abandoned == 0
            # Live ticks after it are judged, in order: a fresh stop closes live, not recovered.
            live = await service.create(stopLoss="64000", takeProfit="66000")
            sim.publish(PRODUCT, "63900")
            await until_closed(service, "alice", live["id"])
            events = await closed_events(db, live["id"])
            assert len(events) == 1 and "recovered" not in events[0]
            assert len(await closed_events(db, crossed["id"])) == 1


async def test_a_position_created_during_the_gap_is_judged_only_on_later_trades(
    db: Database,
) -> None:
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            await service.create(stopLoss="60000")  # the engine runs and writes watermarks
            await judged_with_watermark(db, service, sim)
            await hide_trades(sim, "64900", refuse_s=2.0)  # before both positions below
            await trio.sleep(0.01)
            spared = await service.create(stopLoss="64950", takeProfit="66000")
            crossed = await service.create(stopLoss="64990", takeProfit="66000")
            await trio.sleep(0.01)
            sim.skip_trade_ids(PRODUCT, 2, prices=[Decimal("64980"), Decimal("65010")])
            crossing = trade_time(sim, "64980")
            await assert_closed_once_recovered(db, service, crossed["id"], "64990", crossing)
            # 64900 traded before ``spared`` existed: it never closes it (invariant 10).
            await eventually(lambda: service.tree.recovery_stats.trades == 2)
            position = await service.get("alice", spared["id"])
            assert position["status"] == "open"
            assert await closed_events(db, spared["id"]) == []


async def test_the_recovered_flag_is_in_the_stored_event_text(db: Database) -> None:
    """The outbox stores the exact WebSocket text: ``recovered`` sits next to ``source``."""
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            crossed = await service.create(stopLoss="64990")
            await judged_with_watermark(db, service, sim)
            await hide_trades(sim, "64950", "65010")
            await until_closed(service, "alice", crossed["id"])
            row = await db.fetchrow(
                "SELECT message FROM events WHERE position_id = $1 AND type = 'position.closed'",
                uuid.UUID(crossed["id"]),
            )
            keys = list(json.loads(row["message"]))
            assert keys[:4] == ["type", "source", "seq", "recovered"]


async def test_gap_fill_trade_closes_at_the_recovered_trade_price(db: Database) -> None:
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim, gap_fill="trade") as service:
            await wait_until_live(service)
            crossed = await service.create(stopLoss="64990", takeProfit="66000")
            await judged_with_watermark(db, service, sim)
            await hide_trades(sim, "64995", "64950", "64900", "65010")
            position = await until_closed(service, "alice", crossed["id"])
            # The first trade beyond the level, not the lowest one nor the level.
            assert Decimal(str(position["closePrice"])) == Decimal("64950")
            assert position["triggeredAt"] == iso(trade_time(sim, "64950"))
            assert len(await closed_events(db, crossed["id"])) == 1


async def test_a_stop_crossed_while_killed_9_closes_after_the_restart(
    own_database: str,
    tmp_path: Path,
) -> None:
    """A real ``tickguard serve`` process, killed with -9: the price crosses the stop and comes
    back while it is dead; the restarted process finds the crossing trade over REST."""
    async with (
        open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim,
        open_database(own_database) as db,
    ):
        async with tickguard_process(own_database, sim, tmp_path / "first.log") as first:
            async with httpx.AsyncClient(base_url=first.base_url, timeout=10) as http:
                response = await http.post("/api/positions", json=long_with_stop("alice", "64990"))
                assert response.status_code == 201, response.text
                position_id = response.json()["data"]["id"]
            trade_id = sim.publish(PRODUCT, "65000")

            async def watermark_reached() -> bool:
                mark = await watermarks.read(db, PRODUCT)
                return mark is not None and mark.trade_id >= trade_id

            await until(watermark_reached)
            first.process.send_signal(signal.SIGKILL)
            with trio.fail_after(10):
                await first.process.wait()
        sim.skip_trade_ids(PRODUCT, 2, prices=[Decimal("64950"), Decimal("65010")])
        crossing = trade_time(sim, "64950")
        async with tickguard_process(own_database, sim, tmp_path / "restart.log") as again:

            async def closed() -> bool:
                status = await db.fetchval(
                    "SELECT status FROM positions WHERE id = $1", uuid.UUID(position_id)
                )
                return bool(status == "closed")

            await until(closed)
            async with httpx.AsyncClient(base_url=again.base_url, timeout=10) as http:
                response = await http.get(
                    f"/api/positions/{position_id}", params={"userId": "alice"}
                )
            position = loads(response.content)["data"]
            assert Decimal(str(position["closePrice"])) == Decimal("64990")
            assert position["triggeredAt"] == iso(crossing)
            events = await closed_events(db, position_id)
            assert len(events) == 1 and events[0]["recovered"] is True
