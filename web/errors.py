"""Every error the API answers, as JSON ``{"error": sentence, "details"?: {field: message}}``.

Handlers raise ``ApiError`` (or let a known exception through); ``install`` registers the
handlers that turn each into a response. No response ever carries a traceback or SQL: an
unexpected exception is logged with its traceback and answered 500 ``Internal error.``.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tickguard.actors.mailbox import ActorUnavailable
from tickguard.actors.messages import WriteRejected
from tickguard.storage import BadCursor, DatabaseUnavailable, OpenPositionLimit
from tickguard.web.json import json_response
from tickguard.web.schemas import ValidationError

log = logging.getLogger("tickguard.web")

# How long a client should wait before retrying after a 503.
RETRY_AFTER_SECONDS = 2

# Werkzeug's own messages are fine for humans but mention HTML forms; ours are one sentence.
_HTTP_MESSAGES = {
    400: "The request body is not valid JSON.",
    404: "Not found.",
    405: "Method not allowed.",
    413: "The request body is larger than 64 KiB.",
}


class ApiError(Exception):
    """An answer that is not a success: status, one sentence, optional field details."""

    def __init__(
        self,
        status: int,
        message: str,
        details: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details
        self.headers = headers or {}


def error_response(error: ApiError) -> Response:
    body: dict[str, Any] = {"error": error.message}
    if error.details:
        body["details"] = error.details
    return json_response(body, error.status, error.headers)


def unavailable(message: str) -> ApiError:
    """503 with ``Retry-After``: a dependency is down or too slow, try again shortly."""
    return ApiError(503, message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def install(app: QuartTrio) -> None:
    """Register the error handlers on ``app``."""

    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(ValidationError)
    async def _validation(error: ValidationError) -> Response:
        return error_response(ApiError(400, str(error), error.details))

    @app.errorhandler(BadCursor)
    async def _bad_cursor(error: BadCursor) -> Response:
        return error_response(
            ApiError(400, "cursor is not valid.", {"cursor": "cursor is not valid."})
        )

    @app.errorhandler(OpenPositionLimit)
    async def _limit(error: OpenPositionLimit) -> Response:
        message = str(error) or "Too many open positions."
        return error_response(ApiError(400, message))

    @app.errorhandler(DatabaseUnavailable)
    async def _database(error: DatabaseUnavailable) -> Response:
        log.warning("database unavailable: %s", error)
        return error_response(unavailable("Database unavailable."))

    @app.errorhandler(ActorUnavailable)
    async def _actor(error: ActorUnavailable) -> Response:
        log.warning("actor unavailable: %s", error)
        return error_response(unavailable("Service temporarily unavailable."))

    @app.errorhandler(WriteRejected)
    async def _rejected(error: WriteRejected) -> Response:
        # The writer logged it with its traceback; this request alone failed.
        return error_response(ApiError(500, "Internal error."))

    @app.errorhandler(trio.TooSlowError)
    async def _too_slow(error: trio.TooSlowError) -> Response:
        log.warning("request timed out waiting for an actor")
        return error_response(unavailable("Service temporarily unavailable."))

    @app.errorhandler(HTTPException)
    async def _http(error: HTTPException) -> Response:
        status = error.code or 500
        if status >= 500:
            # Quart has already logged the traceback of the exception behind a 500.
            message = "Internal error."
        else:
            message = _HTTP_MESSAGES.get(status) or f"{error.name}."
        response = error_response(ApiError(status, message))
        allowed = getattr(error, "valid_methods", None)  # set on werkzeug's MethodNotAllowed
        if status == 405 and allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response
