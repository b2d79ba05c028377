"""``web.batched.BatchedReads`` on its own (no database: the read is a Trio function the test
holds open), so that its grouping rules are checked exactly."""

from __future__ import annotations

import trio
import trio.testing

from tickguard.web.batched import BatchedReads


class HeldReads:
    """A ``read`` that records each batch and returns only when the test releases it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.most_running = 0
        self.release = trio.Event()

    async def __call__(self, keys: list[int]) -> list[int]:
        self.batches.append(list(keys))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return [k * 10 for k in keys]


async def _ask_all(reader: BatchedReads[int, int], keys: list[int], got: dict[int, int]) -> None:
    async def ask(key: int) -> None:
        got[key] = await reader.get(key)

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(ask, key)


async def test_two_reads_in_flight_share_the_callers_and_read_each_once() -> None:
    held = HeldReads()
    reader: BatchedReads[int, int] = BatchedReads(held, max_batch=4, max_in_flight=2)
    got: dict[int, int] = {}
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_ask_all, reader, list(range(10)), got)
            await trio.testing.wait_all_tasks_blocked()
            # Two reads of four run; the other two callers wait for one of them to end.
            assert [len(b) for b in held.batches] == [4, 4] and held.running == 2
            held.release.set()
    assert got == {k: k * 10 for k in range(10)}
    assert held.most_running == 2
    assert sorted(k for b in held.batches for k in b) == list(range(10))  # each read once
    assert all(held.batches)  # no read of nothing
    assert reader.answered == 10 and reader.reads == len(held.batches) == 3


async def test_one_read_in_flight_by_default() -> None:
    held = HeldReads()
    reader: BatchedReads[int, int] = BatchedReads(held, max_batch=64)
    got: dict[int, int] = {}
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_ask_all, reader, [1, 2, 3], got)
            await trio.testing.wait_all_tasks_blocked()
            late: dict[int, int] = {}
            nursery.start_soon(_ask_all, reader, [4, 5], late)
            await trio.testing.wait_all_tasks_blocked()
            # The late callers wait for the running read to end, then share the next one.
            assert [sorted(b) for b in held.batches] == [[1, 2, 3]]
            held.release.set()
    assert [sorted(b) for b in held.batches] == [[1, 2, 3], [4, 5]]
    assert held.most_running == 1
    assert got == {1: 10, 2: 20, 3: 30} and late == {4: 40, 5: 50}


async def test_a_caller_taken_into_another_leaders_batch_does_not_lead_empty_reads() -> None:
    # Many callers arriving at once with reads free: leaders that find the queue emptied by
    # another's batch wait for that batch instead of reading nothing, over and over.
    held = HeldReads()
    reader: BatchedReads[int, int] = BatchedReads(held, max_batch=64, max_in_flight=2)
    got: dict[int, int] = {}
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_ask_all, reader, list(range(20)), got)
            await trio.testing.wait_all_tasks_blocked()
            assert len(held.batches) == 1 and len(held.batches[0]) == 20
            held.release.set()
    assert got == {k: k * 10 for k in range(20)} and reader.reads == 1
