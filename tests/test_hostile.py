"""Hostile input fails only itself (DESIGN.md invariant 13): each repro of the hardening
issue, against the whole service on a real database, with real sockets."""

from __future__ import annotations

import functools
import socket
from decimal import Decimal
from typing import Any

import httpx
import pytest
import trio
from fault_helpers import faulty_service
from service_harness import Service, wait_until_live
from web_harness import TEST_ORIGIN, running_stack

from tickguard.actors import persistence
from tickguard.actors.mailbox import Mailbox, ask
from tickguard.actors.messages import CreateRequest, CreateResult, NewPosition, WriteRejected
from tickguard.sim import open_simulator
from tickguard.storage import Database
from tickguard.web.isolation import ConnectionFailures

SURROGATE_BODY = (
    b'{"userId":"\\ud800","symbol":"BTC-USD","side":"long","entryPrice":65000,'
    b'"takeProfit":66000,"stopLoss":64000}'
)
GUARD_S = 10.0  # a hang guard, never a speed assertion
VALID = {"symbol": "BTC-USD", "side": "long", "entryPrice": "65000"}


def restarts(service: Service) -> dict[str, int]:
    return dict(service.tree.supervisor.restarts)


async def test_a_lone_surrogate_is_a_400_and_crashes_nothing(db: Database) -> None:
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        async with faulty_service(db, sim) as service:
            headers = {"Content-Type": "application/json"}
            for _ in range(8):  # more than the restart intensity allows
                bad = await service.http.post(
                    "/api/positions", content=SURROGATE_BODY, headers=headers
                )
                assert bad.status_code == 400, bad.text
                assert "userId" in bad.json()["details"]
            close = await service.http.post(
                "/api/positions/00000000-0000-4000-8000-000000000000/close",
                content=b'{"userId":"a\\udfff","closePrice":1}',
                headers=headers,
            )
            assert close.status_code == 400, close.text
            # A surrogate encoded as (invalid) UTF-8 in a query string.
            listed = await service.http.get("/api/positions?userId=%ED%A0%80")
            assert listed.status_code in (200, 400), listed.text
            created = await service.create("alice", **VALID)
            assert created["userId"] == "alice"
            assert restarts(service) == {}


async def test_the_writer_answers_a_poisoned_request_alone(db: Database) -> None:
    """Past the edge (a caller that skipped validation), the persistence actor still fails
    only the request that cannot be stored; the valid ones of the same group commit."""
    inbox: Mailbox[Any] = Mailbox("persistence")
    fanout: Mailbox[Any] = Mailbox("fanout")

    class Engines:
        def send(self, symbol: str, message: Any) -> None:
            pass

    def new(user: str) -> NewPosition:
        return NewPosition(user, "BTC-USD", "long", Decimal("100"), Decimal("110"), Decimal("90"))

    stats = persistence.PersistenceStats()
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(persistence.run, inbox, db, fanout, Engines(), stats=stats)
        )

        async def create(user: str) -> None:
            try:
                results[user] = await ask(inbox, lambda r: CreateRequest(new(user), r), 10)
            except WriteRejected as exc:
                results[user] = exc

        async with trio.open_nursery() as clients:  # queued together: one group
            for user in ("poison-a", "bob\ud800", "poison-b", "carol\x00", "poison-c"):
                clients.start_soon(create, user)
        nursery.cancel_scope.cancel()
    assert isinstance(results["bob\ud800"], WriteRejected)
    assert isinstance(results["carol\x00"], WriteRejected)
    for user in ("poison-a", "poison-b", "poison-c"):
        assert isinstance(results[user], CreateResult) and results[user].created
    assert stats.rejected == 2
    rows = await db.fetch("SELECT user_id FROM positions WHERE user_id LIKE 'poison-%'")
    assert sorted(r["user_id"] for r in rows) == ["poison-a", "poison-b", "poison-c"]


UPGRADE = (
    b"GET /ws?userId=a HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def _send_raw(port: int, data: bytes) -> bytes:
    """One TCP write of ``data``; whatever the server answers before closing (or 2 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return received


async def test_an_upgrade_with_a_frame_in_the_same_write_fails_only_itself(db: Database) -> None:
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        async with faulty_service(db, sim) as service:
            await wait_until_live(service)
            port = httpx.URL(service.base_url).port
            assert port is not None
            before = ConnectionFailures.count
            for trailer in (
                b"\x81\x80\0\0\0\0",  # an empty masked text frame (the hypercorn#225 repro)
                b"\x83\x80\0\0\0\0",  # a reserved opcode
                b"\x81\xfe\xff\xff",  # a truncated 64 KiB frame header
            ):
                for _ in range(4):
                    await trio.to_thread.run_sync(_send_raw, port, UPGRADE + trailer)
                    health = await service.http.get("/health")
                    assert health.status_code == 200
            created = await service.create("alice", **VALID)
            assert created["status"] == "open"
            assert restarts(service) == {}
            assert ConnectionFailures.count > before  # contained and counted, never fatal
            metrics = (await service.http.get("/metrics")).text
            assert "tickguard_http_connections_failed_total" in metrics
            assert "tickguard_writes_rejected_total" in metrics


# --------------------------------------------------------------------------- browsers (CSRF)
NOT_JSON_TYPES = (
    None,  # no Content-Type at all
    "text/plain",  # what a cross-site <form> or fetch() sends without a preflight
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/jsonp",
    "application/json-seq",
)


@pytest.mark.parametrize("content_type", NOT_JSON_TYPES)
async def test_a_body_that_is_not_declared_json_is_415_and_creates_nothing(
    db: Database, content_type: str | None
) -> None:
    body = b'{"userId":"csrf-victim","symbol":"BTC-USD","side":"long","entryPrice":100}'
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as http:
        response = await http.post("/api/positions", content=body, headers=headers)
        assert response.status_code == 415, response.text
        assert response.json() == {"error": "Content-Type must be application/json."}
        listed = await http.get("/api/positions", params={"userId": "csrf-victim"})
        assert listed.json()["data"] == []


async def test_closing_needs_a_json_content_type_too(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as http:
        body = {"userId": "csrf-close", "symbol": "BTC-USD", "side": "long", "entryPrice": 100}
        created = (await http.post("/api/positions", json=body)).json()["data"]
        close = await http.post(
            f"/api/positions/{created['id']}/close",
            content=b'{"userId":"csrf-close","closePrice":101}',
            headers={"Content-Type": "text/plain"},
        )
        assert close.status_code == 415, close.text
        still = await http.get(f"/api/positions/{created['id']}", params={"userId": "csrf-close"})
        assert still.json()["data"]["status"] == "open"


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON;Charset=UTF-8"],
)
async def test_json_with_parameters_or_any_case_is_accepted(
    db: Database, content_type: str
) -> None:
    body = b'{"userId":"json-ok","symbol":"BTC-USD","side":"long","entryPrice":100}'
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as http:
        response = await http.post(
            "/api/positions", content=body, headers={"Content-Type": content_type}
        )
    assert response.status_code == 201, response.text


async def test_unknown_routes_and_wrong_methods_keep_404_and_405(db: Database) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as http:
        missing = await http.post("/api/nope", content=b"x", headers={"Content-Type": "text/plain"})
        wrong = await http.put(
            "/api/positions", content=b"x", headers={"Content-Type": "text/plain"}
        )
        preflight = await http.options(
            "/api/positions",
            headers={"Origin": TEST_ORIGIN, "Access-Control-Request-Method": "POST"},
        )
    assert missing.status_code == 404
    assert wrong.status_code == 405
    assert preflight.status_code == 204


# ------------------------------------------------- early answers end their connection (finding 9)
BIG = 200_000  # well over the 64 KiB limit
HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


async def _read_answer(stream: trio.SocketStream) -> bytes:
    """One HTTP response (head and its Content-Length body) from ``stream``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


async def _after_close(stream: trio.SocketStream, rest: bytes) -> bytes:
    """Send the rest of the body and a second request on the same connection; what comes
    back (``b""`` once the server closed it)."""
    try:
        await stream.send_all(rest)
        await stream.send_all(HEALTH)
        return await stream.receive_some(65536)
    except trio.BrokenResourceError:  # reset by the server: closed, as it should be
        return b""


EARLY = {
    "413 by length": (
        b"POST /api/positions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % BIG,
        413,
    ),
    "413 chunked": (
        b"POST /api/positions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        413,
    ),
    "415": (
        b"POST /api/positions HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\n\r\n" % BIG,
        415,
    ),
    "405": (b"PUT /api/positions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % BIG, 405),
    "404": (b"POST /api/nope HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % BIG, 404),
}


def _chunked(body: bytes, size: int = 10_000) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("case", list(EARLY))
async def test_an_answer_before_the_body_closes_the_connection(db: Database, case: str) -> None:
    """The body is sent slowly: part of it, the answer read, then the rest and a second
    request on the same connection, which must find the connection closed, never hang."""
    head, status = EARLY[case]
    body = b"x" * BIG
    if b"chunked" in head:
        body = _chunked(body)
    async with running_stack(db) as stack:
        port = httpx.URL(stack.base_url).port
        assert port is not None
        with trio.fail_after(GUARD_S):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(head + body[:70_000])
                answer = await _read_answer(stream)
                assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
                assert b"\r\nconnection: close\r\n" in answer.lower()
                assert await _after_close(stream, body[70_000:]) == b""
            async with httpx.AsyncClient(base_url=stack.base_url) as http:
                assert (await http.get("/health")).status_code == 200


async def test_a_request_whose_body_was_read_keeps_its_connection(db: Database) -> None:
    """No needless close: after a complete small body (even a 400 or 415), the same
    connection answers the next request."""
    async with running_stack(db) as stack:
        port = httpx.URL(stack.base_url).port
        assert port is not None
        with trio.fail_after(GUARD_S):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                for content_type in (b"application/json", b"text/plain"):
                    await stream.send_all(
                        b"POST /api/positions HTTP/1.1\r\nHost: t\r\nContent-Type: "
                        + content_type
                        + b"\r\nContent-Length: 2\r\n\r\n{}"
                    )
                    answer = await _read_answer(stream)
                    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 415 ")), answer
                    assert b"connection: close" not in answer.lower()
                await stream.send_all(HEALTH)
                assert (await _read_answer(stream)).startswith(b"HTTP/1.1 200 ")


async def test_a_pooled_client_reusing_its_connection_never_hangs(db: Database) -> None:
    """httpx with one keep-alive connection: oversized and non-JSON bodies sent slowly, each
    followed by a request that must be answered (on a new connection)."""

    async def slow_body() -> Any:
        for _ in range(20):
            yield b"x" * 10_000
            await trio.sleep(0.005)

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with (
        running_stack(db) as stack,
        httpx.AsyncClient(base_url=stack.base_url, limits=limits, timeout=GUARD_S) as http,
    ):
        with trio.fail_after(GUARD_S * 2):
            for content_type in ("application/json", "text/plain") * 3:
                try:
                    early = await http.post(
                        "/api/positions",
                        content=slow_body(),
                        headers={"Content-Type": content_type},
                    )
                    assert early.status_code in (413, 415)
                except httpx.TransportError:
                    pass  # the server closed while the body was still being written
                health = await http.get("/health")
                assert health.status_code == 200
