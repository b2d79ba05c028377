"""Benchmark 1, engine scaling: the cost of judging a non-triggering window against n open
positions, indexed (``TriggerIndex``) vs the old backend's linear loop, and memory per position.

The measuring is ``bench/engine_scaling.py``'s (run as is); this module sizes it, adds the run's
context to its result, checks the targets and plots cost against n on log axes.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench import engine_scaling
from bench.common import Context, Figure, at_most, plot_path, pyplot, write_result

NAME = "engine"
TARGET_1M_US = 50.0
TARGET_BYTES = 1024


def run(ctx: Context) -> Path:
    started = time.perf_counter()
    if ctx.quick:
        argv = ["--sizes", "1000,10000,100000", "--budget", "0.3", "--memory-n", "20000"]
    else:
        argv = ["--sizes", "1000,10000,100000,1000000", "--budget", "1.0"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engine.json"
        engine_scaling.main([*argv, "--json", str(out)])
        raw = json.loads(out.read_text())
    rows = raw["results"]
    by_n = {row["n"]: row for row in rows}
    largest = max(by_n)
    indexed = [row["indexed_us"] for row in rows]
    flatness = max(indexed) / min(indexed)
    mem = raw["memory"]
    figures = [
        Figure(f"indexed judge, n={n:,}", row["indexed_us"], "µs") for n, row in by_n.items()
    ]
    figures[-1] = Figure(
        f"indexed judge, n={largest:,}",
        by_n[largest]["indexed_us"],
        "µs",
        "<= 50 µs at 1M" if largest >= 1_000_000 else "",
        at_most(by_n[largest]["indexed_us"], TARGET_1M_US) if largest >= 1_000_000 else None,
    )
    figures += [Figure(f"linear scan, n={n:,}", row["linear_us"], "µs") for n, row in by_n.items()]
    figures += [
        Figure(
            f"linear / indexed at n={largest:,}",
            (by_n[largest]["linear_us"] or 0) / by_n[largest]["indexed_us"],
            "x",
        ),
        Figure("indexed max/min over n (1 = flat)", flatness, "x"),
        Figure(
            f"index held per open position (n={mem['n']:,})",
            mem["held_bytes_per_position"],
            "B",
            "<= 1 KiB",
            at_most(mem["held_bytes_per_position"], TARGET_BYTES),
        ),
        Figure("rows as loaded per position", mem["rows_bytes_per_position"], "B"),
    ]
    _plot(ctx, rows)
    return write_result(
        ctx,
        NAME,
        params={"argv": argv, "window": raw["window"]},
        figures=figures,
        data=raw,
        pg=None,
        started=started,
    )


def _plot(ctx: Context, rows: list[dict[str, float]]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in rows]
    ax.plot(ns, [r["indexed_us"] for r in rows], "o-", label="TriggerIndex.judge")
    linear = [(r["n"], r["linear_us"]) for r in rows if r["linear_us"]]
    ax.plot([n for n, _ in linear], [u for _, u in linear], "s-", label="linear scan (old loop)")
    ax.axhline(TARGET_1M_US, color="grey", linestyle="--", linewidth=1, label="target 50 µs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("open positions on the symbol (n)")
    ax.set_ylabel("µs per non-triggering window")
    ax.set_title("Engine scaling")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_path(ctx, NAME), dpi=110)
    plt.close(fig)
