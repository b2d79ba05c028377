"""Split roles (issue 17): api, engine and gateway as separate processes of one binary.

Every scenario runs real ``python -m tickguard serve --role …`` processes on one PostgreSQL
database of their own and one Redis (``TEST_REDIS_URL`` or a ``redis-server`` the test
starts), fed by the Coinbase-protocol simulator over real sockets. The engine lease TTL is
shrunk so that a takeover fits a test; timing bounds are hang guards only.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from fault_helpers import audit, long_with_stop, until
from service_harness import event_stream
from test_faults_process import Tickguard, tickguard_process

from tickguard.sim import Simulator, open_simulator
from tickguard.storage import Database, open_database
from tickguard.wire import loads

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

LEASE_TTL_MS = 1500


@attrs.define
class Node:
    """One role process and how to reach it."""

    process: Tickguard
    http: httpx.AsyncClient

    @property
    def base_url(self) -> str:
        return self.process.base_url

    def ws_url(self, user_id: str, since: int | None = None) -> str:
        url = self.base_url.replace("http://", "ws://", 1) + f"/ws?userId={user_id}"
        return url if since is None else f"{url}&since={since}"

    async def ready(self) -> dict[str, Any]:
        response = await self.http.get("/ready")
        body: dict[str, Any] = loads(response.content)
        return body

    async def create(self, body: dict[str, Any]) -> httpx.Response:
        return await self.http.post("/api/positions", json=body)


@attrs.define
class Deployment:
    database_url: str
    redis_url: str
    sim: Simulator
    logs: Path
    stack: AsyncExitStack
    nodes: dict[str, Node] = attrs.field(factory=dict)

    async def start(self, name: str, role: str, **env: str) -> Node:
        process = await self.stack.enter_async_context(
            tickguard_process(
                self.database_url,
                self.sim,
                self.logs / f"{name}.log",
                TICKGUARD_ROLE=role,
                REDIS_URL=self.redis_url,
                ENGINE_LEASE_TTL_MS=str(LEASE_TTL_MS),
                ENGINE_ID=name,
                WS_HEARTBEAT_TIMEOUT_MS="3000",
                **{"ENGINE_PARTITIONS": "1", **env},  # stage 2: one lease, a leader
            )
        )
        http = await self.stack.enter_async_context(
            httpx.AsyncClient(base_url=process.base_url, timeout=10)
        )
        node = self.nodes[name] = Node(process, http)
        return node

    async def start_all(self, *nodes: tuple[str, str]) -> None:
        """Start ``(name, role)`` processes side by side."""
        async with trio.open_nursery() as nursery:
            for name, role in nodes:
                nursery.start_soon(self.start, name, role)

    async def leader(self) -> str:
        """The engine process that holds the lease (waits for one)."""
        found: list[str] = []

        async def one_leads() -> bool:
            found.clear()
            for name, node in self.nodes.items():
                if node.process.process.poll() is not None:
                    continue
                body = await node.ready()
                if body.get("engine", {}).get("leader"):
                    found.append(name)
            return len(found) == 1

        await until(one_leads, timeout=30)
        return found[0]


@asynccontextmanager
async def deployment(
    database_url: str, redis_url: str, logs: Path, *, price: str = "65000"
) -> AsyncIterator[Deployment]:
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            open_simulator({"BTC-USD": price}, heartbeat_interval=0.2)
        )
        yield Deployment(database_url, redis_url, sim, logs, stack)


async def _all_closed(db: Database, ids: list[str]) -> bool:
    count = await db.fetchval(
        "SELECT count(*) FROM positions WHERE id::text = ANY($1::text[]) AND status = 'closed'",
        ids,
    )
    return int(count) == len(ids)


async def _watching(node: Node, symbol: str = "BTC-USD") -> float:
    """The engine's open positions of ``symbol`` as its /metrics says (0 before it has any)."""
    text = (await node.http.get("/metrics")).text
    prefix = f'tickguard_positions_open{{symbol="{symbol}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


async def test_creates_through_two_api_processes_reach_a_gateway_session_once_each_in_seq_order(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    async with deployment(own_database, redis_url, tmp_path) as d:
        await d.start_all(
            ("engine-a", "engine"),
            ("api-1", "api"),
            ("api-2", "api"),
            ("gateway", "gateway"),
            ("gateway-2", "gateway"),
        )
        await d.leader()
        gateway, apis = d.nodes["gateway"], [d.nodes["api-1"], d.nodes["api-2"]]
        # Each process answers its own roles' routes only.
        assert (await gateway.http.get("/api/positions", params={"userId": "a"})).status_code == 404
        assert "gateway" not in (await apis[0].ready())["roles"]
        async with (
            event_stream(gateway, "alice") as stream,  # type: ignore[arg-type]
            event_stream(d.nodes["gateway-2"], "alice") as other,  # type: ignore[arg-type]
        ):
            ids: list[str] = []

            async def create(i: int) -> None:
                response = await apis[i % 2].create(long_with_stop("alice", "60000"))
                assert response.status_code == 201, response.text
                ids.append(loads(response.content)["data"]["id"])

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(create, i)
            # A manual close through the other api process is delivered too.
            closed = await apis[1].http.post(
                f"/api/positions/{ids[0]}/close", json={"userId": "alice", "closePrice": "64000"}
            )
            assert closed.status_code == 200, closed.text
            created = await stream.wait_for("position.created", 20, timeout=30)
            await stream.wait_for("position.closed", 1, timeout=30)
            await other.wait_for("position.closed", 1, timeout=30)
        assert sorted(m["position"]["id"] for m in created) == sorted(ids)
        # On each gateway: gap-free, no duplicate, in order, and the same messages.
        for session in (stream, other):
            seqs = [m["seq"] for m in session.messages if m["type"].startswith("position.")]
            assert seqs == list(range(1, 22))
        assert stream.messages[1:] == other.messages[1:]
        # An omitted entryPrice takes the price the engine published (the simulator's).
        body = long_with_stop("bob", "60000")
        del body["entryPrice"]

        async def priced() -> bool:
            response = await apis[0].create(body)
            if response.status_code == 201:
                assert loads(response.content)["data"]["entryPrice"] == Decimal("65000")
                return True
            assert response.status_code == 400, response.text
            return False

        await until(priced, timeout=30, poll=0.2)


async def test_kill_9_of_the_gateway_then_a_resume_by_since_loses_nothing(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    async with deployment(own_database, redis_url, tmp_path) as d:
        await d.start_all(("engine-a", "engine"), ("api", "api"), ("gateway", "gateway"))
        api, gateway = d.nodes["api"], d.nodes["gateway"]
        async with event_stream(gateway, "carol") as stream:  # type: ignore[arg-type]
            for _ in range(5):
                assert (await api.create(long_with_stop("carol", "60000"))).status_code == 201
            await stream.wait_for("position.created", 5, timeout=30)
            gateway.process.process.send_signal(signal.SIGKILL)
            with trio.fail_after(10):
                await gateway.process.process.wait()
        last_seen = max(m["seq"] for m in stream.of_type("position.created"))
        for _ in range(5):  # while no gateway runs
            assert (await api.create(long_with_stop("carol", "60000"))).status_code == 201
        again = await d.start("gateway-2", "gateway")

        class Resume:
            def ws_url(self, user: str) -> str:
                return again.ws_url(user, since=last_seen)

        async with event_stream(Resume(), "carol") as resumed:  # type: ignore[arg-type]
            ready = resumed.of_type("connection.ready")[0]
            assert ready["replayComplete"] is True
            replayed = await resumed.wait_for("position.created", 5, timeout=30)
            assert [m["seq"] for m in replayed] == list(range(last_seen + 1, last_seen + 6))
            # Live events follow the replay without a gap.
            assert (await api.create(long_with_stop("carol", "60000"))).status_code == 201
            live = await resumed.wait_for("position.created", 6, timeout=30)
            assert live[-1]["seq"] == last_seen + 6


async def test_kill_9_of_the_engine_leader_while_stops_are_crossed_the_standby_closes_each_once(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    async with (
        deployment(own_database, redis_url, tmp_path) as d,
        open_database(own_database) as db,
    ):
        await d.start_all(("engine-a", "engine"), ("engine-b", "engine"), ("api", "api"))
        leader = await d.leader()
        standby = "engine-b" if leader == "engine-a" else "engine-a"
        api = d.nodes["api"]
        triggered: list[str] = []
        for i in range(200):
            response = await api.create(long_with_stop("dave", str(64000 + i)))
            assert response.status_code == 201, response.text
            triggered.append(loads(response.content)["data"]["id"])
        untouched = []
        for _ in range(3):
            response = await api.create(long_with_stop("erin", "60000"))
            untouched.append(loads(response.content)["data"]["id"])

        async def all_watched() -> bool:
            return await _watching(d.nodes[leader]) == 203

        await until(all_watched, timeout=30)
        # The price walks down through the stops; the leader dies in the middle, and the rest
        # of the walk happens while no engine holds the lease (recovered from the watermark).
        for step in range(20):
            d.sim.publish("BTC-USD", str(64195 - 10 * step))
            if step == 8:
                d.nodes[leader].process.process.send_signal(signal.SIGKILL)
        d.sim.publish("BTC-USD", "63990")

        await until(partial(_all_closed, db, triggered), timeout=60)
        assert await d.leader() == standby
        result = await audit(db, triggered, untouched)
        result.assert_clean()


async def test_a_paused_leader_is_fenced_and_never_closes_twice(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    async with (
        deployment(own_database, redis_url, tmp_path) as d,
        open_database(own_database) as db,
    ):
        await d.start_all(("engine-a", "engine"), ("engine-b", "engine"), ("api", "api"))
        leader = await d.leader()
        paused = d.nodes[leader]
        triggered = []
        for i in range(50):
            response = await d.nodes["api"].create(long_with_stop("frank", str(64000 + i)))
            triggered.append(loads(response.content)["data"]["id"])

        async def watched() -> bool:
            return await _watching(paused) == 50

        await until(watched, timeout=30)
        paused.process.process.send_signal(signal.SIGSTOP)
        try:
            # The crossing reaches the paused leader's socket too; the standby takes over.
            d.sim.publish("BTC-USD", "63990")

            await until(partial(_all_closed, db, triggered), timeout=60)
        finally:
            paused.process.process.send_signal(signal.SIGCONT)
        # Resumed, the old leader finds itself fenced: it drops to standby, closes nothing.
        others = [
            name for name in d.nodes if name.startswith("engine") and d.nodes[name] is not paused
        ]

        async def stood_down() -> bool:
            return not (await paused.ready()).get("engine", {}).get("leader")

        await until(stood_down, timeout=30)
        assert await d.leader() == others[0]
        # Both say so in /metrics: the old leader counts a partition lost and holds none.
        old = (await paused.http.get("/metrics")).text
        assert "tickguard_engine_lease_partitions_held 0.0" in old
        assert 'tickguard_engine_lease_changes_total{change="lost"} 1.0' in old
        new = (await d.nodes[others[0]].http.get("/metrics")).text
        assert "tickguard_engine_lease_partitions_held 1.0" in new
        result = await audit(db, triggered)
        result.assert_clean()


async def test_the_open_position_cap_holds_across_api_processes(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    async with deployment(own_database, redis_url, tmp_path) as d:
        async with trio.open_nursery() as nursery:
            for name in ("api-1", "api-2"):
                nursery.start_soon(
                    lambda n=name: d.start(n, "api", MAX_OPEN_POSITIONS_PER_USER="5")
                )
        statuses: list[int] = []

        async def create(i: int) -> None:
            node = d.nodes["api-1" if i % 2 else "api-2"]
            statuses.append((await node.create(long_with_stop("gina", "60000"))).status_code)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(create, i)
        assert sorted(statuses) == [201] * 5 + [400] * 15, statuses


async def test_redis_restarted_mid_run_loses_nothing(
    own_database: str, own_redis: Any, tmp_path: Path
) -> None:
    """Redis carries only wake-ups and last prices: while it is down, creates still reach the
    gateway's sessions (the follower polls the log) and the engine still watches and closes
    them; once it is back, wake-ups resume."""
    async with (
        deployment(own_database, own_redis.url, tmp_path) as d,
        open_database(own_database) as db,
    ):
        await d.start_all(("engine-a", "engine"), ("api", "api"), ("gateway", "gateway"))
        leader = d.nodes[await d.leader()]
        api, gateway = d.nodes["api"], d.nodes["gateway"]
        async with event_stream(gateway, "hana") as stream:  # type: ignore[arg-type]
            created: list[str] = []
            for phase in range(3):  # before, during and after the outage
                if phase == 1:
                    own_redis.stop()
                if phase == 2:
                    own_redis.start()
                for i in range(5):
                    response = await api.create(long_with_stop("hana", str(64000 + 10 * i)))
                    assert response.status_code == 201, response.text
                    created.append(loads(response.content)["data"]["id"])
                await stream.wait_for("position.created", len(created), timeout=30)

            async def all_watched() -> bool:
                return await _watching(leader) == len(created)

            await until(all_watched, timeout=30)
            d.sim.publish("BTC-USD", "63990")
            await stream.wait_for("position.closed", len(created), timeout=30)
        seqs = [m["seq"] for m in stream.messages if m["type"].startswith("position.")]
        assert seqs == list(range(1, 2 * len(created) + 1))
        result = await audit(db, created)
        result.assert_clean()


async def test_a_stop_crossed_right_after_a_create_through_api_closes_it(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    """Invariant 10 across processes: the engine learns of a create from the event log, maybe
    after it judged the trade that crosses the new stop; it judges the position against the
    windows newer than its creation (catch-up), so the stop closes it even though the price
    never crosses again."""
    async with (
        deployment(own_database, redis_url, tmp_path) as d,
        open_database(own_database) as db,
    ):
        await d.start_all(("engine-a", "engine"), ("api", "api"))
        leader = d.nodes[await d.leader()]
        api = d.nodes["api"]
        # A position the engine already watches keeps the symbol subscribed and live.
        await api.create(long_with_stop("ivan", "60000"))

        async def one_watched() -> bool:
            return await _watching(leader) == 1

        await until(one_watched, timeout=30)
        ids = []
        for _ in range(10):
            response = await api.create(long_with_stop("ivan", "64500"))
            assert response.status_code == 201, response.text
            ids.append(loads(response.content)["data"]["id"])
            # Crossed at once, then the price comes back above the stop for good.
            d.sim.publish("BTC-USD", "64400")
            d.sim.publish("BTC-USD", "65000")

        await until(partial(_all_closed, db, ids), timeout=30)
        (await audit(db, ids)).assert_clean()


async def test_an_api_process_checks_symbols_against_the_product_list_only(
    own_database: str, redis_url: str, tmp_path: Path
) -> None:
    """An api process has no feed to ask: a symbol Coinbase does not list is a 400, and while
    the list cannot be read a create is a 503; neither stores anything."""
    async with (
        deployment(own_database, redis_url, tmp_path) as d,
        open_database(own_database) as db,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.start, "api", "api")
            nursery.start_soon(
                lambda: d.start("blind-api", "api", COINBASE_REST_URL="http://127.0.0.1:1")
            )
        made_up = {**long_with_stop("jo", "60000"), "symbol": "FOO-BAR"}

        async def refused() -> bool:
            response = await d.nodes["api"].create(made_up)
            if response.status_code == 503:  # the list is being read
                return False
            assert response.status_code == 400, response.text
            assert "FOO-BAR is not a valid product" in response.text
            return True

        await until(refused, timeout=30)
        blind = await d.nodes["blind-api"].create(long_with_stop("jo", "60000"))
        assert blind.status_code == 503, blind.text
        assert blind.headers["Retry-After"]
        assert await db.fetchval("SELECT count(*) FROM positions") == 0
