"""What the state contract tests (test_*_contract.py) run against: one concern's in-process
part and its Redis part (on a redis-server of the test module's own), each constructed on its
own, and the composed MemoryStore and RedisStore, which hand every operation to such parts."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore, connect
from tests.integration.redis_server import RedisServer

KINDS = ("memory", "redis", "memory-store", "redis-store")
_prefixes = itertools.count()


def fresh(name: str = "t") -> str:
    """A name no other test used: a key prefix of its own, or a key."""
    return f"{name}{next(_prefixes)}"


@contextlib.asynccontextmanager
async def implementation(
    request: pytest.FixtureRequest,
    memory: Callable[[], Any],
    redis: Callable[[aioredis.Redis, str], Any],
) -> AsyncIterator[Any]:
    """The implementation `request.param` (one of KINDS) names: the part `memory()`, the
    part `redis(client, prefix)`, or a composed store."""
    kind = request.param
    if kind == "memory":
        yield memory()
        return
    if kind == "memory-store":
        yield MemoryStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    if kind == "redis-store":
        store = RedisStore(server.url, prefix=fresh())
        try:
            yield store
        finally:
            await store.aclose()
        return
    assert kind == "redis", kind
    client = connect(server.url)
    try:
        yield redis(client, fresh())
    finally:
        await client.aclose()
