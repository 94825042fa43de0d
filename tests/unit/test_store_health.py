"""/readyz asks the results store whether it answers through StoreHealth.check: anyone may
call /readyz, and a probe of a hung store takes up to the store's timeout, so callers share
one probe, and a call that got an answer in the last seconds stands in for one."""

from __future__ import annotations

import asyncio

import pytest

from gateway.results.base import StoreHealth

pytestmark = pytest.mark.anyio


async def test_concurrent_readiness_checks_share_one_probe() -> None:
    health = StoreHealth("s3")
    probes = 0
    release = asyncio.Event()

    async def ping() -> bool:
        nonlocal probes
        probes += 1
        await release.wait()  # a slow store
        health.succeeded()
        return True

    checks = [asyncio.ensure_future(health.check(ping)) for _ in range(50)]
    await asyncio.sleep(0.05)
    release.set()
    assert all(await asyncio.gather(*checks))
    assert probes == 1
    assert await health.check(ping) and probes == 1  # answered just now: no new probe


async def test_a_store_known_down_is_not_probed_again_by_readiness() -> None:
    health = StoreHealth("s3")
    health.failed(ConnectionError("refused"))

    async def ping() -> bool:
        raise AssertionError("probed")

    assert not await health.check(ping)
