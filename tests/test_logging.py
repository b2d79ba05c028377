"""Structured logs: JSON lines that parse, the request id of each HTTP request, the actor name
on each actor line, and the readable text format."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from positions_factory import open_position
from service_harness import running_service, wait_until_live
from web_harness import make_settings, running_app

from tickguard import logs
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import CloseOutcome, CloseResult, Position
from tickguard.actors.persistence import CLOSES_LOGGED_EACH, log_closes
from tickguard.sim import open_simulator
from tickguard.storage import Database
from tickguard.web.app import AppServices
from tickguard.web.request_ids import HEADER

ISO_UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


class Captured:
    """JSON log lines written to a stream by tickguard's own handler."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def lines(self) -> list[dict[str, Any]]:
        """Every line so far, parsed: a line that is not one JSON object fails the test."""
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


@pytest.fixture
def captured() -> Iterator[Captured]:
    """tickguard's JSON handler on the root logger at DEBUG, for the length of one test."""
    stream = io.StringIO()
    handler = logs.make_handler("json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield Captured(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _services(db: Database, **changes: Any) -> AppServices:
    return AppServices(
        settings=make_settings(),
        db=db,
        persistence=Mailbox("persistence"),
        fanout=Mailbox("fanout"),
        **changes,
    )


CREATE = {"userId": "alice", "symbol": "BTC-USD", "side": "long", "entryPrice": "65000"}


async def test_a_request_id_is_echoed_and_on_every_line_written_for_that_request(
    db: Database, captured: Captured
) -> None:
    # Nobody reads the persistence mailbox: the handler times out and logs a warning.
    async with (
        running_app(_services(db, request_timeout=0.2)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        slow = await client.post("/api/positions", json=CREATE, headers={HEADER: "client.42_A-b"})
        other = await client.get("/health")
    assert slow.status_code == 503
    assert slow.headers[HEADER] == "client.42_A-b"
    assert GENERATED_ID.fullmatch(other.headers[HEADER])

    lines = captured.lines()
    mine = [line for line in lines if line["request_id"] == "client.42_A-b"]
    warning = [line for line in mine if line["logger"] == "tickguard.web"]
    assert [line["message"] for line in warning] == ["request timed out waiting for an actor"]
    assert warning[0]["level"] == "warning"
    [access] = [line for line in mine if line["logger"] == "tickguard.web.access"]
    assert access["message"].startswith("POST /api/positions 503 ")
    [other_access] = [
        line
        for line in lines
        if line["logger"] == "tickguard.web.access" and line["message"].startswith("GET /health")
    ]
    assert other_access["request_id"] == other.headers[HEADER]
    # Lines written outside any request (the server starting) carry none.
    started = [line for line in lines if line["message"].startswith("Running on")]
    assert started and all(line["request_id"] is None for line in started)


@pytest.mark.parametrize(
    "sent", ["x" * 129, "has space", "a/b", "semi;colon", "", 'quote"d', "tab\there"]
)
async def test_an_insane_request_id_is_replaced_by_a_generated_one(db: Database, sent: str) -> None:
    async with (
        running_app(_services(db)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        response = await client.get("/health", headers={HEADER: sent})
    assert response.status_code == 200
    assert GENERATED_ID.fullmatch(response.headers[HEADER])


async def test_sane_ids_up_to_128_characters_are_kept_and_generated_ones_differ(
    db: Database,
) -> None:
    longest = "A-z_0.9" * 18 + "xx"  # 128 characters
    async with (
        running_app(_services(db)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        kept = await client.get("/health", headers={HEADER: longest})
        first = await client.get("/health")
        second = await client.get("/health")
        missing = await client.get("/no/such/route")
    assert len(longest) == 128 and kept.headers[HEADER] == longest
    assert first.headers[HEADER] != second.headers[HEADER]
    # Error responses carry it too.
    assert missing.status_code == 404 and GENERATED_ID.fullmatch(missing.headers[HEADER])


async def test_every_actor_line_names_its_actor(db: Database, captured: Captured) -> None:
    async with (
        open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim,
        running_service(db, sim) as service,
    ):
        await wait_until_live(service)
        response = await service.http.post("/api/positions", json=CREATE, headers={HEADER: "e2e-1"})
        assert response.status_code == 201, response.text
        with trio.fail_after(10):
            while not any(line["logger"] == "tickguard.actors.engine" for line in captured.lines()):
                await trio.sleep(0.01)

    lines = captured.lines()
    actor_lines = [line for line in lines if line["logger"].startswith("tickguard.actors.")]
    assert actor_lines and all(line["actor"] for line in actor_lines)
    by_logger = {line["logger"]: line["actor"] for line in actor_lines}
    assert by_logger["tickguard.actors.engine"] == "engine:BTC-USD"
    # The supervisor's own lines about a child are written in that child's task.
    started = {
        line["message"]: line["actor"]
        for line in lines
        if line["logger"] == "tickguard.supervisor" and line["message"].endswith(": started")
    }
    for child in ("persistence", "fanout", "feed", "engines", "web", "engine:BTC-USD"):
        assert started[f"{child}: started"] == child
    # A request is handled inside the web actor, with its own request id.
    [access] = [
        line for line in lines if line["request_id"] == "e2e-1" and "access" in line["logger"]
    ]
    assert access["actor"] == "web"


def _persistence_lines(captured: Captured, level: str | None = None) -> list[str]:
    return [
        line["message"]
        for line in captured.lines()
        if line["logger"] == "tickguard.actors.persistence"
        and line["message"].startswith("closed ")
        and (level is None or line["level"] == level)
    ]


async def test_each_close_is_logged_at_info_with_id_symbol_reason_price_and_source(
    db: Database, captured: Captured
) -> None:
    async with (
        open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim,
        running_service(db, sim) as service,
    ):
        await wait_until_live(service)
        by_engine = await service.create(entryPrice="65000", takeProfit="66000")
        by_hand = await service.create(entryPrice="65000")
        closed = await service.http.post(
            f"/api/positions/{by_hand['id']}/close",
            json={"userId": "alice", "closePrice": "65010.5"},
        )
        assert closed.status_code == 200, closed.text
        with trio.fail_after(10):
            # The engine may not watch the position yet: trade above the level until it closes.
            while len(_persistence_lines(captured)) < 2:
                sim.publish("BTC-USD", "66001")
                await trio.sleep(0.05)

    assert sorted(_persistence_lines(captured, "info")) == sorted(
        [
            f"closed position {by_engine['id']} BTC-USD take_profit at 66000 (source engine)",
            f"closed position {by_hand['id']} BTC-USD manual at 65010.5 (source api)",
        ]
    )


def _closed(position: Position, reason: str, price: str) -> CloseResult:
    row = attrs.evolve(position, status="closed", close_reason=reason, close_price=Decimal(price))
    return CloseResult(position.id, CloseOutcome.CLOSED, row)


def test_a_small_batch_logs_each_close_and_a_cascade_one_info_line(captured: Captured) -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    small = [
        _closed(open_position("long", created_at=at, sl="99"), "stop_loss", "99")
        for _ in range(CLOSES_LOGGED_EACH)
    ]
    failed = CloseResult(small[0].position_id, CloseOutcome.FAILED)
    log_closes([*small, failed], "engine")
    assert len(_persistence_lines(captured, "info")) == CLOSES_LOGGED_EACH
    assert not _persistence_lines(captured, "debug")

    captured.stream.truncate(0)
    captured.stream.seek(0)
    cascade = [
        _closed(open_position("long", created_at=at, sl="99"), "stop_loss", "99")
        for _ in range(CLOSES_LOGGED_EACH + 1)
    ] + [
        _closed(
            open_position("short", created_at=at, tp="98", symbol="ETH-USD"), "take_profit", "98"
        )
    ]
    log_closes(cascade, "engine")
    assert _persistence_lines(captured, "info") == [
        f"closed {CLOSES_LOGGED_EACH + 2} positions (source engine): "
        f"BTC-USD stop_loss x{CLOSES_LOGGED_EACH + 1}, ETH-USD take_profit x1"
    ]
    each = _persistence_lines(captured, "debug")
    assert len(each) == len(cascade)
    assert (
        each[-1]
        == f"closed position {cascade[-1].position_id} ETH-USD take_profit at 98 (source engine)"
    )


async def test_an_engine_with_one_open_position_says_position(
    db: Database, captured: Captured
) -> None:
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        async with running_service(db, sim) as service:
            await wait_until_live(service)
            await service.create(entryPrice="65000")
        # A restart loads the position from the database.
        captured.stream.truncate(0)
        captured.stream.seek(0)
        async with running_service(db, sim) as service:
            with trio.fail_after(10):
                while not any(
                    line["logger"] == "tickguard.actors.engine" for line in captured.lines()
                ):
                    await trio.sleep(0.01)
    started = [
        line["message"]
        for line in captured.lines()
        if line["logger"] == "tickguard.actors.engine" and "started with" in line["message"]
    ]
    assert started == ["engine BTC-USD started with 1 open position"]


async def test_context_follows_the_task_tree() -> None:
    """A task started inside an actor's task inherits its name; a sibling's name does not leak."""
    seen: dict[str, str | None] = {}

    async def child(name: str) -> None:
        seen[name] = logs.ACTOR.get()

    async def actor(name: str) -> None:
        logs.ACTOR.set(name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child, f"{name}/child")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor, "feed")
        nursery.start_soon(actor, "fanout")
    assert seen == {"feed/child": "feed", "fanout/child": "fanout"}
    assert logs.ACTOR.get() is None


def _record(message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord(
        "tickguard.test",
        logging.ERROR,
        __file__,
        1,
        message,
        ("x",) if "%s" in message else (),
        exc_info,
    )
    logs.ContextFilter().filter(record)
    return record


def test_json_lines_have_every_field_and_stay_on_one_line() -> None:
    token = logs.ACTOR.set("persistence")
    req = logs.REQUEST_ID.set("abc")
    try:
        record = _record("two\nlines %s", exc=True)
    finally:
        logs.ACTOR.reset(token)
        logs.REQUEST_ID.reset(req)
    text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    body = json.loads(text)
    assert ISO_UTC_MS.fullmatch(body["time"])
    assert body["level"] == "error" and body["logger"] == "tickguard.test"
    assert body["message"] == "two\nlines x"
    assert body["actor"] == "persistence" and body["request_id"] == "abc"
    assert "ValueError: boom" in body["exception"]
    plain = json.loads(logs.JsonFormatter().format(_record("fine")))
    assert plain["actor"] is None and plain["request_id"] is None and "exception" not in plain


def test_text_lines_read_time_level_actor_logger_message() -> None:
    token = logs.ACTOR.set("engine:BTC-USD")
    try:
        with_actor = logs.TextFormatter().format(_record("hello %s"))
    finally:
        logs.ACTOR.reset(token)
    time, rest = with_actor.split(" ", 1)
    assert ISO_UTC_MS.fullmatch(time)
    assert rest == "ERROR [engine:BTC-USD] tickguard.test: hello x"
    req = logs.REQUEST_ID.set("r1")
    try:
        in_request = logs.TextFormatter().format(_record("hi"))
    finally:
        logs.REQUEST_ID.reset(req)
    assert in_request.split(" ", 1)[1] == "ERROR [- req=r1] tickguard.test: hi"
    failed = logs.TextFormatter().format(_record("oops", exc=True))
    assert failed.splitlines()[0].endswith("tickguard.test: oops")
    assert "ValueError: boom" in failed


def _run_configured(tmp_path: Path, **env: str) -> str:
    """stderr of a fresh interpreter that configures logging like ``tickguard serve``."""
    script = (
        "import logging\n"
        "from tickguard.cli import configure_logging\n"
        "from tickguard.config import load_settings\n"
        "configure_logging(load_settings())\n"
        "logging.getLogger('tickguard.x').debug('quiet')\n"
        "logging.getLogger('tickguard.x').info('said')\n"
        "logging.getLogger('hypercorn.access').info('noise')\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LOG_", "TICKGUARD_"))}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**clean, **env},
        cwd=tmp_path,  # no .env file here
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr


def test_log_format_and_level_from_the_environment(tmp_path: Path) -> None:
    as_json = _run_configured(tmp_path, LOG_FORMAT="json")
    [line] = [json.loads(text) for text in as_json.splitlines()]
    assert line["message"] == "said" and line["level"] == "info"
    as_text = _run_configured(tmp_path, LOG_LEVEL="debug")
    assert [text.split(" ", 1)[1] for text in as_text.splitlines()] == [
        "DEBUG [-] tickguard.x: quiet",
        "INFO [-] tickguard.x: said",
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_serve_with_json_logs_writes_nothing_but_json_lines(
    database_url: str, tmp_path: Path
) -> None:
    """The real process: every stderr line (hypercorn's included) is one JSON object."""
    port = _free_port()
    stderr = tmp_path / "serve.log"
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("LOG_", "TICKGUARD_"))}
        env = {
            **clean,
            "DATABASE_URL": database_url,
            "PORT": str(port),
            "COINBASE_WS_URL": sim.url,
            "COINBASE_REST_URL": sim.rest_url,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "debug",
        }
        with stderr.open("w") as sink:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tickguard", "serve"], env=env, cwd=tmp_path, stderr=sink
            )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                with trio.fail_after(60):
                    while True:
                        assert process.poll() is None, stderr.read_text()
                        try:
                            if (await client.get("/health")).status_code == 200:
                                break
                        except httpx.TransportError:
                            await trio.sleep(0.1)
                response = await client.get("/metrics", headers={HEADER: "scrape-1"})
                assert response.status_code == 200
        finally:
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                code = await process.wait()
    assert code == 0, stderr.read_text()
    lines = [json.loads(text) for text in stderr.read_text().splitlines()]
    running = [line for line in lines if line["logger"] == "hypercorn.error"]
    assert running and all(line["actor"] == "web" for line in running)
    assert any(
        line["request_id"] == "scrape-1" and line["message"].startswith("GET /metrics 200")
        for line in lines
    )
    assert any(line["actor"] == "feed" for line in lines)
