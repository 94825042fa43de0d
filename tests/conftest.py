from __future__ import annotations

import io

import pytest
from PIL import Image


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_image(
    width: int = 64, height: int = 48, fmt: str = "PNG", mode: str = "RGB", **save: object
) -> bytes:
    """A small image with structure (a gradient), so resampling and codecs have work to do."""
    img = Image.linear_gradient("L").resize((width, height)).convert(mode)
    if mode == "RGBA":
        alpha = Image.new("L", (width, height), 255)
        alpha.paste(0, (0, 0, width // 2, height))  # left half transparent
        img.putalpha(alpha)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()
