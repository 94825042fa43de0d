"""The fal submit body spliced as bytes reads as the JSON of the same object, and the loop
probe sees a stall of the event loop."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import orjson
import pytest

from adapters.wire import OFF_LOOP_BYTES, data_uri_body
from gateway.looplag import LoopLagProbe


@pytest.mark.parametrize(
    "fields",
    [{}, {"a": 1}, {"b": None, "nested": {"x": [1, "two"]}, "s": 'quote " and \u2028'}],
)
@pytest.mark.parametrize("size", [0, 3, OFF_LOOP_BYTES + 1])
@pytest.mark.parametrize("mime", ["image/png", 'odd"/mime\n'])
def test_spliced_body_is_the_json_of_the_object(
    fields: dict[str, Any], size: int, mime: str
) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    body = asyncio.run(data_uri_body(fields, "image_url", data, mime, {"X": "1"}))
    uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    assert orjson.loads(body["content"]) == {"image_url": uri, **fields}
    assert body["headers"] == {"X": "1", "Content-Type": "application/json"}


def test_the_probe_sees_a_stalled_loop() -> None:
    seen: list[float] = []

    async def scenario() -> None:
        probe = asyncio.create_task(LoopLagProbe([seen.append]).run_forever())
        await asyncio.sleep(0.05)
        time.sleep(0.08)  # noqa: ASYNC251 (holds the loop, as a big encode on it would)
        await asyncio.sleep(0.05)
        probe.cancel()

    asyncio.run(scenario())
    assert max(seen) >= 0.06
    assert sorted(seen)[len(seen) // 2] < 0.03  # the rest of the time it woke on time
