"""Identity on the REST API (web/identity.py), against the whole service with a real JWKS server
on a local socket and real RSA and P-256 keys: who may call /api/*, who acts, whose positions
they see, the rate limits, and that no token reaches a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
import trio_websocket
from cryptography.hazmat.primitives import serialization
from jwks_server import SigningKey, jwks, serve_jwks
from service_harness import Service, running_service, wait_until_live
from web_harness import make_settings, running_stack

from tickguard import logs
from tickguard.sim import open_simulator
from tickguard.storage import Database

ISSUER = "https://idp.test/"
AUDIENCE = "tickguard"
RSA = SigningKey.rsa("rsa-1")
EC = SigningKey.ec("ec-1")
STRANGER = SigningKey.rsa("rsa-1")  # same kid as RSA, another key: a forged signature

GUARD_S = 60.0  # hang guard of a test's service work, never a speed assertion


def claims(sub: str = "alice", **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": sub,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def alice() -> str:
    return RSA.sign(claims("alice"))


def bob() -> str:
    return EC.sign(claims("bob"))


@asynccontextmanager
async def authed_service(
    db: Database, *, jwks_down: bool = False, **changes: Any
) -> AsyncIterator[Service]:
    """The whole service with AUTH_JWKS_URL on a local JWKS server holding RSA and EC
    (``jwks_down``: the server is stopped before the service starts: the IdP is out)."""
    async with trio.open_nursery() as nursery:
        server = await serve_jwks(nursery, jwks(RSA, EC))
        if jwks_down:
            server.stop()
        async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
            async with running_service(
                db,
                sim,
                auth_jwks_url=server.url,
                auth_issuer=ISSUER,
                auth_audience=(AUDIENCE,),
                **changes,
            ) as service:
                await wait_until_live(service)
                yield service
        server.stop()


CREATE = {"symbol": "BTC-USD", "side": "long", "entryPrice": "65000", "takeProfit": "70000"}


async def create(service: Service, token: str, **body: Any) -> httpx.Response:
    return await service.http.post("/api/positions", json={**CREATE, **body}, headers=bearer(token))


def _bad_tokens() -> dict[str, str]:
    """Every refused token, by what is wrong with it."""
    now = int(time.time())
    header, payload, signature = alice().split(".")
    tampered = jwt.utils.base64url_encode(json.dumps(claims("bob")).encode()).decode()
    public_pem = RSA.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned_header = jwt.utils.base64url_encode(b'{"alg":"none","kid":"rsa-1"}').decode()
    return {
        "garbage": "not-a-token",
        "expired": RSA.sign(claims(exp=now - 3600, iat=now - 7200, nbf=now - 7200)),
        "not yet valid": RSA.sign(claims(nbf=now + 3600, iat=now)),
        "wrong issuer": RSA.sign(claims(iss="https://evil.test/")),
        "wrong audience": EC.sign(claims(aud="someone-else")),
        "no exp": RSA.sign(claims(exp=None)),
        "no sub": EC.sign(claims(sub=None)),  # type: ignore[arg-type]
        "unknown kid": SigningKey.ec("nobody").sign(claims()),
        "forged signature": STRANGER.sign(claims()),
        "tampered payload": f"{header}.{tampered}.{signature}",
        "alg none": f"{unsigned_header}.{payload}.",
        # HMAC with the RSA public key as the secret (the classic confusion attack).
        "HS256 with the public key": _hs256(public_pem, claims()),
        "EC key, RS256 header": _with_header(EC, {"alg": "RS256"}),
    }


def _hs256(secret: bytes, body: dict[str, Any]) -> str:
    """HS256 by hand: PyJWT refuses to use a PEM public key as an HMAC secret."""

    def part(data: bytes) -> str:
        return jwt.utils.base64url_encode(data).decode()

    signing_input = (
        part(b'{"alg":"HS256","kid":"rsa-1","typ":"JWT"}') + "." + part(json.dumps(body).encode())
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + part(mac)


def _with_header(key: SigningKey, changes: dict[str, Any]) -> str:
    """A token signed by ``key`` whose header then claims ``changes`` (signature kept)."""
    header, payload, signature = key.sign(claims()).split(".")
    decoded = json.loads(jwt.utils.base64url_decode(header))
    decoded.update(changes)
    forged = jwt.utils.base64url_encode(json.dumps(decoded).encode()).decode()
    return f"{forged}.{payload}.{signature}"


FREE = ("/health", "/ready", "/metrics", "/openapi.json")


async def test_every_bad_token_is_401_on_every_route_and_free_routes_need_none(
    db: Database,
) -> None:
    async with authed_service(db) as service:
        with trio.fail_after(GUARD_S):
            position = (await create(service, alice())).json()["data"]
            routes = [
                ("GET", "/api/positions", None),
                ("GET", "/api/positions/closed", None),
                ("GET", f"/api/positions/{position['id']}", None),
                ("POST", "/api/positions", CREATE),
                ("POST", f"/api/positions/{position['id']}/close", {"closePrice": "66000"}),
            ]
            for method, path, body in routes:
                missing = await service.http.request(method, path, json=body)
                assert missing.status_code == 401, (path, missing.text)
                assert missing.json() == {"error": "Authentication required."}
                assert missing.headers["WWW-Authenticate"] == "Bearer"
                for name, token in [*_bad_tokens().items(), ("Basic scheme", "")]:
                    headers = {"Authorization": "Basic YTpi"} if not token else bearer(token)
                    refused = await service.http.request(method, path, json=body, headers=headers)
                    assert refused.status_code == 401, (name, path, refused.text)
                    # One answer for every failed check: nothing that helps an attacker.
                    assert refused.json() == {"error": "Invalid or expired token."}, name
                    assert refused.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
            for path in FREE:
                assert (await service.http.get(path)).status_code == 200, path
            # Nothing a refused request did changed the position.
            mine = await service.http.get(
                f"/api/positions/{position['id']}", headers=bearer(alice())
            )
            assert mine.json()["data"]["status"] == "open"


async def test_an_unreachable_jwks_refuses_tokens_with_401_and_free_routes_still_answer(
    db: Database,
) -> None:
    async with authed_service(db, jwks_down=True) as service:
        with trio.fail_after(GUARD_S):
            refused = await create(service, alice())
            assert refused.status_code == 401, refused.text
            assert refused.json() == {"error": "Invalid or expired token."}
            assert refused.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
            listed = await service.http.get("/api/positions", headers=bearer(bob()))
            assert listed.status_code == 401
            assert (await service.http.get("/ready")).status_code == 200


async def test_the_later_client_acts_as_sub_and_a_different_userid_is_403(db: Database) -> None:
    async with authed_service(db) as service:
        with trio.fail_after(GUARD_S):
            # The later client: a token, no userId anywhere.
            made = await create(service, alice())
            assert made.status_code == 201, made.text
            position = made.json()["data"]
            assert position["userId"] == "alice"
            # The first client's shape with a token: userId equal to sub is fine.
            same = await create(service, alice(), userId="alice")
            assert same.status_code == 201 and same.json()["data"]["userId"] == "alice"
            pid = position["id"]
            token = bearer(alice())
            listed = await service.http.get("/api/positions", headers=token)
            assert {p["id"] for p in listed.json()["data"]} == {pid, same.json()["data"]["id"]}
            got = await service.http.get(f"/api/positions/{pid}", headers=token)
            assert got.json()["data"]["id"] == pid
            # Naming another user is 403 on create, close, list, list closed and get.
            mismatched = [
                await create(service, alice(), userId="bob"),
                await service.http.post(
                    f"/api/positions/{pid}/close",
                    json={"userId": "bob", "closePrice": "66000"},
                    headers=token,
                ),
                await service.http.get("/api/positions", params={"userId": "bob"}, headers=token),
                await service.http.get(
                    "/api/positions/closed", params={"userId": "bob"}, headers=token
                ),
                await service.http.get(
                    f"/api/positions/{pid}", params={"userId": "bob"}, headers=token
                ),
            ]
            for response in mismatched:
                assert response.status_code == 403, response.text
                assert response.json() == {"error": "userId does not match the token."}
            # A token's own close, without userId.
            closed = await service.http.post(
                f"/api/positions/{pid}/close", json={"closePrice": "66000"}, headers=token
            )
            assert closed.status_code == 200, closed.text
            assert closed.json()["data"]["closePrice"] == 66000
            history = await service.http.get("/api/positions/closed", headers=token)
            assert [p["id"] for p in history.json()["data"]] == [pid]


async def test_another_users_token_cannot_read_close_or_list_a_position(db: Database) -> None:
    async with authed_service(db) as service:
        with trio.fail_after(GUARD_S):
            mine = (await create(service, alice())).json()["data"]
            done = (await create(service, alice())).json()["data"]
            await service.http.post(
                f"/api/positions/{done['id']}/close",
                json={"closePrice": "66000"},
                headers=bearer(alice()),
            )
            theirs = bearer(bob())  # an EC key's token
            for pid in (mine["id"], done["id"]):
                read = await service.http.get(f"/api/positions/{pid}", headers=theirs)
                assert read.status_code == 404 and read.json() == {"error": "Position not found."}
                as_owner = await service.http.get(
                    f"/api/positions/{pid}", params={"userId": "alice"}, headers=theirs
                )
                assert as_owner.status_code == 403
                close = await service.http.post(
                    f"/api/positions/{pid}/close", json={"closePrice": "1"}, headers=theirs
                )
                # 404 exactly as for an id that does not exist: no existence oracle.
                assert close.status_code == 404 and close.json() == {"error": "Position not found."}
            missing = await service.http.get(
                "/api/positions/00000000-0000-4000-8000-000000000000", headers=theirs
            )
            assert missing.json() == {"error": "Position not found."}
            assert (await service.http.get("/api/positions", headers=theirs)).json()["data"] == []
            closed = await service.http.get("/api/positions/closed", headers=theirs)
            assert closed.json()["data"] == []
            # Bob's own position is all Bob sees.
            own = (await create(service, bob())).json()["data"]
            listed = (await service.http.get("/api/positions", headers=theirs)).json()["data"]
            assert [p["id"] for p in listed] == [own["id"]]
            # Alice's positions are untouched.
            still = await service.http.get(f"/api/positions/{mine['id']}", headers=bearer(alice()))
            assert still.json()["data"]["status"] == "open"
            assert still.json()["data"]["closePrice"] is None


async def test_openapi_describes_the_bearer_scheme_and_optional_userid(db: Database) -> None:
    async with authed_service(db) as service:
        spec = (await service.http.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    create_op = spec["paths"]["/api/positions"]["post"]
    assert create_op["security"] == [{"bearer": []}]
    assert {"401", "403", "429"} <= set(create_op["responses"])
    assert "userId" not in spec["components"]["schemas"]["CreatePosition"]["required"]
    list_params = {p["name"]: p for p in spec["paths"]["/api/positions"]["get"]["parameters"]}
    assert list_params["userId"]["required"] is False
    assert "security" not in spec["paths"]["/health"]["get"]


async def test_without_auth_the_spec_keeps_userid_required_and_a_token_is_not_needed(
    db: Database,
) -> None:
    async with running_stack(db) as stack, httpx.AsyncClient(base_url=stack.base_url) as http:
        spec = (await http.get("/openapi.json")).json()
        assert "userId" in spec["components"]["schemas"]["CreatePosition"]["required"]
        assert spec["paths"]["/api/positions"]["post"]["security"] == [{}]
        missing = await http.post("/api/positions", json=CREATE)
        assert missing.status_code == 400
        assert missing.json()["details"] == {"userId": "userId is required."}
        listed = await http.get("/api/positions", params={"userId": "alice"})
        assert listed.status_code == 200


# ------------------------------------------------------------------------------ rate limits
async def test_writes_are_limited_per_user_with_429_and_retry_after(db: Database) -> None:
    settings = make_settings(rate_limit_per_user=1, rate_limit_per_address=0)
    async with running_stack(db, settings=settings) as stack:
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            with trio.fail_after(GUARD_S):
                answers = [
                    await http.post("/api/positions", json={**CREATE, "userId": "alice"})
                    for _ in range(6)
                ]
                statuses = [a.status_code for a in answers]
                assert 201 in statuses and 429 in statuses, statuses
                refused = next(a for a in answers if a.status_code == 429)
                assert refused.json() == {"error": "Too many requests."}
                assert int(refused.headers["Retry-After"]) >= 1
                # Another user (the claimed userId without auth) has its own bucket, and reads
                # are not writes.
                other = await http.post("/api/positions", json={**CREATE, "userId": "bob"})
                assert other.status_code == 201
                reads = [
                    await http.get("/api/positions", params={"userId": "alice"}) for _ in range(6)
                ]
                assert {r.status_code for r in reads} == {200}


async def test_api_requests_are_limited_per_address_and_free_routes_are_not(
    db: Database,
) -> None:
    settings = make_settings(rate_limit_per_user=0, rate_limit_per_address=2)
    async with running_stack(db, settings=settings) as stack:
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            with trio.fail_after(GUARD_S):
                reads = [
                    await http.get("/api/positions", params={"userId": f"u{i}"}) for i in range(10)
                ]
                statuses = [r.status_code for r in reads]
                assert 200 in statuses and 429 in statuses, statuses
                refused = next(r for r in reads if r.status_code == 429)
                assert refused.json() == {"error": "Too many requests."}
                assert int(refused.headers["Retry-After"]) >= 1
                for _ in range(10):
                    assert (await http.get("/health")).status_code == 200


async def test_a_zero_limit_is_off(db: Database) -> None:
    settings = make_settings(rate_limit_per_user=0, rate_limit_per_address=0)
    async with running_stack(db, settings=settings) as stack:
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            with trio.fail_after(GUARD_S):
                for _ in range(50):
                    answer = await http.post("/api/positions", json={**CREATE, "userId": "alice"})
                    assert answer.status_code == 201, answer.text


# ------------------------------------------------------------------------------------- logs
@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """Everything tickguard's own handler writes, at DEBUG (the access log included)."""
    stream = io.StringIO()
    handler = logs.make_handler("text", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_no_token_reaches_a_log_line(db: Database, log_text: io.StringIO) -> None:
    good, expired = alice(), RSA.sign(claims(exp=int(time.time()) - 3600))
    async with authed_service(db) as service:
        with trio.fail_after(GUARD_S):
            await service.http.get("/api/positions", headers=bearer(good))
            await service.http.get("/api/positions", params={"token": good}, headers=bearer(good))
            await service.http.get("/api/positions", headers=bearer(expired))
            await service.http.get("/api/positions", params={"token": expired})
            await service.http.get("/health", params={"token": good})
    text = log_text.getvalue()
    assert "GET /api/positions 200" in text  # the access log did write these requests
    assert "token refused from 127.0.0.1: token expired" in text
    for token in (good, expired):
        for part in token.split("."):
            assert part not in text


def test_redact_hides_token_parameters_and_jwts_anywhere() -> None:
    token = alice()
    assert logs.redact(f"GET /ws?userId=a&token={token}") == "GET /ws?userId=a&token=[redacted]"
    assert logs.redact("GET /ws?token=opaque-value&x=1") == "GET /ws?token=[redacted]&x=1"
    assert logs.redact(f"header Bearer {token} seen") == "header Bearer [redacted] seen"
    assert logs.redact("GET /api/positions 200") == "GET /api/positions 200"


# -------------------------------------------------------------------------- two-user fuzz
FUZZ_CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,ignored_auth"
)
VICTIM = "victim-alice"


@pytest.mark.timeout(300)
async def test_a_fuzz_with_another_users_token_finds_no_cross_user_access(
    db: Database, tmp_path: Path
) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    if not schemathesis.exists():
        pytest.fail("schemathesis is not installed in the venv")
    victim_token = RSA.sign(claims(VICTIM))
    async with authed_service(db) as service:
        with trio.fail_after(GUARD_S):
            mine = [(await create(service, victim_token)).json()["data"] for _ in range(3)]
            await service.http.post(
                f"/api/positions/{mine[0]['id']}/close",
                json={"closePrice": "66000"},
                headers=bearer(victim_token),
            )
            before = [
                (
                    await service.http.get(
                        f"/api/positions/{p['id']}", headers=bearer(victim_token)
                    )
                ).json()["data"]
                for p in mine
            ]
        with trio.fail_after(240):
            done = await trio.run_process(
                [
                    str(schemathesis),
                    "run",
                    f"{service.base_url}/openapi.json",
                    "--header",
                    f"Authorization: Bearer {bob()}",
                    "--checks",
                    FUZZ_CHECKS,
                    "--max-examples",
                    "30",
                    "--seed",
                    "1",
                    "--phases",
                    "examples,fuzzing",
                    "--exclude-path",
                    "/ws",
                    "--no-color",
                ],
                cwd=tmp_path,
                env={
                    **os.environ,
                    "SCHEMATHESIS_HOOKS": "fuzz_identity_hooks",
                    "PYTHONPATH": str(Path(__file__).parent),
                    "FUZZ_VICTIM": VICTIM,
                    "FUZZ_VICTIM_IDS": ",".join(p["id"] for p in mine),
                    "FUZZ_BREACHES": str(tmp_path / "breaches.txt"),
                    "FUZZ_AIMED": str(tmp_path / "aimed.txt"),
                },
                capture_stdout=True,
                stderr=subprocess.STDOUT,
                check=False,
            )
        with trio.fail_after(GUARD_S):
            after = [
                (
                    await service.http.get(
                        f"/api/positions/{p['id']}", headers=bearer(victim_token)
                    )
                ).json()["data"]
                for p in mine
            ]
            listed = await service.http.get("/api/positions", headers=bearer(victim_token))
    output = done.stdout.decode(errors="replace")
    print(output[-2500:])
    assert done.returncode == 0, output[-6000:]
    aimed = (tmp_path / "aimed.txt").read_text().splitlines()
    assert len(aimed) > 10, aimed  # the fuzz did go for A's ids and A's userId
    breaches = tmp_path / "breaches.txt"
    assert not breaches.exists(), breaches.read_text()
    # A's positions are exactly as they were: status, close fields, update time; none added.
    assert after == before
    assert {p["id"] for p in listed.json()["data"]} == {p["id"] for p in mine}


# --- /ws -----------------------------------------------------------------------------------------


def ws_base(service: Service) -> str:
    return service.base_url.replace("http://", "ws://", 1)


async def ws_status(service: Service, query: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status a /ws handshake is refused with (0 if it was accepted)."""
    try:
        async with trio_websocket.open_websocket_url(
            f"{ws_base(service)}/ws?{query}", extra_headers=list((headers or {}).items())
        ) as ws:
            # Read the greeting before closing: a client that closes at once can trip over
            # trio-websocket's own answer to a ping (LocalProtocolError in its reader task).
            assert json.loads(await ws.get_message())["type"] == "connection.ready"
            return 0
    except trio_websocket.HandshakeError as refused:
        status: int = refused.status_code  # type: ignore[attr-defined]
        return status


async def test_ws_takes_the_token_from_the_query_or_the_subprotocol(db: Database) -> None:
    with trio.fail_after(GUARD_S):
        async with authed_service(db) as service:
            # The app's client: ?token=, no userId; it receives its own events only.
            async with trio_websocket.open_websocket_url(
                f"{ws_base(service)}/ws?token={alice()}"
            ) as ws:
                ready = json.loads(await ws.get_message())
                assert ready["type"] == "connection.ready"
                assert (await create(service, bob())).status_code == 201
                mine = await create(service, alice())
                assert mine.status_code == 201
                event = json.loads(await ws.get_message())
                assert event["type"] == "position.created"
                assert event["position"]["id"] == mine.json()["data"]["id"]
            # A browser's other way: Sec-WebSocket-Protocol "bearer, <token>"; the server
            # selects "bearer", or the browser would drop the connection.
            async with trio_websocket.open_websocket_url(
                f"{ws_base(service)}/ws", subprotocols=["bearer", bob()]
            ) as ws:
                assert ws.subprotocol == "bearer"
                assert json.loads(await ws.get_message())["type"] == "connection.ready"


async def test_ws_refuses_a_missing_or_bad_token_401_and_another_users_id_403(
    db: Database,
) -> None:
    with trio.fail_after(GUARD_S):
        async with authed_service(db) as service:
            assert await ws_status(service, "userId=alice") == 401
            for name, token in _bad_tokens().items():
                assert await ws_status(service, f"token={token}") == 401, name
            assert await ws_status(service, f"token={alice()}&userId=bob") == 403
            assert await ws_status(service, f"token={alice()}&userId=alice") == 0
            # A good token from another site's page is still a cross-site socket: 403.
            foreign = {"Origin": "https://evil.example"}
            assert await ws_status(service, f"token={alice()}", foreign) == 403


async def test_ws_session_ends_with_1008_when_its_token_expires(db: Database) -> None:
    with trio.fail_after(GUARD_S):
        async with authed_service(db) as service:
            short = RSA.sign(claims("alice", exp=int(time.time()) + 2))
            async with trio_websocket.open_websocket_url(
                f"{ws_base(service)}/ws?token={short}"
            ) as ws:
                assert json.loads(await ws.get_message())["type"] == "connection.ready"
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
                assert closed.value.reason.code == 1008
                assert closed.value.reason.reason == "token expired"


async def test_ws_handshakes_are_limited_per_address(db: Database) -> None:
    statuses: list[int] = []
    with trio.fail_after(GUARD_S):
        async with open_simulator({"BTC-USD": "65000"}, heartbeat_interval=0.2) as sim:
            async with running_service(db, sim, ws_connects_per_address_per_min=3) as service:
                for _ in range(5):
                    statuses.append(await ws_status(service, "userId=alice"))
    assert statuses == [0, 0, 0, 429, 429]
