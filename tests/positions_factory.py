"""An open ``Position`` for tests that need one without a database (engine, trigger index)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from tickguard.actors.messages import Position


def open_position(
    side: str,
    *,
    created_at: datetime,
    tp: str | Decimal | None = None,
    sl: str | Decimal | None = None,
    user: str = "u1",
    entry: str = "100",
    symbol: str = "BTC-USD",
) -> Position:
    return Position(
        id=uuid.uuid4(),
        user_id=user,
        symbol=symbol,
        side=side,  # type: ignore[arg-type]
        entry_price=Decimal(entry),
        take_profit=None if tp is None else Decimal(tp),
        stop_loss=None if sl is None else Decimal(sl),
        status="open",
        close_price=None,
        close_reason=None,
        created_at=created_at,
        updated_at=created_at,
        closed_at=None,
    )
