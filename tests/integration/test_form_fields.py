"""What a form or JSON body says is what the request does: a field sent as a file part is
read (a browser's Blob, `-F provider=@p.json`), never dropped; JSON objects take JSON's own
types, as /openapi.json documents. And the small promises of the HTTP surface: HEAD where
GET is, pages only with their headers, no credentials in the public URL."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from tests.conftest import make_image
from tests.integration.conftest import Emulator
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"


def post_form(gateway: GatewayProcess, files: dict[str, tuple[str, bytes, str]]) -> httpx.Response:
    files = {"image": ("a.png", make_image(40, 32), "image/png"), **files}
    return httpx.post(
        f"{gateway.url}/v1/images/edits", data={"model": MODEL}, files=files, timeout=60
    )


def test_a_field_sent_as_a_file_part_is_honoured(
    gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    only = json.dumps({"only": ["replicate"]}).encode()
    answer = post_form(gateway, {"provider": ("p.json", only, "application/json")})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-upscale-provider"] == "replicate"
    cheap = json.dumps({"max_price": 0.001}).encode()
    refused = post_form(gateway, {"provider": ("p.json", cheap, "application/json")})
    assert refused.status_code == 400, refused.text  # no provider is that cheap
    scaled = post_form(gateway, {"scale_factor": ("s.txt", b"2", "text/plain")})
    assert scaled.status_code == 200 and scaled.json()["size"] == "80x64", scaled.text


def test_a_field_part_is_bounded_and_text(gateway: GatewayProcess) -> None:
    big = post_form(gateway, {"user": ("u.txt", b"x" * (64 * 1024 + 1), "text/plain")})
    assert big.status_code == 413 and big.json()["error"]["param"] == "user", big.text
    binary = post_form(gateway, {"user": ("u.bin", b"\xff\xfe\x00", "application/octet-stream")})
    assert binary.status_code == 400 and binary.json()["error"]["param"] == "user", binary.text


@pytest.mark.parametrize(
    "provider",
    [{"only": "fal"}, {"hedge": "true"}, {"max_price": "0.01"}, {"sort": "PRICE"}],
)
def test_json_provider_objects_take_json_types(gateway: GatewayProcess, provider: object) -> None:
    image = "data:image/png;base64," + base64.b64encode(make_image(40, 32)).decode()
    for answer in (
        httpx.post(
            f"{gateway.url}/v1/images/edits?dryRun=true",
            json={"model": MODEL, "image": image, "provider": provider},
        ),
        post_form(gateway, {"provider": ("p.json", json.dumps(provider).encode(), "text/plain")}),
    ):
        assert answer.status_code == 400, (provider, answer.text)
        assert answer.json()["error"]["param"].startswith("provider"), answer.text


@pytest.mark.parametrize(
    "path", ["/readyz", "/v1/models", "/v1/usage", "/", "/docs", "/playground"]
)
def test_head_is_answered_wherever_get_is(gateway: GatewayProcess, path: str) -> None:
    # Load balancers and uptime checks probe with HEAD (Starlette's routes answered it).
    answer = httpx.head(f"{gateway.url}{path}")
    assert answer.status_code == 200, (path, answer.status_code)
    assert answer.content == b""


def test_pages_are_served_only_with_their_headers(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.url}/static/playground.html").status_code == 404
    page = httpx.get(f"{gateway.url}/playground")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
