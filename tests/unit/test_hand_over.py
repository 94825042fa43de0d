"""A hand-over keeps the claim, journal and all, as long as a replay would: the request's
retry after a long result-store outage follows the provider job already paid for."""

from __future__ import annotations

import time

import pytest

from gateway.idempotency import Idempotency
from gateway.state.base import CLAIM_KEEP_S
from gateway.state.memory import MemoryClaims

pytestmark = pytest.mark.anyio


async def test_a_hand_over_keeps_the_journal_for_the_replay_lifetime() -> None:
    claims = MemoryClaims()
    idempotency = Idempotency(claims, ttl_s=86_400, lease_s=10, wait_s=1)
    claimed = await idempotency.claim("key", "print")
    assert claimed.journal is not None
    await claimed.journal.noter(0)("fal", {"request_id": "r1"})
    await idempotency.hand_over(claimed.journal)
    left = claims._claims["key"].expires - time.time()
    assert left > CLAIM_KEEP_S and left > 86_000  # was 600 s: a later retry paid again
    retry = await idempotency.claim("key", "print")  # the lease is over: taken at once
    assert retry.journal is not None and retry.journal.resume == {
        0: [("fal", {"request_id": "r1"})]
    }
