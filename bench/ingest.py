"""Benchmark 2, feed ingest: Coinbase ticker messages parsed and conflated per second on one
core, received through a real socket, and received with the symbol's engine attached.

Parse-only and socket-only are ``bench/feed_ingest.py``'s measurements (reused as they are).
This module adds the third: the feed actor and an engine holding n open positions in the same
Trio run (one core), the simulator blasting from another process; the clock stops when the
engine has judged every tick the feed merged.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx
import trio

from bench import engine_scaling, feed_ingest
from bench.common import Context, Figure, at_least, write_result
from tickguard.actors import engine as engine_actor
from tickguard.actors.feed import FeedConfig
from tickguard.actors.feed import run as run_feed
from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import Position
from tickguard.actors.window import WindowSlots

NAME = "ingest"
TARGET_SOCKET = feed_ingest.TARGET_SOCKET  # per connection, through trio-websocket
TARGET_PARSE = feed_ingest.TARGET_PARSE


async def with_engine(count: int, n_open: int) -> dict[str, float]:
    """Tickers/s through a real socket into the feed, each window judged by an engine holding
    ``n_open`` positions (prices 99..101 trigger none of them)."""
    positions = engine_scaling.make_positions(n_open, random.Random(9))
    # Started before anything else runs in this trio.run, so blocking here costs nothing.
    sim = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "tickguard.sim", "--port", "0", "--rate", "0"]
        + ["--products", "BTC-USD=100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert sim.stdout is not None
        banner = sim.stdout.readline().decode()
        port = int(banner.split("ws://", 1)[1].split(" ", 1)[0].rsplit(":", 1)[1])
        slots, status = WindowSlots(), FeedStatus()
        stats = engine_actor.EngineStats()
        closes: Mailbox[object] = Mailbox("persistence")

        async def load(symbol: str) -> AsyncIterator[list[Position]]:
            yield positions

        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    engine_actor.run,
                    "BTC-USD",
                    slots.get("BTC-USD"),
                    Mailbox("engine:BTC-USD"),
                    closes,  # type: ignore[arg-type]
                    load,
                    stats=stats,
                )
            )
            # The simulator is silent while it encodes the blast: not a dead connection.
            config = FeedConfig(f"ws://127.0.0.1:{port}", ("BTC-USD",), heartbeat_timeout_s=300.0)
            await nursery.start(run_feed, config, slots, Mailbox("feed"), status)
            product = status.product("BTC-USD")
            with trio.fail_after(30):
                # Plain counters that nobody signals (neither actor waits on us).
                while stats.ticks_judged < 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            before = stats.ticks_judged
            async with httpx.AsyncClient() as http:
                start = time.perf_counter()
                await http.post(
                    f"http://127.0.0.1:{port}/control",
                    json={"op": "blast", "product": "BTC-USD", "count": count, "start": "100"},
                )
                with trio.fail_after(300):
                    while stats.ticks_judged < before + count:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        assert closes.pending() == 0, "a quiet blast must trigger nothing"
        return {
            "tickers_per_s": count / elapsed,
            "windows_judged": stats.windows_judged,
            "ticks_per_window": stats.ticks_judged / max(1, stats.windows_judged),
            "received": product.ticks,
        }
    finally:
        sim.terminate()
        sim.wait()


def run(ctx: Context) -> Path:
    started = time.perf_counter()
    count = 50_000 if ctx.quick else 200_000
    n_open = 10_000 if ctx.quick else 100_000
    parse_rate = trio.run(feed_ingest.bench_parse, count)
    socket_rate = trio.run(feed_ingest.bench_socket, count)
    attached = trio.run(with_engine, count, n_open)
    figures = [
        Figure(
            "parse + conflation (in-process)",
            parse_rate,
            "msg/s",
            ">= 200,000/s",
            at_least(parse_rate, TARGET_PARSE),
        ),
        Figure(
            "through a real socket (feed only)",
            socket_rate,
            "msg/s",
            ">= 10,000/s",
            at_least(socket_rate, TARGET_SOCKET),
        ),
        Figure(
            f"through a socket, engine with {n_open:,} open attached",
            attached["tickers_per_s"],
            "msg/s",
            ">= 10,000/s",
            at_least(attached["tickers_per_s"], TARGET_SOCKET),
        ),
        Figure("  ticks conflated per judged window", attached["ticks_per_window"], "ticks"),
    ]
    return write_result(
        ctx,
        NAME,
        params={"count": count, "engine_open_positions": n_open},
        figures=figures,
        data={"parse_per_s": parse_rate, "socket_per_s": socket_rate, "with_engine": attached},
        pg=None,
        started=started,
    )
