"""The batch package's pure parts: the JSONL scan's byte ranges however the file is chunked,
its line numbers past an overlong line, webhook signatures as the openai SDK verifies them,
and list pages whose cursor object is gone."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from openai import OpenAI

from gateway.batch.jsonl import scan
from gateway.batch.model import id_seconds, new_id
from gateway.batch.service import page
from gateway.batch.webhooks import event, secret_key, sign


def _line(custom_id: str, pad: int = 0) -> bytes:
    body = {"model": "recraft-crisp-upscale", "image": "https://x.test/a.png", "pad": "p" * pad}
    item = {"custom_id": custom_id, "method": "POST", "url": "/v1/images/edits", "body": body}
    return json.dumps(item).encode()


async def _chunks(data: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    last = 0
    for cut in [*sorted(cuts), len(data)]:
        yield data[last:cut]
        last = cut


@pytest.mark.parametrize("seed", range(20))
def test_ranges_are_the_lines_however_the_file_is_chunked(seed: int) -> None:
    rng = random.Random(seed)
    lines = [_line(f"c{i}", rng.randrange(0, 300)) for i in range(30)]
    data = b"\n".join(lines) + (b"\n" if seed % 2 else b"")
    cuts = [rng.randrange(0, len(data)) for _ in range(rng.randrange(0, 60))]
    found = asyncio.run(scan(_chunks(data, cuts), max_line=10_000, max_lines=100))
    assert not found.errors
    assert [data[e.offset : e.offset + e.length] for e in found.entries] == lines


def test_an_overlong_line_is_named_and_the_lines_after_it_keep_their_numbers() -> None:
    lines = [_line("a"), _line("big", 5000), b"", _line("c"), b"{nope", _line("a")]
    data = b"\n".join(lines)
    found = asyncio.run(scan(_chunks(data, [7, 1000, 3000]), max_line=1000, max_lines=100))
    by_line = {e["line"]: e for e in found.errors}
    assert set(by_line) == {2, 5, 6}
    assert "longer than 1000 bytes" in by_line[2]["message"]
    assert by_line[6]["param"] == "custom_id"  # "a" again
    assert [e.line for e in found.entries] == [1, 4]


def test_more_lines_than_allowed_is_an_error_not_a_truncation() -> None:
    data = b"\n".join(_line(f"c{i}") for i in range(5))
    found = asyncio.run(scan(_chunks(data, []), max_line=10_000, max_lines=3))
    assert found.error_count == 1 and "more than 3" in found.errors[0]["message"]


def test_webhooks_verify_with_the_openai_sdk() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    payload = event("completed", "batch_abc", int(time.time()))
    body = orjson.dumps(payload)
    stamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(secret_key(secret), "msg_1", stamp, body),
    }
    unwrapped = OpenAI(api_key="x", webhook_secret=secret).webhooks.unwrap(body, headers)
    assert unwrapped.type == "batch.completed" and unwrapped.data.id == "batch_abc"
    forged = {**headers, "webhook-signature": sign(b"other-key-0123456", "msg_1", stamp, body)}
    with pytest.raises(Exception, match="signature"):
        OpenAI(api_key="x", webhook_secret=secret).webhooks.unwrap(body, forged)


@pytest.mark.parametrize("bad", ["whsec_", "sk_abc", "whsec_!!!", "whsec_" + "YWJj"])
def test_a_webhook_secret_that_cannot_sign_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="GATEWAY_WEBHOOK_SECRET"):
        secret_key(bad)


def test_a_page_after_a_deleted_item_starts_where_it_was() -> None:
    ids = []
    for _ in range(5):
        ids.append(new_id("batch"))
        time.sleep(0.002)
    stamps = [id_seconds(i) for i in ids]
    assert all(s is not None and abs(s - time.time()) < 5 for s in stamps)
    items = [{"id": i, "created_at": s} for i, s in zip(ids, stamps, strict=True)][::-1]
    gone = items.pop(2)
    after = page(items, gone["id"], 10)
    assert [i["id"] for i in after["data"]] == [i["id"] for i in items[2:]]
    oldest_first = list(reversed(items))
    forward = page(oldest_first, gone["id"], 10, descending=False)
    assert [i["id"] for i in forward["data"]] == [i["id"] for i in oldest_first[2:]]
    assert page(items, items[0]["id"], 2)["has_more"] is True
