"""Command line of the simulator: ``tickguard sim`` / ``python -m tickguard.sim``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from decimal import Decimal, InvalidOperation

import trio

from tickguard.sim import paths
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


def _volatility(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not Decimal(0) < value < Decimal(1):
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (a fraction), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tickguard sim",
        description="Coinbase-protocol market data simulator: the WebSocket feed "
        "(ws://HOST:PORT) and the REST market data (GET /products, /products/{id}/trades, "
        "/products/{id}/candles) on one port. Control it with POST /control "
        '{"op": ...} (POST /control {"op": "help"} lists the ops and their arguments) and '
        "read its counters at GET /stats.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free)")
    parser.add_argument(
        "--products",
        type=_products,
        default="BTC-USD=65000,ETH-USD=3000",
        help="products served, comma-separated ID=START_PRICE (the price defaults to 100)",
    )
    parser.add_argument(
        "--path",
        choices=("walk", "script"),
        default="walk",
        help="price path per product: a seeded random walk, or hold the start price "
        "(prices then come from the control channel)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random walk seed (per product +1)")
    parser.add_argument(
        "--volatility",
        type=_volatility,
        default=str(paths.DEFAULT_VOLATILITY),
        help="the walk's largest move per tick, as a fraction of the start price (0.0001 at "
        "5 ticks/s crosses a +-0.05%% bracket within two minutes)",
    )
    parser.add_argument("--rate", type=float, default=5.0, help="ticks per second per product")
    parser.add_argument(
        "--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats"
    )
    parser.add_argument(
        "--stats-interval",
        type=float,
        default=0.0,
        help="print the counters (JSON) every N seconds (0: only at exit)",
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
        volatility=args.volatility,
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
