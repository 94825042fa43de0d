from __future__ import annotations

import base64
import io

import httpx
from openai.types import ImagesResponse
from PIL import Image


def fetch_image(url: str) -> tuple[Image.Image, httpx.Response]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    img = Image.open(io.BytesIO(response.content))
    img.load()
    return img, response


def decoded(result: ImagesResponse, index: int = 0) -> Image.Image:
    item = result.data[index]
    if item.b64_json is not None:
        img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    else:
        img, _ = fetch_image(item.url)
    img.load()
    return img
