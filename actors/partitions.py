"""How the symbol space is cut among engine processes (issue 18).

``ENGINE_PARTITIONS`` partitions, each owned by one engine at a time through its lease
(``actors.lease``). A symbol's partition must be the same in every process, or two engines
would both believe they own it: ``partition_of`` hashes with CRC-32, never ``hash()``. The
function itself lives in ``tickguard.domain`` because storage checks the same partition when it
fences a close (storage may not import actors).
"""

from __future__ import annotations

from collections.abc import Iterable

from tickguard.domain import partition_of

__all__ = ["partition_of", "symbols_of"]


def symbols_of(symbols: Iterable[str], partition: int, partitions: int) -> list[str]:
    """The symbols of ``symbols`` that belong to ``partition``, in their order."""
    return [s for s in symbols if partition_of(s, partitions) == partition]
