"""Schemathesis hooks for tests/test_faults_fuzz.py (loaded through ``SCHEMATHESIS_HOOKS``).

A create is judged against the market, which no JSON Schema can state: the symbol must be a
product Coinbase (here the simulator) knows, and the bracket must sit on the right sides of the
entry price (the market's when it is omitted). Schema-valid bodies break those rules at random,
so before a *positive* case of ``POST /api/positions`` is sent, this hook moves it onto the
simulator's product, drops a take-profit or stop-loss that is on the wrong side, and ties an
Idempotency-Key to its body (a key reused with another body is a 422 by design). Every
other rule the schema states is still fuzzed as generated; negative cases are never touched.
The market rules themselves are tested in tests/test_http.py.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

import schemathesis

from tickguard.web.schemas import KINDS, FieldError, Price

PRODUCT = "BTC-USD"  # the simulator's only product in the fuzz
# The simulator starts at 65000 and walks a little; without an entry price, a level is kept only
# when it is far on its side of any price the walk can reach in a run.
MARKET_LOW, MARKET_HIGH = Decimal(30_000), Decimal(130_000)


def _price(raw: Any) -> Decimal | None:
    if raw is None:
        return None
    if isinstance(raw, float):
        # As the server reads the JSON text schemathesis writes for it (shortest repr).
        raw = Decimal(repr(raw))
    try:
        value: Decimal = KINDS[Price].parse(raw)
    except FieldError:
        return None
    return value


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.method.upper() != "POST" or case.path != "/api/positions":
        return
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return
    body = dict(case.body)
    body["symbol"] = PRODUCT
    entry = _price(body.get("entryPrice"))
    long = body.get("side") == "long"
    tp, sl = _price(body.get("takeProfit")), _price(body.get("stopLoss"))
    above, below = (entry, entry) if entry is not None else (MARKET_HIGH, MARKET_LOW)
    if tp is not None and ((long and tp <= above) or (not long and tp >= below)):
        body["takeProfit"] = None
    if sl is not None and ((long and sl >= below) or (not long and sl <= above)):
        body["stopLoss"] = None
    case.body = body
    # A key is the client's promise that a retry carries the same body: reusing one with another
    # body is a 422 (tested in tests/test_http.py), a state the schema cannot express. Tie each
    # generated key to its body, so a replay of the same body still replays.
    headers = case.headers or {}
    key = headers.get("Idempotency-Key")
    if isinstance(key, str) and key:
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        headers["Idempotency-Key"] = f"{key[:200]}-{digest[:16]}"
        case.headers = headers
