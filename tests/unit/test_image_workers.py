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
