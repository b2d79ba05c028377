"""Benchmark 6, start-up: from spawning ``tickguard serve`` until its engine has loaded every
open position (the log line "engine BTC-USD started with N open positions"), with 100,000 open
positions in the machine's PostgreSQL; and memory per open position.

Memory is taken two ways: the server's resident set once loaded, against the same server
holding one position (RSS counts everything the load left behind, freed or not); and, in this
process with tracemalloc, what the trigger index keeps per position once the rows are dropped
(``bench/engine_scaling.memory``).
"""

from __future__ import annotations

import random
import statistics
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import trio

from bench import engine_scaling
from bench.common import (
    Context,
    Figure,
    at_most,
    background,
    fresh_database,
    insert_positions,
    postgres_settings,
    serve_subprocess,
    write_result,
)
from tickguard.sim import open_simulator

NAME = "startup"
TARGET_S = 2.0


async def start_once(url: str) -> dict[str, Any]:
    async with open_simulator({"BTC-USD": Decimal("100")}) as sim:
        async with serve_subprocess(url, sim.url) as server:
            loaded_at = await server.wait_for_line("engine BTC-USD started")
            listening_at = await server.wait_for_line("listening on")
            line = next(text for _, text in server.lines if "engine BTC-USD started" in text)
            await trio.sleep(0.5)  # let the loader's garbage go before reading RSS
            return {
                "engine_loaded_s": loaded_at - server.spawned_at,
                "listening_s": listening_at - server.spawned_at,
                "rss_bytes": server.rss_bytes(),
                "log_line": line,
            }


async def measure(url: str, repeats: int) -> list[dict[str, Any]]:
    return [await start_once(url) for _ in range(repeats)]


def run(ctx: Context) -> Path:
    started = time.perf_counter()
    n = 20_000 if ctx.quick else 100_000
    repeats = 1 if ctx.quick else 3
    pg = postgres_settings(ctx)
    with fresh_database(ctx) as url:
        trio.run(insert_positions, url, background(1, prefix="base"))
        baseline = trio.run(measure, url, repeats)
        trio.run(insert_positions, url, background(n - 1))
        loaded = trio.run(measure, url, repeats)
    assert f"with {n} open positions" in loaded[0]["log_line"], loaded[0]["log_line"]
    seconds = statistics.median(r["engine_loaded_s"] for r in loaded)
    base_s = statistics.median(r["engine_loaded_s"] for r in baseline)
    rss_delta = statistics.median(r["rss_bytes"] for r in loaded) - statistics.median(
        r["rss_bytes"] for r in baseline
    )
    held = engine_scaling.memory(n, random.Random(6))
    figures = [
        Figure(
            f"process start -> engine loaded {n:,} open",
            seconds,
            "s",
            "<= 2 s",
            at_most(seconds, TARGET_S) if n >= 100_000 else None,
        ),
        Figure("  (old backend, 100k: 2.2 s)", None, ""),
        Figure("process start -> engine loaded, 1 open", base_s, "s"),
        Figure("  difference: loading the positions", seconds - base_s, "s"),
        Figure(
            "RSS per open position (server, vs 1 open)",
            rss_delta / n,
            "B",
            "<= 1 KiB",
            at_most(rss_delta / n, 1024),
        ),
        Figure(
            "index held per open position (tracemalloc)",
            held["held_bytes_per_position"],
            "B",
            "<= 1 KiB",
            at_most(held["held_bytes_per_position"], 1024),
        ),
    ]
    return write_result(
        ctx,
        NAME,
        params={"open_positions": n, "repeats": repeats},
        figures=figures,
        data={"loaded": loaded, "baseline": baseline, "tracemalloc": held},
        pg=pg,
        started=started,
    )
