"""Idempotency-Key through the openai SDK (`extra_headers`): a repeat, sequential or
concurrent, is served once by a provider and replayed; a different body under the same key
is a 409; a failed first attempt leaves the key free for the retry."""

from __future__ import annotations

import base64
import itertools
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import make_image
from tests.integration.conftest import Emulator

MODEL = "recraft-crisp-upscale"
_sizes = itertools.count(40)


def submits(emulator: Emulator) -> int:
    return sum(1 for r in emulator.requests() if r["path"].endswith(("/crisp", "/predictions")))


def edit(client: OpenAI, key: str, image: bytes, **extra: Any) -> Any:
    return client.images.with_raw_response.edit(
        model=MODEL,
        image=("a.png", image, "image/png"),
        prompt="x",
        extra_body={"scale_factor": 2, **extra},
        extra_headers={"Idempotency-Key": key},
    )


def test_a_repeat_is_replayed_not_run_again(
    client: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, replicate = emulators
    key, image = str(uuid.uuid4()), make_image(next(_sizes), 40)
    first = edit(client, key, image, response_format="b64_json")
    again = edit(client, key, image, response_format="b64_json")
    assert submits(fal) + submits(replicate) == 1
    assert again.parse().data[0].b64_json == first.parse().data[0].b64_json
    assert float(first.headers["x-upscale-cost-usd"]) > 0
    assert again.headers["x-upscale-cost-usd"] == "0.000000"
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers


def test_a_url_replay_is_signed_afresh_and_serves_the_same_bytes(
    client: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    key, image = str(uuid.uuid4()), make_image(next(_sizes), 40)
    first = edit(client, key, image).parse().data[0].url
    again = edit(client, key, image).parse().data[0].url
    assert first and again and first.split("?")[0] == again.split("?")[0]
    assert httpx.get(first).content == httpx.get(again).content
    fal, replicate = emulators
    assert submits(fal) + submits(replicate) == 1


def test_concurrent_duplicates_share_one_provider_call(
    client: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, replicate = emulators
    fal.faults(latency_ms=800, jitter_ms=0)  # the first is still running when the rest arrive
    key, image = str(uuid.uuid4()), make_image(next(_sizes), 40)
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(lambda _: edit(client, key, image, response_format="b64_json"), range(4))
        )
    assert submits(fal) + submits(replicate) == 1
    images = {a.parse().data[0].b64_json for a in answers}
    assert len(images) == 1 and base64.b64decode(images.pop()).startswith(b"\x89PNG")
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 3


def test_the_same_key_for_another_request_is_409(
    client: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    key = str(uuid.uuid4())
    edit(client, key, make_image(next(_sizes), 40))
    with pytest.raises(openai.ConflictError) as err:
        edit(client, key, make_image(next(_sizes), 40))
    assert err.value.status_code == 409
    assert err.value.body["code"] == "idempotency_key_reused"  # type: ignore[index]
    assert err.value.body["param"] == "Idempotency-Key"  # type: ignore[index]


def test_a_failed_first_attempt_leaves_the_key_for_the_retry(
    client: OpenAI, emulators: tuple[Emulator, Emulator]
) -> None:
    fal, replicate = emulators
    fal.faults(error_rate=1, error_status=500)
    replicate.faults(error_rate=1, error_status=500)
    key, image = str(uuid.uuid4()), make_image(next(_sizes), 40)
    with pytest.raises(openai.InternalServerError):
        edit(client, key, image)
    fal.faults()
    replicate.faults()
    assert edit(client, key, image).http_response.status_code == 200
    replayed = edit(client, key, image)
    assert replayed.headers["idempotent-replayed"] == "true"
