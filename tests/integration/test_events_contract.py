"""The events contract: the in-process and the Redis event counters (MemoryEvents,
RedisEvents, and the stores composed of them) must agree on the status page's figures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.state.base import EventStore
from gateway.state.memory import MemoryEvents
from gateway.state.redis import RedisEvents
from tests.integration.state_stores import KINDS, implementation

pytestmark = pytest.mark.anyio
DAY = 1_780_000_000.0  # 2026-05-28 20:26 UTC


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[EventStore]:
    async with implementation(request, MemoryEvents, RedisEvents) as store:
        yield store


async def test_events_add_up_over_the_hour(store: EventStore) -> None:
    await store.count_events(DAY, {"requests": 2, "failovers": 1})
    await store.count_events(DAY + 600, {"requests": 1})
    await store.count_events(DAY - 4000, {"requests": 7})  # over an hour before
    assert await store.recent_events(DAY + 600, 60) == {"requests": 3, "failovers": 1}
