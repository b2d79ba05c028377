"""Benchmark 8, split roles (issue 17): ``tickguard serve --role api|engine|gateway`` as separate
processes on one PostgreSQL and a Redis of the bench's own, the simulator as Coinbase.

Three figures, each taken against real processes over loopback:

1. **REST with 1 api process vs 2** (``--role api`` vs ``--role api --workers 2``, both running
   beside one engine and one gateway, as deployed). ``wrk -t2 -c32`` as in ``bench.rest``:
   ``POST /api/positions`` (a new user per request) and ``GET /api/positions`` (100 open
   positions per user), alternating which api deployment goes first from round to round
   (three rounds, one with ``--quick``), each run after a discarded 2 s warm-up, each rate
   also as a fraction of B (``bench.bare``) measured in the same round. The figure is the
   ratio 2/1 of the same round (issue 17's target: >= 1.3). The machine has 2 cores that wrk,
   PostgreSQL, the engine, the gateway and the api processes all share: two api processes can
   at most use the second core where the client and the database leave some of it free.
2. **Event latency api -> gateway -> client**: one WebSocket session on the gateway for one
   user; creates for that user through the api at a fixed rate (open loop: each POST starts on
   its schedule, whatever the previous ones do). Latency from sending the POST, and from
   receiving its 201, to receiving the ``position.created`` event. Once with Redis (wake-ups),
   once with Redis killed (the gateway polls the log every 0.5 s).
3. **Engine takeover**: two engine processes with ``ENGINE_LEASE_TTL_MS=2000``, a few open
   positions; ``kill -9`` of the leader (``/ready``'s ``engine.leader``), then at once a price
   that crosses their stops. Measured from the kill to the standby's ``/ready`` saying leader,
   and to every crossed stop closed in the database (the standby recovers the trade over REST
   from the watermark, invariant 12). Polled every 10 ms.

``BENCH_ROLES_SMOKE=1`` shrinks everything to a few seconds (tests/test_bench_smoke.py): the
figures of such a run mean nothing; only that every part runs and counts what it should.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from bench.bare import PATH as BARE_PATH
from bench.bare import bare_subprocess
from bench.common import (
    SERVE_READY_S,
    Context,
    Figure,
    Server,
    at_least,
    background,
    distribution_ms,
    free_port,
    fresh_database,
    insert_positions,
    postgres_settings,
    write_result,
)
from bench.rest import CONNECTIONS, GET_LUA, GET_USERS, PER_USER, POST_LUA, THREADS, wrk
from tickguard.sim import Simulator, open_simulator
from tickguard.storage import open_database
from tickguard.wire import loads

NAME = "roles"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
LEASE_TTL_MS = 2000
RATIO_TARGET = 1.3
POLL_S = 0.01  # the takeover's polling period: its figures are this coarse
PRICE = Decimal("100")  # the REST seed's positions sit around 100 (bench.common.background)


# --- a Redis of the bench's own -----------------------------------------------------------------


@attrs.define
class BenchRedis:
    """``redis-server`` on a free loopback port, nothing on disk; killed (not flushed) at the
    end. The shared server on 6379 is never touched."""

    workdir: Path
    port: int = attrs.field(factory=free_port)
    process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start it and return once it answers PING."""
        self.process = await trio.lowlevel.open_process(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with trio.fail_after(10):
            while not await self._pong():
                if self.process.returncode is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                await trio.sleep(0.02)

    async def _pong(self) -> bool:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError:
            return False
        async with stream:
            await stream.send_all(b"PING\r\n")
            return (await stream.receive_some(64)).startswith(b"+PONG")

    async def kill(self) -> None:
        """SIGKILL (an outage, not a shutdown) and wait until it is gone."""
        if self.process is not None:
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()
            self.process = None


@asynccontextmanager
async def bench_redis() -> AsyncIterator[BenchRedis]:
    if not os.path.exists(REDIS_SERVER):  # noqa: ASYNC240 - once, before anything runs
        raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
    with tempfile.TemporaryDirectory(prefix="tickguard-bench-redis-") as workdir:
        redis = BenchRedis(Path(workdir))
        await redis.start()
        try:
            yield redis
        finally:
            with trio.CancelScope(shield=True):
                await redis.kill()


# --- role processes -----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent:
                found.append(child)
                frontier.append(child)
    return found


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # exited meanwhile
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@attrs.define
class Role:
    """One ``tickguard serve --role …`` process (with ``--workers``, the parent of its api
    processes) and its log."""

    name: str
    server: Server
    workers: int = 1

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def pid(self) -> int:
        return self.server.process.pid

    def cpu_by_process(self) -> dict[int, float]:
        """CPU time so far of the process and of each live descendant (the workers)."""
        return {pid: _cpu_seconds(pid) for pid in [self.pid, *_children(self.pid)]}

    def cpu_seconds(self) -> float:
        return sum(self.cpu_by_process().values())


@attrs.define
class Deployment:
    """The role processes of one run, on one database, one Redis and one simulator."""

    database_url: str
    redis: BenchRedis
    sim: Simulator
    stack: AsyncExitStack
    nursery: trio.Nursery
    roles: dict[str, Role] = attrs.field(factory=dict)

    async def start(self, name: str, role: str, *, workers: int = 1, **env: str) -> Role:
        """Start ``name`` playing ``role``; returns once /ready answers 200 from each of its
        ``workers`` api processes."""
        started = self.roles[name] = await self.stack.enter_async_context(
            role_process(
                self.nursery,
                name,
                role,
                self.database_url,
                self.redis.url,
                self.sim,
                workers=workers,
                env=env,
            )
        )
        return started

    async def restart(self, name: str, role: str, **env: str) -> Role:
        """A new process for ``name`` (the old one was killed); its context is not closed until
        the deployment is (a dead process costs nothing)."""
        return await self.start(name, role, **env)


@asynccontextmanager
async def deployment(
    database_url: str, redis: BenchRedis, price: Decimal
) -> AsyncIterator[Deployment]:
    async with (
        AsyncExitStack() as stack,
        open_simulator({"BTC-USD": price}, heartbeat_interval=0.2) as sim,
        trio.open_nursery() as nursery,
    ):
        try:
            yield Deployment(database_url, redis, sim, stack, nursery)
        finally:
            await stack.aclose()  # the processes, before the simulator and the log readers
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def role_process(
    nursery: trio.Nursery,
    name: str,
    role: str,
    database_url: str,
    redis_url: str,
    sim: Simulator,
    *,
    workers: int = 1,
    env: dict[str, str],
) -> AsyncIterator[Role]:
    port = free_port()
    environ = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "TICKGUARD_ROLE": role,
        "ENGINE_ID": name,
        # The takeover is measured for stage 2: one lease, a leader and a standby.
        "ENGINE_PARTITIONS": "1",
        "COINBASE_WS_URL": sim.url,
        "COINBASE_REST_URL": sim.rest_url,
        "COINBASE_PRODUCTS": "BTC-USD",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "info",
        "LOG_FORMAT": "text",
        "MAX_OPEN_POSITIONS_PER_USER": "100000",
        # One client address drives thousands of requests a second (as in bench.rest).
        "RATE_LIMIT_PER_USER": "0",
        "RATE_LIMIT_PER_ADDRESS": "0",
        "WS_CONNECTS_PER_ADDRESS_PER_MIN": "0",
        **env,
    }
    args = [sys.executable, "-m", "tickguard", "serve"]
    if workers > 1:
        args += ["--workers", str(workers)]
    process = await trio.lowlevel.open_process(
        args, env=environ, cwd="/", stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    server = Server(process, f"http://127.0.0.1:{port}", time.perf_counter())
    nursery.start_soon(server._read_log)
    try:
        await _wait_serving(server, workers)
        yield Role(name, server, workers)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(30):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _wait_serving(server: Server, workers: int) -> None:
    """Until /ready answers 200 and, with ``workers``, that many api processes have logged that
    they listen and run as children of the parent. Raises when the parent runs no workers
    (a checkout without ``workers.py`` takes ``--workers`` and serves alone)."""
    with trio.fail_after(SERVE_READY_S):
        while sum("listening on" in line for _, line in server.lines) < workers:
            if server.process.returncode is not None:
                raise RuntimeError(f"{server.base_url} exited: {server.tail()}")
            await server._changed.wait()
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            while True:
                try:
                    if (await http.get("/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)
    if workers > 1 and len(_children(server.process.pid)) < workers:
        raise RuntimeError(
            f"--workers {workers} did not start {workers} api processes (children: "
            f"{_children(server.process.pid)}): is workers.py on this checkout?"
        )


# --- 1. REST: one api process vs two ------------------------------------------------------------


async def rest_rounds(
    d: Deployment, *, seconds: int, warmup: int, rounds: int, scripts: Path
) -> dict[str, Any]:
    """``rounds`` rounds of B, then POST and GET against each api deployment, the order of 1
    and 2 alternating from round to round. Per run: wrk's figures, the load average at its
    start, and the CPU time each role's processes used during it."""
    one, two = d.roles["api-1"], d.roles["api-2"]
    others = [d.roles["engine"], d.roles["gateway"]]
    out: dict[str, Any] = {"runs": {}}
    post, get = scripts / "post.lua", scripts / "get.lua"
    async with bare_subprocess() as bare:
        for n in range(rounds):
            order = (one, two) if n % 2 == 0 else (two, one)
            plan: list[tuple[str, Any, str, Path | None, tuple[str, ...]]] = [
                ("bare", Role("bare", bare), BARE_PATH, None, ())
            ]
            for route, script, args in (
                ("post", post, ("{tag}",)),
                ("get", get, (str(GET_USERS),)),
            ):
                for api in order:
                    key = f"{route}_{api.workers}"
                    plan.append((key, api, "", script, args))
            for key, target, path, script, args in plan:
                url = target.base_url + path
                if warmup:
                    tags = tuple(a.replace("{tag}", f"warm{n}-{key}") for a in args)
                    await wrk(url, warmup, script, *tags)
                tag = f"run{n}-{key}"
                tags = tuple(a.replace("{tag}", tag) for a in args)
                by_pid = target.cpu_by_process()
                cpu_before = [sum(by_pid.values())] + [r.cpu_seconds() for r in others]
                result = await wrk(url, seconds, script, *tags)
                by_pid_after = target.cpu_by_process()
                cpu_after = [sum(by_pid_after.values())] + [r.cpu_seconds() for r in others]
                # Per process (the parent first): a worker restarted meanwhile shows as new.
                result["cpu_s_by_process"] = [
                    round(after - by_pid.get(pid, 0.0), 3) for pid, after in by_pid_after.items()
                ]
                used = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
                result["round"], result["tag"] = n, tag
                result["server_cpu_ms"] = 1000 * used[0] / max(1, result["requests"])
                result["engine_cpu_s"], result["gateway_cpu_s"] = used[1], used[2]
                out["runs"].setdefault(key, []).append(result)
    return out


async def count_transactions(url: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    """Adds to each POST run the creates it made and the transactions they committed in (the
    event log's ``tx`` of their ``position.created`` events): how far group commit grouped
    them in each api process."""
    async with open_database(url) as db:
        for key in ("post_1", "post_2"):
            for result in runs[key]:
                pattern = f"w%-{result['tag']}-%".replace("_", "\\_")  # LIKE's default escape
                row = await db.fetchrow(
                    "SELECT count(*) AS creates, count(DISTINCT tx) AS transactions FROM events "
                    "WHERE user_id LIKE $1",
                    pattern,
                )
                result["creates"], result["transactions"] = row["creates"], row["transactions"]
                result["creates_per_transaction"] = row["creates"] / max(1, row["transactions"])


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _range(spread: dict[str, float], fmt: str) -> str:
    return f"[{format(spread['min'], fmt)}-{format(spread['max'], fmt)}]"


def summarise_rest(raw: dict[str, Any]) -> dict[str, Any]:
    runs = raw["runs"]
    bare = runs["bare"]
    summary: dict[str, Any] = {}
    for key, rs in runs.items():
        summary[key] = {
            "rps": _spread([r["rps"] for r in rs]),
            "of_b": _spread([r["rps"] / b["rps"] for r, b in zip(rs, bare, strict=True)]),
            "p50_ms": _spread([r.get("p50_ms", float("nan")) for r in rs]),
            "p99_ms": _spread([r.get("p99_ms", float("nan")) for r in rs]),
            "server_cpu_ms": _spread([r["server_cpu_ms"] for r in rs]),
            "engine_cpu_s": _spread([r["engine_cpu_s"] for r in rs]),
            "gateway_cpu_s": _spread([r["gateway_cpu_s"] for r in rs]),
            "load_average": _spread([r["load_average"] for r in rs]),
        }
    for key in ("post_1", "post_2"):
        summary[key]["creates_per_transaction"] = _spread(
            [r["creates_per_transaction"] for r in runs[key]]
        )
    for route in ("post", "get"):
        ratios = [
            two["rps"] / one["rps"]
            for one, two in zip(runs[f"{route}_1"], runs[f"{route}_2"], strict=True)
        ]
        summary[f"{route}_ratio"] = _spread(ratios)
    return summary


# --- 2. event latency ---------------------------------------------------------------------------


async def event_latency(
    d: Deployment, user: str, *, rate: float, seconds: float, price: Decimal
) -> dict[str, Any]:
    """Creates for ``user`` through api-1 at ``rate`` per second for ``seconds`` (open loop),
    one /ws session on the gateway receiving their ``position.created`` events. Returns the
    per-position times (perf_counter: POST sent, 201 received, event received) and the
    distributions. Every create must answer 201 and every event must arrive (else raises)."""
    import trio_websocket

    gateway, api = d.roles["gateway"], d.roles["api-1"]
    ws_url = gateway.base_url.replace("http://", "ws://", 1) + f"/ws?userId={user}"
    sent: dict[str, tuple[float, float]] = {}  # id -> (POST sent, 201 received)
    received: dict[str, float] = {}
    failures: list[str] = []
    count = max(1, round(rate * seconds))
    body = {
        "userId": user,
        "symbol": "BTC-USD",
        "side": "long",
        "entryPrice": str(price),
        "stopLoss": str(price / 2),
    }
    horizon: list[tuple[float, float, str]] = []  # (perf_counter, age s, database)
    async with (
        trio_websocket.open_websocket_url(ws_url) as ws,
        httpx.AsyncClient(base_url=api.base_url, timeout=30) as http,
        open_database(d.database_url) as db,
    ):
        while loads(await ws.get_message()).get("type") != "connection.ready":
            pass

        async def receive() -> None:
            while True:
                message = await ws.get_message()
                now = time.perf_counter()
                event = loads(message)
                if event.get("type") == "position.created":
                    received[event["position"]["id"]] = now

        async def create() -> None:
            started = time.perf_counter()
            response = await http.post("/api/positions", json=body)
            answered = time.perf_counter()
            if response.status_code != 201:
                failures.append(f"{response.status_code} {response.text[:200]}")
                return
            sent[loads(response.content)["data"]["id"]] = (started, answered)

        async def watch_horizon() -> None:
            # The log tail reads only below the cluster's oldest running writer (xmin): a
            # writing transaction of anyone on this PostgreSQL server holds every event back.
            while True:
                row = await db.fetchrow(
                    "SELECT coalesce(extract(epoch FROM max(now() - xact_start)), 0) AS age, "
                    "(array_agg(datname ORDER BY xact_start))[1] AS datname "
                    "FROM pg_stat_activity WHERE backend_xid IS NOT NULL"
                )
                horizon.append((time.perf_counter(), float(row["age"]), row["datname"] or ""))
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(watch_horizon)
            async with trio.open_nursery() as posting:
                t0 = trio.current_time()
                for i in range(count):
                    await trio.sleep_until(t0 + i / rate)
                    posting.start_soon(create)
            if failures:
                raise RuntimeError(f"{len(failures)} creates failed, e.g. {failures[0]}")
            with trio.fail_after(30):
                while not set(sent) <= set(received):  # noqa: ASYNC110 - receipt times are recorded as they come
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    from_send = [received[i] - s for i, (s, _) in sent.items()]
    from_201 = [received[i] - a for i, (_, a) in sent.items()]
    return {
        "creates": count,
        "rate_per_s": rate,
        "seconds": seconds,
        "from_post_sent": distribution_ms(from_send),
        "from_201": distribution_ms(from_201),
        # The event can reach the session before the 201 reaches the client.
        "event_before_201": sum(1 for x in from_201 if x < 0),
        "samples": {
            i: {"sent": s, "answered": a, "event": received[i]} for i, (s, a) in sent.items()
        },
        # Sampled every 0.1 s: the age of the cluster's oldest writing transaction.
        "oldest_writer_max_s": max((age for _, age, _ in horizon), default=0.0),
        "oldest_writer_database": max(horizon, key=lambda h: h[1], default=(0, 0, ""))[2],
        "oldest_writer": horizon,
    }


# --- 3. engine takeover -------------------------------------------------------------------------


async def _ready(http: httpx.AsyncClient, role: Role) -> dict[str, Any]:
    try:
        response = await http.get(role.base_url + "/ready", timeout=2)
    except httpx.TransportError:
        return {}
    body: dict[str, Any] = loads(response.content)
    return body


async def _leader(http: httpx.AsyncClient, engines: Sequence[Role]) -> Role:
    """The one engine whose /ready says leader (waits for exactly one)."""
    with trio.fail_after(60):
        while True:
            leaders = [
                e
                for e in engines
                if e.server.process.returncode is None
                and (await _ready(http, e)).get("engine", {}).get("leader")
            ]
            if len(leaders) == 1:
                return leaders[0]
            await trio.sleep(0.05)


async def _watching(http: httpx.AsyncClient, role: Role) -> int:
    text = (await http.get(role.base_url + "/metrics")).text
    prefix = 'tickguard_positions_open{symbol="BTC-USD"} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return int(float(line[len(prefix) :]))
    return 0


async def create_stop(http: httpx.AsyncClient, base_url: str, user: str, price: Decimal) -> str:
    """A long BTC-USD position of ``user`` at ``price`` with its stop 1 below; its id."""
    response = await http.post(
        base_url + "/api/positions",
        json={
            "userId": user,
            "symbol": "BTC-USD",
            "side": "long",
            "entryPrice": str(price),
            "stopLoss": str(price - 1),
        },
    )
    if response.status_code != 201:
        raise RuntimeError(f"create failed: {response.status_code} {response.text}")
    return str(loads(response.content)["data"]["id"])


async def takeovers(
    d: Deployment, *, repeats: int, per_round: int, price: Decimal
) -> list[dict[str, Any]]:
    """``repeats`` times: ``per_round`` long positions with a stop just below ``price``, watched
    by the leader; kill -9 the leader, publish a price under the stops at once; time until the
    standby reports leader and until every one of them is closed; restart the killed engine
    (it stands by for the next round)."""
    results = []
    engines = {"engine-a": d.roles["engine-a"], "engine-b": d.roles["engine-b"]}
    api = d.roles["api-1"]
    env = {"ENGINE_LEASE_TTL_MS": str(LEASE_TTL_MS)}
    async with (
        httpx.AsyncClient(timeout=10) as http,
        open_database(d.database_url) as db,
    ):
        for n in range(repeats):
            leader = await _leader(http, list(engines.values()))
            standby = next(e for e in engines.values() if e is not leader)
            ids = []
            for _ in range(per_round):
                ids.append(await create_stop(http, api.base_url, f"takeover-{n}", price))
            with trio.fail_after(60):
                while await _watching(http, leader) < per_round:  # noqa: ASYNC110 - a metric
                    await trio.sleep(0.05)
            # The standby has to be a standby, alive and answering, before the kill.
            if (await _ready(http, standby)).get("engine", {}).get("leader") is not False:
                raise RuntimeError(
                    f"{standby.name} is not a standby: {await _ready(http, standby)}"
                )
            price -= 2
            killed_at = time.perf_counter()
            leader.server.process.kill()
            d.sim.publish("BTC-USD", price)
            led_at = closed_at = None
            with trio.fail_after(120):
                while led_at is None or closed_at is None:
                    now = time.perf_counter()
                    if led_at is None and (await _ready(http, standby)).get("engine", {}).get(
                        "leader"
                    ):
                        led_at = now
                    if closed_at is None:
                        closed = await db.fetchval(
                            "SELECT count(*) FROM positions WHERE id::text = ANY($1::text[]) "
                            "AND status = 'closed'",
                            ids,
                        )
                        if int(closed) == len(ids):
                            closed_at = now
                    await trio.sleep(POLL_S)
            reasons = await db.fetch(
                "SELECT close_reason, close_price FROM positions WHERE id::text = ANY($1::text[])",
                ids,
            )
            results.append(
                {
                    "round": n,
                    "killed": leader.name,
                    "new_leader": standby.name,
                    "positions": len(ids),
                    "to_leader_s": led_at - killed_at,
                    "to_closed_s": closed_at - killed_at,
                    "all_stop_loss": all(r["close_reason"] == "stop_loss" for r in reasons),
                    "close_prices": sorted({str(r["close_price"]) for r in reasons}),
                }
            )
            await leader.server.process.wait()
            engines[leader.name] = await d.restart(leader.name, "engine", **env)
    return results


# --- the run ------------------------------------------------------------------------------------


@attrs.frozen
class Sizes:
    rest_seconds: int
    warmup: int
    rounds: int
    latency_rate: float
    latency_seconds: float
    takeovers: int
    per_takeover: int


def sizes(ctx: Context) -> Sizes:
    if os.environ.get("BENCH_ROLES_SMOKE"):
        return Sizes(1, 0, 1, 20.0, 1.0, 1, 3)
    if ctx.quick:
        return Sizes(5, 2, 1, 50.0, 5.0, 2, 5)
    return Sizes(15, 2, 3, 50.0, 10.0, 5, 5)


async def measure_rest_and_latency(
    url: str, redis: BenchRedis, size: Sizes, scripts: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with deployment(url, redis, PRICE) as d:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: d.start("engine", "engine"))
            nursery.start_soon(lambda: d.start("gateway", "gateway"))
            nursery.start_soon(lambda: d.start("api-1", "api"))
            nursery.start_soon(lambda: d.start("api-2", "api", workers=2))
        out["rest"] = await rest_rounds(
            d, seconds=size.rest_seconds, warmup=size.warmup, rounds=size.rounds, scripts=scripts
        )
        await count_transactions(url, out["rest"]["runs"])
        out["latency"] = await event_latency(
            d, "latency-redis", rate=size.latency_rate, seconds=size.latency_seconds, price=PRICE
        )
        await redis.kill()
        out["latency_no_redis"] = await event_latency(
            d, "latency-poll", rate=size.latency_rate, seconds=size.latency_seconds, price=PRICE
        )
        await redis.start()  # the processes stop as they would with it there
    return out


async def measure_takeover(url: str, redis: BenchRedis, size: Sizes) -> list[dict[str, Any]]:
    price = Decimal("1000")
    env = {"ENGINE_LEASE_TTL_MS": str(LEASE_TTL_MS)}
    async with deployment(url, redis, price) as d:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: d.start("engine-a", "engine", **env))
            nursery.start_soon(lambda: d.start("engine-b", "engine", **env))
            nursery.start_soon(lambda: d.start("api-1", "api"))
        return await takeovers(d, repeats=size.takeovers, per_round=size.per_takeover, price=price)


async def measure(rest_url: str, takeover_url: str, size: Sizes, scripts: Path) -> dict[str, Any]:
    async with bench_redis() as redis:
        out = await measure_rest_and_latency(rest_url, redis, size, scripts)
        out["takeover"] = await measure_takeover(takeover_url, redis, size)
    return out


def run(ctx: Context) -> Path:
    started = time.perf_counter()
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    size = sizes(ctx)
    pg = postgres_settings(ctx)
    with fresh_database(ctx) as rest_url, fresh_database(ctx) as takeover_url:
        trio.run(
            insert_positions,
            rest_url,
            background(GET_USERS * PER_USER, users=GET_USERS, prefix="get"),
        )
        with tempfile.TemporaryDirectory() as tmp:
            scripts = Path(tmp)
            (scripts / "post.lua").write_text(POST_LUA)
            (scripts / "get.lua").write_text(GET_LUA)
            raw = trio.run(measure, rest_url, takeover_url, size, scripts)
    ctx.json_dir.mkdir(parents=True, exist_ok=True)
    # The raw runs first: a summary that fails must not lose the measurement.
    (ctx.json_dir / f"{NAME}.raw.json").write_text(json.dumps(raw, indent=1, default=str))
    raw["rest"]["summary"] = summary = summarise_rest(raw["rest"])
    figures = rest_figures(summary, size.rounds) + latency_figures(raw) + takeover_figures(raw)
    every = [r for rs in raw["rest"]["runs"].values() for r in rs]
    failed = sum(r["non_2xx"] + r["socket_errors"] for r in every)
    figures.append(Figure("non-2xx responses / socket errors (all wrk runs)", failed, ""))
    notes = [
        f"this machine has {os.cpu_count()} cores shared by wrk, PostgreSQL, the bench, the "
        "engine, the gateway and the api processes: 2 api processes can only use what the "
        "others leave of the second core"
    ]
    if failed:
        notes.append("some requests failed: see data.rest.runs.*.output")
    if os.environ.get("BENCH_ROLES_SMOKE"):
        notes.append("BENCH_ROLES_SMOKE: tiny sizes, the figures mean nothing")
    return write_result(
        ctx,
        NAME,
        params={
            "connections": CONNECTIONS,
            "threads": THREADS,
            **attrs.asdict(size),
            "get_users": GET_USERS,
            "positions_per_user": PER_USER,
            "engine_lease_ttl_ms": LEASE_TTL_MS,
            "poll_s": POLL_S,
        },
        figures=figures,
        data=raw,
        pg=pg,
        started=started,
        notes=notes,
    )


def rest_figures(summary: dict[str, Any], rounds: int) -> list[Figure]:
    b = summary["bare"]
    loads_ = [
        v
        for k, s in summary.items()
        if "load_average" in s
        for v in (s["load_average"]["min"], s["load_average"]["max"])
    ]
    figures = [
        Figure(
            f"B, bare app req/s (median of {rounds}) {_range(b['rps'], ',.0f')}",
            b["rps"]["median"],
            "req/s",
        ),
        Figure(
            f"1-min load average at the runs' start [{min(loads_):.2f}-{max(loads_):.2f}]",
            statistics.median(loads_),
            "",
        ),
    ]
    labels = {"post": "POST /api/positions", "get": f"GET {PER_USER} open positions"}
    plural = {1: "process", 2: "processes"}
    for route, label in labels.items():
        for workers in (1, 2):
            s = summary[f"{route}_{workers}"]
            figures += [
                Figure(
                    f"{label}, {workers} api {plural[workers]} {_range(s['rps'], ',.0f')}",
                    s["rps"]["median"],
                    "req/s",
                ),
                Figure(
                    f"  as a fraction of B {_range(s['of_b'], '.2f')}", s["of_b"]["median"], "x B"
                ),
                Figure(f"  p50 {_range(s['p50_ms'], '.1f')}", s["p50_ms"]["median"], "ms"),
                Figure(f"  p99 {_range(s['p99_ms'], '.1f')}", s["p99_ms"]["median"], "ms"),
                Figure(
                    f"  api CPU per request (its processes) {_range(s['server_cpu_ms'], '.2f')}",
                    s["server_cpu_ms"]["median"],
                    "ms",
                ),
                Figure(
                    f"  engine's CPU during the run {_range(s['engine_cpu_s'], '.2f')}",
                    s["engine_cpu_s"]["median"],
                    "s",
                ),
                Figure(
                    f"  gateway's CPU during the run {_range(s['gateway_cpu_s'], '.2f')}",
                    s["gateway_cpu_s"]["median"],
                    "s",
                ),
            ]
            if route == "post":
                per = s["creates_per_transaction"]
                figures.append(
                    Figure(
                        f"  creates per committed transaction {_range(per, '.1f')}",
                        per["median"],
                        "",
                    )
                )
        ratio = summary[f"{route}_ratio"]
        figures.append(
            Figure(
                f"{route.upper()} 2 api processes / 1, same round {_range(ratio, '.2f')}",
                ratio["median"],
                "x",
                f">= {RATIO_TARGET}",
                at_least(ratio["median"], RATIO_TARGET),
            )
        )
    return figures


def latency_figures(raw: dict[str, Any]) -> list[Figure]:
    figures = []
    for key, label in (("latency", "Redis up"), ("latency_no_redis", "Redis killed (poll)")):
        result = raw[key]
        figures.append(
            Figure(
                f"event latency, {label}: {result['creates']} creates at "
                f"{result['rate_per_s']:g}/s",
                None,
                "",
            )
        )
        for measure_, name in (("from_post_sent", "POST sent"), ("from_201", "201 received")):
            dist = result[measure_]
            figures += [
                Figure(f"  {name} -> position.created p50", dist["p50_ms"], "ms"),
                Figure("    p99", dist["p99_ms"], "ms"),
                Figure("    max", dist["max_ms"], "ms"),
            ]
        figures.append(Figure("  events received before their 201", result["event_before_201"], ""))
        figures.append(
            Figure(
                "  oldest writing transaction on the cluster (max, sampled 0.1 s)",
                result["oldest_writer_max_s"] * 1000,
                "ms",
            )
        )
    return figures


def takeover_figures(raw: dict[str, Any]) -> list[Figure]:
    runs = raw["takeover"]
    lead = [r["to_leader_s"] * 1000 for r in runs]
    closed = [r["to_closed_s"] * 1000 for r in runs]
    return [
        Figure(
            f"takeover, ENGINE_LEASE_TTL_MS={LEASE_TTL_MS}: kill -9 -> standby leader p50",
            statistics.median(lead),
            "ms",
        ),
        Figure(f"  max of {len(runs)}", max(lead), "ms"),
        Figure("  kill -9 -> crossed stops closed p50", statistics.median(closed), "ms"),
        Figure(f"  max of {len(runs)}", max(closed), "ms"),
        Figure(
            "  positions closed by stop loss (all rounds)",
            sum(r["positions"] for r in runs if r["all_stop_loss"]),
            "",
        ),
    ]
