"""The product catalog: Coinbase's product list (served here by the simulator) decides which
symbols exist before anything is subscribed; while it cannot be read, the feed decides."""

from __future__ import annotations

import logging
import socket
from functools import partial

import httpx
import pytest
import trio
from service_harness import Service, running_service, wait_until_live
from sim_fixtures import eventually

from tickguard.actors import products
from tickguard.actors.products import (
    CatalogConfig,
    CatalogUnreadable,
    ProductCatalog,
    fetch_products,
    parse_products,
)
from tickguard.sim import Simulator, open_simulator
from tickguard.storage import Database

PRODUCTS = {"BTC-USD": "65000", "ETH-USD": "3000"}
FAST = {"retry_base_s": 0.01, "retry_max_s": 0.05}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_catalog_reads_the_list_and_rereads_it():
    async with open_simulator(PRODUCTS) as sim, trio.open_nursery() as nursery:
        catalog = ProductCatalog()
        assert catalog.known("BTC-USD") is None  # never read: nothing is known either way
        await nursery.start(
            products.run, CatalogConfig(sim.rest_url, refresh_s=0.05, **FAST), catalog
        )
        await eventually(lambda: catalog.loaded)
        assert catalog.known("BTC-USD") is True and catalog.known("NOPE-USD") is False
        assert catalog.status("ETH-USD") == "online"
        sim.add_product("SOL-USD", "150")
        sim.set_trading("ETH-USD", online=False)
        await eventually(lambda: catalog.known("SOL-USD") is True)
        await eventually(lambda: catalog.status("ETH-USD") == "offline")
        assert catalog.failures == 0
        nursery.cancel_scope.cancel()


async def test_failed_reads_are_retried_with_one_warning_per_outage(caplog):
    caplog.set_level(logging.DEBUG, logger="tickguard.actors.products")
    async with open_simulator(PRODUCTS) as sim, trio.open_nursery() as nursery:
        sim.control({"op": "rest_fault", "kind": "5xx", "count": 2})
        sim.control({"op": "rest_fault", "kind": "truncate"})
        sim.control({"op": "rest_fault", "kind": "429", "retry_after": 0})
        catalog = ProductCatalog()
        await nursery.start(products.run, CatalogConfig(sim.rest_url, **FAST), catalog)
        await eventually(lambda: catalog.loaded)
        assert catalog.failures == 4 and catalog.known("ETH-USD") is True
        assert catalog.last_error is None
        nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "503" in warnings[0].getMessage()
    assert sim.stats()["rest_faults_applied"] == 4


async def test_an_unreachable_list_leaves_the_catalog_undecided():
    port = _free_port()  # nothing listens there
    async with trio.open_nursery() as nursery:
        catalog = ProductCatalog()
        await nursery.start(
            products.run, CatalogConfig(f"http://127.0.0.1:{port}", **FAST), catalog
        )
        await eventually(lambda: catalog.failures >= 3)
        assert catalog.known("NOPE-USD") is None and not catalog.loaded
        assert catalog.last_error is not None and "ConnectError" in catalog.last_error
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "payload",
    [{"id": "BTC-USD"}, [{"id": 5}], ["BTC-USD"], [{"status": "online"}]],
)
def test_a_list_of_the_wrong_shape_is_unreadable(payload):
    with pytest.raises(CatalogUnreadable):
        parse_products(payload)


async def test_fetch_reports_the_status_and_retry_after():
    async with open_simulator(PRODUCTS) as sim, httpx.AsyncClient(base_url=sim.rest_url) as http:
        sim.control({"op": "rest_fault", "kind": "429", "retry_after": 3})
        with pytest.raises(CatalogUnreadable) as limited:
            await fetch_products(http)
        assert limited.value.retry_after == 3 and "429" in str(limited.value)
        assert [p for p, _ in await fetch_products(http)] == ["BTC-USD", "ETH-USD"]


# ------------------------------------------------------------------ in the service
async def create(service: Service, symbol: str) -> httpx.Response:
    return await service.http.post(
        "/api/positions",
        json={"userId": "alice", "symbol": symbol, "side": "long", "entryPrice": "100"},
    )


def rejected(symbol: str) -> dict[str, object]:
    # The answer the feed's rejection has always given (web/routes.py).
    message = f"Unknown symbol: {symbol} is not a valid product."
    return {"error": message, "details": {"symbol": message}}


def named_in_subscribes(sim: Simulator, symbol: str) -> bool:
    return symbol in str([m for m in sim.received if m["type"] == "subscribe"])


@pytest.mark.slow
async def test_made_up_symbols_never_reach_the_feed_and_state_stays_small(db: Database):
    async with (
        open_simulator(PRODUCTS, heartbeat_interval=0.2) as sim,
        running_service(db, sim) as service,
    ):
        await wait_until_live(service)
        await eventually(lambda: service.tree.catalog.loaded)
        ready_before = len((await service.http.get("/ready")).content)
        metrics_before = len((await service.http.get("/metrics")).content)
        subscribes = sim.stats()["subscribes_received"]

        async def reject_many(first: int) -> None:
            for i in range(first, 2000, 10):
                symbol = f"FAKE{i}-USD"
                answer = await create(service, symbol)
                assert (answer.status_code, answer.json()) == (400, rejected(symbol))

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for first in range(10):
                    nursery.start_soon(reject_many, first)
        assert sim.stats()["subscribes_received"] == subscribes
        assert not named_in_subscribes(sim, "FAKE")
        ready = (await service.http.get("/ready")).content
        metrics = (await service.http.get("/metrics")).content
        assert b"FAKE" not in ready and b"FAKE" not in metrics
        # Counters move, entries do not multiply: a few hundred bytes, not 238 KB / 330 KB.
        assert len(ready) < ready_before + 512
        assert len(metrics) < metrics_before + 2048
        # A listed symbol is still created (and subscribed) as before.
        answer = await create(service, "ETH-USD")
        assert answer.status_code == 201, answer.text
        assert named_in_subscribes(sim, "ETH-USD")


async def test_while_the_list_is_unreadable_the_feed_decides_then_the_list_does(db: Database):
    rest_port = _free_port()  # the REST side is down: nothing listens there yet
    async with (
        open_simulator(PRODUCTS, heartbeat_interval=0.2) as sim,
        running_service(db, sim, coinbase_rest_url=f"http://127.0.0.1:{rest_port}") as service,
    ):
        await wait_until_live(service)
        await eventually(lambda: service.tree.catalog.failures >= 1)
        assert service.tree.catalog.known("EARLY-USD") is None
        # As before the catalog: the subscribe is sent and Coinbase's answer decides.
        answer = await create(service, "EARLY-USD")
        assert (answer.status_code, answer.json()) == (400, rejected("EARLY-USD"))
        assert named_in_subscribes(sim, "EARLY-USD")
        assert (await create(service, "BTC-USD")).status_code == 201
        # The list comes back: from now on it decides, before the feed.
        async with open_simulator(PRODUCTS, port=rest_port):
            await eventually(lambda: service.tree.catalog.loaded, timeout=60)
            answer = await create(service, "LATE-USD")
            assert (answer.status_code, answer.json()) == (400, rejected("LATE-USD"))
            assert not named_in_subscribes(sim, "LATE-USD")
            assert (await create(service, "ETH-USD")).status_code == 201


async def test_the_catalog_is_a_supervised_child_pointed_at_coinbase_rest_url(db: Database) -> None:
    from tickguard.config import Settings
    from tickguard.supervisor import build_tree

    settings = Settings(coinbase_rest_url="http://127.0.0.1:9", database_url="postgresql://x")
    tree = build_tree(settings, db)  # built, never run
    spec = next(c for c in tree.supervisor._initial if c.id == "products")
    assert isinstance(spec.start, partial)
    assert spec.start.args[0] == CatalogConfig("http://127.0.0.1:9", 3600)
    assert spec.start.args[1] is tree.catalog
    assert tree.app.extensions["tickguard"].catalog is tree.catalog
