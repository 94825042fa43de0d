"""One contract, two stores: the in-process store and the Redis store (a redis-server of the
test's own) must agree on every operation the router relies on."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.state.base import Outcome, Policy, StateStore
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore
from tests.integration.redis_server import RedisServer

pytestmark = pytest.mark.anyio
POLICY = Policy(failure_threshold=3, open_base_s=5, open_max_s=40, bucket_s=10, window_s=60)
OK = Outcome(True, 0.3)
FAIL = Outcome(False, None, "HTTP 500")
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    server = request.getfixturevalue("redis_server")
    redis_store = RedisStore(server.url, prefix=f"t{next(_prefixes)}")
    yield redis_store
    await redis_store.aclose()


async def test_successes_measure_latency(store: StateStore) -> None:
    for latency in (0.1, 0.2, 0.3, 0.4, 4.0):
        await store.record("fal", Outcome(True, latency), 1000.0, POLICY)
    rec = (await store.snapshot(["fal"], 1000.0, POLICY))["fal"]
    assert rec.successes == 5 and rec.failures == 0 and rec.circuit(1000.0) == "closed"
    assert rec.p50_s is not None and 0.2 <= rec.p50_s <= 0.35
    assert rec.p95_s is not None and rec.p95_s >= 3.0
    assert rec.ewma_s is not None and 0.1 < rec.ewma_s < 4.0


async def test_breaker_opens_backs_off_and_recovers(store: StateStore) -> None:
    now = 2000.0
    for _ in range(2):
        rec = await store.record("fal", FAIL, now, POLICY)
    assert rec.circuit(now) == "closed" and rec.consecutive_failures == 2
    rec = await store.record("fal", FAIL, now, POLICY)
    assert rec.circuit(now) == "open" and rec.open_until == pytest.approx(now + 5)
    assert rec.last_error == "HTTP 500"
    assert rec.circuit(now + 5) == "half_open"
    rec = await store.record("fal", FAIL, now + 5, POLICY)  # the probe fails: longer backoff
    assert rec.circuit(now + 6) == "open" and rec.open_until == pytest.approx(now + 15)
    rec = await store.record("fal", OK, now + 15, POLICY)  # the next probe succeeds
    assert rec.circuit(now + 15) == "closed" and rec.opened_count == 0
    assert rec.recovered_at == pytest.approx(now + 15)
    other = (await store.snapshot(["replicate"], now, POLICY))["replicate"]
    assert other.circuit(now) == "closed" and other.successes == 0


async def test_backoff_is_capped(store: StateStore) -> None:
    now = 3000.0
    for _ in range(10):
        rec = await store.record("fal", FAIL, now, POLICY)
    assert rec.open_until - now == pytest.approx(40)


async def test_window_forgets_old_buckets(store: StateStore) -> None:
    await store.record("fal", FAIL, 4000.0, POLICY)
    await store.record("fal", OK, 4000.0, POLICY)
    later = (await store.snapshot(["fal"], 4000.0 + 120, POLICY))["fal"]
    assert later.successes == 0 and later.failures == 0 and later.p95_s is None


async def test_one_probe_at_a_time(store: StateStore) -> None:
    assert await store.try_probe("fal", "a", 5)
    assert not await store.try_probe("fal", "b", 5)
    await store.release_probe("fal", "b")  # not the holder: no effect
    assert not await store.try_probe("fal", "c", 5)
    await store.release_probe("fal", "a")
    assert await store.try_probe("fal", "d", 0.05)
    await asyncio.sleep(0.1)
    assert await store.try_probe("fal", "e", 5)  # an abandoned probe expires


async def test_cooldown_and_drain(store: StateStore) -> None:
    await store.set_cooldown("fal", 5000.0)
    await store.set_cooldown("fal", 4000.0)  # never shortened
    await store.set_drained("replicate", True)
    recs = await store.snapshot(["fal", "replicate"], 100.0, POLICY)
    assert recs["fal"].cooldown_until == 5000.0 and not recs["fal"].drained
    assert recs["replicate"].drained
    await store.set_drained("replicate", False)
    assert not (await store.snapshot(["replicate"], 100.0, POLICY))["replicate"].drained


async def test_hedge_budget(store: StateStore) -> None:
    now = 6000.0
    assert await store.take_hedge(now, 0.1, 1)  # the per-minute minimum
    assert not await store.take_hedge(now, 0.1, 1)
    for _ in range(20):
        await store.count_request(now)
    taken = [await store.take_hedge(now, 0.1, 1) for _ in range(5)]
    assert taken == [True, True, False, False, False]  # floor(0.1 * 20) + 1 = 3 in all
    assert await store.take_hedge(now + 60, 0.1, 1)  # a new minute, a new budget


async def test_concurrent_failures_are_counted_exactly(store: StateStore) -> None:
    policy = Policy(failure_threshold=1000)
    await asyncio.gather(*(store.record("fal", FAIL, 7000.0, policy) for _ in range(50)))
    rec = (await store.snapshot(["fal"], 7000.0, policy))["fal"]
    assert rec.consecutive_failures == 50 and rec.failures == 50


async def test_idempotency_key_is_claimed_once_then_replayed(store: StateStore) -> None:
    key = f"idem{next(_prefixes)}"
    assert (await store.idem_begin(key, "fp1", 30)).state == "new"
    assert (await store.idem_begin(key, "fp1", 30)).state == "pending"
    assert (await store.idem_begin(key, "fp2", 30)).state == "conflict"
    await store.idem_finish(key, "fp2", '{"other": 1}', 60)  # not the claimant's: ignored
    await store.idem_finish(key, "fp1", '{"body": "x"}', 60)
    claim = await store.idem_begin(key, "fp1", 30)
    assert claim.state == "done" and claim.response == '{"body": "x"}'
    await store.idem_release(key, "fp1")  # a finished key is never released
    assert (await store.idem_begin(key, "fp1", 30)).state == "done"


async def test_idempotency_release_and_lease_free_the_key(store: StateStore) -> None:
    key = f"idem{next(_prefixes)}"
    assert (await store.idem_begin(key, "fp1", 30)).state == "new"
    await store.idem_release(key, "other")  # only the claimant's fingerprint releases
    assert (await store.idem_begin(key, "fp1", 30)).state == "pending"
    await store.idem_release(key, "fp1")
    assert (await store.idem_begin(key, "fp2", 0.2)).state == "new"
    await asyncio.sleep(0.3)  # the claimant died: its lease runs out
    assert (await store.idem_begin(key, "fp3", 30)).state == "new"
