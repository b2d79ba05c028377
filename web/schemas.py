"""Request shapes: one frozen attrs class per body or query, structured by cattrs and described
by ``/openapi.json`` (web/openapi.py) from the same declaration, so the two cannot drift apart.

A field's type says what it accepts: a value kind (``UserId``, ``Symbol``, ``Price``, ...; each
kind's parser and JSON Schema live side by side in ``KINDS``), a ``Literal`` (one of fixed
strings), or ``kind | None`` for an optional field. Its wire name is the attrs ``alias``; its
description is in ``metadata``. ``structure`` turns request data into an instance, or raises
``ValidationError`` whose ``details`` map each bad field to one sentence (from cattrs' error
tree). Unknown fields are ignored (the React client sends exactly the documented ones). A
missing or null optional field takes its default.
"""

import inspect
import re
import typing
import unicodedata
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any, Literal, NewType, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError

# NUMERIC(18,8): up to 10 integer digits and 8 decimal places.
PRICE_DECIMALS = 8
PRICE_LIMIT = Decimal(10) ** 10
PRICE_QUANTUM = Decimal(1).scaleb(-PRICE_DECIMALS)
# What still rounds (half away from zero) into the column: [PRICE_MIN, PRICE_BELOW).
PRICE_MIN = Decimal("0.000000005")
PRICE_BELOW = PRICE_LIMIT - PRICE_QUANTUM / 2
PRICE_DIGITS = 30  # significant digits accepted on input (trailing zeros do not count)
USER_ID_MAX = 128
SYMBOL_MAX = 64
LIMIT_MAX = 1000
LIST_BOUND = 10_000  # rows of a list asked without `limit` (API.md), past which nextCursor is set
IDEMPOTENCY_KEY_MAX = 255

# The value kinds. A NewType only names the rule; ``KINDS`` holds the rule itself.
UserId = NewType("UserId", str)
Symbol = NewType("Symbol", str)
Price = NewType("Price", Decimal)
PageSize = NewType("PageSize", int)
Cursor = NewType("Cursor", str)
IdempotencyKey = NewType("IdempotencyKey", str)

# ASCII digits only: Python's \d also matches other scripts' digits, which Decimal accepts.
_SYMBOL = re.compile(r"[A-Za-z0-9]+-[A-Za-z0-9]+")
_INT_TEXT = re.compile(r"[0-9]{1,9}")
# A price as a string: plain notation, at most 10 integer digits (leading zeros aside) and 20
# decimal places (trailing zeros aside), so at most 30 significant digits; the lookahead refuses
# exactly the strings that round (to 8 places) to 0 or to 10^10. JSON Schema and the parser
# share this one pattern (ECMA-262 and Python agree on every construct in it).
PRICE_PATTERN = (
    r"^(?!0+(\.0{0,8})?$|0+\.0{8}[0-4]|0*9999999999\.99999999[5-9])"
    r"0*(0|[1-9][0-9]{0,9})(\.[0-9]{1,20}0*)?$"
)
_PRICE_TEXT = re.compile(PRICE_PATTERN)
# Cursors this server writes: microseconds since the epoch, a dot, the row's UUID in hex.
# Every string of this shape is a valid keyset position, so the pattern is the whole rule.
CURSOR_PATTERN = r"^[0-9]{1,16}\.[0-9a-f]{32}$"
_CURSOR_TEXT = re.compile(CURSOR_PATTERN)


class FieldError(ValueError):
    """One field's value is invalid. Raised by a kind's parser with the rule it broke
    (``must be ...``); ``ValidationError.details`` puts the field's name in front."""


class ValidationError(ValueError):
    """A request failed validation; ``details`` maps each bad field to its message."""

    def __init__(self, details: dict[str, str]) -> None:
        super().__init__(" ".join(details.values()))
        self.details = details


@attrs.frozen
class Kind:
    """One value rule: ``parse`` (raw JSON or query value → value, or ``FieldError``) and the
    JSON Schema of exactly the values ``parse`` accepts."""

    parse: Callable[[Any], Any]
    schema: dict[str, Any]


# --- parsers -----------------------------------------------------------------------------------


def storable_text(raw: str) -> bool:
    """Whether PostgreSQL can store ``raw`` as TEXT exactly: valid UTF-8 (no lone surrogate,
    which JSON's ``\\ud800`` escapes and percent-decoding can produce) and no NUL, nor any other
    control character (they have no place in an id and break logs)."""
    return not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in raw)


def _user_id(raw: Any) -> str:
    if not isinstance(raw, str):
        raise FieldError("must be a string.")
    if not 1 <= len(raw) <= USER_ID_MAX:
        raise FieldError(f"must be 1 to {USER_ID_MAX} characters long.")
    if not storable_text(raw):
        raise FieldError("must be valid Unicode text without control characters.")
    return raw


def parse_user_id(name: str, raw: Any) -> str:
    """1–128 characters of storable text (see ``storable_text``); ``FieldError`` names
    ``name``. (For callers outside a request class, such as the WebSocket query.)"""
    try:
        return _user_id(raw)
    except FieldError as problem:
        raise FieldError(f"{name} {problem}") from None


def _symbol(raw: Any) -> str:
    """A Coinbase product id, upper-cased: ``btc-usd`` → ``BTC-USD``."""
    if not isinstance(raw, str):
        raise FieldError("must be a string.")
    if len(raw) > SYMBOL_MAX or not _SYMBOL.fullmatch(raw):
        raise FieldError("must look like BASE-QUOTE (letters and digits), e.g. BTC-USD.")
    return raw.upper()


_ROUNDING = Context(prec=60, rounding=ROUND_HALF_UP)


def _price(raw: Any) -> Decimal:
    """A JSON number (Decimal or int, never a float) or a string matching ``PRICE_PATTERN``,
    rounded half away from zero to 8 places (as PostgreSQL's NUMERIC(18,8) does), then checked
    to be > 0 and < 10^10."""
    if isinstance(raw, bool) or not isinstance(raw, (int, Decimal, str)):
        # bool first: it is an int in Python, but `true` is not a price.
        raise FieldError("must be a number or a decimal string.")
    if isinstance(raw, str):
        if not _PRICE_TEXT.fullmatch(raw):
            raise FieldError(
                "must be a number, or a decimal string in plain notation of at most 10 "
                "integer digits and 20 decimal places, that rounds to 0.00000001 to "
                "9999999999.99999999."
            )
    value = Decimal(raw)
    if not value.is_finite():
        raise FieldError("must be a finite number.")
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    # Trailing zeros do not count (stripped only in the rare case they could matter).
    if len(digits) > PRICE_DIGITS and len(bytes(digits).rstrip(b"\0")) > PRICE_DIGITS:
        raise FieldError(f"must have at most {PRICE_DIGITS} significant digits.")
    if value <= 0:
        raise FieldError("must be greater than 0.")
    # Compared exactly before rounding: an enormous exponent cannot overflow the quantize.
    if value >= PRICE_BELOW:
        raise FieldError("must be less than 10000000000 once rounded to 8 decimal places.")
    if exponent >= -PRICE_DECIMALS:
        return value  # at most 8 places already: nothing to round
    rounded = value.quantize(PRICE_QUANTUM, context=_ROUNDING)
    if rounded <= 0:
        raise FieldError("must be at least 0.00000001 once rounded to 8 decimal places.")
    return rounded


def _page_size(raw: Any) -> int:
    if not isinstance(raw, str) or not _INT_TEXT.fullmatch(raw) or not 1 <= int(raw) <= LIMIT_MAX:
        raise FieldError(f"must be a whole number from 1 to {LIMIT_MAX}.")
    return int(raw)


def _cursor(raw: Any) -> str:
    if not isinstance(raw, str) or not _CURSOR_TEXT.fullmatch(raw):
        raise FieldError("is not valid.")
    return raw


def _idempotency_key(raw: Any) -> str:
    if not isinstance(raw, str) or not 1 <= len(raw) <= IDEMPOTENCY_KEY_MAX:
        raise FieldError(f"must be 1 to {IDEMPOTENCY_KEY_MAX} printable characters.")
    if not storable_text(raw):
        raise FieldError(f"must be 1 to {IDEMPOTENCY_KEY_MAX} printable characters.")
    return raw


_PRICE_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {"type": "number", "minimum": PRICE_MIN, "exclusiveMaximum": PRICE_BELOW},
        {"type": "string", "pattern": PRICE_PATTERN},
    ],
    "description": "Rounded half away from zero to 8 decimal places, then it must be > 0 and "
    "< 10^10 (NUMERIC(18,8)): a JSON number of up to 30 significant digits (exponent allowed), "
    "or a decimal string in plain notation (at most 10 integer and 20 decimal digits). The "
    "response carries the stored value.",
}

KINDS: dict[Any, Kind] = {
    UserId: Kind(
        _user_id,
        {
            "type": "string",
            "minLength": 1,
            "maxLength": USER_ID_MAX,
            # Control characters (Cc) are refused; so are lone surrogates (Cs), which are not
            # Unicode scalar values at all, so a JSON Schema string cannot hold one to describe.
            "pattern": r"^[^\x00-\x1f\x7f-\x9f]+$",
        },
    ),
    Symbol: Kind(
        _symbol, {"type": "string", "maxLength": SYMBOL_MAX, "pattern": f"^{_SYMBOL.pattern}$"}
    ),
    Price: Kind(_price, _PRICE_SCHEMA),
    PageSize: Kind(_page_size, {"type": "integer", "minimum": 1, "maximum": LIMIT_MAX}),
    Cursor: Kind(_cursor, {"type": "string", "pattern": CURSOR_PATTERN}),
    IdempotencyKey: Kind(
        _idempotency_key,
        {
            "type": "string",
            "minLength": 1,
            "maxLength": IDEMPOTENCY_KEY_MAX,
            "pattern": r"^[^\x00-\x1f\x7f-\x9f]+$",
        },
    ),
}


def _doc(text: str) -> dict[str, str]:
    return {"description": text}


# --- the request classes -----------------------------------------------------------------------


@attrs.frozen
class CreatePosition:
    """Open a position. Bracket rules: long needs stopLoss < entryPrice < takeProfit, short
    needs takeProfit < entryPrice < stopLoss."""

    user_id: UserId = attrs.field(alias="userId", metadata=_doc("The acting user."))
    symbol: Symbol = attrs.field(metadata=_doc("Coinbase product id; upper-cased on input."))
    side: Literal["long", "short"]
    entry_price: Price | None = attrs.field(
        default=None,
        alias="entryPrice",
        metadata=_doc("Omitted or null: the last price the feed saw for the symbol."),
    )
    take_profit: Price | None = attrs.field(default=None, alias="takeProfit")
    stop_loss: Price | None = attrs.field(default=None, alias="stopLoss")


@attrs.frozen
class ClosePosition:
    """Close one open position of this user."""

    user_id: UserId = attrs.field(alias="userId", metadata=_doc("The acting user."))
    close_price: Price = attrs.field(alias="closePrice")
    reason: Literal["manual", "system"] = "manual"


def _limit_field() -> Any:
    """The ``limit`` of a list query (one declaration for both lists)."""
    return attrs.field(
        default=None,
        metadata=_doc(
            f"Page size. Omitted: the whole list, up to {LIST_BOUND} rows (then nextCursor)."
        ),
    )


def _cursor_field() -> Any:
    """The ``cursor`` of a list query."""
    return attrs.field(default=None, metadata=_doc("The nextCursor of the previous page."))


@attrs.frozen
class ListPositionsQuery:
    """The query of ``GET /api/positions``."""

    user_id: UserId = attrs.field(alias="userId", metadata=_doc("The acting user."))
    status: Literal["open", "closed"] | None = attrs.field(
        default=None, metadata=_doc("Only positions with this status; both when omitted.")
    )
    limit: PageSize | None = _limit_field()
    cursor: Cursor | None = _cursor_field()


@attrs.frozen
class ListClosedQuery:
    """The query of ``GET /api/positions/closed``."""

    user_id: UserId = attrs.field(alias="userId", metadata=_doc("The acting user."))
    limit: PageSize | None = _limit_field()
    cursor: Cursor | None = _cursor_field()


@attrs.frozen
class UserQuery:
    """A query naming the acting user."""

    user_id: UserId = attrs.field(alias="userId", metadata=_doc("The acting user."))


@attrs.frozen
class Header:
    """A request header the API reads: its name, kind and description."""

    name: str
    kind: Any
    description: str


IDEMPOTENCY_KEY = Header(
    "Idempotency-Key",
    IdempotencyKey,
    "A retry with the same key (per user) and the same body returns the position the first "
    "request created instead of creating another; the same key with a different body is 422.",
)


# --- the converter -----------------------------------------------------------------------------


def _is_literal(type_: Any) -> bool:
    return typing.get_origin(type_) is Literal


def _structure_literal(raw: Any, type_: Any) -> Any:
    options = typing.get_args(type_)
    if raw is None:
        raise FieldError("is required.")
    if not isinstance(raw, str) or raw not in options:
        raise FieldError(f"must be one of: {', '.join(options)}.")
    return raw


def _kind_hook(kind: Kind) -> Callable[[Any, Any], Any]:
    def structure(raw: Any, _: Any) -> Any:
        if raw is None:
            raise FieldError("is required.")
        return kind.parse(raw)

    return structure


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(use_alias=True, forbid_extra_keys=False)
    for type_, kind in KINDS.items():
        converter.register_structure_hook(type_, _kind_hook(kind))
    converter.register_structure_hook_func(_is_literal, _structure_literal)
    return converter


converter = _make_converter()

T = TypeVar("T")


def structure(cls: type[T], data: Any) -> T:
    """``data`` (a decoded JSON body, or a query as a plain mapping) as an instance of ``cls``.

    Raises ``ValidationError`` listing every bad field, in declaration order; never returns a
    partly valid value.
    """
    if not isinstance(data, Mapping):
        raise ValidationError({"body": "The request body must be a JSON object."})
    fields = attrs.fields(typing.cast(Any, cls))
    # A null optional field is its default, as if it were omitted.
    optional = {f.alias for f in fields if f.default is not attrs.NOTHING}
    present = {k: v for k, v in data.items() if not (v is None and k in optional)}
    try:
        return converter.structure(present, cls)
    except ClassValidationError as error:
        raise ValidationError(_details(cls, error)) from None


def _details(cls: type, error: ClassValidationError) -> dict[str, str]:
    alias = {f.name: f.alias for f in attrs.fields(cls)}
    found: dict[str, str] = {}
    with_notes, _ = error.group_exceptions()
    for exc, note in with_notes:
        name = alias.get(note.name, note.name)
        if isinstance(exc, KeyError):
            found[name] = f"{name} is required."
        elif isinstance(exc, FieldError):
            found[name] = f"{name} {exc}"
        else:  # a rule of cattrs' own (none today): still one sentence for the field
            found[name] = f"{name} is not valid."
    order = [f.alias for f in attrs.fields(cls)]
    details = {name: found[name] for name in order if name in found}
    return details or {"body": "The request body is not valid."}


def parse_header(header: Header, raw: str) -> Any:
    """A header's value by its kind; ``ValidationError`` (details keyed by the header name)."""
    try:
        return KINDS[header.kind].parse(raw)
    except FieldError as problem:
        raise ValidationError({header.name: f"{header.name} {problem}"}) from None


# --- JSON Schema of the same declarations ------------------------------------------------------

_PLAIN: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    bool: {"type": "boolean"},
    Decimal: {"type": "number", "description": "Exact decimal, written as a JSON number."},
    uuid.UUID: {"type": "string", "format": "uuid"},
    datetime: {
        "type": "string",
        "format": "date-time",
        "example": "2026-11-24T10:15:30.123Z",
    },
}


def type_schema(type_: Any) -> dict[str, Any]:
    """The JSON Schema of the values a field of ``type_`` takes."""
    if type_ in KINDS:
        return dict(KINDS[type_].schema)
    if type_ in _PLAIN:
        return dict(_PLAIN[type_])
    if _is_literal(type_):
        return {"type": "string", "enum": list(typing.get_args(type_))}
    args = typing.get_args(type_)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return {"anyOf": [type_schema(inner), {"type": "null"}]}
    raise TypeError(f"no JSON Schema for {type_!r}")


@attrs.frozen
class Property:
    """One field of a class as the API names and documents it."""

    name: str
    schema: dict[str, Any]
    required: bool
    default: Any = None
    description: str = ""


def properties(cls: type) -> list[Property]:
    """The fields of an attrs class, by wire name, in declaration order."""
    found = []
    for field in attrs.fields(attrs.resolve_types(cls)):
        required = field.default is attrs.NOTHING
        default = None if required else field.default
        found.append(
            Property(
                field.alias,
                type_schema(field.type),
                required,
                default,
                field.metadata.get("description", ""),
            )
        )
    return found


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema of a class: an object with these properties."""
    props: dict[str, Any] = {}
    for prop in properties(cls):
        schema = dict(prop.schema)
        if not prop.required and "anyOf" not in schema:
            # A null optional field means its default.
            schema = {"anyOf": [schema, {"type": "null"}]}
        if prop.description:
            schema["description"] = prop.description
        if prop.default is not None:
            schema["default"] = prop.default
        props[prop.name] = schema
    return {
        "type": "object",
        "description": inspect.cleandoc(cls.__doc__ or ""),
        "properties": props,
        "required": [p.name for p in properties(cls) if p.required],
    }


# --- responses ---------------------------------------------------------------------------------


@attrs.frozen
class PositionOut:
    """A position as the API writes it (``actors.wire.position_to_json`` encodes it; a test
    checks that every body it writes matches this declaration's schema)."""

    id: uuid.UUID
    user_id: str = attrs.field(alias="userId")
    symbol: str
    side: Literal["long", "short"]
    entry_price: Decimal = attrs.field(alias="entryPrice")
    take_profit: Decimal | None = attrs.field(alias="takeProfit")
    stop_loss: Decimal | None = attrs.field(alias="stopLoss")
    status: Literal["open", "closed"]
    close_price: Decimal | None = attrs.field(alias="closePrice")
    close_reason: Literal["take_profit", "stop_loss", "manual", "system"] | None = attrs.field(
        alias="closeReason"
    )
    created_at: datetime = attrs.field(alias="createdAt")
    updated_at: datetime = attrs.field(alias="updatedAt")
    closed_at: datetime | None = attrs.field(alias="closedAt")
    triggered_at: datetime | None = attrs.field(
        default=None,
        alias="triggeredAt",
        metadata=_doc("Coinbase trade time that triggered an engine close."),
    )
