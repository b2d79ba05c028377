"""Feed ingest benchmark: parse+conflation speed on one core, and ingest through a socket.

1. parse: the feed's own message handler (msgspec decode, checks, WindowSlot.put) over
   pre-encoded Coinbase ticker messages, in-process.
2. socket: a simulator in a separate process blasts tickers over a real WebSocket at the feed
   actor; counted when the last one is in the window slot.

    python bench/feed_ingest.py [--count N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from decimal import Decimal

import httpx
import trio

from tickguard.actors.feed import FeedConfig, _Feed, _Subscriptions, run
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.window import WindowSlots
from tickguard.sim.paths import script
from tickguard.sim.server import Product


def ticker_messages(count: int) -> list[bytes]:
    product = Product("BTC-USD", Decimal("65000.00"), script([]), 1_000_000)
    messages = []
    for i in range(count):
        product.trade(Decimal("65000.00") + Decimal(i % 500 - 250) / 100)
        messages.append(product.ticker().encode())
    return messages


async def bench_parse(count: int) -> float:
    messages = ticker_messages(count)
    slots, status = WindowSlots(), FeedStatus()
    feed = _Feed(FeedConfig("ws://unused"), slots, Mailbox("feed"), status)
    session = _Subscriptions(None)  # type: ignore[arg-type]  # the handler never touches the socket
    # Steady state: the subscription's first (stale) ticker, a window of its own, is past.
    session.first_ticker_seen.add("BTC-USD")
    on_message = feed.on_message
    now = trio.current_time()
    start = time.perf_counter()
    for data in messages:
        on_message(session, data, now)
    elapsed = time.perf_counter() - start
    window = slots.get("BTC-USD").take_nowait()
    assert window is not None and window.count == count and status.malformed == 0
    return count / elapsed


async def bench_socket(count: int) -> float:
    # Started before anything else runs in this trio.run, so blocking here costs nothing.
    sim = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "tickguard.sim", "--port", "0", "--rate", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        # "simulator on ws://127.0.0.1:PORT (control: ...)" once it listens.
        banner = sim.stdout.readline().decode()
        port = int(banner.split("ws://", 1)[1].split(" ", 1)[0].rsplit(":", 1)[1])
        slots, status = WindowSlots(), FeedStatus()
        config = FeedConfig(f"ws://127.0.0.1:{port}", ("BTC-USD",))
        async with trio.open_nursery() as nursery:
            await nursery.start(run, config, slots, Mailbox("feed"), status)
            product = status.product("BTC-USD")
            with trio.fail_after(30):
                # Polling a plain counter that nobody signals (the feed never waits on us).
                while product.ticks < 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            async with httpx.AsyncClient() as http:
                start = time.perf_counter()
                await http.post(
                    f"http://127.0.0.1:{port}/control",
                    json={"op": "blast", "product": "BTC-USD", "count": count},
                )
                with trio.fail_after(120):
                    while product.ticks < count + 1:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        return count / elapsed
    finally:
        sim.terminate()
        sim.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    parse_rate = trio.run(bench_parse, args.count)
    print(f"parse+conflation: {parse_rate:,.0f} tickers/s (one core, {args.count} messages)")
    socket_rate = trio.run(bench_socket, args.count)
    print(f"ingest via socket: {socket_rate:,.0f} tickers/s (simulator in another process)")
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump(
                {
                    "count": args.count,
                    "parse_tickers_per_s": round(parse_rate),
                    "socket_tickers_per_s": round(socket_rate),
                },
                out,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
