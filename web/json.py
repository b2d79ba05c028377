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


def page_bytes(objects: str, cursor: str | None) -> bytes:
    """``{"data":[...]}`` (and ``"nextCursor"``) around Position objects already written as
    JSON text by PostgreSQL (``storage.reads.list_positions_json``): byte for byte what
    ``dumps`` writes for the same page, without decoding a row."""
    tail = b"]}" if cursor is None else b'],"nextCursor":' + dumps(cursor) + b"}"
    return b'{"data":[' + objects.encode() + tail


def raw_json_response(body: bytes, status: int = 200) -> Response:
    """A response whose JSON ``body`` is already written (by ``wire`` or by PostgreSQL)."""
    return Response(body, status=status, content_type="application/json")
