"""The list pages PostgreSQL writes as JSON (storage.rows.POSITION_JSON, reads.*_json) are byte
for byte what the Python encoder (wire.position_to_json + wire.dumps) writes for the same rows:
prices with and without trailing zeros, at both ends of NUMERIC(18,8), in exponent form below
10^-6; every timestamp column, NULL or not, with microseconds the milliseconds truncate; user
ids with quotes, backslashes, non-ASCII and control characters; page boundaries and cursors."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import trio

from tickguard.domain import Position
from tickguard.storage import Database, reads
from tickguard.web.json import page_bytes
from tickguard.web.pages import PageReader
from tickguard.wire import dumps, position_to_json

PRICES = [
    "100",
    "100.10000000",
    "65000.5",
    "0.5",
    "0.1",
    "1",
    "10",
    "1000",
    "1E+3",
    "1.10",
    "123.456789",
    "0.00100000",
    "0.00001",
    "0.0000012",
    "0.000001",
    "0.00000100",
    "0.00000099",
    "0.00000012",
    "0.0000001",
    "0.00000010",
    "0.00000001",
    "0.00000005",
    "1234567890",
    "9999999999.99999999",
    "9999999999",
    "1000000000.00000001",
    "0.99999999",
    "12345.67800000",
]

USERS = [
    "alice",
    'quo"te',
    "back\\slash",
    "ünïcødé 名前 🙂",
    "tab\there\nnew\x01\x1f\x7f",
    "/slash</script>",
    "x" * 128,
]

BASE = datetime(2026, 12, 2, 10, 15, 30, 999_999, tzinfo=UTC)


async def _insert(db: Database, user: str, i: int, status: str, price: str) -> None:
    created = BASE - timedelta(seconds=i, microseconds=i * 1337)
    closed = status == "closed"
    await db.execute(
        """INSERT INTO positions (id, user_id, symbol, side, entry_price, take_profit, stop_loss,
               status, close_price, close_reason, created_at, updated_at, closed_at,
               triggered_at)
           VALUES ($1, $2, 'BTC-USD', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)""",
        uuid.uuid4(),
        user,
        "long" if i % 2 else "short",
        Decimal(price),
        None if i % 3 == 0 else Decimal(PRICES[(i + 5) % len(PRICES)]),
        None if i % 4 == 1 else Decimal(PRICES[(i + 11) % len(PRICES)]),
        status,
        Decimal(PRICES[(i + 7) % len(PRICES)]) if closed else None,
        ("take_profit", "stop_loss", "manual", "system")[i % 4] if closed else None,
        created,
        created + timedelta(microseconds=999 * (i % 7)),
        created + timedelta(hours=1, microseconds=i) if closed else None,
        created + timedelta(minutes=1, microseconds=500 * i) if closed and i % 2 else None,
    )


def _python_page(page: list[Position], cursor: str | None) -> bytes:
    """What the handlers wrote before PostgreSQL wrote the JSON."""
    body: dict[str, object] = {"data": [position_to_json(p) for p in page]}
    if cursor is not None:
        body["nextCursor"] = cursor
    return dumps(body)


@pytest.fixture
async def seeded(db: Database) -> Database:
    for user in USERS:
        for i, price in enumerate(PRICES):
            await _insert(db, user, i, "closed" if i % 3 == 2 else "open", price)
    return db


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("status", [None, "open", "closed"])
async def test_sql_json_page_is_the_python_encoders_bytes(
    seeded: Database, user: str, status: str | None
) -> None:
    for limit in (1, 5, len(PRICES), 500):
        cursor: str | None = None
        pages = 0
        while True:
            page, expected_cursor = await reads.list_positions(seeded, user, status, limit, cursor)
            body, got_cursor = await reads.list_positions_json(seeded, user, status, limit, cursor)
            assert got_cursor == expected_cursor
            assert page_bytes(body, got_cursor) == _python_page(page, expected_cursor)
            pages += 1
            cursor = got_cursor
            if cursor is None:
                break
        assert pages >= 1


@pytest.mark.parametrize("user", USERS)
async def test_sql_json_closed_page_is_the_python_encoders_bytes(
    seeded: Database, user: str
) -> None:
    for limit in (1, 4, 500):
        cursor: str | None = None
        seen = 0
        while True:
            page, expected_cursor = await reads.list_closed(seeded, user, limit, cursor)
            body, got_cursor = await reads.list_closed_json(seeded, user, limit, cursor)
            assert got_cursor == expected_cursor
            assert page_bytes(body, got_cursor) == _python_page(page, expected_cursor)
            seen += len(page)
            cursor = got_cursor
            if cursor is None:
                break
        assert seen == sum(1 for i in range(len(PRICES)) if i % 3 == 2)


async def test_every_price_spelled_as_the_python_encoder_spells_it(db: Database) -> None:
    # One row per price as the entry price alone, so a mismatch names the value.
    for i, price in enumerate(PRICES):
        await _insert(db, f"p{i}", 0, "open", price)
        page, _ = await reads.list_positions(db, f"p{i}", None, 10, None)
        body, _ = await reads.list_positions_json(db, f"p{i}", None, 10, None)
        assert page_bytes(body, None) == _python_page(page, None), price


async def test_an_empty_page_is_an_empty_list(db: Database) -> None:
    body, cursor = await reads.list_positions_json(db, "nobody", None, 100, None)
    assert (body, cursor) == ("", None)
    assert page_bytes(body, cursor) == b'{"data":[]}' == _python_page([], None)
    body, cursor = await reads.list_closed_json(db, "nobody", 100, None)
    assert page_bytes(body, cursor) == b'{"data":[]}'


async def test_pages_read_together_are_each_the_python_encoders_bytes(seeded: Database) -> None:
    # web.pages.PageReader: the pages asked for at the same moment come from one query, each
    # its own user's page, byte for byte what the Python encoder writes for it.
    asks: list[tuple[str, str | None, int, str | None]] = []
    for user in USERS:
        for status in (None, "open", "closed"):
            for limit in (1, 5, 500):
                _, cursor = await reads.list_positions(seeded, user, status, limit, None)
                asks += [(user, status, limit, None), (user, status, limit, cursor)]
    asks.append(("nobody", None, 100, None))
    reader = PageReader(seeded.read_only())
    got: dict[int, tuple[str, str | None]] = {}

    async def ask(n: int) -> None:
        got[n] = await reader.get(reads.PageAsk.of(*asks[n]))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for n in range(len(asks)):
                nursery.start_soon(ask, n)
    assert reader.answered == len(asks) and reader.reads < len(asks) / 4
    for n, (user, status, limit, cursor) in enumerate(asks):
        page, expected_cursor = await reads.list_positions(seeded, user, status, limit, cursor)
        body, got_cursor = got[n]
        assert got_cursor == expected_cursor
        assert page_bytes(body, got_cursor) == _python_page(page, expected_cursor)


async def test_an_ask_that_breaks_the_shared_query_fails_alone(seeded: Database) -> None:
    # A user id PostgreSQL refuses as text (the HTTP layer refuses it before: web.schemas);
    # read with others, it must not take their pages down with it (invariant 13).
    reader = PageReader(seeded.read_only())
    good = [reads.PageAsk(user, None, 5) for user in USERS]
    bad = reads.PageAsk("nul\x00user", None, 5)
    results: dict[str, object] = {}

    async def ask(a: reads.PageAsk) -> None:
        try:
            results[a.user_id] = await reader.get(a)
        except Exception as exc:
            results[a.user_id] = exc

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for a in [*good[:2], bad, *good[2:]]:
                nursery.start_soon(ask, a)
    assert isinstance(results.pop(bad.user_id), Exception)
    for a in good:
        assert results[a.user_id] == await reads.list_positions_json(
            seeded, a.user_id, None, 5, None
        )
