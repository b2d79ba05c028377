"""Socket-level fuzz: mutated HTTP requests and WebSocket handshakes and frames, as raw bytes.

The whole service runs (supervision tree on the test database, the simulator as Coinbase).
``FUZZ_WORKERS`` raw clients each send seeded random mutations of valid requests, in one write
or split into several writes, and read whatever comes back for a moment. Meanwhile a
well-behaved client creates positions, lists them and keeps a WebSocket session that receives
its events: it must never see an error (a non-2xx answer, a transport error, a closed session
or a gap in its seqs). At the end the supervisor restarted no child and the service answers.

Each case is one of ``CLASSES``; the run records how many of each it sent, and how many
connections hypercorn let fail (``web.isolation.ConnectionFailures``: contained, never fatal).
The CI run is bounded by its case count; ``soak`` runs a longer one.
"""

from __future__ import annotations

import base64
import collections
import os
import random
from collections.abc import Callable, Iterator

import pytest
import trio
from fault_helpers import Figures, Run, faulty_service
from service_harness import EventStream, Service, event_stream, wait_until_live

from tickguard.sim import open_simulator
from tickguard.storage import Database
from tickguard.web.early_answer import EarlyAnswers
from tickguard.web.isolation import ConnectionFailures

CI_CASES = 800
SOAK_CASES = 10_000
FUZZ_WORKERS = 6
READ_S = 0.25  # how long a fuzz client listens for an answer before it hangs up
GUARD_S = 400.0  # hang guard of the whole run (never a speed assertion)

Case = tuple[str, bytes]


# ----------------------------------------------------------------------------- valid bases
def _request(method: bytes, target: bytes, headers: list[bytes], body: bytes = b"") -> bytes:
    head = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", *headers]
    if body:
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


CREATE_BODY = b'{"userId":"fuzz","symbol":"BTC-USD","side":"long","entryPrice":65000}'
VALID_HTTP = (
    _request(b"GET", b"/health", []),
    _request(b"GET", b"/api/positions?userId=fuzz&limit=5", []),
    _request(b"POST", b"/api/positions", [b"Content-Type: application/json"], CREATE_BODY),
    _request(
        b"POST",
        b"/api/positions/00000000-0000-4000-8000-000000000000/close",
        [b"Content-Type: application/json"],
        b'{"userId":"fuzz","closePrice":1}',
    ),
)


def _upgrade(user: bytes = b"fuzz", extra: list[bytes] | None = None) -> bytes:
    key = base64.b64encode(b"0123456789abcdef")
    headers = [
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key,
        b"Sec-WebSocket-Version: 13",
        *(extra or []),
    ]
    return _request(b"GET", b"/ws?userId=" + user, headers)


def _frame(
    rng: random.Random,
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
) -> bytes:
    """One WebSocket frame; ``length`` overrides the declared payload length."""
    declared = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if declared < 126:
        head = bytes([first, mask_bit | declared])
    elif declared < 1 << 16:
        head = bytes([first, mask_bit | 126]) + declared.to_bytes(2, "big")
    else:
        head = bytes([first, mask_bit | 127]) + declared.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = rng.randbytes(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# ----------------------------------------------------------------------------- mutations
def _truncated(rng: random.Random) -> bytes:
    valid = rng.choice(VALID_HTTP)
    return valid[: rng.randrange(1, len(valid))]


def _bad_header(rng: random.Random) -> bytes:
    bad = rng.choice(
        [
            b"No-Colon-Here",
            b": empty-name",
            b"Bad Name: x",
            b"X-Ctl: a\x00b",
            b"X-Bin: " + rng.randbytes(16).replace(b"\r", b"").replace(b"\n", b""),
            b"Content-Length: abc",
            b"Content-Length: -1",
            b"Content-Length: 5\r\nContent-Length: 6",
            b"Transfer-Encoding: gzip, chunked",
            b"Host: a\r\nHost: b",
            b" folded: continuation",
            b"Content-Type: application/json; charset=\xff\xfe",
            b"Expect: 100-continue",
        ]
    )
    return _request(b"POST", b"/api/positions", [bad, b"Content-Type: application/json"], b"{}")


def _huge_header(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return _request(b"GET", b"/health", [b"X-Big: " + b"a" * rng.choice([70_000, 200_000])])
    many = [b"X-H%d: v" % i for i in range(rng.choice([500, 5000]))]
    return _request(b"GET", b"/health", many)


def _bad_chunked(rng: random.Random) -> bytes:
    body = rng.choice(
        [
            b"zz\r\n{}\r\n0\r\n\r\n",  # not hex
            b"2\r\n{}0\r\n\r\n",  # missing CRLF after data
            b"-2\r\n{}\r\n0\r\n\r\n",
            b"ffffffffffffffffffff\r\n{}\r\n",  # a size past any integer type
            b"5\r\n{}\r\n0\r\n\r\n",  # size larger than the data
            b"2;ext=\xff\r\n{}\r\n0\r\n\r\n",
            b"2\r\n{}\r\n",  # never terminated
            b"10001\r\n" + b"x" * 0x10001 + b"\r\n0\r\n\r\n",  # one chunk over 64 KiB
        ]
    )
    head = _request(
        b"POST",
        b"/api/positions",
        [b"Content-Type: application/json", b"Transfer-Encoding: chunked"],
    )
    return head + body


def _bad_method(rng: random.Random) -> bytes:
    method = rng.choice(
        [b"get", b"QUERY", b"BREW", b"G\x00T", b"\xff\xfe", b"POST /x", b"X" * 5000, b""]
    )
    return _request(method, b"/api/positions?userId=fuzz", [])


def _invalid_utf8(rng: random.Random) -> bytes:
    blob = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
    where = rng.randrange(4)
    if where == 0:
        return _request(b"GET", b"/api/positions?userId=" + blob, [])
    if where == 1:
        return _request(b"GET", b"/api/positions/" + blob + b"?userId=a", [])
    if where == 2:
        return _upgrade(user=blob)
    body = CREATE_BODY.replace(b'"fuzz"', b'"fu' + blob + b'"')
    return _request(b"POST", b"/api/positions", [b"Content-Type: application/json"], body)


def _byte_flips(rng: random.Random) -> bytes:
    data = bytearray(rng.choice([*VALID_HTTP, _upgrade()]))
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _oversized_body(rng: random.Random) -> bytes:
    """Declares a body over 64 KiB and sends only part of it: answered 413 early."""
    size = rng.choice([65_537, 200_000, 10_000_000])
    head = _request(
        b"POST",
        b"/api/positions",
        [b"Content-Type: application/json", b"Content-Length: %d" % size],
    )
    return head + b"x" * min(size, rng.choice([0, 1000, 70_000]))


def _pipelined(rng: random.Random) -> bytes:
    return b"".join(rng.choice(VALID_HTTP) for _ in range(rng.randint(2, 6)))


def _bad_handshake(rng: random.Random) -> bytes:
    extra = rng.choice(
        [
            [b"Sec-WebSocket-Version: 8"],
            [b"Sec-WebSocket-Key: short"],
            [b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=99"],
            [b"Sec-WebSocket-Protocol: \xff"],
            [b"Origin: http://evil.example"],
            [b"Origin: null"],
        ]
    )
    data = _upgrade(extra=extra)
    if rng.random() < 0.3:
        data = data.replace(b"Upgrade: websocket\r\n", b"")
    return data


def _upgrade_and_frame(rng: random.Random) -> bytes:
    """The handshake and a frame in the same bytes (hypercorn#225's repro and relatives)."""
    frame = rng.choice(
        [
            b"\x81\x80\0\0\0\0",
            b"\x83\x80\0\0\0\0",
            b"\x81\xfe\xff\xff",
            _frame(rng, 0x1, b'{"type":"ping"}'),
            _frame(rng, 0x8, b"\x03\xe8"),
        ]
    )
    return _upgrade() + frame


def _bad_frames(rng: random.Random) -> bytes:
    """A valid handshake, then hostile frames (sent after the handshake's answer)."""
    frames = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(10)
        if kind == 0:
            frames.append(_frame(rng, rng.choice([3, 4, 5, 6, 7, 11, 12, 15]), b"x"))
        elif kind == 1:
            frames.append(_frame(rng, 0x1, b"{}", rsv=rng.randint(1, 7)))
        elif kind == 2:
            frames.append(_frame(rng, 0x1, b'{"type":"ping"}', masked=False))
        elif kind == 3:
            frames.append(_frame(rng, 0x2, b"", length=rng.choice([1 << 62, 1 << 40, 70_000])))
        elif kind == 4:
            frames.append(_frame(rng, 0x0, b"lone continuation"))
        elif kind == 5:
            frames.append(_frame(rng, 0x1, b"\xff\xfe invalid utf-8"))
        elif kind == 6:
            frames.append(_frame(rng, 0x9, b"p" * 200))  # a control frame over 125 bytes
        elif kind == 7:
            frames.append(_frame(rng, 0x9, b"ping", fin=False))  # a fragmented control frame
        elif kind == 8:
            code = rng.choice([0, 999, 1004, 1005, 1006, 2999, 5000, 65535])
            frames.append(_frame(rng, 0x8, code.to_bytes(2, "big") + b"\xff"))
        else:
            frames.append(rng.randbytes(rng.randint(1, 64)))
    return b"".join(frames)


CLASSES: dict[str, Callable[[random.Random], bytes]] = {
    "truncated request": _truncated,
    "bad header": _bad_header,
    "huge headers": _huge_header,
    "bad chunked body": _bad_chunked,
    "bad method": _bad_method,
    "invalid UTF-8": _invalid_utf8,
    "random byte flips": _byte_flips,
    "pipelined requests": _pipelined,
    "oversized body": _oversized_body,
    "bad WebSocket handshake": _bad_handshake,
    "upgrade + frame in one write": _upgrade_and_frame,
    "hostile WebSocket frames": _bad_frames,
}


def cases(seed: int, count: int) -> Iterator[Case]:
    """``count`` seeded cases: (class, bytes)."""
    rng = random.Random(seed)
    names = sorted(CLASSES)
    for _ in range(count):
        name = rng.choice(names)
        yield name, CLASSES[name](rng)


def _splits(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` in one write (half the time) or cut at 1-5 random points."""
    if len(data) < 2 or rng.random() < 0.5:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 5))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# ----------------------------------------------------------------------------- the clients
class Tally:
    """What the fuzz sent and what the well-behaved client saw."""

    def __init__(self) -> None:
        self.sent: collections.Counter[str] = collections.Counter()
        self.split_writes = 0
        self.good_requests = 0
        self.good_events = 0
        self.errors: list[str] = []


async def _fuzz_one(port: int, name: str, data: bytes, rng: random.Random, tally: Tally) -> None:
    """Send one case on a fresh connection; listen briefly; hang up. Any outcome is fine
    for the case itself (an answer, a close, a reset): only the service's health counts."""
    parts = _splits(rng, data)
    tally.sent[name] += 1
    tally.split_writes += len(parts) > 1
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError as exc:
        tally.errors.append(f"fuzz connect failed: {exc!r}")  # the listener must stay up
        return
    async with stream:
        try:
            if name == "hostile WebSocket frames":
                await stream.send_all(_upgrade())
                with trio.move_on_after(READ_S):
                    await stream.receive_some(4096)  # the 101 (or a refusal)
            for part in parts:
                await stream.send_all(part)
                if len(parts) > 1:
                    await trio.sleep(rng.random() * 0.01)
            with trio.move_on_after(READ_S):
                while await stream.receive_some(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the server refused or reset this connection: that is its right


async def _fuzzer(port: int, work: list[Case], seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    for name, data in work:
        await _fuzz_one(port, name, data, rng, tally)


async def _well_behaved(
    service: Service, stream: EventStream, tally: Tally, done: trio.Event
) -> None:
    """Creates, lists and closes positions of one user until ``done``; every answer must be a
    success and every change must reach its WebSocket session, in seq order."""
    user = "good-client"
    created = 0
    while not done.is_set():
        for request in (
            service.http.post(
                "/api/positions",
                json={"userId": user, "symbol": "BTC-USD", "side": "long", "entryPrice": "100"},
            ),
            service.http.get("/api/positions", params={"userId": user, "limit": 5}),
        ):
            try:
                response = await request
            except Exception as exc:  # noqa: BLE001 -- any failure is this test's finding
                tally.errors.append(f"good client: {exc!r}")
                continue
            tally.good_requests += 1
            if response.status_code >= 300:
                tally.errors.append(f"good client: {response.status_code} {response.text}")
            elif response.request.method == "POST":
                created += 1
        try:
            await stream.wait_for("position.created", created, timeout=30)
        except trio.TooSlowError:
            tally.errors.append(f"good client: {created} created, events missing")
    tally.good_events = len(stream.of_type("position.created"))
    seqs = [m["seq"] for m in stream.messages if "seq" in m]
    if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
        tally.errors.append(f"good client: seqs not consecutive: {seqs[:20]}...")
    if stream.of_type("connection.ready") != stream.messages[:1]:
        tally.errors.append("good client: the session was re-established or closed")


async def run_fuzz(db: Database, seed: int, count: int) -> tuple[Tally, int, int, float]:
    """The fuzz against a fresh service; the tally, the contained connection failures, the
    early answers and the seconds it took."""
    tally = Tally()
    work = list(cases(seed, count))
    async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
        # The well-behaved client creates positions for as long as the fuzz runs: how many
        # depends on the speed of the machine and the server, never on the per-user cap.
        async with faulty_service(db, sim, max_open_positions_per_user=10**6) as service:
            await wait_until_live(service)
            port = int(service.base_url.rsplit(":", 1)[1])
            failures, early = ConnectionFailures.count, EarlyAnswers.count
            started = trio.current_time()
            done = trio.Event()
            with trio.fail_after(GUARD_S):
                async with event_stream(service, "good-client") as stream:
                    async with trio.open_nursery() as good:
                        good.start_soon(_well_behaved, service, stream, tally, done)
                        async with trio.open_nursery() as fuzz:
                            for w in range(FUZZ_WORKERS):
                                fuzz.start_soon(
                                    _fuzzer, port, work[w::FUZZ_WORKERS], seed + w, tally
                                )
                        done.set()
                    if stream.ws.closed is not None:
                        tally.errors.append(f"good client: session closed {stream.ws.closed}")
            elapsed = trio.current_time() - started
            health = await service.http.get("/health")
            if health.status_code != 200:
                tally.errors.append(f"/health answered {health.status_code}")
            restarts = dict(service.tree.supervisor.restarts)
            if restarts:
                tally.errors.append(f"the supervisor restarted {restarts}")
    return tally, ConnectionFailures.count - failures, EarlyAnswers.count - early, elapsed


@pytest.fixture(scope="module")
def figures() -> Iterator[Figures]:
    collected = Figures()
    yield collected
    collected.flush()


def _report(tally: Tally, failures: int, early: int, elapsed: float, seed: int) -> None:
    by_class = ", ".join(f"{name} {n}" for name, n in sorted(tally.sent.items()))
    print(
        f"\nsocket fuzz seed {seed}: {sum(tally.sent.values())} cases in {elapsed:.1f} s "
        f"({tally.split_writes} in split writes): {by_class}; contained connection failures "
        f"{failures}; early answers closed {early}; well-behaved client: "
        f"{tally.good_requests} requests, {tally.good_events} events, {len(tally.errors)} errors"
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_socket_fuzz_harms_no_other_client_and_restarts_nothing(
    db: Database, figures: Figures
) -> None:
    seed = int(os.environ.get("FUZZ_SEED", "1"))
    tally, failures, early, elapsed = await run_fuzz(db, seed, CI_CASES)
    _report(tally, failures, early, elapsed, seed)
    run = figures.record(Run("socket fuzz (raw HTTP/WS bytes)", f"{CI_CASES} cases, seed {seed}"))
    run.fuzz_cases = sum(tally.sent.values())
    run.faults_injected = run.fuzz_cases
    run.server_errors = len(tally.errors)
    assert tally.errors == []
    assert sum(tally.sent.values()) == CI_CASES and set(tally.sent) == set(CLASSES)
    assert tally.good_requests > 0 and tally.good_events > 0


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_socket_fuzz_soak(db: Database, figures: Figures) -> None:
    seed = int(os.environ.get("FUZZ_SEED", "7"))
    tally, failures, early, elapsed = await run_fuzz(db, seed, SOAK_CASES)
    _report(tally, failures, early, elapsed, seed)
    run = figures.record(Run("socket fuzz (raw HTTP/WS bytes)", f"soak {SOAK_CASES}, seed {seed}"))
    run.fuzz_cases = sum(tally.sent.values())
    run.server_errors = len(tally.errors)
    assert tally.errors == []
