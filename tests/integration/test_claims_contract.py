"""The claims contract: the in-process and the Redis claims (MemoryClaims, RedisClaims, and
the stores composed of them) must agree on every operation idempotency keys rely on: one
claimant, its lease, its journal, a takeover once the lease lapsed, and the owner-only
renew, note, finish and release. (`idem_drop`, which only the cache uses, is checked in
test_cache.py, against the resilient store too.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.state.base import ClaimStore
from gateway.state.memory import MemoryClaims
from gateway.state.redis import RedisClaims, RedisStore
from gateway.state.resilient import ResilientStore
from tests.integration.redis_server import RedisServer
from tests.integration.state_stores import KINDS, fresh, implementation

pytestmark = pytest.mark.anyio


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ClaimStore]:
    async with implementation(request, MemoryClaims, RedisClaims) as store:
        yield store


async def test_idempotency_key_is_claimed_once_then_replayed(store: ClaimStore) -> None:
    key = fresh("idem")
    assert (await store.idem_begin(key, "fp1", 30, "run1")).state == "new"
    assert (await store.idem_begin(key, "fp1", 30, "run2")).state == "pending"
    assert (await store.idem_begin(key, "fp2", 30, "run3")).state == "conflict"
    assert not await store.idem_finish(key, "fp2", '{"other": 1}', 60, "run3")  # not its claim
    assert not await store.idem_finish(key, "fp1", '{"other": 1}', 60, "run2")  # not its run
    assert await store.idem_finish(key, "fp1", '{"body": "x"}', 60, "run1")
    claim = await store.idem_begin(key, "fp1", 30, "run4")
    assert claim.state == "done" and claim.response == '{"body": "x"}'
    await store.idem_release(key, "fp1", "run1")  # a finished key is never released
    assert (await store.idem_begin(key, "fp1", 30, "run5")).state == "done"


async def test_idempotency_release_frees_the_key(store: ClaimStore) -> None:
    key = fresh("idem")
    assert (await store.idem_begin(key, "fp1", 30, "run1")).state == "new"
    await store.idem_release(key, "other", "run1")  # only the claimant's fingerprint ...
    await store.idem_release(key, "fp1", "run2")  # ... and only its run release it
    assert (await store.idem_begin(key, "fp1", 30, "run3")).state == "pending"
    await store.idem_release(key, "fp1", "run1")
    assert (await store.idem_begin(key, "fp2", 30, "run4")).state == "new"


async def test_a_lapsed_lease_is_taken_over_with_its_journal(store: ClaimStore) -> None:
    key = fresh("idem")
    assert (await store.idem_begin(key, "fp1", 0.4, "run1")).state == "new"
    assert await store.idem_note(key, "fp1", "0", '{"provider": "fal"}', "run1")
    assert not await store.idem_note(key, "other", "1", "{}", "run1")  # only the claimant notes
    await asyncio.sleep(0.25)
    assert await store.idem_renew(key, "fp1", 0.4, "run1")  # alive: renewed
    await asyncio.sleep(0.25)
    assert (await store.idem_begin(key, "fp1", 0.4, "run2")).state == "pending"
    # The claimant stopped renewing: after its lease, the same request takes over, journal
    # and all, and owns the claim from now on ...
    await asyncio.sleep(0.5)
    taken = await store.idem_begin(key, "fp1", 10, "run2")
    assert taken.state == "takeover" and taken.journal == {"job:0": '{"provider": "fal"}'}
    assert (await store.idem_begin(key, "fp1", 10, "run3")).state == "pending"
    assert (await store.idem_begin(key, "fp2", 10, "run4")).state == "conflict"  # ... not another
    assert await store.idem_finish(key, "fp1", '{"body": "y"}', 60, "run2")
    assert (await store.idem_begin(key, "fp1", 10, "run5")).state == "done"


async def test_a_renewal_keeps_the_claim_and_its_journal_as_long_as_asked(
    store: ClaimStore,
) -> None:
    # A hand-over (lease 0) after the store could not keep a paid result keeps the claim as
    # long as a replay would (idempotency.ttl_s), not the 600 s a crashed claimant's claim
    # gets: a retry after a longer store outage must still follow the job, not pay again.
    kept, dropped = fresh("idem"), fresh("idem")
    for key in (kept, dropped):
        assert (await store.idem_begin(key, "fp1", 30, "run1")).state == "new"
        assert await store.idem_note(key, "fp1", "0:fal", '{"provider": "fal"}', "run1")
    assert await store.idem_renew(kept, "fp1", 0.0, "run1", keep_s=60)
    assert await store.idem_renew(dropped, "fp1", 0.0, "run1", keep_s=0.3)
    await asyncio.sleep(0.8)
    claim = await store.idem_begin(kept, "fp1", 30, "run2")
    assert claim.state == "takeover" and claim.journal == {"job:0:fal": '{"provider": "fal"}'}
    assert (await store.idem_begin(dropped, "fp1", 30, "run2")).state == "new"


async def test_a_claimant_that_lost_its_claim_can_neither_renew_note_finish_nor_free_it(
    store: ClaimStore,
) -> None:
    key = fresh("idem")
    assert (await store.idem_begin(key, "fp1", 0.2, "slow")).state == "new"
    await asyncio.sleep(0.4)  # too slow to renew: a retry of the same request takes over
    assert (await store.idem_begin(key, "fp1", 30, "retry")).state == "takeover"
    assert not await store.idem_renew(key, "fp1", 30, "slow")
    assert not await store.idem_note(key, "fp1", "1", '{"provider": "fal"}', "slow")
    await store.idem_release(key, "fp1", "slow")  # the stale release frees nothing
    assert not await store.idem_finish(key, "fp1", '{"body": "stale"}', 60, "slow")
    assert (await store.idem_begin(key, "fp1", 30, "third")).state == "pending"
    assert await store.idem_finish(key, "fp1", '{"body": "new"}', 60, "retry")
    assert (await store.idem_begin(key, "fp1", 30, "fourth")).response == '{"body": "new"}'


async def test_a_slow_routing_read_does_not_send_claims_to_the_local_view(
    tmp_path: Path,
) -> None:
    """One routing read timing out marks Redis down for a second; claims and their notes
    must still go to Redis (a local claim would let a duplicate run, and be paid, twice)."""
    server = RedisServer(tmp_path).start()
    store = ResilientStore(RedisStore(server.url, prefix="slow"), retry_after_s=5)
    try:
        assert (await store.idem_begin("k1", "fp", 30, "run1")).state == "new"
        store._down_until = time.monotonic() + 5  # as after a routing read's timeout
        assert (await store.idem_begin("k1", "fp", 30, "run2")).state == "pending"
        assert await store.idem_note("k1", "fp", "0:fal", "{}", "run1")
        assert not await store.idem_note("k1", "fp", "0:fal", "{}", "run2")
        server.stop()  # now really away: a renewal cannot be confirmed, a note is not made
        with pytest.raises(ConnectionError):
            await store.idem_renew("k1", "fp", 30, "run1")
        assert not await store.idem_note("k1", "fp", "1:fal", "{}", "run1")
    finally:
        await store.aclose()
        server.stop()
