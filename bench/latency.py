"""Benchmark 3, tick-to-close latency: from the simulator sending a triggering tick to a
WebSocket client receiving ``position.closed``, with 10,000 open positions on the symbol.

The service runs as its own process (``tickguard serve``); the simulator, the REST client and
the WebSocket client run here. Each trigger: create one long position (entry 100, stop 99.9)
over REST, wait for its ``position.created`` on the WebSocket (by then its engine has it), then
publish a trade at 99.8 and time until its ``position.closed`` arrives. The path timed is the
whole product: simulator socket -> feed -> window -> engine -> persistence (one committed
transaction, synchronous_commit on) -> fanout -> /ws -> client socket.

The very first trigger after the service started (the first of the warm-up ones) is reported on
its own: "first close after start-up", which issue 16 wants no slower than the run's p99 (the
service warms its statements and connections at start).
"""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import trio
import trio_websocket

from bench.common import (
    Context,
    Figure,
    at_most,
    background,
    commit_floor,
    distribution_ms,
    fresh_database,
    insert_positions,
    plot_path,
    postgres_settings,
    pyplot,
    serve_subprocess,
    write_result,
)
from tickguard.sim import open_simulator
from tickguard.wire import loads

NAME = "latency"
OPEN_POSITIONS = 10_000
WARMUP = 20
USER = "latency-user"


async def _next_of(ws: trio_websocket.WebSocketConnection, type_: str, pid: str) -> float:
    """Read until ``type_`` for position ``pid`` arrives; its arrival time (perf_counter)."""
    while True:
        message = await ws.get_message()
        now = time.perf_counter()
        event = loads(message)
        if event.get("type") == type_ and event["position"]["id"] == pid:
            return now


async def measure(url: str, triggers: int) -> dict[str, Any]:
    close_s: list[float] = []
    create_s: list[float] = []
    first_close_s = float("nan")
    async with open_simulator({"BTC-USD": Decimal("100")}) as sim:
        async with serve_subprocess(url, sim.url) as server:
            loaded = [line for _, line in server.lines if "engine BTC-USD started" in line]
            async with (
                httpx.AsyncClient(base_url=server.base_url, timeout=30) as http,
                trio_websocket.open_websocket_url(f"{server.ws_base}/ws?userId={USER}") as ws,
            ):
                while loads(await ws.get_message()).get("type") != "connection.ready":
                    pass
                body = {
                    "userId": USER,
                    "symbol": "BTC-USD",
                    "side": "long",
                    "entryPrice": "100",
                    "stopLoss": "99.9",
                }
                for i in range(WARMUP + triggers):
                    with trio.fail_after(10):
                        asked = time.perf_counter()
                        response = await http.post("/api/positions", json=body)
                        assert response.status_code == 201, response.text
                        pid = loads(response.content)["data"]["id"]
                        created = await _next_of(ws, "position.created", pid)
                        sent = time.perf_counter()
                        sim.publish("BTC-USD", "99.8")
                        received = await _next_of(ws, "position.closed", pid)
                    if i == 0:
                        first_close_s = received - sent
                    if i >= WARMUP:
                        close_s.append(received - sent)
                        create_s.append(created - asked)
            server_log = loaded[0] if loaded else ""
    return {
        "close_s": close_s,
        "create_s": create_s,
        "first_close_s": first_close_s,
        "engine_log": server_log,
    }


def run(ctx: Context) -> Path:
    started = time.perf_counter()
    triggers = 100 if ctx.quick else 1000
    pg = postgres_settings(ctx)
    with fresh_database(ctx) as url:
        trio.run(insert_positions, url, background(OPEN_POSITIONS))
        floor = commit_floor(url)
        raw = trio.run(measure, url, triggers)
    close = distribution_ms(raw["close_s"])
    create = distribution_ms(raw["create_s"])
    first_ms = raw["first_close_s"] * 1000
    figures = [
        Figure(
            "tick -> position.closed p50",
            close["p50_ms"],
            "ms",
            "<= 3 ms",
            at_most(close["p50_ms"], 3.0),
        ),
        Figure("tick -> position.closed p90", close["p90_ms"], "ms"),
        Figure(
            "tick -> position.closed p99",
            close["p99_ms"],
            "ms",
            "<= 10 ms",
            at_most(close["p99_ms"], 10.0),
        ),
        Figure("tick -> position.closed max", close["max_ms"], "ms"),
        Figure(
            "first close after start-up (first warm-up trigger)",
            first_ms,
            "ms",
            f"<= p99 ({close['p99_ms']:.2f} ms)",
            at_most(first_ms, close["p99_ms"]),
        ),
        Figure("  (old backend median, 1 open position)", 3.5, "ms"),
        Figure("one-row durable commit alone, p50", floor["p50_ms"], "ms"),
        Figure("POST -> position.created on /ws p50", create["p50_ms"], "ms"),
        Figure("POST -> position.created on /ws p99", create["p99_ms"], "ms"),
    ]
    _plot(ctx, raw["close_s"])
    return write_result(
        ctx,
        NAME,
        params={"open_positions": OPEN_POSITIONS, "triggers": triggers, "warmup": WARMUP},
        figures=figures,
        data={
            "close": close,
            "create": create,
            "first_close_ms": first_ms,
            "engine_log": raw["engine_log"],
            "close_samples_ms": [round(s * 1000, 4) for s in raw["close_s"]],
        },
        pg=pg,
        started=started,
    )


def _plot(ctx: Context, samples_s: list[float]) -> None:
    plt = pyplot()
    ms = sorted(s * 1000 for s in samples_s)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ms, [100 * (i + 1) / len(ms) for i in range(len(ms))])
    ax.axvline(3, color="green", linestyle="--", linewidth=1, label="p50 target 3 ms")
    ax.axvline(10, color="red", linestyle="--", linewidth=1, label="p99 target 10 ms")
    ax.set_xscale("log")
    ax.set_xlabel("tick sent -> position.closed received (ms)")
    ax.set_ylabel("% of triggers")
    ax.set_title(f"Tick-to-close, {OPEN_POSITIONS:,} open positions ({len(ms)} triggers)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_path(ctx, NAME), dpi=110)
    plt.close(fig)
