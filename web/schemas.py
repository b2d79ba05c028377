"""Request schemas: one declarative table per body or query, used both to validate requests
and to write the OpenAPI document (web/openapi.py), so the two cannot drift apart.

A ``Field`` pairs a parser (raw JSON or query value → Python value, or ``FieldError``) with
the JSON Schema fragment that describes the same rule. ``validate`` runs every field of a
``Schema`` and raises ``ValidationError`` with one message per bad field. Unknown fields are
ignored (the React client sends exactly the documented ones; being lenient costs nothing).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import attrs

# NUMERIC(18,8): up to 10 integer digits and 8 decimal places.
PRICE_DECIMALS = 8
PRICE_LIMIT = Decimal(10) ** 10
USER_ID_MAX = 128
SYMBOL_MAX = 64
LIMIT_DEFAULT = 500
LIMIT_MAX = 1000
IDEMPOTENCY_KEY_MAX = 255

_SYMBOL = re.compile(r"[A-Z0-9]+-[A-Z0-9]+")
_DECIMAL_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_INT_TEXT = re.compile(r"\d{1,9}")

Location = Literal["body", "query"]


class FieldError(ValueError):
    """One field's value is invalid; the message is a sentence that names the field."""


class ValidationError(ValueError):
    """A request failed validation; ``details`` maps each bad field to its message."""

    def __init__(self, details: dict[str, str]) -> None:
        super().__init__(" ".join(details.values()))
        self.details = details


@attrs.frozen
class Field:
    """One request field: its name, whether it must be present, how to parse it, and the JSON
    Schema of the values ``parse`` accepts. A missing or null optional field is ``default``."""

    name: str
    parse: Callable[[str, Any], Any]
    schema: dict[str, Any]
    required: bool = True
    default: Any = None
    description: str = ""


@attrs.frozen
class Schema:
    """A request body (``location="body"``, a JSON object) or query string."""

    name: str
    location: Location
    fields: tuple[Field, ...]
    description: str = ""


def validate(schema: Schema, data: Any) -> dict[str, Any]:
    """Parse ``data`` (a decoded JSON body or a query mapping) against ``schema``.

    Returns the parsed values by field name (defaults filled in). Raises ``ValidationError``
    listing every bad field; never returns partly valid values.
    """
    if not isinstance(data, Mapping):
        raise ValidationError({"body": "The request body must be a JSON object."})
    values: dict[str, Any] = {}
    details: dict[str, str] = {}
    for field in schema.fields:
        raw = data.get(field.name)
        if raw is None:
            if field.required:
                details[field.name] = f"{field.name} is required."
            else:
                values[field.name] = field.default
            continue
        try:
            values[field.name] = field.parse(field.name, raw)
        except FieldError as problem:
            details[field.name] = str(problem)
    if details:
        raise ValidationError(details)
    return values


def json_schema(schema: Schema) -> dict[str, Any]:
    """The JSON Schema of a body schema (an object with these properties)."""
    properties = {}
    for field in schema.fields:
        prop = dict(field.schema)
        if field.description:
            prop["description"] = field.description
        if not field.required:
            prop = {"anyOf": [prop, {"type": "null"}], **_doc(field)}
        properties[field.name] = prop
    return {
        "type": "object",
        "description": schema.description,
        "properties": properties,
        "required": [f.name for f in schema.fields if f.required],
    }


def _doc(field: Field) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if field.description:
        doc["description"] = field.description
    if field.default is not None:
        doc["default"] = field.default
    return doc


# --- parsers -----------------------------------------------------------------------------------


def storable_text(raw: str) -> bool:
    """Whether PostgreSQL can store ``raw`` as TEXT exactly: valid UTF-8 (no lone surrogate,
    which JSON's ``\\ud800`` escapes and percent-decoding can produce) and no NUL, nor any other
    control character (they have no place in an id and break logs)."""
    return not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in raw)


def parse_user_id(name: str, raw: Any) -> str:
    """1–128 characters of storable text (see ``storable_text``)."""
    if not isinstance(raw, str):
        raise FieldError(f"{name} must be a string.")
    if not 1 <= len(raw) <= USER_ID_MAX:
        raise FieldError(f"{name} must be 1 to {USER_ID_MAX} characters long.")
    if not storable_text(raw):
        raise FieldError(f"{name} must be valid Unicode text without control characters.")
    return raw


def parse_symbol(name: str, raw: Any) -> str:
    """A Coinbase product id, upper-cased: ``btc-usd`` → ``BTC-USD``."""
    if not isinstance(raw, str):
        raise FieldError(f"{name} must be a string.")
    symbol = raw.strip().upper()
    if len(symbol) > SYMBOL_MAX or not _SYMBOL.fullmatch(symbol):
        raise FieldError(f"{name} must look like BASE-QUOTE (letters and digits), e.g. BTC-USD.")
    return symbol


def parse_price(name: str, raw: Any) -> Decimal:
    """A JSON number (already a Decimal or int, never a float) or a decimal string.

    Accepts finite values > 0 with at most 8 decimal places (trailing zeros do not count) and
    below 10^10 (NUMERIC(18,8)). Returns the plain value (no exponent, no trailing zeros).
    """
    if isinstance(raw, bool) or not isinstance(raw, (int, Decimal, str)):
        # bool first: it is an int in Python, but `true` is not a price.
        raise FieldError(f"{name} must be a number or a decimal string.")
    if isinstance(raw, str):
        text = raw.strip()
        if not _DECIMAL_TEXT.fullmatch(text):
            raise FieldError(f"{name} must be a number or a decimal string.")
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise FieldError(f"{name} must be a number or a decimal string.") from None
    else:
        value = Decimal(raw)
    if not value.is_finite():
        raise FieldError(f"{name} must be a finite number.")
    if value <= 0:
        raise FieldError(f"{name} must be greater than 0.")
    # Compared exactly, before any arithmetic that an enormous exponent could overflow.
    if value >= PRICE_LIMIT:
        raise FieldError(f"{name} must be less than 10000000000 (10 integer digits).")
    if _decimal_places(value) > PRICE_DECIMALS:
        raise FieldError(f"{name} must have at most {PRICE_DECIMALS} decimal places.")
    return _plain(value)


def _decimal_places(value: Decimal) -> int:
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite, checked by the caller
    # Trailing zeros do not count: 1.100000000 is 1.1.
    places = -exponent
    index = len(digits) - 1
    while places > 0 and index >= 0 and digits[index] == 0:
        places -= 1
        index -= 1
    return max(places, 0)


def _plain(value: Decimal) -> Decimal:
    # Below 10^10 with at most 8 places, so this quantize is exact and cannot overflow.
    return value.quantize(Decimal(1).scaleb(-_decimal_places(value)))


def choice(*options: str) -> Callable[[str, Any], str]:
    """A parser accepting exactly one of ``options`` (case-sensitive)."""

    def parse(name: str, raw: Any) -> str:
        if raw not in options:
            raise FieldError(f"{name} must be one of: {', '.join(options)}.")
        return str(raw)

    return parse


def query_int(low: int, high: int) -> Callable[[str, Any], int]:
    """A parser for a whole number in a query string, from ``low`` to ``high``."""

    def parse(name: str, raw: Any) -> int:
        if not isinstance(raw, str) or not _INT_TEXT.fullmatch(raw) or not low <= int(raw) <= high:
            raise FieldError(f"{name} must be a whole number from {low} to {high}.")
        return int(raw)

    return parse


def parse_cursor(name: str, raw: Any) -> str:
    """An opaque cursor from an earlier response; storage decides whether it is valid."""
    if not isinstance(raw, str) or not 1 <= len(raw) <= 512 or not storable_text(raw):
        raise FieldError(f"{name} must be a cursor returned as nextCursor.")
    return raw


def parse_idempotency_key(name: str, raw: Any) -> str:
    """1–255 printable characters."""
    if (
        not isinstance(raw, str)
        or not 1 <= len(raw) <= IDEMPOTENCY_KEY_MAX
        or not storable_text(raw)
    ):
        raise FieldError(f"{name} must be 1 to {IDEMPOTENCY_KEY_MAX} printable characters.")
    return raw


# --- the tables --------------------------------------------------------------------------------

_PRICE_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {"type": "number", "exclusiveMinimum": 0, "maximum": 9999999999.99999999},
        {"type": "string", "pattern": r"^\+?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"},
    ],
    "description": "Exact decimal > 0, below 10^10, at most 8 decimal places; a JSON number "
    "or a decimal string.",
}
_USER_ID_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": USER_ID_MAX,
    "pattern": r"^[^\x00-\x1f\x7f-\x9f]+$",
}


def _user_id_field() -> Field:
    return Field("userId", parse_user_id, _USER_ID_SCHEMA, description="The acting user.")


CREATE_POSITION = Schema(
    "CreatePosition",
    "body",
    (
        _user_id_field(),
        Field(
            "symbol",
            parse_symbol,
            {"type": "string", "maxLength": SYMBOL_MAX, "pattern": r"^[A-Za-z0-9]+-[A-Za-z0-9]+$"},
            description="Coinbase product id; upper-cased on input.",
        ),
        Field("side", choice("long", "short"), {"type": "string", "enum": ["long", "short"]}),
        Field(
            "entryPrice",
            parse_price,
            _PRICE_SCHEMA,
            required=False,
            description="Omitted or null: the last price the feed saw for the symbol.",
        ),
        Field("takeProfit", parse_price, _PRICE_SCHEMA, required=False),
        Field("stopLoss", parse_price, _PRICE_SCHEMA, required=False),
    ),
    description="Open a position. Bracket rules: long needs stopLoss < entryPrice < "
    "takeProfit, short needs takeProfit < entryPrice < stopLoss.",
)

CLOSE_POSITION = Schema(
    "ClosePosition",
    "body",
    (
        _user_id_field(),
        Field("closePrice", parse_price, _PRICE_SCHEMA),
        Field(
            "reason",
            choice("manual", "system"),
            {"type": "string", "enum": ["manual", "system"]},
            required=False,
            default="manual",
        ),
    ),
    description="Close one open position of this user.",
)

LIST_POSITIONS = Schema(
    "ListPositionsQuery",
    "query",
    (
        _user_id_field(),
        Field(
            "status",
            choice("open", "closed"),
            {"type": "string", "enum": ["open", "closed"]},
            required=False,
            description="Only positions with this status; both when omitted.",
        ),
        Field(
            "limit",
            query_int(1, LIMIT_MAX),
            {"type": "integer", "minimum": 1, "maximum": LIMIT_MAX},
            required=False,
            default=LIMIT_DEFAULT,
            description="Page size.",
        ),
        Field(
            "cursor",
            parse_cursor,
            {"type": "string"},
            required=False,
            description="The nextCursor of the previous page.",
        ),
    ),
)

LIST_CLOSED = Schema(
    "ListClosedQuery", "query", tuple(f for f in LIST_POSITIONS.fields if f.name != "status")
)

USER_QUERY = Schema("UserQuery", "query", (_user_id_field(),))

IDEMPOTENCY_KEY = Field(
    "Idempotency-Key",
    parse_idempotency_key,
    {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX},
    required=False,
    description="A retry with the same key (per user) returns the position the first request "
    "created instead of creating another.",
)
