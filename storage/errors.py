"""What storage answers besides rows: the refusals a caller can act on (and turn into an
HTTP answer). ``DatabaseUnavailable`` lives with the connection code in ``storage.db``."""

from __future__ import annotations


class IdempotencyKeyReused(Exception):
    """The user's Idempotency-Key belongs to a position created from a different request body
    (the IETF idempotency-key draft answers 422); nothing was written."""

    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was used with a different request body.")
        self.key = key


class OpenPositionLimit(Exception):
    """The user already holds the maximum number of open positions."""

    def __init__(self, limit: int) -> None:
        many = "open position is" if limit == 1 else "open positions are"
        super().__init__(f"At most {limit} {many} allowed per user.")
        self.limit = limit


class BadCursor(ValueError):
    """A pagination cursor that this server did not issue."""
