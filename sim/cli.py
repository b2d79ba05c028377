"""Command line of the simulator: ``tickguard sim`` / ``python -m tickguard.sim``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from decimal import Decimal, InvalidOperation

import trio

from tickguard.sim.server import Simulator


def _products(text: str) -> dict[str, Decimal]:
    products: dict[str, Decimal] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, price = item.partition("=")
        try:
            products[name.strip().upper()] = Decimal(price) if sep else Decimal("100")
        except InvalidOperation:
            raise argparse.ArgumentTypeError(f"bad price in {item!r}") from None
    if not products:
        raise argparse.ArgumentTypeError("at least one product is needed")
    return products


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tickguard sim",
        description="Coinbase-protocol market data simulator. Control it with "
        'POST /control {"op": ...} and read counters at GET /stats on the same port.',
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--products", type=_products, default=_products("BTC-USD=65000,ETH-USD=3000")
    )
    parser.add_argument("--path", choices=("walk", "script"), default="walk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=5.0, help="ticks/s per product")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument(
        "--stats-interval", type=float, default=0.0, help="print counters every N s (0: at exit)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until interrupted; prints its counters (JSON) on exit."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sim = Simulator(
        args.products,
        host=args.host,
        port=args.port,
        rate=args.rate,
        heartbeat_interval=args.heartbeat_interval,
        path=args.path,
        seed=args.seed,
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.serve)
            print(f"simulator on {sim.url} (control: {sim.control_url})", flush=True)
            while args.stats_interval > 0:
                await trio.sleep(args.stats_interval)
                print(json.dumps(sim.stats()), flush=True)

    try:
        trio.run(run)
    except* KeyboardInterrupt:
        pass  # Ctrl-C is how a user stops the simulator
    finally:
        print(json.dumps(sim.stats()), file=sys.stderr, flush=True)
    return 0
