"""Symbols sharded across engine processes by lease partitions (issue 18, stage 3).

Real ``python -m tickguard serve --role …`` processes on one PostgreSQL database of their own
and one Redis, fed by the Coinbase-protocol simulator (six products) over real sockets, with
``ENGINE_PARTITIONS=8`` and a shrunk lease TTL. Ownership is checked from the outside: the
simulator's subscriptions (one connection per symbol across the deployment) and each engine's
``/ready``; closes by the audit of the database (``fault_helpers.audit``). Timing bounds are
hang guards only.
"""

from __future__ import annotations

import random
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio
from fault_helpers import audit, long_with_stop, seeds, until
from redis_server import RedisServer
from tcp_proxy import running_proxy
from test_roles import LEASE_TTL_MS, Deployment, Node, _watching

from tickguard.sim import open_simulator
from tickguard.storage import open_database
from tickguard.wire import loads

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PARTITIONS = 8
# Partitions 0, 7, 3, 6, 5 and 2 of 8 (CRC-32): spread over any split of the ring.
SYMBOLS = ("BTC-USD", "ETH-USD", "SOL-USD", "ADA-USD", "DOGE-USD", "AVAX-USD")
START = "65000"


@asynccontextmanager
async def sharded(database_url: str, redis_url: str, logs: Path) -> AsyncIterator[Deployment]:
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            open_simulator(dict.fromkeys(SYMBOLS, START), heartbeat_interval=0.2)
        )
        yield Deployment(database_url, redis_url, sim, logs, stack)


async def closed_at_their_stops(db: Any, ids: list[str]) -> None:
    """Every crossed stop closed as a stop loss at its level (invariant 4), whichever engine,
    before or after a takeover, closed it."""
    wrong = await db.fetch(
        "SELECT id, close_reason, close_price, stop_loss FROM positions "
        "WHERE id::text = ANY($1::text[]) "
        "AND (close_reason IS DISTINCT FROM 'stop_loss' OR close_price <> stop_loss)",
        ids,
    )
    assert not wrong, wrong


async def two_engines_and_an_api(d: Deployment) -> None:
    async with trio.open_nursery() as nursery:
        for name in ("engine-a", "engine-b"):
            nursery.start_soon(start, d, name)
        nursery.start_soon(start, d, "api", "api")


async def all_closed(db: Any, ids: list[str]) -> bool:
    return await closed_count(db, ids) == len(ids)


async def start(d: Deployment, name: str, role: str = "engine", **env: str) -> Node:
    return await d.start(
        name,
        role,
        ENGINE_PARTITIONS=str(PARTITIONS),
        COINBASE_PRODUCTS=",".join(SYMBOLS),
        **env,
    )


def alive(d: Deployment) -> dict[str, Node]:
    return {
        name: node
        for name, node in d.nodes.items()
        if name.startswith("engine") and node.process.process.poll() is None
    }


async def ownership(d: Deployment, engines: dict[str, Node]) -> dict[str, dict[str, Any]]:
    return {name: (await node.ready())["engine"] for name, node in engines.items()}


async def settled(d: Deployment, engines: dict[str, Node]) -> dict[str, dict[str, Any]]:
    """Waits until ``engines`` hold every partition once, evenly, and each symbol is owned
    (in /ready) and subscribed (at the simulator) exactly once; returns their /ready."""
    found: dict[str, dict[str, Any]] = {}

    async def check() -> bool:
        found.clear()
        found.update(await ownership(d, engines))
        held = [p for e in found.values() for p in e["partitions"]]
        if sorted(held) != list(range(PARTITIONS)):
            return False
        counts = [len(e["partitions"]) for e in found.values()]
        if max(counts) - min(counts) > 1:
            return False
        owned = sorted(s for e in found.values() for s in e["symbols"])
        if owned != sorted(SYMBOLS):
            return False
        return all(d.sim.subscribers(s) == 1 for s in SYMBOLS)

    await until(check, timeout=60, poll=0.1)
    return found


def owner_of(found: dict[str, dict[str, Any]], symbol: str) -> str:
    (name,) = [n for n, e in found.items() if symbol in e["symbols"]]
    return name


async def create_stops(api: Node, user: str, symbol: str, count: int, top: int) -> list[str]:
    """``count`` longs on ``symbol`` with stops from ``top`` down by 10."""
    ids = []
    for i in range(count):
        response = await api.create(long_with_stop(user, str(top - 10 * i), symbol))
        assert response.status_code == 201, response.text
        ids.append(loads(response.content)["data"]["id"])
    return ids


async def closed_count(db: Any, ids: list[str]) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM positions WHERE id::text = ANY($1::text[]) AND status = 'closed'",
            ids,
        )
    )


async def test_two_then_three_engines_own_each_symbol_exactly_once(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    async with sharded(own_database, redis_url, tmp_path) as d:
        async with trio.open_nursery() as nursery:
            for name in ("engine-a", "engine-b"):
                nursery.start_soon(start, d, name)
        two = await settled(d, alive(d))
        assert sorted(len(e["partitions"]) for e in two.values()) == [4, 4]
        await start(d, "engine-c")
        three = await settled(d, alive(d))
        assert sorted(len(e["partitions"]) for e in three.values()) == [2, 3, 3]
        assert all(e["members"] == 3 for e in three.values())
        # /metrics says the same: its share, and the members it counts.
        metrics = (await d.nodes["engine-c"].http.get("/metrics")).text
        held = len(three["engine-c"]["partitions"])
        assert f"tickguard_engine_lease_partitions_held {float(held)}" in metrics
        assert "tickguard_engine_members 3.0" in metrics


async def test_kill_9_of_an_owner_while_its_stops_are_crossed_closes_each_once(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    async with (
        sharded(own_database, redis_url, tmp_path) as d,
        open_database(own_database) as db,
    ):
        await two_engines_and_an_api(d)
        found = await settled(d, alive(d))
        victim = owner_of(found, "BTC-USD")
        survivor = next(n for n in found if n != victim)
        other = next(s for s in SYMBOLS if owner_of(found, s) == survivor)
        api = d.nodes["api"]
        triggered = await create_stops(api, "kim", "BTC-USD", 60, 64600)
        triggered += await create_stops(api, "lee", other, 20, 64600)
        untouched = await create_stops(api, "max", "BTC-USD", 3, 60000)

        async def watched() -> bool:
            return (
                await _watching(d.nodes[victim], "BTC-USD") == 63
                and await _watching(d.nodes[survivor], other) == 20
            )

        await until(watched, timeout=30)
        # The price walks down through the stops on both symbols; the owner of BTC-USD dies
        # in the middle: the rest of its walk is recovered by the survivor from the watermark.
        for step in range(16):
            d.sim.publish("BTC-USD", str(64600 - 40 * step))
            d.sim.publish(other, str(64600 - 40 * step))
            if step == 6:
                d.nodes[victim].process.process.send_signal(signal.SIGKILL)
        d.sim.publish("BTC-USD", "63000")
        d.sim.publish(other, "63000")

        await until(partial(all_closed, db, triggered), timeout=60)
        after = await settled(d, alive(d))
        assert list(after) == [survivor] and len(after[survivor]["partitions"]) == PARTITIONS
        result = await audit(db, triggered, untouched)
        result.assert_clean()
        await closed_at_their_stops(db, triggered)


async def test_a_paused_owner_is_fenced_and_nothing_closes_twice(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    async with (
        sharded(own_database, redis_url, tmp_path) as d,
        open_database(own_database) as db,
    ):
        await two_engines_and_an_api(d)
        found = await settled(d, alive(d))
        paused_name = owner_of(found, "ETH-USD")
        paused = d.nodes[paused_name]
        triggered = await create_stops(d.nodes["api"], "nia", "ETH-USD", 40, 64400)

        async def watched() -> bool:
            return await _watching(paused, "ETH-USD") == 40

        await until(watched, timeout=30)
        paused.process.process.send_signal(signal.SIGSTOP)
        try:
            # The crossing reaches the paused owner's socket too; the other engine takes over.
            d.sim.publish("ETH-USD", "63000")

            await until(partial(all_closed, db, triggered), timeout=60)
        finally:
            paused.process.process.send_signal(signal.SIGCONT)
        # Resumed, it finds itself fenced, drops what it lost and gets its share back.
        await settled(d, alive(d))
        text = (await paused.http.get("/metrics")).text
        assert 'tickguard_engine_lease_changes_total{change="lost"} 0.0' not in text
        result = await audit(db, triggered)
        result.assert_clean()
        await closed_at_their_stops(db, triggered)


@pytest.mark.parametrize("seed", seeds(1, 2, soak=6))
async def test_a_random_schedule_of_joins_kills_and_pauses_closes_every_crossed_stop_once(
    own_database: str, redis_url: str, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    symbols = SYMBOLS[:3]
    async with (
        sharded(own_database, redis_url, tmp_path) as d,
        open_database(own_database) as db,
    ):
        async with trio.open_nursery() as nursery:
            for name in ("engine-1", "engine-2"):
                nursery.start_soon(start, d, name)
            nursery.start_soon(start, d, "api", "api")
        await settled(d, alive(d))
        api = d.nodes["api"]
        triggered: list[str] = []
        for symbol in symbols:
            triggered += await create_stops(api, f"u-{symbol}", symbol, 15, 64500)
        untouched = await create_stops(api, "v", symbols[0], 2, 60000)
        joined = 2
        price = 64600
        for _ in range(8):
            action = rng.choice(["join", "kill", "pause", "walk"])
            engines = alive(d)
            if action == "join" and len(engines) < 3:
                joined += 1
                await start(d, f"engine-{joined}")
            elif action == "kill" and len(engines) >= 2:
                victim = rng.choice(sorted(engines))
                engines[victim].process.process.send_signal(signal.SIGKILL)
            elif action == "pause" and len(engines) >= 2:
                victim = engines[rng.choice(sorted(engines))]
                victim.process.process.send_signal(signal.SIGSTOP)
                # Past the TTL: its partitions are taken over while it sleeps.
                await trio.sleep(LEASE_TTL_MS / 1000 * rng.uniform(0.5, 2.0))
                victim.process.process.send_signal(signal.SIGCONT)
            price -= 20
            for symbol in symbols:
                d.sim.publish(symbol, str(price))
            await trio.sleep(rng.uniform(0.1, 0.6))
        if not alive(d):
            joined += 1
            await start(d, f"engine-{joined}")
        for symbol in symbols:
            d.sim.publish(symbol, "64000")

        await until(partial(all_closed, db, triggered), timeout=90)
        await settled(d, alive(d))
        result = await audit(db, triggered, untouched)
        result.assert_clean()
        await closed_at_their_stops(db, triggered)


async def test_an_owner_partitioned_from_postgresql_is_taken_over_and_rejoins_fenced(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    """One engine reaches PostgreSQL through a test-owned proxy that is cut while its stops
    are crossed: the other engine takes its partitions and closes each stop once; healed, the
    old owner finds its leases gone and rejoins without a second close."""
    parts = urlsplit(own_database)
    if not parts.hostname or not parts.port:
        pytest.skip("the database is not on TCP (embedded PostgreSQL): no proxy to cut")
    async with (
        running_proxy(parts.hostname, parts.port) as proxy,
        sharded(own_database, redis_url, tmp_path) as d,
        open_database(own_database) as db,
    ):
        proxied = urlunsplit(
            parts._replace(netloc=parts.netloc.replace(f":{parts.port}", f":{proxy.port}"))
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(start, d, "engine-a", DATABASE_URL=proxied))
            nursery.start_soon(start, d, "engine-b")
            nursery.start_soon(start, d, "api", "api")
        found = await settled(d, alive(d))
        cut_off = d.nodes["engine-a"]
        symbol = next(s for s in SYMBOLS if owner_of(found, s) == "engine-a")
        triggered = await create_stops(d.nodes["api"], "oda", symbol, 30, 64600)
        untouched = await create_stops(d.nodes["api"], "pia", symbol, 2, 60000)

        async def watched() -> bool:
            return await _watching(cut_off, symbol) == 32

        await until(watched, timeout=30)
        assert proxy.connections > 0  # engine-a does reach PostgreSQL through the proxy
        try:
            # The walk down through the stops is cut off from the owner's database half way,
            # once it closed some: the rest reaches its feed too, but none of its closes can
            # commit.
            for step in range(8):
                d.sim.publish(symbol, str(64600 - 40 * step))
                if step == 3:

                    async def some_closed() -> bool:
                        return await closed_count(db, triggered) > 0

                    await until(some_closed, timeout=30)  # engine-a closed some itself
                    proxy.cut()
            d.sim.publish(symbol, "63000")

            await until(partial(all_closed, db, triggered), timeout=60)
            # engine-b holds everything; engine-a dropped its symbols (one subscription each).
            alone = await settled(d, {"engine-b": d.nodes["engine-b"]})
            assert len(alone["engine-b"]["partitions"]) == PARTITIONS
        finally:
            proxy.heal()
        # Healed: engine-a finds itself expired, drops the lost leases and gets its share back.
        after = await settled(d, alive(d))
        assert sorted(len(e["partitions"]) for e in after.values()) == [4, 4]
        text = (await cut_off.http.get("/metrics")).text
        assert 'tickguard_engine_lease_changes_total{change="lost"} 0.0' not in text
        result = await audit(db, triggered, untouched)
        result.assert_clean()
        await closed_at_their_stops(db, triggered)


async def test_redis_restarted_while_an_owners_stops_are_crossed_closes_each_once(
    own_database: str, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Redis is killed in the middle of a walk through an owner's stops and started again
    (empty): every crossed stop closes once, and ownership (PostgreSQL leases) stays exactly
    once throughout."""
    async with (
        sharded(own_database, own_redis.url, tmp_path) as d,
        open_database(own_database) as db,
    ):
        await two_engines_and_an_api(d)
        found = await settled(d, alive(d))
        owner = owner_of(found, "SOL-USD")
        triggered = await create_stops(d.nodes["api"], "quy", "SOL-USD", 40, 64600)
        untouched = await create_stops(d.nodes["api"], "ria", "SOL-USD", 2, 60000)

        async def watched() -> bool:
            return await _watching(d.nodes[owner], "SOL-USD") == 42

        await until(watched, timeout=30)
        for step in range(12):
            d.sim.publish("SOL-USD", str(64600 - 40 * step))
            if step == 4:
                await trio.to_thread.run_sync(own_redis.stop)
        d.sim.publish("SOL-USD", "63000")

        await until(partial(all_closed, db, triggered), timeout=60)
        # Without Redis: still each partition and symbol owned once, by the same engines.
        during = await settled(d, alive(d))
        assert {n: e["partitions"] for n, e in during.items()} == {
            n: e["partitions"] for n, e in found.items()
        }
        await trio.to_thread.run_sync(own_redis.start)  # same port, empty
        after = await settled(d, alive(d))
        assert sorted(len(e["partitions"]) for e in after.values()) == [4, 4]
        result = await audit(db, triggered, untouched)
        result.assert_clean()
        await closed_at_their_stops(db, triggered)
