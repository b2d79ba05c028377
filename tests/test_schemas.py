"""The request classes of web/schemas.py: cattrs structures them, and the JSON Schema that
/openapi.json publishes for each value kind accepts exactly what the parser accepts (checked
with jsonschema-rs, the validator schemathesis uses, on values hypothesis generates)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tickguard.actors.messages import Position
from tickguard.web import schemas
from tickguard.web.openapi import document
from tickguard.web.schemas import (
    KINDS,
    ClosePosition,
    CreatePosition,
    ListPositionsQuery,
    Price,
    ValidationError,
    structure,
)
from tickguard.wire import dumps, loads, plain_decimal, position_to_json


def _accepts(kind: Any, raw: Any) -> bool:
    try:
        KINDS[kind].parse(raw)
    except schemas.FieldError:
        return False
    return True


def _validator(kind: Any) -> Any:
    # Through JSON, as a client reads the document: numbers become floats or ints.
    return jsonschema_rs.validator_for(loads(dumps(KINDS[kind].schema)) | {})


# --- prices ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        (Decimal("64444.06724999999"), "64444.06725"),  # the app's 64123.45 * 1.005
        ("64444.06724999999", "64444.06725"),
        (Decimal("0.000000005"), "0.00000001"),  # half rounds away from zero
        (Decimal("0.000000015"), "0.00000002"),  # not to even
        (Decimal("2.5E-8"), "0.00000003"),
        (Decimal("1.2345E+3"), "1234.5"),
        (65000, "65000"),
        ("0065000.50000", "65000.5"),
        (Decimal("9999999999.999999994999"), "9999999999.99999999"),
        (Decimal("1.00000000000000000000000000001"), "1"),  # 30 significant digits
    ],
)
def test_a_price_is_rounded_half_away_from_zero_to_8_places(raw: Any, stored: str) -> None:
    body = structure(ClosePosition, {"userId": "u", "closePrice": raw})
    assert body.close_price == Decimal(stored)
    assert format(plain_decimal(body.close_price), "f") == stored


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (Decimal("0.0000000049999"), "at least 0.00000001"),
        (Decimal("9999999999.999999995"), "less than 10000000000"),
        (Decimal("1E+400"), "less than 10000000000"),
        (Decimal("1.000000000000000000000000000001"), "30 significant digits"),
        (Decimal("-0.5"), "greater than 0"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        (True, "number or a decimal string"),
        (1.5, "number or a decimal string"),  # a float never gets here from JSON: refused
        ("1e2", "plain notation"),
        (" 42.25", "plain notation"),
        ("٣", "plain notation"),  # Python's Decimal reads other scripts' digits: refused
    ],
)
def test_a_price_that_cannot_be_stored_is_refused_with_a_sentence(raw: Any, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        structure(ClosePosition, {"userId": "u", "closePrice": raw})
    sentence = refused.value.details["closePrice"]
    assert sentence.startswith("closePrice ") and message in sentence


@settings(max_examples=300)
@given(st.from_regex(schemas.PRICE_PATTERN, fullmatch=True))
def test_every_string_the_price_pattern_admits_is_a_storable_price(text: str) -> None:
    value = KINDS[Price].parse(text)
    assert Decimal("0.00000001") <= value <= Decimal("9999999999.99999999")


@settings(max_examples=500)
@given(
    st.text(alphabet="0123456789.eE+- ", max_size=34)
    | st.from_regex(r"0*[0-9]{1,11}(\.[0-9]{0,24})?", fullmatch=True)
)
@example("0.000000005")
@example("0.00000000499")
@example("9999999999.999999995")
@example("9999999999.99999999499")
@example("0")
@example("00.00000000")
def test_the_price_schema_admits_exactly_the_strings_the_parser_accepts(text: str) -> None:
    assert _validator(Price).is_valid(text) == _accepts(Price, text)


@settings(max_examples=300)
@given(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)
    | st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=1e-7)
    | st.integers(min_value=-5, max_value=10**11)
)
@example(1e10)
@example(9999999999.999998)
@example(5e-9)
@example(4.9999999999e-9)
def test_the_price_schema_admits_exactly_the_json_numbers_the_parser_accepts(
    number: float | int,
) -> None:
    # What the server reads from the JSON text a client writes for this number.
    raw = loads(dumps(number)) if isinstance(number, int) else Decimal(repr(number))
    assert _validator(Price).is_valid(number) == _accepts(Price, raw)


# --- other kinds and the classes ---------------------------------------------------------------


@settings(max_examples=300)
@given(st.text(max_size=140))
@example("")
@example("a\x00")
@example("\x85")
@example("x" * 129)
def test_the_user_id_schema_admits_exactly_what_the_parser_accepts(text: str) -> None:
    assert _validator(schemas.UserId).is_valid(text) == _accepts(schemas.UserId, text)


@settings(max_examples=200)
@given(st.text(alphabet="abcXYZ019-_ .", max_size=70))
@example(" BTC-USD")
@example("btc-usd")
def test_the_symbol_schema_admits_exactly_what_the_parser_accepts(text: str) -> None:
    assert _validator(schemas.Symbol).is_valid(text) == _accepts(schemas.Symbol, text)


@settings(max_examples=200)
@given(st.text(alphabet="0123456789abcdefABCDEF.-", max_size=52))
@example("1." + "0" * 32)
@example("0000000000000000." + "f" * 32)
def test_the_cursor_schema_admits_exactly_what_the_parser_accepts(text: str) -> None:
    assert _validator(schemas.Cursor).is_valid(text) == _accepts(schemas.Cursor, text)


def test_every_bad_field_is_reported_with_the_field_named() -> None:
    with pytest.raises(ValidationError) as refused:
        structure(
            CreatePosition,
            {"userId": "", "side": "LONG", "entryPrice": "abc", "takeProfit": None, "x": 1},
        )
    assert refused.value.details == {
        "userId": "userId must be 1 to 128 characters long.",
        "symbol": "symbol is required.",
        "side": "side must be one of: long, short.",
        "entryPrice": refused.value.details["entryPrice"],
    }
    assert refused.value.details["entryPrice"].startswith("entryPrice must be a number")


def test_null_optional_fields_take_their_defaults_and_unknown_fields_are_ignored() -> None:
    body = structure(
        ClosePosition, {"userId": "u", "closePrice": 1, "reason": None, "extra": "ignored"}
    )
    assert (body.user_id, body.close_price, body.reason) == ("u", Decimal(1), "manual")
    query = structure(ListPositionsQuery, {"userId": "u", "limit": "20"})
    assert (query.limit, query.status, query.cursor) == (20, None, None)


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ValidationError) as refused:
        structure(CreatePosition, [1, 2])
    assert refused.value.details == {"body": "The request body must be a JSON object."}


def test_the_documented_position_schema_admits_what_the_wire_writes() -> None:
    now = datetime.now(UTC)
    positions = [
        Position(
            uuid.uuid4(), "u", "BTC-USD", "long", Decimal("65000.5"), None, None, "open", None,
            None, now, now, None,
        ),
        Position(
            uuid.uuid4(), "u", "ETH-USD", "short", Decimal("3000"), Decimal("2900.12345678"),
            Decimal("3100"), "closed", Decimal("3100"), "stop_loss", now, now, now, now,
        ),
    ]  # fmt: skip
    spec = loads(dumps(document()))
    validator = jsonschema_rs.validator_for(spec["components"]["schemas"]["Position"])
    for position in positions:
        written = loads(dumps(position_to_json(position)))
        assert set(written) == set(spec["components"]["schemas"]["Position"]["properties"])
        validator.validate(
            {k: float(v) if isinstance(v, Decimal) else v for k, v in written.items()}
        )
