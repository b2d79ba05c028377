"""A JWKS document served over a real local socket, for tests of web/auth.py.

``serve_jwks(nursery)`` starts an HTTP/1.1 server (h11 on trio) on 127.0.0.1 that answers every
GET with ``server.document`` as JSON. Tests change what it does between requests: replace the
document (key rotation), set ``delay_s`` (a slow provider), ``status`` (an erroring one), or
``stop()`` it (an outage: connections are refused). ``fetches`` counts the requests answered or
started, so tests can assert when the verifier went to the network.

Also here: real RSA and P-256 keys made with ``cryptography`` and a token signer, so each test
states the claims and header it means.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs
import h11
import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm


@attrs.define
class SigningKey:
    """A private key, its kid and its public JWK (``alg`` as the JWK would name it)."""

    kid: str
    algorithm: str
    private: Any

    @classmethod
    def rsa(cls, kid: str) -> SigningKey:
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    def jwk(self, **extra: Any) -> dict[str, Any]:
        public = self.private.public_key()
        algorithm = RSAAlgorithm if self.algorithm == "RS256" else ECAlgorithm
        jwk: dict[str, Any] = json.loads(algorithm.to_jwk(public))
        jwk.update(kid=self.kid, use="sig", alg=self.algorithm)
        jwk.update(extra)
        return jwk

    def sign(self, claims: Mapping[str, Any], **header: Any) -> str:
        return jwt.encode(
            dict(claims),
            self.private,
            algorithm=self.algorithm,
            headers={"kid": self.kid, **header},
        )


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [key.jwk() for key in keys]}


@attrs.define
class JwksServer:
    url: str
    document: Any
    cancel_scope: trio.CancelScope
    delay_s: float = 0.0
    status: int = 200
    fetches: int = 0

    def stop(self) -> None:
        """Close the listener: later fetches get a refused connection."""
        self.cancel_scope.cancel()


async def serve_jwks(nursery: trio.Nursery, document: Any) -> JwksServer:
    """Start the server in ``nursery``; returns once it accepts connections."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = JwksServer(
        url=f"http://127.0.0.1:{port}/.well-known/jwks.json",
        document=document,
        cancel_scope=trio.CancelScope(),
    )

    async def run() -> None:
        with server.cancel_scope:
            await trio.serve_listeners(lambda stream: _answer(server, stream), listeners)
        for listener in listeners:
            await listener.aclose()

    nursery.start_soon(run)
    return server


async def _answer(server: JwksServer, stream: trio.SocketStream) -> None:
    connection = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                break
            if isinstance(event, h11.ConnectionClosed):
                return
        server.fetches += 1
        if server.delay_s:
            await trio.sleep(server.delay_s)
        body = json.dumps(server.document).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        headers.append(("connection", "close"))
        await stream.send_all(
            connection.send(h11.Response(status_code=server.status, headers=headers)) or b""
        )
        await stream.send_all(connection.send(h11.Data(data=body)) or b"")
        await stream.send_all(connection.send(h11.EndOfMessage()) or b"")
