"""Schemathesis hooks for the two-user fuzz of tests/test_identity.py (``SCHEMATHESIS_HOOKS``).

The fuzz runs with user B's token; these hooks aim it at user A. Before a call, every path id
becomes one of A's position ids (``FUZZ_VICTIM_IDS``) and every other ``userId`` in a query or
body becomes A's (``FUZZ_VICTIM``). After a call, any 2xx answer on one of A's ids, or any
answer whose body names A, is written to ``FUZZ_BREACHES``; ``FUZZ_AIMED`` counts the calls
aimed at A, so the test can tell the fuzz did try.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import schemathesis

VICTIM = os.environ.get("FUZZ_VICTIM", "")
VICTIM_IDS = [i for i in os.environ.get("FUZZ_VICTIM_IDS", "").split(",") if i]
BREACHES = Path(os.environ.get("FUZZ_BREACHES", "breaches.txt"))
AIMED = Path(os.environ.get("FUZZ_AIMED", "aimed.txt"))
_turn = itertools.count()


def _aimed(case: Any) -> bool:
    return any(v in VICTIM_IDS for v in (case.path_parameters or {}).values())


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    turn = next(_turn)
    if case.path_parameters and "id" in case.path_parameters and VICTIM_IDS:
        case.path_parameters = {**case.path_parameters, "id": VICTIM_IDS[turn % len(VICTIM_IDS)]}
    if turn % 2 == 0:
        return  # every other call keeps its own userId (or none: B's token acts as B)
    if isinstance(case.query, dict) and "userId" in case.query:
        case.query = {**case.query, "userId": VICTIM}
    if isinstance(case.body, dict) and "userId" in case.body:
        case.body = {**case.body, "userId": VICTIM}


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    aimed = _aimed(case)
    if aimed or VICTIM in str(case.query) or VICTIM in str(case.body):
        with AIMED.open("a") as out:
            out.write(f"{case.method} {case.path} {response.status_code}\n")
    text = response.text if isinstance(response.text, str) else ""
    if (aimed and 200 <= response.status_code < 300) or VICTIM in text:
        with BREACHES.open("a") as out:
            out.write(f"{case.method} {case.formatted_path} {response.status_code} {text[:300]}\n")
