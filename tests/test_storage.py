"""Storage on a real PostgreSQL: migrations, the batched close, the outbox's seq, timeouts."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import gc
import uuid
import weakref
from decimal import Decimal

import asyncpg
import pytest
import trio
import trio_asyncio
from hypothesis import given
from hypothesis import strategies as st

from tickguard.actors.messages import CloseOrder, CloseOutcome, CreateResult, NewPosition
from tickguard.storage import (
    Database,
    DatabaseUnavailable,
    errors,
    loading,
    migrate,
    open_database,
    open_pool,
    reads,
    runtime,
    writes,
)
from tickguard.storage.migrate import bundled_migrations


def new(user: str = "alice", **kw: object) -> NewPosition:
    base = dict(
        user_id=user,
        symbol="BTC-USD",
        side="long",
        entry_price=Decimal("65000.5"),
        take_profit=Decimal("70000"),
        stop_loss=Decimal("60000.12345678"),
    )
    base.update(kw)
    return NewPosition(**base)  # type: ignore[arg-type]


async def test_migrations_are_idempotent(db: Database) -> None:
    assert await migrate(db) == []
    versions = [r["version"] for r in await db.fetch("SELECT version FROM schema_migrations")]
    assert sorted(versions) == [m.version for m in bundled_migrations()]


async def test_concurrent_migrations_do_not_race(database_url: str) -> None:
    name = f"mig_{uuid.uuid4().hex[:10]}"
    async with open_database(database_url) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    url = database_url.rsplit("/", 1)[0] + "/" + name if "?" not in database_url else None
    if url is None:  # embedded server: the database name sits before the query string
        base, query = database_url.split("?", 1)
        url = base.rsplit("/", 1)[0] + "/" + name + "?" + query
    applied: list[list[int]] = []
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(3):

                async def run_one() -> None:
                    async with open_database(url) as fresh:
                        applied.append(await migrate(fresh))

                nursery.start_soon(run_one)
        all_versions = [m.version for m in bundled_migrations()]
        assert sorted(v for run in applied for v in run) == all_versions
        async with open_database(url) as fresh:
            count = await fresh.fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(all_versions)
    finally:
        async with open_database(database_url) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_old_backend_table_is_adopted_with_its_rows(database_url: str) -> None:
    name = f"old_{uuid.uuid4().hex[:10]}"
    if "?" in database_url:
        base, query = database_url.split("?", 1)
        url = base.rsplit("/", 1)[0] + "/" + name + "?" + query
    else:
        url = database_url.rsplit("/", 1)[0] + "/" + name
    async with open_database(database_url) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        async with open_database(url) as old:
            # The Node backend's table, as it created it.
            await old.execute(
                """CREATE TABLE positions (
                     id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
                     user_id TEXT NOT NULL, symbol TEXT NOT NULL,
                     side TEXT NOT NULL CHECK (side IN ('long','short')),
                     entry_price NUMERIC(18,8) NOT NULL, take_profit NUMERIC(18,8),
                     stop_loss NUMERIC(18,8), status TEXT NOT NULL DEFAULT 'open',
                     close_price NUMERIC(18,8), close_reason TEXT,
                     created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                     updated_at TIMESTAMPTZ NOT NULL DEFAULT now(), closed_at TIMESTAMPTZ)"""
            )
            await old.execute(
                """INSERT INTO positions (user_id, symbol, side, entry_price, stop_loss)
                   VALUES ('u1', 'BTC-USD', 'long', 100.5, 90), ('u2', 'ETH-USD', 'short', 5, 6)"""
            )
            await old.execute(
                """INSERT INTO positions (user_id, symbol, side, entry_price, status, close_price,
                                          close_reason, closed_at)
                   VALUES ('u1', 'BTC-USD', 'long', 100, 'closed', 110, 'manual', now())"""
            )
            assert await migrate(old) == [m.version for m in bundled_migrations()]
            rows = await old.fetch(
                "SELECT user_id, entry_price, status FROM positions ORDER BY 1, 3"
            )
            assert [(r["user_id"], r["entry_price"], r["status"]) for r in rows] == [
                ("u1", Decimal("100.00000000"), "closed"),
                ("u1", Decimal("100.50000000"), "open"),
                ("u2", Decimal("5.00000000"), "open"),
            ]
            # The adopted table now enforces tickguard's rules and serves tickguard's reads.
            assert await loading.open_symbols(old) == ["BTC-USD", "ETH-USD"]
            assert await migrate(old) == []
    finally:
        async with open_database(database_url) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_create_writes_position_and_event_in_one_transaction(db: Database) -> None:
    results, events = await writes.create_positions(db, [new(), new("bob")], max_open_per_user=10)
    assert [r.position.user_id for r in results] == ["alice", "bob"]
    p = results[0].position
    assert p.status == "open" and p.entry_price == Decimal("65000.5")
    assert p.stop_loss == Decimal("60000.12345678")
    assert [(e.user_id, e.seq, e.type) for e in events] == [
        ("alice", 1, "position.created"),
        ("bob", 1, "position.created"),
    ]
    assert '"entryPrice":65000.5' in events[0].message
    assert await reads.latest_seq(db, "alice") == 1
    assert len(await writes.unpublished_events(db)) == 2


async def test_idempotency_key_returns_the_first_position(db: Database) -> None:
    first, _ = await writes.create_positions(db, [new(idempotency_key="k1")], max_open_per_user=10)
    again, events = await writes.create_positions(
        db, [new(idempotency_key="k1"), new(idempotency_key="k1")], max_open_per_user=10
    )
    assert again[0].position.id == first[0].position.id and not again[0].created
    assert again[1].position.id == first[0].position.id
    assert events == []
    assert await db.fetchval("SELECT count(*) FROM positions") == 1


async def test_an_idempotency_key_reused_with_another_body_is_refused(db: Database) -> None:
    first, _ = await writes.create_positions(
        db, [new(idempotency_key="k1", fingerprint="a" * 64)], max_open_per_user=10
    )
    again, events = await writes.create_positions(
        db,
        [
            new(idempotency_key="k1", fingerprint="a" * 64),  # the same request: a replay
            new(idempotency_key="k1", fingerprint="b" * 64),  # another body: refused
            new("bob", idempotency_key="k1", fingerprint="b" * 64),  # keys are per user
            new(idempotency_key="k2", fingerprint="c" * 64),
            new(idempotency_key="k2", fingerprint="d" * 64),  # within one batch too
        ],
        max_open_per_user=10,
    )
    assert isinstance(again[0], CreateResult) and not again[0].created
    assert again[0].position.id == first[0].position.id
    assert isinstance(again[1], errors.IdempotencyKeyReused) and again[1].key == "k1"
    assert isinstance(again[2], CreateResult) and again[2].created
    assert isinstance(again[3], CreateResult) and again[3].created
    assert isinstance(again[4], errors.IdempotencyKeyReused)
    assert len(events) == 2
    # A row written before fingerprints existed (NULL) replays as it always did.
    await db.execute("UPDATE positions SET request_fingerprint = NULL WHERE idempotency_key='k1'")
    old, _ = await writes.create_positions(
        db, [new(idempotency_key="k1", fingerprint="e" * 64)], max_open_per_user=10
    )
    assert isinstance(old[0], CreateResult) and old[0].position.id == first[0].position.id


async def test_open_position_cap_is_enforced_per_user(db: Database) -> None:
    results, events = await writes.create_positions(
        db, [new(), new(), new(), new("bob")], max_open_per_user=2
    )
    assert [type(r).__name__ for r in results] == [
        "CreateResult",
        "CreateResult",
        "OpenPositionLimit",
        "CreateResult",
    ]
    assert len(events) == 3
    assert await db.fetchval("SELECT count(*) FROM positions WHERE user_id='alice'") == 2


async def test_overlapping_close_batches_close_each_row_once(db: Database) -> None:
    created, _ = await writes.create_positions(
        db, [new(), new(), new(), new("bob")], max_open_per_user=100
    )
    ids = [r.position.id for r in created]
    ghost = uuid.uuid4()
    batch_a = [
        CloseOrder(ids[0], Decimal("60000"), "stop_loss"),
        CloseOrder(ids[1], Decimal("60000"), "stop_loss"),
        CloseOrder(ids[3], Decimal("60000"), "stop_loss"),
    ]
    batch_b = [
        CloseOrder(ids[1], Decimal("61000"), "manual"),
        CloseOrder(ids[2], Decimal("61000"), "manual"),
        CloseOrder(ids[3], Decimal("61000"), "manual"),
        CloseOrder(ghost, Decimal("61000"), "manual"),
    ]
    outcomes: dict[str, list] = {}

    async def close(name: str, batch: list[CloseOrder]) -> None:
        outcomes[name] = (await writes.close_positions(db, batch, source="engine"))[0]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close, "a", batch_a)
        nursery.start_soon(close, "b", batch_b)

    by_id: dict[uuid.UUID, list[CloseOutcome]] = {}
    for results in outcomes.values():
        for r in results:
            by_id.setdefault(r.position_id, []).append(r.outcome)
    for shared in (ids[1], ids[3]):
        assert sorted(o.value for o in by_id[shared]) == ["already_closed", "closed"]
    assert by_id[ids[0]] == [CloseOutcome.CLOSED]
    assert by_id[ids[2]] == [CloseOutcome.CLOSED]
    assert by_id[ghost] == [CloseOutcome.NOT_FOUND]
    # Exactly one closed event per closed row, and gap-free, duplicate-free seq per user.
    rows = await db.fetch(
        "SELECT user_id, seq, type, position_id FROM events ORDER BY user_id, seq"
    )
    closed_events = [r["position_id"] for r in rows if r["type"] == "position.closed"]
    assert sorted(closed_events) == sorted(ids)
    for user in ("alice", "bob"):
        seqs = [r["seq"] for r in rows if r["user_id"] == user]
        assert seqs == list(range(1, len(seqs) + 1))
    assert await db.fetchval("SELECT count(*) FROM positions WHERE status='open'") == 0


async def test_close_checks_the_user_and_reports_per_id(db: Database) -> None:
    created, _ = await writes.create_positions(db, [new()], max_open_per_user=10)
    pid = created[0].position.id
    [wrong_user], events = await writes.close_positions(
        db, [CloseOrder(pid, Decimal("1"), "manual", user_id="mallory")], source="api"
    )
    assert wrong_user.outcome is CloseOutcome.NOT_FOUND and events == []
    [ok], events = await writes.close_positions(
        db, [CloseOrder(pid, Decimal("66000.1"), "manual", user_id="alice")], source="api"
    )
    assert ok.outcome is CloseOutcome.CLOSED and ok.position is not None
    assert ok.position.close_price == Decimal("66000.1") and ok.position.closed_at is not None
    assert ok.position.updated_at >= ok.position.created_at
    assert [e.seq for e in events] == [2]
    [again], events = await writes.close_positions(
        db, [CloseOrder(pid, Decimal("1"), "manual", user_id="alice")], source="api"
    )
    assert again.outcome is CloseOutcome.ALREADY_CLOSED and events == []
    assert again.position is not None and again.position.close_price == Decimal("66000.1")


async def test_pagination_walks_every_row_once(db: Database) -> None:
    await writes.create_positions(db, [new() for _ in range(7)], max_open_per_user=100)
    seen, cursor = [], None
    while True:
        page, cursor = await reads.list_positions(db, "alice", None, 3, cursor)
        seen += page
        if cursor is None:
            break
    assert len(seen) == 7 and len({p.id for p in seen}) == 7
    assert [p.created_at for p in seen] == sorted((p.created_at for p in seen), reverse=True)


async def test_closed_list_pages_by_close_time_and_a_list_bound_sets_the_cursor(
    db: Database,
) -> None:
    created, _ = await writes.create_positions(db, [new() for _ in range(5)], max_open_per_user=100)
    ids = [r.position.id for r in created]
    for pid in ids:
        await writes.close_positions(
            db, [CloseOrder(pid, Decimal("1"), "manual", user_id="alice")], source="api"
        )
    seen, cursor = [], None
    while True:
        page, cursor = await reads.list_closed(db, "alice", 2, cursor)
        seen += page
        if cursor is None:
            break
    assert sorted(p.id for p in seen) == sorted(ids)
    whole, more = await reads.list_closed(db, "alice", 5, None)
    assert len(whole) == 5 and more is None
    bounded, more = await reads.list_positions(db, "alice", None, 4, None)
    assert len(bounded) == 4 and more is not None


FORGED = [
    # The repro of issue 13 (finding 7): base64 of a datetime that overflows once made UTC.
    base64.urlsafe_b64encode(b"0001-01-01T00:00:00+14:00|" + str(uuid.uuid4()).encode()).decode(),
    base64.urlsafe_b64encode(b"9999-12-31T23:59:59-14:00|" + str(uuid.uuid4()).encode()).decode(),
    "not-a-cursor",
    "%%%",
    "\udcff",
    "1." + "0" * 31,  # uuid hex one short
    "12345678901234567." + "0" * 32,  # 17 digits of microseconds
    "-1." + "0" * 32,
    "1|" + "0" * 32,
    "1." + "0" * 32 + ".x",  # wrong part count
    "1." + "G" * 32,
    "١." + "0" * 32,  # a digit of another script
    "",
]


@pytest.mark.parametrize("cursor", FORGED)
async def test_a_forged_cursor_is_bad_cursor_never_another_error(db: Database, cursor: str) -> None:
    with pytest.raises(errors.BadCursor):
        await reads.list_positions(db, "alice", None, 3, cursor or "x")
    with pytest.raises(errors.BadCursor):
        await reads.list_closed(db, "alice", 3, cursor or "x")


@given(st.text(max_size=80) | st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()))
def test_decoding_any_text_as_a_cursor_raises_only_bad_cursor(text: str) -> None:
    try:
        moment, pid = reads._decode_cursor(text)
    except errors.BadCursor:
        return
    # What decodes is a position PostgreSQL can compare with: UTC, within its range.
    assert moment.utcoffset() is not None and 1970 <= moment.year <= 2287
    micros, hex_id = text.split(".")
    assert reads._encode_cursor(moment, pid) == f"{int(micros)}.{hex_id}"


async def test_cancelled_query_leaves_the_pool_usable(db: Database) -> None:
    for _ in range(5):
        with trio.move_on_after(0.05):
            await db.fetchval("SELECT pg_sleep(5)")
    assert await db.fetchval("SELECT 41 + 1") == 42
    # No server-side query of ours is left running.
    with trio.fail_after(10):
        while await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(5)%'"
        ):
            await trio.sleep(0.05)


async def test_a_server_that_stops_answering_ends_at_the_timeout() -> None:
    # A listener that accepts TCP connections and never answers: a hung server.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, hold, listeners)
        async with trio_asyncio.open_loop():
            with trio.fail_after(10):  # the hang guard; the call's own timeout is 0.5 s
                try:
                    async with open_pool(f"postgresql://x@127.0.0.1:{port}/x", timeout=0.5):
                        raise AssertionError("connected to a server that never answers")
                except DatabaseUnavailable as exc:
                    assert "0.5" in str(exc) or "Timeout" in str(exc)
        assert accepted, "the client never reached the hung server"
        nursery.cancel_scope.cancel()


async def test_an_id_named_twice_in_a_batch_closes_once(db: Database) -> None:
    created, _ = await writes.create_positions(db, [new()], max_open_per_user=10)
    pid = created[0].position.id
    results, events = await writes.close_positions(
        db,
        [
            CloseOrder(pid, Decimal("2"), "manual", user_id="mallory"),
            CloseOrder(pid, Decimal("3"), "manual", user_id="alice"),
            CloseOrder(pid, Decimal("4"), "manual", user_id="alice"),
        ],
        source="api",
    )
    assert [r.outcome for r in results] == [
        CloseOutcome.NOT_FOUND,
        CloseOutcome.CLOSED,
        CloseOutcome.ALREADY_CLOSED,
    ]
    assert len(events) == 1 and results[1].position is not None
    assert results[1].position.close_price == Decimal("3")


async def _insert_then_sleep(conn: object) -> None:
    await conn.execute(  # type: ignore[attr-defined]
        "INSERT INTO user_seq (user_id, seq) VALUES ('cancelled', 1)"
    )
    await conn.execute("SELECT pg_sleep(5)")  # type: ignore[attr-defined]


async def test_a_transaction_cancelled_mid_query_commits_nothing_and_closes_cleanly(
    database_url: str, db: Database
) -> None:
    for _ in range(3):
        # The runtime is closed right after the cancel: a terminated connection's late error
        # must not crash the loop.
        async with open_database(database_url) as fresh:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fresh.transaction, _insert_then_sleep)
                await trio.testing.wait_all_tasks_blocked(0.05)
                nursery.cancel_scope.cancel()
    assert await db.fetchval("SELECT count(*) FROM user_seq WHERE user_id = 'cancelled'") == 0


async def test_open_positions_come_in_id_ordered_pages(db: Database) -> None:
    created, _ = await writes.create_positions(
        db, [new() for _ in range(7)] + [new(symbol="ETH-USD")], max_open_per_user=100
    )
    closed = created[0].position.id
    await writes.close_positions(db, [CloseOrder(closed, Decimal("1"), "manual")], source="api")
    pages = [page async for page in loading.open_positions(db, "BTC-USD", page=3)]
    assert [len(page) for page in pages] == [3, 3]
    ids = [p.id for page in pages for p in page]
    expected = sorted(r.position.id for r in created[1:7])
    assert ids == expected  # every open BTC-USD position once, in id order; nothing else
    assert [p async for p in loading.open_positions(db, "DOGE-USD")] == []


# ---------------------------------------------------------------- warm start (issue 16)
async def test_warm_up_prepares_the_close_path_on_each_pooled_connection_and_changes_nothing(
    db: Database,
) -> None:
    await runtime.warm_up(db, connections=3)
    # Nothing it ran stayed: no event, counter, watermark or position.
    for table in ("events", "user_seq", "watermarks", "positions"):
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0, table

    # Three connections held at once (so three different ones): each session has the close
    # path's statements prepared (asyncpg's statement cache names them on the server).
    statements: list[list[str]] = []
    gate = asyncio.Barrier(3)

    async def prepared(conn: asyncpg.Connection) -> None:
        rows = await conn.fetch("SELECT statement FROM pg_prepared_statements")
        statements.append([r["statement"] for r in rows])
        await gate.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(db.run, prepared)
    assert len(statements) == 3
    for held in statements:
        assert writes._CLOSE_ONE_SQL in held  # a tick's close
        assert writes._CLOSE_MANY_SQL in held  # a cascade's
        assert writes._MARK_PUBLISHED_SQL in held
        assert any("INSERT INTO events" in s for s in held)
        assert any("INSERT INTO user_seq" in s for s in held)


async def _insert_then_fail(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO user_seq (user_id, seq) VALUES ('abandoned', 1)")
    raise LookupError("the transaction's work failed")


async def _session_state(conn: asyncpg.Connection) -> tuple[bool, int]:
    seen = await conn.fetchval("SELECT count(*) FROM user_seq WHERE user_id = 'abandoned'")
    return conn.is_in_transaction(), seen


async def test_a_released_connection_comes_back_without_a_transaction(database_url: str) -> None:
    # The pool's reset on release no longer sends RESET ALL (storage/db.py `_keep_session`):
    # a transaction that failed half-way is rolled back by the transaction itself, and the
    # connection (the pool's only one) serves the next call clean.
    async with open_database(database_url, timeout=10.0, min_size=1, max_size=1) as one:
        with pytest.raises(LookupError):
            await one.transaction(_insert_then_fail)
        assert await one.run(_session_state) == (False, 0)


async def test_a_finished_call_keeps_nothing_of_its_callers_context_alive(db: Database) -> None:
    """A request's context (Quart's request and all it built) must die with the request, not
    wait in a cancelled timer of the database driver (issue 16: asyncpg's per-statement
    timer, kept by trio-asyncio until it would have fired, held every request of the last
    30 s alive, and full collections walked them all)."""

    class RequestState:
        pass

    held: contextvars.ContextVar[RequestState] = contextvars.ContextVar("held")

    async def one_request() -> weakref.ref[RequestState]:
        state = RequestState()
        held.set(state)
        for _ in range(3):
            assert await db.fetchval("SELECT 1") == 1
        await db.transaction(lambda conn: conn.execute("SELECT 1"))
        return weakref.ref(state)

    refs = []
    for _ in range(5):
        async with trio.open_nursery() as nursery:  # each "request" in a task of its own

            async def run() -> None:
                refs.append(await one_request())

            nursery.start_soon(run)
    await trio.sleep(0.05)  # let the asyncio side finish its callbacks
    gc.collect()
    assert [r() for r in refs] == [None] * 5
