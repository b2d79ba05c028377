"""The event log (issue 17) on the real database with real clients: its columns, the migration
that converts the outbox's rows, retention, ``/ws?since=SEQ`` replay over real sockets and the
audit route ``GET /api/positions/{id}/events`` over real HTTP."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url
from web_harness import EngineRecorder, Stack, make_settings, running_stack

from tickguard.actors import persistence
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import CloseOrder, FanoutMessage, NewPosition, PersistenceRequest
from tickguard.storage import Database, migrate, open_database, writes
from tickguard.storage.eventlog import position_events, prune_closed, user_events_after
from tickguard.storage.migrate import bundled_migrations
from tickguard.web import ws as ws_module
from tickguard.wire import event_message, loads

GUARD = 15  # seconds: a hang guard, never a speed assertion
OLD = timedelta(days=40)
RETENTION = timedelta(days=30)


def _new(user: str = "alice") -> NewPosition:
    return NewPosition(user, "BTC-USD", "long", Decimal("100"), Decimal("110"), Decimal("90.5"))


async def _create(db: Database, user: str = "alice", n: int = 1) -> list[uuid.UUID]:
    results, events = await writes.create_positions(db, [_new(user)] * n, max_open_per_user=1000)
    await writes.mark_published(db, [e.id for e in events])
    ids = []
    for result in results:
        assert not isinstance(result, Exception)
        ids.append(result.position.id)
    return ids


async def _close(db: Database, pid: uuid.UUID, **order: Any) -> None:
    source = order.pop("source", "api")
    results, events = await writes.close_positions(
        db, [CloseOrder(pid, Decimal("101"), order.pop("reason", "manual"), **order)], source=source
    )
    assert results[0].outcome.value == "closed"
    await writes.mark_published(db, [e.id for e in events])


async def _age(db: Database, pid: uuid.UUID, by: timedelta = OLD) -> None:
    """Make a position (and its events) look ``by`` older: as if it had lived back then."""
    await db.execute(
        """UPDATE positions SET created_at = created_at - $2::interval,
                  updated_at = updated_at - $2::interval, closed_at = closed_at - $2::interval
            WHERE id = $1""",
        pid,
        by,
    )
    await db.execute(
        "UPDATE events SET created_at = created_at - $2::interval WHERE position_id = $1", pid, by
    )


async def _events_of(db: Database, pid: uuid.UUID) -> int:
    return int(await db.fetchval("SELECT count(*) FROM events WHERE position_id = $1", pid))


# --- the columns ------------------------------------------------------------------------------


async def test_events_carry_source_trade_id_and_payload_beside_the_message(db: Database) -> None:
    [manual, engine] = await _create(db, n=2)
    await _close(db, manual)
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    await _close(
        db, engine, source="engine", reason="stop_loss", triggered_at=at, trade_id=987654321
    )
    rows = await db.fetch(
        "SELECT seq, type, source, trade_id, payload, message FROM event_log ORDER BY seq"
    )
    assert [(r["seq"], r["type"], r["source"], r["trade_id"]) for r in rows] == [
        (1, "position.created", "api", None),
        (2, "position.created", "api", None),
        (3, "position.closed", "api", None),
        (4, "position.closed", "engine", 987654321),
    ]
    for row in rows:
        # The payload is the message's body, numbers exact (JSONB keeps NUMERIC precision).
        assert loads(row["payload"]) == loads(row["message"])
    assert loads(rows[3]["payload"])["position"]["stopLoss"] == Decimal("90.5")


async def test_published_events_stay_in_the_log(db: Database) -> None:
    [pid] = await _create(db)
    await _close(db, pid)
    assert await db.fetchval("SELECT count(*) FROM events WHERE published_at IS NOT NULL") == 2
    page = await user_events_after(db, "alice", 0)
    assert [(e.seq, e.type) for e in page] == [(1, "position.created"), (2, "position.closed")]


# --- the migration ----------------------------------------------------------------------------


async def test_migration_006_converts_the_outbox_rows(database_url: str) -> None:
    name = f"evl_{uuid.uuid4().hex[:10]}"
    if "?" in database_url:
        base, query = database_url.split("?", 1)
        url = base.rsplit("/", 1)[0] + "/" + name + "?" + query
    else:
        url = database_url.rsplit("/", 1)[0] + "/" + name
    async with open_database(database_url) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        async with open_database(url) as old:
            before = [m for m in bundled_migrations() if m.version < 6]
            assert await migrate(old, before) == [1, 2, 3, 4, 5]
            # Two positions and their events as the outbox wrote them before issue 17.
            [created, closed] = await _create_old_rows(old)
            through_6 = [m for m in bundled_migrations() if m.version <= 6]
            assert await migrate(old, through_6) == [6]
            rows = await old.fetch(
                """SELECT seq, type, source, trade_id, payload, message, published_at
                   FROM event_log ORDER BY seq"""
            )
            assert [(r["seq"], r["source"], r["trade_id"]) for r in rows] == [
                (1, "api", None),
                (2, "engine", None),
            ]
            assert [r["message"] for r in rows] == [created, closed]  # untouched
            assert [loads(r["payload"]) for r in rows] == [loads(created), loads(closed)]
            assert loads(rows[1]["payload"])["recovered"] is True
            assert rows[0]["published_at"] is not None and rows[1]["published_at"] is None
            # The columns are now required and checked.
            with pytest.raises(Exception, match="events_source_check"):
                await old.execute(
                    """INSERT INTO events (user_id, seq, type, position_id, message, source)
                       VALUES ('x', 1, 'position.created', gen_random_uuid(), '{}', 'robot')"""
                )
            assert await migrate(old, through_6) == []
    finally:
        async with open_database(database_url) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _create_old_rows(db: Database) -> list[str]:
    rows = await db.fetch(
        """INSERT INTO positions (user_id, symbol, side, entry_price, stop_loss, status,
                                  close_price, close_reason, closed_at, triggered_at)
           VALUES ('u1', 'BTC-USD', 'long', 100.5, 90, 'open', NULL, NULL, NULL, NULL),
                  ('u1', 'BTC-USD', 'long', 100, 90, 'closed', 90, 'stop_loss', now(), now())
           RETURNING id, user_id, symbol, side, entry_price, take_profit, stop_loss, status,
                     close_price, close_reason, created_at, updated_at, closed_at,
                     triggered_at"""
    )
    from tickguard.storage.rows import to_position

    first, second = (to_position(r) for r in rows)
    created = event_message("position.created", "api", 1, first)
    closed = event_message("position.closed", "engine", 2, second, recovered=True)
    await db.execute("INSERT INTO user_seq VALUES ('u1', 2)")
    await db.execute(
        """INSERT INTO events (user_id, seq, type, position_id, message, published_at)
           VALUES ('u1', 1, 'position.created', $1, $2, now()),
                  ('u1', 2, 'position.closed', $3, $4, NULL)""",
        first.id,
        created,
        second.id,
        closed,
    )
    return [created, closed]


# --- retention --------------------------------------------------------------------------------


async def test_retention_prunes_long_closed_positions_only(db: Database) -> None:
    [old_closed, old_open, recent_closed, old_unpublished] = await _create(db, n=4)
    await _close(db, old_closed)
    await _close(db, recent_closed)
    # Closed, old, but its close event was never published: the outbox still needs it.
    results, _ = await writes.close_positions(
        db, [CloseOrder(old_unpublished, Decimal("101"), "manual")], source="api"
    )
    assert results[0].outcome.value == "closed"
    for pid in (old_closed, old_open, old_unpublished):
        await _age(db, pid)
    assert await prune_closed(db, RETENTION) == 2  # old_closed's created and closed events
    assert await _events_of(db, old_closed) == 0
    assert await _events_of(db, old_open) == 1  # open: never pruned, however old
    assert await _events_of(db, recent_closed) == 2
    assert await _events_of(db, old_unpublished) == 2
    assert await prune_closed(db, RETENTION) == 0


async def test_retention_prunes_in_bounded_statements(db: Database) -> None:
    ids = await _create(db, n=5)
    for pid in ids:
        await _close(db, pid)
        await _age(db, pid)
    assert await prune_closed(db, RETENTION, limit=3) == 3
    assert await prune_closed(db, RETENTION, limit=3) == 3
    assert await prune_closed(db, RETENTION, limit=3) == 3
    assert await prune_closed(db, RETENTION, limit=3) == 1
    assert await db.fetchval("SELECT count(*) FROM events") == 0


async def test_the_persistence_actor_prunes_periodically_and_never_open_positions(
    db: Database,
) -> None:
    [closed_early, open_pos] = await _create(db, n=2)
    await _close(db, closed_early)
    await _age(db, closed_early)
    await _age(db, open_pos)
    inbox: Mailbox[PersistenceRequest] = Mailbox("persistence")
    fanout: Mailbox[FanoutMessage] = Mailbox("fanout")
    stats = persistence.PersistenceStats()
    config = persistence.PersistenceConfig(event_retention=RETENTION, prune_interval_s=0.05)
    stopping = trio.Event()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    persistence.run,
                    inbox,
                    db,
                    fanout,
                    EngineRecorder(),
                    config=config,
                    stats=stats,
                    stopping=stopping,
                )
            )
            while stats.events_pruned < 2:
                await trio.sleep(0.02)
            # A position that becomes prunable later goes in a later round.
            [later] = await _create(db)
            await _close(db, later)
            await _age(db, later)
            while stats.events_pruned < 4:
                await trio.sleep(0.02)
            stopping.set()
    assert await _events_of(db, closed_early) == 0
    assert await _events_of(db, later) == 0
    assert await _events_of(db, open_pos) == 1


# --- /ws?since=SEQ ----------------------------------------------------------------------------


def _since_url(stack: Stack, user: str, since: str) -> str:
    return stack.ws_url(user) + f"&since={since}"


async def _message(ws: Any) -> dict[str, Any]:
    with trio.fail_after(GUARD):
        message: dict[str, Any] = json.loads(await ws.get_message())
    return message


async def _closed_with(ws: Any) -> tuple[int, str | None]:
    with trio.fail_after(GUARD):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as closed:
                return closed.reason.code, closed.reason.reason


async def _api_create(client: httpx.AsyncClient, user: str = "alice") -> dict[str, Any]:
    body = {"userId": user, "symbol": "BTC-USD", "side": "long", "entryPrice": 100}
    response = await client.post("/api/positions", json=body)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def test_since_replays_the_logged_events_then_live_ones(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        first = await _api_create(client)
        for _ in range(3):
            await _api_create(client)
        response = await client.post(
            f"/api/positions/{first['id']}/close", json={"userId": "alice", "closePrice": 99}
        )
        assert response.status_code == 200
        await _api_create(client, "bob")  # another user's events are never replayed
        logged = {
            r["seq"]: r["message"]
            for r in await db.fetch("SELECT seq, message FROM events WHERE user_id = 'alice'")
        }
        async with open_websocket_url(_since_url(stack, "alice", "2")) as ws:
            ready = await _message(ws)
            assert ready == {
                "type": "connection.ready",
                "message": "realtime channel established",
                "seq": 5,
                "replayComplete": True,
            }
            with trio.fail_after(GUARD):
                replayed = [await ws.get_message() for _ in range(3)]
            # Byte for byte what the log holds (and what live sessions got), in seq order.
            assert replayed == [logged[3], logged[4], logged[5]]
            assert json.loads(replayed[2])["type"] == "position.closed"
            live = await _api_create(client)
            event = await _message(ws)
            assert event["seq"] == 6 and event["position"]["id"] == live["id"]


async def test_since_the_latest_seq_replays_nothing_and_since_0_everything(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        for _ in range(2):
            await _api_create(client)
        async with open_websocket_url(_since_url(stack, "alice", "2")) as ws:
            assert (await _message(ws))["replayComplete"] is True
            await _api_create(client)
            assert (await _message(ws))["seq"] == 3  # the next message is live, not a replay
        async with open_websocket_url(_since_url(stack, "alice", "0")) as ws:
            assert (await _message(ws))["seq"] == 3
            assert [(await _message(ws))["seq"] for _ in range(3)] == [1, 2, 3]
        # A user with no events yet may resume from 0.
        async with open_websocket_url(_since_url(stack, "carol", "0")) as ws:
            ready = await _message(ws)
            assert (ready["seq"], ready["replayComplete"]) == (0, True)


async def test_without_since_connection_ready_is_unchanged(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        await _api_create(client)
        async with open_websocket_url(stack.ws_url("alice")) as ws:
            with trio.fail_after(GUARD):
                text = await ws.get_message()
            assert text == (
                '{"type":"connection.ready","message":"realtime channel established","seq":1}'
            )
            await _api_create(client)
            assert (await _message(ws))["seq"] == 2  # nothing replayed before it


async def test_replay_with_events_committed_meanwhile_has_no_gap_and_no_duplicate(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ws_module, "REPLAY_PAGE", 3)  # many pages, so creates land between them
    before, during, creators = 300, 100, 4
    unlimited = make_settings(rate_limit_per_user=0, rate_limit_per_address=0)
    async with (
        running_stack(db, settings=unlimited) as stack,
        httpx.AsyncClient(base_url=stack.base_url) as client,
    ):
        await _create(db, n=before)
        seqs: list[int] = []
        with trio.fail_after(GUARD * 2):
            async with trio.open_nursery() as nursery:

                async def create_meanwhile() -> None:
                    for _ in range(during // creators):
                        await _api_create(client)

                for _ in range(creators):
                    nursery.start_soon(create_meanwhile)
                async with open_websocket_url(_since_url(stack, "alice", "5")) as ws:
                    ready = await _message(ws)
                    assert ready["replayComplete"] is True
                    assert before <= ready["seq"] <= before + during
                    while not seqs or seqs[-1] < before + during:
                        seqs.append((await _message(ws))["seq"])
                    # Live events were committed while the replay ran (the race is real).
                    assert ready["seq"] < before + during
    assert seqs == list(range(6, before + during + 1))


@pytest.mark.parametrize("since", ["-1", "abc", "1.5", "", "+3", "1e3", "0x10", "9" * 19])
async def test_a_since_that_is_not_an_integer_of_at_least_0_closes_1008(
    db: Database, since: str
) -> None:
    async with running_stack(db) as stack:
        async with open_websocket_url(_since_url(stack, "alice", since)) as ws:
            code, reason = await _closed_with(ws)
    assert (code, reason) == (1008, "since must be an integer >= 0")
    assert stack.services.ws_stats.rejected == 1


async def test_a_since_above_the_latest_seq_closes_1008(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        await _api_create(client)
        async with open_websocket_url(_since_url(stack, "alice", "2")) as ws:
            code, reason = await _closed_with(ws)
        assert (code, reason) == (1008, "since is above the latest seq")
        async with open_websocket_url(_since_url(stack, "nobody", "1")) as ws:
            assert (await _closed_with(ws))[0] == 1008


async def test_a_pruned_log_says_the_replay_is_incomplete(db: Database) -> None:
    [gone, kept] = await _create(db, n=2)  # seqs 1, 2
    await _close(db, gone)  # seq 3
    [last] = await _create(db)  # seq 4
    await _age(db, gone)
    assert await prune_closed(db, RETENTION) == 2  # seqs 1 and 3 are gone
    async with running_stack(db) as stack:
        async with open_websocket_url(_since_url(stack, "alice", "0")) as ws:
            ready = await _message(ws)
            assert (ready["seq"], ready["replayComplete"]) == (4, False)
            # What is still there comes, in order.
            got = [await _message(ws) for _ in range(2)]
            assert [(m["seq"], m["position"]["id"]) for m in got] == [
                (2, str(kept)),
                (4, str(last)),
            ]
        # From after the hole the log is whole again.
        async with open_websocket_url(_since_url(stack, "alice", "3")) as ws:
            assert (await _message(ws))["replayComplete"] is True
            assert (await _message(ws))["seq"] == 4


async def test_an_event_pruned_during_a_complete_replay_closes_1013(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await _create(db, n=4)  # seqs 1-4
    await _close(db, ids[2])  # seq 5
    await _age(db, ids[2])
    real = ws_module.user_events_after
    pages: list[int] = []

    async def prune_after_the_first_page(*args: Any, **kwargs: Any) -> Any:
        page = await real(*args, **kwargs)
        if not pages:  # retention runs between the count and the next page
            assert await prune_closed(db, RETENTION) == 2  # seqs 3 and 5
        pages.append(len(page))
        return page

    monkeypatch.setattr(ws_module, "REPLAY_PAGE", 2)
    monkeypatch.setattr(ws_module, "user_events_after", prune_after_the_first_page)
    async with running_stack(db) as stack:
        async with open_websocket_url(_since_url(stack, "alice", "0")) as ws:
            assert (await _message(ws))["replayComplete"] is True
            assert [(await _message(ws))["seq"] for _ in range(2)] == [1, 2]
            # Seq 3 is gone: the session ends rather than skip it silently.
            assert await _closed_with(ws) == (1013, "event log pruned during replay: resume")
        async with open_websocket_url(_since_url(stack, "alice", "2")) as ws:
            assert (await _message(ws))["replayComplete"] is False


# --- GET /api/positions/{id}/events -----------------------------------------------------------


async def test_the_audit_route_lists_a_positions_lifecycle_oldest_first(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        other = await _api_create(client)
        target = await _api_create(client)
        response = await client.post(
            f"/api/positions/{target['id']}/close", json={"userId": "alice", "closePrice": 105}
        )
        assert response.status_code == 200
        response = await client.get(
            f"/api/positions/{target['id']}/events", params={"userId": "alice"}
        )
        assert response.status_code == 200, response.text
        data = loads(response.content)["data"]
        assert [(e["seq"], e["type"], e["source"], e["tradeId"]) for e in data] == [
            (2, "position.created", "api", None),
            (3, "position.closed", "api", None),
        ]
        assert all(e["event"]["position"]["id"] == target["id"] for e in data)
        assert data[1]["event"]["position"]["closePrice"] == 105
        assert data[0]["createdAt"] <= data[1]["createdAt"]
        assert data[0]["createdAt"].endswith("Z")
        logged = await position_events(db, "alice", uuid.UUID(target["id"]))
        # Each entry's event is the body sessions received, as the log holds it.
        assert [loads(e.message) for e in logged] == [e["event"] for e in data]
        assert other["id"] != target["id"]


async def test_the_audit_route_shows_an_engine_close_and_its_trade(db: Database) -> None:
    [pid] = await _create(db)
    await _close(
        db,
        pid,
        source="engine",
        reason="take_profit",
        triggered_at=datetime(2026, 12, 1, tzinfo=UTC),
        trade_id=4242,
    )
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        response = await client.get(f"/api/positions/{pid}/events", params={"userId": "alice"})
    assert response.status_code == 200
    data = loads(response.content)["data"]
    assert [(e["type"], e["source"], e["tradeId"]) for e in data] == [
        ("position.created", "api", None),
        ("position.closed", "engine", 4242),
    ]
    assert data[1]["event"]["position"]["closeReason"] == "take_profit"


async def test_the_audit_route_hides_other_users_positions_and_checks_the_id(
    db: Database,
) -> None:
    [pid] = await _create(db, "alice")
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        mine = await client.get(f"/api/positions/{pid}/events", params={"userId": "alice"})
        theirs = await client.get(f"/api/positions/{pid}/events", params={"userId": "bob"})
        unknown = await client.get(
            f"/api/positions/{uuid.uuid4()}/events", params={"userId": "alice"}
        )
        malformed = await client.get("/api/positions/nope/events", params={"userId": "alice"})
        no_user = await client.get(f"/api/positions/{pid}/events")
    assert mine.status_code == 200 and len(mine.json()["data"]) == 1
    # Someone else's position is exactly as unknown as a missing one.
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json() == {"error": "Position not found."}
    assert malformed.status_code == 400
    assert no_user.status_code == 400


async def test_the_audit_route_of_a_pruned_position_is_empty(db: Database) -> None:
    [pid] = await _create(db)
    await _close(db, pid)
    await _age(db, pid)
    assert await prune_closed(db, RETENTION) == 2
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        response = await client.get(f"/api/positions/{pid}/events", params={"userId": "alice"})
    assert response.status_code == 200 and response.json() == {"data": []}


async def test_the_audit_route_is_in_the_openapi_document(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        document = (await client.get("/openapi.json")).json()
    operation = document["paths"]["/api/positions/{id}/events"]["get"]
    assert set(operation["responses"]) >= {"200", "400", "404", "503"}
