"""A product Coinbase halts triggers nothing, and is flagged; once it trades again its stops
trigger again, trades printed while it was halted included (issue 14, the ``status`` channel).

The real tree on the test database, the simulator as Coinbase over real sockets: its
``set_trading`` halts and resumes a product and tells ``status`` subscribers at once.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import trio
from service_harness import Service, running_service, wait_until_live
from test_metrics import scrape, value
from test_recovery import (
    PRODUCT,
    assert_closed_once_recovered,
    closed_events,
    judged_with_watermark,
    trade_time,
    until_closed,
)

from tickguard.sim import Simulator, open_simulator
from tickguard.storage import Database


async def feed_product(service: Service) -> dict[str, Any]:
    response = await service.http.get("/ready")
    assert response.status_code == 200, response.text
    product: dict[str, Any] = response.json()["feed"]["products"][PRODUCT]
    return product


async def until_ready_shows(service: Service, **fields: Any) -> dict[str, Any]:
    """Poll /ready until the product shows ``fields`` (the feed updates asynchronously)."""
    with trio.fail_after(10):
        while True:
            product = await feed_product(service)
            if all(product.get(k) == v for k, v in fields.items()):
                return product
            await trio.sleep(0.02)


async def halt(service: Service, sim: Simulator) -> None:
    assert sim.set_trading(PRODUCT, online=False) == 1
    product = await until_ready_shows(service, trading="halted")
    assert product["halt_reason"] == "status offline, trading disabled"
    assert product["state"] == "live"  # the feed is fine: the market is not trading
    samples = await scrape(service.http)
    assert value(samples, "tickguard_feed_product_halted", symbol=PRODUCT) == 1


async def resume(service: Service, sim: Simulator) -> None:
    assert sim.set_trading(PRODUCT, online=True) == 1
    await until_ready_shows(service, trading="trading")
    samples = await scrape(service.http)
    assert value(samples, "tickguard_feed_product_halted", symbol=PRODUCT) == 0


async def test_a_halted_products_crossing_trade_closes_nothing_until_it_trades_again(
    db: Database,
) -> None:
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            crossed = await service.create(stopLoss="64990", takeProfit="66000")
            await judged_with_watermark(db, service, sim)
            stats = service.tree.engines.stats[PRODUCT]
            judged = stats.ticks_judged
            await halt(service, sim)
            response = await service.http.get("/ready")
            assert response.status_code == 200 and response.json()["ok"] is True

            # Through the stop and back, while halted: judged by nothing.
            sim.publish(PRODUCT, "64950")
            sim.publish(PRODUCT, "65005")
            await until_ready_shows(service, halted_ticks=2)
            await trio.sleep(0.5)  # heartbeats run ahead meanwhile: still nothing recovered
            assert (await service.get("alice", crossed["id"]))["status"] == "open"
            assert await closed_events(db, crossed["id"]) == []
            assert stats.ticks_judged == judged
            assert service.tree.recovery_stats.trades == 0

            # Trading again: the trades printed while halted are real, recovered and judged
            # before the next live window; the stop closes at its level, once.
            await resume(service, sim)
            sim.publish(PRODUCT, "65010")
            crossing = trade_time(sim, "64950")
            await assert_closed_once_recovered(db, service, crossed["id"], "64990", crossing)
            assert service.tree.recovery_stats.trades == 2
            # Another crossing trade finds it closed: no second close.
            sim.publish(PRODUCT, "64900")
            with trio.fail_after(10):
                while stats.last_window_time != trade_time(sim, "64900"):  # noqa: ASYNC110
                    await trio.sleep(0.02)
            assert len(await closed_events(db, crossed["id"])) == 1


async def test_back_online_a_crossing_ticker_closes_the_position_exactly_once(
    db: Database,
) -> None:
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            position = await service.create(stopLoss="64990", takeProfit="66000")
            await judged_with_watermark(db, service, sim)
            await halt(service, sim)
            await resume(service, sim)
            # Nothing traded while halted: the crossing ticker is live, judged at once.
            sim.publish(PRODUCT, "64980")
            closed = await until_closed(service, "alice", position["id"])
            assert closed["closeReason"] == "stop_loss"
            assert Decimal(str(closed["closePrice"])) == Decimal("64990")
            sim.publish(PRODUCT, "64900")
            stats = service.tree.engines.stats[PRODUCT]
            with trio.fail_after(10):
                while stats.last_window_time != trade_time(sim, "64900"):  # noqa: ASYNC110
                    await trio.sleep(0.02)
            events = await closed_events(db, position["id"])
            assert len(events) == 1 and "recovered" not in events[0], events
            assert service.tree.recovery_stats.trades == 0


async def test_a_malformed_status_frame_is_counted_and_the_feed_goes_on(db: Database) -> None:
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            position = await service.create(stopLoss="64990", takeProfit="66000")
            await judged_with_watermark(db, service, sim)
            await halt(service, sim)
            before = (await service.http.get("/ready")).json()["feed"]["malformed"]
            # It would resume the product if it were read; it is not.
            sim.send_raw(
                '{"type": "status", "products": [{"id": "BTC-USD", "status": "online"},'
                ' {"id": "", "status": "online"}]}'
            )
            with trio.fail_after(10):
                while (await service.http.get("/ready")).json()["feed"]["malformed"] == before:
                    await trio.sleep(0.02)
            samples = await scrape(service.http)
            assert value(samples, "tickguard_feed_malformed_total") == before + 1
            product = await feed_product(service)
            assert product["trading"] == "halted" and product["state"] == "live"
            assert (await service.http.get("/ready")).json()["feed"]["reconnects"] == 0
            await resume(service, sim)
            sim.publish(PRODUCT, "64980")
            closed = await until_closed(service, "alice", position["id"])
            assert closed["closeReason"] == "stop_loss"
