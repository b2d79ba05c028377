"""The per-symbol engines: one engine actor per symbol with open positions, started on demand
under a nested supervisor, and the mailbox each one keeps across restarts.

The supervisor builds one ``EngineDirectory`` and runs its ``supervisor``; persistence sends
Track/Untrack through ``send``. Engines themselves never touch storage: their loader
(``storage.loading.open_positions`` bound to the pool) is handed to them here.

In a sharded engine process (issue 18) ``owns`` says which symbols this process may judge now
(their partition's lease is held): a message for any other symbol starts nothing, and the
engine role ``start``s and ``stop``s the engines of partitions as they are gained and lost.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import trio

from tickguard.actors import engine
from tickguard.actors.faults import FaultPoints
from tickguard.actors.mailbox import Mailbox
from tickguard.actors.messages import FeedCommand, PersistenceRequest, Track, Untrack, Watch
from tickguard.actors.supervision import ChildSpec, Supervisor
from tickguard.actors.window import WindowSlots
from tickguard.storage import Database, loading


class EngineDirectory:
    """The per-symbol engines: their mailboxes, and starting an engine on first use.

    ``send`` never blocks: it queues the message on the symbol's mailbox (unbounded) and, the
    first time a symbol is seen, asks the starter to start its engine. The engine loads its
    open positions from the database as it starts, so a Track queued before that is harmless
    (the engine ignores a position it already holds).
    """

    def __init__(
        self,
        db: Database,
        slots: WindowSlots,
        persistence_box: Mailbox[PersistenceRequest],
        feed_box: Mailbox[FeedCommand] | None,
        *,
        engine_config: engine.EngineConfig = engine.EngineConfig(),
        faults: FaultPoints | None = None,
        stats: dict[str, engine.EngineStats] | None = None,
        owns: Callable[[str], bool] | None = None,
    ) -> None:
        self.db = db
        self.slots = slots
        self.persistence_box = persistence_box
        self.feed_box = feed_box
        self.engine_config = engine_config
        self.faults = faults
        self.mailboxes: dict[str, Mailbox[Track | Untrack]] = {}
        # Per symbol, across engine restarts (and, given, across engine-role terms).
        self.stats: dict[str, engine.EngineStats] = {} if stats is None else stats
        self.supervisor = Supervisor([ChildSpec("engine-starter", self._run_starter)])
        self._wanted_send, self._wanted = trio.open_memory_channel[str](math.inf)
        self._owns = owns
        # Starts and stops one at a time: a stop never races the start of the same engine.
        self._changing = trio.Lock()

    def owns(self, symbol: str) -> bool:
        """Whether this process may judge ``symbol`` now (always, without ``owns``)."""
        return self._owns is None or self._owns(symbol)

    def send(self, symbol: str, message: Track | Untrack) -> None:
        """Queue ``message`` for ``symbol``'s engine (started on first use); dropped when the
        symbol is not ours (its owner learns of it from the event log)."""
        if not self.owns(symbol):
            return
        self._mailbox(symbol).send_nowait(message)

    def start(self, symbols: Iterable[str]) -> None:
        """Start engines for ``symbols`` (those this process owns), in the background."""
        for symbol in symbols:
            if self.owns(symbol):
                self._mailbox(symbol)

    async def stop(self, symbols: Iterable[str]) -> None:
        """Stop the engines of ``symbols`` and forget their mailboxes; returns once they are
        gone (each hands what it triggered to persistence as it stops, where a lost lease
        fences it). A later message or ``start`` starts a fresh engine that loads again."""
        async with self._changing:
            for symbol in symbols:
                self.mailboxes.pop(symbol, None)
                await self.supervisor.stop_child(f"engine:{symbol}")

    def _mailbox(self, symbol: str) -> Mailbox[Track | Untrack]:
        box = self.mailboxes.get(symbol)
        if box is None:
            box = self.mailboxes[symbol] = Mailbox(f"engine:{symbol}")
            self._wanted_send.send_nowait(symbol)
        return box

    async def _run_starter(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Start an engine for every symbol with open positions, then each new symbol."""
        for symbol in await loading.open_symbols(self.db):
            if self.owns(symbol):
                self._mailbox(symbol)
        for symbol in list(self.mailboxes):  # also after a restart of this supervisor
            await self._ensure(symbol)
        task_status.started()
        async for symbol in self._wanted:
            await self._ensure(symbol)

    async def _ensure(self, symbol: str) -> None:
        async with self._changing:
            await self._start(symbol)

    async def _start(self, symbol: str) -> None:
        child_id = f"engine:{symbol}"
        # Stopped (or no longer ours) since it was asked for: nothing to start.
        if symbol not in self.mailboxes or not self.owns(symbol):
            return
        if self.supervisor.has_child(child_id):
            return
        if self.feed_box is not None:
            self.feed_box.send_nowait(Watch(symbol, reply=None))
        start = functools.partial(
            engine.run,
            symbol,
            self.slots.get(symbol),
            self.mailboxes[symbol],
            self.persistence_box,
            functools.partial(loading.open_positions, self.db),
            config=self.engine_config,
            stats=self.stats.setdefault(symbol, engine.EngineStats()),
            feed=self.feed_box,
            faults=self.faults,
        )
        await self.supervisor.start_child(
            ChildSpec(child_id, start, mailboxes=(self.mailboxes[symbol],))
        )
