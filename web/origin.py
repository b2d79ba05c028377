"""Which pages may open ``/ws``: the handshake's ``Origin`` (API.md; hardening finding 3).

Browsers do not apply CORS to WebSockets: without this check any page open in the user's
browser could open ``/ws`` and read a user's events (cross-site WebSocket hijacking). A
handshake is accepted when it carries no ``Origin`` (a non-browser client: browsers always
send one), when its ``Origin`` is in ``CORS_ORIGIN`` (or that is ``*``), or when it is the
server's own origin: the scheme, host and port the request was addressed to (its ``Host``
header), which is where the dashboard served at ``/`` runs. Any other handshake is answered
403 before the upgrade, as a plain HTTP response.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from quart import websocket
from quart_trio import QuartTrio

from tickguard.web.errors import ApiError

MESSAGE = "This Origin may not open /ws."
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an origin or ``scheme://host[:port]`` text, lower case and
    with the scheme's default port filled in; None when it is not one (``null``, garbage)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


def own_origin(scheme: str, host: str) -> tuple[str, str, int] | None:
    """The origin of a page served by this server for a request with ``Host: host`` that
    arrived over ``scheme`` (``ws``/``wss``/``http``/``https``)."""
    secure = scheme in ("wss", "https")
    return normalise(f"{'https' if secure else 'http'}://{host}")


class OriginPolicy:
    """The ``/ws`` Origin rule for one ``CORS_ORIGIN`` setting (lower-case, or ``("*",)``)."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any_origin = "*" in origins
        self.allowed = frozenset(n for o in origins if (n := normalise(o)) is not None)

    def allows(self, origin: str | None, scheme: str, host: str) -> bool:
        """Whether a handshake with this ``Origin`` header (None: absent) addressed to
        ``host`` over ``scheme`` may be accepted."""
        if origin is None or self.any_origin:
            return True
        parsed = normalise(origin)
        if parsed is None:
            return False
        return parsed in self.allowed or parsed == own_origin(scheme, host)


def install(app: QuartTrio, origins: tuple[str, ...]) -> None:
    """Refuse with 403, before the upgrade, a WebSocket handshake from another site."""
    policy = OriginPolicy(origins)

    @app.before_websocket
    async def _check_origin() -> None:
        if not policy.allows(websocket.headers.get("Origin"), websocket.scheme, websocket.host):
            raise ApiError(403, MESSAGE)
