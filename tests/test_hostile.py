"""Hostile input fails only itself (DESIGN.md invariant 13): each repro of the hardening
issue, against the whole service on a real database, with real sockets."""

from __future__ import annotations

import functools
import socket
from decimal import Decimal
from typing import Any

import httpx
import trio
from fault_helpers import faulty_service
from service_harness import Service, wait_until_live

from tickguard.actors import persistence
from tickguard.actors.mailbox import Mailbox, ask
from tickguard.actors.messages import CreateRequest, CreateResult, NewPosition
from tickguard.sim import open_simulator
from tickguard.storage import Database
from tickguard.web.isolation import ConnectionFailures

SURROGATE_BODY = (
    b'{"userId":"\\ud800","symbol":"BTC-USD","side":"long","entryPrice":65000,'
    b'"takeProfit":66000,"stopLoss":64000}'
)
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
            except persistence.WriteRejected as exc:
                results[user] = exc

        async with trio.open_nursery() as clients:  # queued together: one group
            for user in ("poison-a", "bob\ud800", "poison-b", "carol\x00", "poison-c"):
                clients.start_soon(create, user)
        nursery.cancel_scope.cancel()
    assert isinstance(results["bob\ud800"], persistence.WriteRejected)
    assert isinstance(results["carol\x00"], persistence.WriteRejected)
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
            assert ConnectionFailures.count >= before  # counted, never fatal
