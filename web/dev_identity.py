"""A development identity provider: one RSA key in the data directory, the RS256 tokens it signs
and the JWKS that verifies them, so the demo and tests run authentication end to end with no
real identity provider (``tickguard dev-token``; docs/SECURITY.md).

The key is made on first use in ``TICKGUARD_DATA_DIR/dev-jwks/`` (directory 0700, key 0600)
and kept, so tokens stay valid across restarts. Its ``kid`` is the RFC 7638 thumbprint of the
public key. Never point a production ``AUTH_JWKS_URL`` at it: whoever can read the data
directory can sign in as anyone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, cast

import attrs
import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

DEV_ISSUER = "tickguard-dev"
DEFAULT_TTL_S = 3600
# Where ``tickguard dev-token --serve`` answers (one port above the simulator's 8765).
DEFAULT_JWKS_PORT = 8766
JWKS_PATHS = ("/jwks.json", "/.well-known/jwks.json")


@attrs.frozen
class DevKey:
    """The dev provider's private RSA key and its key id."""

    kid: str
    private: rsa.RSAPrivateKey

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        return jwk

    def jwks(self) -> dict[str, Any]:
        """The JWKS document (the public key only)."""
        return {"keys": [self.public_jwk()]}

    def token(
        self,
        sub: str,
        *,
        ttl_s: int = DEFAULT_TTL_S,
        issuer: str | None = DEV_ISSUER,
        audience: str | None = None,
        now: float | None = None,
    ) -> str:
        """A signed RS256 token for ``sub``, valid from ``now`` (default: the wall clock) for
        ``ttl_s`` seconds."""
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {"sub": sub, "iat": issued, "nbf": issued, "exp": issued + ttl_s}
        if issuer is not None:
            claims["iss"] = issuer
        if audience is not None:
            claims["aud"] = audience
        return jwt.encode(claims, self.private, algorithm="RS256", headers={"kid": self.kid})


def load_or_create(data_dir: Path) -> DevKey:
    """The dev key kept in ``data_dir/dev-jwks/``, made on first use. Blocking file I/O and, the
    first time, key generation (tens of milliseconds): for the command line, not a request."""
    folder = data_dir / "dev-jwks"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / "private.pem"
    try:
        # O_EXCL: two first uses at once must not both write (the loser reads the winner's key).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pem = path.read_bytes()
        loaded = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise ValueError(f"{path} does not hold an RSA private key") from None
        return DevKey(kid=_thumbprint(loaded), private=loaded)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    return DevKey(kid=_thumbprint(private), private=private)


def _thumbprint(private: rsa.RSAPrivateKey) -> str:
    """RFC 7638: SHA-256 of the public JWK's required members in lexical order, no spaces."""
    jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    canonical = json.dumps(
        {"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"), sort_keys=True
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def serve_jwks(
    key: DevKey,
    host: str = "127.0.0.1",
    port: int = DEFAULT_JWKS_PORT,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``key``'s JWKS at ``/jwks.json`` (and ``/.well-known/jwks.json``) over HTTP until
    cancelled; ``task_status.started`` gets the JWKS URL once the port is bound."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    body = json.dumps(key.jwks()).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        found = scope["method"] in ("GET", "HEAD") and scope["path"] in JWKS_PATHS
        payload = body if found else b'{"error": "Not found."}'
        await send(
            {
                "type": "http.response.start",
                "status": 200 if found else 404,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    # Through tickguard's logging (LOG_FORMAT), not hypercorn's own stderr handler.
    config.errorlog = logging.getLogger("hypercorn.error")

    async with trio.open_nursery() as nursery:
        # A bare ASGI callable; hypercorn's TypedDict signature would only restate the above.
        binds = await nursery.start(partial(serve, cast(Any, app), config, mode="asgi"))
        task_status.started(f"{binds[0]}{JWKS_PATHS[0]}")
