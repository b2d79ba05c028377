"""Fault injection inside one process: the whole tree on the test database, fed by the
simulator, with a fault injected for real at a named point or on the feed's socket.

Each scenario ends with an audit of the database (every triggered position closed exactly
once, with exactly one position.closed event; untouched positions still open; per-user seqs
without gap or duplicate) and of every connected session (one position.closed per position,
seqs that go up by one). Figures go to ``build/fault-figures.json`` (see fault_helpers).
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from fault_helpers import (
    GUARD_S,
    Figures,
    Run,
    all_closed,
    arm_timed_raise,
    audit,
    audit_stream,
    create_many,
    faulty_service,
    long_with_stop,
    seeds,
    until,
)
from service_harness import event_stream, wait_until_live
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

from tickguard.actors.fanout import FanoutConfig
from tickguard.actors.faults import FaultPoints
from tickguard.config import Settings
from tickguard.sim import open_simulator
from tickguard.storage import Database
from tickguard.supervisor import serve

SEEDS = seeds(1, 2)
CRASH_POINTS = (
    "persistence.after_commit",
    "persistence.before_mark_published",
    "engine.before_close_batch",
    "engine.after_close_reply",
    "feed.before_batch",
)


@pytest.fixture(scope="module")
def figures() -> Iterator[Figures]:
    collected = Figures()
    yield collected
    collected.flush()


def cascade_bodies(rng: random.Random, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``n`` long positions with stops 64000.. (alice and bob at random) and a few far away."""
    users = ("alice", "bob")
    triggered = [long_with_stop(rng.choice(users), str(64000 + i)) for i in range(n)]
    untouched = [long_with_stop(users[i % 2], "60000") for i in range(6)]
    return triggered, untouched


def ids_of(positions: list[dict[str, Any]], user: str | None = None) -> list[str]:
    return [p["id"] for p in positions if user is None or p["userId"] == user]


# --------------------------------------------------------------------- crashes inside actors
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("point", CRASH_POINTS)
async def test_a_crash_at_each_point_of_a_stop_cascade_closes_each_exactly_once(
    db: Database, figures: Figures, point: str, seed: int
) -> None:
    rng = random.Random(f"{point}/{seed}")
    times = rng.randint(1, 3)
    faults = FaultPoints()
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        async with faulty_service(db, sim, faults=faults) as service:
            await wait_until_live(service)
            async with (
                event_stream(service, "alice") as alice,
                event_stream(service, "bob") as bob,
            ):
                wanted, spared = cascade_bodies(rng, 200)
                triggered = await create_many(service.http, wanted)
                untouched = await create_many(service.http, spared)
                created = len(triggered) + len(untouched)
                with trio.fail_after(GUARD_S):
                    while (
                        len(alice.of_type("position.created"))
                        + len(bob.of_type("position.created"))
                        < created
                    ):
                        await trio.sleep(0.01)
                fired: list[float] = []
                arm_timed_raise(faults, point, fired, times)
                # One tick through every stop, or two ticks (the upper half first).
                if rng.random() < 0.5:
                    sim.publish("BTC-USD", "64099.5")
                sim.publish("BTC-USD", "63900")
                await until(lambda: all_closed(db, ids_of(triggered)))
                recovered = trio.current_time()
                for stream, user in ((alice, "alice"), (bob, "bob")):
                    await stream.wait_for(
                        "position.closed", len(ids_of(triggered, user)), timeout=GUARD_S
                    )
                await until(_outbox_empty(db))
            # The later hits may not come: the cascade can be over before they would.
            injected = faults.fired.get(point, 0)
            assert 1 <= injected <= times, faults.fired
            result = await audit(db, ids_of(triggered), ids_of(untouched))
            streams = [
                audit_stream(alice, ids_of(triggered, "alice")),
                audit_stream(bob, ids_of(triggered, "bob")),
            ]
    run = figures.record(
        Run("crash inside an actor", f"{point} seed {seed}", faults_injected=injected)
    )
    run.add_audit(result)
    for stream_audit in streams:
        run.add_stream(stream_audit)
    run.recovery_s = round(recovered - fired[0], 3)
    result.assert_clean()
    for stream_audit in streams:
        stream_audit.assert_clean()


def _outbox_empty(db: Database) -> Any:
    async def check() -> bool:
        return bool(
            await db.fetchval("SELECT count(*) FROM events WHERE published_at IS NULL") == 0
        )

    return check


async def test_a_fanout_crash_closes_sessions_1012_and_a_reconnect_resyncs(
    db: Database, figures: Figures
) -> None:
    faults = FaultPoints()
    rng = random.Random(7)
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        async with faulty_service(db, sim, faults=faults) as service:
            await wait_until_live(service)
            wanted, _ = cascade_bodies(rng, 100)
            for body in wanted:
                body["userId"] = "alice"
            async with event_stream(service, "alice") as before:
                triggered = await create_many(service.http, wanted)
                await before.wait_for("position.created", len(triggered))
                fired: list[float] = []
                arm_timed_raise(faults, "fanout.before_deliver", fired)
                sim.publish("BTC-USD", "63900")
                with trio.fail_after(GUARD_S):
                    while before.ws.closed is None:
                        await trio.sleep(0.01)
                assert before.ws.closed.code == 1012
            await until(lambda: all_closed(db, ids_of(triggered)))
            recovered = trio.current_time()
            # The client reconnects and resyncs: its REST state has every close; the events
            # that follow arrive once each.
            async with event_stream(service, "alice") as after:
                response = await service.http.get(
                    "/api/positions/closed", params={"userId": "alice", "limit": 200}
                )
                assert response.status_code == 200, response.text
                assert {p["id"] for p in response.json()["data"]} >= set(ids_of(triggered))
                [late] = await create_many(service.http, [long_with_stop("alice", "63800")])
                sim.publish("BTC-USD", "63700")
                await after.wait_for("position.closed", 1)
                await until(_outbox_empty(db))
                stream_result = audit_stream(after, [late["id"]])
            result = await audit(db, [*ids_of(triggered), late["id"]])
    run = figures.record(Run("fanout crash (sessions 1012, resync)", faults_injected=1))
    run.add_audit(result)
    run.add_stream(stream_result)
    run.recovery_s = round(recovered - fired[0], 3)
    result.assert_clean()
    stream_result.assert_clean()
    assert stream_result.closed_events == 1


# --------------------------------------------------------------------- feed faults
async def _ready_feed_state(service: Any) -> str:
    response = await service.http.get("/ready")
    state: str = response.json()["feed"]["products"]["BTC-USD"]["state"]
    return state


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fault", ("drop", "stall", "malformed", "refuse"))
async def test_the_feed_recovers_from_each_socket_fault_and_closes_what_crossed(
    db: Database, figures: Figures, fault: str, seed: int
) -> None:
    rng = random.Random(f"{fault}/{seed}")
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.1) as sim:
        async with faulty_service(
            db, sim, ws_heartbeat_timeout_ms=500, ws_reconnect_base_ms=20, ws_reconnect_max_ms=200
        ) as service:
            await wait_until_live(service)
            async with event_stream(service, "alice") as alice:
                wanted = [long_with_stop("alice", str(64000 + i)) for i in range(60)]
                spared = [long_with_stop("alice", "60000") for _ in range(4)]
                triggered = await create_many(service.http, wanted)
                untouched = await create_many(service.http, spared)
                await alice.wait_for("position.created", 64)
                injected_at = trio.current_time()
                outage_seen = False
                if fault == "malformed":
                    # Garbage between good tickers: counted, skipped, the feed stays live.
                    for price in ("64500", "64049.5", "63900"):
                        sim.send_malformed(rng.randint(5, 20))
                        sim.publish("BTC-USD", price)
                    sim.send_unknown(3)
                else:
                    refuse_s = rng.uniform(0.8, 1.5)
                    sim.refuse_connections(refuse_s)
                    if fault == "stall":
                        sim.stall(refuse_s + 1.0)  # silent: no tickers, no heartbeats
                    else:
                        sim.drop_all()
                    if fault == "drop":
                        sim.refuse_connections(0)  # reconnects at once: outage may be short
                    # /ready reports the outage while it lasts (not for a bare drop, which
                    # may heal before anyone could look).
                    if fault != "drop":
                        with trio.fail_after(GUARD_S):
                            while await _ready_feed_state(service) == "live":
                                await trio.sleep(0.02)
                        outage_seen = True
                    sim.publish("BTC-USD", "63900")  # into the outage: only the replay counts
                await until(lambda: all_closed(db, ids_of(triggered)))
                recovered = trio.current_time()
                await wait_until_live(service)
                assert await _ready_feed_state(service) == "live"
                await alice.wait_for("position.closed", 60, timeout=GUARD_S)
                await until(_outbox_empty(db))
                stream_result = audit_stream(alice, ids_of(triggered))
            snapshot = service.tree.feed_status.snapshot()
            result = await audit(db, ids_of(triggered), ids_of(untouched))
    if fault == "malformed":
        assert snapshot["malformed"] >= 15 and snapshot["unknown"] >= 1
        assert snapshot["reconnects"] == 0  # skipped, never a reason to drop the connection
    else:
        assert snapshot["reconnects"] >= 1
        assert outage_seen or fault == "drop"
    run = figures.record(Run(f"feed: {fault}", f"seed {seed}", faults_injected=1))
    run.add_audit(result)
    run.add_stream(stream_result)
    run.recovery_s = round(recovered - injected_at, 3)
    result.assert_clean()
    stream_result.assert_clean()


# --------------------------------------------------------------------- a client that stops reading
class _SilentClient:
    """A WebSocket client with a tiny receive buffer that reads nothing after the handshake."""

    def __init__(self, sock: trio.socket.SocketType, ws: WSConnection) -> None:
        self.sock = sock
        self.ws = ws

    @classmethod
    async def connect(cls, base_url: str, user: str) -> _SilentClient:
        host, port = base_url.removeprefix("http://").rsplit(":", 1)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        ws = WSConnection(ConnectionType.CLIENT)
        await sock.send(ws.send(Request(host=f"{host}:{port}", target=f"/ws?userId={user}")))
        with trio.fail_after(GUARD_S):
            while not any(isinstance(e, AcceptConnection) for e in ws.events()):
                data = await sock.recv(4096)
                assert data, "the server closed before accepting"
                ws.receive_data(data)
        return cls(sock, ws)

    async def close_code(self) -> int | None:
        """Read everything the server sent (now reading again) until its close frame."""
        with trio.fail_after(GUARD_S):
            while True:
                data = await self.sock.recv(65536)
                if not data:
                    return None
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, CloseConnection):
                        return event.code


async def test_a_client_that_stops_reading_is_closed_1013_and_nobody_else_waits(
    db: Database, figures: Figures
) -> None:
    config = FanoutConfig(queue_bytes=16 * 1024)
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        async with faulty_service(db, sim, fanout_config=config) as service:
            await wait_until_live(service)
            silent = await _SilentClient.connect(service.base_url, "alice")
            async with event_stream(service, "alice") as alice, event_stream(service, "bob") as bob:
                rng = random.Random(3)
                wanted, _ = cascade_bodies(rng, 600)
                triggered = await create_many(service.http, wanted)
                await until(lambda: _fanout_caught_up(service, config, 600))
                injected_at = trio.current_time()
                sim.publish("BTC-USD", "63900")
                await until(lambda: all_closed(db, ids_of(triggered)))
                recovered = trio.current_time()
                for stream, user in ((alice, "alice"), (bob, "bob")):
                    await stream.wait_for("position.closed", len(ids_of(triggered, user)))
                await until(_outbox_empty(db))
                streams = [
                    audit_stream(alice, ids_of(triggered, "alice")),
                    audit_stream(bob, ids_of(triggered, "bob")),
                ]
            code = await silent.close_code()
            silent.sock.close()
            result = await audit(db, ids_of(triggered))
    assert config.stats.dropped_slow == 1
    assert code == 1013
    run = figures.record(Run("slow WebSocket client (1013)", faults_injected=1))
    run.add_audit(result)
    for stream_audit in streams:
        run.add_stream(stream_audit)
    run.recovery_s = round(recovered - injected_at, 3)
    result.assert_clean()
    for stream_audit in streams:
        stream_audit.assert_clean()


async def _fanout_caught_up(service: Any, config: FanoutConfig, events: int) -> bool:
    return config.stats.events >= events and service.tree.fanout_box.pending() == 0


# --------------------------------------------------------------------- bad frames on /ws
@pytest.mark.parametrize("seed", SEEDS)
async def test_random_bytes_and_oversized_frames_on_ws_only_end_their_own_session(
    db: Database, figures: Figures, seed: int
) -> None:
    rng = random.Random(seed)
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        async with faulty_service(db, sim) as service:
            await wait_until_live(service)
            sent = 0
            async with (
                event_stream(service, "alice") as alice,
                event_stream(service, "alice") as noisy,
                trio_websocket.open_websocket_url(service.ws_url("alice")) as huge,
            ):
                await huge.get_message()  # connection.ready
                for _ in range(200):
                    if rng.random() < 0.5:
                        await noisy.ws.send_message(rng.randbytes(rng.randint(0, 2048)))
                    else:
                        text = "".join(
                            chr(rng.randint(1, 0xD7FF)) for _ in range(rng.randint(0, 300))
                        )
                        await noisy.ws.send_message(text)
                    sent += 1
                await huge.send_message(b"x" * (64 * 1024 + rng.randint(1, 4096)))
                sent += 1
                with trio.fail_after(GUARD_S):
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        while True:
                            await huge.get_message()
                assert closed.value.reason.code == 1009
                wanted = [long_with_stop("alice", str(64000 + i)) for i in range(50)]
                triggered = await create_many(service.http, wanted)
                sim.publish("BTC-USD", "63900")
                await until(lambda: all_closed(db, ids_of(triggered)))
                await alice.wait_for("position.closed", 50)
                await noisy.wait_for("position.closed", 50)
                await noisy.ws.send_message('{"type": "ping"}')
                await noisy.wait_for("pong")
                await until(_outbox_empty(db))
                streams = [audit_stream(s, ids_of(triggered)) for s in (alice, noisy)]
            result = await audit(db, ids_of(triggered))
    run = figures.record(Run("random bytes / oversized frames on /ws", f"seed {seed}"))
    run.fuzz_cases = sent
    run.faults_injected = sent
    run.add_audit(result)
    for stream_audit in streams:
        run.add_stream(stream_audit)
    result.assert_clean()
    for stream_audit in streams:
        stream_audit.assert_clean()


# --------------------------------------------------------------------- the intensity limit
async def test_a_child_crashing_in_a_loop_ends_serve_non_zero_naming_it(
    db: Database, database_url: str, figures: Figures, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    faults = FaultPoints()
    faults.raise_at("fanout.before_deliver", times=1000)  # every event crashes fanout
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        settings = Settings(
            host="127.0.0.1",
            port=0,
            database_url=database_url,
            coinbase_ws_url=sim.url,
            coinbase_products=("BTC-USD",),
            shutdown_grace_ms=2000,
        )
        code: list[int] = []
        started = trio.current_time()
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:

                async def run_serve(*, task_status: trio.TaskStatus[Any]) -> None:
                    code.append(await serve(settings, faults=faults, task_status=task_status))

                tree = await nursery.start(run_serve)
                async with httpx.AsyncClient(base_url=tree.urls[0], timeout=10) as http:
                    for i in range(12):
                        try:
                            await http.post(
                                "/api/positions", json=long_with_stop("alice", f"{60000 + i}")
                            )
                        except httpx.TransportError:
                            break  # the process is going down: that is the point
        ended = trio.current_time()
    assert code == [1]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in errors)
    assert "fanout" in text and "giving up" in text
    assert any(r.exc_info and "InjectedFault" in repr(r.exc_info[1]) for r in errors), (
        "the last error is in the log"
    )
    run = figures.record(Run("restart intensity exceeded (exit 1)"))
    run.faults_injected = faults.fired.get("fanout.before_deliver", 0)
    run.recovery_s = round(ended - started, 3)  # here: time until the process gave up
