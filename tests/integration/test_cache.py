"""The result cache and coalescing through the openai SDK: an identical request is a hit at
$0 with the same image; ten identical requests at once make one provider call; `cache:
false` and any output-changing parameter miss; hits count in the ledger at no cost."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import make_image
from tests.integration.conftest import Emulator, own_gateway
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"
_sizes = itertools.count(40)


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
