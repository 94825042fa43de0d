"""An answered edit request, as plain values: where its images are kept, their bytes when they
are to be inlined, and the x-upscale values; and the ImagesResponse JSON made of it."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.cache import CachedResult
from gateway.upscale import Upscaled


@dataclass(frozen=True, slots=True)
class Edited:
    stored: CachedResult  # where its images are kept (no files for an unkept b64_json)
    # x-upscale-provider, -cost-usd, -attempts, -cache; `idempotent-replayed` on a replay
    headers: dict[str, str]
    images: list[bytes] | None = None  # b64_json: the images' bytes; url: None (see files)

    @property
    def cost_usd(self) -> float:
        """What this answer billed: 0 for a cache hit or a replay."""
        return float(self.headers.get("x-upscale-cost-usd", "0") or 0)

    @property
    def metadata(self) -> dict[str, Any]:
        return metadata(self.headers)


def upscale_headers(
    result: Upscaled | None, cache: str, providers: Sequence[str] = ()
) -> dict[str, str]:
    """The x-upscale headers: of the run that made the images, or of a cache hit (which
    names the providers that made them, at no cost and with no attempt)."""
    return {
        "x-upscale-provider": ",".join(dict.fromkeys(result.providers if result else providers)),
        "x-upscale-cost-usd": f"{result.cost_usd if result else 0:.6f}",
        "x-upscale-attempts": ",".join(a.header() for a in result.attempts) if result else "",
        "x-upscale-cache": cache,
    }


def metadata(headers: dict[str, str]) -> dict[str, Any]:
    """The x-upscale headers as the body's `metadata` object (the OpenAI SDKs keep it as an
    extra field, so a client that cannot read headers sees them too)."""
    attempts = headers.get("x-upscale-attempts", "")
    providers = headers.get("x-upscale-provider", "")
    return {
        "provider": providers.split(",")[0] if providers else None,
        "providers": providers.split(",") if providers else [],
        "cost_usd": float(headers.get("x-upscale-cost-usd", "0") or 0),
        "attempts": attempts.split(",") if attempts else [],
        "cache": headers.get("x-upscale-cache", ""),
    }


async def images_body(edited: Edited, url_for: Callable[[str], str]) -> bytes:
    """The ImagesResponse JSON: `b64_json` from the images in hand, or a `url` per stored file
    from `url_for(file_id)` (signing needs the caller's base URL)."""
    payload: dict[str, Any] = {
        "created": int(time.time()),
        "data": [],
        "output_format": edited.stored.output_format,
        "size": edited.stored.size,
        "metadata": edited.metadata,
    }
    if edited.images is not None:
        # Megabytes of base64 and JSON: a worker thread's job, not the event loop's.
        return await asyncio.to_thread(_b64_body, payload, edited.images)
    payload["data"] = [{"url": url_for(f)} for f in edited.stored.files]
    return orjson.dumps(payload)


def _b64_body(payload: dict[str, Any], blobs: list[bytes]) -> bytes:
    payload["data"] = [{"b64_json": base64.b64encode(b).decode("ascii")} for b in blobs]
    return orjson.dumps(payload)
