"""What the batch tests share: input lines, a JSONL file of them, waiting for a batch to end
through the SDK, reading its output, and a webhook receiver on a real socket."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from openai import OpenAI
from openai.types import Batch
from PIL import Image

from tests.conftest import make_image

MODEL = "recraft-crisp-upscale"
ENDPOINT = "/v1/images/edits"
SECRET = "whsec_" + base64.b64encode(b"batch-webhook-test-key-0123456789").decode()
FINAL = ("completed", "failed", "expired", "cancelled")


def data_uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def line(custom_id: str, image: bytes, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": MODEL, "image": data_uri(image), **body},
    }


def distinct_image(i: int, width: int = 40, height: int = 32) -> bytes:
    """A small image unique to `i` (no two lines share a cache key or a provider input)."""
    img = Image.new("RGB", (width, height), ((i * 37) % 256, (i * 91) % 256, (i // 256) % 256))
    img.putpixel((i % width, (i // width) % height), (255, 255, 255))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in lines)


def run(client: OpenAI, lines: list[dict[str, Any]], **create: Any) -> Batch:
    uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint=ENDPOINT,
        completion_window="24h",
        **create,
    )


def wait(
    client: OpenAI, batch_id: str, timeout_s: float = 120.0, until: tuple[str, ...] = FINAL
) -> Batch:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch still {batch.status} after {timeout_s} s: {batch}")
        time.sleep(0.2)


def read_lines(client: OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """An output or error file's lines by custom_id."""
    if file_id is None:
        return {}
    text = client.files.content(file_id).content
    out: dict[str, dict[str, Any]] = {}
    for raw in text.splitlines():
        item = json.loads(raw)
        assert item["custom_id"] not in out, f"{item['custom_id']} answered twice"
        out[item["custom_id"]] = item
    return out


def image_size(item: dict[str, Any]) -> tuple[int, int]:
    data = item["response"]["body"]["data"][0]
    return Image.open(io.BytesIO(base64.b64decode(data["b64_json"]))).size


@dataclass
class Received:
    body: str
    headers: dict[str, str]


@dataclass
class WebhookReceiver:
    """An HTTP server that keeps what it is sent; `fail_first` answers 500 to that many."""

    fail_first: int = 0
    received: list[Received] = field(default_factory=list)
    refused: int = 0

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length).decode()
                if receiver.refused < receiver.fail_first:
                    receiver.refused += 1
                    self.send_response(500)
                else:
                    receiver.received.append(Received(body, dict(self.headers.items())))
                    self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def events(self, timeout_s: float = 30.0, count: int = 1) -> list[Any]:
        """The events received, each verified (and parsed) by the openai SDK."""
        verifier = OpenAI(api_key="unused", webhook_secret=SECRET)
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return [verifier.webhooks.unwrap(r.body, r.headers) for r in self.received]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


__all__ = ["make_image"]
