"""GET /metrics: Prometheus text that parses, and counters that move with ticks and closes."""

from __future__ import annotations

import httpx
import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST, CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from service_harness import Service, event_stream, running_service, wait_until_live
from web_harness import make_settings, running_app

from tickguard.actors.engine import EngineStats
from tickguard.actors.fanout import FanoutStats
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.persistence import PersistenceStats
from tickguard.sim import open_simulator
from tickguard.storage import Database
from tickguard.web.app import AppServices
from tickguard.web.metrics import MetricsSources

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4
    return parse(response.text)


async def scrape_until(service: Service, name: str, at_least: float, **labels: str) -> Samples:
    """Scrape until ``name{labels}`` reaches ``at_least`` (the actors update asynchronously)."""
    with trio.fail_after(10):
        while True:
            samples = await scrape(service.http)
            if (value(samples, name, **labels) or 0) >= at_least:
                return samples
            await trio.sleep(0.02)


async def test_counters_move_when_ticks_and_closes_happen(db: Database) -> None:
    async with (
        open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim,
        running_service(db, sim) as service,
    ):
        await wait_until_live(service)
        before = await scrape(service.http)
        assert value(before, "tickguard_feed_product_live", symbol="BTC-USD") == 1
        assert value(before, "tickguard_feed_connected") == 1
        assert value(before, "tickguard_closes_total", reason="take_profit") == 0
        assert value(before, "tickguard_ws_sessions") == 0
        ticks_before = value(before, "tickguard_feed_ticks_total", symbol="BTC-USD") or 0

        for price in ("65001", "65002", "65003"):
            sim.publish("BTC-USD", price)
        await scrape_until(
            service, "tickguard_feed_ticks_total", ticks_before + 3, symbol="BTC-USD"
        )

        async with event_stream(service, "alice") as events:
            ws = await scrape(service.http)
            assert value(ws, "tickguard_ws_sessions") == 1
            await service.create(entryPrice="65000", takeProfit="66000", stopLoss="64000")
            manual = await service.create(entryPrice="65000")
            await scrape_until(service, "tickguard_positions_open", 2, symbol="BTC-USD")
            sim.publish("BTC-USD", "66001")  # crosses the first one's take-profit
            await events.wait_for("position.closed")
            closed = await service.http.post(
                f"/api/positions/{manual['id']}/close",
                json={"userId": "alice", "closePrice": "65500"},
            )
            assert closed.status_code == 200, closed.text
            await events.wait_for("position.closed", count=2)

        after = await scrape_until(service, "tickguard_closes_total", 1, reason="manual")
        assert value(after, "tickguard_closes_total", reason="take_profit") == 1
        assert value(after, "tickguard_closes_total", reason="stop_loss") == 0
        # two creates and two closes, each committed in its own transaction at least
        assert (value(after, "tickguard_persistence_transactions_total") or 0) >= 4
        assert value(after, "tickguard_db_errors_total") == 0
        assert (value(after, "tickguard_engine_windows_total", symbol="BTC-USD") or 0) >= 1
        latency = value(after, "tickguard_engine_window_seconds", symbol="BTC-USD")
        assert latency is not None and latency >= 0
        await scrape_until(service, "tickguard_positions_open", 0, symbol="BTC-USD")
        samples = await scrape(service.http)
        assert value(samples, "tickguard_positions_open", symbol="BTC-USD") == 0


async def test_feed_trouble_shows_in_reconnects_malformed_and_missed_trades(db: Database) -> None:
    async with (
        open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim,
        running_service(db, sim) as service,
    ):
        await wait_until_live(service)
        before = await scrape(service.http)
        assert value(before, "tickguard_feed_reconnects_total") == 0
        assert value(before, "tickguard_feed_malformed_total") == 0
        assert value(before, "tickguard_feed_missed_trades_total", symbol="BTC-USD") == 0

        sim.send_malformed(2)
        await scrape_until(service, "tickguard_feed_malformed_total", 2)
        sim.skip_trade_ids("BTC-USD", 5)  # heartbeats then run ahead of the last ticker
        await scrape_until(service, "tickguard_feed_missed_trades_total", 5, symbol="BTC-USD")
        sim.drop_all()
        await scrape_until(service, "tickguard_feed_reconnects_total", 1)
        await wait_until_live(service)


def _services(db: Database, *, sources: MetricsSources | None, feed: FeedStatus | None):
    return AppServices(
        settings=make_settings(),
        db=db,
        persistence=Mailbox("persistence"),
        fanout=Mailbox("fanout"),
        feed_status=feed,
        metrics=sources,
    )


async def test_each_stat_maps_to_its_metric_and_apps_do_not_share_a_registry(
    db: Database,
) -> None:
    feed = FeedStatus()
    feed.connected = True
    feed.reconnects = 4
    feed.malformed = 7
    feed.product("ETH-USD").ticks = 12
    feed.product("ETH-USD").state = "live"
    feed.product("SOL-USD").missed_trades = 3
    feed.product("SOL-USD").state = "stale"
    eth = EngineStats(positions_open=5, windows_judged=9, last_window_latency_s=0.25)
    sources = MetricsSources(
        engines={"ETH-USD": eth, "SOL-USD": EngineStats()},
        persistence=PersistenceStats(
            transactions=11,
            closes_by_reason={"stop_loss": 2, "system": 1},
            db_errors=6,
            rejected=5,
        ),
        fanout=FanoutStats(sessions=8, dropped_slow=2),
    )
    async with (
        running_app(_services(db, sources=sources, feed=feed)) as full_url,
        running_app(_services(db, sources=None, feed=None)) as bare_url,
        httpx.AsyncClient(base_url=full_url) as full,
        httpx.AsyncClient(base_url=bare_url) as bare,
    ):
        samples = await scrape(full)
        eth.windows_judged += 1  # read at scrape time, not copied at start
        later = await scrape(full)
        bare_text = (await bare.get("/metrics")).text

    expected = {
        ("tickguard_feed_ticks_total", ("symbol", "ETH-USD")): 12,
        ("tickguard_feed_ticks_total", ("symbol", "SOL-USD")): 0,
        ("tickguard_feed_missed_trades_total", ("symbol", "SOL-USD")): 3,
        ("tickguard_feed_product_live", ("symbol", "ETH-USD")): 1,
        ("tickguard_feed_product_live", ("symbol", "SOL-USD")): 0,
        ("tickguard_feed_connected", None): 1,
        ("tickguard_feed_reconnects_total", None): 4,
        ("tickguard_feed_malformed_total", None): 7,
        ("tickguard_engine_window_seconds", ("symbol", "ETH-USD")): 0.25,
        ("tickguard_engine_windows_total", ("symbol", "ETH-USD")): 9,
        ("tickguard_positions_open", ("symbol", "ETH-USD")): 5,
        ("tickguard_positions_open", ("symbol", "SOL-USD")): 0,
        ("tickguard_closes_total", ("reason", "stop_loss")): 2,
        ("tickguard_closes_total", ("reason", "system")): 1,
        ("tickguard_closes_total", ("reason", "take_profit")): 0,
        ("tickguard_closes_total", ("reason", "manual")): 0,
        ("tickguard_ws_sessions", None): 8,
        ("tickguard_ws_dropped_slow_total", None): 2,
        ("tickguard_db_errors_total", None): 6,
        ("tickguard_persistence_transactions_total", None): 11,
        ("tickguard_writes_rejected_total", None): 5,
        ("tickguard_ws_handshakes_total", ("outcome", "rejected")): 0,
        ("tickguard_ws_client_frames_refused_total", ("why", "too_big")): 0,
    }
    for (name, label), number in expected.items():
        labels = dict([label]) if label else {}
        assert value(samples, name, **labels) == number, (name, labels)
    # SOL-USD's engine has judged no window yet: no latency to report, rather than a fake 0
    assert value(samples, "tickguard_engine_window_seconds", symbol="SOL-USD") is None
    assert value(later, "tickguard_engine_windows_total", symbol="ETH-USD") == 10
    # the bare app has no sources, and the full app's metrics did not leak into it
    assert parse(bare_text) == {}


async def test_openmetrics_when_the_scraper_asks_for_it(db: Database) -> None:
    sources = MetricsSources(persistence=PersistenceStats(db_errors=1))
    async with (
        running_app(_services(db, sources=sources, feed=FeedStatus())) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        openmetrics = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        latest = await client.get("/metrics", headers={"Accept": "text/plain; version=1.0.0"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(openmetrics.text)}
    assert families["tickguard_db_errors"].samples[0].value == 1
    assert latest.headers["content-type"].startswith(CONTENT_TYPE_LATEST)
    assert value(parse(latest.text), "tickguard_db_errors_total") == 1


async def test_missing_sources_leave_their_metrics_out(db: Database) -> None:
    """Without persistence or fanout stats (a web-only app), those metrics are absent, not 0."""
    sources = MetricsSources(engines={"BTC-USD": EngineStats(positions_open=1)})
    async with (
        running_app(_services(db, sources=sources, feed=FeedStatus())) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        samples = await scrape(client)
    names = {name for name, _ in samples}
    assert value(samples, "tickguard_positions_open", symbol="BTC-USD") == 1
    assert "tickguard_feed_reconnects_total" in names
    assert not names & {"tickguard_db_errors_total", "tickguard_ws_sessions"}
    assert not any(name.startswith("tickguard_closes") for name in names)
