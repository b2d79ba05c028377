"""JSON responses with exact decimals: every body the web layer writes goes through
``tickguard.wire`` (Decimal as JSON numbers, never strings or floats)."""

from __future__ import annotations

from typing import Any

from quart import Response
from quart.json.provider import DefaultJSONProvider

from tickguard.wire import dumps, loads


class WireJSONProvider(DefaultJSONProvider):
    """Quart's JSON provider, writing and reading through ``wire`` so that a stray
    ``jsonify`` or ``request.get_json`` keeps decimals exact too."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return dumps(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads(s)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response written with ``wire.dumps``."""
    return Response(dumps(body), status=status, headers=headers, content_type="application/json")
