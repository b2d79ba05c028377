"""Feed ingest benchmark: parse+conflation speed on one core, and ingest through a socket.

1. parse: the feed's own message handler (msgspec decode, checks, WindowSlot.put) over
   pre-encoded Coinbase ticker messages, in-process.
2. socket: a simulator in a separate process blasts tickers over a real WebSocket (read by
   trio-websocket, the feed's client) at one feed actor, one connection; the clock runs from
   the first blasted ticker in the window slot to the last (the simulator encodes the whole
   blast before it sends any, which is its time, not the client's).

    python -m bench.feed_ingest [--count N] [--json PATH]
    python -m bench --only feed_ingest [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import trio

from bench.common import Context, Figure, at_least, write_result
from tickguard.actors.feed import FeedConfig, _Feed, _Subscriptions
from tickguard.actors.feed import run as run_feed
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.window import WindowSlots
from tickguard.sim.paths import script
from tickguard.sim.server import Product

NAME = "feed_ingest"
# Per connection (issue 12: trio-websocket measured ~13k/s here; Coinbase's ticker for the
# products a user trades is far below). Below it, the feed would need more connections.
TARGET_SOCKET = 10_000
TARGET_PARSE = 200_000


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
    """Tickers/s through one connection, first blasted ticker in the slot to the last."""
    return (await socket_run(count))["tickers_per_s"]


async def socket_run(count: int) -> dict[str, float]:
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
        # The simulator stops everything, heartbeats too, while it encodes the blast: the
        # feed must not take that for a dead connection.
        config = FeedConfig(f"ws://127.0.0.1:{port}", ("BTC-USD",), heartbeat_timeout_s=300.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_feed, config, slots, Mailbox("feed"), status)
            product = status.product("BTC-USD")
            with trio.fail_after(30):
                # Polling a plain counter that nobody signals (the feed never waits on us).
                while product.ticks < 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            async with httpx.AsyncClient() as http:
                requested = time.perf_counter()
                await http.post(
                    f"http://127.0.0.1:{port}/control",
                    json={"op": "blast", "product": "BTC-USD", "count": count},
                )
                with trio.fail_after(300):
                    while product.ticks < 2:  # noqa: ASYNC110
                        await trio.sleep(0.0005)
                    first, first_cpu = time.perf_counter(), time.process_time()
                    while product.ticks < count + 1:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                last, last_cpu = time.perf_counter(), time.process_time()
            nursery.cancel_scope.cancel()
        assert status.reconnects == 0 and status.malformed == 0, status.snapshot()
        return {
            "tickers_per_s": (count - 1) / (last - first),
            "from_request_per_s": count / (last - requested),
            # Per second of this process's CPU (the simulator is another process): what one
            # connection does on a core of its own, whatever else the machine is running.
            "tickers_per_cpu_s": (count - 1) / (last_cpu - first_cpu),
            "received": product.ticks - 1,
        }
    finally:
        sim.terminate()
        sim.wait()


def run(ctx: Context) -> Path:
    """``python -m bench --only feed_ingest``: both figures, JSON in ``ctx.json_dir``."""
    started = time.perf_counter()
    count = 50_000 if ctx.quick else 200_000
    parse_rate = trio.run(bench_parse, count)
    socket = trio.run(socket_run, count)
    figures = [
        Figure(
            "parse + conflation (in-process)",
            parse_rate,
            "msg/s",
            ">= 200,000/s",
            at_least(parse_rate, TARGET_PARSE),
        ),
        Figure(
            "through one trio-websocket connection",
            socket["tickers_per_s"],
            "msg/s",
            ">= 10,000/s",
            at_least(socket["tickers_per_s"], TARGET_SOCKET),
        ),
        Figure(
            "  same, per CPU-second of the feed's process",
            socket["tickers_per_cpu_s"],
            "msg/cpu-s",
        ),
    ]
    return write_result(
        ctx,
        NAME,
        params={"count": count, "connections": 1},
        figures=figures,
        data={"parse_per_s": parse_rate, "socket": socket},
        pg=None,
        started=started,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    parse_rate = trio.run(bench_parse, args.count)
    print(f"parse+conflation: {parse_rate:,.0f} tickers/s (one core, {args.count} messages)")
    socket = trio.run(socket_run, args.count)
    socket_rate = socket["tickers_per_s"]
    print(
        f"ingest via socket: {socket_rate:,.0f} tickers/s, "
        f"{socket['tickers_per_cpu_s']:,.0f} per CPU-second (one connection, simulator in "
        f"another process, 1-min load {os.getloadavg()[0]:.2f})"
    )
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump(
                {
                    "count": args.count,
                    "parse_tickers_per_s": round(parse_rate),
                    "socket_tickers_per_s": round(socket_rate),
                    "socket_tickers_per_cpu_s": round(socket["tickers_per_cpu_s"]),
                    "load_1min": os.getloadavg()[0],
                },
                out,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
