"""The Coinbase-protocol simulator speaks the protocol COINBASE.md describes."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
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


# ------------------------------------------------------------------ HTTP by h11 (hardening 8)
async def raw_exchange(sim: Simulator, data: bytes) -> bytes:
    """Write ``data`` on a fresh TCP connection and read until the simulator closes it."""
    stream = await trio.open_tcp_stream(sim.host, sim.port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /control HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"POST /control HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"GARBAGE\r\n\r\n",
        b"GET /stats HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000,  # a head that never ends
    ],
    ids=["content-length-abc", "two-lengths", "no-request-line", "endless-head"],
)
async def test_a_malformed_request_is_answered_4xx_and_ends_only_its_connection(request_bytes):
    async with open_simulator(PRODUCTS) as sim, open_websocket_url(sim.url) as ws:
        await subscribe(ws, product_ids=["BTC-USD"], channels=["ticker"])
        await next_of(ws, "subscriptions")
        answer = await raw_exchange(sim, request_bytes)
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer[:200]
        # The simulator and the open session carry on.
        sim.publish("BTC-USD", "65010")
        assert (await next_of(ws, "ticker"))["price"] == "65000.00"  # the stale one first
        assert (await next_of(ws, "ticker"))["price"] == "65010"
        async with httpx.AsyncClient() as http:
            stats = (await http.get(f"{sim.rest_url}/stats")).json()["stats"]
        assert stats["connections_open"] == 1


async def test_bad_control_bodies_are_400_and_connections_are_kept_alive():
    async with open_simulator(PRODUCTS) as sim, httpx.AsyncClient() as http:
        for body in (b"{not json", b"\xff\xfe", b"[1]", b'{"op": "nope"}'):
            answer = await http.post(sim.control_url, content=body)
            assert answer.status_code == 400 and answer.json()["ok"] is False
        # One client connection served all of them (keep-alive through h11).
        assert sim.stats()["http_requests"] == 4
        missing = await http.get(f"{sim.rest_url}/nowhere")
        assert missing.status_code == 404


async def test_an_upgrade_with_a_frame_in_the_same_write_is_served():
    # The client's first frame arrives with the handshake (what crashed hypercorn, #225).
    async with open_simulator(PRODUCTS) as sim:
        stream = await trio.open_tcp_stream(sim.host, sim.port)
        async with stream:
            frame = bytearray(b"\x81\x80\x00\x00\x00\x00")  # masked empty text frame
            head = (
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            await stream.send_all(head + bytes(frame))
            received = b""
            with trio.fail_after(5):
                while b'"type": "error"' not in received:
                    received += await stream.receive_some(65536)
        assert received.startswith(b"HTTP/1.1 101")
        # The empty text message was read and answered like any non-JSON message.
        assert b"Failed to parse message" in received
        assert sim.stats()["errors_sent"] == 1


# ------------------------------------------------------------------ REST market data
async def test_products_lists_every_product_in_coinbase_shape():
    async with open_simulator(PRODUCTS) as sim, httpx.AsyncClient(base_url=sim.rest_url) as http:
        products = (await http.get("/products")).json()
        assert [p["id"] for p in products] == ["BTC-USD", "ETH-USD"]
        btc = products[0]
        assert (btc["base_currency"], btc["quote_currency"]) == ("BTC", "USD")
        assert btc["status"] == "online" and btc["trading_disabled"] is False
        assert (await http.get("/products/ETH-USD")).json()["id"] == "ETH-USD"
        for path in ("/products/NOPE-USD", "/products/NOPE-USD/trades", "/products/X/candles"):
            missing = await http.get(path)
            assert (missing.status_code, missing.json()) == (404, {"message": "NotFound"})


async def test_trades_are_newest_first_with_cursor_pagination():
    async with open_simulator(PRODUCTS) as sim, httpx.AsyncClient(base_url=sim.rest_url) as http:
        ids = [sim.publish("BTC-USD", str(65000 + i)) for i in range(25)]
        page = await http.get("/products/BTC-USD/trades", params={"limit": 10})
        first = page.json()
        assert [t["trade_id"] for t in first] == ids[::-1][:10]
        assert first[0] == {
            "time": first[0]["time"],
            "trade_id": ids[-1],
            "price": "65024",
            "size": "0.01000000",
            "side": "buy",
        }
        assert TIME.match(first[0]["time"])
        assert page.headers["CB-BEFORE"] == str(ids[-1])
        assert page.headers["CB-AFTER"] == str(ids[-10])
        # after = older than the cursor, walking back with CB-AFTER.
        seen = [t["trade_id"] for t in first]
        cursor = page.headers["CB-AFTER"]
        while True:
            older = await http.get(
                "/products/BTC-USD/trades", params={"after": cursor, "limit": 10}
            )
            if not older.json():
                break
            seen += [t["trade_id"] for t in older.json()]
            cursor = older.headers["CB-AFTER"]
        assert seen == ids[::-1]
        # before = newer than the cursor: the trades right after it, newest first.
        newer = await http.get("/products/BTC-USD/trades", params={"before": ids[4], "limit": 3})
        assert [t["trade_id"] for t in newer.json()] == [ids[7], ids[6], ids[5]]
        for bad in ({"limit": 1001}, {"limit": 0}, {"after": "x"}):
            assert (await http.get("/products/BTC-USD/trades", params=bad)).status_code == 400


async def test_hidden_trades_show_in_rest_but_not_on_the_ticker():
    # What a disconnect hides is what REST recovers (COINBASE.md).
    async with open_simulator(PRODUCTS) as sim, open_websocket_url(sim.url) as ws:
        await subscribe(ws, product_ids=["BTC-USD"], channels=["ticker"])
        await next_of(ws, "subscriptions")
        stale = await next_of(ws, "ticker")
        async with httpx.AsyncClient(base_url=sim.rest_url) as http:
            answer = await http.post(
                "/control",
                json={"op": "skip_trades", "product": "BTC-USD", "prices": ["64000", "66000"]},
            )
            last = answer.json()["last_trade_id"]
            sim.publish("BTC-USD", "65000.5")
            ticker = await next_of(ws, "ticker")
            assert ticker["trade_id"] == last + 1 == stale["trade_id"] + 3
            trades = (
                await http.get(
                    "/products/BTC-USD/trades",
                    params={"after": ticker["trade_id"], "before": stale["trade_id"]},
                )
            ).json()
        assert [(t["trade_id"], t["price"]) for t in trades] == [
            (last, "66000"),
            (last - 1, "64000"),
        ]


async def test_candles_are_minute_low_high_open_close_volume_newest_first():
    base = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    async with open_simulator(PRODUCTS) as sim, httpx.AsyncClient(base_url=sim.rest_url) as http:
        for second, price in ((5, "100"), (20, "90"), (50, "120"), (59, "110"), (65, "105")):
            sim.publish("ETH-USD", price, time=base + timedelta(seconds=second))
        answer = await http.get(
            "/products/ETH-USD/candles",
            params={
                "granularity": 60,
                "start": "2026-01-01T12:00:00Z",
                "end": "2026-01-01T12:05:00Z",
            },
        )
        rows = json.loads(answer.text, parse_float=Decimal)
        minute = int(base.timestamp())
        assert rows == [
            [minute + 60, 105, 105, 105, 105, Decimal("0.01")],
            [minute, 90, 120, 100, 110, Decimal("0.04")],
        ]
        too_long = await http.get(
            "/products/ETH-USD/candles",
            params={"granularity": 60, "start": "2026-01-01T00:00:00Z", "end": "2026-01-02"},
        )
        assert too_long.status_code == 400 and "300" in too_long.json()["message"]
        odd = await http.get("/products/ETH-USD/candles", params={"granularity": 61})
        assert odd.status_code == 400


async def test_rest_faults_slow_429_5xx_truncated_then_normal():
    async with open_simulator(PRODUCTS) as sim, httpx.AsyncClient(base_url=sim.rest_url) as http:
        for fault in (
            {"kind": "429", "retry_after": 7},
            {"kind": "5xx", "status": 502},
            {"kind": "truncate"},
            {"kind": "slow", "seconds": 0.2},
        ):
            assert (await http.post("/control", json={"op": "rest_fault", **fault})).is_success
        limited = await http.get("/products")
        assert (limited.status_code, limited.headers["Retry-After"]) == (429, "7")
        assert (await http.get("/products")).status_code == 502
        with pytest.raises(httpx.RemoteProtocolError):  # the body ends before its length
            await http.get("/products")
        start = trio.current_time()
        slow = await http.get("/products")
        assert slow.status_code == 200 and trio.current_time() - start >= 0.2
        assert (await http.get("/products")).status_code == 200
        # Control and stats are never faulted.
        assert sim.stats()["rest_faults_applied"] == 4
        bad = await http.post("/control", json={"op": "rest_fault", "kind": "teapot"})
        assert bad.status_code == 400


# ------------------------------------------------------------------ status channel
async def test_status_channel_reports_products_and_a_halt():
    async with open_simulator(PRODUCTS) as sim, open_websocket_url(sim.url) as ws:
        await subscribe(ws, channels=["status"])
        ack = await next_of(ws, "subscriptions")
        assert ack["channels"] == [{"name": "status", "product_ids": []}]
        status = await next_of(ws, "status")
        assert {p["id"]: p["status"] for p in status["products"]} == {
            "BTC-USD": "online",
            "ETH-USD": "online",
        }
        async with httpx.AsyncClient(base_url=sim.rest_url) as http:
            halted = await http.post("/control", json={"op": "halt", "product": "ETH-USD"})
            assert halted.json() == {"ok": True, "sent": 1}
            status = await next_of(ws, "status")
            eth = next(p for p in status["products"] if p["id"] == "ETH-USD")
            assert (eth["status"], eth["trading_disabled"]) == ("offline", True)
            listed = (await http.get("/products/ETH-USD")).json()
            assert (listed["status"], listed["trading_disabled"]) == ("offline", True)
            await http.post("/control", json={"op": "resume", "product": "ETH-USD"})
            status = await next_of(ws, "status")
        assert all(p["status"] == "online" for p in status["products"])


# ------------------------------------------------------------------ control, CLI, paths
async def test_help_op_lists_every_op_with_its_arguments():
    from tickguard.sim.control import OPS

    async with open_simulator(PRODUCTS) as sim, httpx.AsyncClient() as http:
        listed = (await http.post(sim.control_url, json={"op": "help"})).json()["ops"]
    assert [entry["op"] for entry in listed] == list(OPS)
    by_name = {entry["op"]: entry for entry in listed}
    assert by_name["publish"]["arguments"] == ["product", "price", "time?"]
    assert by_name["stall"]["arguments"] == ["seconds"]
    assert all(entry["summary"] for entry in listed)
    for name in ("drop", "stall", "malformed", "unknown", "raw", "skip_trades", "delay_acks"):
        assert name in by_name  # the fault ops stay
    for name in ("refuse", "publish", "path", "rate", "add_product", "blast"):
        assert name in by_name


async def test_raw_bytes_op_writes_bytes_as_they_are():
    async with open_simulator(PRODUCTS) as sim:
        stream = await trio.open_tcp_stream(sim.host, sim.port)
        async with stream:
            await stream.send_all(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            head = b""
            with trio.fail_after(5):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(65536)
                assert sim.control({"op": "raw_bytes", "hex": "f3020102"}) == {
                    "ok": True,
                    "sent": 1,
                }
                rest = head.split(b"\r\n\r\n", 1)[1]
                while len(rest) < 4:
                    rest += await stream.receive_some(65536)
        assert rest == bytes.fromhex("f3020102")  # a reserved opcode with RSV bits, verbatim


def test_sim_help_documents_every_option_with_its_default(capsys):
    from tickguard.sim.cli import build_parser, main

    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    # argparse wraps lines (also at hyphens): compare without whitespace.
    text = "".join(capsys.readouterr().out.split())
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.option_strings[0] in text
        assert action.help, action.dest
        assert f"(default:{action.default})" in text, action.dest
    assert "--volatility" in text and '"op":"help"' in text


def test_volatility_option_is_validated_and_reaches_the_walk():
    from tickguard.sim.cli import build_parser

    args = build_parser().parse_args(["--volatility", "0.002"])
    assert args.volatility == Decimal("0.002")
    for bad in ("abc", "0", "1", "-0.1"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--volatility", bad])
    sim = Simulator({"BTC-USD": "65000"}, volatility="0.002")
    steps = [next(sim.products["BTC-USD"].path) for _ in range(200)]
    moves = [abs(b - a) for a, b in zip(steps, steps[1:], strict=False)]
    # 0.2% of 65000 is 130.00: moves up to that, never beyond.
    assert max(moves) <= Decimal("130.00") and max(moves) > Decimal("50")


def test_default_walk_crosses_a_five_basis_point_bracket_within_two_minutes():
    # Two minutes at the CLI's default 5 ticks/s is 600 ticks; every seed must leave the band.
    start = Decimal("65000.00")
    band = start * Decimal("0.0005")
    for seed in range(50):
        walk = paths.walk(start, seed=seed)
        assert any(abs(next(walk) - start) >= band for _ in range(600)), seed
    # The walk before --volatility (50 increments a tick) stays inside for most seeds.
    stuck = 0
    for seed in range(50):
        walk = paths.walk(start, seed=seed, max_steps=50)
        stuck += all(abs(next(walk) - start) < band for _ in range(600))
    assert stuck > 25


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 70000])
def test_pre_encoded_frames_are_wsprotos_frames(length):
    from wsproto.frame_protocol import FrameProtocol

    from tickguard.sim import encode_frame

    text = "é" * (length // 2) + "x" * (length % 2)
    expected = bytes(FrameProtocol(client=False, extensions=[]).send_data(text, fin=True))
    assert encode_frame(text) == encode_frame(text.encode()) == expected
