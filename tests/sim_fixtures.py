"""Helpers shared by the simulator and feed tests (no conftest: the lead owns that)."""

from __future__ import annotations

from collections.abc import Callable

import trio


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, re-checking every 10 ms; fails after ``timeout``."""
    with trio.fail_after(timeout):
        # Polling on purpose: the conditions are plain attributes that nobody signals.
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)
