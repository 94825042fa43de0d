"""Bodies that once cost the gateway a 500 or seconds of image work: a field nested hundreds
of levels deep (a 500 under an Idempotency-Key) is a 400, with or without a key, and an
output over the gateway's limit is refused from the image's header, before any pixel is
decoded or a provider called."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.idempotency import _canonical_deep, canonical, fingerprint
from tests.conftest import make_image
from tests.integration.conftest import Emulator, own_gateway
from tests.integration.servers import GatewayProcess

MODEL = "recraft-crisp-upscale"
DEPTH = 300  # past orjson's 254 levels, which the fingerprint once recursed into


@pytest.fixture(scope="module")
def fresh_gateway(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    with own_gateway(tmp_path_factory, fal_emulator, replicate_emulator) as process:
        yield process


def submits(emulator: Emulator) -> int:
    return sum(1 for r in emulator.requests() if r["path"].endswith(("/crisp", "/predictions")))


def deep_form(url: str, image: bytes, depth: int, key: str | None = None) -> httpx.Response:
    name = "a" + "[x]" * depth  # extra_body bracket notation, unflattened `depth` levels deep
    return httpx.post(
        f"{url}/v1/images/edits",
        files={"image": ("a.png", image, "image/png")},
        data={"model": MODEL, "scale_factor": "2", name: "v"},
        headers={"Idempotency-Key": key} if key else {},
        timeout=60,
    )


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):  # objects and arrays in turn, one level each
        value = {"x": value} if level % 2 else [value]
    return value


def assert_too_deep(answer: httpx.Response, param: str) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_value" and error["param"] == param
    assert "nests more than 32 levels" in error["message"]


def test_a_form_field_nested_300_deep_is_a_400_with_or_without_a_key(
    fresh_gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    image = make_image(44, 40)
    assert_too_deep(deep_form(fresh_gateway.url, image, DEPTH, str(uuid.uuid4())), "a")
    assert_too_deep(deep_form(fresh_gateway.url, image, DEPTH), "a")  # the key changes nothing
    fal, replicate = emulators
    assert submits(fal) + submits(replicate) == 0


def test_a_field_at_the_depth_bound_is_served_and_replayed_under_a_key(
    fresh_gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    key, image = str(uuid.uuid4()), make_image(45, 40)
    first = deep_form(fresh_gateway.url, image, 31, key)  # the body object is the 32nd level
    assert first.status_code == 200, first.text
    again = deep_form(fresh_gateway.url, image, 31, key)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    fal, replicate = emulators
    assert submits(fal) + submits(replicate) == 1


def test_a_json_field_nested_300_deep_under_a_key_is_a_400(
    fresh_gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    uri = "data:image/png;base64," + base64.b64encode(make_image(46, 40)).decode()
    body = {"model": MODEL, "image": uri, "scale_factor": 2, "metadata": nested(DEPTH)}
    answer = httpx.post(
        f"{fresh_gateway.url}/v1/images/edits",
        json=body,
        headers={"Idempotency-Key": str(uuid.uuid4())},
        timeout=60,
    )
    assert_too_deep(answer, "metadata")


def test_the_fingerprint_takes_any_depth_and_matches_orjson_where_orjson_can() -> None:
    """Behind the 400, `fingerprint` itself has no depth limit (other callers, batch lines),
    and its deep encoding is orjson's sorted-keys JSON, so no request changes identity."""
    for value in ({"b": [1, 2.5, None, True, {"z": "é", "a": []}], "a": {"x": "😀"}}, nested(9)):
        assert canonical(value) == orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str)
        assert _canonical_deep(value) == canonical(value)
    deep = {"metadata": nested(DEPTH)}
    assert fingerprint("img", deep) == fingerprint("img", {"metadata": nested(DEPTH)})
    assert fingerprint("img", deep) != fingerprint("img", {"metadata": nested(DEPTH + 1)})
    assert orjson.loads(canonical(deep)) == deep


def cpu_seconds(process: GatewayProcess) -> float:
    """User + system CPU of the gateway process, all its threads (image workers included)."""
    assert process.proc is not None
    stat = Path(f"/proc/{process.proc.pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_output_over_the_limit_is_refused_from_the_header(
    fresh_gateway: GatewayProcess, emulators: tuple[Emulator, Emulator]
) -> None:
    image = make_image(4096, 4096, fmt="JPEG", quality=80)
    url = f"{fresh_gateway.url}/v1/images/edits"

    def post() -> httpx.Response:
        return httpx.post(
            url,
            files={"image": ("big.jpg", image, "image/jpeg")},
            data={"model": MODEL, "scale_factor": "4"},
            timeout=60,
        )

    post()  # warm: the first request of a process imports and compiles what it needs
    before = cpu_seconds(fresh_gateway)
    answers = [post() for _ in range(5)]
    spent = cpu_seconds(fresh_gateway) - before
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == {
            "message": "The output would be 16384x16384, over the gateway's limit "
            "(16384 px a side, 67108864 pixels).",
            "type": "invalid_request_error",
            "param": "scale_factor",
            "code": "invalid_value",
        }
    # Decoding and re-encoding the 16-megapixel JPEG once cost ~2.8 s of CPU a request.
    assert spent < 0.5, f"5 refusals cost {spent:.2f} s of gateway CPU"
    fal, replicate = emulators
    assert submits(fal) + submits(replicate) == 0
