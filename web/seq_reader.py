"""Starting seqs for WebSocket sessions, read in batches (hardening issue finding 6).

Every new ``/ws`` session announces its user's latest ``seq`` in ``connection.ready``. Read
one session at a time, a burst of connects wanted one pool connection each: with 2,000 at once
and a pool of 10, a fifth of them waited past the database timeout and were closed 1011
although the database was fine. ``SeqReader`` reads the seqs of every session waiting at that
moment in one query (``storage.reads.latest_seqs``), so a burst costs a few queries on one
pool connection.

There is no background task: the first session that finds no read in progress leads one,
taking everyone waiting (up to ``max_batch``); the others wait for it. When a read ends, the
first session still waiting leads the next one. Sessions that arrive while a read runs go into
the next read, so every answer comes from a query that started after the session asked (and
so after its ``Join`` reached fanout's mailbox: web/ws.py relies on that order).
"""

from __future__ import annotations

import itertools

import trio

from tickguard.storage import DatabaseUnavailable, ReadOnlyDatabase
from tickguard.storage.reads import latest_seqs

SEQ_READER = "tickguard.seq_reader"
MAX_BATCH = 5000


class _Ask:
    """One session's wait for its user's seq."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.done = False
        self.gone = False  # its session stopped waiting (cancelled)
        self.seq = 0
        self.error: DatabaseUnavailable | None = None
        self.wake = trio.Event()

    def answer(self, seq: int) -> None:
        self.done, self.seq = True, seq
        self.wake.set()

    def fail(self, error: DatabaseUnavailable) -> None:
        self.done, self.error = True, error
        self.wake.set()


class SeqReader:
    """Reads users' latest seqs for many waiting sessions at once; see the module docstring."""

    def __init__(self, db: ReadOnlyDatabase, *, max_batch: int = MAX_BATCH) -> None:
        self._db = db
        self._max_batch = max_batch
        self._waiting: dict[_Ask, None] = {}  # an ordered set: oldest first
        self._reading = False
        self.reads = 0  # queries made
        self.answered = 0  # sessions answered by them

    async def latest(self, user_id: str) -> int:
        """The user's latest seq (0 before the first event), read after this call began.

        Waits for a batched read; raises ``DatabaseUnavailable`` when that read failed (the
        database is down or did not answer within its timeout).
        """
        ask = _Ask(user_id)
        self._waiting[ask] = None
        try:
            while not ask.done:
                if not self._reading:
                    await self._read_batch()
                    continue
                ask.wake = trio.Event()
                await ask.wake.wait()
        finally:
            if not ask.done:  # cancelled while waiting: leave the queue, let the next lead
                ask.gone = True
                self._waiting.pop(ask, None)
                self._hand_over()
        if ask.error is not None:
            raise ask.error
        return ask.seq

    async def _read_batch(self) -> None:
        self._reading = True
        try:
            # Sessions connecting at this very moment join this read rather than the next.
            await trio.lowlevel.checkpoint()
            batch = list(itertools.islice(self._waiting, self._max_batch))
            for ask in batch:
                del self._waiting[ask]
            try:
                seqs = await latest_seqs(self._db, [ask.user_id for ask in batch])
            except DatabaseUnavailable as exc:
                for ask in batch:
                    ask.fail(exc)
            except BaseException:
                # The leading session was cancelled (its client left): the others wait again.
                self._waiting = dict.fromkeys(
                    itertools.chain((a for a in batch if not (a.done or a.gone)), self._waiting)
                )
                raise
            else:
                self.reads += 1
                self.answered += len(batch)
                for ask in batch:
                    ask.answer(seqs[ask.user_id])
        finally:
            self._reading = False
            self._hand_over()

    def _hand_over(self) -> None:
        """Wake the oldest waiting session to lead the next read, if none is running."""
        if not self._reading and self._waiting:
            next(iter(self._waiting)).wake.set()
