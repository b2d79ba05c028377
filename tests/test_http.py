"""The HTTP contract of API.md over real sockets: the server runs on a free port, the client is
httpx, positions go through the real persistence actor into the test database."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import httpx
import pytest
import trio
from web_harness import (
    TEST_ORIGIN,
    make_settings,
    running_app,
    running_stack,
    services_without_database,
)

from tickguard.actors.feed_status import FeedStatus
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.window import WindowSlots
from tickguard.storage import Database
from tickguard.web import routes
from tickguard.web.app import AppServices, create_app
from tickguard.web.openapi import ROUTES, document
from tickguard.wire import dumps, loads, position_to_json

USER = "alice"


def _body(response: httpx.Response) -> Any:
    """The JSON body with numbers as Decimal (never through float)."""
    return loads(response.content)


def _long(**changes: Any) -> dict[str, Any]:
    body = {
        "userId": USER,
        "symbol": "BTC-USD",
        "side": "long",
        "entryPrice": 65000,
        "takeProfit": 70000,
        "stopLoss": 60000,
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


async def _post_raw(client: httpx.AsyncClient, path: str, text: str, **kw: Any) -> httpx.Response:
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return await client.post(path, content=text.encode(), headers=headers, **kw)


# --- skeleton ----------------------------------------------------------------------------------


async def test_health_answers_ok(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True and body["service"] == "tickguard"
    assert body["timestamp"].endswith("Z") and len(body["timestamp"]) == 24


async def test_ready_reports_database_and_feed(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        assert isinstance(stack.services.feed_status, FeedStatus)
        stack.services.feed_status.product("BTC-USD").state = "live"
        response = await client.get("/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    assert body["feed"]["products"]["BTC-USD"]["state"] == "live"


async def test_ready_is_503_when_the_database_does_not_answer(
    db: Database, database_url: str
) -> None:
    services = await services_without_database(database_url)
    async with running_app(services) as url, httpx.AsyncClient(base_url=url) as client:
        ready = await client.get("/ready")
        listing = await client.get("/api/positions", params={"userId": USER})
    assert ready.status_code == 503
    assert ready.json()["ok"] is False and "feed" in ready.json()
    assert listing.status_code == 503
    assert listing.json() == {"error": "Database unavailable."}
    assert listing.headers["Retry-After"].isdigit()


async def test_unknown_route_wrong_method_bad_json_and_big_body(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        missing = await client.get("/nope")
        wrong = await client.delete("/api/positions")
        not_json = await _post_raw(client, "/api/positions", "{userId: 1")
        empty = await _post_raw(client, "/api/positions", "")
        nan = await _post_raw(client, "/api/positions", '{"entryPrice": NaN}')
        big = await _post_raw(client, "/api/positions", json.dumps({"x": "a" * 70_000}))
        not_object = await _post_raw(client, "/api/positions", "[1, 2]")
    assert (missing.status_code, missing.json()) == (404, {"error": "Not found."})
    assert (wrong.status_code, wrong.json()) == (405, {"error": "Method not allowed."})
    assert "POST" in wrong.headers["Allow"]
    for response in (not_json, empty, nan):
        assert response.status_code == 400
        assert response.json() == {"error": "The request body is not valid JSON."}
    assert big.status_code == 413
    assert big.json() == {"error": "The request body is larger than 64 KiB."}
    assert not_object.status_code == 400
    assert not_object.json()["error"] == "The request body must be a JSON object."


async def test_internal_error_is_opaque_and_logged(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenFeedStatus:
        def snapshot(self) -> dict[str, Any]:
            raise RuntimeError("secret detail from deep inside")

        def product_state(self, symbol: str) -> str | None:
            raise RuntimeError("secret detail from deep inside")

        def watching(self, symbol: str) -> bool:
            raise RuntimeError("secret detail from deep inside")

    services = AppServices(
        settings=make_settings(),
        db=db,
        persistence=Mailbox("persistence"),
        fanout=Mailbox("fanout"),
        feed_status=BrokenFeedStatus(),
    )
    async with running_app(services) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/ready")
    assert response.status_code == 500
    assert response.json() == {"error": "Internal error."}
    assert "secret detail" not in response.text
    assert any("secret detail from deep inside" in (r.exc_text or "") for r in caplog.records)


async def test_cors_allows_listed_origins_and_answers_preflight(db: Database) -> None:
    settings = make_settings(cors_origins=(TEST_ORIGIN, "https://app.example.com"))
    async with (
        running_stack(db, settings=settings) as stack,
        httpx.AsyncClient(base_url=stack.base_url) as client,
    ):
        allowed = await client.get("/health", headers={"Origin": "https://app.example.com"})
        other = await client.get("/health", headers={"Origin": "https://evil.example"})
        preflight = await client.options(
            "/api/positions",
            headers={
                "Origin": TEST_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        error = await client.get("/api/positions", headers={"Origin": TEST_ORIGIN})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Access-Control-Allow-Origin" not in other.headers
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == TEST_ORIGIN
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "content-type" in preflight.headers["Access-Control-Allow-Headers"].lower()
    # Errors carry CORS headers too, or the browser would hide the message from the app.
    assert error.status_code == 400
    assert error.headers["Access-Control-Allow-Origin"] == TEST_ORIGIN
    # A listed-origins answer depends on Origin: caches must keep them apart, refused or not.
    for response in (allowed, other, preflight, error):
        assert response.headers.get_list("Vary") == ["Origin"]
    assert preflight.headers["Access-Control-Max-Age"] == "600"
    assert "Access-Control-Allow-Methods" not in allowed.headers


async def test_any_origin_cors_needs_no_vary(db: Database) -> None:
    settings = make_settings(cors_origins=("*",))
    async with (
        running_stack(db, settings=settings) as stack,
        httpx.AsyncClient(base_url=stack.base_url) as client,
    ):
        answer = await client.get("/health", headers={"Origin": "https://anywhere.example"})
        bare = await client.get("/health")
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "X-Request-Id" in answer.headers["Access-Control-Expose-Headers"]
    assert "Vary" not in answer.headers and "Vary" not in bare.headers
    assert "Access-Control-Allow-Origin" not in bare.headers


# --- create: validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"userId": ...}, "userId"),
        ({"userId": ""}, "userId"),
        ({"userId": "x" * 129}, "userId"),
        ({"userId": "bad\nname"}, "userId"),
        ({"userId": 42}, "userId"),
        ({"symbol": ...}, "symbol"),
        ({"symbol": "BTCUSD"}, "symbol"),
        ({"symbol": "BTC-USD-X"}, "symbol"),
        ({"symbol": "BTC_USD"}, "symbol"),
        ({"side": "LONG"}, "side"),
        ({"side": ...}, "side"),
        ({"entryPrice": 0}, "entryPrice"),
        ({"entryPrice": -1}, "entryPrice"),
        ({"entryPrice": True}, "entryPrice"),
        ({"entryPrice": "abc"}, "entryPrice"),
        ({"entryPrice": "NaN"}, "entryPrice"),
        ({"entryPrice": "Infinity"}, "entryPrice"),
        ({"entryPrice": [65000]}, "entryPrice"),
        ({"takeProfit": False}, "takeProfit"),
        ({"stopLoss": "0"}, "stopLoss"),
    ],
)
async def test_create_rejects_each_bad_field(
    db: Database, changes: dict[str, Any], field: str
) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        response = await client.post("/api/positions", json=_long(**changes))
        listing = await client.get("/api/positions", params={"userId": USER})
    assert response.status_code == 400
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert field in body["details"]
    assert listing.json() == {"data": []}


@pytest.mark.parametrize(
    "text",
    [
        "1e10",
        "10000000000",
        "1E+400",
        "1e-9",
        "0.0000000049999",
        "9999999999.999999995",
        '"9999999999.999999995"',
        '"1e10"',
        '"1e2"',  # strings are plain notation; numbers may carry an exponent
        '" 42.25 "',
        '"0.000000001"',
        "0.000000001",
        "-0.5",
        "1.000000000000000000000000000001",  # 31 significant digits
    ],
)
async def test_create_rejects_prices_outside_numeric_18_8(db: Database, text: str) -> None:
    raw = f'{{"userId": "{USER}", "symbol": "BTC-USD", "side": "long", "entryPrice": {text}}}'
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        response = await _post_raw(client, "/api/positions", raw)
    assert response.status_code == 400
    assert "entryPrice" in response.json()["details"]


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ('"65000.5"', "65000.5"),
        ("65000.5", "65000.5"),
        ("9999999999.99999999", "9999999999.99999999"),
        ("0.00000001", "0.00000001"),
        ("1.100000000", "1.1"),
        ("1E+2", "100"),
        ("1.2345e3", "1234.5"),
        # Float noise from the app's JavaScript: rounded half away from zero to 8 places.
        ("64444.06724999999", "64444.06725"),
        ('"64444.06724999999"', "64444.06725"),
        ("65000.123456789", "65000.12345679"),
        ('"65000.123456785"', "65000.12345679"),
        ("0.000000005", "0.00000001"),
        ("9999999999.999999994999", "9999999999.99999999"),
        ("1.00000000000000000000000000001", "1"),  # 30 significant digits
        ('"0065000.50000"', "65000.5"),
    ],
)
async def test_create_accepts_exact_prices(db: Database, text: str, stored: str) -> None:
    raw = f'{{"userId": "{USER}", "symbol": "btc-usd", "side": "long", "entryPrice": {text}}}'
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        response = await _post_raw(client, "/api/positions", raw)
    assert response.status_code == 201, response.text
    # The number on the wire is the exact decimal, written as a JSON number (not a string).
    written = re.search(r'"entryPrice":([^,]+),', response.text)
    assert written is not None and not written.group(1).startswith('"')
    assert Decimal(written.group(1)) == Decimal(stored)
    assert _body(response)["data"]["entryPrice"] == Decimal(stored)
    assert _body(response)["data"]["symbol"] == "BTC-USD"


@pytest.mark.parametrize(
    ("changes", "message", "field"),
    [
        (
            {"side": "long", "takeProfit": 65000},
            "For long positions, takeProfit must be above entryPrice.",
            "takeProfit",
        ),
        (
            {"side": "short", "takeProfit": 70000, "stopLoss": None},
            "For short positions, takeProfit must be below entryPrice.",
            "takeProfit",
        ),
        (
            {"side": "long", "stopLoss": 65000},
            "For long positions, stopLoss must be below entryPrice.",
            "stopLoss",
        ),
        (
            {"side": "short", "takeProfit": 60000, "stopLoss": "64999.99999999"},
            "For short positions, stopLoss must be above entryPrice.",
            "stopLoss",
        ),
    ],
)
async def test_bracket_rules_give_the_exact_messages(
    db: Database, changes: dict[str, Any], message: str, field: str
) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        response = await client.post("/api/positions", json=_long(**changes))
    assert response.status_code == 400
    assert response.json() == {"error": message, "details": {field: message}}


async def test_bracket_is_optional_and_exact_edges_pass(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        bare = await client.post(
            "/api/positions", json=_long(takeProfit=None, stopLoss=..., side="short")
        )
        edge = await client.post(
            "/api/positions",
            json=_long(takeProfit="65000.00000001", stopLoss="64999.99999999"),
        )
    assert bare.status_code == 201
    assert bare.json()["data"]["takeProfit"] is None and bare.json()["data"]["stopLoss"] is None
    assert edge.status_code == 201, edge.text
    assert _body(edge)["data"]["takeProfit"] == Decimal("65000.00000001")


async def test_entry_price_defaults_to_the_feeds_last_price(db: Database) -> None:
    slots = WindowSlots()
    from datetime import UTC, datetime

    slots.get("ETH-USD").put(Decimal("3000.25"), 1, datetime.now(UTC))
    async with (
        running_stack(db, slots=slots) as stack,
        httpx.AsyncClient(base_url=stack.base_url) as client,
    ):
        priced = await client.post(
            "/api/positions",
            json=_long(symbol="eth-usd", entryPrice=..., takeProfit=3100, stopLoss=2900),
        )
        crossed = await client.post(
            "/api/positions",
            json=_long(symbol="ETH-USD", entryPrice=None, takeProfit=3000, stopLoss=None),
        )
        unpriced = await client.post(
            "/api/positions", json=_long(symbol="SOL-USD", entryPrice=None, takeProfit=None)
        )
    assert priced.status_code == 201, priced.text
    assert _body(priced)["data"]["entryPrice"] == Decimal("3000.25")
    # The bracket is judged against the price the feed supplied.
    assert crossed.status_code == 400 and crossed.json()["error"] == routes.LONG_TP
    assert unpriced.status_code == 400
    assert "SOL-USD" in unpriced.json()["error"]


# --- create: the write path --------------------------------------------------------------------


async def test_create_commits_and_lists_newest_first(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        first = await client.post("/api/positions", json=_long())
        second = await client.post(
            "/api/positions", json=_long(side="short", takeProfit=None, stopLoss=66000)
        )
        listing = await client.get("/api/positions", params={"userId": USER})
        other_user = await client.get("/api/positions", params={"userId": "bob"})
    assert first.status_code == second.status_code == 201
    created = first.json()["data"]
    assert set(created) >= {
        "id", "userId", "symbol", "side", "entryPrice", "takeProfit", "stopLoss", "status",
        "closePrice", "closeReason", "createdAt", "updatedAt", "closedAt",
    }  # fmt: skip
    assert created["status"] == "open" and created["closePrice"] is None
    ids = [p["id"] for p in listing.json()["data"]]
    assert ids == [second.json()["data"]["id"], created["id"]]
    assert other_user.json() == {"data": []}
    # Persistence told the engine of that symbol to watch each new position.
    assert [s for s, _ in stack.engines.sent] == ["BTC-USD", "BTC-USD"]


async def test_idempotency_key_replays_the_first_position(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        headers = {"Idempotency-Key": "order-17"}
        first = await client.post("/api/positions", json=_long(), headers=headers)
        again = await client.post("/api/positions", json=_long(), headers=headers)
        bad_key = await client.post("/api/positions", json=_long(), headers={"Idempotency-Key": ""})
        listing = await client.get("/api/positions", params={"userId": USER})
    assert first.status_code == again.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["data"]["id"] == first.json()["data"]["id"]
    assert bad_key.status_code == 400
    assert len(listing.json()["data"]) == 1


async def test_an_idempotency_key_reused_with_another_body_is_a_422(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        headers = {"Idempotency-Key": "order-18"}
        first = await client.post("/api/positions", json=_long(), headers=headers)
        # The same request written differently (string price, lower-case symbol) is a replay.
        same = await client.post(
            "/api/positions",
            json=_long(entryPrice="65000.000", symbol="btc-usd"),
            headers=headers,
        )
        other = await client.post("/api/positions", json=_long(takeProfit=71000), headers=headers)
        listing = await client.get("/api/positions", params={"userId": USER})
    assert first.status_code == 201
    assert same.status_code == 201 and same.headers["Idempotent-Replayed"] == "true"
    assert same.json()["data"]["id"] == first.json()["data"]["id"]
    assert other.status_code == 422
    assert isinstance(other.json()["error"], str) and "Idempotency-Key" in other.json()["details"]
    assert len(listing.json()["data"]) == 1


async def test_a_create_says_when_the_feed_does_not_watch_the_symbol_live(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        status = stack.services.feed_status
        assert isinstance(status, FeedStatus)
        unknown = await client.post("/api/positions", json=_long(), headers={"Origin": TEST_ORIGIN})
        status.product("BTC-USD").state = "stale"
        stale = await client.post("/api/positions", json=_long())
        status.product("BTC-USD").state = "live"
        live = await client.post("/api/positions", json=_long())
    assert unknown.status_code == stale.status_code == live.status_code == 201
    assert unknown.headers["X-Feed-Status"] == "connecting"
    # The app in the browser can read it (a CORS response exposes only the listed headers).
    assert "X-Feed-Status" in unknown.headers["Access-Control-Expose-Headers"]
    assert stale.headers["X-Feed-Status"] == "stale"
    assert "X-Feed-Status" not in live.headers


async def test_open_position_cap_is_a_400(db: Database) -> None:
    settings = make_settings(max_open_positions_per_user=1)
    async with (
        running_stack(db, settings=settings) as stack,
        httpx.AsyncClient(base_url=stack.base_url) as client,
    ):
        ok = await client.post("/api/positions", json=_long())
        over = await client.post("/api/positions", json=_long())
    assert ok.status_code == 201
    assert over.status_code == 400
    assert over.json() == {"error": "At most 1 open position is allowed per user."}


async def test_an_actor_that_does_not_answer_is_a_503_not_a_hang(db: Database) -> None:
    services = AppServices(
        settings=make_settings(),
        db=db,
        persistence=Mailbox("persistence"),  # nobody reads it
        fanout=Mailbox("fanout"),
        request_timeout=0.2,
    )
    async with running_app(services) as url, httpx.AsyncClient(base_url=url) as client:
        with trio.fail_after(10):
            response = await client.post("/api/positions", json=_long())
    assert response.status_code == 503
    assert response.headers["Retry-After"].isdigit()


# --- reads and close ---------------------------------------------------------------------------


async def test_list_pages_with_cursor_and_validates_query(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        for _ in range(3):
            assert (await client.post("/api/positions", json=_long())).status_code == 201
        page1 = (await client.get("/api/positions", params={"userId": USER, "limit": 2})).json()
        page2 = (
            await client.get(
                "/api/positions",
                params={"userId": USER, "limit": 2, "cursor": page1["nextCursor"]},
            )
        ).json()
        bad = [
            await client.get("/api/positions", params=params)
            for params in (
                {},
                {"userId": USER, "limit": 0},
                {"userId": USER, "limit": 1001},
                {"userId": USER, "limit": "ten"},
                {"userId": USER, "status": "pending"},
                {"userId": USER, "cursor": "not-a-cursor"},
            )
        ]
        opened = await client.get("/api/positions", params={"userId": USER, "status": "open"})
        closed = await client.get("/api/positions", params={"userId": USER, "status": "closed"})
    assert len(page1["data"]) == 2 and "nextCursor" not in page2
    assert len(page2["data"]) == 1
    assert {p["id"] for p in page1["data"]}.isdisjoint(p["id"] for p in page2["data"])
    for response in bad:
        assert response.status_code == 400, response.text
        assert isinstance(response.json()["error"], str)
    assert len(opened.json()["data"]) == 3 and closed.json() == {"data": []}


async def test_a_list_without_limit_is_the_whole_list(db: Database) -> None:
    from tickguard.actors.messages import NewPosition
    from tickguard.storage import writes

    many = [NewPosition(USER, "BTC-USD", "long", Decimal(65000), None, None) for _ in range(600)]
    await writes.create_positions(db, many, max_open_per_user=1000)
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        whole = await client.get("/api/positions", params={"userId": USER})
        opened = await client.get("/api/positions", params={"userId": USER, "status": "open"})
        paged = await client.get("/api/positions", params={"userId": USER, "limit": 1000})
        small = await client.get("/api/positions", params={"userId": USER, "limit": 250})
    # The old backend's React client never pages: without limit it gets every row (up to
    # schemas.LIST_BOUND, tested on storage), and no cursor.
    assert len(whole.json()["data"]) == 600 and "nextCursor" not in whole.json()
    assert len(opened.json()["data"]) == 600
    assert len(paged.json()["data"]) == 600 and "nextCursor" not in paged.json()
    assert len(small.json()["data"]) == 250 and "nextCursor" in small.json()


async def test_a_forged_cursor_is_a_400(db: Database) -> None:
    import base64
    import uuid

    forged = base64.b64encode(f"0001-01-01T00:00:00+14:00|{uuid.uuid4()}".encode()).decode()
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        answers = [
            await client.get(path, params={"userId": USER, "cursor": cursor})
            for path in ("/api/positions", "/api/positions/closed")
            for cursor in (forged, forged.rstrip("="), "1." + "z" * 32, "x" * 600)
        ]
    for response in answers:
        assert response.status_code == 400, response.text
        assert response.json() == {
            "error": "cursor is not valid.",
            "details": {"cursor": "cursor is not valid."},
        }


async def test_close_then_read_back_and_the_error_order(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        pid = (await client.post("/api/positions", json=_long())).json()["data"]["id"]
        close = {"userId": USER, "closePrice": "66000.5"}
        someone_else = await client.post(
            f"/api/positions/{pid}/close", json={**close, "userId": "bob"}
        )
        closed = await client.post(f"/api/positions/{pid}/close", json=close)
        again = await client.post(f"/api/positions/{pid}/close", json=close)
        unknown = await client.post(
            "/api/positions/00000000-0000-4000-8000-000000000000/close", json=close
        )
        malformed = await client.post("/api/positions/42/close", json=close)
        malformed_and_bad = await client.post("/api/positions/42/close", json={"userId": USER})
        bad_body_known_id = await client.post(
            f"/api/positions/{pid}/close", json={**close, "reason": "take_profit"}
        )
        one = await client.get(f"/api/positions/{pid}", params={"userId": USER})
        not_mine = await client.get(f"/api/positions/{pid}", params={"userId": "bob"})
        bad_id = await client.get("/api/positions/xyz", params={"userId": USER})
        closed_list = await client.get("/api/positions/closed", params={"userId": USER})
    assert someone_else.status_code == 404
    assert closed.status_code == 200
    data = _body(closed)["data"]
    assert data["status"] == "closed" and data["closeReason"] == "manual"
    assert data["closePrice"] == Decimal("66000.5") and data["closedAt"].endswith("Z")
    assert (again.status_code, again.json()) == (409, {"error": "Position is already closed."})
    assert (unknown.status_code, unknown.json()) == (404, {"error": "Position not found."})
    assert malformed.status_code == 400 and "id" in malformed.json()["details"]
    assert malformed_and_bad.status_code == 400
    assert set(malformed_and_bad.json()["details"]) == {"id", "closePrice"}
    # A body error on a closed position is still a 400: validation comes before the lookup.
    assert bad_body_known_id.status_code == 400 and "reason" in bad_body_known_id.json()["details"]
    assert one.status_code == 200 and one.json()["data"]["status"] == "closed"
    assert (not_mine.status_code, not_mine.json()) == (404, {"error": "Position not found."})
    assert bad_id.status_code == 400
    assert [p["id"] for p in closed_list.json()["data"]] == [pid]


async def test_system_close_reason(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        pid = (await client.post("/api/positions", json=_long())).json()["data"]["id"]
        closed = await client.post(
            f"/api/positions/{pid}/close",
            json={"userId": USER, "closePrice": 65000, "reason": "system"},
        )
    assert closed.json()["data"]["closeReason"] == "system"


# --- OpenAPI -----------------------------------------------------------------------------------


async def test_openapi_documents_every_route_and_error(db: Database) -> None:
    services = AppServices(
        settings=make_settings(), db=db, persistence=Mailbox("p"), fanout=Mailbox("f")
    )
    app = create_app(services)
    served = {
        (method.lower(), rule.rule.replace("<position_id>", "{id}"))
        for rule in app.url_map.iter_rules()
        # The API's routes; the dashboard's static files are not part of the API document.
        if rule.endpoint != "static" and not rule.endpoint.startswith("dashboard.")
        for method in (rule.methods or ())
        if method not in ("HEAD", "OPTIONS")
    }
    served |= {("get", rule.rule) for rule in app.url_map.iter_rules() if rule.websocket}
    documented = {(r.method, r.path) for r in ROUTES}
    assert served == documented

    async with running_app(services) as url, httpx.AsyncClient(base_url=url) as client:
        spec = (await client.get("/openapi.json")).json()
    assert spec == json.loads(dumps(document()))
    create = spec["paths"]["/api/positions"]["post"]
    assert {"201", "400", "404", "405", "413", "500", "503"} <= set(create["responses"])
    close = spec["paths"]["/api/positions/{id}/close"]["post"]
    assert {"200", "400", "404", "409", "503"} <= set(close["responses"])
    body = spec["components"]["schemas"]["CreatePosition"]
    assert set(body["required"]) == {"userId", "symbol", "side"}
    assert set(body["properties"]) == {
        "userId", "symbol", "side", "entryPrice", "takeProfit", "stopLoss"
    }  # fmt: skip


def test_openapi_position_matches_what_the_wire_writes() -> None:
    import uuid
    from datetime import UTC, datetime

    from tickguard.actors.messages import Position

    now = datetime.now(UTC)
    position = Position(
        uuid.uuid4(), USER, "BTC-USD", "long", Decimal(1), None, None, "open", None, None, now,
        now, None,
    )  # fmt: skip
    schema = document()["components"]["schemas"]["Position"]
    assert set(position_to_json(position)) == set(schema["properties"])
    assert set(schema["required"]) <= set(position_to_json(position))


def test_bracket_messages_are_the_compatible_ones() -> None:
    assert routes.bracket_error("long", Decimal(10), Decimal(10), None) == routes.LONG_TP
    assert routes.bracket_error("short", Decimal(10), None, Decimal(10)) == routes.SHORT_SL
    assert routes.bracket_error("long", Decimal(10), Decimal(11), Decimal(9)) is None


async def test_a_doubled_slash_is_a_json_404_not_an_html_redirect(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as client:
        base = httpx.URL(stack.base_url)

        async def get(path: str) -> httpx.Response:
            # The raw path as sent: httpx would read "//health" as a host ("network-path").
            return await client.get(base.copy_with(raw_path=f"{path}?userId={USER}".encode()))

        answers = [await get(p) for p in ("/assets//x", "/assets//index.js", "/api//positions")]
        root = await get("//health")
    for response in answers:
        assert response.status_code == 404, (response.url, response.status_code, response.text)
        assert response.headers["Content-Type"].startswith("application/json")
        assert isinstance(response.json()["error"], str)
    # A doubled slash at the root reaches the route (the server normalises the request
    # target's leading slashes); never a redirect, never HTML.
    assert root.status_code in (200, 404)
    assert root.headers["Content-Type"].startswith("application/json")
