"""Per-request routing preferences through the openai SDK's `extra_body` (bracket notation
in multipart) and in JSON bodies."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import make_image
from tests.integration.conftest import Emulator

MODEL = "recraft-crisp-upscale"


def edit(client: OpenAI, provider: dict[str, object]):  # type: ignore[no-untyped-def]
    return client.images.with_raw_response.edit(
        model=MODEL,
        image=("in.png", make_image(40, 40), "image/png"),
        prompt="x",
        extra_body={"scale_factor": 2, "provider": provider},
    )


def test_only(client: OpenAI, emulators: tuple[Emulator, Emulator]) -> None:
    raw = edit(client, {"only": ["replicate"]})
    assert raw.headers["x-upscale-provider"] == "replicate"
    assert not emulators[0].requests()


def test_ignore(client: OpenAI, emulators: tuple[Emulator, Emulator]) -> None:
    assert edit(client, {"ignore": ["fal"]}).headers["x-upscale-provider"] == "replicate"


def test_max_price(client: OpenAI, emulators: tuple[Emulator, Emulator]) -> None:
    fal, replicate = emulators
    fal.faults(error_rate=1, error_status=500)
    with pytest.raises(openai.InternalServerError) as err:
        edit(client, {"max_price": 0.005})  # Replicate costs 0.006: no fallback there
    assert err.value.status_code == 503 and not replicate.requests()
    fal.faults()
    assert edit(client, {"max_price": 0.005}).headers["x-upscale-cost-usd"] == "0.004000"


def test_allow_fallbacks_false(client: OpenAI, emulators: tuple[Emulator, Emulator]) -> None:
    fal, replicate = emulators
    fal.faults(error_rate=1, error_status=500)
    with pytest.raises(openai.InternalServerError) as err:
        edit(client, {"allow_fallbacks": False})
    assert err.value.response.headers["x-upscale-attempts"] == "fal=ProviderUnavailable"
    assert not replicate.requests()
    assert edit(client, {"allow_fallbacks": True}).headers["x-upscale-provider"] == "replicate"


def test_order_and_sort(client: OpenAI, emulators: tuple[Emulator, Emulator]) -> None:
    assert (
        edit(client, {"order": ["replicate", "fal"]}).headers["x-upscale-provider"] == "replicate"
    )
    assert edit(client, {"sort": "price"}).headers["x-upscale-provider"] == "fal"


@pytest.mark.parametrize(
    ("provider", "param"),
    [
        ({"only": ["openai"]}, "provider.only"),
        ({"max_price": "free"}, "provider.max_price"),
        ({"sort": "random"}, "provider.sort"),
        ({"allow_fallbacks": "maybe"}, "provider.allow_fallbacks"),
        ({"max_price": 0.001}, "provider.max_price"),
    ],
)
def test_invalid_preferences_are_400(
    client: OpenAI, emulators: object, provider: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        edit(client, provider)
    assert err.value.param == param


def test_json_body_preferences(client: OpenAI, emulators: object) -> None:
    uri = "data:image/png;base64," + base64.b64encode(make_image(40, 40)).decode()
    response = httpx.post(
        f"{client.base_url}images/edits",
        timeout=30,
        json={
            "model": MODEL,
            "image": uri,
            "provider": {"only": ["replicate"]},
            "response_format": "b64_json",
        },
    )
    assert response.status_code == 200 and response.headers["x-upscale-provider"] == "replicate"


def test_metrics_endpoint(client: OpenAI, emulators: object) -> None:
    edit(client, {})
    text = httpx.get(f"{str(client.base_url).removesuffix('v1/')}metrics").text
    for name in (
        "upscale_provider_requests_total",
        "upscale_provider_latency_seconds_bucket",
        "upscale_spend_usd_total",
        "upscale_breaker_state",
        "upscale_requests_total",
    ):
        assert name in text, name
