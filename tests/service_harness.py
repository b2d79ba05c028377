"""The whole service for end-to-end tests: the real supervision tree (persistence, fanout,
feed, engines, web) on the test database, fed by the real simulator over a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import partial
from typing import Any

import attrs
import httpx
import trio
import trio_websocket

from tickguard.actors.fanout import FanoutConfig
from tickguard.actors.faults import FaultPoints
from tickguard.actors.recovery import RecoveryConfig
from tickguard.actors.supervision import RestartPolicy
from tickguard.config import Settings
from tickguard.sim import Simulator
from tickguard.storage import Database
from tickguard.supervisor import Tree, build_tree
from tickguard.wire import loads


def service_settings(sim: Simulator, **changes: Any) -> Settings:
    """Settings for a test service: any free port, the simulator as Coinbase, short timeouts."""
    base = Settings(
        host="127.0.0.1",
        port=0,
        database_url="postgresql://unused",  # the tree gets the test's Database directly
        coinbase_ws_url=sim.url,
        coinbase_rest_url=sim.rest_url,  # the simulator serves GET /products too
        coinbase_products=("BTC-USD",),
        ws_reconnect_base_ms=20,
        ws_reconnect_max_ms=200,
        ws_heartbeat_timeout_ms=3000,
        shutdown_grace_ms=5000,
        # These tests load positions through the API in bulk (cascades of 1000 from 16
        # clients): the rate limits are off unless a test sets them (tests/test_identity.py).
        rate_limit_per_user=0,
        rate_limit_per_address=0,
        ws_connects_per_address_per_min=0,
    )
    return attrs.evolve(base, **changes)


@attrs.frozen
class Service:
    tree: Tree
    base_url: str
    http: httpx.AsyncClient

    def ws_url(self, user_id: str) -> str:
        return self.base_url.replace("http://", "ws://", 1) + f"/ws?userId={user_id}"

    async def create(self, user: str = "alice", **body: Any) -> dict[str, Any]:
        payload = {"userId": user, "symbol": "BTC-USD", "side": "long", **body}
        response = await self.http.post("/api/positions", json=_jsonable(payload))
        assert response.status_code == 201, response.text
        return loads(response.content)["data"]  # type: ignore[no-any-return]

    async def get(self, user: str, position_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/api/positions/{position_id}", params={"userId": user})
        assert response.status_code == 200, response.text
        return loads(response.content)["data"]  # type: ignore[no-any-return]


def _jsonable(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Decimal) else v) for k, v in payload.items()}


@asynccontextmanager
async def running_service(
    db: Database,
    sim: Simulator,
    *,
    faults: FaultPoints | None = None,
    policy: RestartPolicy = RestartPolicy(),
    fanout_config: FanoutConfig | None = None,
    recovery_config: RecoveryConfig | None = None,
    **settings_changes: Any,
) -> AsyncIterator[Service]:
    """Start the tree on ``db`` against ``sim``; stop it in order on exit."""
    tree = build_tree(
        service_settings(sim, **settings_changes),
        db,
        faults=faults,
        policy=policy,
        fanout_config=fanout_config,
        recovery_config=recovery_config,
    )
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(tree.supervisor.run, stopping=stopping))
        async with httpx.AsyncClient(base_url=tree.urls[0], timeout=30) as http:
            try:
                yield Service(tree, tree.urls[0], http)
            finally:
                stopping.set()


class EventStream:
    """A WebSocket client of one user, collecting every message it receives."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def pump(self) -> None:
        try:
            while True:
                self.messages.append(loads(await self.ws.get_message()))
                self._changed.set()
                self._changed = trio.Event()
        except trio_websocket.ConnectionClosed:
            self._changed.set()

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == type_]

    async def wait_for(self, type_: str, count: int = 1, timeout: float = 15.0) -> list[Any]:
        with trio.fail_after(timeout):
            while len(self.of_type(type_)) < count:
                await self._changed.wait()
        return self.of_type(type_)


@asynccontextmanager
async def event_stream(service: Service, user: str) -> AsyncIterator[EventStream]:
    async with trio_websocket.open_websocket_url(service.ws_url(user)) as ws:
        stream = EventStream(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.pump)
            await stream.wait_for("connection.ready")
            yield stream
            nursery.cancel_scope.cancel()


async def wait_until_live(service: Service, product: str = "BTC-USD") -> None:
    """Until the feed reports the product live (subscribed and ticking or heartbeating)."""
    with trio.fail_after(15):
        while True:
            snapshot = service.tree.feed_status.snapshot()
            if snapshot.get("products", {}).get(product, {}).get("state") == "live":
                return
            await trio.sleep(0.01)
