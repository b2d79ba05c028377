"""Long feed gaps (issue 14): the candle fallback and ``RECOVERY_MAX_GAP_S``.

The real tree on the test database, the simulator as Coinbase over real sockets. A gap is made
by dropping tickguard's connection (its reconnects refused meanwhile) and adding trades to the
simulator's history with chosen times, so a gap of many minutes takes no waiting: the REST
trades and candles list them, no ticker shows them. Small REST pages (``page_limit``) make a
gap of a few dozen trades too long to page through, so its middle is judged from candles.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import trio
import trio.testing
from service_harness import Service, running_service, wait_until_live
from sim_fixtures import eventually
from test_recovery import closed_events, iso, judged_with_watermark, until_closed

from tickguard.actors.candles import CandlesUnreadable, minute_of, parse_candles, ranges
from tickguard.actors.recovery import RecoveryConfig, RequestPacer
from tickguard.sim import Simulator, open_simulator
from tickguard.sim.rest_faults import RestFault
from tickguard.storage import Database, watermarks

PRODUCT = "BTC-USD"
# 10 trades a page, 3 pages at most: a gap of more than 30 trades is judged from candles, its
# edges from one page of trades each.
SMALL_PAGES = RecoveryConfig(page_limit=10, max_pages=3, edge_pages=1, retry_base_s=0.05)


async def disconnect(service: Service, sim: Simulator, refuse_s: float = 2.0) -> None:
    """Drop tickguard's feed connection and refuse its reconnects for ``refuse_s``."""
    sim.refuse_connections(refuse_s)
    sim.drop_all()
    await eventually(lambda: not service.tree.feed_status.connected)


def trade(sim: Simulator, price: str, time: datetime) -> int:
    """One trade in the simulator's history (no ticker: tickguard is away); its id."""
    market = sim.products[PRODUCT]
    market.trade(Decimal(price), time=time)
    return market.trade_id


async def mark_time(db: Database) -> datetime:
    mark = await watermarks.read(db, PRODUCT)
    assert mark is not None
    return mark.time


async def created_at(db: Database, position: dict[str, Any]) -> datetime:
    """The position's exact creation time (the API shows milliseconds)."""
    at: datetime = await db.fetchval(
        "SELECT created_at FROM positions WHERE id = $1", uuid.UUID(position["id"])
    )
    return at


@pytest.mark.parametrize("gap_fill", ["level", "trade"])
async def test_a_stop_crossed_in_the_middle_of_a_long_gap_closes_from_its_candle(
    db: Database, gap_fill: str
) -> None:
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(
            db, sim, recovery_config=SMALL_PAGES, gap_fill=gap_fill
        ) as service:
            await wait_until_live(service)
            crossed = await service.create(stopLoss="64990", takeProfit="66000")
            mark = await judged_with_watermark(db, service, sim)
            start = await mark_time(db)
            await disconnect(service, sim)
            # 200 trades, one every 3 s (10 minutes), the 100th through the stop: far from
            # both edges (9 trades each), so only its minute's candle shows it.
            for i in range(1, 201):
                trade(sim, "64950" if i == 100 else "65000", start + timedelta(seconds=3 * i))
            crossing = start + timedelta(seconds=300)
            live = trade(sim, "65010", start + timedelta(seconds=603))
            position = await until_closed(service, "alice", crossed["id"])
            assert position["closeReason"] == "stop_loss"
            # The level, also under GAP_FILL=trade: a candle has no trade of its own (its
            # low is 64950, its close 65000).
            assert Decimal(str(position["closePrice"])) == Decimal("64990")
            # The candle's time: the start of the crossing trade's minute.
            assert position["triggeredAt"] == iso(minute_of(crossing))
            await trio.sleep(0.3)  # give a second close (a bug) the time to commit
            events = await closed_events(db, crossed["id"])
            assert len(events) == 1, events
            assert events[0]["source"] == "engine" and events[0]["recovered"] is True
            stats = service.tree.recovery_stats
            assert stats.abandoned == 0 and stats.unjudged == {}
            assert stats.trades == 18  # 9 after the watermark, 9 before the first live trade
            # A candle per minute from the 9th trade's (27 s) to the 192nd's (576 s).
            assert 10 <= stats.candles <= 11
            assert mark < live
            # The watermark moves on past the gap: to the first live trade, at its time.
            saved = None

            async def advanced() -> bool:
                nonlocal saved
                saved = await watermarks.read(db, PRODUCT)
                return saved is not None and saved.trade_id == live

            with trio.fail_after(10):
                while not await advanced():
                    await trio.sleep(0.05)
            assert saved is not None and saved.time == start + timedelta(seconds=603)
            metrics = (await service.http.get("/metrics")).text
            assert f"tickguard_recovery_candles_total {float(stats.candles)}" in metrics


async def test_a_gap_whose_first_trades_are_no_longer_listed_is_judged_from_candles(
    db: Database,
) -> None:
    """The REST history has forgotten the trades right after the watermark (Coinbase keeps
    them all; the simulator keeps the latest only): no leading edge, candles from the
    watermark's minute on."""
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim, recovery_config=SMALL_PAGES) as service:
            await wait_until_live(service)
            crossed = await service.create(stopLoss="64990", takeProfit="66000")
            await judged_with_watermark(db, service, sim)
            start = await mark_time(db)
            await disconnect(service, sim)
            market = sim.products[PRODUCT]
            market.history = deque(market.history, maxlen=150)
            for i in range(1, 201):  # the first 51 fall out of the history
                trade(sim, "64950" if i == 100 else "65000", start + timedelta(seconds=3 * i))
            trade(sim, "65010", start + timedelta(seconds=603))
            position = await until_closed(service, "alice", crossed["id"])
            assert position["triggeredAt"] == iso(minute_of(start + timedelta(seconds=300)))
            stats = service.tree.recovery_stats
            assert stats.trades == 9 and stats.abandoned == 0  # the trailing edge only
            await trio.sleep(0.3)
            assert len(await closed_events(db, crossed["id"])) == 1


async def test_a_position_created_during_a_candles_minute_is_not_closed_by_that_candle(
    db: Database,
) -> None:
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim, recovery_config=SMALL_PAGES) as service:
            await wait_until_live(service)
            older = await service.create(stopLoss="64000", takeProfit="65500")
            await judged_with_watermark(db, service, sim)
            start = await mark_time(db)
            await disconnect(service, sim)
            newer = await service.create(stopLoss="64950", takeProfit="66000")
            created = await created_at(db, newer)
            minute = minute_of(created)
            # 19 quiet trades before ``newer`` existed (the first 9 are the leading edge)...
            for k in range(1, 20):
                trade(sim, "65000", start + (created - start) * k / 20)
            # ...one through its stop later in the same minute: only that minute's candle,
            # which began before ``newer`` existed, shows it...
            trade(sim, "64900", created + (minute + timedelta(seconds=60) - created) / 2)
            for k in range(1, 10):
                trade(sim, "65000", minute + timedelta(seconds=60 + k))
            # ...two minutes later one through the older position's take-profit...
            trade(sim, "65600", minute + timedelta(seconds=130))
            # ...then quiet trades (the trailing edge) and the first live trade.
            for k in range(1, 16):
                trade(sim, "65000", minute + timedelta(seconds=180 + k))
            trade(sim, "65010", minute + timedelta(seconds=240))
            position = await until_closed(service, "alice", older["id"])
            assert position["closeReason"] == "take_profit"
            assert Decimal(str(position["closePrice"])) == Decimal("65500")
            assert position["triggeredAt"] == iso(minute + timedelta(seconds=120))
            await eventually(lambda: service.tree.recovery_stats.recovered >= 1)
            assert service.tree.recovery_stats.candles >= 4
            await trio.sleep(0.3)  # give a wrong close the time to commit
            # Invariant 10: the 64900 trade is younger than ``newer``, but the candle that shows
            # it is not; a candle never closes a position created after its minute began.
            assert (await service.get("alice", newer["id"]))["status"] == "open"
            assert await closed_events(db, newer["id"]) == []
            assert len(await closed_events(db, older["id"])) == 1


async def test_candles_answering_429_and_5xx_are_retried(db: Database) -> None:
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim, recovery_config=SMALL_PAGES) as service:
            await wait_until_live(service)
            await eventually(lambda: service.tree.catalog.loaded)  # GET /products is done
            crossed = await service.create(stopLoss="64990", takeProfit="66000")
            await judged_with_watermark(db, service, sim)
            start = await mark_time(db)
            await disconnect(service, sim)
            for i in range(1, 101):
                trade(sim, "64950" if i == 50 else "65000", start + timedelta(seconds=3 * i))
            trade(sim, "65010", start + timedelta(seconds=303))
            stats = service.tree.recovery_stats
            requests, retries = stats.requests, stats.retries  # the start-up's recovery
            # The recovery's REST reads, in order: the page before the first live trade, the
            # page after the watermark, then the candles. The two trades pages pass (a slow
            # fault of 0 s), the candles answer 429, then 502, then the candles.
            sim.rest_faults.add(RestFault("slow", count=2, seconds=0))
            sim.rest_faults.add(RestFault("429", count=1, retry_after=1))
            sim.rest_faults.add(RestFault("5xx", count=1, status=502))
            position = await until_closed(service, "alice", crossed["id"])
            assert position["triggeredAt"] == iso(minute_of(start + timedelta(seconds=150)))
            assert stats.retries - retries == 2 and stats.abandoned == 0
            assert sim.counters["rest_faults_applied"] == 4
            # The watermark read, two trades pages, and the candles read three times.
            assert stats.requests - requests == 6
            await trio.sleep(0.3)
            assert len(await closed_events(db, crossed["id"])) == 1


async def test_a_gap_longer_than_recovery_max_gap_s_is_flagged_and_closes_nothing(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tickguard.actors.recovery")
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim, recovery_max_gap_s=600) as service:
            await wait_until_live(service)
            spared = await service.create(stopLoss="64990", takeProfit="66000")
            mark = await judged_with_watermark(db, service, sim)
            start = await mark_time(db)
            await disconnect(service, sim)
            trade(sim, "64950", start + timedelta(seconds=300))  # through the stop
            trade(sim, "65000", start + timedelta(seconds=700))
            live = trade(sim, "65010", start + timedelta(seconds=900))  # 900 s > 600 s
            stats = service.tree.recovery_stats
            await eventually(lambda: stats.abandoned == 1)
            await trio.sleep(0.3)  # give a wrong close the time to commit
            assert (await service.get("alice", spared["id"]))["status"] == "open"
            assert await closed_events(db, spared["id"]) == []
            assert stats.trades == 0 and stats.candles == 0
            ready = await service.http.get("/ready")
            assert ready.status_code == 200 and ready.json()["ok"] is True
            gap = ready.json()["recovery"]["unjudged_gaps"][PRODUCT]
            assert gap["reason"] == "too_long"
            assert "RECOVERY_MAX_GAP_S" in gap["detail"]
            assert (gap["after_trade_id"], gap["before_trade_id"]) == (mark, live)
            assert gap["seconds"] == 900.0 and gap["count"] == 1
            assert gap["from"] == iso(start)
            assert gap["to"] == iso(start + timedelta(seconds=900))
            metrics = (await service.http.get("/metrics")).text
            assert (
                'tickguard_recovery_unjudged_gaps_total{reason="too_long",symbol="BTC-USD"} 1.0'
                in metrics
            )
            assert 'tickguard_recovery_unjudged_gap_seconds{symbol="BTC-USD"} 900.0' in metrics
            assert 'tickguard_recovery_gaps_total{outcome="abandoned"} 1.0' in metrics
            lines = [r for r in caplog.records if "gap not judged" in r.getMessage()]
            assert len(lines) == 1 and lines[0].levelno == logging.WARNING
            assert f"trades {mark + 1}..{live - 1}" in lines[0].getMessage()
            # Live trades are judged again: the stop closes on one, not recovered.
            sim.publish(PRODUCT, "64900")
            await until_closed(service, "alice", spared["id"])
            events = await closed_events(db, spared["id"])
            assert len(events) == 1 and "recovered" not in events[0]


async def test_a_gap_given_up_is_flagged_with_its_reason(db: Database) -> None:
    config = RecoveryConfig(retry_base_s=0.05, retry_max_s=0.1, give_up_s=1.0)
    async with open_simulator({PRODUCT: "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim, recovery_config=config) as service:
            await wait_until_live(service)
            await eventually(lambda: service.tree.catalog.loaded)
            spared = await service.create(stopLoss="64990", takeProfit="66000")
            mark = await judged_with_watermark(db, service, sim)
            await disconnect(service, sim, refuse_s=0.5)
            sim.rest_faults.add(RestFault("5xx", count=100_000, status=503))
            sim.skip_trade_ids(PRODUCT, 2, prices=[Decimal("64950"), Decimal("65010")])
            stats = service.tree.recovery_stats
            await eventually(lambda: stats.abandoned == 1)
            sim.rest_faults.clear()
            gap = stats.unjudged_report()[PRODUCT]
            assert gap["reason"] == "gave_up" and gap["after_trade_id"] == mark
            metrics = (await service.http.get("/metrics")).text
            assert (
                'tickguard_recovery_unjudged_gaps_total{reason="gave_up",symbol="BTC-USD"} 1.0'
                in metrics
            )
            assert (await service.get("alice", spared["id"]))["status"] == "open"


# ------------------------------------------------------------------ candles, no I/O


def test_candle_ranges_ask_at_most_300_minutes_each_and_cover_both_ends() -> None:
    first = datetime.fromisoformat("2026-01-01T00:00:30+00:00")
    last = first + timedelta(minutes=700)
    spans = list(ranges(first, last))
    assert [round((end - start).total_seconds() / 60) for start, end in spans] == [300, 300, 101]
    assert spans[0][0] == minute_of(first)
    assert spans[-1][1] == minute_of(last) + timedelta(minutes=1)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_candles_parse_exactly_to_decimal_and_refuse_bad_rows() -> None:
    rows = parse_candles(b"[[1767225660, 64999.12345678, 65010, 65000, 65001.5, 0.5]]")
    assert [(c.low, c.high, c.close) for c in rows] == [
        (Decimal("64999.12345678"), Decimal("65010"), Decimal("65001.5"))
    ]
    for bad in (
        b"{}",
        b"[[1767225660, 65010, 64999, 65000, 65000, 1]]",  # low above high
        b"[[true, 1, 2, 1, 1, 1]]",
        b"[[1767225660, -1, 2, 1, 1, 1]]",
        b'[[1767225660, "NaN", 2, 1, 1, 1]]',
        b"[[1767225660, 1, 2]]",
        b"[[1767225660, 1, 2, 1, 1, 1]",  # cut short
    ):
        with pytest.raises(CandlesUnreadable):
            parse_candles(bad)


def test_rest_requests_are_paced_under_coinbases_public_limit() -> None:
    """The recovery's REST reads: a burst of ``rest_burst``, then one per ``1/rate`` seconds,
    and an idle spell refills the bucket (MockClock: the times are exact)."""
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def paced() -> list[float]:
        pacer = RequestPacer(rate_per_s=8.0, burst=4)
        times = []
        for _ in range(8):
            await pacer.wait()
            times.append(trio.current_time())
        await trio.sleep(10)  # idle: the bucket fills up again, no further
        for _ in range(5):
            await pacer.wait()
            times.append(trio.current_time())
        return [round(t - times[0], 6) for t in times]

    times = trio.run(paced, clock=clock)
    assert times[:8] == [0, 0, 0, 0, 0.125, 0.25, 0.375, 0.5]
    after_idle = times[8]
    assert times[8:] == [after_idle] * 4 + [round(after_idle + 0.125, 6)]
