"""The upscale path through the official openai SDK against a real gateway process and the
provider emulators on real sockets."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import ImagesResponse

from tests.conftest import make_image
from tests.integration.conftest import FAL_KEY, REPLICATE_TOKEN
from tests.integration.helpers import decoded, fetch_image
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"


def edit(client: OpenAI, image: bytes, **extra: object) -> ImagesResponse:
    direct = {
        k: extra.pop(k)
        for k in ("response_format", "n", "size", "output_format", "output_compression")
        if k in extra
    }
    return client.images.edit(
        model=MODEL,
        image=("in.png", image, "image/png"),
        prompt="upscale",
        extra_body=extra or None,
        **direct,
    )  # type: ignore[arg-type]


def test_url_response_is_the_gateways_signed_url(client: OpenAI) -> None:
    raw = client.images.with_raw_response.edit(
        model=MODEL,
        image=("in.png", make_image(60, 40), "image/png"),
        prompt="x",
        extra_body={"scale_factor": 2},
    )
    result = raw.parse()
    url = result.data[0].url
    assert url and url.startswith(str(client.base_url).removesuffix("v1/")) and "signature=" in url
    img, response = fetch_image(url)
    assert img.size == (120, 80) and response.headers["content-type"] == "image/png"
    assert result.size == "120x80" and result.output_format == "png"
    assert raw.headers["x-upscale-provider"] == "fal"
    assert raw.headers["x-upscale-cost-usd"] == "0.004000"
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["x-upscale-attempts"] == "fal=ok"


def test_b64_json_response(client: OpenAI, gateway: GatewayProcess) -> None:
    results = Path(gateway.env["GATEWAY_RESULTS_DIR"])
    before = sorted(results.glob("img_*"))
    result = edit(client, make_image(50, 50), response_format="b64_json", scale_factor=3)
    assert result.data[0].url is None
    assert decoded(result).size == (150, 150)
    assert sorted(results.glob("img_*")) == before  # inline only: no result file written


@pytest.mark.parametrize("fmt", ["png", "jpeg", "gif", "webp", "avif"])
def test_every_output_format_at_exact_size(client: OpenAI, fmt: str) -> None:
    result = edit(
        client, make_image(41, 33), output_format=fmt, scale_factor=1.5, response_format="b64_json"
    )
    img = decoded(result)
    assert img.format.lower() == fmt and img.size == (62, 50)  # 61.5 -> 62, 49.5 -> 50
    assert result.output_format == fmt


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_url_serves_right_content_type(client: OpenAI, fmt: str) -> None:
    result = edit(client, make_image(40, 40), output_format=fmt, scale_factor=2)
    img, response = fetch_image(result.data[0].url)
    assert response.headers["content-type"] == f"image/{fmt}" and img.size == (80, 80)


def test_output_compression_shrinks_lossy_output(client: OpenAI) -> None:
    sizes = [
        len(
            base64.b64decode(
                edit(
                    client,
                    make_image(64, 64),
                    output_format="jpeg",
                    output_compression=q,
                    response_format="b64_json",
                    scale_factor=2,
                )
                .data[0]
                .b64_json
                or ""
            )
        )
        for q in (10, 95)
    ]
    assert sizes[0] < sizes[1]


def test_n_three(client: OpenAI) -> None:
    raw = client.images.with_raw_response.edit(
        model=MODEL,
        image=("in.png", make_image(40, 40), "image/png"),
        prompt="x",
        n=3,
        extra_body={"scale_factor": 2},
    )
    result = raw.parse()
    assert len(result.data) == 3
    assert len({item.url for item in result.data}) == 3
    assert all(fetch_image(item.url)[0].size == (80, 80) for item in result.data)
    assert raw.headers["x-upscale-cost-usd"] == "0.012000"


def test_size_instead_of_scale_factor(client: OpenAI) -> None:
    result = edit(client, make_image(100, 50), size="400x400")
    assert decoded(result).size == (400, 200) and result.size == "400x200"


def test_native_output_when_no_factor(client: OpenAI) -> None:
    result = edit(client, make_image(100, 50))
    assert decoded(result).size == (400, 200)  # the model's native 4x


def test_json_body_with_a_data_uri(client: OpenAI) -> None:
    uri = "data:image/png;base64," + base64.b64encode(make_image(36, 40, fmt="WEBP")).decode()
    result = client.post(
        "/images/edits",
        body={"model": MODEL, "image": uri, "scale_factor": 2, "response_format": "b64_json"},
        cast_to=ImagesResponse,
    )
    assert decoded(result).size == (72, 80)


def test_json_body_openai_images_shape(client: OpenAI) -> None:
    uri = "data:image/png;base64," + base64.b64encode(make_image(32, 32)).decode()
    result = client.post(
        "/images/edits",
        cast_to=ImagesResponse,
        body={
            "model": MODEL,
            "images": [{"image_url": uri}],
            "size": "64x64",
            "response_format": "b64_json",
        },
    )
    assert decoded(result).size == (64, 64)


def test_image_array_field_and_curl_style_form(gateway: object, client: OpenAI) -> None:
    base = str(client.base_url)
    files = {"image[]": ("x", make_image(40, 40, fmt="JPEG"), "application/octet-stream")}
    response = httpx.post(
        f"{base}images/edits",
        files=files,
        data={"model": MODEL, "scale_factor": "2", "response_format": "b64_json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "80x80"


def test_transparency_is_restored(client: OpenAI) -> None:
    result = edit(
        client, make_image(40, 40, mode="RGBA"), scale_factor=2, response_format="b64_json"
    )
    img = decoded(result)
    assert img.mode == "RGBA" and img.getpixel((2, 40))[3] == 0 and img.getpixel((78, 40))[3] == 255


def test_models(client: OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [
        MODEL,
        "fal-ai/recraft/upscale/crisp",
        "fal/recraft-crisp-upscale",
        "recraft-ai/recraft-crisp-upscale",
        "replicate/recraft-crisp-upscale",
    ]
    assert client.models.retrieve(MODEL).owned_by == "recraft"
    alias = client.models.retrieve("fal-ai/recraft/upscale/crisp")
    assert alias.id == "fal-ai/recraft/upscale/crisp"
    schema = client.get(f"/models/{MODEL}?schema=true", cast_to=object)
    props = schema["parameters"]["properties"]  # type: ignore[index]
    assert props["output_format"]["enum"] == ["png", "jpeg", "gif", "webp", "avif"]
    assert props["scale_factor"]["maximum"] == 4


def test_health_and_readiness(client: OpenAI) -> None:
    base = str(client.base_url).removesuffix("v1/")
    assert httpx.get(f"{base}healthz").json() == {"status": "ok"}
    text = httpx.get(f"{base}readyz").text
    assert FAL_KEY not in text and REPLICATE_TOKEN not in text  # no secrets in readiness
    ready = httpx.get(f"{base}readyz").json()
    assert ready["status"] == "ready" and ready["sandbox"] is False
    assert {p["name"]: p["enabled"] for p in ready["providers"]} == {"fal": True, "replicate": True}
    assert ready["state_store"]["kind"] == "memory"


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("fal/recraft-crisp-upscale", "fal"),
        ("fal-ai/recraft/upscale/crisp", "fal"),
        ("replicate/recraft-crisp-upscale", "replicate"),
        ("recraft-ai/recraft-crisp-upscale", "replicate"),
    ],
)
def test_a_model_id_that_names_a_provider_serves_only_through_it(
    client: OpenAI, model: str, provider: str
) -> None:
    # The model card's convention, as provider.only: no other provider even as a fallback.
    raw = client.images.with_raw_response.edit(
        image=("a.png", make_image(48, 32), "image/png"), model=model, prompt=""
    )
    assert raw.headers["x-upscale-provider"] == provider
    assert raw.headers["x-upscale-attempts"] == f"{provider}=ok"
    other = "replicate" if provider == "fal" else "fal"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            image=("a.png", make_image(48, 32), "image/png"),
            model=model,
            prompt="",
            extra_body={"provider": {"only": [other]}},
        )
    assert f"served only through {provider}" in err.value.message


def test_dry_run_estimates_without_calling_a_provider(
    client: OpenAI, emulators: tuple[object, object]
) -> None:
    fal, replicate = emulators
    estimate = client.post(
        "/images/edits?dryRun=true",
        body={"model": MODEL, "n": 2},
        files=[("image", ("a.png", make_image(48, 32), "image/png"))],
        options={"headers": {"Content-Type": "multipart/form-data"}},
        cast_to=object,
    )
    assert estimate == {
        "estimated": True,
        "model": MODEL,
        "provider": "fal",
        "total_cost_micros": 8000,
        "currency": "USD",
        "components": [
            {
                "type": "image",
                "provider": "fal",
                "quantity": 2,
                "unit_cost_micros": 4000,
                "cost_micros": 8000,
            }
        ],
        "fallbacks": ["replicate"],
        "max_cost_micros": 12000,
    }
    pinned = client.post(
        "/images/edits?dryRun=true",
        body={"model": "replicate/recraft-crisp-upscale"},
        files=[("image", ("a.png", make_image(48, 32), "image/png"))],
        options={"headers": {"Content-Type": "multipart/form-data"}},
        cast_to=object,
    )
    assert pinned["provider"] == "replicate" and pinned["total_cost_micros"] == 6000  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):  # validated as a real request would be
        client.post(
            "/images/edits?dryRun=true",
            body={"model": MODEL, "scale_factor": "9"},
            files=[("image", ("a.png", make_image(48, 32), "image/png"))],
            options={"headers": {"Content-Type": "multipart/form-data"}},
            cast_to=object,
        )
    assert fal.requests() == [] and replicate.requests() == []  # type: ignore[attr-defined]


def test_responses_carry_metadata_beside_the_headers(client: OpenAI) -> None:
    raw = client.images.with_raw_response.edit(
        image=("a.png", make_image(48, 32), "image/png"), model=MODEL, prompt=""
    )
    metadata = raw.parse().model_extra["metadata"]  # type: ignore[index]
    assert metadata == {
        "provider": raw.headers["x-upscale-provider"],
        "providers": [raw.headers["x-upscale-provider"]],
        "cost_usd": float(raw.headers["x-upscale-cost-usd"]),
        "attempts": raw.headers["x-upscale-attempts"].split(","),
        "cache": raw.headers["x-upscale-cache"],
    }
    assert metadata["provider"] == "fal" and metadata["cost_usd"] == 0.004
