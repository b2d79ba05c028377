"""JSON bodies only as ``Content-Type: application/json`` (API.md; hardening issue finding 3).

A browser sends ``text/plain``, ``application/x-www-form-urlencoded`` and
``multipart/form-data`` POSTs cross-site without a CORS preflight; if the API parsed such a
body as JSON, any page open in the user's browser could create or close positions. Requiring
``application/json`` (which a cross-site page can only send after a preflight that CORS
refuses) closes that door. Parameters (``; charset=utf-8``) are allowed and the type is
compared case-insensitively (RFC 9110 8.3.1).

``install`` adds one ``before_request`` hook: a POST, PUT or PATCH to a known ``/api/`` route
whose media type is not ``application/json`` is answered 415 before its body is read, so
nothing is parsed or created. Unknown routes and wrong methods keep their 404 and 405.
"""

from __future__ import annotations

from quart import request
from quart_trio import QuartTrio

from tickguard.web.errors import ApiError

JSON = "application/json"
MESSAGE = "Content-Type must be application/json."
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def media_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` value, lower case, without its parameters
    (``""`` when absent)."""
    if content_type is None:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def install(app: QuartTrio) -> None:
    """Answer 415 to a body-carrying request on ``/api/`` that is not JSON."""

    @app.before_request
    async def _require_json() -> None:
        if (
            request.method in _BODY_METHODS
            and request.url_rule is not None
            and request.path.startswith("/api/")
            and media_type(request.headers.get("Content-Type")) != JSON
        ):
            raise ApiError(415, MESSAGE)
