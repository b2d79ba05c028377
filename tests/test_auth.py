"""web/auth.py against a real JWKS server on a local socket, with real RSA and P-256 keys.

Token times are checked against an explicit wall clock (``WallClock``); the JWKS cache runs on
trio's clock, which the cache tests freeze and jump with pytest-trio's ``mock_clock`` (real
sockets still work: a frozen clock only means no timeout fires unless the test jumps).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from jwks_server import JwksServer, SigningKey, jwks, serve_jwks

from tickguard.config import load_settings
from tickguard.web.auth import (
    Identity,
    InvalidToken,
    TokenVerifier,
    VerifierConfig,
    bearer_token,
    open_token_verifier,
)

NOW = 1_900_000_000.0
ISSUER = "https://idp.test/"
AUDIENCE = "tickguard"
TTL_S = 300.0

RSA = SigningKey.rsa("rsa-1")
EC = SigningKey.ec("ec-1")


class WallClock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "alice",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 600,
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not ...}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{_b64(signature)}"


@asynccontextmanager
async def started(
    document: Any = None, **config: Any
) -> AsyncIterator[tuple[TokenVerifier, JwksServer, WallClock]]:
    """A JWKS server (RSA and EC keys unless told) and a verifier pointed at it."""
    async with trio.open_nursery() as nursery:
        server = await serve_jwks(nursery, jwks(RSA, EC) if document is None else document)
        wall = WallClock()
        settings: dict[str, Any] = {
            "issuer": ISSUER,
            "audience": (AUDIENCE,),
            "clock_skew_s": 30.0,
            "cache_ttl_s": TTL_S,
        }
        settings.update(config)
        verifier_config = VerifierConfig(jwks_url=server.url, **settings)
        async with open_token_verifier(verifier_config, wall_clock=wall) as verifier:
            yield verifier, server, wall
        nursery.cancel_scope.cancel()


async def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token)
    return str(caught.value)


# --- valid tokens ------------------------------------------------------------------------------


async def test_rs256_and_es256_tokens_verify_to_their_sub_and_exp() -> None:
    async with started() as (verifier, server, _):
        rsa_identity = await verifier.verify(RSA.sign(claims(sub="alice")))
        ec_identity = await verifier.verify(EC.sign(claims(sub="bob", exp=int(NOW) + 60)))
    assert rsa_identity == Identity(sub="alice", exp=NOW + 600)
    assert ec_identity == Identity(sub="bob", exp=NOW + 60)
    # One fetch served both keys.
    assert server.fetches == 1


async def test_audience_may_be_a_list_and_unchecked_claims_may_be_absent() -> None:
    async with started(audience=("web", AUDIENCE)) as (verifier, _, _):
        identity = await verifier.verify(RSA.sign(claims(aud=["other", AUDIENCE])))
        assert identity.sub == "alice"
    async with started(issuer=None, audience=()) as (verifier, _, _):
        bare = {"sub": "carol", "exp": int(NOW) + 10}
        assert (await verifier.verify(RSA.sign(bare))).sub == "carol"
        # Without AUTH_AUDIENCE any aud is fine (it is not ours to judge).
        assert (await verifier.verify(RSA.sign(claims(aud="elsewhere")))).sub == "alice"


# --- time claims -------------------------------------------------------------------------------


async def test_expiry_is_checked_with_the_clock_skew() -> None:
    async with started() as (verifier, _, wall):
        token = RSA.sign(claims(exp=int(NOW) + 100))
        wall.now = NOW + 100 + 29
        assert (await verifier.verify(token)).sub == "alice"
        wall.now = NOW + 100 + 30
        assert await refused(verifier, token) == "token expired"
    async with started(clock_skew_s=0.0) as (verifier, _, wall):
        wall.now = NOW + 100
        assert await refused(verifier, token) == "token expired"


async def test_nbf_and_iat_in_the_future_are_refused_beyond_the_skew() -> None:
    async with started() as (verifier, _, _):
        assert (await verifier.verify(RSA.sign(claims(nbf=int(NOW) + 30)))).sub == "alice"
        assert await refused(verifier, RSA.sign(claims(nbf=int(NOW) + 31))) == (
            "token not valid yet"
        )
        assert (await verifier.verify(RSA.sign(claims(iat=int(NOW) + 30)))).sub == "alice"
        assert await refused(verifier, RSA.sign(claims(iat=int(NOW) + 31))) == (
            "token issued in the future"
        )


async def test_exp_is_required_and_must_be_a_number() -> None:
    async with started() as (verifier, _, _):
        assert await refused(verifier, RSA.sign(claims(exp=...))) == "missing claim exp"
        assert await refused(verifier, RSA.sign(claims(exp=None))) == "missing claim exp"
        for bad in ("1900000600", True, [1]):
            token = RSA.sign(claims(exp=bad))
            assert await refused(verifier, token) == "claim exp is not a number"


# --- issuer, audience, subject -----------------------------------------------------------------


async def test_wrong_or_missing_issuer_is_refused() -> None:
    async with started() as (verifier, _, _):
        assert await refused(verifier, RSA.sign(claims(iss="https://evil.test/"))) == (
            "wrong issuer"
        )
        assert await refused(verifier, RSA.sign(claims(iss=...))) == "missing claim iss"


async def test_wrong_or_missing_audience_is_refused() -> None:
    async with started() as (verifier, _, _):
        assert await refused(verifier, RSA.sign(claims(aud="other"))) == "wrong audience"
        assert await refused(verifier, RSA.sign(claims(aud=["a", "b"]))) == "wrong audience"
        assert await refused(verifier, RSA.sign(claims(aud=...))) == "missing claim aud"


async def test_sub_is_required_and_must_be_a_storable_user_id() -> None:
    async with started() as (verifier, _, _):
        assert await refused(verifier, RSA.sign(claims(sub=...))) == "missing claim sub"
        for bad in ("", "x" * 129, "al\x00ice", "bob\nmallory"):
            message = await refused(verifier, RSA.sign(claims(sub=bad)))
            assert message == "sub must be 1 to 128 characters of text"
        # PyJWT itself refuses a non-string sub.
        assert await refused(verifier, RSA.sign(claims(sub=42))) == "invalid token"
        assert (await verifier.verify(RSA.sign(claims(sub="x" * 128)))).sub == "x" * 128


# --- algorithms (RFC 8725 2.1) -----------------------------------------------------------------


async def test_alg_none_is_refused_without_touching_the_network() -> None:
    async with started() as (verifier, server, _):
        for alg in ("none", "None", "NONE"):
            token = forge({"alg": alg, "kid": RSA.kid, "typ": "JWT"}, claims())
            assert await refused(verifier, token) == "token algorithm not accepted"
        assert server.fetches == 0


async def test_hs256_signed_with_the_rsa_public_key_is_refused() -> None:
    # The classic key-confusion attack: the public key's PEM used as an HMAC secret.
    pem = RSA.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "kid": RSA.kid, "typ": "JWT"}
    unsigned = forge(header, claims()).rsplit(".", 1)[0]
    signature = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    async with started() as (verifier, _, _):
        assert await refused(verifier, f"{unsigned}.{_b64(signature)}") == (
            "token algorithm not accepted"
        )


async def test_a_header_alg_other_than_the_keys_is_refused() -> None:
    async with started() as (verifier, _, _):
        # Signed by the EC key, but naming the RSA key: the RSA key only ever means RS256.
        ec_claiming_rsa = EC.sign(claims(), kid=RSA.kid)
        assert await refused(verifier, ec_claiming_rsa) == "token algorithm does not match its key"
        rsa_claiming_ec = RSA.sign(claims(), kid=EC.kid)
        assert await refused(verifier, rsa_claiming_ec) == "token algorithm does not match its key"


async def test_a_jwk_whose_alg_disagrees_with_its_type_is_not_used() -> None:
    odd = RSA.jwk(alg="ES256")
    oct_key = {"kty": "oct", "kid": "shared", "k": _b64(b"secret" * 8), "alg": "HS256"}
    enc_key = EC.jwk(use="enc")
    async with started({"keys": [odd, oct_key, enc_key]}) as (verifier, _, _):
        assert await refused(verifier, RSA.sign(claims())) == (
            "no signing key for the token's key id"
        )
        assert await refused(verifier, EC.sign(claims())) == (
            "no signing key for the token's key id"
        )


async def test_a_bad_signature_and_malformed_tokens_are_refused() -> None:
    impostor = SigningKey.rsa(RSA.kid)
    async with started() as (verifier, _, _):
        assert await refused(verifier, impostor.sign(claims())) == "bad signature"
        good = RSA.sign(claims())
        head, body, _sig = good.split(".")
        tampered = forge(json.loads(base64.urlsafe_b64decode(head + "==")), claims(sub="mallory"))
        assert await refused(verifier, tampered.rsplit(".", 1)[0] + "." + _sig) == "bad signature"
        for junk in ("", "abc", "a.b", "a.b.c.d", good + " ", "x" * 9000 + ".a.b"):
            assert await refused(verifier, junk) in ("malformed token", "malformed token header")
        assert await refused(verifier, forge({"alg": "RS256"}, claims())) == (
            "token has no usable key id"
        )


# --- the JWKS cache ----------------------------------------------------------------------------


async def test_an_unknown_kid_refetches_once_per_interval(
    mock_clock: trio.testing.MockClock,
) -> None:
    stranger = SigningKey.rsa("stranger")
    other = SigningKey.ec("other")
    async with started() as (verifier, server, _):
        await verifier.verify(RSA.sign(claims()))
        assert server.fetches == 1
        mock_clock.jump(31)
        assert await refused(verifier, stranger.sign(claims())) == (
            "no signing key for the token's key id"
        )
        assert server.fetches == 2
        # Another unknown kid within 30 s of that fetch is refused from the cache.
        mock_clock.jump(29)
        assert await refused(verifier, other.sign(claims())) == (
            "no signing key for the token's key id"
        )
        assert server.fetches == 2
        # Known keys keep verifying meanwhile, without fetching.
        await verifier.verify(EC.sign(claims()))
        assert server.fetches == 2
        mock_clock.jump(1)
        await refused(verifier, other.sign(claims()))
        assert server.fetches == 3


async def test_key_rotation_picks_up_the_new_kid_and_expires_the_old(
    mock_clock: trio.testing.MockClock,
) -> None:
    new = SigningKey.rsa("rsa-2")
    async with started(jwks(RSA)) as (verifier, server, _):
        await verifier.verify(RSA.sign(claims()))
        # The provider publishes the new key next to the old one, then signs with it.
        server.document = jwks(RSA, new)
        mock_clock.jump(31)
        assert (await verifier.verify(new.sign(claims(sub="bob")))).sub == "bob"
        assert server.fetches == 2
        # The old key is withdrawn: it still verifies until the cache's lifetime ends...
        server.document = jwks(new)
        mock_clock.jump(TTL_S - 1)
        assert (await verifier.verify(RSA.sign(claims()))).sub == "alice"
        assert server.fetches == 2
        # ...then the refetch no longer has it.
        mock_clock.jump(1)
        assert await refused(verifier, RSA.sign(claims())) == (
            "no signing key for the token's key id"
        )
        assert server.fetches == 3
        assert (await verifier.verify(new.sign(claims()))).sub == "alice"
        assert server.fetches == 3


async def test_a_jwks_outage_keeps_cached_keys_until_they_expire(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with started() as (verifier, server, _):
        await verifier.verify(RSA.sign(claims()))
        server.stop()
        await trio.testing.wait_all_tasks_blocked()
        # An unknown kid tries the provider (down), and cached keys still work.
        mock_clock.jump(31)
        with caplog.at_level(logging.WARNING, logger="tickguard.auth"):
            await refused(verifier, SigningKey.ec("new").sign(claims()))
        assert "JWKS fetch from" in caplog.text and "kept until they expire" in caplog.text
        assert (await verifier.verify(EC.sign(claims()))).sub == "alice"
        mock_clock.jump(TTL_S - 32)
        assert (await verifier.verify(RSA.sign(claims()))).sub == "alice"
        # Past the lifetime, with the provider still down, nothing verifies.
        mock_clock.jump(1)
        assert await refused(verifier, RSA.sign(claims())) == (
            "no signing key for the token's key id"
        )


async def test_a_provider_answering_an_error_or_garbage_verifies_nothing(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with started() as (verifier, server, _):
        server.status = 503
        assert await refused(verifier, RSA.sign(claims())) == (
            "no signing key for the token's key id"
        )
        # Within the failure back-off nobody waits on the provider again.
        await refused(verifier, RSA.sign(claims()))
        assert server.fetches == 1
        server.status, server.document = 200, ["not", "a", "jwks"]
        mock_clock.jump(5)
        await refused(verifier, RSA.sign(claims()))
        assert server.fetches == 2
        server.document = jwks(RSA)
        mock_clock.jump(5)
        assert (await verifier.verify(RSA.sign(claims()))).sub == "alice"


async def test_a_slow_provider_bounds_verify_by_the_fetch_timeout() -> None:
    # Real clock here: the server really stalls and the fetch timeout really fires.
    async with started(fetch_timeout_s=0.3) as (verifier, server, _):
        server.delay_s = 30.0
        with trio.fail_after(10):
            started_at = trio.current_time()
            assert await refused(verifier, RSA.sign(claims())) == (
                "no signing key for the token's key id"
            )
            waited = trio.current_time() - started_at
            # Callers during the back-off are answered at once, not after another timeout.
            for _ in range(5):
                await refused(verifier, RSA.sign(claims()))
        assert server.fetches == 1
        assert waited >= 0.3


async def test_concurrent_first_verifies_share_one_fetch() -> None:
    results: list[Identity] = []
    async with started() as (verifier, server, _):
        server.delay_s = 0.05

        async def one(n: int) -> None:
            results.append(await verifier.verify(RSA.sign(claims(sub=f"user-{n}"))))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for n in range(20):
                    nursery.start_soon(one, n)
        assert server.fetches == 1
    assert sorted(identity.sub for identity in results) == sorted(f"user-{n}" for n in range(20))


# --- logs --------------------------------------------------------------------------------------


async def test_tokens_never_appear_in_logs_or_messages(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = [
        RSA.sign(claims()),
        RSA.sign(claims(exp=int(NOW) - 3600)),
        RSA.sign(claims(iss="https://evil.test/")),
        SigningKey.rsa("unknown").sign(claims()),
        forge({"alg": "none", "kid": RSA.kid}, claims()),
        SigningKey.rsa(RSA.kid).sign(claims()),
    ]
    messages = []
    async with started() as (verifier, server, _):
        for token in tokens:
            try:
                await verifier.verify(token)
            except InvalidToken as exc:
                messages.append(str(exc))
        server.stop()
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(TTL_S + 1)
        for token in tokens:
            with pytest.raises(InvalidToken) as caught:
                await verifier.verify(token)
            messages.append(str(caught.value))
    assert len(messages) == 2 * len(tokens) - 1
    assert "JWKS fetch" in caplog.text
    for token in tokens:
        for part in token.split("."):
            if len(part) > 8:
                assert part not in caplog.text
                assert all(part not in message for message in messages)


# --- where the token comes from ----------------------------------------------------------------


def test_bearer_token_reads_the_header_the_subprotocol_or_the_query() -> None:
    assert bearer_token() is None
    assert bearer_token(authorization="Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token(authorization="bearer   abc.def.ghi ") == "abc.def.ghi"
    assert bearer_token(websocket_protocols="bearer, abc.def.ghi") == "abc.def.ghi"
    assert bearer_token(websocket_protocols="graphql-ws") is None
    assert bearer_token(query_token="abc.def.ghi") == "abc.def.ghi"
    assert bearer_token(query_token="", authorization="") is None
    same = "abc.def.ghi"
    assert bearer_token(authorization=f"Bearer {same}", query_token=same) == same
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "abc.def.ghi"):
        with pytest.raises(InvalidToken):
            bearer_token(authorization=header)
    with pytest.raises(InvalidToken):
        bearer_token(authorization="Bearer a.b.c", query_token="d.e.f")


def test_verifier_config_comes_from_the_auth_settings(tmp_path: Path) -> None:
    plain = load_settings({"HOME": str(tmp_path)}, env_file=None)
    assert VerifierConfig.from_settings(plain) is None
    settings = load_settings(
        {
            "HOME": str(tmp_path),
            "AUTH_JWKS_URL": "https://idp.example.com/jwks.json",
            "AUTH_ISSUER": ISSUER,
            "AUTH_AUDIENCE": "a,b",
            "AUTH_CLOCK_SKEW_SECONDS": "5",
            "AUTH_JWKS_CACHE_TTL_MS": "60000",
        },
        env_file=None,
    )
    assert VerifierConfig.from_settings(settings) == VerifierConfig(
        jwks_url="https://idp.example.com/jwks.json",
        issuer=ISSUER,
        audience=("a", "b"),
        clock_skew_s=5.0,
        cache_ttl_s=60.0,
    )
