"""The result cache and coalescing through the openai SDK: an identical request is a hit at
$0 with the same image; ten identical requests at once make one provider call; `cache:
false` and any output-changing parameter miss; hits count in the ledger at no cost. A
leader's failure is its own (its followers run under their own preferences); the cache is
scoped to the client key unless `cache.scope: shared`; a hit honours `only`/`ignore`; an
evicted entry is run once more and then hits again."""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gateway.state.base import StateStore
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore
from gateway.state.resilient import ResilientStore
from tests.conftest import make_image
from tests.integration.conftest import Emulator, own_gateway, start_gateway, write_config
from tests.integration.redis_server import RedisServer
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"
KEYS = ("team-a-5e1f0c7b3d", "team-b-9a2c4e6f8b")
_sizes = itertools.count(40)
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def cached(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    with own_gateway(
        tmp_path_factory, fal_emulator, replicate_emulator, cache={"enabled": True}
    ) as process:
        yield process


@pytest.fixture
def sdk(cached: GatewayProcess, emulators: tuple[Emulator, Emulator]) -> OpenAI:
    return OpenAI(base_url=f"{cached.url}/v1", api_key="any", max_retries=0, timeout=60)


def edit(client: OpenAI, image: bytes, **extra: Any) -> Any:
    return client.images.with_raw_response.edit(
        model=MODEL,
        image=("a.png", image, "image/png"),
        prompt="x",
        extra_body={"scale_factor": 2, **extra},
    )


def submits(*emulators: Emulator) -> int:
    return sum(
        1 for e in emulators for r in e.requests() if r["path"].endswith(("/crisp", "/predictions"))
    )


def test_an_identical_request_is_a_hit_at_no_cost(
    sdk: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    image = make_image(next(_sizes), 40)
    first = edit(sdk, image, response_format="b64_json")
    again = edit(sdk, image, response_format="b64_json")
    assert first.headers["x-upscale-cache"] == "miss"
    assert float(first.headers["x-upscale-cost-usd"]) > 0
    assert again.headers["x-upscale-cache"] == "hit"
    assert again.headers["x-upscale-cost-usd"] == "0.000000"
    assert again.parse().data[0].b64_json == first.parse().data[0].b64_json
    # The other response format is the same result: a hit too, as a URL to the same bytes.
    as_url = edit(sdk, image)
    assert as_url.headers["x-upscale-cache"] == "hit"
    fetched = httpx.get(as_url.parse().data[0].url).content
    assert fetched == base64.b64decode(first.parse().data[0].b64_json)
    assert submits(*emulators) == 1


def test_ten_identical_requests_at_once_make_one_provider_call(
    sdk: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, _ = emulators
    fal.faults(latency_ms=700, jitter_ms=0)
    image = make_image(next(_sizes), 40)
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: edit(sdk, image, response_format="b64_json"), range(10)))
    assert submits(*emulators) == 1
    kinds = sorted(a.headers["x-upscale-cache"] for a in answers)
    assert kinds.count("miss") == 1 and set(kinds) <= {"miss", "coalesced", "hit"}
    assert len({a.parse().data[0].b64_json for a in answers}) == 1
    assert sum(float(a.headers["x-upscale-cost-usd"]) for a in answers) == pytest.approx(0.004)


def test_opting_out_and_output_parameters_miss(
    sdk: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    image = make_image(next(_sizes), 40)
    edit(sdk, image)
    assert edit(sdk, image, cache=False).headers["x-upscale-cache"] == "bypass"
    assert edit(sdk, image, output_format="webp").headers["x-upscale-cache"] == "miss"
    assert edit(sdk, image, scale_factor=3).headers["x-upscale-cache"] == "miss"
    # Neither the response format nor routing preferences change the image.
    again = edit(sdk, image, response_format="b64_json", provider={"sort": "latency"})
    assert again.headers["x-upscale-cache"] == "hit"
    assert submits(*emulators) == 4


def test_a_failed_leader_leaves_the_name_free(
    sdk: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, replicate = emulators
    fal.faults(error_rate=1, error_status=500)
    replicate.faults(error_rate=1, error_status=500)
    image = make_image(next(_sizes), 40)
    with pytest.raises(Exception):  # noqa: B017 - the 503 itself is tested elsewhere
        edit(sdk, image)
    fal.faults()
    replicate.faults()
    assert edit(sdk, image).headers["x-upscale-cache"] == "miss"
    assert edit(sdk, image).headers["x-upscale-cache"] == "hit"


def test_hits_are_counted_and_cost_nothing_in_the_ledger(
    sdk: OpenAI, cached: GatewayProcess
) -> None:
    before = httpx.get(f"{cached.url}/v1/usage").json()["today"]
    image = make_image(next(_sizes), 40)
    edit(sdk, image)
    edit(sdk, image)
    after = httpx.get(f"{cached.url}/v1/usage").json()["today"]
    assert after["cache_hits"] == before["cache_hits"] + 1
    assert after["requests"] == before["requests"] + 2
    assert after["spend_usd"] == pytest.approx(before["spend_usd"] + 0.004)
    assert after["spend_usd"] == pytest.approx(
        sum(v["spend_usd"] for v in after["by_provider"].values())
    )


def _file_id(url: str) -> str:
    return url.split("/v1/files/", 1)[1].split("/", 1)[0]


def test_followers_do_not_inherit_the_leaders_own_failure(
    sdk: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, _ = emulators
    fal.faults(latency_ms=700, jitter_ms=0, job_failure_rate=1)  # fal fails, replicate serves
    image = make_image(next(_sizes), 40)
    with ThreadPoolExecutor(4) as pool:
        # The leader allows no fallback: fal's failure is a 503 for it alone.
        leader = pool.submit(
            lambda: sdk.images.with_raw_response.edit(
                model=MODEL,
                image=("a.png", image, "image/png"),
                prompt="x",
                extra_body={"scale_factor": 2, "provider": {"allow_fallbacks": False}},
            )
        )
        time.sleep(0.3)  # the others arrive while it runs, and wait on it
        others = [pool.submit(edit, sdk, image) for _ in range(3)]
        with pytest.raises(openai.APIStatusError) as failed:
            leader.result()
        answers = [o.result() for o in others]
    assert failed.value.status_code == 503
    assert {a.headers["x-upscale-provider"] for a in answers} == {"replicate"}
    kinds = sorted(a.headers["x-upscale-cache"] for a in answers)
    assert kinds.count("miss") == 1 and set(kinds) <= {"miss", "coalesced", "hit"}
    # The new leader's attempts are its own: fal failed, then replicate; never the first's.
    led = next(a for a in answers if a.headers["x-upscale-cache"] == "miss")
    assert led.headers["x-upscale-attempts"].count("fal") == 1
    assert "replicate" in led.headers["x-upscale-attempts"]


def test_a_hit_honours_the_requests_provider_restrictions(
    sdk: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    image = make_image(next(_sizes), 40)
    first = edit(sdk, image)
    assert first.headers["x-upscale-provider"] == "fal"
    for provider in ({"only": ["replicate"]}, {"ignore": ["fal"]}):
        other = edit(sdk, image, provider=provider)
        assert other.headers["x-upscale-cache"] != "hit"
        assert other.headers["x-upscale-provider"] == "replicate"
    # The fal-made entry was left as it was: an unrestricted repeat is still its hit.
    again = edit(sdk, image)
    assert again.headers["x-upscale-cache"] == "hit"
    assert again.headers["x-upscale-provider"] == "fal"
    assert edit(sdk, image, provider={"only": ["fal"]}).headers["x-upscale-cache"] == "hit"
    assert submits(*emulators) == 3


def test_an_evicted_entry_runs_once_more_then_hits(
    sdk: OpenAI, cached: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    image = make_image(next(_sizes), 40)
    first = edit(sdk, image)
    assert first.headers["x-upscale-cache"] == "miss"
    cache_dir = Path(cached.env["GATEWAY_RESULTS_DIR"]) / "cache"
    (cache_dir / _file_id(first.parse().data[0].url)).unlink()  # evicted
    before = submits(*emulators)
    again = edit(sdk, image)
    assert again.headers["x-upscale-cache"] == "miss"  # the new leader fills the entry
    fetched = httpx.get(again.parse().data[0].url)
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
    third = edit(sdk, image, response_format="b64_json")
    assert third.headers["x-upscale-cache"] == "hit"
    assert base64.b64decode(third.parse().data[0].b64_json) == fetched.content
    assert submits(*emulators) - before == 1


@pytest.fixture(scope="module", params=["key", "shared"])
def keyed(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    fal_emulator: Emulator,
    replicate_emulator: Emulator,
) -> Iterator[tuple[str, GatewayProcess]]:
    """A gateway with two client keys, under the default cache scope (key) or `shared`."""
    scope: str = request.param
    workdir = tmp_path_factory.mktemp(f"keyed-{scope}")
    cache = {"enabled": True} if scope == "key" else {"enabled": True, "scope": scope}
    config = write_config(workdir / "gateway.yaml", cache=cache)
    process = start_gateway(
        workdir, fal_emulator, replicate_emulator, config, GATEWAY_API_KEYS=",".join(KEYS)
    )
    try:
        yield scope, process
    finally:
        process.stop()


def test_the_cache_is_the_client_keys_own_unless_shared(
    keyed: tuple[str, GatewayProcess], emulators: tuple[Emulator, Emulator]
) -> None:
    scope, process = keyed
    team_a, team_b = (
        OpenAI(base_url=f"{process.url}/v1", api_key=k, max_retries=0, timeout=60) for k in KEYS
    )
    image = make_image(next(_sizes), 40)
    assert edit(team_a, image).headers["x-upscale-cache"] == "miss"
    other = edit(team_b, image)
    if scope == "key":  # team b learns nothing of team a's image, and pays for its own
        assert other.headers["x-upscale-cache"] == "miss"
        assert float(other.headers["x-upscale-cost-usd"]) > 0
        assert submits(*emulators) == 2
    else:
        assert other.headers["x-upscale-cache"] == "hit"
        assert submits(*emulators) == 1
    assert edit(team_a, image).headers["x-upscale-cache"] == "hit"
    assert edit(team_b, image).headers["x-upscale-cache"] == "hit"


def test_an_unknown_cache_scope_is_a_config_error() -> None:
    from pydantic import ValidationError

    from gateway.config import CacheConfig

    assert CacheConfig().scope == "key"
    assert CacheConfig(scope="shared").scope == "shared"
    with pytest.raises(ValidationError):
        CacheConfig(scope="everyone")  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis", "resilient"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_store = RedisStore(server.url, prefix=f"cache{next(_prefixes)}")
    yield redis_store if request.param == "redis" else ResilientStore(redis_store)
    await redis_store.aclose()


@pytest.mark.anyio
async def test_idem_drop_deletes_only_the_done_claim_that_was_read(store: StateStore) -> None:
    key = f"drop{next(_prefixes)}"
    assert (await store.idem_begin(key, "fp", 30)).state == "new"
    assert not await store.idem_drop(key, "fp", "")  # a pending claim is never dropped
    assert (await store.idem_begin(key, "fp", 30)).state == "pending"
    await store.idem_finish(key, "fp", '{"files": ["b"]}', 60)
    assert not await store.idem_drop(key, "fp", '{"files": ["a"]}')  # refilled since read
    assert not await store.idem_drop(key, "other", '{"files": ["b"]}')
    assert (await store.idem_begin(key, "fp", 30)).state == "done"
    assert await store.idem_drop(key, "fp", '{"files": ["b"]}')
    assert (await store.idem_begin(key, "fp", 30)).state == "new"
    assert not await store.idem_drop(f"drop{next(_prefixes)}", "fp", "x")  # no claim at all
