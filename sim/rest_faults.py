"""Faults of the simulator's REST market data, set by the control channel and taken one per
answer: slow answers, 429 with ``Retry-After``, 5xx, and pages cut short mid-body."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs

KINDS = ("slow", "429", "5xx", "truncate")


@attrs.frozen
class RestFault:
    """What the next ``count`` market-data answers do instead of (or before) answering."""

    kind: str
    count: int = 1
    seconds: float = 1.0
    retry_after: int = 1
    status: int = 503

    @classmethod
    def from_command(cls, command: Mapping[str, Any]) -> RestFault:
        """The fault a ``rest_fault`` control command describes; ValueError if bad."""
        kind = str(command.get("kind"))
        if kind not in KINDS:
            raise ValueError(f"unknown REST fault {kind!r} ({', '.join(KINDS)})")
        fault = cls(
            kind,
            count=int(command.get("count", 1)),
            seconds=float(command.get("seconds", 1.0)),
            retry_after=int(command.get("retry_after", 1)),
            status=int(command.get("status", 503)),
        )
        if fault.count < 1 or fault.seconds < 0 or not 500 <= fault.status <= 599:
            raise ValueError("count must be >= 1, seconds >= 0, status 500..599")
        return fault


class RestFaults:
    """The pending REST faults, applied in the order they were set."""

    def __init__(self) -> None:
        self._pending: deque[RestFault] = deque()

    def __len__(self) -> int:
        return sum(f.count for f in self._pending)

    def add(self, fault: RestFault) -> None:
        self._pending.append(fault)

    def clear(self) -> None:
        self._pending.clear()

    def take(self) -> RestFault | None:
        """The fault for the next answer (one use of it), or None."""
        if not self._pending:
            return None
        fault = self._pending.popleft()
        if fault.count > 1:
            self._pending.appendleft(attrs.evolve(fault, count=fault.count - 1))
        return fault
