"""``python -m bench [--quick] [--only NAME ...] [--json-dir DIR]``: run tickguard's benchmarks.

Each benchmark runs against real components (PostgreSQL at BENCH_DATABASE_URL /
TEST_DATABASE_URL, a fresh database per benchmark; the simulator; the service as its own
process; real HTTP/WebSocket clients over loopback), prints a table, writes
``<json-dir>/<name>.json`` and, where it has one, a plot under ``bench/plots/``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from bench.common import DEFAULT_ADMIN_URL, PLOTS_DIR, REPO, Context, WeakDurability

# name -> module (run order: the in-process ones first, then those needing the service)
BENCHMARKS = {
    "engine": "bench.engine",
    "ingest": "bench.ingest",
    "feed_ingest": "bench.feed_ingest",
    "recovery": "bench.recovery",
    "latency": "bench.latency",
    "cascade": "bench.cascade",
    "rest": "bench.rest",
    "startup": "bench.startup",
    "fanout": "bench.fanout",
    "roles": "bench.roles",
    "sharding": "bench.sharding",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes in all")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only these ({', '.join(BENCHMARKS)})",
    )
    parser.add_argument("--json-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--plots-dir", type=Path, default=PLOTS_DIR)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("TEST_DATABASE_URL")
        or DEFAULT_ADMIN_URL,
        help="a PostgreSQL server to create (and drop) one database per benchmark on",
    )
    parser.add_argument(
        "--allow-weak-durability",
        action="store_true",
        help="run even with synchronous_commit/fsync off (results flagged)",
    )
    args = parser.parse_args(argv)
    ctx = Context(
        quick=args.quick,
        admin_url=args.database_url,
        json_dir=args.json_dir,
        plots_dir=args.plots_dir,
        allow_weak_durability=args.allow_weak_durability,
    )
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) * 0.5:  # before we start, any load is someone else's
        print(
            f"note: 1-min load average is {load:.2f} on {os.cpu_count()} CPUs: figures will be "
            "noisy",
            file=sys.stderr,
        )
    failed = []
    started = time.perf_counter()
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(BENCHMARKS[name])
        try:
            module.run(ctx)
        except WeakDurability as refusal:
            print(f"refusing to benchmark: {refusal}", file=sys.stderr)
            return 2
        except Exception as error:  # noqa: BLE001 - one broken benchmark must not hide the rest
            import traceback

            traceback.print_exc()
            print(f"benchmark {name} failed: {error!r}", file=sys.stderr)
            failed.append(name)
    print(
        f"\n{len(args.only or BENCHMARKS) - len(failed)} benchmark(s) done in "
        f"{time.perf_counter() - started:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
