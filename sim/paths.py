"""Price paths for the simulator: where a product's next trade price comes from.

A path is an iterator of ``Decimal`` prices. The simulator asks for the next price at each
tick and stops ticking a product whose path is exhausted (it keeps sending heartbeats).
Paths never touch floats: a random walk moves by whole price increments.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from decimal import Decimal

PricePath = Iterator[Decimal]

# The default walk moves each tick by up to this fraction of the start price (uniform, in whole
# increments). 0.0001 (0.01%) at 5 ticks/s leaves a +-0.05% band in about 15 s on average and
# within two minutes with near certainty (the demo's brackets trigger while someone watches).
DEFAULT_VOLATILITY = Decimal("0.0001")


def walk(
    start: Decimal,
    *,
    seed: int = 0,
    increment: Decimal = Decimal("0.01"),
    max_steps: int | None = None,
    volatility: Decimal = DEFAULT_VOLATILITY,
) -> PricePath:
    """A seeded random walk from ``start``: each step moves by a whole number of increments
    (uniform in ``-max_steps..max_steps``), never below one increment. Endless.

    ``max_steps`` defaults to ``volatility`` (a fraction of ``start``) in increments, at least 1.
    """
    if max_steps is None:
        max_steps = max(1, int(start * volatility / increment))
    rng = random.Random(seed)
    # Work in integer increments so that every price is exact.
    ticks = int((start / increment).to_integral_value())
    while True:
        ticks = max(1, ticks + rng.randint(-max_steps, max_steps))
        yield ticks * increment


def script(prices: Iterable[Decimal | str | int]) -> PricePath:
    """The given prices, in order, then nothing more."""
    for price in prices:
        yield Decimal(price)


def jump(start: Decimal, to: Decimal, *, after: int = 1) -> PricePath:
    """``after`` trades at ``start``, then one trade at ``to`` (a gap that can cross a stop and
    a take-profit at once), then steady at ``to``. Endless."""
    for _ in range(after):
        yield start
    while True:
        yield to


def make_path(
    kind: str, start: Decimal, *, seed: int = 0, volatility: Decimal = DEFAULT_VOLATILITY
) -> PricePath:
    """The path named on the command line: ``walk`` (seeded) or ``script`` (holds ``start``
    once and stops, prices then come from the control channel)."""
    if kind == "walk":
        return walk(start, seed=seed, volatility=volatility)
    if kind == "script":
        return script([start])
    raise ValueError(f"unknown path kind {kind!r} (expected walk or script)")
