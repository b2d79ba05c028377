"""Engine members: which engine processes are alive to share the partitions (issue 18, stage 3).

Each engine announces itself in ``engine_members`` (owner, expires_at) and renews the row with its
lease keeper's cycle; a member that stops renewing drops out once ``expires_at`` passes. A
balancer (``actors.balance``) reads, in the same transaction as its own announcement, the live
members and the partitions other engines hold now, and wants its fair share of the rest.

Expiry is PostgreSQL's ``now()``, as for the leases: no two machines' clocks have to agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import asyncpg
import attrs

from tickguard.storage.db import Database

_ANNOUNCE_SQL = """
INSERT INTO engine_members (owner, expires_at)
VALUES ($1, now() + $2 * interval '1 millisecond')
ON CONFLICT (owner) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""

_LIVE_SQL = "SELECT owner FROM engine_members WHERE expires_at > now() ORDER BY owner"

# Partitions held now by another engine (a lease of ours, or a lapsed one, is not "taken").
_TAKEN_SQL = """
SELECT partition, owner FROM engine_leases
 WHERE owner IS NOT NULL AND owner <> $1 AND expires_at > now() AND partition < $2
"""

# Members long gone are deleted now and then, so the table stays the size of the deployment.
_PRUNE_SQL = "DELETE FROM engine_members WHERE expires_at < now() - interval '1 hour'"


@attrs.frozen
class Survey:
    """What a balancer decides from: the live members (sorted, this one included) and the
    partitions that other engines hold now."""

    members: tuple[str, ...]
    taken: Mapping[int, str]  # partition -> owner


async def survey(
    db: Database, owner: str, ttl_ms: int, partitions: int, *, timeout: float | None = None
) -> Survey:
    """Announce ``owner`` as live for ``ttl_ms`` (from the database's now), then read the live
    members and the partitions (of ``range(partitions)``) held by others. One transaction.
    Raises ``DatabaseUnavailable``."""
    return await db.transaction(_survey, owner, ttl_ms, partitions, timeout=timeout)


async def _survey(conn: asyncpg.Connection, owner: str, ttl_ms: int, partitions: int) -> Survey:
    await conn.execute(_ANNOUNCE_SQL, owner, ttl_ms)
    members = [r["owner"] for r in await conn.fetch(_LIVE_SQL)]
    rows = await conn.fetch(_TAKEN_SQL, owner, partitions)
    taken = {int(r["partition"]): str(r["owner"]) for r in rows}
    if owner not in members:  # its own row is live by construction; belt and braces
        members.append(owner)
    return Survey(tuple(sorted(members)), MappingProxyType(taken))


async def withdraw(db: Database, owner: str, *, timeout: float | None = None) -> None:
    """``owner`` leaves now (graceful stop): the others' next survey counts one member less.
    Raises ``DatabaseUnavailable``; a withdrawal that does not happen just waits for the TTL."""
    await db.execute("DELETE FROM engine_members WHERE owner = $1", owner, timeout=timeout)
    await db.execute(_PRUNE_SQL, timeout=timeout)
