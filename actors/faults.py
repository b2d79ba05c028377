"""Named fault-injection points for tests: raise, stall or cancel at a chosen place.

An actor that offers points takes an optional ``FaultPoints`` and calls ``await faults.hit(name)``
there. Production code never builds one (``None`` is the default everywhere, and nothing reads
it from the environment), so the points cost one ``is None`` check and cannot be switched on by
accident. A test arms a point with an action that runs the next ``times`` hits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable


class InjectedFault(Exception):
    """Raised at an armed fault point."""


Action = Callable[[], Awaitable[None]]


class FaultPoints:
    """The armed points of one test; each hit runs (and counts) the point's action."""

    def __init__(self) -> None:
        self._armed: dict[str, tuple[Action, int]] = {}
        self.hits: dict[str, int] = {}
        self.fired: dict[str, int] = {}

    def arm(self, name: str, action: Action, times: int = 1) -> None:
        self._armed[name] = (action, times)

    def raise_at(self, name: str, times: int = 1) -> None:
        """The next ``times`` hits of ``name`` raise ``InjectedFault``."""

        async def boom() -> None:
            raise InjectedFault(name)

        self.arm(name, boom, times)

    async def hit(self, name: str) -> None:
        self.hits[name] = self.hits.get(name, 0) + 1
        armed = self._armed.get(name)
        if armed is None:
            return
        action, times = armed
        if times <= 1:
            del self._armed[name]
        else:
            self._armed[name] = (action, times - 1)
        self.fired[name] = self.fired.get(name, 0) + 1
        await action()


async def hit(faults: FaultPoints | None, name: str) -> None:
    """``faults.hit(name)`` when a test armed points; nothing otherwise."""
    if faults is not None:
        await faults.hit(name)
