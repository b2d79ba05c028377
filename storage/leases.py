"""Engine leases: which engine process owns which partition of the symbol space (issue 18).

One ``engine_leases`` row per partition (owner, token, expires_at). An engine ``acquire``s the
partitions that are free or expired and ``renew``s them (UPDATE) well within the TTL; a
partition whose owner stops renewing (killed, paused, cut off) expires and another engine takes
it. ``token`` is the fencing token: it goes up by one whenever the partition is taken anew, and a
fenced close (``storage.writes``) commits only while its token is still the row's and the row
has not expired, so an owner that lost its lease cannot close anything.

All expiry arithmetic is PostgreSQL's ``now()``, never the process's clock: two machines'
clocks never have to agree. Rows are locked in partition order (an ordered ``FOR UPDATE`` here,
an ordered ``FOR SHARE`` in the fenced writes), so a takeover and a close never deadlock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import asyncpg

from tickguard.storage.db import Database, Reader

_CREATE_SQL = """
INSERT INTO engine_leases (partition, owner, token, expires_at)
SELECT unnest($1::int[]), NULL, 0, now()
ON CONFLICT (partition) DO NOTHING
"""

# Taken: free (no owner), expired, or still validly ours. The token stays only when the row was
# validly ours; any other take (even our own after it lapsed) is a new ownership: token + 1.
_ACQUIRE_SQL = """
WITH taken AS (
    SELECT partition FROM engine_leases
     WHERE partition = ANY($1::int[])
       AND (owner IS NULL OR expires_at <= now() OR owner = $2)
     ORDER BY partition
       FOR UPDATE
)
UPDATE engine_leases l
   SET token = CASE WHEN l.owner = $2 AND l.expires_at > now() THEN l.token ELSE l.token + 1 END,
       owner = $2,
       expires_at = now() + $3 * interval '1 millisecond'
  FROM taken
 WHERE l.partition = taken.partition
RETURNING l.partition, l.token
"""

# A lease that lapsed is lost even if nobody took it: only acquire (a new token) gets it back.
_RENEW_SQL = """
WITH mine AS (
    SELECT l.partition FROM engine_leases l
      JOIN unnest($1::int[], $2::bigint[]) AS h(partition, token)
        ON l.partition = h.partition AND l.token = h.token
     WHERE l.owner = $3 AND l.expires_at > now()
     ORDER BY l.partition
       FOR UPDATE OF l
)
UPDATE engine_leases l
   SET expires_at = now() + $4 * interval '1 millisecond'
  FROM mine
 WHERE l.partition = mine.partition
RETURNING l.partition, l.token
"""

_RELEASE_SQL = """
WITH mine AS (
    SELECT l.partition FROM engine_leases l
      JOIN unnest($1::int[], $2::bigint[]) AS h(partition, token)
        ON l.partition = h.partition AND l.token = h.token
     WHERE l.owner = $3
     ORDER BY l.partition
       FOR UPDATE OF l
)
UPDATE engine_leases l SET expires_at = now()
  FROM mine
 WHERE l.partition = mine.partition AND l.expires_at > now()
"""


async def acquire(
    db: Database,
    partitions: Sequence[int],
    owner: str,
    ttl_ms: int,
    *,
    timeout: float | None = None,
) -> dict[int, int]:
    """Take every partition of ``partitions`` that is free, expired or already ``owner``'s, for
    ``ttl_ms`` from the database's now; returns ``{partition: token}`` of what was taken.

    Creates missing rows first. The token goes up by one on every new ownership (a partition
    still validly ours keeps its token). Raises ``DatabaseUnavailable``.
    """
    if not partitions:
        return {}
    return await db.transaction(_acquire, sorted(set(partitions)), owner, ttl_ms, timeout=timeout)


async def _acquire(
    conn: asyncpg.Connection, partitions: list[int], owner: str, ttl_ms: int
) -> dict[int, int]:
    await conn.execute(_CREATE_SQL, partitions)
    rows = await conn.fetch(_ACQUIRE_SQL, partitions, owner, ttl_ms)
    return {int(r["partition"]): int(r["token"]) for r in rows}


async def renew(
    db: Database,
    held: Mapping[int, int],
    owner: str,
    ttl_ms: int,
    *,
    timeout: float | None = None,
) -> dict[int, int]:
    """Extend, to ``ttl_ms`` from the database's now, every partition of ``held`` that is still
    ``owner``'s with the same token and not expired; returns what is still held. One
    statement. Raises ``DatabaseUnavailable`` (the caller cannot tell whether it renewed)."""
    if not held:
        return {}
    parts = sorted(held)
    rows = await db.fetch(
        _RENEW_SQL, parts, [held[p] for p in parts], owner, ttl_ms, timeout=timeout
    )
    return {int(r["partition"]): int(r["token"]) for r in rows}


async def release(
    db: Database, held: Mapping[int, int], owner: str, *, timeout: float | None = None
) -> None:
    """Expire at once every partition of ``held`` still ``owner``'s with that token, so that
    another engine takes it on its next try (graceful shutdown). Raises
    ``DatabaseUnavailable``; a release that does not happen just waits for the TTL."""
    if held:
        parts = sorted(held)
        await db.execute(_RELEASE_SQL, parts, [held[p] for p in parts], owner, timeout=timeout)


async def owners(db: Reader) -> dict[int, tuple[str | None, int, datetime]]:
    """Every lease row: ``{partition: (owner, token, expires_at)}`` (for /ready and tests)."""
    rows = await db.fetch(
        "SELECT partition, owner, token, expires_at FROM engine_leases ORDER BY partition"
    )
    return {int(r["partition"]): (r["owner"], int(r["token"]), r["expires_at"]) for r in rows}
