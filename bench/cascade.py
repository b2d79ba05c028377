"""Benchmark 4, stop cascade: one tick triggers K positions; the time until every one is
committed and its ``position.closed`` delivered to a WebSocket client, against K.

For each K the service (``tickguard serve``, its own process) starts on a database holding K
long positions with their stop at 99.9 (spread over ``USERS`` users, one /ws session each, so
no single session queues more than its share); one trade at 99.8 triggers them all. An event
is only sent after its transaction committed, so the last delivery bounds the last commit.

"All committed" is when the server's log line of the transaction that brought the committed
closes to K arrived here (persistence logs each committed close transaction after its commit:
``closed N positions (source engine)``, or one line per close for a small one), so it is an
upper bound of the last commit, read from the same clock as the deliveries. That line can wait
in the pipe while this process is busy receiving the events, so the figure "(server clock)" is
the same line's own timestamp (the server's wall clock, in milliseconds, taken when it logged
it) against this process's wall clock at the tick: no pipe in between.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import trio

from bench.common import (
    Context,
    Figure,
    at_most,
    connect_listeners,
    fresh_database,
    insert_positions,
    new_position,
    plot_path,
    postgres_settings,
    pyplot,
    serve_subprocess,
    wait_closed,
    write_result,
)
from tickguard.sim import open_simulator
from tickguard.storage import open_database

NAME = "cascade"
USERS = 100
# All delivered; issue 16 (K = 10,000): also first delivered <= 50 ms, all committed <= 1 s.
TARGETS_MS = {1_000: 150.0, 10_000: 1500.0}
FIRST_TARGET_MS = {10_000: 50.0}
COMMITTED_TARGET_MS = {10_000: 1000.0}
_CLOSED_MANY = re.compile(r"closed (\d+) positions \(source engine\)")
_CLOSED_ONE = re.compile(r"closed position \S+ .* \(source engine\)")
OLD_BACKEND_S = {1_000: "~0.7 s", 10_000: "6.4-7.3 s"}


async def one_cascade(url: str, k: int, round_: int) -> dict[str, Any]:
    users = [f"cascade{round_}-{u}" for u in range(min(USERS, k))]
    await insert_positions(
        url,
        [
            new_position(users[i % len(users)], "long", "100", stop="99.9", take=None)
            for i in range(k)
        ],
    )
    timeout = 20 + k / 2000  # a cascade that takes longer is reported as not completed
    async with open_simulator({"BTC-USD": Decimal("100")}) as sim:
        async with serve_subprocess(url, sim.url) as server:
            async with trio.open_nursery() as nursery:
                listeners = await connect_listeners(nursery, server.ws_base, users)
                cpu_before = server.cpu_seconds()
                log_before = len(server.lines)
                sent, sent_wall = time.perf_counter(), time.time()
                sim.publish("BTC-USD", "99.8")
                try:
                    await wait_closed(listeners, k, timeout=timeout)
                    completed = True
                except trio.TooSlowError:
                    completed = False
                arrivals = sorted(t for x in listeners for t in x.closed_at.values())
                cpu = server.cpu_seconds() - cpu_before
                commits = _commits(server.lines[log_before:])
                logged = _commits(server.lines[log_before:], server_clock=True)
                nursery.cancel_scope.cancel()
            warnings = [
                line for _, line in server.lines if " WARNING " in line or " ERROR " in line
            ]
    row: dict[str, Any] = {
        "k": k,
        "completed": completed,
        "delivered": len(arrivals),
        "server_cpu_s": cpu,
        "server_warnings": warnings[:20],
        # (ms after the tick the log line arrived, closes committed so far) per transaction
        "commits": [((at - sent) * 1000, n) for at, n in commits],
        # the same, by each log line's own timestamp (the server's wall clock)
        "commits_server_clock": [((at - sent_wall) * 1000, n) for at, n in logged],
    }
    committed = next((at for at, n in commits if n >= k), None)
    row["all_committed_ms"] = None if committed is None else (committed - sent) * 1000
    committed = next((at for at, n in logged if n >= k), None)
    row["all_committed_server_ms"] = None if committed is None else (committed - sent_wall) * 1000
    if completed:
        row |= {
            "first_ms": (arrivals[0] - sent) * 1000,
            "all_delivered_ms": (arrivals[-1] - sent) * 1000,
            "half_delivered_ms": (arrivals[len(arrivals) // 2] - sent) * 1000,
        }
    else:
        row |= {"first_ms": None, "all_delivered_ms": None, "gave_up_after_s": timeout}
        await _close_leftovers(url)
    return row


def _commits(
    lines: list[tuple[float, str]], *, server_clock: bool = False
) -> list[tuple[float, int]]:
    """(arrival time, closes committed so far) for each logged engine close transaction; with
    ``server_clock``, the line's own timestamp (Unix seconds) instead of its arrival."""
    total, out = 0, []
    for at, line in lines:
        if (many := _CLOSED_MANY.search(line)) is not None:
            total += int(many.group(1))
        elif _CLOSED_ONE.search(line) is not None:
            total += 1
        else:
            continue
        out.append((_logged_at(line) if server_clock else at, total))
    return out


def _logged_at(line: str) -> float:
    """The timestamp a text log line starts with (``2026-12-02T12:01:42.639Z``), Unix seconds."""
    stamp = datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
    return stamp.timestamp()


async def _close_leftovers(url: str) -> None:
    """Close what a failed cascade left open, so the next K starts from its own positions."""
    async with open_database(url, timeout=600) as db:
        await db.execute(
            """UPDATE positions SET status = 'closed', close_price = stop_loss,
                      close_reason = 'stop_loss', closed_at = now(), triggered_at = now()
                WHERE status = 'open'"""
        )


async def measure(url: str, sizes: list[int]) -> list[dict[str, Any]]:
    return [await one_cascade(url, k, i) for i, k in enumerate(sizes)]


def run(ctx: Context) -> Path:
    started = time.perf_counter()
    sizes = [1_000, 10_000] if ctx.quick else [1_000, 10_000, 100_000]
    pg = postgres_settings(ctx)
    with fresh_database(ctx) as url:
        rows = trio.run(measure, url, sizes)
    figures = []
    notes = []
    for row in rows:
        k = row["k"]
        target = TARGETS_MS.get(k)
        if not row["completed"]:
            notes.append(
                f"K={k:,} did not complete: {row['delivered']:,} of {k:,} delivered after "
                f"{row['gave_up_after_s']:.0f} s; server said: {row['server_warnings'][:3]}"
            )
        figures.append(
            Figure(
                f"K={k:,}: all committed and delivered",
                row["all_delivered_ms"],
                "ms",
                f"<= {target:,.0f} ms" if target else "",
                at_most(row["all_delivered_ms"], target) if target else None,
            )
            if row["completed"]
            else Figure(
                f"K={k:,}: NOT COMPLETED, delivered", row["delivered"], "events", f"{k:,}", False
            )
        )
        first_target = FIRST_TARGET_MS.get(k)
        figures.append(
            Figure(
                f"K={k:,}: first event delivered",
                row["first_ms"],
                "ms",
                f"<= {first_target:,.0f} ms" if first_target else "",
                at_most(row["first_ms"], first_target) if first_target else None,
            )
        )
        committed_target = COMMITTED_TARGET_MS.get(k)
        figures.append(
            Figure(
                f"K={k:,}: all committed (server log)",
                row["all_committed_ms"],
                "ms",
                f"<= {committed_target:,.0f} ms" if committed_target else "",
                at_most(row["all_committed_ms"], committed_target) if committed_target else None,
            )
        )
        figures.append(
            Figure(f"K={k:,}: all committed (server clock)", row["all_committed_server_ms"], "ms")
        )
        figures.append(Figure(f"K={k:,}: server CPU used", row["server_cpu_s"] * 1000, "ms"))
        if k in OLD_BACKEND_S:
            figures.append(Figure(f"  (old backend K={k:,}: {OLD_BACKEND_S[k]})", None, ""))
    _plot(ctx, rows)
    return write_result(
        ctx,
        NAME,
        params={"sizes": sizes, "users": USERS},
        figures=figures,
        data={"rows": rows},
        pg=pg,
        started=started,
        notes=notes,
    )


def _plot(ctx: Context, rows: list[dict[str, Any]]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    done = [r for r in rows if r["completed"]]
    ks = [r["k"] for r in done]
    ax.plot(ks, [r["all_delivered_ms"] for r in done], "o-", label="tickguard: all delivered")
    ax.plot(ks, [r["first_ms"] for r in done], "^-", label="tickguard: first delivered")
    for r in rows:
        if not r["completed"]:
            ax.annotate(
                f"K={r['k']:,}: not completed ",
                (r["k"], 1000 * r["gave_up_after_s"]),
                ha="right",
            )
            ax.plot([r["k"]], [1000 * r["gave_up_after_s"]], "rv")
    ax.plot([1_000, 10_000], [700, 6_850], "s--", color="grey", label="old backend")
    ax.plot(
        list(TARGETS_MS), list(TARGETS_MS.values()), "x", color="red", markersize=10, label="target"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("positions triggered by one tick (K)")
    ax.set_ylabel("ms from tick to delivery")
    ax.set_title("Stop cascade")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_path(ctx, NAME), dpi=110)
    plt.close(fig)
