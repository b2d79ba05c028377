"""Gap recovery (issue 14): how long the recovery of a gap of 1 minute, of 1 hour and of 24
hours of BTC-USD-like trades takes, and how many REST requests it uses.

    python -m bench --only recovery [--quick]
    python -m bench.recovery [--rate TRADES_PER_S] [--positions N]

The simulator holds the gap's trades in its history without a ticker (its REST trades and
candles list them), spread evenly over the gap; the real recovery actor, with the production
``RecoveryConfig()`` (1,000 trades a page, at most 100 pages, then candles between one page of
trades at each edge), reads them over loopback HTTP into a WindowSlot's hold; a TriggerIndex
holding ``N`` open positions (none crossed: the common case) judges every recovered window, as
the engine would. Measured: from ``RecoverGap`` sent to the last window judged. The 1-minute
and 1-hour gaps are paged through in trades; the 24-hour gap (864,000 trades) is judged from
1-minute candles between its edges, and its time includes the simulator computing each candles
answer from its whole history (Coinbase serves them precomputed). No database: the watermark is
handed to the actor in memory (its one read is still counted as a request). The tick path's
cost is not measured: ``WindowSlot.put`` gained one ``isinstance`` check and the feed one
comparison per subscription's first ticker.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import trio

from bench.common import Context, Figure, write_result
from tickguard.actors import recovery
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import Position, RecoverGap, Watermark
from tickguard.actors.triggers import TriggerIndex
from tickguard.actors.window import TickWindow, WindowSlots
from tickguard.sim import open_simulator

NAME = "recovery"
PRODUCT = "BTC-USD"
RATE = 10.0  # trades per second assumed BTC-USD-like
GAPS = (("1 minute", 60), ("1 hour", 3600), ("24 hours", 86_400))


def positions(n: int, now: datetime) -> list[Position]:
    """``n`` long positions, stops 5-15% below and take-profits 5-15% above 65,000."""
    rng = random.Random(1)
    return [
        Position(
            id=uuid.uuid4(),
            user_id=f"u{i % 1000}",
            symbol=PRODUCT,
            side="long",
            entry_price=Decimal(65000),
            take_profit=Decimal(65000 + rng.randint(3250, 9750)),
            stop_loss=Decimal(65000 - rng.randint(3250, 9750)),
            status="open",
            close_price=None,
            close_reason=None,
            created_at=now,
            updated_at=now,
            closed_at=None,
        )
        for i in range(n)
    ]


async def one_gap(seconds: int, trades: int, n_positions: int) -> dict[str, Any]:
    rng = random.Random(trades)
    now = datetime.now(UTC)
    index = TriggerIndex(positions(n_positions, now))
    async with open_simulator({PRODUCT: "65000"}) as sim:
        market = sim.products[PRODUCT]
        market.history = deque(market.history, maxlen=trades + 10)  # the whole gap listed
        mark = Watermark(PRODUCT, market.trade_id, market.last_time)
        # The gap's trades, evenly spread after the watermark (so after the positions).
        price, step = Decimal(65000), timedelta(seconds=seconds) / trades
        for i in range(1, trades + 1):
            price += Decimal(rng.randint(-50, 50)) / 10
            market.trade(price, time=mark.time + step * i)
        before = market.trade_id + 1  # the first live trade after the gap

        async def read_watermark(symbol: str) -> Watermark | None:
            return mark

        slots = WindowSlots()
        slot = slots.get(PRODUCT)
        box: Mailbox[RecoverGap] = Mailbox("recovery")
        stats = recovery.RecoveryStats()
        config = recovery.RecoveryConfig(sim.rest_url)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: recovery.run(
                    config, box, slots, read_watermark, stats=stats, task_status=task_status
                )
            )
            hold = slot.hold(mark.trade_id, before)
            started = time.perf_counter()
            box.send_nowait(RecoverGap(hold))
            # The recovery delivers every window and releases the hold in one step.
            window: TickWindow | None = await slot.take()
            judged = triggered = 0
            while window is not None:
                triggered += len(index.judge(window))
                judged += 1
                window = slot.take_nowait()
            elapsed = time.perf_counter() - started
            nursery.cancel_scope.cancel()
    return {
        "trades": trades,
        "rest_requests": stats.requests,
        "trades_judged": stats.trades,
        "candles_judged": stats.candles,
        "windows": judged,
        "seconds": round(elapsed, 3),
        "triggered": triggered,
        "abandoned": stats.abandoned,
    }


def run(ctx: Context) -> Path:
    """``python -m bench --only recovery``: each gap ``repeats`` times (medians printed), JSON
    in ``ctx.json_dir``."""
    started = time.perf_counter()
    n_positions = 1_000 if ctx.quick else 10_000
    repeats = 1 if ctx.quick else 3
    samples: dict[str, list[dict[str, Any]]] = {}
    figures = []
    for label, seconds in GAPS:
        trades = int(RATE * seconds)
        runs = [trio.run(one_gap, seconds, trades, n_positions) for _ in range(repeats)]
        samples[label] = runs
        figures += [
            Figure(
                f"gap of {label} ({trades:,} trades): recovered + judged",
                statistics.median(r["seconds"] for r in runs),
                "s",
            ),
            Figure(
                "  requests (trades pages, candles + 1 watermark read)",
                statistics.median(r["rest_requests"] for r in runs),
                "req",
            ),
            Figure(
                "  candles judged (trades judged apart)",
                statistics.median(r["candles_judged"] for r in runs),
                "",
            ),
        ]
    return write_result(
        ctx,
        NAME,
        params={
            "trades_per_s": RATE,
            "open_positions": n_positions,
            "repeats": repeats,
            "gaps_s": [seconds for _, seconds in GAPS],
        },
        figures=figures,
        data={"runs": samples},
        pg=None,
        started=started,
        notes=[
            "simulator over loopback, no rate limit; against Coinbase each page costs a round "
            "trip and the public limit",
            "tick path cost not measured (one isinstance per WindowSlot.put)",
            "the 24-hour gap's time includes the simulator scanning its whole history for each "
            "candles request",
        ],
    )


async def main(rate: float, n_positions: int) -> None:
    print(f"python {platform.python_version()}, {n_positions} open positions, {rate} trades/s")
    for label, seconds in GAPS:
        result = await one_gap(seconds, int(rate * seconds), n_positions)
        print(f"gap of {label}: {result}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=RATE, help="trades per second (BTC-USD-like)")
    parser.add_argument("--positions", type=int, default=10_000)
    args = parser.parse_args()
    trio.run(main, args.rate, args.positions)
