"""A photo-sized input reaches each provider within its limits, or is refused before anything
is billed with a message that says why (issue 12: a 1.4 MB photo used to become a 13.9 MB
PNG that the provider refused, and the caller got a non-retryable 400 for a valid upload)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import BadRequestError, OpenAI, RateLimitError
from PIL import Image

from tests.integration.conftest import Emulator, own_gateway
from tests.integration.servers import GatewayProcess
from tests.unit.test_provider_inputs import photo

RECRAFT_MAX_BYTES = 9_999_999  # under 10 MB
MODEL = "recraft-crisp-upscale"


@pytest.fixture(scope="module")
def photo_gateway(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    # Long enough for a 12-megapixel job on a loaded machine.
    with own_gateway(
        tmp_path_factory,
        fal_emulator,
        replicate_emulator,
        limits={"request_timeout_s": 90},
        providers={"fal": {"attempt_timeout_s": 90}, "replicate": {"attempt_timeout_s": 90}},
    ) as process:
        yield process


@pytest.fixture(scope="module")
def big_photo() -> bytes:
    data = photo(4000, 3000, quality=80)
    assert 2_000_000 <= len(data) <= 5_000_000, len(data)
    return data


def sent_sizes(emulator: Emulator) -> list[int]:
    """The size of every image the provider received (data URIs decoded, uploads)."""
    sizes = []
    for request in emulator.requests():
        value: Any = request.get("input") or {}
        for item in value.values() if isinstance(value, dict) else ():
            if isinstance(item, dict) and item.get("kind") == "data_uri":
                sizes.append(item["bytes"])
        if request.get("path") == "/v1/files":
            sizes.append(value["bytes"])
    return sizes


@pytest.mark.parametrize("provider", ["fal", "replicate"])
@pytest.mark.parametrize("scale", [1, 2])
def test_a_big_photo_upscales_through_each_provider(
    photo_gateway: GatewayProcess,
    emulators: tuple[Emulator, Emulator],
    big_photo: bytes,
    provider: str,
    scale: int,
) -> None:
    client = OpenAI(base_url=f"{photo_gateway.url}/v1", api_key="any", max_retries=0, timeout=120)
    raw = client.images.with_raw_response.edit(
        image=("photo.jpg", big_photo, "image/jpeg"),
        model="recraft-crisp-upscale",
        prompt="",
        response_format="url",
        extra_body={
            "scale_factor": scale,
            "output_format": "jpeg",
            "provider": {"only": [provider]},
        },
    )
    assert raw.headers["x-upscale-provider"] == provider
    result = raw.parse()
    assert result.data and result.data[0].url
    out = Image.open(io.BytesIO(_get(result.data[0].url)))
    assert out.size == (4000 * scale, 3000 * scale)
    emulator = dict(zip(("fal", "replicate"), emulators, strict=True))[provider]
    sizes = sent_sizes(emulator)
    assert sizes and max(sizes) <= RECRAFT_MAX_BYTES
    assert sizes[0] <= len(big_photo)  # the photo itself, not a PNG of it


def _get(url: str) -> bytes:
    response = httpx.get(url, timeout=60)
    response.raise_for_status()
    return response.content


def test_an_image_no_provider_can_take_is_refused_before_billing(
    photo_gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    # A noise PNG just over the providers' 10 MB yet under the gateway's own 10 MiB limit:
    # lossless, so it is not turned into a JPEG, and no provider may be sent it.
    side = 1830
    noise = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG", compress_level=0)
    data = buf.getvalue()
    assert RECRAFT_MAX_BYTES < len(data) <= 10 * 1024 * 1024, len(data)
    client = OpenAI(base_url=f"{photo_gateway.url}/v1", api_key="any", max_retries=0, timeout=120)
    with pytest.raises(BadRequestError) as err:
        client.images.edit(
            image=("noise.png", data, "image/png"), model="recraft-crisp-upscale", prompt=""
        )
    body: Any = err.value.body
    assert body["code"] == "image_unsupported_by_providers" and body["param"] == "image"
    assert "fal takes PNG/JPEG up to 10.0 MB" in body["message"]
    assert "replicate takes PNG/JPEG/WEBP up to 10.0 MB" in body["message"]
    assert err.value.response.headers.get("x-should-retry") == "false"
    fal, replicate = emulators
    assert fal.requests() == [] and replicate.requests() == []


NEAR_KEY, OPEN_KEY = "sk-near-budget-5e1", "sk-unlimited-9c2"


@pytest.fixture(scope="module")
def budget_gateway(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    # fal (the cheapest) takes at most 2 kB here; the near key's budget covers fal's price
    # only.
    keys = {
        "near": {"sha256": hashlib.sha256(NEAR_KEY.encode()).hexdigest(), "usd_per_day": 0.005},
        "open": {"sha256": hashlib.sha256(OPEN_KEY.encode()).hexdigest()},
    }
    with own_gateway(
        tmp_path_factory,
        fal_emulator,
        replicate_emulator,
        clients={"keys": keys},
        providers={"fal": {"input": {"formats": ["png"], "max_bytes": 2000}}},
    ) as process:
        yield process


def test_a_budget_that_leaves_only_an_unfit_provider_is_the_budgets_429(
    budget_gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, replicate = emulators
    image = photo(200, 150)
    url = f"{budget_gateway.url}/v1"
    near = OpenAI(base_url=url, api_key=NEAR_KEY, max_retries=0, timeout=60)
    with pytest.raises(RateLimitError) as err:
        near.images.edit(image=("p.jpg", image, "image/jpeg"), model=MODEL, prompt="")
    body: Any = err.value.body
    assert body["code"] == "insufficient_quota" and "replicate could" in body["message"]
    assert fal.requests() == [] and replicate.requests() == []
    # With a flag only fal supports, no budget would help: the image's 400 it is.
    with pytest.raises(BadRequestError) as refused:
        near.images.edit(
            image=("p.jpg", image, "image/jpeg"),
            model=MODEL,
            prompt="",
            extra_body={"enable_safety_checker": True},
        )
    flagged: Any = refused.value.body
    assert flagged["code"] == "image_unsupported_by_providers"
    assert "fal takes PNG up to 2.0 kB" in flagged["message"]
    # Without the budget, the provider that can take it serves it.
    unlimited = OpenAI(base_url=url, api_key=OPEN_KEY, max_retries=0, timeout=60)
    raw = unlimited.images.with_raw_response.edit(
        image=("p.jpg", image, "image/jpeg"), model=MODEL, prompt=""
    )
    assert raw.headers["x-upscale-provider"] == "replicate"
