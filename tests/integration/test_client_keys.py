"""Client keys through the openai SDK: with GATEWAY_API_KEYS set, /v1 needs one of them as
a Bearer key; the signed result URL stays fetchable without one; keys never reach logs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import make_image
from tests.integration.conftest import Emulator, start_gateway, write_config
from tests.integration.servers import GatewayProcess

KEYS = ("team-a-7f3c9e1d2b", "team-b-4a8d6f0e9c")


@pytest.fixture(scope="module")
def keyed_gateway(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    workdir: Path = tmp_path_factory.mktemp("keyed")
    process = start_gateway(
        workdir,
        fal_emulator,
        replicate_emulator,
        write_config(workdir / "g.yaml"),
        GATEWAY_API_KEYS=",".join(KEYS),
    )
    yield process
    process.stop()


def sdk(gateway: GatewayProcess, key: str) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_a_wrong_key_is_401_in_openais_envelope(keyed_gateway: GatewayProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        sdk(keyed_gateway, "team-a-7f3c9e1d2X").models.list()
    assert err.value.status_code == 401
    assert err.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    assert err.value.body["type"] == "authentication_error"  # type: ignore[index]
    assert err.value.response.headers["x-request-id"].startswith("req_")


def test_no_key_is_401_and_health_stays_open(keyed_gateway: GatewayProcess) -> None:
    response = httpx.post(
        f"{keyed_gateway.url}/v1/images/edits",
        files={"image": ("a.png", make_image(40, 40), "image/png")},
        data={"model": "recraft-crisp-upscale"},
    )
    assert response.status_code == 401
    assert "Bearer" in response.json()["error"]["message"]
    assert httpx.get(f"{keyed_gateway.url}/healthz").status_code == 200


def test_each_configured_key_works_and_the_url_needs_none(
    keyed_gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    for key in KEYS:
        result = sdk(keyed_gateway, key).images.edit(
            model="recraft-crisp-upscale",
            image=("a.png", make_image(40, 40), "image/png"),
            prompt="x",
            extra_body={"scale_factor": 2},
        )
        assert result.data and result.data[0].url
        fetched = httpx.get(result.data[0].url)  # the signed URL is the credential
        assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
    log = keyed_gateway.log()
    assert '"key_id":"key_' in log
    assert not any(key in log for key in KEYS)


def test_idempotency_keys_are_scoped_to_the_client_key(
    keyed_gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    """The same Idempotency-Key from two teams is two requests: one team never gets the
    other's stored response."""
    fal, replicate = emulators
    answers = [
        sdk(keyed_gateway, key).images.with_raw_response.edit(
            model="recraft-crisp-upscale",
            image=("a.png", make_image(48, 40), "image/png"),
            prompt="x",
            extra_body={"scale_factor": 2},
            extra_headers={"Idempotency-Key": "nightly-batch-0001"},
        )
        for key in KEYS
    ]
    assert all("idempotent-replayed" not in a.headers for a in answers)
    calls = [r for e in (fal, replicate) for r in e.requests() if r["method"] == "POST"]
    assert len(calls) == 2
