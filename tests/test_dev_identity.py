"""The development identity provider: `tickguard dev-token` as a real process, its key on disk,
and its tokens verified by web/auth.py against its JWKS served over a real socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import pytest
import trio

from tickguard.web.auth import InvalidToken, VerifierConfig, open_token_verifier
from tickguard.web.dev_identity import DEV_ISSUER, load_or_create, serve_jwks

pytestmark = pytest.mark.timeout(120)


def tickguard(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "HOST"))}
    environ.update(TICKGUARD_DATA_DIR=str(data_dir), **env)
    return subprocess.run(
        [sys.executable, "-m", "tickguard", "dev-token", *args],
        env=environ,
        cwd=data_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dev_token_makes_a_private_key_once_and_signs_with_it(tmp_path: Path) -> None:
    first = tickguard(tmp_path, "alice")
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip()
    folder = tmp_path / "dev-jwks"
    key_file = folder / "private.pem"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "RS256"
    assert claims["sub"] == "alice" and claims["iss"] == DEV_ISSUER
    assert claims["exp"] - claims["iat"] == 3600 and "aud" not in claims

    document = json.loads(tickguard(tmp_path, "--jwks").stdout)
    assert [key["kid"] for key in document["keys"]] == [header["kid"]]
    assert "d" not in document["keys"][0]
    # The same key next time: earlier tokens stay valid.
    again = tickguard(tmp_path, "bob", "--ttl", "60")
    assert jwt.get_unverified_header(again.stdout.strip())["kid"] == header["kid"]
    assert key_file.read_bytes() == (tmp_path / "dev-jwks" / "private.pem").read_bytes()


def test_dev_token_takes_issuer_and_audience_from_the_settings(tmp_path: Path) -> None:
    done = tickguard(tmp_path, "carol", AUTH_ISSUER="https://idp.test/", AUTH_AUDIENCE="api,web")
    claims = jwt.decode(done.stdout.strip(), options={"verify_signature": False})
    assert (claims["iss"], claims["aud"]) == ("https://idp.test/", "api")


@pytest.mark.parametrize("args", [(), ("al\x01ice",), ("x" * 129,), ("alice", "--ttl", "0")])
def test_dev_token_refuses_what_it_cannot_sign(tmp_path: Path, args: tuple[str, ...]) -> None:
    done = tickguard(tmp_path, *args)
    assert done.returncode == 2
    assert done.stdout == ""


async def test_dev_tokens_verify_against_the_served_dev_jwks(tmp_path: Path) -> None:
    key = load_or_create(tmp_path)
    stranger = load_or_create(tmp_path / "other")
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_jwks, key, "127.0.0.1", 0)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/jwks.json")
        config = VerifierConfig(jwks_url=url, issuer=DEV_ISSUER, audience=("tickguard",))
        with trio.fail_after(20):
            async with open_token_verifier(config) as verifier:
                identity = await verifier.verify(key.token("alice", audience="tickguard"))
                assert identity.sub == "alice"
                with pytest.raises(InvalidToken):
                    await verifier.verify(stranger.token("alice", audience="tickguard"))
                with pytest.raises(InvalidToken):
                    await verifier.verify(key.token("alice", audience="tickguard", ttl_s=-60))
            async with httpx.AsyncClient() as client:
                missing = await client.get(url.replace("/jwks.json", "/private.pem"))
                assert missing.status_code == 404
        nursery.cancel_scope.cancel()


def test_dev_token_serve_answers_the_jwks_until_interrupted(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "HOST"))}
    environ.update(TICKGUARD_DATA_DIR=str(tmp_path), PYTHONUNBUFFERED="1")
    with socket_port() as port:
        process = subprocess.Popen(
            [sys.executable, "-m", "tickguard", "dev-token", "--serve", "--port", str(port)],
            env=environ,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.split()[3]
        assert url == f"http://127.0.0.1:{port}/jwks.json"
        document = httpx.get(url, timeout=10).json()
        assert document == load_or_create(tmp_path).jwks()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    # A taken port is one line and exit code 1.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        done = tickguard(tmp_path, "--serve", "--port", str(holder.getsockname()[1]))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("tickguard: dev JWKS server:")


class socket_port:
    """A port free right now (closed on exit, for the child to bind)."""

    def __enter__(self) -> int:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        return int(self._socket.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._socket.close()
