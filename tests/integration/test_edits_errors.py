"""One test per bad parameter: status, type and `param` as the openai SDK surfaces them."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import make_image

MODEL = "recraft-crisp-upscale"


def edit(client: OpenAI, image: bytes = b"", **fields: object) -> None:
    client.images.edit(
        model=fields.pop("model", MODEL),  # type: ignore[arg-type]
        image=("in.png", image or make_image(40, 40), "image/png"),
        prompt="x",
        extra_body=fields,
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"scale_factor": 0.5}, "scale_factor"),
        ({"scale_factor": 4.5}, "scale_factor"),
        ({"scale_factor": "abc"}, "scale_factor"),
        ({"size": "huge"}, "size"),
        ({"size": "20x20"}, "size"),
        ({"size": "1000x1000"}, "size"),  # factor 25 > 4
        ({"response_format": "file"}, "response_format"),
        ({"output_format": "bmp"}, "output_format"),
        ({"output_compression": 101}, "output_compression"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"enable_safety_checker": "perhaps"}, "enable_safety_checker"),
        ({"sync_mode": "sometimes"}, "sync_mode"),
        ({"user": "u" * 300}, "user"),
    ],
)
def test_bad_parameter_is_400_with_param(
    client: OpenAI, fields: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        edit(client, **fields)
    assert err.value.status_code == 400
    assert err.value.param == param
    body = err.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"
    assert err.value.response.headers["x-should-retry"] == "false"


def test_unknown_model_is_404_model_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        edit(client, model="dall-e-2")
    assert err.value.code == "model_not_found" and err.value.param == "model"


def test_unknown_model_retrieve_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-image-1")
    assert err.value.code == "model_not_found"


def test_not_an_image_is_415(client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        edit(client, image=b"%PDF-1.4 not an image at all")
    assert err.value.status_code == 415 and err.value.param == "image"


def test_corrupt_image_is_400(client: OpenAI) -> None:
    data = make_image(200, 200, fmt="JPEG")
    with pytest.raises(openai.BadRequestError) as err:
        edit(client, image=data[: len(data) // 3])
    assert err.value.param == "image"


def test_too_small_side_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        edit(client, image=make_image(20, 200))
    assert err.value.param == "image" and err.value.code == "image_dimensions_out_of_range"


def test_two_images_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            model=MODEL,
            prompt="x",
            image=[("a.png", make_image(), "image/png"), ("b.png", make_image(), "image/png")],
        )
    assert err.value.param == "image"


def test_missing_image_is_400(client: OpenAI) -> None:
    response = httpx.post(
        f"{client.base_url}images/edits", data={"model": MODEL}, files={"other": ("x", b"y")}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"


def test_json_body_errors(client: OpenAI) -> None:
    url = f"{client.base_url}images/edits"
    bad_json = httpx.post(url, content=b"{nope", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    no_image = httpx.post(url, json={"model": MODEL})
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "image"
    loopback = httpx.post(url, json={"model": MODEL, "image": "https://127.0.0.1/x.png"})
    assert loopback.status_code == 400
    assert loopback.json()["error"]["code"] == "image_url_forbidden"
    plain_http = httpx.post(url, json={"model": MODEL, "image": "http://example.com/x.png"})
    assert plain_http.status_code == 400 and plain_http.json()["error"]["param"] == "image"
    bad_b64 = httpx.post(url, json={"model": MODEL, "image": "data:image/png;base64,!!"})
    assert bad_b64.status_code == 400
    wrong = httpx.post(url, content=b"x", headers={"content-type": "text/plain"})
    assert wrong.status_code == 415


def test_signed_urls_are_checked(client: OpenAI) -> None:
    result = client.images.edit(
        model=MODEL,
        image=("a.png", make_image(), "image/png"),
        prompt="x",
        extra_body={"scale_factor": 1},
    )
    url = result.data[0].url or ""
    assert httpx.get(url).status_code == 200
    tampered = url.replace("signature=", "signature=0")
    assert httpx.get(tampered).status_code == 401
    other = url.replace("/img_", "/img_x")
    assert httpx.get(other).status_code == 401
    expired = url.split("?")[0] + "?expires=1&signature=" + "0" * 64
    assert httpx.get(expired).json()["error"]["code"] == "invalid_signature"


def test_unknown_route_is_enveloped(client: OpenAI) -> None:
    response = httpx.get(f"{client.base_url}images/nothing")
    assert response.status_code == 404 and set(response.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    assert response.headers["x-request-id"].startswith("req_")


def test_b64_not_a_number_scale(client: OpenAI) -> None:
    uri = "data:image/png;base64," + base64.b64encode(make_image()).decode()
    response = httpx.post(
        f"{client.base_url}images/edits", json={"model": MODEL, "image": uri, "scale_factor": [2]}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "scale_factor"
