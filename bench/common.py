"""What every benchmark shares: the run's context, a fresh database, a ``tickguard serve``
subprocess, seeding positions, percentiles, the result file and the printed table.

Nothing here measures; it sets up real components (PostgreSQL, the simulator, the service as
its own process) so that each benchmark module only says what it times.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import attrs
import httpx
import trio

from tickguard.actors.messages import NewPosition
from tickguard.storage import migrate, open_database, writes

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PLOTS_DIR = REPO / "bench" / "plots"
SERVE_READY_S = 120.0  # a start-up that takes longer than this is a failure, not a figure


class WeakDurability(RuntimeError):
    """The server commits without waiting for the disk: no figure may be taken on it."""


@attrs.frozen
class Context:
    """One ``python -m bench`` run: its size, where results go, and the server it uses."""

    quick: bool
    admin_url: str
    json_dir: Path
    plots_dir: Path
    allow_weak_durability: bool = False


@attrs.define
class Figure:
    """One printed and stored figure, with its target when the issue sets one."""

    name: str
    value: float | None
    unit: str
    target: str = ""
    met: bool | None = None  # None: no target, or not comparable

    def row(self) -> str:
        if self.value is None:
            value = "-"
        elif abs(self.value) >= 100:
            value = f"{self.value:,.0f}"
        else:
            value = f"{self.value:.3g}"
        verdict = {True: "ok", False: "MISSED", None: ""}[self.met]
        return f"  {self.name:<52} {value:>14} {self.unit:<8} {self.target:<16} {verdict}"


def at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def at_least(value: float | None, limit: float) -> bool | None:
    return None if value is None else value >= limit


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil without floats drifting
    return ordered[min(len(ordered), int(rank)) - 1]


def distribution_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max (and count, mean) of latencies given in seconds, in milliseconds."""
    ms = [s * 1000 for s in samples_s]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "mean_ms": sum(ms) / len(ms),
    }


# --- the machine and the database server --------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were taken on (CPU, Python, commit, load when the run started)."""
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": bool(dirty),
        "load_average": os.getloadavg(),
    }


async def _server_settings(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        names = ("server_version", "synchronous_commit", "fsync", "full_page_writes")
        return {name: await conn.fetchval(f"SHOW {name}") for name in names}
    finally:
        await conn.close()


def postgres_settings(ctx: Context) -> dict[str, str]:
    """The server's version and durability settings, read from the server itself.

    Raises ``WeakDurability`` when commits do not wait for the disk (unless the run was told
    to allow it, in which case the caller flags every result).
    """
    settings = asyncio.run(_server_settings(ctx.admin_url))
    weak = settings["synchronous_commit"] == "off" or settings["fsync"] == "off"
    if weak and not ctx.allow_weak_durability:
        raise WeakDurability(
            f"synchronous_commit={settings['synchronous_commit']} fsync={settings['fsync']}: "
            "figures would not mean a commit reached the disk (pass --allow-weak-durability "
            "to run anyway; every result is then flagged)"
        )
    return settings


# --- a fresh database per benchmark -------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _migrate(url: str) -> None:
    async with open_database(url) as db:
        await migrate(db)


@contextmanager
def fresh_database(ctx: Context) -> Iterator[str]:
    """A new, migrated database on the server for the body; dropped afterwards. Sync: call it
    outside ``trio.run`` (it drives asyncpg on its own asyncio loop)."""
    name = f"tickguard_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(ctx.admin_url, f'CREATE DATABASE "{name}"'))
    url = _with_database(ctx.admin_url, name)
    try:
        trio.run(_migrate, url)
        yield url
    finally:
        asyncio.run(_admin(ctx.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _commit_times(url: str, count: int) -> list[float]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_commit_floor (n int)")
        samples = []
        for i in range(count):
            started = time.perf_counter()
            await conn.execute("INSERT INTO bench_commit_floor VALUES ($1)", i)
            samples.append(time.perf_counter() - started)
        await conn.execute("DROP TABLE bench_commit_floor")
        return samples
    finally:
        await conn.close()


def commit_floor(url: str, count: int = 200) -> dict[str, float]:
    """What one durable commit of a one-row INSERT costs on this server (client round trip
    included): the floor under every figure that waits for a commit."""
    return distribution_ms(asyncio.run(_commit_times(url, count)))


# --- seeding positions --------------------------------------------------------------------------


def new_position(
    user: str, side: str, entry: str, *, stop: str | None, take: str | None
) -> NewPosition:
    return NewPosition(
        user_id=user,
        symbol="BTC-USD",
        side=side,  # type: ignore[arg-type]
        entry_price=Decimal(entry),
        take_profit=None if take is None else Decimal(take),
        stop_loss=None if stop is None else Decimal(stop),
    )


def background(n: int, *, users: int = 1000, prefix: str = "bg") -> list[NewPosition]:
    """``n`` open positions around a price of 100 that no price in 96..104 triggers."""
    out = []
    for i in range(n):
        offset = Decimal(i % 400) / 100  # 0.00 .. 3.99: spread the levels over the index
        if i % 2:
            out.append(
                new_position(
                    f"{prefix}-{i % users}",
                    "long",
                    "100",
                    stop=str(Decimal(90) - offset),
                    take=str(Decimal(110) + offset),
                )
            )
        else:
            out.append(
                new_position(
                    f"{prefix}-{i % users}",
                    "short",
                    "100",
                    stop=str(Decimal(110) + offset),
                    take=str(Decimal(90) - offset),
                )
            )
    return out


async def insert_positions(url: str, requests: Sequence[NewPosition], chunk: int = 5000) -> None:
    """Store positions through the real writer (``create_positions``), a chunk per transaction,
    before the service starts (its engine loads them as it starts)."""
    async with open_database(url, timeout=120.0) as db:
        for start in range(0, len(requests), chunk):
            results, _ = await writes.create_positions(
                db, requests[start : start + chunk], max_open_per_user=10**9
            )
            bad = [r for r in results if isinstance(r, Exception)]
            if bad:
                raise RuntimeError(f"seeding failed: {bad[0]}")
        await db.execute("UPDATE events SET published_at = now()")  # nothing to replay


# --- the service as its own process -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def python_path() -> str:
    """``PYTHONPATH`` for a child that runs a module of ``bench``: this checkout first, then
    whatever the caller's was (so a run from an exported tree keeps its own ``tickguard``)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def raise_open_files(wanted: int = 65_536) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE toward ``wanted`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@attrs.define
class Server:
    """A running ``tickguard serve`` subprocess and what it logged, with arrival times."""

    process: trio.Process
    base_url: str
    spawned_at: float  # time.perf_counter() just before the spawn
    lines: list[tuple[float, str]] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def ws_base(self) -> str:
        return self.base_url.replace("http://", "ws://", 1)

    async def wait_for_line(self, fragment: str, timeout: float = SERVE_READY_S) -> float:
        """The perf_counter time the first log line containing ``fragment`` arrived."""
        with trio.fail_after(timeout):
            while True:
                for at, line in self.lines:
                    if fragment in line:
                        return at
                if self.process.returncode is not None:
                    raise RuntimeError(f"tickguard serve exited: {self.tail()}")
                await self._changed.wait()

    def tail(self, n: int = 20) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def rss_bytes(self) -> int:
        """Resident memory of the server process now (from /proc)."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for chunk in self.process.stderr:
            now = time.perf_counter()
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                self.lines.append((now, line.decode(errors="replace")))
            self._changed.set()
            self._changed = trio.Event()
        self._changed.set()


@asynccontextmanager
async def serve_subprocess(
    database_url: str,
    coinbase_url: str,
    *,
    module: str = "tickguard",
    wait_engine: bool = True,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Server]:
    """Run ``python -m <module> serve`` (``tickguard`` by default) against ``database_url`` and
    the simulator at ``coinbase_url``; yields once /ready answers and, when ``wait_engine``, the
    BTC-USD engine has loaded. SIGTERM and wait on exit."""
    port = free_port()
    environ = {
        **os.environ,
        "DATABASE_URL": database_url,
        "COINBASE_WS_URL": coinbase_url,
        "COINBASE_PRODUCTS": "BTC-USD",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "info",
        "LOG_FORMAT": "text",
        "MAX_OPEN_POSITIONS_PER_USER": "100000",
        # One client address and few users drive thousands of requests a second: the rate
        # limits (web/identity.py) would measure themselves, not the service.
        "RATE_LIMIT_PER_USER": "0",
        "RATE_LIMIT_PER_ADDRESS": "0",
        **(env or {}),
    }
    args = [sys.executable, "-m", module, "serve"]
    spawned_at = time.perf_counter()
    process = await trio.lowlevel.open_process(
        args, env=environ, cwd="/", stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    server = Server(process, f"http://127.0.0.1:{port}", spawned_at)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._read_log)
            await server.wait_for_line("listening on")
            if wait_engine:
                await server.wait_for_line("engine BTC-USD started")
            await wait_ready(server.base_url)
            profiler = await _start_profiler(process.pid)
            try:
                yield server
            finally:
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                    await profiler.wait()
                process.terminate()
                with trio.move_on_after(30):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    finally:
        if process.returncode is None:
            process.kill()


async def _start_profiler(pid: int) -> trio.Process | None:
    """With BENCH_PYSPY=DIR set, sample the server with py-spy (collapsed stacks, one file per
    server start) until it stops: how BENCHMARKS.md's profiles were taken."""
    out_dir = os.environ.get("BENCH_PYSPY")
    if not out_dir:
        return None
    os.makedirs(out_dir, exist_ok=True)  # noqa: ASYNC230 - before anything is measured
    out = os.path.join(out_dir, f"serve-{pid}.txt")
    py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return await trio.lowlevel.open_process(
        [py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_ready(base_url: str, product: str = "BTC-USD") -> None:
    """Until /ready answers 200 with the product live in the feed."""
    async with httpx.AsyncClient(base_url=base_url) as http:
        with trio.fail_after(SERVE_READY_S):
            while True:
                try:
                    response = await http.get("/ready")
                    body = response.json()
                    state = body.get("feed", {}).get("products", {}).get(product, {})
                    if response.status_code == 200 and state.get("state") == "live":
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                await trio.sleep(0.05)


# --- results ------------------------------------------------------------------------------------


def write_result(
    ctx: Context,
    name: str,
    *,
    params: dict[str, Any],
    figures: Sequence[Figure],
    data: dict[str, Any],
    pg: dict[str, str] | None,
    started: float,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``<json_dir>/<name>.json`` and print the benchmark's table."""
    flags = list(notes)
    if pg and (pg.get("synchronous_commit") == "off" or pg.get("fsync") == "off"):
        flags.append("WEAK DURABILITY: synchronous_commit or fsync is off; figures not valid")
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        # The load average counts this benchmark's own processes too; above the CPU count,
        # something else was competing for the cores.
        flags.append(f"machine busy at the end of the run (1-min load {load:.2f}): noisy")
    result = {
        "bench": name,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 2),
        "params": params,
        "figures": [attrs.asdict(f) for f in figures],
        "data": data,
        "machine": machine(),
        "postgres": pg,
        "flags": flags,
    }
    ctx.json_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.json_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\n== {name} ({result['duration_s']} s) -> {path}")
    print(f"  {'figure':<52} {'value':>14} {'unit':<8} {'target':<16}")
    for figure in figures:
        print(figure.row())
    for flag in flags:
        print(f"  ! {flag}")
    return path


def plot_path(ctx: Context, name: str) -> Path:
    ctx.plots_dir.mkdir(parents=True, exist_ok=True)
    return ctx.plots_dir / f"{name}.png"


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- WebSocket clients --------------------------------------------------------------------------


@attrs.define
class Listener:
    """One user's /ws session in the load generator: when each position.closed arrived."""

    user: str
    closed_at: dict[str, float] = attrs.field(factory=dict)  # position id -> perf_counter
    ready: trio.Event = attrs.field(factory=trio.Event)

    async def listen(
        self,
        ws_base: str,
        *,
        stalled: bool = False,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect, wait for connection.ready, then record every position.closed until
        cancelled. A ``stalled`` session reads nothing after connection.ready (its socket
        buffers fill and the server must not let that slow anyone else)."""
        import trio_websocket

        from tickguard.wire import loads

        async with trio_websocket.open_websocket_url(
            f"{ws_base}/ws?userId={self.user}", message_queue_size=1
        ) as ws:
            while loads(await ws.get_message()).get("type") != "connection.ready":
                pass
            self.ready.set()
            task_status.started()
            if stalled:
                await trio.sleep_forever()
            while True:
                message = await ws.get_message()
                now = time.perf_counter()
                event = loads(message)
                if event.get("type") == "position.closed":
                    self.closed_at[event["position"]["id"]] = now


async def connect_listeners(
    nursery: trio.Nursery,
    ws_base: str,
    users: Sequence[str],
    *,
    concurrency: int = 100,
    stalled: frozenset[str] = frozenset(),
) -> list[Listener]:
    """Open one session per user (``concurrency`` handshakes at a time); returns once every
    session has had its connection.ready. The sessions live in ``nursery``."""
    listeners = [Listener(user) for user in users]
    limit = trio.CapacityLimiter(concurrency)

    async def one(listener: Listener) -> None:
        async with limit:
            await nursery.start(
                functools.partial(listener.listen, ws_base, stalled=listener.user in stalled)
            )

    with trio.fail_after(max(60.0, len(users) / 20)):
        async with trio.open_nursery() as connecting:
            for listener in listeners:
                connecting.start_soon(one, listener)
    return listeners


async def wait_closed(listeners: Sequence[Listener], expected: int, timeout: float) -> None:
    """Until the listeners together received ``expected`` position.closed events."""
    with trio.fail_after(timeout):
        while sum(len(x.closed_at) for x in listeners) < expected:  # noqa: ASYNC110
            # Plain dicts that nobody signals; the figures use the recorded receipt times, so
            # this polling period never enters them.
            await trio.sleep(0.002)
