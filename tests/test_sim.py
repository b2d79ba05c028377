"""The Coinbase-protocol simulator speaks the protocol COINBASE.md describes."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tickguard.sim import Simulator, open_simulator, paths

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
DECIMAL = re.compile(r"^\d+(\.\d+)?$")


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def next_of(ws, kind: str) -> dict:
    while True:
        message = json.loads(await ws.get_message())
        if message["type"] == kind:
            return message


async def subscribe(ws, **body) -> None:
    await ws.send_message(json.dumps({"type": "subscribe", **body}))


PRODUCTS = {"BTC-USD": "65000.00", "ETH-USD": "3000.00"}


async def test_channel_object_form_acks_the_full_set_then_sends_the_stale_ticker():
    async with open_simulator(PRODUCTS) as sim, open_websocket_url(sim.url) as ws:
        await subscribe(ws, channels=[{"name": "ticker", "product_ids": ["BTC-USD"]}])
        ack = await next_of(ws, "subscriptions")
        assert ack["channels"] == [{"name": "ticker", "product_ids": ["BTC-USD"]}]
        stale = json.loads(await ws.get_message())
        assert stale["type"] == "ticker" and stale["product_id"] == "BTC-USD"
        assert stale["price"] == "65000.00"
        await subscribe(
            ws,
            channels=[
                {"name": "ticker", "product_ids": ["ETH-USD"]},
                {"name": "heartbeat", "product_ids": ["ETH-USD"]},
            ],
        )
        ack = await next_of(ws, "subscriptions")
        assert ack["channels"] == [
            {"name": "ticker", "product_ids": ["BTC-USD", "ETH-USD"]},
            {"name": "heartbeat", "product_ids": ["ETH-USD"]},
        ]
        assert sim.received[-1]["channels"][0]["product_ids"] == ["ETH-USD"]


async def test_top_level_form_and_unsubscribe():
    async with open_simulator(PRODUCTS) as sim, open_websocket_url(sim.url) as ws:
        await subscribe(ws, product_ids=["BTC-USD", "ETH-USD"], channels=["ticker", "heartbeat"])
        ack = await next_of(ws, "subscriptions")
        assert {c["name"]: c["product_ids"] for c in ack["channels"]} == {
            "ticker": ["BTC-USD", "ETH-USD"],
            "heartbeat": ["BTC-USD", "ETH-USD"],
        }
        await ws.send_message(
            json.dumps({"type": "unsubscribe", "product_ids": ["BTC-USD"], "channels": ["ticker"]})
        )
        ack = await next_of(ws, "subscriptions")
        assert {c["name"]: c["product_ids"] for c in ack["channels"]} == {
            "ticker": ["ETH-USD"],
            "heartbeat": ["BTC-USD", "ETH-USD"],
        }
        assert [m["type"] for m in sim.received] == ["subscribe", "unsubscribe"]
        assert sim.subscribers("BTC-USD") == 0 and sim.subscribers("ETH-USD") == 1


async def test_one_unknown_product_voids_the_whole_subscribe_and_the_socket_stays_open():
    async with open_simulator(PRODUCTS) as sim, open_websocket_url(sim.url) as ws:
        await subscribe(ws, product_ids=["BTC-USD", "NOPE-USD"], channels=["ticker"])
        error = json.loads(await ws.get_message())
        assert error == {
            "type": "error",
            "message": "Failed to subscribe",
            "reason": "NOPE-USD is not a valid product",
        }
        assert sim.subscribers("BTC-USD") == 0
        await subscribe(ws, product_ids=["BTC-USD"], channels=["ticker"])
        ack = await next_of(ws, "subscriptions")
        assert ack["channels"] == [{"name": "ticker", "product_ids": ["BTC-USD"]}]


async def test_ticker_carries_every_field_as_coinbase_writes_it():
    async with open_simulator(PRODUCTS) as sim, open_websocket_url(sim.url) as ws:
        await subscribe(ws, product_ids=["BTC-USD"], channels=["ticker"])
        await next_of(ws, "subscriptions")
        stale = await next_of(ws, "ticker")
        trade_id = sim.publish("BTC-USD", "65001.25")
        ticker = await next_of(ws, "ticker")
        assert ticker["trade_id"] == trade_id == stale["trade_id"] + 1
        assert ticker["price"] == "65001.25"
        for field in (
            "price",
            "open_24h",
            "volume_24h",
            "low_24h",
            "high_24h",
            "volume_30d",
            "best_bid",
            "best_bid_size",
            "best_ask",
            "best_ask_size",
            "last_size",
        ):
            assert isinstance(ticker[field], str) and DECIMAL.match(ticker[field]), field
        assert isinstance(ticker["sequence"], int) and ticker["sequence"] > stale["sequence"]
        assert ticker["side"] in ("buy", "sell")
        assert TIME.match(ticker["time"])


async def test_stale_ticker_after_ack_is_the_last_trade_with_its_own_time():
    old = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    async with open_simulator(PRODUCTS) as sim:
        trade_id = sim.publish("ETH-USD", "2999.5", time=old)
        async with open_websocket_url(sim.url) as ws:
            await subscribe(ws, product_ids=["ETH-USD"], channels=["ticker"])
            assert (await ws.get_message()).startswith('{"type": "subscriptions"')
            stale = json.loads(await ws.get_message())
        assert stale["type"] == "ticker"
        assert (stale["trade_id"], stale["price"]) == (trade_id, "2999.5")
        assert stale["time"] == "2024-01-02T03:04:05.678901Z"


async def test_heartbeats_per_subscribed_product_carry_the_last_trade_id(autojump_clock):
    async with open_simulator(PRODUCTS, heartbeat_interval=1.0) as sim:
        async with open_websocket_url(sim.url) as ws:
            await subscribe(ws, product_ids=["BTC-USD"], channels=["heartbeat"])
            await next_of(ws, "subscriptions")
            last = sim.skip_trade_ids("BTC-USD", 7)
            start = trio.current_time()
            beats = [await next_of(ws, "heartbeat") for _ in range(3)]
            elapsed = trio.current_time() - start
        assert {b["product_id"] for b in beats} == {"BTC-USD"}
        assert {b["last_trade_id"] for b in beats} == {last}
        assert all(TIME.match(b["time"]) for b in beats)
        assert 2.0 <= elapsed <= 3.5  # virtual time: once a second


async def test_silent_client_is_disconnected_after_the_subscribe_deadline(autojump_clock):
    async with open_simulator(PRODUCTS) as sim, open_websocket_url(sim.url) as ws:
        start = trio.current_time()
        with pytest.raises(ConnectionClosed):
            with trio.fail_after(30):
                await ws.get_message()
        assert 5.0 <= trio.current_time() - start < 6.0
        assert sim.stats()["deadline_kicks"] == 1


async def test_faults_drop_stall_malformed_unknown(autojump_clock):
    async with open_simulator(PRODUCTS, heartbeat_interval=1.0) as sim:
        async with open_websocket_url(sim.url) as ws:
            await subscribe(ws, product_ids=["BTC-USD"], channels=["ticker", "heartbeat"])
            await next_of(ws, "subscriptions")
            await next_of(ws, "ticker")
            sim.send_malformed(2)
            sim.send_unknown(1)
            first = await ws.get_message()
            assert first == '{"type": "ticker", "product_id": "BTC-USD", "price": "6'
            assert await ws.get_message() == "not json at all"
            assert json.loads(await ws.get_message())["type"] == "status"
            # Stalled: nothing at all for 3 s, then heartbeats again.
            sim.stall(3)
            start = trio.current_time()
            await next_of(ws, "heartbeat")
            assert trio.current_time() - start >= 3
            sim.drop_all()
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()
        stats = sim.stats()
        assert stats["malformed_sent"] == 2 and stats["unknown_sent"] == 1
        assert stats["connections_dropped"] == 1


async def test_refused_connections_and_delayed_acks(autojump_clock):
    async with open_simulator(PRODUCTS) as sim:
        sim.refuse_connections(10)
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(sim.url):
                pass
        assert rejected.value.status_code == 503
        await trio.sleep(10)
        sim.delay_acks(2)
        async with open_websocket_url(sim.url) as ws:
            start = trio.current_time()
            await subscribe(ws, product_ids=["BTC-USD"], channels=["ticker"])
            await next_of(ws, "subscriptions")
            assert trio.current_time() - start >= 2
        assert sim.stats()["connections_refused"] == 1


async def test_control_channel_over_http_publishes_and_sets_paths():
    async with open_simulator(PRODUCTS) as sim, open_websocket_url(sim.url) as ws:
        await subscribe(ws, product_ids=["ETH-USD"], channels=["ticker"])
        await next_of(ws, "subscriptions")
        await next_of(ws, "ticker")
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                sim.control_url, json={"op": "publish", "product": "ETH-USD", "price": "3100.5"}
            )
            assert answer.status_code == 200 and answer.json()["ok"] is True
            assert (await next_of(ws, "ticker"))["price"] == "3100.5"
            answer = await http.post(
                sim.control_url,
                json={"op": "path", "product": "ETH-USD", "kind": "script", "prices": ["1", "2"]},
            )
            assert answer.json() == {"ok": True}
            bad = await http.post(sim.control_url, json={"op": "publish", "product": "NOPE"})
            assert bad.status_code == 400
            stats = (await http.get(f"http://{sim.host}:{sim.port}/stats")).json()["stats"]
        assert stats["tickers_sent"] == 2
        sim.set_rate(100)
        prices = [(await next_of(ws, "ticker"))["price"] for _ in range(2)]
        assert prices == ["1", "2"]


async def test_blast_sends_every_frame_in_order():
    async with open_simulator(PRODUCTS) as sim, open_websocket_url(sim.url) as ws:
        await subscribe(ws, product_ids=["BTC-USD"], channels=["ticker"])
        await next_of(ws, "subscriptions")
        await next_of(ws, "ticker")
        prices = [Decimal(60000) + i for i in range(5000)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sim.blast, "BTC-USD", prices)
            got = [Decimal((await next_of(ws, "ticker"))["price"]) for _ in prices]
        assert got == prices
        assert sim.stats()["blast_frames_sent"] == 5000


def test_paths_are_exact_and_seeded():
    a = paths.walk(Decimal("100.00"), seed=3)
    b = paths.walk(Decimal("100.00"), seed=3)
    first = [next(a) for _ in range(100)]
    assert first == [next(b) for _ in range(100)]
    assert all(p == p.quantize(Decimal("0.01")) and p > 0 for p in first)
    assert list(paths.script(["1.5", 2])) == [Decimal("1.5"), Decimal(2)]
    jump = paths.jump(Decimal(100), Decimal(80), after=2)
    assert [next(jump) for _ in range(4)] == [100, 100, 80, 80]


def test_main_rejects_bad_products():
    from tickguard.sim import main

    with pytest.raises(SystemExit):
        main(["--products", "BTC-USD=abc"])
    assert isinstance(Simulator({"X-Y": 1}).products["X-Y"].price, Decimal)
