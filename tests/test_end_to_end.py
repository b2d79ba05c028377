"""End to end: the simulator's ticks close positions through the whole tree, exactly once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import trio
from service_harness import Service, event_stream, running_service, wait_until_live

from tickguard.sim import Simulator, open_simulator
from tickguard.storage import Database


async def feed_saw(service: Service, product: str, price: str) -> None:
    """Until the feed has merged a ticker at ``price`` into the product's slot."""
    slot = service.tree.slots.get(product)
    with trio.fail_after(10):
        while slot.last_price != Decimal(price):
            await trio.sleep(0.005)


async def engine_judged(service: Service, product: str, trade_time: datetime) -> None:
    """Until the product's engine has judged a window reaching ``trade_time``."""
    with trio.fail_after(10):
        while True:
            stats = service.tree.engines.stats.get(product)
            if stats and stats.last_window_time and stats.last_window_time >= trade_time:
                return
            await trio.sleep(0.005)


async def publish(service: Service, sim: Simulator, product: str, price: str) -> datetime:
    """Trade at ``price``; returns that trade's time (read before the simulator's own walk can
    trade again) once the feed has merged it."""
    sim.publish(product, price)
    traded_at = sim.products[product].last_time
    await feed_saw(service, product, price)
    return traded_at


@pytest.mark.parametrize(
    ("side", "tick", "reason", "close_price"),
    [
        ("long", "64980", "stop_loss", Decimal("64990")),
        ("long", "66001", "take_profit", Decimal("66000")),
        ("short", "66001", "stop_loss", Decimal("66000")),
        ("short", "64980", "take_profit", Decimal("64990")),
    ],
)
async def test_each_side_and_level_closes_with_its_reason_and_level(
    db: Database, side: str, tick: str, reason: str, close_price: Decimal
) -> None:
    bracket = (
        {"takeProfit": "66000", "stopLoss": "64990"}
        if side == "long"
        else {"takeProfit": "64990", "stopLoss": "66000"}
    )
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            async with event_stream(service, "alice") as events:
                created = await service.create(side=side, entryPrice="65000", **bracket)
                await events.wait_for("position.created")
                await publish(service, sim, "BTC-USD", "65000.5")  # inside the bracket
                trade_time = await publish(service, sim, "BTC-USD", tick)
                [closed] = await events.wait_for("position.closed")
    assert closed["source"] == "engine"
    position = closed["position"]
    assert position["id"] == created["id"] and position["status"] == "closed"
    assert position["closeReason"] == reason
    assert Decimal(str(position["closePrice"])) == close_price
    assert position["triggeredAt"].startswith(trade_time.strftime("%Y-%m-%dT%H:%M:%S"))
    assert await db.fetchval("SELECT count(*) FROM events WHERE type='position.closed'") == 1
    assert [m["type"] for m in events.messages] == [
        "connection.ready",
        "position.created",
        "position.closed",
    ]


async def test_a_gap_through_both_levels_closes_by_stop_loss(db: Database) -> None:
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            created = await service.create(entryPrice="65000", takeProfit="65100", stopLoss="64900")
            sim.publish("BTC-USD", "64800")  # both in one window: low below SL, high above TP
            sim.publish("BTC-USD", "65200")
            with trio.fail_after(10):
                while (await service.get("alice", created["id"]))["status"] != "closed":
                    await trio.sleep(0.01)
            position = await service.get("alice", created["id"])
    assert position["closeReason"] in ("stop_loss", "take_profit")
    # The two ticks may land in one window (stop loss wins) or in two (the first, 64800, closes
    # by stop loss): either way it is the stop.
    assert position["closeReason"] == "stop_loss"
    assert Decimal(str(position["closePrice"])) == Decimal("64900")


async def test_a_price_from_before_a_position_never_closes_it(db: Database) -> None:
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            await publish(service, sim, "BTC-USD", "64000")  # an extreme, then the position
            created = await service.create(entryPrice="65000", takeProfit="66000", stopLoss="64990")
            quiet = await publish(service, sim, "BTC-USD", "64995")
            await engine_judged(service, "BTC-USD", quiet)
            assert (await service.get("alice", created["id"]))["status"] == "open"
            crossing = await publish(service, sim, "BTC-USD", "64980")
            with trio.fail_after(10):
                while (await service.get("alice", created["id"]))["status"] != "closed":
                    await trio.sleep(0.01)
            position = await service.get("alice", created["id"])
    assert position["closeReason"] == "stop_loss"
    # Triggered by the window holding the crossing trade: its time is that trade's or a later
    # one's of the same window, never the earlier extreme's.
    triggered = datetime.fromisoformat(position["triggeredAt"].replace("Z", "+00:00"))
    assert triggered >= crossing.replace(microsecond=crossing.microsecond // 1000 * 1000)


async def test_a_stop_cascade_of_1000_closes_each_exactly_once(db: Database) -> None:
    async with open_simulator(
        {"BTC-USD": "65000", "ETH-USD": "3000"}, heartbeat_interval=0.2
    ) as sim:
        async with running_service(db, sim, coinbase_products=("BTC-USD", "ETH-USD")) as service:
            await wait_until_live(service)
            await wait_until_live(service, "ETH-USD")
            other = await service.create(
                "bob", symbol="ETH-USD", entryPrice="3000", stopLoss="2000"
            )
            async with event_stream(service, "alice") as events:
                async with trio.open_nursery() as nursery:
                    for worker in range(16):

                        async def create_many(worker: int = worker) -> None:
                            for i in range(worker, 1000, 16):
                                await service.create(entryPrice="65000", stopLoss=str(64000 + i))

                        nursery.start_soon(create_many)
                await events.wait_for("position.created", 1000)
                await publish(service, sim, "BTC-USD", "63000")
                closed = await events.wait_for("position.closed", 1000, timeout=60)
                # Nothing more arrives for them (each closed once).
                await publish(service, sim, "BTC-USD", "62000")
                await engine_judged(service, "BTC-USD", sim.products["BTC-USD"].last_time)
            assert len({m["position"]["id"] for m in closed}) == 1000
            assert len(events.of_type("position.closed")) == 1000
            assert all(m["position"]["closeReason"] == "stop_loss" for m in closed)
            seqs = [
                m["seq"] for m in events.messages if "seq" in m and m["type"] != "connection.ready"
            ]
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)) == 2000
            assert (await service.get("bob", other["id"]))["status"] == "open"
    rows = await db.fetch(
        """SELECT position_id, count(*) AS n FROM events WHERE type = 'position.closed'
           GROUP BY position_id"""
    )
    assert len(rows) == 1000 and all(r["n"] == 1 for r in rows)
    assert await db.fetchval("SELECT count(*) FROM positions WHERE status = 'open'") == 1


async def test_restart_closes_what_the_price_crossed_while_it_was_down(db: Database) -> None:
    async with open_simulator(
        {"BTC-USD": "65000", "ETH-USD": "3000"}, heartbeat_interval=0.2
    ) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            crossed = await service.create(entryPrice="65000", stopLoss="64500")
            untouched = await service.create(entryPrice="65000", stopLoss="60000")
        # tickguard is down; the market moves through one stop.
        sim.publish("BTC-USD", "64400")
        # The last ETH trade, before any ETH position exists, is far below the coming stop.
        sim.publish("ETH-USD", "2000", time=datetime.now(UTC) - timedelta(minutes=5))
        async with running_service(db, sim) as service:
            with trio.fail_after(15):
                while (await service.get("alice", crossed["id"]))["status"] != "closed":
                    await trio.sleep(0.01)
            position = await service.get("alice", crossed["id"])
            assert position["closeReason"] == "stop_loss"
            assert (await service.get("alice", untouched["id"]))["status"] == "open"
            # A new symbol: its subscription's stale ticker (2000, five minutes old) must not
            # close a position created now, though it lies beyond the stop.
            eth = await service.create(symbol="ETH-USD", entryPrice="3000", stopLoss="2500")
            await wait_until_live(service, "ETH-USD")
            fresh = await publish(service, sim, "ETH-USD", "2990")
            await engine_judged(service, "ETH-USD", fresh)
            assert (await service.get("alice", eth["id"]))["status"] == "open"
