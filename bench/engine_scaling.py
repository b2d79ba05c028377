"""Per-window cost of the trigger index against the linear scan, as open positions grow.

Judges a window that triggers nothing (the common case: the price moves inside every bracket)
against n open positions, n = 1k, 10k, 100k, 1M, with ``TriggerIndex.judge`` and with
``judge_linear`` (the old backend's loop), and measures what the index holds per open position
with tracemalloc. Target (DESIGN.md invariant 5): indexed flat in n, under 50 µs at 1M.

    .venv/bin/python bench/engine_scaling.py [--sizes 1000,10000] [--linear-max N] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from tickguard.actors.messages import Position
from tickguard.actors.triggers import TriggerIndex, judge_linear
from tickguard.actors.window import TickWindow

T0 = datetime(2024, 1, 1, tzinfo=UTC)
EIGHT_PLACES = Decimal("0.00000001")


def make_positions(n: int, rng: random.Random) -> list[Position]:
    """n open positions around a price of 100, built like rows from the database: every field
    its own object (asyncpg gives each row fresh strings, Decimals and datetimes)."""

    def price(lo: int, hi: int) -> Decimal:
        return (Decimal(rng.randrange(lo * 10**8, hi * 10**8)) * EIGHT_PLACES).normalize()

    positions = []
    for i in range(n):
        long = rng.random() < 0.5
        tp = price(105, 150) if long else price(50, 95)
        sl = price(50, 95) if long else price(105, 150)
        if rng.random() < 0.1:
            tp = None  # some positions carry only one level
        created = T0 + timedelta(microseconds=i)
        positions.append(
            Position(
                id=uuid.UUID(int=rng.getrandbits(128), version=4),
                user_id=f"user-{i % 10_000}",
                symbol="".join(["BTC", "-USD"]),
                side="".join(["lo", "ng"]) if long else "".join(["sh", "ort"]),
                entry_price=price(96, 104),
                take_profit=tp,
                stop_loss=sl,
                status="".join(["op", "en"]),
                close_price=None,
                close_reason=None,
                created_at=created,
                updated_at=created + timedelta(0),
                closed_at=None,
            )
        )
    return positions


def quiet_window() -> TickWindow:
    """A window inside every bracket (95 < low <= high < 105), after every position."""
    t = T0 + timedelta(days=1)
    return TickWindow(Decimal("99.5"), Decimal("100.5"), Decimal("100"), 10, 1, 10, t, t)


def per_call_us(call: Callable[[], object], budget_s: float) -> float:
    """Median over rounds of the mean time per call, in µs; rounds sized to fill the budget."""
    started = time.perf_counter()
    call()
    once = max(time.perf_counter() - started, 1e-7)
    per_round = max(1, int(budget_s / 5 / once))
    rounds = []
    for _ in range(5):
        started = time.perf_counter_ns()
        for _ in range(per_round):
            call()
        rounds.append((time.perf_counter_ns() - started) / per_round / 1000)
    return statistics.median(rounds)


def memory(n: int, rng: random.Random) -> dict[str, float]:
    """Bytes per position: the rows as loaded, the index built on them, and what the index
    still holds once the rows are dropped (what an engine keeps per open position)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    positions = make_positions(n, rng)
    rows = tracemalloc.get_traced_memory()[0] - base
    index = TriggerIndex(positions)
    with_index = tracemalloc.get_traced_memory()[0] - base
    del positions
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(index) == n
    return {
        "n": n,
        "rows_bytes_per_position": rows / n,
        "index_overhead_bytes_per_position": (with_index - rows) / n,
        "held_bytes_per_position": held / n,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--linear-max", type=int, default=1_000_000, help="skip linear above")
    parser.add_argument("--memory-n", type=int, default=100_000)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    window = quiet_window()
    rows = []
    print(f"{'n':>9} {'indexed µs':>11} {'linear µs':>12} {'ratio':>9} {'build s':>8}")
    for n in (int(s) for s in args.sizes.split(",")):
        positions = make_positions(n, rng)
        started = time.perf_counter()
        index = TriggerIndex(positions)
        build_s = time.perf_counter() - started
        assert index.judge(window) == [] and len(index) == n
        indexed = per_call_us(lambda index=index: index.judge(window), args.budget)
        linear = None
        if n <= args.linear_max:
            assert judge_linear(positions, window) == []
            linear = per_call_us(lambda p=positions: judge_linear(p, window), args.budget)
        ratio = f"{linear / indexed:9.0f}" if linear else f"{'-':>9}"
        linear_text = f"{linear:12.1f}" if linear else f"{'skipped':>12}"
        print(f"{n:>9} {indexed:11.2f} {linear_text} {ratio} {build_s:8.2f}")
        rows.append({"n": n, "indexed_us": indexed, "linear_us": linear, "build_s": build_s})
        del positions, index
        gc.collect()
    mem = memory(args.memory_n, rng)
    print(
        f"memory at n={mem['n']}: rows {mem['rows_bytes_per_position']:.0f} B/position, "
        f"index overhead {mem['index_overhead_bytes_per_position']:.0f} B/position, "
        f"held once rows are dropped {mem['held_bytes_per_position']:.0f} B/position"
    )
    if args.json:
        result = {
            "bench": "engine_scaling",
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "window": "non-triggering",
            "results": rows,
            "memory": mem,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
