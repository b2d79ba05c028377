"""The feed actor against the running simulator (real sockets, virtual time)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import partial

import pytest
import trio
import trio.testing
from sim_fixtures import eventually

from tickguard.actors import backoff, coinbase
from tickguard.actors.feed import FeedConfig, run
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox, ask
from tickguard.actors.messages import Drop, Pin, SubscribeOutcome, Unwatch, Watch
from tickguard.actors.window import WindowSlots
from tickguard.sim import Simulator, open_simulator

PRODUCTS = {"BTC-USD": "65000.00", "ETH-USD": "3000.00", "SOL-USD": "150.00"}


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


class Harness:
    def __init__(self, sim: Simulator, status: FeedStatus, slots: WindowSlots, mailbox) -> None:
        self.sim, self.status, self.slots, self.mailbox = sim, status, slots, mailbox

    async def watch(self, symbol: str) -> SubscribeOutcome:
        return await ask(self.mailbox, lambda reply: Watch(symbol, reply), 3)

    def state(self, symbol: str) -> str | None:
        product = self.status.products.get(symbol)
        return product.state if product else None


@asynccontextmanager
async def running_feed(
    products=("BTC-USD",), sim_options=None, recoveries=None, **config
) -> AsyncIterator[Harness]:
    options = {"heartbeat_interval": 1.0, **(sim_options or {})}
    async with open_simulator(PRODUCTS, **options) as sim:
        settings = {
            "reconnect_base_s": 0.5,
            "reconnect_max_s": 8.0,
            "heartbeat_timeout_s": 3.0,
            "seed": 7,
            **config,
        }
        feed_config = FeedConfig(sim.url, tuple(products), **settings)
        slots, mailbox, status = WindowSlots(), Mailbox("feed"), FeedStatus()
        async with trio.open_nursery() as nursery:
            feed = partial(run, recoveries=recoveries)
            await nursery.start(feed, feed_config, slots, mailbox, status)
            harness = Harness(sim, status, slots, mailbox)
            await eventually(lambda: all(harness.state(p) == "live" for p in products))
            yield harness
            nursery.cancel_scope.cancel()


async def test_ticks_reach_the_window_slot_exactly(autojump_clock):
    async with running_feed() as h:
        await eventually(lambda: h.status.products["BTC-USD"].ticks == 1)
        h.slots.get("BTC-USD").take_nowait()  # the stale ticker after the ack
        for price in ("65010.10", "64990.01", "65000.5"):
            h.sim.publish("BTC-USD", price)
        await eventually(lambda: h.status.products["BTC-USD"].ticks == 4)
        window = h.slots.get("BTC-USD").take_nowait()
        assert window is not None and window.count == 3
        assert window.low == Decimal("64990.01") and window.high == Decimal("65010.10")
        assert window.last == Decimal("65000.5")


async def test_one_product_per_subscribe_message_in_channel_object_form(autojump_clock):
    async with running_feed(products=("BTC-USD", "ETH-USD", "SOL-USD")) as h:
        status, *subscribes = [m for m in h.sim.received if m["type"] == "subscribe"]
        # The status channel first (it names no product), then one product per message.
        assert status == {"type": "subscribe", "channels": ["status"]}
        assert len(subscribes) == 3
        for message in subscribes:
            assert "product_ids" not in message
            named = {p for channel in message["channels"] for p in channel["product_ids"]}
            assert len(named) == 1
            assert {c["name"] for c in message["channels"]} == {"ticker", "heartbeat"}
        assert [m["channels"][0]["product_ids"][0] for m in subscribes] == [
            "BTC-USD",
            "ETH-USD",
            "SOL-USD",
        ]


async def test_first_subscribe_within_the_deadline_and_never_kicked(autojump_clock):
    async with running_feed(
        products=("BTC-USD", "ETH-USD"), sim_options={"subscribe_deadline": 5}
    ) as h:
        (conn,) = h.sim.connections.values()
        assert conn.first_subscribe_at - conn.connected_at < 5.0
        await trio.sleep(20)
        assert h.sim.stats()["deadline_kicks"] == 0
        assert h.sim.stats()["connections_accepted"] == 1


async def test_invalid_symbol_rejected_while_others_stay_subscribed(autojump_clock):
    async with running_feed(products=("BTC-USD",)) as h:
        outcome = await h.watch("NOPE-USD")
        assert outcome == SubscribeOutcome.rejected("NOPE-USD is not a valid product")
        assert h.state("NOPE-USD") == "rejected"
        assert await h.watch("ETH-USD") == SubscribeOutcome.ACCEPTED
        # Asked again: answered from memory, without another subscribe to Coinbase.
        sent = len(h.sim.received)
        assert (await h.watch("NOPE-USD")).status == "rejected"
        assert len(h.sim.received) == sent
        await eventually(lambda: h.status.products["BTC-USD"].ticks == 1)
        h.slots.get("BTC-USD").take_nowait()
        h.sim.publish("BTC-USD", "65100")
        window = await h.slots.get("BTC-USD").take()
        assert window.last == Decimal("65100")
        assert h.sim.subscribers("BTC-USD") == 1 and h.sim.subscribers("ETH-USD") == 1


async def test_malformed_and_unknown_messages_are_counted_and_skipped(autojump_clock):
    async with running_feed() as h:
        h.sim.send_malformed(6)
        h.sim.send_unknown(3)
        await eventually(lambda: h.status.products["BTC-USD"].ticks == 1)
        h.slots.get("BTC-USD").take_nowait()
        h.sim.publish("BTC-USD", "65001")
        window = await h.slots.get("BTC-USD").take()
        assert window.last == Decimal("65001") and window.count == 1
        assert h.status.malformed == 6
        assert h.status.unknown == 1  # status and l2update are known, ignored types
        assert h.status.reconnects == 0


async def test_resubscribes_everything_after_a_dropped_connection(autojump_clock):
    async with running_feed(products=("BTC-USD", "ETH-USD")) as h:
        assert await h.watch("SOL-USD") == SubscribeOutcome.ACCEPTED
        h.sim.drop_all()
        await eventually(lambda: h.sim.stats()["connections_accepted"] == 2)
        await eventually(
            lambda: all(h.sim.subscribers(p) == 1 for p in ("BTC-USD", "ETH-USD", "SOL-USD"))
        )
        assert h.status.reconnects == 1
        subscribes = [m for m in h.sim.received if m["type"] == "subscribe"]
        assert len(subscribes) == 8  # per connection: the status channel and 3 products
        await eventually(lambda: h.status.products["SOL-USD"].ticks == 1)
        h.slots.get("SOL-USD").take_nowait()
        h.sim.publish("SOL-USD", "151")
        assert (await h.slots.get("SOL-USD").take()).last == Decimal("151")


async def test_backoff_grows_within_bounds_and_resets_after_data(autojump_clock):
    async with running_feed() as h:
        h.sim.refuse_connections(60)
        h.sim.drop_all()
        await eventually(lambda: len(h.status.backoffs) >= 6, timeout=120)
        attempts = list(h.status.backoffs)[:6]
        assert [a for a, _ in attempts] == [0, 1, 2, 3, 4, 5]
        for attempt, delay in attempts:
            assert 0 <= delay <= min(8.0, 0.5 * 2**attempt)
        assert any(delay > 0.5 for _, delay in attempts)  # it does grow (seeded)
        h.sim.refuse_until = float("-inf")
        await eventually(lambda: h.state("BTC-USD") == "live" and h.status.connected, 60)
        h.sim.publish("BTC-USD", "65002")
        await eventually(lambda: h.status.products["BTC-USD"].ticks >= 2)
        before = len(h.status.backoffs)
        h.sim.drop_all()
        await eventually(lambda: len(h.status.backoffs) > before)
        assert h.status.backoffs[-1][0] == 0


def test_backoff_exponential_doubles_up_to_the_cap_and_stays_finite():
    assert [backoff.exponential(n, 0.5, 30.0) for n in range(8)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
    # An engine retries a failed close forever: a huge attempt count stays at the cap.
    assert backoff.exponential(5000, 0.5, 30.0) == 30.0


def test_backoff_delay_full_jitter_bounds():
    import random

    rng = random.Random(1)
    for attempt in range(80):
        cap = min(30.0, 1.0 * 2**attempt)
        samples = [backoff.full_jitter(attempt, 1.0, 30.0, rng) for _ in range(50)]
        assert all(0 <= s <= cap for s in samples)


async def test_silent_product_is_stale_and_the_connection_recycled(autojump_clock):
    async with running_feed(heartbeat_timeout_s=3.0) as h:
        h.sim.stall(30)
        await eventually(lambda: h.sim.stats()["connections_accepted"] >= 2, timeout=20)
        assert h.status.reconnects >= 1
        await eventually(lambda: h.state("BTC-USD") == "live" and h.status.connected, 20)


async def test_stale_state_is_reported_while_silent(autojump_clock):
    # Every connection stalls (refused reconnects): the product stays stale.
    async with running_feed(heartbeat_timeout_s=3.0) as h:
        h.sim.refuse_connections(100)
        h.sim.stall(100)
        await eventually(lambda: h.state("BTC-USD") == "stale", timeout=20)
        snapshot = h.status.snapshot()
        assert snapshot["products"]["BTC-USD"]["state"] == "stale"
        assert snapshot["products"]["BTC-USD"]["age_s"] >= 3.0
        # Why: the recycle, then each refused reconnect.
        assert snapshot["products"]["BTC-USD"]["lastError"] in (
            "connection recycled: BTC-USD silent for 3.0 s",
            "handshake refused: HTTP 503",
        )


async def test_missed_trades_from_heartbeats_and_across_a_reconnect(autojump_clock):
    async with running_feed() as h:
        h.sim.skip_trade_ids("BTC-USD", 5)
        await eventually(lambda: h.status.missed_trades == 5, timeout=20)
        assert h.status.missed_gaps == 1
        # Disconnected while three trades happen: the stale ticker shows the jump.
        h.sim.refuse_connections(3)
        h.sim.drop_all()
        for price in ("65001", "65002", "65003"):
            h.sim.publish("BTC-USD", price)
        await eventually(lambda: h.status.missed_gaps == 2, timeout=30)
        assert h.status.missed_trades == 5 + 2
        assert h.status.products["BTC-USD"].missed_trades == 7
        # The last of the three arrived as the stale ticker after the ack.
        assert h.slots.get("BTC-USD").last_price == Decimal("65003")


async def test_unwatch_lingers_then_unsubscribes_and_rewatch_subscribes(autojump_clock):
    async with running_feed(linger_s=10.0) as h:
        assert await h.watch("ETH-USD") == SubscribeOutcome.ACCEPTED
        await h.mailbox.send(Unwatch("ETH-USD"))
        await trio.sleep(5)
        assert h.sim.subscribers("ETH-USD") == 1
        await eventually(lambda: h.sim.subscribers("ETH-USD") == 0, timeout=20)
        assert [m["type"] for m in h.sim.received].count("unsubscribe") == 1
        assert "ETH-USD" not in h.status.products
        # Always-subscribed products are never dropped.
        await h.mailbox.send(Unwatch("BTC-USD"))
        assert await h.watch("ETH-USD") == SubscribeOutcome.ACCEPTED
        assert h.sim.subscribers("ETH-USD") == 1
        await trio.sleep(70)
        assert h.sim.subscribers("BTC-USD") == 1 and h.sim.subscribers("ETH-USD") == 1


async def test_watch_during_linger_keeps_the_subscription(autojump_clock):
    async with running_feed(linger_s=10.0) as h:
        assert await h.watch("ETH-USD") == SubscribeOutcome.ACCEPTED
        await h.mailbox.send(Unwatch("ETH-USD"))
        await trio.sleep(5)
        assert await h.watch("ETH-USD") == SubscribeOutcome.ACCEPTED
        await trio.sleep(30)
        assert h.sim.subscribers("ETH-USD") == 1
        assert [m["type"] for m in h.sim.received].count("unsubscribe") == 0


async def test_watch_racing_an_unsubscribe_resubscribes(autojump_clock):
    async with running_feed(linger_s=1.0) as h:
        assert await h.watch("ETH-USD") == SubscribeOutcome.ACCEPTED
        h.sim.delay_acks(2)  # the unsubscribe is in flight for 2 s
        await h.mailbox.send(Unwatch("ETH-USD"))
        await eventually(lambda: h.sim.stats()["unsubscribes_received"] == 1)
        outcome = await ask(h.mailbox, lambda reply: Watch("ETH-USD", reply), 10)
        assert outcome == SubscribeOutcome.ACCEPTED
        assert h.sim.subscribers("ETH-USD") == 1


async def test_watch_while_disconnected_is_pending_then_subscribed(autojump_clock):
    async with running_feed() as h:
        h.sim.refuse_connections(20)
        h.sim.drop_all()
        await eventually(lambda: len(h.status.backoffs) >= 1 and not h.status.connected)
        await eventually(lambda: h.status.backoffs and not h.status.connected)
        outcome = await h.watch("SOL-USD")
        assert outcome in (SubscribeOutcome.PENDING, SubscribeOutcome.ACCEPTED)
        await eventually(lambda: h.sim.subscribers("SOL-USD") == 1, timeout=60)


async def test_ack_timeout_recycles_the_connection(autojump_clock):
    async with running_feed(ack_timeout_s=2.0) as h:
        h.sim.delay_acks(5)
        outcome = await h.watch("ETH-USD")
        assert outcome == SubscribeOutcome.PENDING
        await eventually(lambda: h.status.reconnects >= 1)
        h.sim.delay_acks(0)
        await eventually(lambda: h.sim.subscribers("ETH-USD") == 1, timeout=60)


TICKER = (
    '{"type":"ticker","sequence":1,"product_id":"ETH-USD","price":"1285.22",'
    '"time":"2022-10-19T23:28:22.061769Z","trade_id":370843401,"last_size":"11.4396987"}'
)


def test_coinbase_parse_reads_a_ticker_exactly():
    msg = coinbase.parse(TICKER)
    assert (msg.type, msg.product_id, msg.price, msg.trade_id) == (
        "ticker",
        "ETH-USD",
        Decimal("1285.22"),
        370843401,
    )
    assert msg.time.microsecond == 61769 and msg.time.utcoffset().total_seconds() == 0


@pytest.mark.parametrize(
    "bad",
    [
        TICKER.replace('"1285.22"', '"NaN"'),
        TICKER.replace('"1285.22"', '"0"'),
        TICKER.replace('"1285.22"', '"-1"'),
        TICKER.replace('"2022-10-19T23:28:22.061769Z"', '"2022-10-19T23:28:22"'),
        TICKER.replace('"trade_id":370843401,', ""),
        TICKER.replace('"product_id":"ETH-USD",', ""),
        '{"type":"heartbeat","product_id":"BTC-USD"}',
        '{"type":"heartbeat","last_trade_id":5}',
        '{"product_id":"BTC-USD"}',
        "[1, 2]",
        "not json",
    ],
)
def test_coinbase_parse_refuses_what_the_feed_cannot_use(bad):
    with pytest.raises(coinbase.MalformedMessage):
        coinbase.parse(bad)


def test_coinbase_subscription_request_names_one_product_on_both_channels():
    import json

    message = json.loads(coinbase.subscription_request("unsubscribe", "SOL-USD"))
    assert message == {
        "type": "unsubscribe",
        "channels": [
            {"name": "ticker", "product_ids": ["SOL-USD"]},
            {"name": "heartbeat", "product_ids": ["SOL-USD"]},
        ],
    }


async def test_large_and_ignored_messages_do_not_disturb_the_frame_parser(autojump_clock):
    async with running_feed() as h:
        await eventually(lambda: h.status.products["BTC-USD"].ticks == 1)
        h.slots.get("BTC-USD").take_nowait()
        # 64-bit and 16-bit payload lengths, then a ticker right behind them.
        h.sim.send_raw('{"type": "l2update", "pad": "' + "x" * 70_000 + '"}')
        h.sim.send_raw('{"type": "l2update", "pad": "' + "y" * 1_000 + '"}')
        h.sim.publish("BTC-USD", "65003.33")
        window = await h.slots.get("BTC-USD").take()
        assert window.last == Decimal("65003.33")
        assert h.status.malformed == 0 and h.status.unknown == 0


async def test_blast_through_the_socket_loses_nothing():
    # Real clock: under autojump, virtual time can leap while bytes are still in flight on
    # the loopback, which looks like a silent product and recycles the connection.
    async with running_feed() as h:
        await eventually(lambda: h.status.products["BTC-USD"].ticks == 1)
        h.slots.get("BTC-USD").take_nowait()
        prices = [Decimal("65000.00") + Decimal(i % 300 - 150) / 100 for i in range(20_000)]
        await h.sim.blast("BTC-USD", prices)
        await eventually(lambda: h.status.products["BTC-USD"].ticks == 20_001, timeout=60)
        window = h.slots.get("BTC-USD").take_nowait()
        assert window is not None and window.count == 20_000
        assert (window.low, window.high, window.last) == (min(prices), max(prices), prices[-1])


# --------------------------------------------------------------------- the status channel
STATUS_OK = (
    '{"type": "status", "currencies": [], "products": ['
    '{"id": "BTC-USD", "status": "online", "trading_disabled": false, "cancel_only": false},'
    '{"id": "ETH-USD", "status": "offline", "trading_disabled": true, "status_message": "x"},'
    '{"id": "SOL-USD", "status": "online", "cancel_only": true, "post_only": false},'
    '{"id": "ADA-USD", "status": "online", "trading_disabled": false, "post_only": true}]}'
)
MALFORMED_STATUS = (
    '{"type": "status"}',
    '{"type": "status", "products": "BTC-USD"}',
    '{"type": "status", "products": [{"status": "online"}]}',
    '{"type": "status", "products": [{"id": "BTC-USD"}]}',
    '{"type": "status", "products": [{"id": "BTC-USD", "status": "online", '
    '"trading_disabled": "no"}]}',
    '{"type": "status", "products": [{"id": "", "status": "online"}]}',
    '{"type": "status", "products": [{"id": "' + "X" * 65 + '", "status": "online"}]}',
    '{"type": "status", "products": [{"id": 7, "status": "online"}]}',
)


def test_coinbase_status_message_tells_which_products_do_not_trade():
    msg = coinbase.parse(STATUS_OK)
    reasons = {p.id: coinbase.halt_reason(p) for p in msg.products or []}
    assert reasons == {
        "BTC-USD": None,
        "ETH-USD": "status offline, trading disabled",
        "SOL-USD": "cancel only",
        "ADA-USD": None,  # post only restricts orders; a trade printed under it is real
    }


@pytest.mark.parametrize("bad", MALFORMED_STATUS)
def test_coinbase_parse_refuses_a_status_message_the_feed_cannot_use(bad):
    with pytest.raises(coinbase.MalformedMessage):
        coinbase.parse(bad)


def test_coinbase_status_subscription_names_the_channel_alone():
    import json

    assert json.loads(coinbase.status_subscription()) == {
        "type": "subscribe",
        "channels": ["status"],
    }


async def release_start_hold(h: Harness, recoveries: Mailbox) -> None:
    """The first ticker of the process holds the slot for a start-up recovery: release it
    (nothing recovered) and take the stale ticker behind it."""
    await eventually(lambda: h.status.products["BTC-USD"].ticks == 1)
    start = recoveries.receive_nowait()
    h.slots.get("BTC-USD").release(start.hold)
    assert h.slots.get("BTC-USD").take_nowait() is not None


async def test_a_halted_product_puts_nothing_and_recovers_its_trades_once_it_trades(
    autojump_clock,
):
    recoveries = Mailbox("recovery")
    async with running_feed(recoveries=recoveries, sim_options={"heartbeat_interval": 0.5}) as h:
        await release_start_hold(h, recoveries)
        slot = h.slots.get("BTC-USD")
        await eventually(lambda: h.status.status_channel == "subscribed")
        before_halt = h.sim.publish("BTC-USD", "65000")
        assert (await slot.take()).last_trade_id == before_halt

        h.sim.set_trading("BTC-USD", online=False)
        await eventually(lambda: "BTC-USD" in h.status.halted)
        product = h.status.snapshot()["products"]["BTC-USD"]
        assert product["trading"] == "halted" and product["state"] == "live"
        assert product["halt_reason"] == "status offline, trading disabled"
        # A crossing price while halted reaches no window.
        h.sim.publish("BTC-USD", "1")
        h.sim.publish("BTC-USD", "2")
        await eventually(lambda: h.status.products["BTC-USD"].halted_ticks == 2)
        assert slot.take_nowait() is None and h.status.products["BTC-USD"].ticks == 2
        # Heartbeats run ahead of the last trade put: no recovery while halted.
        await trio.sleep(5)
        assert recoveries.pending() == 0 and h.status.missed_gaps == 0
        assert h.state("BTC-USD") == "live" and h.status.reconnects == 0

        h.sim.set_trading("BTC-USD", online=True)
        await eventually(lambda: "BTC-USD" not in h.status.halted)
        assert h.status.snapshot()["products"]["BTC-USD"]["trading"] == "trading"
        after_resume = h.sim.publish("BTC-USD", "65002")
        await eventually(lambda: recoveries.pending() == 1)
        gap = recoveries.receive_nowait().hold
        # The two halted trades are between the last put and the first after the halt.
        assert (gap.after, gap.before) == (before_halt, after_resume)
        assert slot.take_nowait() is None  # held until the recovery delivered them
        slot.release(gap)
        window = slot.take_nowait()
        assert window is not None and window.count == 1 and window.last == Decimal("65002")
        assert h.status.products["BTC-USD"].missed_trades == 2


async def test_a_halt_outlives_a_reconnect_and_a_quiet_halt_holds_nothing(autojump_clock):
    recoveries = Mailbox("recovery")
    async with running_feed(recoveries=recoveries) as h:
        await release_start_hold(h, recoveries)
        slot = h.slots.get("BTC-USD")
        last = h.sim.publish("BTC-USD", "65000")
        assert (await slot.take()).last_trade_id == last
        h.sim.set_trading("BTC-USD", online=False)
        await eventually(lambda: "BTC-USD" in h.status.halted)
        h.sim.drop_all()
        await eventually(lambda: h.sim.stats()["connections_accepted"] == 2)
        # The new subscription's stale ticker arrives while halted: not put.
        await eventually(lambda: h.status.products["BTC-USD"].halted_ticks == 1)
        assert slot.take_nowait() is None
        h.sim.set_trading("BTC-USD", online=True)
        await eventually(lambda: "BTC-USD" not in h.status.halted)
        # Nothing traded while halted: the next trade follows the last one put, no hold.
        nxt = h.sim.publish("BTC-USD", "65001")
        window = await slot.take()
        assert (window.first_trade_id, window.last) == (nxt, Decimal("65001"))
        assert recoveries.pending() == 0 and h.status.missed_gaps == 0


async def test_malformed_status_messages_are_counted_and_change_nothing(autojump_clock):
    async with running_feed() as h:
        await eventually(lambda: h.status.status_channel == "subscribed")
        h.sim.set_trading("BTC-USD", online=False)
        await eventually(lambda: "BTC-USD" in h.status.halted)
        for bad in MALFORMED_STATUS:
            h.sim.send_raw(bad)
        # One of them would resume BTC-USD if it were read: it is not.
        h.sim.send_raw('{"type": "status", "products": [{"id": "BTC-USD", "status": 1}]}')
        await eventually(lambda: h.status.malformed == len(MALFORMED_STATUS) + 1)
        assert "BTC-USD" in h.status.halted and h.status.reconnects == 0
        h.sim.set_trading("BTC-USD", online=True)
        await eventually(lambda: "BTC-USD" not in h.status.halted)
        assert h.state("BTC-USD") == "live"


# ------------------------------------------------------------ sharded engines (issue 18)
async def test_pin_replaces_the_always_subscribed_products(autojump_clock):
    async with running_feed(linger_s=10.0) as h:
        await h.mailbox.send(Pin(frozenset({"ETH-USD", "SOL-USD"})))
        await eventually(
            lambda: h.sim.subscribers("ETH-USD") == 1 and h.sim.subscribers("SOL-USD") == 1
        )
        await eventually(lambda: h.sim.subscribers("BTC-USD") == 0)  # no longer pinned
        # Pinned products stay however long nothing watches them; an Unwatch changes nothing.
        await h.mailbox.send(Unwatch("ETH-USD"))
        await trio.sleep(30)
        assert h.sim.subscribers("ETH-USD") == 1 and h.sim.subscribers("SOL-USD") == 1


async def test_drop_unsubscribes_at_once_and_a_later_watch_recovers_from_the_watermark(
    autojump_clock,
):
    recoveries = Mailbox("recovery")
    async with running_feed(recoveries=recoveries, linger_s=60.0) as h:
        await release_start_hold(h, recoveries)
        assert await h.watch("ETH-USD") == SubscribeOutcome.ACCEPTED
        await eventually(lambda: recoveries.pending() == 1)
        eth = h.slots.get("ETH-USD")
        eth.release(recoveries.receive_nowait().hold)
        last_seen = h.sim.publish("ETH-USD", "3001")
        await eventually(lambda: h.status.products["ETH-USD"].ticks == 2)
        # Another engine owns ETH-USD now: unsubscribed without the 60 s linger, and
        # nothing it trades meanwhile reaches the slot.
        await h.mailbox.send(Drop(frozenset({"ETH-USD", "BTC-USD"})))
        await eventually(
            lambda: h.sim.subscribers("ETH-USD") == 0 and h.sim.subscribers("BTC-USD") == 0
        )
        while eth.take_nowait() is not None:
            pass
        h.sim.publish("ETH-USD", "2990")
        h.sim.publish("ETH-USD", "2980")
        # Owned again: the first ticker is a gap recovered from the durable watermark (the
        # hold names no last trade), not from the trade this feed saw before the drop.
        assert await h.watch("ETH-USD") == SubscribeOutcome.ACCEPTED
        await eventually(lambda: recoveries.pending() == 1)
        gap = recoveries.receive_nowait().hold
        assert gap.symbol == "ETH-USD" and gap.after is None and gap.before == last_seen + 2
        assert recoveries.pending() == 0


async def test_watching_is_true_only_where_a_watch_would_change_nothing(autojump_clock):
    # The create handler skips its Watch when FeedStatus.watching says so (issue 16): it must
    # be False wherever a Watch still does something (subscribe, cancel a linger, resubscribe).
    async with running_feed(linger_s=10.0) as h:
        assert h.status.watching("BTC-USD")  # pinned and live
        assert not h.status.watching("ETH-USD")  # not subscribed: the Watch subscribes
        assert await h.watch("ETH-USD") == SubscribeOutcome.ACCEPTED
        assert h.status.watching("ETH-USD")
        await h.mailbox.send(Unwatch("ETH-USD"))
        await eventually(lambda: not h.status.watching("ETH-USD"))  # lingering: must cancel
        assert await h.watch("ETH-USD") == SubscribeOutcome.ACCEPTED
        assert h.status.watching("ETH-USD")
        assert (await h.watch("NOPE-USD")).status == "rejected"
        assert not h.status.watching("NOPE-USD")
        h.sim.refuse_connections(5)
        h.sim.drop_all()
        await eventually(lambda: not h.status.connected)
        assert not h.status.watching("BTC-USD")  # no connection: the Watch waits for one
        await eventually(lambda: h.status.watching("BTC-USD"), timeout=60)
        await h.mailbox.send(Drop(frozenset({"BTC-USD"})))
        await eventually(lambda: not h.status.watching("BTC-USD"))  # dropped


async def test_no_feed_running_watches_nothing() -> None:
    assert not FeedStatus().watching("BTC-USD")
