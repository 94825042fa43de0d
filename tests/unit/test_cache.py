"""ResultCache on the in-process store: a leader's failure is its own (its followers lead
in turn, and never see its exception); a hit honours `only`/`ignore`; an evicted entry is
dropped and led afresh; the cache key is scoped to the client key unless shared."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.cache import ResultCache, cache_key
from gateway.config import OutputConfig
from gateway.errors import InvalidRequest
from gateway.imaging import FinishedImage
from gateway.params import UpscaleParams
from gateway.results import FileResultStore
from gateway.routing.preferences import Preferences
from gateway.state.memory import MemoryStore

pytestmark = pytest.mark.anyio


def _cache(tmp_path: Path) -> ResultCache:
    files = FileResultStore(tmp_path / "cache", 3600, 1 << 20)
    files.open()
    return ResultCache(MemoryStore(), files, ttl_s=3600, lease_s=30, wait_s=10)


def _image() -> FinishedImage:
    return FinishedImage(data=b"\x89PNG-not-really", output_format="png", width=8, height=8)


async def test_followers_lead_in_turn_when_the_leader_fails(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    entered = asyncio.Event()
    release = asyncio.Event()
    failure = InvalidRequest("No provider costs at most 0.001 USD an image.")

    async def leader() -> None:
        async with cache.slot("k") as slot:
            assert slot.kind == "miss"
            entered.set()
            await release.wait()
            raise failure  # its own preferences: nobody else's failure

    async def follower() -> str:
        async with cache.slot("k") as slot:
            if slot.kind == "miss":
                await cache.fill(slot, [_image()], ["fal"])
            return slot.kind

    lead = asyncio.create_task(leader())
    await entered.wait()
    followers = [asyncio.create_task(follower()) for _ in range(3)]
    await asyncio.sleep(0.05)  # all three wait on the leader
    release.set()
    with pytest.raises(InvalidRequest) as raised:
        await lead
    assert raised.value is failure and failure.headers == {}
    kinds = sorted(await asyncio.gather(*followers))
    assert kinds == ["coalesced", "coalesced", "miss"]


async def test_a_hit_must_be_made_by_providers_the_request_allows(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    async with cache.slot("k") as slot:
        await cache.fill(slot, [_image()], ["fal"])
    for prefs, kind in (
        (Preferences(), "hit"),
        (Preferences(only=frozenset({"fal", "replicate"})), "hit"),
        (Preferences(only=frozenset({"replicate"})), "bypass"),
        (Preferences(ignore=frozenset({"fal"})), "bypass"),
    ):
        async with cache.slot("k", prefs) as slot:
            assert slot.kind == kind, prefs
            if slot.entry is None:
                await cache.fill(slot, [_image()], ["replicate"])  # stored unnamed
    async with cache.slot("k") as slot:  # the fal-made entry is left as it was
        assert slot.kind == "hit" and slot.entry is not None
        assert slot.entry.providers == ("fal",)


async def test_an_evicted_entry_is_dropped_and_led_afresh(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    async with cache.slot("k") as slot:
        first = await cache.fill(slot, [_image()], ["fal"])
    path = cache.files.path(first.files[0])
    assert path is not None
    path.unlink()
    async with cache.slot("k") as slot:
        assert slot.kind == "miss"
        await cache.fill(slot, [_image()], ["fal"])
    async with cache.slot("k") as slot:
        assert slot.kind == "hit"


async def test_an_entry_on_another_replicas_disk_is_left_to_it(tmp_path: Path) -> None:
    store = MemoryStore()
    here = FileResultStore(tmp_path / "a", 3600, 1 << 20)
    there = FileResultStore(tmp_path / "b", 3600, 1 << 20)
    here.open()
    there.open()
    mine = ResultCache(store, here, ttl_s=3600, lease_s=30, wait_s=10)
    theirs = ResultCache(store, there, ttl_s=3600, lease_s=30, wait_s=10)
    async with theirs.slot("k") as slot:
        await theirs.fill(slot, [_image()], ["fal"])
    async with mine.slot("k") as slot:  # not evicted: kept where it was made
        assert slot.kind == "bypass"
        await mine.fill(slot, [_image()], ["fal"])
    async with theirs.slot("k") as slot:
        assert slot.kind == "hit"


def test_the_key_is_scoped_to_the_account_unless_shared() -> None:
    params = UpscaleParams(
        model="m",
        scale_factor=2,
        size=None,
        response_format="url",
        output_format="png",
        output_compression=None,
        n=1,
        enable_safety_checker=None,
        sync_mode=None,
        user=None,
    )
    output = OutputConfig()
    shared = cache_key(b"img", params, output)
    assert cache_key(b"img", params, output, "") == shared
    team_a = cache_key(b"img", params, output, "key_a")
    assert team_a != shared and team_a != cache_key(b"img", params, output, "key_b")
    assert team_a == cache_key(b"img", params, output, "key_a")
