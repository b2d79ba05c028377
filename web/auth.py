"""Bearer-token verification against an identity provider's JWKS (docs/SECURITY.md).

``TokenVerifier.verify(token)`` answers the ``Identity`` a JWT stands for, or raises
``InvalidToken``. The rules are RFC 8725's: the algorithm is the one the signing key's JWK
implies (RS256 for an RSA key, ES256 for a P-256 EC key) and a token whose header names another
one is refused, so ``none`` and HMAC-with-a-public-key can never verify; the key is found by
``kid``; ``exp`` is required and, with ``nbf`` and ``iat``, checked with the configured leeway;
``iss`` and ``aud`` when configured; ``sub`` must be a user id tickguard can store.

Keys come from the JWKS URL over httpx on the event loop (never a blocking fetch) and are kept
for the cache lifetime. A token naming a ``kid`` the cache lacks (the provider rotated its keys)
refetches at most once per ``refetch_interval_s``; while the provider is unreachable, cached keys
keep verifying until their lifetime ends. Signature checks run in PyJWT (on ``cryptography``):
no cryptography here. Nothing in this module logs or repeats a token.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import jwt
import trio

from tickguard.config import Settings
from tickguard.web.schemas import USER_ID_MAX, storable_text

log = logging.getLogger("tickguard.auth")

# A compact JWS: three base64url parts. Anything else is refused before parsing.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Real tokens are a few hundred bytes to a few KiB; a bigger one is refused unparsed.
MAX_TOKEN_BYTES = 8192
# A JWKS document is a few KiB; refuse to read a provider's answer past this.
MAX_JWKS_BYTES = 1 << 20
_KID_MAX = 256

# The WWW-Authenticate values of RFC 6750: no token at all, and a token that was refused.
WWW_AUTHENTICATE = "Bearer"
WWW_AUTHENTICATE_INVALID = 'Bearer error="invalid_token"'
# The Sec-WebSocket-Protocol a browser client offers with its token, echoed on accept.
WS_BEARER_PROTOCOL = "bearer"


class InvalidToken(Exception):
    """A token was refused (or could not be checked). The message says why in a few words
    and never contains the token, so it is safe to log; it is not meant for the client."""


@attrs.frozen
class Identity:
    """Who a verified token speaks for: ``sub`` (the user id) until ``exp`` (Unix seconds)."""

    sub: str
    exp: float


@attrs.frozen
class VerifierConfig:
    """What ``TokenVerifier`` checks against; ``from_settings`` maps the AUTH_* variables."""

    jwks_url: str
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    clock_skew_s: float = 30.0
    cache_ttl_s: float = 300.0
    # An unknown kid refetches the JWKS at most this often (issue 15).
    refetch_interval_s: float = 30.0
    # Bound on one JWKS fetch, so a slow provider cannot hold requests.
    fetch_timeout_s: float = 5.0
    # After a failed fetch, callers get InvalidToken at once for this long instead of each
    # waiting for the same dead provider.
    failure_backoff_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> VerifierConfig | None:
        """None when ``AUTH_JWKS_URL`` is unset (no authentication)."""
        if settings.auth_jwks_url is None:
            return None
        return cls(
            jwks_url=settings.auth_jwks_url,
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
            clock_skew_s=float(settings.auth_clock_skew_seconds),
            cache_ttl_s=settings.auth_jwks_cache_ttl_ms / 1000,
        )


@attrs.frozen
class _Key:
    algorithm: str
    key: Any


class TokenVerifier:
    """Verifies bearer tokens; one per process, shared by every request.

    ``http`` is the client the JWKS is fetched with (``open_token_verifier`` makes one).
    ``wall_clock`` gives the Unix time that ``exp``/``nbf``/``iat`` are compared with (tests
    pass their own); the cache's lifetimes run on ``trio.current_time()``.
    """

    def __init__(
        self,
        config: VerifierConfig,
        http: httpx.AsyncClient,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._http = http
        self._wall_clock = wall_clock
        self._keys: dict[str, _Key] = {}
        self._expires_at = -float("inf")
        self._last_attempt = -float("inf")
        self._last_failed = False
        self._lock = trio.Lock()
        self.fetches = 0

    async def verify(self, token: str) -> Identity:
        """The identity ``token`` proves. Waits only when the signing keys must be (re)fetched,
        at most ``fetch_timeout_s``; raises ``InvalidToken`` for any refusal, including keys
        that cannot be fetched."""
        if len(token) > MAX_TOKEN_BYTES or not _COMPACT_JWS.fullmatch(token):
            raise InvalidToken("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token header") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in ("RS256", "ES256"):
            # "none", HS*, and anything else no JWK of ours could mean.
            raise InvalidToken("token algorithm not accepted")
        if not isinstance(kid, str) or not 1 <= len(kid) <= _KID_MAX or not storable_text(kid):
            raise InvalidToken("token has no usable key id")
        key = await self._key(kid)
        if key.algorithm != algorithm:
            raise InvalidToken("token algorithm does not match its key")
        return self._decode(token, key)

    async def _key(self, kid: str) -> _Key:
        if trio.current_time() >= self._expires_at or kid not in self._keys:
            await self._refresh(kid)
        key = self._keys.get(kid) if trio.current_time() < self._expires_at else None
        if key is None:
            raise InvalidToken("no signing key for the token's key id")
        return key

    async def _refresh(self, kid: str) -> None:
        """Fetch the JWKS if that is due: the cache expired, or ``kid`` is unknown and the last
        fetch is ``refetch_interval_s`` old. Concurrent callers share one fetch: the others
        wait for the lock, then find the keys fresh. Never raises: a failed fetch is logged
        and leaves the cache as it was."""
        async with self._lock:
            now = trio.current_time()
            fresh = now < self._expires_at
            if fresh and kid in self._keys:
                return
            earliest = self._last_attempt + (self.config.refetch_interval_s if fresh else 0.0)
            if self._last_failed:
                earliest = max(earliest, self._last_attempt + self.config.failure_backoff_s)
            if now < earliest:
                return
            reason = "unknown kid" if fresh else "no keys yet" if not self.fetches else "expired"
            self._last_attempt = now
            self.fetches += 1
            try:
                keys = await self._fetch()
            except _JwksUnavailable as exc:
                self._last_failed = True
                log.warning(
                    "JWKS fetch from %s failed (%s): %s; cached keys %s",
                    self.config.jwks_url,
                    reason,
                    exc,
                    "kept until they expire" if now < self._expires_at else "expired",
                )
                return
            self._last_failed = False
            self._keys = keys
            self._expires_at = now + self.config.cache_ttl_s
            log.info(
                "JWKS fetched from %s (%s): %d usable key(s)",
                self.config.jwks_url,
                reason,
                len(keys),
            )

    async def _fetch(self) -> dict[str, _Key]:
        with trio.move_on_after(self.config.fetch_timeout_s) as scope:
            try:
                async with self._http.stream("GET", self.config.jwks_url) as response:
                    if response.status_code != 200:
                        raise _JwksUnavailable(f"HTTP {response.status_code}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_JWKS_BYTES:
                            raise _JwksUnavailable("document too large")
            except httpx.HTTPError as exc:
                raise _JwksUnavailable(type(exc).__name__) from None
        if scope.cancelled_caught:
            raise _JwksUnavailable(f"no answer within {self.config.fetch_timeout_s:g} s")
        try:
            document = json.loads(body)
        except ValueError:
            raise _JwksUnavailable("not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise _JwksUnavailable("not a JWKS document")
        return _parse_jwks(document)

    def _decode(self, token: str, key: _Key) -> Identity:
        config = self.config
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[key.algorithm],
                audience=list(config.audience) or None,
                issuer=config.issuer,
                # Times are checked below against the injectable clock.
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": bool(config.audience),
                    "verify_iss": config.issuer is not None,
                    "require": [],
                },
            )
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"missing claim {exc.claim}") from None
        except jwt.PyJWTError:
            raise InvalidToken("invalid token") from None
        return self._identity(claims)

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        now = self._wall_clock()
        skew = self.config.clock_skew_s
        exp = _numeric_date(claims, "exp", required=True)
        assert exp is not None
        if now - skew >= exp:
            raise InvalidToken("token expired")
        nbf = _numeric_date(claims, "nbf")
        if nbf is not None and now + skew < nbf:
            raise InvalidToken("token not valid yet")
        iat = _numeric_date(claims, "iat")
        if iat is not None and now + skew < iat:
            raise InvalidToken("token issued in the future")
        sub = claims.get("sub")
        if sub is None:
            raise InvalidToken("missing claim sub")
        if not isinstance(sub, str) or not 1 <= len(sub) <= USER_ID_MAX or not storable_text(sub):
            raise InvalidToken(f"sub must be 1 to {USER_ID_MAX} characters of text")
        return Identity(sub=sub, exp=float(exp))


class _JwksUnavailable(Exception):
    """The JWKS could not be fetched or read; the message says why, briefly."""


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool = False) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise InvalidToken(f"missing claim {name}")
        return None
    # bool is an int in Python, and never a date.
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidToken(f"claim {name} is not a number")
    return float(value)


def _parse_jwks(document: Mapping[str, Any]) -> dict[str, _Key]:
    """The usable signing keys of a JWKS document, by ``kid``: RSA keys (RS256) and P-256 EC
    keys (ES256) meant for signatures. Keys without a kid, of other types or curves, whose
    ``alg`` says something else, or that do not parse are skipped (logged by kid)."""
    keys: dict[str, _Key] = {}
    for jwk in document.get("keys", []):
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not 1 <= len(kid) <= _KID_MAX or not storable_text(kid):
            continue
        algorithm = _algorithm_of(jwk)
        if algorithm is None or jwk.get("use", "sig") != "sig":
            log.debug("JWKS key %r skipped: not an RS256/ES256 signing key", kid)
            continue
        try:
            parsed = jwt.PyJWK(jwk, algorithm=algorithm)
        except jwt.PyJWTError:
            log.debug("JWKS key %r skipped: does not parse", kid)
            continue
        keys[kid] = _Key(algorithm=algorithm, key=parsed.key)
    return keys


def _algorithm_of(jwk: Mapping[str, Any]) -> str | None:
    """The one algorithm a JWK may verify, from its key type (RFC 8725 2.1): never what the
    token's header asks for. A JWK whose ``alg`` names another algorithm is not used."""
    kty = jwk.get("kty")
    if kty == "RSA" and "d" not in jwk:
        algorithm = "RS256"
    elif kty == "EC" and jwk.get("crv") == "P-256" and "d" not in jwk:
        algorithm = "ES256"
    else:
        return None
    return algorithm if jwk.get("alg", algorithm) == algorithm else None


@asynccontextmanager
async def open_token_verifier(
    config: VerifierConfig, *, wall_clock: Callable[[], float] = time.time
) -> AsyncIterator[TokenVerifier]:
    """A ``TokenVerifier`` with its own HTTP client, closed on exit. The client follows no
    redirect and reads no proxy settings from the environment (config.py is the only reader)."""
    timeout = httpx.Timeout(config.fetch_timeout_s)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as http:
        yield TokenVerifier(config, http, wall_clock=wall_clock)


def bearer_token(
    *,
    authorization: str | None = None,
    websocket_protocols: str | None = None,
    query_token: str | None = None,
) -> str | None:
    """The token a request carries, from (in this order) ``Authorization: Bearer <token>``,
    ``Sec-WebSocket-Protocol: bearer, <token>`` or a ``?token=`` query value; None when it
    carries none. Raises ``InvalidToken`` for a malformed ``Authorization`` header or for two
    places carrying different tokens (which one would be meant is anyone's guess)."""
    found: list[str] = []
    if authorization is not None and authorization.strip():
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise InvalidToken("Authorization header is not 'Bearer <token>'")
        found.append(value.strip())
    if websocket_protocols is not None:
        offered = [item.strip() for item in websocket_protocols.split(",")]
        if len(offered) >= 2 and offered[0].lower() == WS_BEARER_PROTOCOL and offered[1]:
            found.append(offered[1])
    if query_token is not None and query_token != "":
        found.append(query_token)
    if len(set(found)) > 1:
        raise InvalidToken("the request carries more than one token")
    return found[0] if found else None
