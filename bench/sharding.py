"""Benchmark 9, symbols sharded across engine processes (issue 18): ``serve --role engine``
processes sharing ``ENGINE_PARTITIONS=8`` over four symbols (BTC, ETH, SOL, ADA: partitions 0,
7, 3 and 6 by CRC-32), on one PostgreSQL, a Redis of the bench's own and the simulator.

Three figures, each against real processes over loopback (the process plumbing is
``bench.roles``'):

1. **Takeover over kills**: two engines with ``ENGINE_LEASE_TTL_MS=2000`` and an api; per round
   a few longs on BTC-USD with a stop 1 below the price, watched by BTC-USD's owner;
   ``kill -9`` of that owner, at once a trade under the stops. Timed from the kill to the
   survivor's ``/ready`` holding all 8 partitions, and to every crossed stop closed in the
   database; the killed engine is restarted and the two settle at 4 + 4 before the next round.
2. **A 10k stop cascade with 1 vs 2 engines**: 2,500 longs per symbol seeded with stops just
   under the price (plus 1,000 per symbol that nothing crosses), one fresh database for each
   case; one trade per symbol under every stop; timed from publishing those trades to every
   crossed stop committed closed (the database polled every 10 ms).
3. **Per-engine CPU at ~1,000 ticks/s**: in each cascade deployment after its cascade, trades
   spread over the four symbols (none crossing a level) for 10 s; each engine's user + system
   time from ``/proc`` over that window.

The machine has 2 cores shared with the bench, PostgreSQL, the simulator and other work: the
1-minute load average is stated beside every figure.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from bench.common import (
    Context,
    Figure,
    fresh_database,
    insert_positions,
    postgres_settings,
    write_result,
)
from bench.roles import BenchRedis, Deployment, Role, bench_redis, create_stop
from tickguard.actors.messages import NewPosition
from tickguard.sim import open_simulator
from tickguard.storage import open_database
from tickguard.wire import loads

NAME = "sharding"
PARTITIONS = 8
SYMBOLS = ("BTC-USD", "ETH-USD", "SOL-USD", "ADA-USD")
LEASE_TTL_MS = 2000
POLL_S = 0.01  # the polling period of every timed wait: the figures are this coarse
START = Decimal("1000")
CASCADE_PER_SYMBOL = 2500
UNTOUCHED_PER_SYMBOL = 1000
TICKS_PER_S = 1000
BATCH_S = 0.01  # ticks are published in batches of TICKS_PER_S * BATCH_S


def load() -> float:
    return os.getloadavg()[0]


def engine_env() -> dict[str, str]:
    return {
        "ENGINE_PARTITIONS": str(PARTITIONS),
        "COINBASE_PRODUCTS": ",".join(SYMBOLS),
        "ENGINE_LEASE_TTL_MS": str(LEASE_TTL_MS),
    }


@asynccontextmanager
async def deployment(database_url: str, redis: BenchRedis) -> AsyncIterator[Deployment]:
    """``bench.roles.deployment`` with the four symbols at ``START``."""
    async with (
        AsyncExitStack() as stack,
        open_simulator(dict.fromkeys(SYMBOLS, START), heartbeat_interval=0.2) as sim,
        trio.open_nursery() as nursery,
    ):
        try:
            yield Deployment(database_url, redis, sim, stack, nursery)
        finally:
            await stack.aclose()
            nursery.cancel_scope.cancel()


async def start_engines(d: Deployment, names: Sequence[str]) -> None:
    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(lambda n=name: d.start(n, "engine", **engine_env()))


async def ready_engine(http: httpx.AsyncClient, role: Role) -> dict[str, Any]:
    """``/ready``'s ``engine`` part ({} while it does not answer)."""
    try:
        response = await http.get(role.base_url + "/ready", timeout=2)
    except httpx.TransportError:
        return {}
    engine: dict[str, Any] = loads(response.content).get("engine") or {}
    return engine


async def settled(http: httpx.AsyncClient, engines: Sequence[Role]) -> dict[str, dict[str, Any]]:
    """Waits until ``engines`` hold every partition once, evenly, each symbol owned once, and
    the simulator has one subscription per symbol; returns their /ready engine parts."""
    with trio.fail_after(120):
        while True:
            found = {e.name: await ready_engine(http, e) for e in engines}
            held = sorted(p for e in found.values() for p in e.get("partitions", []))
            counts = [len(e.get("partitions", [])) for e in found.values()]
            owned = sorted(s for e in found.values() for s in e.get("symbols", []))
            if (
                held == list(range(PARTITIONS))
                and max(counts) - min(counts) <= 1
                and owned == sorted(SYMBOLS)
            ):
                return found
            await trio.sleep(0.05)


async def open_on(http: httpx.AsyncClient, role: Role, symbol: str) -> int:
    """The engine's ``tickguard_positions_open`` gauge for ``symbol`` (0 when absent)."""
    try:
        text = (await http.get(role.base_url + "/metrics", timeout=5)).text
    except httpx.TransportError:
        return 0
    prefix = f'tickguard_positions_open{{symbol="{symbol}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return int(float(line[len(prefix) :]))
    return 0


async def closed_count(db: Any, ids: list[str]) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM positions WHERE id::text = ANY($1::text[]) AND status = 'closed'",
            ids,
        )
    )


# --- 1. takeover over kills ---------------------------------------------------------------------


async def takeovers(d: Deployment, *, repeats: int, per_round: int) -> list[dict[str, Any]]:
    """``repeats`` rounds of: ``per_round`` stops on BTC-USD, kill -9 of its owner, a trade
    under them; time to the survivor holding every partition and to all closed."""
    results = []
    api = d.roles["api"]
    price = START
    async with httpx.AsyncClient(timeout=10) as http, open_database(d.database_url) as db:
        for n in range(repeats):
            engines = [d.roles["engine-a"], d.roles["engine-b"]]
            found = await settled(http, engines)
            (victim,) = [e for e in engines if "BTC-USD" in found[e.name]["symbols"]]
            (survivor,) = [e for e in engines if e is not victim]
            ids = []
            for i in range(per_round):
                ids.append(await create_stop(http, api.base_url, f"takeover-{n}-{i}", price))
            with trio.fail_after(60):
                while await open_on(http, victim, "BTC-USD") < per_round:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            price -= 2
            load_at_kill = load()
            killed_at = time.perf_counter()
            victim.server.process.kill()
            d.sim.publish("BTC-USD", price)
            held_at = closed_at = None
            with trio.fail_after(120):
                while held_at is None or closed_at is None:
                    now = time.perf_counter()
                    if held_at is None:
                        mine = (await ready_engine(http, survivor)).get("partitions", [])
                        if len(mine) == PARTITIONS:
                            held_at = now
                    if closed_at is None and await closed_count(db, ids) == len(ids):
                        closed_at = now
                    await trio.sleep(POLL_S)
            reasons = await db.fetch(
                "SELECT close_reason FROM positions WHERE id::text = ANY($1::text[])", ids
            )
            results.append(
                {
                    "round": n,
                    "killed": victim.name,
                    "survivor": survivor.name,
                    "positions": len(ids),
                    "to_all_partitions_s": held_at - killed_at,
                    "to_closed_s": closed_at - killed_at,
                    "all_stop_loss": all(r["close_reason"] == "stop_loss" for r in reasons),
                    "load_1min": load_at_kill,
                }
            )
            await victim.server.process.wait()
            await d.restart(victim.name, "engine", **engine_env())
    return results


# --- 2. the 10k cascade, and 3. CPU at 1k ticks/s -----------------------------------------------


def cascade_seed() -> list[NewPosition]:
    """Per symbol: ``CASCADE_PER_SYMBOL`` longs with stops from 1 to ~26 under ``START`` (one
    trade at ``START - 30`` crosses them all) and ``UNTOUCHED_PER_SYMBOL`` with stops far below."""
    out = []
    for symbol in SYMBOLS:
        for i in range(CASCADE_PER_SYMBOL + UNTOUCHED_PER_SYMBOL):
            crossed = i < CASCADE_PER_SYMBOL
            stop = START - 1 - Decimal(i % 2500) / 100 if crossed else START / 2
            out.append(
                NewPosition(
                    user_id=f"c-{symbol}-{i % 500}",
                    symbol=symbol,
                    side="long",
                    entry_price=START,
                    take_profit=None,
                    stop_loss=stop,
                )
            )
    return out


async def ticks(d: Deployment, seconds: float) -> int:
    """``TICKS_PER_S`` trades a second spread over the symbols for ``seconds``, between
    ``START - 40`` and ``START - 35`` (under the cascade, above every untouched stop). Returns
    how many were published."""
    per_batch = int(TICKS_PER_S * BATCH_S)
    sent = 0
    start = trio.current_time()
    batch = 0
    while trio.current_time() - start < seconds:
        for _ in range(per_batch):
            symbol = SYMBOLS[sent % len(SYMBOLS)]
            d.sim.publish(symbol, START - 40 + Decimal(sent % 500) / 100)
            sent += 1
        batch += 1
        await trio.sleep_until(start + batch * BATCH_S)
    return sent


async def cascade(url: str, redis: BenchRedis, engines: int, cpu_seconds: float) -> dict[str, Any]:
    """One deployment of ``engines`` engine processes over the seeded database: the cascade,
    then the CPU window."""
    names = [f"engine-{i}" for i in range(engines)]
    async with (
        deployment(url, redis) as d,
        httpx.AsyncClient(timeout=10) as http,
        open_database(url) as db,
    ):
        await start_engines(d, names)
        roles = [d.roles[n] for n in names]
        found = await settled(http, roles)
        ids = [
            str(r["id"])
            for r in await db.fetch("SELECT id FROM positions WHERE stop_loss > $1", START / 2)
        ]
        with trio.fail_after(300):
            for symbol in SYMBOLS:
                while True:
                    loaded = sum([await open_on(http, r, symbol) for r in roles])
                    if loaded >= CASCADE_PER_SYMBOL + UNTOUCHED_PER_SYMBOL:
                        break
                    await trio.sleep(0.1)
        load_at_cross = load()
        crossed_at = time.perf_counter()
        for symbol in SYMBOLS:
            d.sim.publish(symbol, START - 30)
        with trio.fail_after(300):
            while await closed_count(db, ids) < len(ids):  # noqa: ASYNC110 - the database
                await trio.sleep(POLL_S)
        committed_s = time.perf_counter() - crossed_at
        reasons = await db.fetchval(
            "SELECT count(*) FROM positions WHERE id::text = ANY($1::text[]) "
            "AND close_reason = 'stop_loss'",
            ids,
        )
        untouched_open = await db.fetchval("SELECT count(*) FROM positions WHERE status = 'open'")
        await trio.sleep(1)  # the cascade's tail (event fan-out) out of the CPU window
        load_at_ticks = load()
        before = {r.name: r.cpu_seconds() for r in roles}
        t0 = time.perf_counter()
        sent = await ticks(d, cpu_seconds)
        elapsed = time.perf_counter() - t0
        used = {r.name: r.cpu_seconds() - before[r.name] for r in roles}
        return {
            "engines": engines,
            "partitions": {n: found[n]["partitions"] for n in names},
            "crossed": len(ids),
            "closed_by_stop_loss": int(reasons),
            "untouched_still_open": int(untouched_open),
            "to_committed_s": committed_s,
            "load_1min_at_cross": load_at_cross,
            "ticks_sent": sent,
            "ticks_s": elapsed,
            "ticks_per_s": sent / elapsed,
            "cpu_s": used,
            "cpu_fraction": {n: s / elapsed for n, s in used.items()},
            "load_1min_at_ticks": load_at_ticks,
        }


# --- the run ------------------------------------------------------------------------------------


@attrs.frozen
class Sizes:
    takeovers: int
    per_takeover: int
    cpu_seconds: float


def sizes(ctx: Context) -> Sizes:
    return Sizes(3, 5, 10.0) if ctx.quick else Sizes(20, 5, 10.0)


async def measure(urls: dict[str, str], size: Sizes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with bench_redis() as redis:
        async with deployment(urls["takeover"], redis) as d:
            await start_engines(d, ["engine-a", "engine-b"])
            await d.start("api", "api", **engine_env())
            out["takeover"] = await takeovers(
                d, repeats=size.takeovers, per_round=size.per_takeover
            )
        out["cascade_1"] = await cascade(urls["cascade_1"], redis, 1, size.cpu_seconds)
        out["cascade_2"] = await cascade(urls["cascade_2"], redis, 2, size.cpu_seconds)
    return out


def run(ctx: Context) -> Path:
    started = time.perf_counter()
    size = sizes(ctx)
    pg = postgres_settings(ctx)
    with (
        fresh_database(ctx) as takeover_url,
        fresh_database(ctx) as one_url,
        fresh_database(ctx) as two_url,
    ):
        seed = cascade_seed()
        for url in (one_url, two_url):
            trio.run(insert_positions, url, seed)
        urls = {"takeover": takeover_url, "cascade_1": one_url, "cascade_2": two_url}
        raw = trio.run(measure, urls, size)
    ctx.json_dir.mkdir(parents=True, exist_ok=True)
    (ctx.json_dir / f"{NAME}.raw.json").write_text(json.dumps(raw, indent=1, default=str))
    notes = [
        f"this machine has {os.cpu_count()} cores shared by PostgreSQL, the bench (with the "
        "simulator), the engine processes and other work: two engines cannot each have a core"
    ]
    return write_result(
        ctx,
        NAME,
        params={
            **attrs.asdict(size),
            "partitions": PARTITIONS,
            "symbols": list(SYMBOLS),
            "engine_lease_ttl_ms": LEASE_TTL_MS,
            "cascade_per_symbol": CASCADE_PER_SYMBOL,
            "untouched_per_symbol": UNTOUCHED_PER_SYMBOL,
            "ticks_per_s": TICKS_PER_S,
            "poll_s": POLL_S,
        },
        figures=figures(raw),
        data=raw,
        pg=pg,
        started=started,
        notes=notes,
    )


def _loads(values: Sequence[float]) -> str:
    return f"[load {min(values):.1f}-{max(values):.1f}]"


def figures(raw: dict[str, Any]) -> list[Figure]:
    runs = raw["takeover"]
    held = [r["to_all_partitions_s"] * 1000 for r in runs]
    closed = [r["to_closed_s"] * 1000 for r in runs]
    loads_ = _loads([r["load_1min"] for r in runs])
    one, two = raw["cascade_1"], raw["cascade_2"]
    out = [
        Figure(
            f"takeover, TTL {LEASE_TTL_MS} ms, {len(runs)} kills {loads_}: "
            "kill -9 -> survivor holds 8/8 p50",
            statistics.median(held),
            "ms",
        ),
        Figure("  max", max(held), "ms"),
        Figure("  kill -9 -> crossed stops closed p50", statistics.median(closed), "ms"),
        Figure("  max", max(closed), "ms"),
        Figure(
            "  positions closed by stop loss (all rounds)",
            sum(r["positions"] for r in runs if r["all_stop_loss"]),
            "",
        ),
    ]
    for c in (one, two):
        out += [
            Figure(
                f"cascade {c['crossed']:,} stops / 4 symbols, {c['engines']} engine(s) "
                f"[load {c['load_1min_at_cross']:.1f}]: ticks -> all committed",
                c["to_committed_s"] * 1000,
                "ms",
            ),
            Figure("  closed by stop loss", c["closed_by_stop_loss"], ""),
            Figure("  stops nothing crossed, still open", c["untouched_still_open"], ""),
        ]
    out.append(
        Figure(
            "cascade time 1 engine / 2 engines (same run)",
            one["to_committed_s"] / two["to_committed_s"],
            "x",
        )
    )
    for c in (one, two):
        out.append(
            Figure(
                f"{c['ticks_per_s']:,.0f} ticks/s for {c['ticks_s']:.0f} s, {c['engines']} "
                f"engine(s) [load {c['load_1min_at_ticks']:.1f}]",
                None,
                "",
            )
        )
        for name, fraction in c["cpu_fraction"].items():
            out.append(Figure(f"  {name} CPU (of one core)", fraction * 100, "%"))
    return out
