"""Who is asking, for every ``/api/*`` request: the bearer-token check and the rate limits
(docs/SECURITY.md "REST" and "Rate limits").

``install(app, settings)`` registers one ``before_request`` hook. For a request under ``/api``
it first takes a token from the client address's bucket (``RATE_LIMIT_PER_ADDRESS``, so a flood
of bad tokens is limited too), then, when ``AUTH_JWKS_URL`` is set, verifies the
``Authorization: Bearer`` token and keeps its ``Identity`` for the request. Routes then ask
``acting_user(claimed)`` who acts: the token's ``sub`` (403 when the request names another
user), or without authentication the ``userId`` the request names. ``acting_user`` also takes
one token from that user's write bucket (``RATE_LIMIT_PER_USER``) for a write.

``with_token_user(data)`` fills in the request's ``userId`` from the token when the client
sent none (the later client never does), so the request classes of ``web.schemas`` keep
``userId`` required, with the compatible core's messages, when there is no authentication.

Refusals are ``ApiError``: 401 ``{"error"}`` with ``WWW-Authenticate`` (RFC 6750: ``Bearer``
without a token, ``Bearer error="invalid_token"`` for a refused one; the body never says which
check failed, the log line does), 403 for a ``userId`` that is not ``sub``, 429 with
``Retry-After``. Nothing here logs a token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any

import attrs
from flask.sansio.app import App
from quart import current_app, g, request, websocket
from quart_trio import QuartTrio

from tickguard.config import Settings
from tickguard.web.auth import (
    WS_BEARER_PROTOCOL,
    WWW_AUTHENTICATE,
    WWW_AUTHENTICATE_INVALID,
    Identity,
    InvalidToken,
    TokenVerifier,
    VerifierConfig,
    bearer_token,
    open_token_verifier,
)
from tickguard.web.errors import ApiError
from tickguard.web.ratelimit import RateLimit, Refusal, address_key

log = logging.getLogger("tickguard.web.identity")

EXTENSION = "tickguard.identity"
USER_ID = "userId"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

NO_TOKEN = "Authentication required."
BAD_TOKEN = "Invalid or expired token."
NOT_YOURS = "userId does not match the token."
TOO_MANY = "Too many requests."


@attrs.define
class Gate:
    """One app's identity state: the token verifier (None without ``AUTH_JWKS_URL``, or
    before the server started) and the two rate limits."""

    config: VerifierConfig | None
    per_user: RateLimit
    per_address: RateLimit
    ws_connects: RateLimit
    verifier: TokenVerifier | None = None

    @property
    def authenticating(self) -> bool:
        return self.config is not None


def gate_of(app: App) -> Gate:
    """The ``Gate`` that ``install`` stored in ``app``."""
    gate: Gate = app.extensions[EXTENSION]
    return gate


def install(app: QuartTrio, settings: Settings) -> None:
    """Register the ``/api`` check on ``app`` (after CORS, whose preflight answer comes first),
    and open the verifier's HTTP client while the app serves (closed when it stops)."""
    gate = Gate(
        config=VerifierConfig.from_settings(settings),
        per_user=RateLimit.per_second(settings.rate_limit_per_user),
        per_address=RateLimit.per_second(settings.rate_limit_per_address),
        ws_connects=RateLimit.per_minute(settings.ws_connects_per_address_per_min),
    )
    app.extensions[EXTENSION] = gate
    resources = AsyncExitStack()

    @app.before_serving
    async def _open_verifier() -> None:
        if gate.config is not None:
            gate.verifier = await resources.enter_async_context(open_token_verifier(gate.config))

    @app.after_serving
    async def _close_verifier() -> None:
        gate.verifier = None
        await resources.aclose()

    app.before_request(_check_request)
    app.before_websocket(_check_websocket)


def _is_api(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def _too_many(refusal: Refusal) -> ApiError:
    return ApiError(429, TOO_MANY, headers={"Retry-After": str(refusal.retry_after)})


async def _check_request() -> None:
    """Rate-limit and authenticate an ``/api`` request; raises ``ApiError`` (429, 401).
    Waits only when the verifier must fetch the signing keys (at most its fetch timeout)."""
    if not _is_api(request.path):
        return
    gate = gate_of(current_app)
    address = address_key(request.remote_addr or "")
    refusal = gate.per_address.take(address)
    if refusal is not None:
        raise _too_many(refusal)
    if not gate.authenticating or request.method == "OPTIONS":
        # A CORS preflight carries no credentials by design (Fetch standard).
        return
    if gate.verifier is None:
        # Only while the app is not serving (before_serving has not run): refuse, never open.
        raise ApiError(401, BAD_TOKEN, headers={"WWW-Authenticate": WWW_AUTHENTICATE_INVALID})
    try:
        token = bearer_token(authorization=request.headers.get("Authorization"))
        if token is None:
            raise ApiError(401, NO_TOKEN, headers={"WWW-Authenticate": WWW_AUTHENTICATE})
        g.identity = await gate.verifier.verify(token)
    except InvalidToken as refused:
        # The reason names the failed check only (web/auth.py never puts a token in it).
        log.info("token refused from %s: %s", address, refused)
        raise ApiError(
            401, BAD_TOKEN, headers={"WWW-Authenticate": WWW_AUTHENTICATE_INVALID}
        ) from None


async def _check_websocket() -> None:
    """Rate-limit and authenticate a ``/ws`` handshake before the upgrade (429, 401, 403 are
    plain HTTP answers): the token comes from ``?token=`` (the app's client) or
    ``Sec-WebSocket-Protocol: bearer, <token>``; a ``userId`` it names must be ``sub``."""
    gate = gate_of(current_app)
    address = address_key(websocket.remote_addr or "")
    refusal = gate.ws_connects.take(address)
    if refusal is not None:
        raise _too_many(refusal)
    if not gate.authenticating:
        return
    if gate.verifier is None:
        raise ApiError(401, BAD_TOKEN, headers={"WWW-Authenticate": WWW_AUTHENTICATE_INVALID})
    try:
        token = bearer_token(
            websocket_protocols=websocket.headers.get("Sec-WebSocket-Protocol"),
            query_token=websocket.args.get("token"),
        )
        if token is None:
            raise ApiError(401, NO_TOKEN, headers={"WWW-Authenticate": WWW_AUTHENTICATE})
        identity = await gate.verifier.verify(token)
    except InvalidToken as refused:
        log.info("token refused from %s: %s", address, refused)
        raise ApiError(
            401, BAD_TOKEN, headers={"WWW-Authenticate": WWW_AUTHENTICATE_INVALID}
        ) from None
    claimed = websocket.args.get(USER_ID)
    if claimed not in (None, "") and claimed != identity.sub:
        raise ApiError(403, NOT_YOURS)
    g.identity = identity


def offered_bearer_protocol() -> bool:
    """Whether the handshake carried its token as ``Sec-WebSocket-Protocol: bearer, <token>``:
    the accept must then select ``bearer``, or a browser drops the connection."""
    offered = websocket.headers.get("Sec-WebSocket-Protocol") or ""
    return offered.split(",")[0].strip().lower() == WS_BEARER_PROTOCOL


def current_identity() -> Identity | None:
    """The verified identity of the request being handled; None without authentication."""
    identity: Identity | None = g.get("identity")
    return identity


def with_token_user(data: Any) -> Any:
    """``data`` (a JSON body or a query mapping) with ``userId`` set to the token's ``sub``
    when authentication is on and the request names no user (absent or null); anything else
    is returned as it is, for the request class to judge."""
    identity = current_identity()
    if identity is None or not isinstance(data, Mapping) or data.get(USER_ID) is not None:
        return data
    return {**data, USER_ID: identity.sub}


def acting_user(claimed: str) -> str:
    """The user this request acts as, given the (validated) ``userId`` it names.

    With authentication: the token's ``sub``; raises ``ApiError`` 403 when ``claimed`` is
    another user. Without: ``claimed`` itself. A write (POST/PUT/PATCH/DELETE) also takes a
    token from the user's bucket; raises ``ApiError`` 429 when it is empty. Never waits.
    """
    identity = current_identity()
    if identity is not None and claimed != identity.sub:
        raise ApiError(403, NOT_YOURS)
    user = claimed if identity is None else identity.sub
    if request.method in WRITE_METHODS:
        refusal = gate_of(current_app).per_user.take(user)
        if refusal is not None:
            raise _too_many(refusal)
    return user
