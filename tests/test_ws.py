"""The /ws endpoint over real sockets (trio-websocket clients), with the real fanout and
persistence actors on the test database."""

from __future__ import annotations

import collections
import json
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    open_websocket_url,
)
from web_harness import (
    TEST_ORIGIN,
    Stack,
    make_settings,
    running_app,
    running_stack,
    services_without_database,
    ws_url,
)

from tickguard.actors.messages import Event
from tickguard.storage import Database
from tickguard.web.seq_reader import SeqReader

GUARD = 10  # seconds: a hang guard, never a speed assertion


async def _message(ws: Any) -> dict[str, Any]:
    with trio.fail_after(GUARD):
        message: dict[str, Any] = json.loads(await ws.get_message())
    return message


async def _closed_with(ws: Any) -> tuple[int, str | None]:
    """Read until the server closes; the close code and reason."""
    with trio.fail_after(GUARD):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as closed:
                return closed.reason.code, closed.reason.reason


async def _create(stack: Stack, user: str, **changes: Any) -> dict[str, Any]:
    body = {"userId": user, "symbol": "BTC-USD", "side": "long", "entryPrice": 100, **changes}
    async with httpx.AsyncClient(base_url=stack.base_url) as client:
        response = await client.post("/api/positions", json=body)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def test_upgrade_on_an_unknown_path_is_404_at_once(db: Database) -> None:
    async with running_stack(db) as stack:
        with trio.fail_after(GUARD), pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(stack.ws_url("alice", path="/nope")):
                pass
    assert rejected.value.status_code == 404


@pytest.mark.parametrize("query", ["", "?userId=", "?userId=a%0Ab", "?userId=" + "x" * 129])
async def test_without_a_valid_user_id_the_session_is_closed_1008(db: Database, query: str) -> None:
    async with running_stack(db) as stack:
        async with open_websocket_url(stack.ws_url() + query) as ws:
            code, reason = await _closed_with(ws)
    assert (code, reason) == (1008, "userId query param is required")
    assert stack.services.ws_stats.rejected == 1


async def test_ready_then_the_users_events_in_order(db: Database) -> None:
    async with running_stack(db) as stack:
        earlier = await _create(stack, "alice")  # seq 1, before the session
        async with open_websocket_url(stack.ws_url("alice")) as ws:
            ready = await _message(ws)
            assert ready == {
                "type": "connection.ready",
                "message": "realtime channel established",
                "seq": 1,
            }
            created = await _create(stack, "alice")
            event = await _message(ws)
            assert event["type"] == "position.created" and event["source"] == "api"
            assert event["seq"] == 2 and event["position"]["id"] == created["id"]
            async with httpx.AsyncClient(base_url=stack.base_url) as client:
                response = await client.post(
                    f"/api/positions/{earlier['id']}/close",
                    json={"userId": "alice", "closePrice": 101},
                )
            assert response.status_code == 200
            closed = await _message(ws)
            assert closed["type"] == "position.closed" and closed["seq"] == 3
            assert closed["position"]["id"] == earlier["id"]
            assert closed["position"]["closePrice"] == 101


async def test_sessions_never_see_other_users_events(db: Database) -> None:
    async with running_stack(db) as stack:
        async with (
            open_websocket_url(stack.ws_url("alice")) as alice,
            open_websocket_url(stack.ws_url("bob")) as bob,
        ):
            await _message(alice)
            await _message(bob)
            await _create(stack, "alice")
            await _create(stack, "alice")
            mine = await _create(stack, "bob")
            # Bob's first event is his own: alice's two, committed before, never reached him.
            event = await _message(bob)
            assert event["position"]["id"] == mine["id"] and event["position"]["userId"] == "bob"
            assert (await _message(alice))["position"]["userId"] == "alice"


async def test_ping_pong_and_ignored_frames(db: Database) -> None:
    async with running_stack(db) as stack:
        async with open_websocket_url(stack.ws_url("alice")) as ws:
            await _message(ws)
            for frame in ("hello", '{"type": "subscribe"}', "[1,2]", b"\x00\x01"):
                await ws.send_message(frame)
            await ws.send_message('{"type": "ping"}')
            assert await _message(ws) == {"type": "pong"}
    assert stack.services.ws_stats.ignored_frames == 4


async def test_a_frame_over_64_kib_closes_with_1009(db: Database) -> None:
    async with running_stack(db) as stack:
        async with open_websocket_url(stack.ws_url("alice")) as ws:
            await _message(ws)
            await ws.send_message("x" * (64 * 1024 + 1))
            code, _ = await _closed_with(ws)
    assert code == 1009


async def test_a_frame_of_exactly_64_kib_is_accepted(db: Database) -> None:
    async with running_stack(db) as stack:
        async with open_websocket_url(stack.ws_url("alice")) as ws:
            await _message(ws)
            await ws.send_message("x" * (64 * 1024))
            await ws.send_message('{"type":"ping"}')
            assert await _message(ws) == {"type": "pong"}


async def test_slow_consumer_closed_1013_while_another_session_gets_everything(
    db: Database,
) -> None:
    queue_bytes = 64 * 1024
    message = "y" * 8000
    async with running_stack(db, queue_bytes=queue_bytes) as stack:
        stats = stack.fanout_config.stats
        async with (
            open_websocket_url(stack.ws_url("alice")) as slow,
            open_websocket_url(stack.ws_url("alice")) as fast,
        ):
            await _message(slow)
            await _message(fast)
            received = 0
            seq = 0
            # The slow client reads nothing: its socket buffers fill, then its queue overflows.
            with trio.fail_after(60):
                while stats.dropped_slow == 0:
                    seq += 1
                    await stack.services.fanout.send(
                        Event(seq, "alice", seq, "position.created", f'"{message}{seq}"')
                    )
                    assert await fast.get_message() == f'"{message}{seq}"'
                    received += 1
            for _ in range(5):  # after the drop, the other session still gets each event
                seq += 1
                await stack.services.fanout.send(
                    Event(seq, "alice", seq, "position.created", f'"{seq}"')
                )
                assert await fast.get_message() == f'"{seq}"'
                received += 1
            assert received == seq
            code, reason = await _closed_with(slow)
    assert (code, reason) == (1013, "slow consumer")
    assert stats.dropped_slow == 1


async def test_shutdown_closes_sessions_with_1001(db: Database) -> None:
    stop = trio.Event()
    # A graceful timeout far beyond the guard: only closing the sessions lets this finish.
    async with running_stack(db, stop=stop, graceful_timeout=60) as stack:
        async with open_websocket_url(stack.ws_url("alice")) as ws:
            await _message(ws)
            stop.set()
            code, reason = await _closed_with(ws)
    assert (code, reason) == (1001, "server shutting down")


async def test_without_the_database_the_session_closes_1011(
    db: Database, database_url: str
) -> None:
    services = await services_without_database(database_url)
    async with running_app(services) as url:
        async with open_websocket_url(ws_url(url, "alice")) as ws:
            code, reason = await _closed_with(ws)
    assert (code, reason) == (1011, "database unavailable")


async def test_plain_http_on_the_websocket_path_says_to_upgrade(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        response = await client.get("/ws", params={"userId": "u1"})
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"
    assert "WebSocket" in response.json()["error"]


# ------------------------------------------------------------------- Origin (CSWSH, finding 3)
async def _ready_with_origin(url: str, origin: str) -> dict[str, Any]:
    async with open_websocket_url(url, extra_headers=[(b"Origin", origin.encode())]) as ws:
        return await _message(ws)


@pytest.mark.parametrize("origin", [TEST_ORIGIN, TEST_ORIGIN.upper(), "http://LOCALHOST:5173"])
async def test_an_origin_in_cors_origin_may_open_ws(db: Database, origin: str) -> None:
    async with running_stack(db) as stack:
        ready = await _ready_with_origin(stack.ws_url("alice"), origin)
    assert ready["type"] == "connection.ready"


async def test_the_servers_own_origin_may_open_ws(db: Database) -> None:
    """The dashboard served at ``/`` opens /ws from the server's own origin."""
    async with running_stack(db) as stack:
        ready = await _ready_with_origin(stack.ws_url("alice"), stack.base_url)
    assert ready["type"] == "connection.ready"


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "null",  # a sandboxed iframe or a file:// page
        "http://localhost:5174",  # the allowed host on another port
        "https://localhost:5173",  # the allowed host and port over another scheme
        "http://localhost:5173.evil.example",
        "not an origin",
    ],
)
async def test_another_origin_is_refused_403_at_the_handshake(db: Database, origin: str) -> None:
    async with running_stack(db) as stack:
        with trio.fail_after(GUARD), pytest.raises(ConnectionRejected) as rejected:
            await _ready_with_origin(stack.ws_url("alice"), origin)
        assert stack.services.ws_stats.opened == 0
    assert rejected.value.status_code == 403
    assert rejected.value.body is not None
    assert json.loads(rejected.value.body)["error"] == "This Origin may not open /ws."


async def test_an_origin_on_another_port_of_the_servers_host_is_refused(db: Database) -> None:
    async with running_stack(db) as stack:
        port = httpx.URL(stack.base_url).port
        assert port is not None
        with trio.fail_after(GUARD), pytest.raises(ConnectionRejected) as rejected:
            await _ready_with_origin(stack.ws_url("alice"), f"http://127.0.0.1:{port + 1}")
    assert rejected.value.status_code == 403


async def test_with_cors_origin_star_any_origin_may_open_ws(db: Database) -> None:
    async with running_stack(db, settings=make_settings(cors_origins=("*",))) as stack:
        ready = await _ready_with_origin(stack.ws_url("alice"), "http://evil.example")
    assert ready["type"] == "connection.ready"


# ----------------------------------------------------- a burst of sessions (finding 6)
async def test_the_seq_reader_answers_many_sessions_with_one_query(db: Database) -> None:
    async with running_stack(db) as stack:
        for user, count in (("burst-a", 3), ("burst-b", 1)):
            for _ in range(count):
                await _create(stack, user)
    reader = SeqReader(db)
    users = ["burst-a", "burst-b", "burst-none"] * 200
    answers: list[tuple[str, int]] = []

    async def ask(user: str) -> None:
        answers.append((user, await reader.latest(user)))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            for user in users:
                nursery.start_soon(ask, user)
    expected = {"burst-a": 3, "burst-b": 1, "burst-none": 0}
    assert sorted(answers) == sorted((user, expected[user]) for user in users)
    assert (reader.reads, reader.answered) == (1, len(users))


async def test_sessions_that_leave_while_waiting_do_not_stall_the_others(db: Database) -> None:
    """Half the askers are cancelled (their clients left) at once, whoever was leading."""
    reader = SeqReader(db)
    answered: list[int] = []

    async def ask(scope: trio.CancelScope) -> None:
        with scope:
            answered.append(await reader.latest("burst-leaver"))

    for _ in range(20):
        scopes = [trio.CancelScope() for _ in range(40)]
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                for scope in scopes:
                    nursery.start_soon(ask, scope)
                await trio.lowlevel.checkpoint()
                await (
                    trio.lowlevel.checkpoint()
                )  # the first read has started: cancel its leader and others
                for scope in scopes[::2]:
                    scope.cancel()
    assert len(answered) >= 20 * 20  # each round: every asker that was not cancelled
    assert set(answered) == {0}


BURST = 2000


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_burst_of_2000_sessions_all_get_connection_ready(db: Database) -> None:
    """2,000 simultaneous connects on a healthy database: every one gets connection.ready
    with its user's seq (none is closed 1011 waiting for a pool connection)."""
    users = [f"burst-{i % 50}" for i in range(BURST)]
    ready: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}
    all_in = trio.Event()
    # Every client of the burst shares one address: the per-address handshake limit (tested in
    # tests/test_identity.py) is off here, this is about reading 2,000 starting seqs.
    settings = make_settings(ws_connects_per_address_per_min=0)
    async with running_stack(db, settings=settings) as stack:
        for i in range(5):  # some users have history: their seq is not 0
            for _ in range(i + 1):
                await _create(stack, f"burst-{i}")

        async def session(i: int) -> None:
            try:
                async with open_websocket_url(stack.ws_url(users[i])) as ws:
                    ready[i] = json.loads(await ws.get_message())
                    if len(ready) + len(failed) == BURST:
                        all_in.set()
                    await all_in.wait()  # hold it open: all 2,000 are live at once
            except (ConnectionClosed, HandshakeError, OSError) as exc:
                failed[i] = repr(exc)
                if len(ready) + len(failed) == BURST:
                    all_in.set()

        with trio.fail_after(240):  # a hang guard, not a speed assertion
            async with trio.open_nursery() as nursery:
                for i in range(BURST):
                    nursery.start_soon(session, i)
    print("burst:", len(ready), "ready,", collections.Counter(failed.values()).most_common(3))
    assert failed == {}
    expected = {f"burst-{i}": i + 1 for i in range(5)}
    for i, message in ready.items():
        assert message["type"] == "connection.ready"
        assert message["seq"] == expected.get(users[i], 0)
    print(f"{len(ready)} of {BURST} sessions got connection.ready")
