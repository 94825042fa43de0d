"""ImageWorkers bound the image work in flight, also when its awaiter is cancelled: the
thread cannot be stopped, so its slot is held until it ends."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.upscale import ImageWorkers

pytestmark = pytest.mark.anyio


async def test_a_cancelled_awaiter_keeps_the_slot_until_its_thread_ends() -> None:
    workers = ImageWorkers(1)
    release, running = threading.Event(), threading.Event()
    started: list[str] = []

    def work(name: str) -> str:
        started.append(name)
        if name == "first":
            running.set()
            release.wait(10)
        return name

    first = asyncio.ensure_future(workers.run(work, "first"))
    await asyncio.to_thread(running.wait, 10)
    first.cancel()  # a hedge's loser: the request no longer wants it
    with pytest.raises(asyncio.CancelledError):
        await first
    second = asyncio.ensure_future(workers.run(work, "second"))
    await asyncio.sleep(0.2)
    assert started == ["first"]  # the first thread still holds its image in memory
    release.set()
    assert await second == "second"


class Jobs:
    """A fake job source: each job notes when it starts; "hold" blocks its worker until
    released, so the jobs queued behind it are all waiting before any is served."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release, self.holding = threading.Event(), threading.Event()

    def work(self, name: str) -> str:
        self.started.append(name)
        if name == "hold":
            self.holding.set()
            self.release.wait(10)
        return name

    async def queue(
        self, workers: ImageWorkers, jobs: list[tuple[str, str]]
    ) -> list[asyncio.Future[str]]:
        held = asyncio.ensure_future(workers.run(self.work, "hold", account="a"))
        await asyncio.to_thread(self.holding.wait, 10)
        futures = [
            asyncio.ensure_future(workers.run(self.work, name, account=account))
            for account, name in jobs
        ]
        for _ in range(3):  # each reaches its account's queue, in the order sent
            await asyncio.sleep(0)
        return [held, *futures]


async def test_a_freed_slot_goes_to_the_account_served_least_recently() -> None:
    """One key's burst does not starve the others: with the burst queued first, each other
    key's job goes before the rest of it, and the keys then take turns."""
    jobs, workers = Jobs(), ImageWorkers(1)
    sent = [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("b", "b2"), ("c", "c1")]
    futures = await jobs.queue(workers, sent)
    jobs.release.set()
    await asyncio.gather(*futures)
    # "a" held the slot, so "b" and "c" (never served) go first, in the order they came.
    assert jobs.started == ["hold", "b1", "c1", "a1", "b2", "a2", "a3"]
    assert not workers._waiting and not workers._running and not workers._served  # forgotten


async def test_one_account_alone_uses_every_slot() -> None:
    """No per-account cap: a key alone is not held to part of the pool."""
    workers, both = ImageWorkers(2), threading.Barrier(2, timeout=10)
    # Each waits for the other to start: only two slots in use at once let them finish.
    assert await asyncio.gather(
        workers.run(both.wait, account="a"), workers.run(both.wait, account="a")
    ) in ([0, 1], [1, 0])


async def test_a_job_cancelled_while_waiting_gives_its_turn_on() -> None:
    jobs, workers = Jobs(), ImageWorkers(1)
    held, a1, b1, b2 = await jobs.queue(workers, [("a", "a1"), ("b", "b1"), ("b", "b2")])
    b1.cancel()  # its client went away before a worker was free
    jobs.release.set()
    assert await asyncio.gather(held, a1, b2) == ["hold", "a1", "b2"]
    assert jobs.started == ["hold", "b2", "a1"]
    assert b1.cancelled()


async def test_a_job_cancelled_as_its_turn_came_passes_the_slot_on() -> None:
    """Granted a slot, then cancelled before its task resumed: the slot must not be lost."""
    workers = ImageWorkers(1)
    await workers._acquire("a")
    b = asyncio.ensure_future(workers._acquire("b"))
    c = asyncio.ensure_future(workers._acquire("c"))
    await asyncio.sleep(0)
    workers._release("a")  # the slot goes to b, whose task has not resumed yet ...
    b.cancel()  # ... and is cancelled before it does
    with pytest.raises(asyncio.CancelledError):
        await b
    await asyncio.wait_for(c, 5)
    assert workers._running == {"c": 1} and not workers._waiting
    workers._release("c")
    assert workers._free == 1 and not workers._running
