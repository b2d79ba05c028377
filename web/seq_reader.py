"""Starting seqs for WebSocket sessions, read in batches (hardening issue finding 6).

Every new ``/ws`` session announces its user's latest ``seq`` in ``connection.ready``. Read
one session at a time, a burst of connects wanted one pool connection each: with 2,000 at once
and a pool of 10, a fifth of them waited past the database timeout and were closed 1011
although the database was fine. ``SeqReader`` reads the seqs of every session waiting at that
moment in one query (``storage.reads.latest_seqs``), so a burst costs a few queries on one
pool connection. The batching is ``web.batched.BatchedReads``: every answer comes from a
query that started after the session asked (and so after its ``Join`` reached fanout's
mailbox: web/ws.py relies on that order).
"""

from __future__ import annotations

from tickguard.storage import ReadOnlyDatabase
from tickguard.storage.reads import latest_seqs
from tickguard.web.batched import BatchedReads

SEQ_READER = "tickguard.seq_reader"
MAX_BATCH = 5000


class SeqReader(BatchedReads[str, int]):
    """Reads users' latest seqs for many waiting sessions at once; see the module docstring."""

    def __init__(self, db: ReadOnlyDatabase, *, max_batch: int = MAX_BATCH) -> None:
        async def read(user_ids: list[str]) -> list[int]:
            seqs = await latest_seqs(db, user_ids)
            return [seqs[user_id] for user_id in user_ids]

        super().__init__(read, max_batch=max_batch)

    async def latest(self, user_id: str) -> int:
        """The user's latest seq (0 before the first event), read after this call began.

        Waits for a batched read; raises ``DatabaseUnavailable`` when that read failed (the
        database is down or did not answer within its timeout).
        """
        return await self.get(user_id)
