"""Benchmark 7, WebSocket fan-out: 5,000 concurrent /ws sessions of different users, one
``position.closed`` each, all triggered by one tick; the time to deliver them all and the p99
per event (tick sent -> that event received). Run twice: with a heavy user (``HEAVY``
positions closing on the same tick) whose client reads normally, and with that client stalled
(it never reads, so its socket buffers fill): the others' p99 must not change.

The load generator (this process: every session, the simulator) shares the 2 cores with the
server; its own CPU time and memory are reported beside the figures. RLIMIT_NOFILE is raised
here first, and the server inherits it.
"""

from __future__ import annotations

import resource
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import trio

from bench.common import (
    Context,
    Figure,
    connect_listeners,
    distribution_ms,
    fresh_database,
    insert_positions,
    new_position,
    plot_path,
    postgres_settings,
    pyplot,
    raise_open_files,
    serve_subprocess,
    wait_closed,
    write_result,
)
from tickguard.sim import open_simulator

NAME = "fanout"


async def one_run(url: str, sessions: int, heavy: int, stalled: bool) -> dict[str, Any]:
    tag = "stalled" if stalled else "reading"
    users = [f"fan-{tag}-{i}" for i in range(sessions)]
    heavy_user = f"heavy-{tag}"
    await insert_positions(
        url,
        [new_position(u, "long", "100", stop="99.9", take=None) for u in users]
        + [new_position(heavy_user, "long", "100", stop="99.9", take=None)] * heavy,
    )
    async with open_simulator({"BTC-USD": Decimal("100")}) as sim:
        async with serve_subprocess(url, sim.url) as server:
            async with trio.open_nursery() as nursery:
                cpu0, wall0 = time.process_time(), time.perf_counter()
                listeners = await connect_listeners(
                    nursery,
                    server.ws_base,
                    [*users, heavy_user],
                    stalled=frozenset([heavy_user]) if stalled else frozenset(),
                )
                connect_wall = time.perf_counter() - wall0
                connect_cpu = time.process_time() - cpu0
                normal = listeners[:-1]
                server_cpu0, cpu0 = server.cpu_seconds(), time.process_time()
                sent = time.perf_counter()
                sim.publish("BTC-USD", "99.8")
                await wait_closed(normal, sessions, timeout=120)
                gen_cpu = time.process_time() - cpu0
                server_cpu = server.cpu_seconds() - server_cpu0
                latencies = [t - sent for x in normal for t in x.closed_at.values()]
                heavy_received = len(listeners[-1].closed_at)
                if not stalled:
                    await wait_closed(listeners, sessions + heavy, timeout=120)
                    heavy_received = len(listeners[-1].closed_at)
                nursery.cancel_scope.cancel()
    return {
        "stalled": stalled,
        "delivered": len(latencies),
        "all_delivered_ms": max(latencies) * 1000,
        "per_event": distribution_ms(latencies),
        "heavy_events_received": heavy_received,
        "connect_s": connect_wall,
        "generator_connect_cpu_s": connect_cpu,
        "generator_delivery_cpu_s": gen_cpu,
        "server_delivery_cpu_s": server_cpu,
        "generator_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "latencies_ms": sorted(round(x * 1000, 3) for x in latencies),
    }


async def measure(url: str, sessions: int, heavy: int) -> list[dict[str, Any]]:
    return [await one_run(url, sessions, heavy, stalled) for stalled in (False, True)]


def run(ctx: Context) -> Path:
    started = time.perf_counter()
    sessions = 500 if ctx.quick else 5_000
    heavy = 2_000 if ctx.quick else 10_000
    limits = raise_open_files(4 * sessions + 1024)
    pg = postgres_settings(ctx)
    with fresh_database(ctx) as url:
        reading, stalled = trio.run(measure, url, sessions, heavy)
    figures = []
    for row in (reading, stalled):
        label = "heavy client stalled" if row["stalled"] else "heavy client reading"
        figures += [
            Figure(f"{label}: all {sessions:,} delivered", row["all_delivered_ms"], "ms"),
            Figure(f"{label}: p50 per event", row["per_event"]["p50_ms"], "ms"),
            Figure(f"{label}: p99 per event", row["per_event"]["p99_ms"], "ms"),
        ]
    ratio = stalled["per_event"]["p99_ms"] / reading["per_event"]["p99_ms"]
    figures += [
        Figure(
            "p99 stalled / p99 reading (1 = unchanged)", ratio, "x", "~1 (<= 1.2)", ratio <= 1.2
        ),
        Figure(
            "heavy user's events received (client reading)",
            reading["heavy_events_received"],
            "events",
        ),
        Figure(f"load generator: connect {sessions:,} sessions, wall", reading["connect_s"], "s"),
        Figure("load generator: connect CPU", reading["generator_connect_cpu_s"], "s"),
        Figure("load generator: CPU while receiving", reading["generator_delivery_cpu_s"], "s"),
        Figure("server: CPU while delivering", reading["server_delivery_cpu_s"], "s"),
        Figure("load generator: max RSS", reading["generator_max_rss_bytes"] / 2**20, "MiB"),
    ]
    _plot(ctx, reading, stalled)
    return write_result(
        ctx,
        NAME,
        params={"sessions": sessions, "heavy_user_positions": heavy, "rlimit_nofile": list(limits)},
        figures=figures,
        data={"reading": reading, "stalled": stalled},
        pg=pg,
        started=started,
    )


def _plot(ctx: Context, reading: dict[str, Any], stalled: dict[str, Any]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for row, label in ((reading, "heavy client reading"), (stalled, "heavy client stalled")):
        ms = row["latencies_ms"]
        ax.plot(ms, [100 * (i + 1) / len(ms) for i in range(len(ms))], label=label)
    ax.set_xlabel("tick sent -> event received (ms)")
    ax.set_ylabel(f"% of {len(reading['latencies_ms']):,} sessions")
    ax.set_title("WebSocket fan-out, one event per session")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_path(ctx, NAME), dpi=110)
    plt.close(fig)
